//! The one SQLite database of majordome, and group commit.
//!
//! Every durable part (the Clone state, Titanic, later the core services)
//! keeps its tables in one file, `majordome.db` in the data folder, opened
//! by [`open`] in WAL mode so that readers never wait for the writer.
//!
//! A write that is acknowledged must survive `kill -9` and, with
//! [`Durability::Full`] (the default), power loss: the commit returns only
//! once the WAL is on disk. An fsync per request would cap a service at a
//! few hundred writes per second, so writers that serve many clients hand
//! their work to a [`Committer`]: one thread that gathers whatever jobs are
//! waiting, runs each in its own savepoint, and commits them all with one
//! fsync (group commit). A job that fails is rolled back alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use rusqlite;

pub mod backup;
pub mod check;
use rusqlite::Connection;

/// The database file inside a data folder.
pub const FILE_NAME: &str = "majordome.db";

/// `path` with `suffix` appended to its file name (`majordome.db-wal`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The database file of the data folder `data_dir`.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data folder {path}: {source}")]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("cannot open the database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The batch this write was part of did not commit (a full disk, an
    /// I/O error); every write of the batch gets the same message.
    #[error("database commit failed: {0}")]
    Commit(String),
    #[error("the database writer has stopped")]
    Stopped,
}

/// What a commit survives once it has returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A crash of the process and a loss of power: the WAL is synced on
    /// every commit (`synchronous = FULL`).
    #[default]
    Full,
    /// A crash of the process (`kill -9`), not a loss of power: the WAL is
    /// synced only at checkpoints (`synchronous = NORMAL`).
    Process,
}

/// Opens (creating it and its folder if needed) the database at `path`, in
/// WAL mode, with the given durability and a busy timeout so that two
/// writers wait for each other instead of failing.
pub fn open(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|source| StoreError::Folder {
            path: folder.to_owned(),
            source,
        })?;
    }
    let fail = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let connection = Connection::open(path).map_err(fail)?;
    connection.busy_timeout(Duration::from_secs(10)).map_err(fail)?;
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "the database is not in WAL mode");
    }
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Process => "NORMAL",
    };
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON;"
        ))
        .map_err(fail)?;
    Ok(connection)
}

/// A job for the committer: runs inside its own savepoint, then hears
/// whether the whole batch committed.
trait Job: Send {
    fn run(&mut self, connection: &Connection) -> rusqlite::Result<()>;
    fn finish(self: Box<Self>, committed: Result<(), &rusqlite::Error>);
}

struct TypedJob<T, F, D> {
    work: Option<F>,
    outcome: Option<rusqlite::Result<T>>,
    /// Told the outcome once the batch is committed (or failed).
    done: D,
}

impl<T, F, D> Job for TypedJob<T, F, D>
where
    T: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
    D: FnOnce(Result<T, StoreError>) + Send,
{
    fn run(&mut self, connection: &Connection) -> rusqlite::Result<()> {
        let work = self.work.take().expect("a job runs once");
        let outcome = work(connection);
        let failed = outcome.is_err();
        self.outcome = Some(outcome);
        if failed {
            // Any error: tell `run_batch` to roll this savepoint back.
            return Err(rusqlite::Error::InvalidQuery);
        }
        Ok(())
    }

    fn finish(self: Box<Self>, committed: Result<(), &rusqlite::Error>) {
        let result = match (self.outcome, committed) {
            (Some(Err(e)), _) => Err(StoreError::Sqlite(e)),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(e)) => Err(StoreError::Commit(e.to_string())),
            (None, _) => Err(StoreError::Stopped),
        };
        (self.done)(result);
    }
}

/// A write handed to the [`Committer`]; [`Ticket::wait`] returns once it
/// is durable (or failed).
pub struct Ticket<T> {
    reply: mpsc::Receiver<Result<T, StoreError>>,
}

impl<T> Ticket<T> {
    /// Blocks until the job's batch is committed.
    pub fn wait(self) -> Result<T, StoreError> {
        self.reply.recv().unwrap_or(Err(StoreError::Stopped))
    }

    /// The outcome if the batch has committed already.
    pub fn try_get(&self) -> Option<Result<T, StoreError>> {
        match self.reply.try_recv() {
            Ok(result) => Some(result),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(StoreError::Stopped)),
        }
    }
}

/// Counters of a [`Committer`]: jobs over commits is the mean batch.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub jobs: AtomicU64,
    pub failed_jobs: AtomicU64,
}

/// Group commit: one thread owns the write connection and commits all
/// waiting jobs together. Dropping it finishes the jobs already handed in.
pub struct Committer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<CommitStats>,
}

/// At most this many jobs share one commit, so one batch never holds the
/// write lock for long.
const MAX_BATCH: usize = 1024;

impl Committer {
    /// Starts the writer thread on `connection` (from [`open`]).
    pub fn start(connection: Connection) -> Committer {
        let (sender, receiver) = mpsc::channel::<Box<dyn Job>>();
        let stats = Arc::new(CommitStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("db-committer".into())
            .spawn(move || {
                let mut connection = connection;
                while let Ok(first) = receiver.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match receiver.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(&mut connection, batch, &thread_stats);
                }
            })
            .expect("spawn the database committer");
        Committer {
            jobs: Some(sender),
            thread: Some(thread),
            stats,
        }
    }

