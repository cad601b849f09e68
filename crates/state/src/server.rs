//! The Clone state server: one thread owns the map, the database and the
//! three sockets.
//!
//! **Ordering and durability.** KVSETs are read from the collector in
//! bounded batches; each gets the next sequence number, the batch is
//! written in one SQLite transaction (group commit), and only once it has
//! committed are the changes applied in memory and published. So anything a
//! subscriber has seen is durable, and a restarted server continues the
//! sequence where it stopped (deletions and expiries use numbers too, and
//! the highest one is stored).
//!
//! **Snapshots.** A ROUTER drops what it cannot send, which would silently
//! truncate a large snapshot. The snapshot socket is therefore in
//! `ZMQ_ROUTER_MANDATORY` mode and snapshots are streamed: a chunk of
//! KVSYNCs at a time per client, resuming after the last key sent, and when
//! a client's pipe is full (`EAGAIN`) the server waits for `POLLOUT` while
//! it goes on serving updates. A client that vanished (`EHOSTUNREACH`)
//! loses its snapshot. `KTHXBAI` carries the sequence number current when
//! the snapshot started; keys changed meanwhile are sent in their newer
//! state (with their newer sequence), so a client applies every update
//! numbered above KTHXBAI's and may skip one not newer than the key it has.
//!
//! **The updates socket** is an XPUB: to SUB peers it is a PUB (RFC 12),
//! and it lets the server see each new subscription and answer it at once
//! with a HUGZ, so that a client knows its subscription is live (the slow
//! joiner problem) without waiting for the next periodic HUGZ.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use majordome_access::{Policy, Who};
use majordome_net::{self as net, zap, Received, Shutdown};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::chp::{self, ChpError, Limits};
use crate::db::{Db, Entry, Write};
use crate::{split_endpoint, Endpoints, Settings, StateError};

/// How often a noisy drop reason may be logged.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Attempts at finding three free consecutive ports when port 0 is asked.
const PORT_ATTEMPTS: u32 = 32;
/// How long to stop watching `POLLOUT` when it fired for another client
/// than the blocked ones (a ROUTER in mandatory mode reports `POLLOUT` when
/// any peer can take a message): from the first to the last value,
/// doubling while no blocked snapshot moves.
const STALL_BACKOFF: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(64));
/// Messages read from the snapshot socket per turn.
const SNAPSHOT_REQUESTS_PER_TURN: usize = 256;

/// Why the server dropped a message (or a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not valid CHP.
    Malformed(ChpError),
    /// An ICANHAZ? while `max_pending_snapshots` were being served.
    TooManySnapshots,
    /// A KVSET whose batch could not be committed (full disk, I/O error).
    CommitFailed,
    /// A KVSET that would make the state hold more than `max_total_bytes`.
    StateFull,
    /// A KVSET, or an ICANHAZ?, from an identity that may not write that
    /// key, or read that subtree.
    Forbidden,
}

const DROP_REASONS: usize = ChpError::ALL.len() + 4;

impl DropReason {
    /// A short, stable name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed(e) => e.name(),
            DropReason::TooManySnapshots => "too_many_snapshots",
            DropReason::CommitFailed => "commit_failed",
            DropReason::StateFull => "state_full",
            DropReason::Forbidden => "forbidden",
        }
    }

    fn index(self) -> usize {
        match self {
            DropReason::Malformed(e) => e.index(),
            DropReason::TooManySnapshots => ChpError::ALL.len(),
            DropReason::CommitFailed => ChpError::ALL.len() + 1,
            DropReason::StateFull => ChpError::ALL.len() + 2,
            DropReason::Forbidden => ChpError::ALL.len() + 3,
        }
    }

    fn all() -> impl Iterator<Item = DropReason> {
        ChpError::ALL.into_iter().map(DropReason::Malformed).chain([
            DropReason::TooManySnapshots,
            DropReason::CommitFailed,
            DropReason::StateFull,
            DropReason::Forbidden,
        ])
    }
}

