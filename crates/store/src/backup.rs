//! Online backups of the database, kept in rotation, and restoring one.
//!
//! A backup is SQLite's backup API run from a read connection: one read
//! transaction copies every page, so the copy is one consistent state of
//! the database while the hub keeps writing (WAL readers never block the
//! writer). Each copy is written beside its final name, checked with
//! `PRAGMA integrity_check`, synced, and only then renamed into place: a
//! crash during a backup never leaves a half copy under a backup's name.
//!
//! While parts of the hub run on a data folder they hold a shared lock on
//! its `majordome.lock`; a restore takes it exclusively, so it never
//! replaces a database that something has open.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OpenFlags};

use crate::{check, with_suffix};

/// The folder, inside the data folder, where backups are kept.
pub const FOLDER: &str = "backups";

/// What a backup or a restore can fail with, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("there is no database at {0}")]
    NoDatabase(PathBuf),
    #[error("{path} is not a usable backup: {why}; nothing was changed")]
    BadBackup { path: PathBuf, why: String },
    #[error("the copy made in {path} did not check out ({why}); it was removed")]
    BadCopy { path: PathBuf, why: String },
    #[error("majordome is running on the data folder {0} (it holds majordome.lock); stop it first, then restore")]
    InUse(PathBuf),
}

/// What [`backup`] did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub took: Duration,
}

/// What [`restore`] did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The database now in place.
    pub database: PathBuf,
    /// Where the files it replaced were moved (the database, its log).
    pub set_aside: Vec<PathBuf>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> BackupError + '_ {
    move |source| BackupError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// The backups folder of the data folder `data`.
pub fn folder(data: &Path) -> PathBuf {
    data.join(FOLDER)
}

/// A new backup's path in `folder`, named after the time (UTC), e.g.
/// `majordome-20261202T130501.042Z.db`; never an existing file's (a second
/// one in the same millisecond gets `_2`, which sorts after it).
pub fn new_backup_path(folder: &Path) -> PathBuf {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S%.3fZ").to_string();
    let mut path = folder.join(format!("majordome-{stamp}.db"));
    let mut n = 2;
    while path.exists() {
        path = folder.join(format!("majordome-{stamp}_{n}.db"));
        n += 1;
    }
    path
}

/// The backups in `folder`, oldest first (their names sort by time).
pub fn list(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut backups: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("majordome-") && n.ends_with(".db"))
        })
        .collect();
    backups.sort();
    backups
}

/// Removes what backups cut short by a crash left in `folder` (files
/// that never got a backup's name).
pub fn remove_partials(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.to_str().is_some_and(|p| p.ends_with(".db.partial")) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes all but the newest `keep` backups of `folder`; returns what it
/// removed.
pub fn rotate(folder: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let backups = list(folder);
    let excess = backups.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for path in backups.into_iter().take(excess) {
        std::fs::remove_file(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Copies the database at `database` to `target` while others may be
/// writing it; see the module documentation.
pub fn backup(database: &Path, target: &Path) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if !database.exists() {
        return Err(BackupError::NoDatabase(database.to_owned()));
    }
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let partial = with_suffix(target, ".partial");
    let _ = std::fs::remove_file(&partial);
    let result = copy_checked(database, &partial);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, target).map_err(io(target))?;
    sync_folder(target)?;
    let bytes = std::fs::metadata(target).map_err(io(target))?.len();
    Ok(BackupReport {
        path: target.to_owned(),
        bytes,
        took: started.elapsed(),
    })
}

fn copy_checked(database: &Path, partial: &Path) -> Result<(), BackupError> {
    let source = Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite(database))?;
    source.busy_timeout(Duration::from_secs(10)).map_err(sqlite(database))?;
    let mut copy = Connection::open(partial).map_err(sqlite(partial))?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut copy).map_err(sqlite(partial))?;
        // Every page in one step: one read transaction, one consistent
        // state, however busy the writer is.
        backup.step(-1).map_err(sqlite(partial))?;
    }
    // A copy in rollback-journal mode is one self-contained file.
    let _: String = copy
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(sqlite(partial))?;
    let verdict: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sqlite(partial))?;
    if verdict != "ok" {
        return Err(BackupError::BadCopy {
            path: partial.to_owned(),
            why: verdict,
        });
    }
    drop(copy);
    Ok(())
}

/// Replaces the database of the data folder `data` with the backup at
/// `file`, after checking the backup; the files it replaces are set aside
/// beside it, not deleted. Refused while anything runs on `data`.
pub fn restore(data: &Path, file: &Path) -> Result<RestoreReport, BackupError> {
    let bad = |why: String| BackupError::BadBackup {
        path: file.to_owned(),
        why,
    };
    if !file.is_file() {
        return Err(bad("there is no such file".into()));
    }
    check::check(file).map_err(|damage| bad(damage.to_string()))?;
    let tables: i64 = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| {
                r.get(0)
            })
        })
        .map_err(|e| bad(e.to_string()))?;
    if tables == 0 {
        return Err(bad("it holds no tables".into()));
    }
    let _lock = DataLock::exclusive(data)?;
    let database = crate::database_path(data);
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut set_aside = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let current = with_suffix(&database, suffix);
        if current.exists() {
            let aside = with_suffix(&database, &format!(".before-restore-{stamp}{suffix}"));
            std::fs::rename(&current, &aside).map_err(io(&current))?;
            set_aside.push(aside);
        }
    }
    let partial = with_suffix(&database, ".partial");
    std::fs::copy(file, &partial).map_err(io(&partial))?;
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, &database).map_err(io(&database))?;
    sync_folder(&database)?;
    Ok(RestoreReport { database, set_aside })
}

