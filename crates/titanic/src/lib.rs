//! Titanic (ZeroMQ RFC 9, TSP): durable requests over the broker.
//!
//! Four services, each a worker on the bus like any plugin:
//! - `titanic.request`: `service | body…` → `200 | uuid` once the request
//!   is committed to SQLite (group commit shares fsyncs between workers);
//! - `titanic.reply`: `uuid` → `200 | reply…`, `300` (pending), `400`
//!   (unknown); it does not delete;
//! - `titanic.close`: `uuid` → `200` (also for an unknown uuid): forgets
//!   the request and its reply;
//! - `titanic.list` (not in the RFC): `200 | JSON`, for `majordome titanic
//!   list`.
//!
//! A malformed request is answered `400 <why>` (retrying cannot help); a
//! failure to store is `500 <why>` (retry later). The [`dispatcher`] sends
//! each stored request to its service once a worker is there, and stores
//! the reply.

pub mod client;
mod dispatcher;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_client::{Frames, Responder, Worker, WorkerOptions};
use majordome_net::Shutdown;
use majordome_store::{Committer, Durability, StoreError};
use serde::{Deserialize, Serialize};

pub use client::ReplyStatus;
pub use store::ListEntry;

/// The services Titanic serves.
pub const SERVICES: [&str; 4] = ["titanic.request", "titanic.reply", "titanic.close", "titanic.list"];

/// Titanic's settings, each with its default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Requests of `titanic.request` and `titanic.close` in flight at once
    /// (the capacity their workers announce). A request or close is
    /// answered once its commit is durable, and the writes of all the
    /// requests in flight share one fsync: more in flight, bigger groups.
    /// Their replies are sent from the commit's completion, so no thread
    /// waits per request. (`titanic.reply` and `titanic.list` are quick
    /// reads, answered on their socket threads.)
    pub request_workers: usize,
    pub close_workers: usize,
    /// Deadline of one attempt at the service (sent as the Domogik timeout
    /// frame, so the broker enforces it). A request that was in flight when
    /// Titanic stopped waits, after a restart, until this deadline has
    /// passed with no late worker, or until its service is quiet.
    #[serde(with = "majordome_net::duration_text")]
    pub attempt_timeout: Duration,
    /// Backoff after a failed attempt: first, and at most.
    #[serde(with = "majordome_net::duration_text")]
    pub retry_backoff: Duration,
    #[serde(with = "majordome_net::duration_text")]
    pub max_retry_backoff: Duration,
    /// How often a service with no worker is asked about again: first, and
    /// at most.
    #[serde(with = "majordome_net::duration_text")]
    pub service_backoff: Duration,
    #[serde(with = "majordome_net::duration_text")]
    pub max_service_backoff: Duration,
    /// Attempts in flight per service, and in all.
    pub max_in_flight_per_service: usize,
    pub max_in_flight: usize,
    /// Bytes in one stored request (service name and body).
    pub max_request_bytes: usize,
    /// Entries of each kind (pending, done) `titanic.list` returns.
    pub list_limit: usize,
    #[serde(skip)]
    pub durability: Durability,
    /// Whether each request's body starts with the caller's identity (the
    /// broker of the same hub adds it: `caller_frame_for`). Then each
    /// request belongs to whoever made it: only they see its reply, close
    /// it, or list it.
    #[serde(skip)]
    pub callers: bool,
    /// What named callers may ask Titanic to call for them (checked when
    /// the request is made, not when it is sent: Titanic sends as the hub).
    #[serde(skip)]
    pub policy: std::sync::Arc<majordome_access::Policy>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            request_workers: 16,
            close_workers: 8,
            attempt_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(60),
            service_backoff: Duration::from_millis(250),
            max_service_backoff: Duration::from_secs(10),
            max_in_flight_per_service: 64,
            max_in_flight: 1024,
            max_request_bytes: 1024 * 1024,
            list_limit: 1000,
            durability: Durability::Full,
            callers: false,
            policy: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TitanicError {
    #[error("titanic database: {0}")]
    Store(#[from] StoreError),
    #[error("titanic database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    Client(#[from] majordome_client::ClientError),
    #[error("titanic answered {0}")]
    Status(String),
    #[error("malformed answer from titanic: {0}")]
    Protocol(String),
    #[error("cannot start a titanic thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Counters, readable while Titanic runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub attempts: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub done: AtomicU64,
    pub closed: AtomicU64,
    pub malformed: AtomicU64,
    pub pending: AtomicU64,
    pub in_flight: AtomicU64,
}

/// A snapshot of the [`Counters`] and the committer's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests stored (answered 200).
    pub stored: u64,
    /// Attempts sent to services.
    pub attempts: u64,
    /// Attempts that failed (no answer, no worker, worker gone…).
    pub failed_attempts: u64,
    /// Replies stored.
    pub done: u64,
    /// `titanic.close` calls.
    pub closed: u64,
    /// Malformed titanic requests answered 400.
    pub malformed: u64,
    /// Requests waiting for their reply now.
    pub pending: u64,
    /// Attempts in flight now.
    pub in_flight: u64,
    /// SQLite commits, and writes they carried (writes/commits is the mean
    /// group).
    pub commits: u64,
    pub writes: u64,
}