/// The server's counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Counters {
    keys: AtomicU64,
    bytes: AtomicU64,
    sequence: AtomicI64,
    updates: AtomicU64,
    expired: AtomicU64,
    commits: AtomicU64,
    snapshots: AtomicU64,
    snapshot_keys: AtomicU64,
    snapshots_abandoned: AtomicU64,
    snapshots_pending: AtomicU64,
    dropped: [AtomicU64; DROP_REASONS],
}

/// A snapshot of the [`Counters`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Keys in the map.
    pub keys: u64,
    /// Their bytes (keys, values, properties), as counted against
    /// `max_total_bytes`.
    #[serde(default)]
    pub bytes: u64,
    /// The last sequence number used.
    pub sequence: i64,
    /// KVPUBs published (sets, deletes, expiries).
    pub updates: u64,
    /// Keys deleted because their ttl ran out.
    pub expired: u64,
    /// SQLite transactions committed.
    pub commits: u64,
    /// Snapshots served to the end (KTHXBAI sent).
    pub snapshots: u64,
    /// KVSYNCs sent.
    pub snapshot_keys: u64,
    /// Snapshots abandoned because the client went away.
    pub snapshots_abandoned: u64,
    /// Snapshots being served now.
    pub snapshots_pending: u64,
    /// Messages dropped, by reason (every reason is listed).
    pub dropped: BTreeMap<String, u64>,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> Stats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            keys: load(&self.keys),
            bytes: load(&self.bytes),
            sequence: self.sequence.load(Ordering::Relaxed),
            updates: load(&self.updates),
            expired: load(&self.expired),
            commits: load(&self.commits),
            snapshots: load(&self.snapshots),
            snapshot_keys: load(&self.snapshot_keys),
            snapshots_abandoned: load(&self.snapshots_abandoned),
            snapshots_pending: load(&self.snapshots_pending),
            dropped: DropReason::all()
                .map(|reason| (reason.name().to_owned(), load(&self.dropped[reason.index()])))
                .collect(),
        }
    }

    /// How many messages were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A bound state server, ready to [`Server::run`].
pub struct Server {
    // Field order matters: the sockets close before their context ends.
    snapshot: zmq::Socket,
    updates: zmq::Socket,
    collector: zmq::Socket,
    _context: zmq::Context,
    endpoints: Endpoints,
    settings: Settings,
    limits: Limits,
    counters: Arc<Counters>,
    db: Db,
    entries: BTreeMap<String, Entry>,
    /// Bytes of `entries`, as [`entry_bytes`] counts them.
    bytes: usize,
    /// The last sequence number used (and published).
    sequence: i64,
    /// (expiry in Unix ms, key): wake-up hints, checked against the entry.
    expiries: BinaryHeap<Reverse<(i64, String)>>,
    drop_log: HashMap<&'static str, (Option<Instant>, u64)>,
    /// Whether its listeners ask for a login: then writes and snapshot
    /// requests of named identities are checked against `policy`.
    logins: bool,
    policy: Arc<Policy>,
}

/// One snapshot being streamed to one client.
struct SnapshotJob {
    identity: Bytes,
    subtree: String,
    /// KTHXBAI's sequence: the server's when the request arrived.
    sequence: i64,
    /// The last key sent; the next chunk starts after it.
    resume: Option<String>,
    /// Every KVSYNC is out; KTHXBAI is still to send.
    keys_done: bool,
    /// The client's pipe was full; wait for POLLOUT.
    blocked: bool,
}