/// Makes a rename in `path`'s folder durable.
fn sync_folder(path: &Path) -> Result<(), BackupError> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(folder).and_then(|f| f.sync_all()).map_err(io(folder))
}

/// A lock on a data folder's `majordome.lock`: shared while parts run on
/// it, exclusive for a restore. Released when dropped (or when the process
/// dies: the kernel releases `flock` locks).
pub struct DataLock {
    _lock: Flock<File>,
}

impl DataLock {
    /// Held by every process that runs parts on `data`.
    pub fn shared(data: &Path) -> Result<DataLock, BackupError> {
        Self::take(data, FlockArg::LockSharedNonblock)
    }

    /// Held by a restore: only when nothing runs on `data`.
    pub fn exclusive(data: &Path) -> Result<DataLock, BackupError> {
        Self::take(data, FlockArg::LockExclusiveNonblock)
    }

    fn take(data: &Path, how: FlockArg) -> Result<DataLock, BackupError> {
        std::fs::create_dir_all(data).map_err(io(data))?;
        let path = data.join("majordome.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match Flock::lock(file, how) {
            Ok(lock) => Ok(DataLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(BackupError::InUse(data.to_owned())),
            Err((_, errno)) => Err(BackupError::Io {
                path,
                source: errno.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database_with(data: &Path, rows: i64) -> PathBuf {
        let path = crate::database_path(data);
        let connection = crate::open(&path, crate::Durability::Full).unwrap();
        connection
            .execute_batch("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
            .unwrap();
        for n in 0..rows {
            connection.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
        }
        path
    }

    fn rows(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_backup_is_a_checked_copy_made_while_a_writer_is_open() {
        let data = tempfile::tempdir().unwrap();
        let database = database_with(data.path(), 100);
        // A writer holds the database open, with commits still in its log.
        let writer = crate::open(&database, crate::Durability::Full).unwrap();
        writer.execute("INSERT INTO t VALUES (100)", []).unwrap();
        let target = new_backup_path(&folder(data.path()));
        let report = backup(&database, &target).unwrap();
        assert!(report.bytes > 0);
        assert_eq!(rows(&target), 101);
        assert!(!with_suffix(&target, "-wal").exists(), "a backup is one file");
        assert_eq!(list(&folder(data.path())), vec![target]);
        drop(writer);
    }

    #[test]
    fn rotation_keeps_the_newest() {
        let data = tempfile::tempdir().unwrap();
        let database = database_with(data.path(), 1);
        let folder = folder(data.path());
        let mut made = Vec::new();
        for _ in 0..4 {
            made.push(backup(&database, &new_backup_path(&folder)).unwrap().path);
        }
        assert_eq!(list(&folder), made, "names sort in the order they were made");
        assert_eq!(rotate(&folder, 2).unwrap(), made[..2]);
        assert_eq!(list(&folder), made[2..]);
    }

    #[test]
    fn restore_checks_the_backup_sets_the_current_files_aside_and_is_refused_while_running() {
        let data = tempfile::tempdir().unwrap();
        let database = database_with(data.path(), 10);
        let saved = backup(&database, &new_backup_path(&folder(data.path()))).unwrap().path;
        database_with(data.path(), 5);
        assert_eq!(rows(&database), 15);

        let running = DataLock::shared(data.path()).unwrap();
        let error = restore(data.path(), &saved).unwrap_err().to_string();
        assert!(error.contains("majordome is running on the data folder"), "{error}");
        drop(running);

        let junk = data.path().join("junk.db");
        std::fs::write(&junk, b"not a database at all, not even close to one").unwrap();
        let error = restore(data.path(), &junk).unwrap_err().to_string();
        assert!(
            error.contains("is not a usable backup") && error.contains("nothing was changed"),
            "{error}"
        );
        assert_eq!(rows(&database), 15);

        let report = restore(data.path(), &saved).unwrap();
        assert_eq!(rows(&database), 10);
        assert_eq!(report.set_aside.len(), 1, "{report:?}");
        assert_eq!(rows(&report.set_aside[0]), 15);
    }

    #[test]
    fn shared_locks_coexist() {
        let data = tempfile::tempdir().unwrap();
        let _a = DataLock::shared(data.path()).unwrap();
        let _b = DataLock::shared(data.path()).unwrap();
        assert!(matches!(DataLock::exclusive(data.path()), Err(BackupError::InUse(_))));
    }
}