    /// Hands `work` to the writer; it runs in its own savepoint inside the
    /// next batch. An error from `work` rolls back only its own changes.
    pub fn enqueue<T, F>(&self, work: F) -> Ticket<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, receiver) = mpsc::sync_channel(1);
        // If the thread is gone the job is dropped, its sender with it, and
        // the ticket reads `Stopped`. The submitter may also have given up
        // waiting; nothing to do then.
        self.enqueue_then(work, move |result| {
            let _ = reply.send(result);
        });
        Ticket { reply: receiver }
    }

    /// [`Committer::enqueue`], with `done` called on the writer thread with
    /// the outcome once the batch is committed (or failed) instead of a
    /// ticket: for a caller that must not block a thread per write (a
    /// worker answering once its write is durable). `done` must be quick.
    /// If the writer has stopped, `done` is never called.
    pub fn enqueue_then<T, F, D>(&self, work: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        let job = Box::new(TypedJob {
            work: Some(work),
            outcome: None,
            done,
        });
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// [`Committer::enqueue`], then waits until it is durable.
    pub fn submit<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.enqueue(work).wait()
    }

    pub fn stats(&self) -> Arc<CommitStats> {
        self.stats.clone()
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_batch(connection: &mut Connection, mut batch: Vec<Box<dyn Job>>, stats: &CommitStats) {
    let committed = (|| -> rusqlite::Result<()> {
        let transaction = connection.transaction()?;
        for job in batch.iter_mut() {
            transaction.execute_batch("SAVEPOINT job")?;
            match job.run(&transaction) {
                Ok(()) => transaction.execute_batch("RELEASE job")?,
                Err(_) => {
                    stats.failed_jobs.fetch_add(1, Ordering::Relaxed);
                    transaction.execute_batch("ROLLBACK TO job; RELEASE job")?
                }
            }
        }
        transaction.commit()
    })();
    if let Err(e) = &committed {
        tracing::error!(error = %e, jobs = batch.len(), "a database commit failed");
    } else {
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    for job in batch {
        job.finish(committed.as_ref().map(|_| ()));
    }
}

/// The one [`Committer`] of the database at `path` (with `durability`) in
/// this process, started on first use and stopped once nobody holds it.
/// SQLite has one writer at a time anyway: one committer per file lets
/// every part's writes share a commit (one fsync) instead of queueing for
/// the write lock, and costs one thread instead of one per part. Its
/// statistics count every part's writes.
pub fn shared_committer(path: &Path, durability: Durability) -> Result<Arc<Committer>, StoreError> {
    type Committers = std::collections::HashMap<(std::path::PathBuf, Durability), std::sync::Weak<Committer>>;
    static COMMITTERS: std::sync::OnceLock<std::sync::Mutex<Committers>> = std::sync::OnceLock::new();
    let mut committers = COMMITTERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (path.to_owned(), durability);
    if let Some(committer) = committers.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(committer);
    }
    let committer = Arc::new(Committer::start(open(path, durability)?));
    committers.retain(|_, weak| weak.strong_count() > 0);
    committers.insert(key, Arc::downgrade(&committer));
    Ok(committer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committer(dir: &Path) -> Committer {
        let connection = open(&database_path(dir), Durability::Full).unwrap();
        connection
            .execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
            .unwrap();
        Committer::start(connection)
    }

    fn count(dir: &Path) -> i64 {
        let reader = open(&database_path(dir), Durability::Full).unwrap();
        reader.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn open_creates_the_folder_and_uses_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = database_path(&dir.path().join("nested/data"));
        let connection = open(&path, Durability::Full).unwrap();
        let mode: String = connection.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = connection.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "FULL");
        assert!(path.exists());
    }

    #[test]
    fn a_failing_job_rolls_back_alone_and_the_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let committer = committer(dir.path());
        // Many threads at once, so that batches really hold several jobs.
        let committer = Arc::new(committer);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let committer = committer.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let key = format!("{t}-{i}");
                        let result = committer.submit(move |c| {
                            c.execute("INSERT INTO t (k, v) VALUES (?1, 1)", [&key])?;
                            if i % 10 == 0 {
                                // Changes made before the error are undone too.
                                c.execute("INSERT INTO t (k, v) VALUES ('dup', 1)", [])?;
                                c.execute("INSERT INTO t (k, v) VALUES ('dup', 1)", [])?;
                            }
                            Ok(i)
                        });
                        assert_eq!(result.is_ok(), i % 10 != 0, "{result:?}");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(count(dir.path()), 8 * 45);
        let stats = committer.stats();
        assert_eq!(stats.jobs.load(Ordering::Relaxed), 400);
        assert_eq!(stats.failed_jobs.load(Ordering::Relaxed), 40);
    }

    #[test]
    fn dropping_the_committer_finishes_what_was_handed_in() {
        let dir = tempfile::tempdir().unwrap();
        let committer = committer(dir.path());
        let tickets: Vec<_> = (0..100)
            .map(|i| committer.enqueue(move |c| c.execute("INSERT INTO t (k, v) VALUES (?1, 1)", [i.to_string()])))
            .collect();
        drop(committer);
        for ticket in tickets {
            assert_eq!(ticket.wait().unwrap(), 1);
        }
        assert_eq!(count(dir.path()), 100);
    }
}