/// A new request for the dispatcher, handed over after its commit.
pub(crate) struct NewRequest {
    pub uuid: String,
    pub service: String,
    pub body: Frames,
    /// Its row holds a deadline that covers a first attempt sent by then.
    pub sendable_until: Instant,
}

/// Titanic, ready to run.
pub struct Titanic {
    broker: String,
    database: PathBuf,
    settings: Settings,
    committer: Arc<Committer>,
    counters: Arc<Counters>,
}

impl Titanic {
    /// Opens (or creates) Titanic's table in the database at `database`.
    /// Nothing talks to the broker until [`Titanic::run`].
    pub fn start(broker: &str, database: &Path, settings: Settings) -> Result<Titanic, TitanicError> {
        let connection = majordome_store::open(database, settings.durability)?;
        store::prepare(&connection)?;
        drop(connection);
        let committer = majordome_store::shared_committer(database, settings.durability)?;
        Ok(Titanic {
            broker: broker.to_owned(),
            database: database.to_owned(),
            settings,
            committer,
            counters: Arc::new(Counters::default()),
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The database writer's counters (commits, and writes they carried).
    pub fn commit_stats(&self) -> Arc<majordome_store::CommitStats> {
        self.committer.stats()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        stats(&self.counters, &self.committer)
    }

    /// Serves until `shutdown` fires.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), TitanicError> {
        let (events, inbox) = mpsc::channel::<dispatcher::Event>();
        // The dispatcher first: if it cannot start, no thread is left running.
        let reader = majordome_store::open(&self.database, self.settings.durability)?;
        let pending = store::load_pending(&reader)?;
        drop(reader);
        let dispatcher = dispatcher::Dispatcher::new(
            &self.broker,
            self.committer.clone(),
            self.counters.clone(),
            self.settings.clone(),
            pending,
            events.clone(),
        )?;
        let reply_reader = majordome_store::open(&self.database, self.settings.durability)?;
        let callers = self.settings.callers;
        let list_reader = majordome_store::open(&self.database, self.settings.durability)?;
        let stop = shutdown.clone();
        let mut threads: Vec<thread::JoinHandle<Result<(), TitanicError>>> = vec![thread::Builder::new()
            .name("titanic-dispatch".into())
            .spawn(move || dispatcher.run(inbox, &stop))?];
        // A lookup by uuid: quick, answered on the socket thread, with
        // requests pipelined to it.
        let worker = self.worker("titanic.reply", 16);
        let stop = shutdown.clone();
        threads.push(
            thread::Builder::new()
                .name("titanic-reply".into())
                .spawn(move || Ok(worker.run_inline(reply_handler(reply_reader, callers), &stop)?))?,
        );
        let request = request_handler(
            self.committer.clone(),
            self.counters.clone(),
            events.clone(),
            &self.settings,
        );
        threads.push(self.spawn_deferred(
            "titanic-req",
            "titanic.request",
            self.settings.request_workers,
            request,
            shutdown,
        )?);
        let close = close_handler(self.committer.clone(), self.counters.clone(), events.clone(), callers);
        threads.push(self.spawn_deferred(
            "titanic-close",
            "titanic.close",
            self.settings.close_workers,
            close,
            shutdown,
        )?);
        drop(events);
        // `titanic.list` on this thread, until shutdown.
        let list = list_handler(list_reader, self.settings.list_limit, callers);
        let mut result = self
            .worker("titanic.list", 1)
            .run_inline(list, shutdown)
            .map_err(TitanicError::from);
        for thread in threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(TitanicError::Protocol("a titanic thread panicked".into())),
            }
        }
        result
    }