enum Progress {
    /// More to send.
    More,
    /// The client's pipe is full.
    Blocked,
    /// KTHXBAI sent.
    Finished,
    /// The client is gone.
    Vanished,
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Server {
    /// Opens the database at `database` (creating it if needed), loads the
    /// map, and binds the snapshot socket on `base_endpoint` (`tcp://host:P`)
    /// and the updates and collector sockets on P+1 and P+2. Port 0 picks
    /// three free consecutive ports; [`Server::endpoints`] tells which.
    pub fn bind(base_endpoint: &str, database: &Path, settings: Settings) -> Result<Server, StateError> {
        Server::bind_with(base_endpoint, database, settings, None)
    }

    /// [`Server::bind`], with listeners that ask for a PLAIN login checked
    /// by `zap` when it is given.
    pub fn bind_with(
        base_endpoint: &str,
        database: &Path,
        settings: Settings,
        zap: Option<&mut zap::Handler>,
    ) -> Result<Server, StateError> {
        let db = Db::open(database, settings.durability)?;
        let (rows, sequence) = db.load()?;
        let (host, port) = split_endpoint(base_endpoint)?;
        let context = zmq::Context::new();
        let logins = zap.is_some();
        if let Some(handler) = zap {
            handler.attach(&context)?;
        }
        let (snapshot, updates, collector) = if port == 0 {
            bind_free_ports(&context, host, &settings, logins)?
        } else {
            let endpoints = Endpoints::at(host, port);
            let sockets = new_sockets(&context, &settings, logins)?;
            bind_one(&sockets.0, &endpoints.snapshot)?;
            bind_one(&sockets.1, &endpoints.updates)?;
            bind_one(&sockets.2, &endpoints.collector)?;
            sockets
        };
        let endpoints = Endpoints {
            snapshot: net::bound_endpoint(&snapshot)?,
            updates: net::bound_endpoint(&updates)?,
            collector: net::bound_endpoint(&collector)?,
        };
        let mut expiries = BinaryHeap::new();
        let mut entries = BTreeMap::new();
        for (key, entry) in rows {
            if let Some(at) = entry.expires_at {
                expiries.push(Reverse((at, key.clone())));
            }
            entries.insert(key, entry);
        }
        let bytes = entries.iter().map(|(key, entry)| entry_bytes(key, entry)).sum();
        let counters = Arc::new(Counters::default());
        counters.keys.store(entries.len() as u64, Ordering::Relaxed);
        counters.bytes.store(bytes as u64, Ordering::Relaxed);
        counters.sequence.store(sequence, Ordering::Relaxed);
        Ok(Server {
            snapshot,
            updates,
            collector,
            _context: context,
            endpoints,
            limits: settings.limits(),
            settings,
            counters,
            db,
            entries,
            bytes,
            sequence,
            expiries,
            drop_log: HashMap::new(),
            logins,
            policy: Arc::default(),
        })
    }

    /// What named identities may read and write (with logins).
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// Who sent the message last read into `scratch`.
    fn who<'m>(&self, scratch: &'m mut zmq::Message) -> Who<'m> {
        if self.logins {
            Who::of(scratch.gets("Peer-Address").is_none(), scratch.gets("User-Id"))
        } else {
            Who::Local
        }
    }

    /// The three endpoints, with the real ports.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The counters, to read while it runs.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Serves until `shutdown` fires.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), StateError> {
        info!(
            snapshot = %self.endpoints.snapshot,
            updates = %self.endpoints.updates,
            collector = %self.endpoints.collector,
            keys = self.entries.len(),
            sequence = self.sequence,
            "state server serving"
        );
        let mut scratch = zmq::Message::new();
        let mut jobs: VecDeque<SnapshotJob> = VecDeque::new();
        let mut next_hugz = Instant::now();
        // After a POLLOUT that helped none of the blocked clients, when to
        // watch POLLOUT again, and how long the last pause was.
        let mut stalled_until: Option<Instant> = None;
        let mut backoff = STALL_BACKOFF.0;
        loop {
            let now = Instant::now();
            if now >= next_hugz {
                self.publish(&chp::hugz(self.sequence));
                next_hugz = now + self.settings.hugz_interval;
                // POLLOUT says nothing about a client that left (and may
                // never fire again): try each blocked snapshot now and then,
                // so that a vanished client's one is dropped.
                for job in jobs.iter_mut() {
                    job.blocked = false;
                }
            }
            let more_expiries = self.expire_due();

            let runnable = any_runnable(&jobs);
            let blocked = jobs.iter().any(|job| job.blocked);
            let stalled = stalled_until.is_some_and(|until| now < until);
            let mut wake = next_hugz;
            if let Some(Reverse((at, _))) = self.expiries.peek() {
                let wait = Duration::from_millis((at - unix_millis()).max(0) as u64);
                wake = wake.min(now + wait);
            }
            if let Some(until) = stalled_until.filter(|_| stalled) {
                wake = wake.min(until);
            }
            let timeout_ms = if runnable || more_expiries {
                0
            } else {
                wake.saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000) as i64
            };
            let watch_pollout = blocked && !stalled;
            let snapshot_events = zmq::POLLIN
                | if watch_pollout {
                    zmq::POLLOUT
                } else {
                    zmq::PollEvents::empty()
                };
            let mut items = [
                self.snapshot.as_poll_item(snapshot_events),
                self.updates.as_poll_item(zmq::POLLIN),
                self.collector.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
            ];
            match zmq::poll(&mut items, timeout_ms) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            if items[3].is_readable() {
                break;
            }
            let pollout = watch_pollout && items[0].is_writable();
            let (read_requests, read_subscriptions, read_sets) =
                (items[0].is_readable(), items[1].is_readable(), items[2].is_readable());

            if read_sets {
                self.read_collector(&mut scratch)?;
            }
            if read_requests {
                self.read_requests(&mut scratch, &mut jobs)?;
            }
            if read_subscriptions && self.read_subscriptions() {
                // A new subscriber: tell it at once that it is live.
                self.publish(&chp::hugz(self.sequence));
            }
            if pollout {
                for job in jobs.iter_mut() {
                    job.blocked = false;
                }
            }
            let moved = self.serve_snapshots(&mut jobs);
            if pollout {
                if moved {
                    stalled_until = None;
                    backoff = STALL_BACKOFF.0;
                } else {
                    stalled_until = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(STALL_BACKOFF.1);
                }
            }
            self.counters
                .snapshots_pending
                .store(jobs.len() as u64, Ordering::Relaxed);
        }
        info!(
            abandoned_snapshots = jobs.len(),
            sequence = self.sequence,
            "state server stopping"
        );
        Ok(())
    }

    /// Reads a bounded batch of KVSETs and applies the valid ones.
    fn read_collector(&mut self, scratch: &mut zmq::Message) -> Result<(), StateError> {
        let mut batch: Vec<chp::KvMsg> = Vec::new();
        let mut batch_bytes = 0;
        // Bad messages count too, so that a flood of garbage cannot keep
        // the loop here.
        for _ in 0..self.settings.write_batch.max(1) {
            if batch_bytes >= self.settings.write_batch_bytes {
                break;
            }
            let received = net::recv_frames(
                &self.collector,
                scratch,
                self.settings.max_frames,
                self.settings.max_message_bytes(),
            );
            match received {
                Ok(None) | Err(zmq::Error::EINTR) => break,
                Err(e) => return Err(e.into()),
                Ok(Some(Received::TooLarge { head, .. })) => {
                    self.refuse(head.get(2), DropReason::Malformed(ChpError::Oversized))
                }
                Ok(Some(Received::Message(frames))) => match chp::parse_kvset(&frames, &self.limits) {
                    Ok(message) if self.policy.may_write(self.who(scratch), &message.key).is_err() => {
                        self.refuse(Some(&message.uuid), DropReason::Forbidden)
                    }
                    Ok(message) => {
                        batch_bytes += frames.iter().map(Bytes::len).sum::<usize>();
                        batch.push(message);
                    }
                    Err(e) => self.refuse(frames.get(2), DropReason::Malformed(e)),
                },
            }
        }
        // The state is bounded in bytes: a write that would take it over
        // is refused, and its writer told. Deletes always pass.
        let mut projected = self.bytes;
        let mut sizes: HashMap<String, usize> = HashMap::new();
        let mut refused = Vec::new();
        batch.retain(|message| {
            let old = sizes.get(&message.key).copied().unwrap_or_else(|| {
                self.entries
                    .get(&message.key)
                    .map_or(0, |e| entry_bytes(&message.key, e))
            });
            let new = if message.value.is_empty() {
                0
            } else {
                message.key.len() + message.value.len() + chp::encode_properties(&message.properties).len()
            };
            if new > old && projected - old + new > self.settings.max_total_bytes {
                refused.push(message.uuid.clone());
                return false;
            }
            projected = projected - old + new;
            sizes.insert(message.key.clone(), new);
            true
        });
        for uuid in refused {
            self.refuse(Some(&uuid), DropReason::StateFull);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let now = unix_millis();
        let changes = batch
            .into_iter()
            .map(|message| {
                // Validated by parse_kvset.
                let ttl = message.ttl().ok().flatten();
                let expires_at = ttl.map(|d| now.saturating_add((d.as_millis() as i64).max(1)));
                Change {
                    key: message.key,
                    uuid: message.uuid,
                    properties: chp::encode_properties(&message.properties),
                    value: message.value,
                    expires_at,
                }
            })
            .collect();
        self.apply(changes, false);
        Ok(())
    }

    /// Reads a bounded batch of snapshot requests.
    fn read_requests(
        &mut self,
        scratch: &mut zmq::Message,
        jobs: &mut VecDeque<SnapshotJob>,
    ) -> Result<(), StateError> {
        let max_bytes = self.settings.max_key_bytes + 1024;
        for _ in 0..SNAPSHOT_REQUESTS_PER_TURN {
            let frames = match net::recv_frames(&self.snapshot, scratch, self.settings.max_frames + 1, max_bytes) {
                Ok(None) | Err(zmq::Error::EINTR) => break,
                Err(e) => return Err(e.into()),
                Ok(Some(Received::TooLarge { .. })) => {
                    self.drop_message(DropReason::Malformed(ChpError::Oversized));
                    continue;
                }
                Ok(Some(Received::Message(frames))) => frames,
            };
            let Some((identity, request)) = frames.split_first() else {
                continue;
            };
            match chp::parse_icanhaz(request, &self.limits) {
                Err(e) => self.drop_message(DropReason::Malformed(e)),
                // CHP has no refusal: the client hears nothing, as when
                // the server is away.
                Ok(subtree) if self.policy.may_read_prefix(self.who(scratch), &subtree).is_err() => {
                    self.drop_message(DropReason::Forbidden)
                }
                Ok(_) if jobs.len() >= self.settings.max_pending_snapshots => {
                    self.drop_message(DropReason::TooManySnapshots)
                }
                Ok(subtree) => jobs.push_back(SnapshotJob {
                    identity: identity.clone(),
                    subtree,
                    sequence: self.sequence,
                    resume: None,
                    keys_done: false,
                    blocked: false,
                }),
            }
        }
        Ok(())
    }

    /// Drains subscription messages; true if a new subscription came.
    fn read_subscriptions(&mut self) -> bool {
        let mut subscribed = false;
        while let Ok(message) = self.updates.recv_bytes(zmq::DONTWAIT) {
            subscribed |= message.first() == Some(&1);
        }
        subscribed
    }

    /// One turn over the snapshots: a chunk for each client that can take
    /// it (one snapshot per client at a time, in request order). True if
    /// anything was sent.
    fn serve_snapshots(&mut self, jobs: &mut VecDeque<SnapshotJob>) -> bool {
        let mut moved = false;
        let mut busy: HashSet<Bytes> = HashSet::new();
        let mut index = 0;
        while index < jobs.len() {
            let job = &mut jobs[index];
            if !busy.insert(job.identity.clone()) || job.blocked {
                index += 1;
                continue;
            }
            let (progress, sent) = self.serve_chunk(job);
            moved |= sent > 0;
            match progress {
                Progress::More => index += 1,
                Progress::Blocked => {
                    job.blocked = true;
                    index += 1;
                }
                Progress::Finished => {
                    Counters::add(&self.counters.snapshots, 1);
                    jobs.remove(index);
                }
                Progress::Vanished => {
                    Counters::add(&self.counters.snapshots_abandoned, 1);
                    jobs.remove(index);
                }
            }
        }
        moved
    }

    /// Sends the next chunk of `job`; also says how many messages went out.
    fn serve_chunk(&self, job: &mut SnapshotJob) -> (Progress, usize) {
        let mut sent = 0usize;
        let mut outcome = None;
        if !job.keys_done {
            let start = match &job.resume {
                Some(key) => Bound::Excluded(key.as_str()),
                None => Bound::Included(job.subtree.as_str()),
            };
            let mut last: Option<&String> = None;
            let mut finished = true;
            for (key, entry) in self.entries.range::<str, _>((start, Bound::Unbounded)) {
                if !key.starts_with(job.subtree.as_str()) {
                    break;
                }
                if sent == self.settings.snapshot_chunk.max(1) {
                    finished = false;
                    outcome = Some(Progress::More);
                    break;
                }
                let sequence = entry.sequence.to_be_bytes();
                let frames: [&[u8]; 6] = [
                    &job.identity,
                    key.as_bytes(),
                    &sequence,
                    &entry.uuid,
                    &entry.properties,
                    &entry.value,
                ];
                match send_parts(&self.snapshot, &frames) {
                    Ok(()) => {
                        sent += 1;
                        last = Some(key);
                    }
                    Err(e) => {
                        finished = false;
                        outcome = Some(send_failure(e));
                        break;
                    }
                }
            }
            if let Some(key) = last {
                job.resume = Some(key.clone());
            }
            Counters::add(&self.counters.snapshot_keys, sent as u64);
            job.keys_done = finished;
        }
        if let Some(outcome) = outcome {
            return (outcome, sent);
        }
        let mut end = vec![job.identity.clone()];
        end.extend(chp::kthxbai(job.sequence, &job.subtree));
        match net::send_frames(&self.snapshot, &end, zmq::DONTWAIT) {
            Ok(()) => (Progress::Finished, sent + 1),
            Err(e) => (send_failure(e), sent),
        }
    }

    /// Deletes the keys whose ttl ran out (a bounded batch). True if more
    /// are due.
    fn expire_due(&mut self) -> bool {
        let now = unix_millis();
        let mut due = Vec::new();
        let mut seen = HashSet::new();
        while due.len() < self.settings.write_batch.max(1) {
            match self.expiries.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => break,
            }
            let Reverse((_, key)) = self.expiries.pop().expect("peeked");
            // The heap holds hints; the entry says whether it is due.
            let Some(entry) = self.entries.get(&key) else { continue };
            if entry.expires_at.is_some_and(|at| at <= now) && seen.insert(key.clone()) {
                due.push(Change {
                    properties: entry.properties.clone(),
                    key,
                    uuid: Bytes::new(),
                    value: Bytes::new(),
                    expires_at: None,
                });
            }
        }
        let more = self.expiries.peek().is_some_and(|Reverse((at, _))| *at <= now);
        if !due.is_empty() {
            self.apply(due, true);
        }
        more
    }

    /// Numbers, commits, then applies and publishes `changes`. On a failed
    /// commit nothing changes (and the sequence numbers are not used).
    fn apply(&mut self, changes: Vec<Change>, expiry: bool) {
        let first = self.sequence + 1;
        let last = self.sequence + changes.len() as i64;
        let stored: Vec<Option<Entry>> = changes
            .iter()
            .zip(first..)
            .map(|(change, sequence)| {
                (!change.value.is_empty()).then(|| Entry {
                    value: change.value.clone(),
                    sequence,
                    uuid: change.uuid.clone(),
                    properties: change.properties.clone(),
                    expires_at: change.expires_at,
                })
            })
            .collect();
        let writes: Vec<Write<'_>> = changes
            .iter()
            .zip(&stored)
            .map(|(change, entry)| match entry {
                Some(entry) => Write::Put(&change.key, entry),
                None => Write::Delete(&change.key),
            })
            .collect();
        if let Err(e) = self.db.commit(&writes, last) {
            error!(error = %e, changes = changes.len(), "could not commit state changes; they are dropped");
            if expiry {
                // Try again later rather than spin on a broken disk.
                let retry = unix_millis() + 1000;
                for change in changes {
                    self.expiries.push(Reverse((retry, change.key)));
                }
            } else {
                for change in &changes {
                    self.refuse(Some(&change.uuid), DropReason::CommitFailed);
                }
            }
            return;
        }
        drop(writes);
        Counters::add(&self.counters.commits, 1);
        let mut published = Vec::with_capacity(changes.len());
        for ((change, entry), sequence) in changes.into_iter().zip(stored).zip(first..) {
            let frames = [
                Bytes::copy_from_slice(change.key.as_bytes()),
                chp::encode_sequence(sequence),
                change.uuid,
                change.properties,
                change.value,
            ];
            match entry {
                Some(entry) => {
                    if let Some(at) = entry.expires_at {
                        self.expiries.push(Reverse((at, change.key.clone())));
                    }
                    self.bytes += entry_bytes(&change.key, &entry);
                    if let Some(old) = self.entries.insert(change.key.clone(), entry) {
                        self.bytes -= entry_bytes(&change.key, &old);
                    }
                }
                None => {
                    if let Some(old) = self.entries.remove(&change.key) {
                        self.bytes -= entry_bytes(&change.key, &old);
                    }
                }
            }
            self.sequence = sequence;
            published.push(frames);
        }
        // Counters first, then the updates: whoever sees an update and then
        // reads the counters finds it counted.
        let changed = last - first + 1;
        if expiry {
            Counters::add(&self.counters.expired, changed as u64);
        }
        Counters::add(&self.counters.updates, changed as u64);
        self.counters.sequence.store(self.sequence, Ordering::Relaxed);
        self.counters.keys.store(self.entries.len() as u64, Ordering::Relaxed);
        self.counters.bytes.store(self.bytes as u64, Ordering::Relaxed);
        for frames in &published {
            self.publish(frames);
        }
        // The heap holds stale hints for keys set again; rebuild it once it
        // is twice the size it needs, so it stays bounded by the map.
        if self.expiries.len() > 2 * self.entries.len() + 1024 {
            self.expiries = self
                .entries
                .iter()
                .filter_map(|(key, entry)| entry.expires_at.map(|at| Reverse((at, key.clone()))))
                .collect();
        }
    }

    fn publish(&self, frames: &[Bytes]) {
        // A PUB never blocks: a subscriber past its high-water mark loses
        // the message (and its mirror sees a gap).
        if let Err(e) = net::send_frames(&self.updates, frames, zmq::DONTWAIT) {
            warn!(error = %e, "could not publish an update");
        }
    }

    /// Counts a dropped message and logs it, at most once per reason every
    /// few seconds so that a flood of garbage cannot flood the log.
    /// Drops a KVSET, counting it, and tells its writer why when it gave a
    /// uuid (majordome's writers always do; see [`chp::refusal`]).
    fn refuse(&mut self, uuid: Option<&Bytes>, reason: DropReason) {
        self.drop_message(reason);
        let Some(uuid) = uuid.filter(|uuid| uuid.len() == 16) else {
            return;
        };
        let why = match reason {
            DropReason::Malformed(ChpError::Oversized) => format!(
                "the value is over max_value_bytes ({}) or the properties over max_properties_bytes ({})",
                self.settings.max_value_bytes, self.settings.max_properties_bytes
            ),
            DropReason::Malformed(ChpError::KeyTooLong) => {
                format!("the key is over max_key_bytes ({})", self.settings.max_key_bytes)
            }
            DropReason::StateFull => format!(
                "the state holds {} bytes and would go over max_total_bytes ({}); delete keys first",
                self.bytes, self.settings.max_total_bytes
            ),
            DropReason::CommitFailed => "the database could not commit it (is the disk full?)".to_owned(),
            other => format!("refused: {}", other.name()),
        };
        self.publish(&chp::refusal(self.sequence, uuid.clone(), &why));
    }

    fn drop_message(&mut self, reason: DropReason) {
        Counters::add(&self.counters.dropped[reason.index()], 1);
        let now = Instant::now();
        let name = reason.name();
        let (last, suppressed) = self.drop_log.entry(name).or_insert((None, 0));
        if last.is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY) {
            warn!(
                reason = name,
                suppressed_since_last_log = *suppressed,
                "dropped a message"
            );
            *last = Some(now);
            *suppressed = 0;
        } else {
            *suppressed += 1;
        }
    }
}