    /// A worker for `service` that may hold `capacity` requests at once.
    fn worker(&self, service: &str, capacity: usize) -> Worker {
        let options = WorkerOptions {
            capacity: capacity.clamp(1, majordome_mdp::mdp::MAX_CAPACITY as usize) as u32,
            ..WorkerOptions::default()
        };
        Worker::new(&self.broker, service, options)
    }

    /// A worker whose one handler thread hands each request to a commit
    /// and replies from its completion: `capacity` requests in flight.
    fn spawn_deferred<H>(
        &self,
        name: &str,
        service: &str,
        capacity: usize,
        handler: H,
        shutdown: &Shutdown,
    ) -> Result<thread::JoinHandle<Result<(), TitanicError>>, TitanicError>
    where
        H: FnMut(Frames, Responder) + Send + 'static,
    {
        let worker = self.worker(service, capacity);
        let stop = shutdown.clone();
        let mut handler = Some(handler);
        Ok(thread::Builder::new().name(name.into()).spawn(move || {
            let one = |_| handler.take().expect("one handler thread");
            Ok(worker.run_deferred(1, one, &stop)?)
        })?)
    }
}

pub(crate) fn stats(counters: &Counters, committer: &Committer) -> Stats {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let commits = committer.stats();
    Stats {
        stored: load(&counters.stored),
        attempts: load(&counters.attempts),
        failed_attempts: load(&counters.failed_attempts),
        done: load(&counters.done),
        closed: load(&counters.closed),
        malformed: load(&counters.malformed),
        pending: load(&counters.pending),
        in_flight: load(&counters.in_flight),
        commits: load(&commits.commits),
        writes: load(&commits.jobs),
    }
}

fn status(text: &str) -> Frames {
    vec![Bytes::copy_from_slice(text.as_bytes())]
}

/// `400 <why>`: a malformed request, not worth retrying.
fn malformed(counters: &Counters, why: &str) -> Frames {
    counters.malformed.fetch_add(1, Ordering::Relaxed);
    status(&format!("400 {why}"))
}

/// A uuid as `titanic.request` hands them out: 32 hex digits (any case).
fn parse_uuid(body: &[Bytes]) -> Result<String, &'static str> {
    let [uuid] = body else {
        return Err("expected one frame: the uuid");
    };
    let text = std::str::from_utf8(uuid).map_err(|_| "the uuid is not 32 hex digits")?;
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the uuid is not 32 hex digits");
    }
    Ok(text.to_ascii_lowercase())
}

/// The caller's identity and the rest of the body: the broker puts the
/// identity first when `callers` is on ("" for the hub and anonymous local
/// clients).
fn split_caller(mut body: Frames, callers: bool) -> (String, Frames) {
    if !callers || body.is_empty() {
        return (String::new(), body);
    }
    let caller = body.remove(0);
    (String::from_utf8_lossy(&caller).into_owned(), body)
}

/// Longest service name the broker accepts.
const MAX_SERVICE_NAME: usize = 255;

fn request_handler(
    committer: Arc<Committer>,
    counters: Arc<Counters>,
    dispatcher: mpsc::Sender<dispatcher::Event>,
    settings: &Settings,
) -> impl FnMut(Frames, Responder) + Send + 'static {
    let max_bytes = settings.max_request_bytes;
    let (callers, policy) = (settings.callers, settings.policy.clone());
    let first_attempt = settings.attempt_timeout + dispatcher::DEADLINE_MARGIN + dispatcher::FIRST_ATTEMPT_WINDOW;
    // The service name, once the request is found well formed.
    let checked = move |body: &Frames| -> Result<String, String> {
        // RFC 9: two frames or more, the service name and the body.
        let Some((service, _)) = body.split_first().filter(|(_, request)| !request.is_empty()) else {
            return Err("expected the service name, then at least one body frame".into());
        };
        let Ok(service) = std::str::from_utf8(service) else {
            return Err("the service name is not UTF-8".into());
        };
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            return Err("the service name must be 1 to 255 bytes long".into());
        }
        if service.starts_with("titanic.") || service.starts_with("mmi.") {
            return Err("titanic does not store requests for titanic.* or mmi.* services".into());
        }
        if body.iter().map(|f| f.len()).sum::<usize>() > max_bytes {
            return Err(format!("the request is larger than {max_bytes} bytes"));
        }
        Ok(service.to_owned())
    };
    move |body: Frames, responder: Responder| {
        let (owner, body) = split_caller(body, callers);
        let service = match checked(&body) {
            Ok(service) => service,
            Err(why) => return responder.send(malformed(&counters, &why)),
        };
        let request = body[1..].to_vec();
        // Titanic will send it as the hub: the caller must be allowed to
        // make it now.
        let who = majordome_access::Who::of(false, Some(&owner));
        let action = majordome_mdp::domogik::dialect_action(&request);
        if let Err(denied) = policy.may_call(who, &service, action) {
            return responder.send(malformed(&counters, &denied.to_string()));
        }
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        let (row_uuid, row_service, row_body) = (uuid.clone(), service.clone(), request.clone());
        // The row already covers a first attempt sent within the window, so
        // the common case needs no commit of its own before it is sent.
        let sendable_until = Instant::now() + dispatcher::FIRST_ATTEMPT_WINDOW;
        let deadline = store::unix_now() + first_attempt.as_secs_f64();
        let (counters, dispatcher) = (counters.clone(), dispatcher.clone());
        // Answered from the commit's completion: 200 only once durable.
        committer.enqueue_then(
            move |c| store::insert(c, &row_uuid, &owner, &row_service, &row_body, deadline),
            move |outcome| match outcome {
                Ok(()) => {
                    counters.stored.fetch_add(1, Ordering::Relaxed);
                    let _ = dispatcher.send(dispatcher::Event::New(NewRequest {
                        uuid: uuid.clone(),
                        service,
                        body: request,
                        sendable_until,
                    }));
                    responder.send(vec![Bytes::from_static(b"200"), Bytes::from(uuid)]);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not store a titanic request");
                    responder.send(status(&format!("500 could not store the request: {e}")));
                }
            },
        );
    }
}

fn reply_handler(
    reader: majordome_store::rusqlite::Connection,
    callers: bool,
) -> impl FnMut(Frames) -> Frames + Send + 'static {
    move |body: Frames| {
        let (owner, body) = split_caller(body, callers);
        let uuid = match parse_uuid(&body) {
            Ok(uuid) => uuid,
            Err(why) => return status(&format!("400 {why}")),
        };
        // Another's request is unknown to this caller.
        match store::lookup(&reader, &uuid, &owner) {
            Ok(store::Lookup::Done(reply)) => {
                let mut frames = vec![Bytes::from_static(b"200")];
                frames.extend(reply);
                frames
            }
            Ok(store::Lookup::Pending) => status("300"),
            Ok(store::Lookup::Unknown) => status("400"),
            Err(e) => status(&format!("500 could not read the request: {e}")),
        }
    }
}

fn close_handler(
    committer: Arc<Committer>,
    counters: Arc<Counters>,
    dispatcher: mpsc::Sender<dispatcher::Event>,
    callers: bool,
) -> impl FnMut(Frames, Responder) + Send + 'static {
    move |body: Frames, responder: Responder| {
        let (owner, body) = split_caller(body, callers);
        let uuid = match parse_uuid(&body) {
            Ok(uuid) => uuid,
            Err(why) => return responder.send(malformed(&counters, why)),
        };
        let row = uuid.clone();
        let (counters, dispatcher) = (counters.clone(), dispatcher.clone());
        committer.enqueue_then(
            move |c| store::delete(c, &row, &owner),
            move |outcome| match outcome {
                // 200 whether there was such a request or not (RFC 9), and
                // another's stays as it was.
                Ok(deleted) => {
                    if deleted > 0 {
                        let _ = dispatcher.send(dispatcher::Event::Closed(uuid));
                    }
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    responder.send(status("200"));
                }
                Err(e) => responder.send(status(&format!("500 could not close the request: {e}"))),
            },
        );
    }
}

fn list_handler(
    reader: majordome_store::rusqlite::Connection,
    limit: usize,
    callers: bool,
) -> impl FnMut(Frames) -> Frames + Send + 'static {
    move |body: Frames| match store::list(&reader, limit, &split_caller(body, callers).0) {
        Ok(entries) => vec![
            Bytes::from_static(b"200"),
            Bytes::from(serde_json::to_vec(&entries).unwrap_or_default()),
        ],
        Err(e) => status(&format!("500 could not list the requests: {e}")),
    }
}