/// What an entry counts against `max_total_bytes`.
fn entry_bytes(key: &str, entry: &Entry) -> usize {
    key.len() + entry.value.len() + entry.properties.len()
}

/// A change to number, store and publish. An empty value deletes.
struct Change {
    key: String,
    uuid: Bytes,
    properties: Bytes,
    value: Bytes,
    expires_at: Option<i64>,
}

/// True if a snapshot can be sent more of now: the first one of its
/// client (they go one at a time per client) and not blocked.
fn any_runnable(jobs: &VecDeque<SnapshotJob>) -> bool {
    let mut seen = HashSet::new();
    jobs.iter().any(|job| seen.insert(&job.identity) && !job.blocked)
}

fn send_failure(error: zmq::Error) -> Progress {
    match error {
        zmq::Error::EAGAIN => Progress::Blocked,
        zmq::Error::EHOSTUNREACH => Progress::Vanished,
        e => {
            warn!(error = %e, "could not send a snapshot; abandoning it");
            Progress::Vanished
        }
    }
}

/// Sends one message without blocking. On a ROUTER in mandatory mode, a
/// full or unknown peer fails on the identity frame and nothing is sent.
fn send_parts(socket: &zmq::Socket, frames: &[&[u8]]) -> zmq::Result<()> {
    let last = frames.len() - 1;
    for (index, frame) in frames.iter().enumerate() {
        let more = if index < last { zmq::SNDMORE } else { 0 };
        socket.send(*frame, zmq::DONTWAIT | more)?;
    }
    Ok(())
}

type Sockets = (zmq::Socket, zmq::Socket, zmq::Socket);

fn new_sockets(context: &zmq::Context, settings: &Settings, logins: bool) -> Result<Sockets, StateError> {
    let snapshot = context.socket(zmq::ROUTER)?;
    snapshot.set_linger(0)?;
    snapshot.set_router_mandatory(true)?;
    snapshot.set_sndhwm(settings.snapshot_high_water_mark)?;
    snapshot.set_rcvhwm(settings.snapshot_high_water_mark)?;
    // libzmq closes a connection that sends a frame over this size.
    snapshot.set_maxmsgsize(settings.max_message_bytes() as i64)?;
    let updates = context.socket(zmq::XPUB)?;
    updates.set_linger(0)?;
    updates.set_sndhwm(settings.publish_high_water_mark)?;
    updates.set_xpub_verbose(true)?;
    let collector = context.socket(zmq::SUB)?;
    collector.set_linger(0)?;
    collector.set_rcvhwm(settings.collector_high_water_mark)?;
    // Up to four times the largest valid write still reaches the server,
    // which refuses it and tells the writer why; libzmq closes the
    // connection of a larger one (and its writer hears nothing).
    collector.set_maxmsgsize(4 * settings.max_message_bytes() as i64)?;
    collector.set_subscribe(b"")?;
    zap::listener(&snapshot, logins)?;
    zap::listener(&collector, logins)?;
    // Updates go to every subscriber alike (libzmq cannot filter them per
    // subscriber safely): only those who may read every key may join.
    zap::listener_in(&updates, logins, zap::UPDATES_DOMAIN)?;
    Ok((snapshot, updates, collector))
}

fn bind_one(socket: &zmq::Socket, endpoint: &str) -> Result<(), StateError> {
    Ok(net::bind(socket, endpoint, net::bind::PATIENCE)?)
}

/// Port 0: bind the snapshot socket on a free port P, then try P+1 and P+2;
/// on failure start again with fresh sockets.
fn bind_free_ports(
    context: &zmq::Context,
    host: &str,
    settings: &Settings,
    logins: bool,
) -> Result<Sockets, StateError> {
    for _ in 0..PORT_ATTEMPTS {
        let sockets = new_sockets(context, settings, logins)?;
        bind_one(&sockets.0, &format!("tcp://{host}:0"))?;
        let bound = net::bound_endpoint(&sockets.0)?;
        let Ok((_, port)) = split_endpoint(&bound) else {
            continue;
        };
        let endpoints = Endpoints::at(host, port);
        if sockets.1.bind(&endpoints.updates).is_ok() && sockets.2.bind(&endpoints.collector).is_ok() {
            return Ok(sockets);
        }
    }
    Err(StateError::NoFreePorts {
        attempts: PORT_ATTEMPTS,
    })
}
