//! The client side of CHP: [`Mirror`] (a live local copy of a subtree),
//! [`Writer`] (acknowledged writes) and [`snapshot`] (one fetch).
//!
//! Everything here is poll-driven: no background thread. A mirror changes
//! only inside [`Mirror::poll`] (or [`Mirror::next`]), which the owner
//! calls in its own loop.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_net::{self as net, Received};
use tracing::{debug, info, warn};

use crate::chp::{self, ChpError, KvMsg, Limits, SnapshotReply, Update};
use crate::{Endpoints, StateError};

/// Frames a client accepts in one message from the server; the server's
/// own bounds keep messages small, this only guards against garbage.
const MAX_FRAMES: usize = 16;
/// Updates handled per step before the mirror hands changes back.
const LIVE_BATCH: usize = 10_000;

/// Anything that names a state server: a base endpoint (`tcp://host:P`) or
/// its [`Endpoints`].
pub trait ToEndpoints {
    fn to_endpoints(&self) -> Result<Endpoints, StateError>;
}

impl ToEndpoints for str {
    fn to_endpoints(&self) -> Result<Endpoints, StateError> {
        Endpoints::from_base(self)
    }
}

impl ToEndpoints for String {
    fn to_endpoints(&self) -> Result<Endpoints, StateError> {
        Endpoints::from_base(self)
    }
}

impl ToEndpoints for Endpoints {
    fn to_endpoints(&self) -> Result<Endpoints, StateError> {
        Ok(self.clone())
    }
}

impl<T: ToEndpoints + ?Sized> ToEndpoints for &T {
    fn to_endpoints(&self) -> Result<Endpoints, StateError> {
        (**self).to_endpoints()
    }
}

/// A mirror's settings.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// With no HUGZ or update for this long, the server is taken as lost:
    /// [`Change::Lost`], then snapshots are retried until it is back.
    pub silence: Duration,
    /// How long [`Mirror::connect`] waits for the first snapshot.
    pub connect_timeout: Duration,
    /// High-water mark of the updates socket: updates queued in this
    /// process, unread, past which they are lost (and the mirror resyncs).
    pub receive_high_water_mark: i32,
    /// The kernel receive buffer of the updates socket (`SO_RCVBUF`), in
    /// bytes; `None` keeps the system's.
    pub receive_buffer: Option<i32>,
    /// Updates kept while a snapshot arrives; past it the snapshot starts
    /// again.
    pub max_buffered_updates: usize,
    /// How long a write waits for the collector to be connected.
    pub write_timeout: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            silence: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            receive_high_water_mark: 100_000,
            receive_buffer: None,
            max_buffered_updates: 1_000_000,
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// A key's state in a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorEntry {
    pub value: Bytes,
    /// The sequence number of its last change.
    pub sequence: i64,
    pub properties: Vec<(String, String)>,
}

/// What changed in a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key under the subtree was set.
    Set {
        key: String,
        value: Bytes,
        sequence: i64,
        properties: Vec<(String, String)>,
    },
    /// A key under the subtree was deleted (or expired).
    Deleted { key: String, sequence: i64 },
    /// A new snapshot replaced the mirror's content (after a gap or a lost
    /// server). The `Set`/`Deleted` changes that follow it are the
    /// differences from what the mirror held before.
    Resynced { sequence: i64, keys: usize },
    /// The server fell silent; the mirror keeps its last content and keeps
    /// asking for a snapshot until the server is back ([`Change::Resynced`]).
    Lost { reason: String },
}

/// A local copy of a subtree of the server's map, kept up to date.
///
/// It subscribes to the updates socket **before** asking for a snapshot,
/// keeps the updates that arrive meanwhile, and once `KTHXBAI` comes
/// applies those numbered above it, skipping any not newer than the key the
/// snapshot gave (the server may send a key changed during the snapshot in
/// its newer state).
///
/// The updates socket is subscribed to **everything**, not only to the
/// subtree: sequence numbers are global to the server, so only a
/// subscriber that receives every update can tell a lost update (a gap,
/// `seq > last + 1`) from an update of another subtree. Updates outside the
/// subtree advance the sequence and are then ignored. A gap, a HUGZ ahead
/// of the last update seen, or a HUGZ behind it (a different server) makes
/// the mirror resync: fresh sockets, a new snapshot.
pub struct Mirror {
    endpoints: Endpoints,
    options: MirrorOptions,
    view: View,
    state: State,
    scratch: zmq::Message,
    collector: Option<Collector>,
}

struct View {
    subtree: String,
    entries: BTreeMap<String, MirrorEntry>,
    sequence: i64,
    pending: VecDeque<Change>,
    /// Synced at least once (connect finished).
    started: bool,
    synced: bool,
    /// Lost was reported and no resync has completed since.
    lost: bool,
    resyncs: u64,
    malformed: u64,
}

enum State {
    /// Between two sets of sockets (only if opening new ones failed).
    Idle,
    Live(Live),
    Syncing(Sync),
}

struct Live {
    updates: zmq::Socket,
    heard: Instant,
}

struct Sync {
    updates: zmq::Socket,
    snapshot: zmq::Socket,
    /// Something arrived on the updates socket: the subscription is live,
    /// so nothing published after the snapshot starts can be missed.
    live: bool,
    asked: bool,
    buffered: Vec<Update>,
    received: BTreeMap<String, MirrorEntry>,
    progress: Instant,
}

enum Step {
    Stay,
    /// Start a new snapshot; with a reason when the server is lost.
    Resync {
        lost: Option<String>,
    },
    /// KTHXBAI arrived and the buffered updates applied.
    Synced {
        entries: BTreeMap<String, MirrorEntry>,
        sequence: i64,
    },
}

enum Applied {
    Nothing,
    Changed(Change),
    Gap { expected: i64, got: i64 },
    Backwards { last: i64, hugz: i64 },
}

impl Mirror {
    /// Connects to the server and waits (up to `options.connect_timeout`)
    /// for the first snapshot of `subtree` (empty: everything; else a
    /// prefix starting with `/`).
    pub fn connect(target: impl ToEndpoints, subtree: &str, options: MirrorOptions) -> Result<Mirror, StateError> {
        let endpoints = target.to_endpoints()?;
        let subtree =
            chp::check_subtree(subtree.as_bytes(), &unbounded()).map_err(|reason| StateError::InvalidKey {
                key: subtree.to_owned(),
                reason,
            })?;
        let state = State::Syncing(Sync::start(&endpoints, &options)?);
        let mut mirror = Mirror {
            endpoints,
            options,
            view: View {
                subtree,
                entries: BTreeMap::new(),
                sequence: 0,
                pending: VecDeque::new(),
                started: false,
                synced: false,
                lost: false,
                resyncs: 0,
                malformed: 0,
            },
            state,
            scratch: zmq::Message::new(),
            collector: None,
        };
        let deadline = Instant::now() + mirror.options.connect_timeout;
        loop {
            mirror.step()?;
            if mirror.view.synced {
                mirror.view.pending.clear();
                return Ok(mirror);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(mirror.connect_failure());
            }
            mirror.wait(deadline.min(mirror.next_deadline()).saturating_duration_since(now))?;
        }
    }

    /// Handles what arrived, waiting up to `timeout` for something to
    /// happen; returns the changes (empty after a quiet `timeout`).
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Change>, StateError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.step()?;
            if !self.view.pending.is_empty() {
                return Ok(self.view.pending.drain(..).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            self.wait(deadline.min(self.next_deadline()).saturating_duration_since(now))?;
        }
    }

    /// The next change, waiting up to `timeout` for one.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Change>, StateError> {
        if self.view.pending.is_empty() {
            let changes = self.poll(timeout)?;
            self.view.pending.extend(changes);
        }
        Ok(self.view.pending.pop_front())
    }

    /// A key's state, if it is under the subtree and set.
    pub fn get(&self, key: &str) -> Option<&MirrorEntry> {
        self.view.entries.get(key)
    }

    /// Every key under the subtree, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &MirrorEntry)> {
        self.view.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.view.entries.len()
    }

    /// True when it holds no key.
    pub fn is_empty(&self) -> bool {
        self.view.entries.is_empty()
    }

    /// The last sequence number applied (any subtree).
    pub fn sequence(&self) -> i64 {
        self.view.sequence
    }

    /// True while it follows the server's updates; false while it fetches
    /// a new snapshot (its content is then the last one it had).
    pub fn is_synced(&self) -> bool {
        self.view.synced
    }

    /// Snapshots taken again after the first (gaps, lost server).
    pub fn resyncs(&self) -> u64 {
        self.view.resyncs
    }

    /// Messages from the server that were not CHP, skipped.
    pub fn malformed(&self) -> u64 {
        self.view.malformed
    }

    /// The subtree it mirrors.
    pub fn subtree(&self) -> &str {
        &self.view.subtree
    }

    /// The server's endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Sends a KVSET for `key` (with a fresh uuid, and a `ttl` property
    /// when given); an empty value deletes. The change shows in the mirror
    /// once the server publishes it. Returns the uuid. Fire and forget: use
    /// a [`Writer`] to know that it was committed.
    pub fn set(&mut self, key: &str, value: impl Into<Bytes>, ttl: Option<Duration>) -> Result<Bytes, StateError> {
        let message = kvset(key, value.into(), ttl)?;
        if self.collector.is_none() {
            self.collector = Some(Collector::connect(&self.endpoints.collector, 100_000)?);
        }
        let collector = self.collector.as_mut().expect("set above");
        collector.wait_ready(self.options.write_timeout)?;
        collector.send(&message)?;
        Ok(message.uuid)
    }

    /// Sends a KVSET deleting `key`.
    pub fn delete(&mut self, key: &str) -> Result<Bytes, StateError> {
        self.set(key, Bytes::new(), None)
    }

    fn step(&mut self) -> Result<(), StateError> {
        let now = Instant::now();
        let step = match &mut self.state {
            State::Idle => Step::Resync { lost: None },
            State::Live(live) => live.step(&mut self.view, &self.options, &mut self.scratch, now)?,
            State::Syncing(sync) => sync.step(&mut self.view, &self.options, &mut self.scratch, now)?,
        };
        match step {
            Step::Stay => {}
            Step::Resync { lost } => {
                if let Some(reason) = lost {
                    if self.view.started && !self.view.lost {
                        warn!(endpoint = %self.endpoints.snapshot, %reason, "state server lost");
                        self.view.pending.push_back(Change::Lost { reason });
                    }
                    self.view.lost = true;
                }
                self.view.synced = false;
                self.state = State::Idle;
                self.state = State::Syncing(Sync::start(&self.endpoints, &self.options)?);
            }
            Step::Synced { entries, sequence } => {
                if let State::Syncing(sync) = std::mem::replace(&mut self.state, State::Idle) {
                    self.state = State::Live(Live {
                        updates: sync.updates,
                        heard: now,
                    });
                }
                self.view.resync_to(entries, sequence);
            }
        }
        Ok(())
    }

    /// When the current state's silence runs out.
    fn next_deadline(&self) -> Instant {
        match &self.state {
            State::Idle => Instant::now(),
            State::Live(live) => live.heard + self.options.silence,
            State::Syncing(sync) => sync.progress + self.options.silence,
        }
    }

    fn wait(&self, timeout: Duration) -> Result<(), StateError> {
        let timeout_ms = timeout.as_micros().div_ceil(1000) as i64;
        let result = match &self.state {
            State::Idle => Ok(()),
            State::Live(live) => live.updates.poll(zmq::POLLIN, timeout_ms).map(|_| ()),
            State::Syncing(sync) => {
                let snapshot_events = zmq::POLLIN
                    | if sync.live && !sync.asked {
                        zmq::POLLOUT
                    } else {
                        zmq::PollEvents::empty()
                    };
                let mut items = [
                    sync.updates.as_poll_item(zmq::POLLIN),
                    sync.snapshot.as_poll_item(snapshot_events),
                ];
                zmq::poll(&mut items, timeout_ms).map(|_| ())
            }
        };
        match result {
            Ok(()) | Err(zmq::Error::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn connect_failure(&self) -> StateError {
        let after = self.options.connect_timeout;
        let State::Syncing(sync) = &self.state else {
            return StateError::Timeout {
                endpoint: self.endpoints.snapshot.clone(),
                what: "answer",
                after,
            };
        };
        // With IMMEDIATE, the snapshot socket is writable only once its
        // connection is up.
        if sync.snapshot.poll(zmq::POLLOUT, 0).unwrap_or(0) == 0 && !sync.asked {
            return StateError::NothingListening {
                endpoint: self.endpoints.snapshot.clone(),
                after,
            };
        }
        let what = if sync.live {
            "finish the snapshot"
        } else {
            "send anything on its updates socket"
        };
        StateError::Timeout {
            endpoint: self.endpoints.snapshot.clone(),
            what,
            after,
        }
    }
}

impl View {
    /// Applies one update in sequence order (see [`Mirror`]). `live` is
    /// false while replaying updates kept during a snapshot, where a HUGZ
    /// older than the snapshot is normal.
    fn apply(
        entries: &mut BTreeMap<String, MirrorEntry>,
        sequence: &mut i64,
        subtree: &str,
        update: Update,
        live: bool,
    ) -> Applied {
        match update {
            // RFC 12 shows HUGZ with a zero sequence: that says nothing.
            // A refusal is for the writer that sent the write.
            Update::Hugz { sequence: 0 } | Update::Refused { .. } => Applied::Nothing,
            Update::Hugz { sequence: hugz } => {
                if hugz > *sequence {
                    Applied::Gap {
                        expected: *sequence,
                        got: hugz,
                    }
                } else if live && hugz < *sequence {
                    Applied::Backwards { last: *sequence, hugz }
                } else {
                    Applied::Nothing
                }
            }
            Update::Publish(message) => {
                if message.sequence <= *sequence {
                    return Applied::Nothing;
                }
                if message.sequence > *sequence + 1 {
                    return Applied::Gap {
                        expected: *sequence + 1,
                        got: message.sequence,
                    };
                }
                *sequence = message.sequence;
                if !message.key.starts_with(subtree) {
                    return Applied::Nothing;
                }
                if entries
                    .get(&message.key)
                    .is_some_and(|e| e.sequence >= message.sequence)
                {
                    return Applied::Nothing;
                }
                if message.value.is_empty() {
                    match entries.remove(&message.key) {
                        Some(_) => Applied::Changed(Change::Deleted {
                            key: message.key,
                            sequence: message.sequence,
                        }),
                        None => Applied::Nothing,
                    }
                } else {
                    let entry = MirrorEntry {
                        value: message.value.clone(),
                        sequence: message.sequence,
                        properties: message.properties.clone(),
                    };
                    entries.insert(message.key.clone(), entry);
                    Applied::Changed(Change::Set {
                        key: message.key,
                        value: message.value,
                        sequence: message.sequence,
                        properties: message.properties,
                    })
                }
            }
        }
    }

    /// Takes a new snapshot's content; after the first, reports
    /// [`Change::Resynced`] and the differences.
    fn resync_to(&mut self, entries: BTreeMap<String, MirrorEntry>, sequence: i64) {
        if self.started {
            self.resyncs += 1;
            info!(sequence, keys = entries.len(), "state mirror resynced");
            self.pending.push_back(Change::Resynced {
                sequence,
                keys: entries.len(),
            });
            for key in self.entries.keys() {
                if !entries.contains_key(key) {
                    self.pending.push_back(Change::Deleted {
                        key: key.clone(),
                        sequence,
                    });
                }
            }
            for (key, entry) in &entries {
                if self.entries.get(key) != Some(entry) {
                    self.pending.push_back(Change::Set {
                        key: key.clone(),
                        value: entry.value.clone(),
                        sequence: entry.sequence,
                        properties: entry.properties.clone(),
                    });
                }
            }
        }
        self.entries = entries;
        self.sequence = sequence;
        self.started = true;
        self.synced = true;
        self.lost = false;
    }
}

impl Live {
    fn step(
        &mut self,
        view: &mut View,
        options: &MirrorOptions,
        scratch: &mut zmq::Message,
        now: Instant,
    ) -> Result<Step, StateError> {
        let mut heard = false;
        for _ in 0..LIVE_BATCH {
            let frames = match net::recv_frames(&self.updates, scratch, MAX_FRAMES, usize::MAX) {
                Ok(None) | Err(zmq::Error::EINTR) => break,
                Err(e) => return Err(e.into()),
                Ok(Some(Received::TooLarge { .. })) => {
                    view.malformed += 1;
                    continue;
                }
                Ok(Some(Received::Message(frames))) => frames,
            };
            heard = true;
            let update = match chp::parse_update(&frames) {
                Ok(update) => update,
                Err(e) => {
                    view.malformed += 1;
                    debug!(error = %e, "skipped a malformed update");
                    continue;
                }
            };
            match View::apply(&mut view.entries, &mut view.sequence, &view.subtree, update, true) {
                Applied::Nothing => {}
                Applied::Changed(change) => view.pending.push_back(change),
                Applied::Gap { expected, got } => {
                    info!(expected, got, "state mirror missed updates; resyncing");
                    return Ok(Step::Resync { lost: None });
                }
                Applied::Backwards { last, hugz } => {
                    info!(
                        last,
                        hugz, "state server went back in sequence (a new server?); resyncing"
                    );
                    return Ok(Step::Resync { lost: None });
                }
            }
        }
        if heard {
            self.heard = now;
        } else if now.saturating_duration_since(self.heard) >= options.silence {
            return Ok(Step::Resync {
                lost: Some(format!("no HUGZ or update for {:?}", options.silence)),
            });
        }
        Ok(Step::Stay)
    }
}

impl Sync {
    /// Fresh sockets: subscribe first, ask for the snapshot once the
    /// subscription is known to be live.
    fn start(endpoints: &Endpoints, options: &MirrorOptions) -> Result<Sync, StateError> {
        let updates = net::context().socket(zmq::SUB)?;
        updates.set_linger(0)?;
        updates.set_rcvhwm(options.receive_high_water_mark)?;
        if let Some(bytes) = options.receive_buffer {
            updates.set_rcvbuf(bytes)?;
        }
        updates.set_subscribe(b"")?;
        connect(&updates, &endpoints.updates)?;
        let snapshot = net::context().socket(zmq::DEALER)?;
        snapshot.set_linger(0)?;
        // Writable only once connected: tells "nothing listening" apart.
        snapshot.set_immediate(true)?;
        snapshot.set_rcvhwm(10_000)?;
        connect(&snapshot, &endpoints.snapshot)?;
        Ok(Sync {
            updates,
            snapshot,
            live: false,
            asked: false,
            buffered: Vec::new(),
            received: BTreeMap::new(),
            progress: Instant::now(),
        })
    }

    fn step(
        &mut self,
        view: &mut View,
        options: &MirrorOptions,
        scratch: &mut zmq::Message,
        now: Instant,
    ) -> Result<Step, StateError> {
        loop {
            match net::recv_frames(&self.updates, scratch, MAX_FRAMES, usize::MAX) {
                Ok(None) | Err(zmq::Error::EINTR) => break,
                Err(e) => return Err(e.into()),
                Ok(Some(Received::TooLarge { .. })) => view.malformed += 1,
                Ok(Some(Received::Message(frames))) => {
                    self.live = true;
                    self.progress = now;
                    match chp::parse_update(&frames) {
                        Ok(update) => self.buffered.push(update),
                        Err(_) => view.malformed += 1,
                    }
                    if self.buffered.len() > options.max_buffered_updates {
                        warn!("too many updates while a snapshot arrives; starting it again");
                        return Ok(Step::Resync { lost: None });
                    }
                }
            }
        }
        if self.live && !self.asked {
            match net::send_frames(&self.snapshot, &chp::icanhaz(&view.subtree), zmq::DONTWAIT) {
                Ok(()) => {
                    self.asked = true;
                    self.progress = now;
                }
                Err(zmq::Error::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.asked {
            loop {
                let frames = match net::recv_frames(&self.snapshot, scratch, MAX_FRAMES, usize::MAX) {
                    Ok(None) | Err(zmq::Error::EINTR) => break,
                    Err(e) => return Err(e.into()),
                    Ok(Some(Received::TooLarge { .. })) => {
                        view.malformed += 1;
                        continue;
                    }
                    Ok(Some(Received::Message(frames))) => frames,
                };
                self.progress = now;
                match chp::parse_snapshot_reply(&frames) {
                    Err(_) => view.malformed += 1,
                    Ok(SnapshotReply::Entry(message)) => {
                        if message.key.starts_with(view.subtree.as_str()) && !message.value.is_empty() {
                            self.received.insert(
                                message.key,
                                MirrorEntry {
                                    value: message.value,
                                    sequence: message.sequence,
                                    properties: message.properties,
                                },
                            );
                        }
                    }
                    Ok(SnapshotReply::End { sequence, .. }) => return Ok(self.finish(view, sequence)),
                }
            }
        }
        if now.saturating_duration_since(self.progress) >= options.silence {
            let reason = if self.live {
                format!("no snapshot from the state server for {:?}", options.silence)
            } else {
                format!("no HUGZ or update for {:?}", options.silence)
            };
            return Ok(Step::Resync { lost: Some(reason) });
        }
        Ok(Step::Stay)
    }

    /// KTHXBAI: the snapshot, plus the updates kept meanwhile that are newer.
    fn finish(&mut self, view: &View, sequence: i64) -> Step {
        let mut entries = std::mem::take(&mut self.received);
        let mut last = sequence;
        for update in self.buffered.drain(..) {
            match View::apply(&mut entries, &mut last, &view.subtree, update, false) {
                Applied::Nothing | Applied::Changed(_) => {}
                Applied::Gap { expected, got } => {
                    info!(expected, got, "updates lost during the snapshot; starting it again");
                    return Step::Resync { lost: None };
                }
                Applied::Backwards { .. } => unreachable!("not checked while replaying"),
            }
        }
        Step::Synced {
            entries,
            sequence: last,
        }
    }
}

fn connect(socket: &zmq::Socket, endpoint: &str) -> Result<(), StateError> {
    let failed = |e: zmq::Error| StateError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    };
    net::zap::login(socket, endpoint).map_err(failed)?;
    socket.connect(endpoint).map_err(|e| StateError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    })
}

/// Client-side checks only reject what no server accepts; sizes are the
/// server's business.
fn unbounded() -> Limits {
    Limits {
        max_key_bytes: usize::MAX,
        max_value_bytes: usize::MAX,
        max_properties_bytes: usize::MAX,
    }
}

/// A KVSET with a fresh uuid.
fn kvset(key: &str, value: Bytes, ttl: Option<Duration>) -> Result<KvMsg, StateError> {
    chp::check_key(key, &unbounded()).map_err(|reason| StateError::InvalidKey {
        key: key.to_owned(),
        reason,
    })?;
    let mut message = KvMsg::new(key, value);
    message.uuid = Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    if let Some(ttl) = ttl {
        message
            .set_property(chp::TTL, &chp::format_ttl(ttl))
            .expect("a formatted ttl is a valid property");
    }
    Ok(message)
}

/// The client's end of the collector: an XPUB, which a SUB accepts as a
/// PUB, so that it can see the server's subscription arrive. A PUB drops
/// what it sends before that (the slow joiner).
struct Collector {
    socket: zmq::Socket,
    endpoint: String,
    ready: bool,
}

impl Collector {
    fn connect(endpoint: &str, send_high_water_mark: i32) -> Result<Collector, StateError> {
        let socket = net::context().socket(zmq::XPUB)?;
        socket.set_linger(1000)?;
        socket.set_sndhwm(send_high_water_mark)?;
        connect(&socket, endpoint)?;
        Ok(Collector {
            socket,
            endpoint: endpoint.to_owned(),
            ready: false,
        })
    }

    /// Reads subscription messages; true once the server has subscribed.
    fn absorb(&mut self) -> bool {
        while let Ok(message) = self.socket.recv_bytes(zmq::DONTWAIT) {
            match message.first() {
                Some(1) => self.ready = true,
                Some(0) => self.ready = false,
                _ => {}
            }
        }
        self.ready
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StateError> {
        let deadline = Instant::now() + timeout;
        while !self.absorb() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.socket.poll(zmq::POLLIN, left.as_millis().max(1) as i64)? == 0 {
                return Err(StateError::NothingListening {
                    endpoint: self.endpoint.clone(),
                    after: timeout,
                });
            }
        }
        Ok(())
    }

    fn send(&mut self, message: &KvMsg) -> Result<(), StateError> {
        self.absorb();
        net::send_frames(&self.socket, &message.to_frames(), zmq::DONTWAIT)?;
        Ok(())
    }
}

/// A [`Writer`]'s settings.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// How long [`Writer::connect`] waits for both sockets to be live.
    pub connect_timeout: Duration,
    /// KVSETs queued in this process before the socket drops them (an XPUB
    /// drops past it, like a PUB): a writer that sends more than this
    /// without confirming loses writes.
    pub send_high_water_mark: i32,
    /// Updates queued unread before they are lost (a confirmation among
    /// them would then time out).
    pub receive_high_water_mark: i32,
    /// The keys it writes start with this: it subscribes to them only
    /// (and to HUGZ, which carries refusals), so that other updates do not
    /// pile up unread between its writes. Empty: every key.
    pub subtree: String,
    /// Writes sent without a confirmation, past which a send first waits
    /// (up to `connect_timeout`) for the last one to be published. The
    /// server publishes a commit's updates at once, and libzmq counts one
    /// as gone only when its I/O thread acknowledges it: a burst larger
    /// than about half the server's `publish_high_water_mark` (1,000) now
    /// and then dropped the very update a writer waited for (the write
    /// itself was stored).
    pub max_unconfirmed: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            connect_timeout: Duration::from_secs(5),
            send_high_water_mark: 100_000,
            receive_high_water_mark: 10_000,
            subtree: String::new(),
            max_unconfirmed: 500,
        }
    }
}

/// Acknowledged writes: sends KVSETs to the collector and watches the
/// updates socket for the KVPUB carrying each one's uuid, which the server
/// publishes only once the write is committed.
pub struct Writer {
    endpoints: Endpoints,
    options: WriterOptions,
    collector: Collector,
    updates: zmq::Socket,
    scratch: zmq::Message,
    /// The last write sent, and how many were sent since the last
    /// confirmation (see [`WriterOptions::max_unconfirmed`]).
    last_sent: Bytes,
    unconfirmed: usize,
}

impl Writer {
    /// Connects, and waits until the server has subscribed to this
    /// writer's collector socket and this writer's update subscription is
    /// live (the server greets every new subscriber with a HUGZ).
    pub fn connect(target: impl ToEndpoints, options: WriterOptions) -> Result<Writer, StateError> {
        let endpoints = target.to_endpoints()?;
        let updates = net::context().socket(zmq::SUB)?;
        updates.set_linger(0)?;
        updates.set_rcvhwm(options.receive_high_water_mark)?;
        updates.set_subscribe(options.subtree.as_bytes())?;
        if !options.subtree.is_empty() {
            updates.set_subscribe(chp::HUGZ.as_bytes())?;
        }
        connect(&updates, &endpoints.updates)?;
        let mut collector = Collector::connect(&endpoints.collector, options.send_high_water_mark)?;
        let deadline = Instant::now() + options.connect_timeout;
        let after = options.connect_timeout;
        let mut live = false;
        loop {
            while let Ok(_frames) = updates.recv_multipart(zmq::DONTWAIT) {
                live = true;
            }
            if collector.absorb() && live {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if collector.ready {
                    StateError::Timeout {
                        endpoint: endpoints.updates.clone(),
                        what: "send anything on its updates socket",
                        after,
                    }
                } else {
                    StateError::NothingListening {
                        endpoint: endpoints.collector.clone(),
                        after,
                    }
                });
            }
            let mut items = [
                updates.as_poll_item(zmq::POLLIN),
                collector.socket.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, left.as_millis().max(1) as i64) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Writer {
            endpoints,
            options,
            collector,
            updates,
            scratch: zmq::Message::new(),
            last_sent: Bytes::new(),
            unconfirmed: 0,
        })
    }

    /// The server's endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Sends a KVSET (empty value: delete) without waiting; returns its
    /// uuid for [`Writer::confirm`].
    pub fn send(&mut self, key: &str, value: impl Into<Bytes>, ttl: Option<Duration>) -> Result<Bytes, StateError> {
        self.send_message(kvset(key, value.into(), ttl)?)
    }

    /// Sends `message` as it is (any properties), with a fresh uuid if it
    /// has none; returns the uuid. If the server went away (its
    /// subscription left), waits up to the connect timeout for it to be
    /// back rather than let the write vanish.
    pub fn send_message(&mut self, mut message: KvMsg) -> Result<Bytes, StateError> {
        if message.uuid.is_empty() {
            message.uuid = Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        }
        if self.unconfirmed >= self.options.max_unconfirmed.max(1) {
            let last = self.last_sent.clone();
            self.confirm(&last, self.options.connect_timeout)?;
        }
        self.collector.wait_ready(self.options.connect_timeout)?;
        self.collector.send(&message)?;
        self.last_sent = message.uuid.clone();
        self.unconfirmed += 1;
        Ok(message.uuid)
    }

    /// Waits until the update with this uuid is published; returns its
    /// sequence number. Writes from one writer are applied in order, so
    /// confirming the last one confirms those before it. (However many are
    /// sent, a send waits for a confirmation every
    /// [`WriterOptions::max_unconfirmed`].)
    pub fn confirm(&mut self, uuid: &[u8], timeout: Duration) -> Result<i64, StateError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(received) = net::recv_frames(&self.updates, &mut self.scratch, MAX_FRAMES, usize::MAX)? {
                if let Received::Message(frames) = received {
                    match chp::parse_update(&frames) {
                        Ok(Update::Publish(message)) if message.uuid.as_ref() == uuid => {
                            if uuid == self.last_sent.as_ref() {
                                self.unconfirmed = 0;
                            }
                            return Ok(message.sequence);
                        }
                        Ok(Update::Refused { uuid: refused, reason }) if refused.as_ref() == uuid => {
                            return Err(StateError::Refused { reason });
                        }
                        _ => {}
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StateError::Timeout {
                    endpoint: self.endpoints.collector.clone(),
                    what: "publish the write (refused? see its drop counters)",
                    after: timeout,
                });
            }
            match self.updates.poll(zmq::POLLIN, left.as_millis().max(1) as i64) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sets `key` and waits until the server has committed and published
    /// it; returns its sequence number.
    pub fn set(
        &mut self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
        timeout: Duration,
    ) -> Result<i64, StateError> {
        let uuid = self.send(key, value, ttl)?;
        self.confirm(&uuid, timeout)
    }

    /// Deletes `key` and waits until the deletion is published.
    pub fn delete(&mut self, key: &str, timeout: Duration) -> Result<i64, StateError> {
        self.set(key, Bytes::new(), None, timeout)
    }
}

/// One acknowledged write (what `majordome state set` does): connects,
/// sends, and waits for the server to publish it. `timeout` bounds the
/// connection and the confirmation each. Returns the sequence number.
pub fn set_and_confirm(
    target: impl ToEndpoints,
    key: &str,
    value: impl Into<Bytes>,
    ttl: Option<Duration>,
    timeout: Duration,
) -> Result<i64, StateError> {
    let message = kvset(key, value.into(), ttl)?;
    let options = WriterOptions {
        connect_timeout: timeout,
        ..WriterOptions::default()
    };
    let mut writer = Writer::connect(target, options)?;
    let uuid = writer.send_message(message)?;
    writer.confirm(&uuid, timeout)
}

/// Fetches `subtree` once: every key under it (in key order) and the
/// sequence number the snapshot is consistent with. `timeout` bounds the
/// connection and each wait for the next message.
pub fn snapshot(target: impl ToEndpoints, subtree: &str, timeout: Duration) -> Result<(Vec<KvMsg>, i64), StateError> {
    let endpoints = target.to_endpoints()?;
    chp::check_subtree(subtree.as_bytes(), &unbounded()).map_err(|reason| StateError::InvalidKey {
        key: subtree.to_owned(),
        reason,
    })?;
    let socket = net::context().socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_immediate(true)?;
    socket.set_rcvhwm(10_000)?;
    connect(&socket, &endpoints.snapshot)?;
    if socket.poll(zmq::POLLOUT, timeout.as_millis() as i64)? == 0 {
        return Err(StateError::NothingListening {
            endpoint: endpoints.snapshot,
            after: timeout,
        });
    }
    net::send_frames(&socket, &chp::icanhaz(subtree), zmq::DONTWAIT)?;
    let mut scratch = zmq::Message::new();
    let mut entries = Vec::new();
    loop {
        let frames = match net::recv_frames(&socket, &mut scratch, MAX_FRAMES, usize::MAX)? {
            Some(Received::Message(frames)) => frames,
            Some(Received::TooLarge { .. }) => return Err(StateError::Protocol(ChpError::Oversized)),
            None => {
                if socket.poll(zmq::POLLIN, timeout.as_millis() as i64)? == 0 {
                    return Err(StateError::Timeout {
                        endpoint: endpoints.snapshot,
                        what: "answer ICANHAZ?",
                        after: timeout,
                    });
                }
                continue;
            }
        };
        match chp::parse_snapshot_reply(&frames).map_err(StateError::Protocol)? {
            SnapshotReply::Entry(message) => entries.push(message),
            SnapshotReply::End { sequence, .. } => return Ok((entries, sequence)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(key: &str, sequence: i64, value: &'static str) -> Update {
        let mut message = KvMsg::new(key, value);
        message.sequence = sequence;
        Update::Publish(message)
    }

    #[test]
    fn updates_apply_in_sequence_and_gaps_are_seen() {
        let mut entries = BTreeMap::new();
        let mut sequence = 10;
        let mut apply = |update, live| View::apply(&mut entries, &mut sequence, "/a/", update, live);
        // Older or equal: ignored. Next: applied. Other subtree: counted only.
        assert!(matches!(apply(publish("/a/x", 10, "old"), true), Applied::Nothing));
        assert!(matches!(
            apply(publish("/a/x", 11, "1"), true),
            Applied::Changed(Change::Set { .. })
        ));
        assert!(matches!(apply(publish("/b/x", 12, "1"), true), Applied::Nothing));
        assert!(matches!(apply(Update::Hugz { sequence: 12 }, true), Applied::Nothing));
        assert!(matches!(apply(Update::Hugz { sequence: 0 }, true), Applied::Nothing));
        assert!(matches!(
            apply(publish("/a/x", 13, ""), true),
            Applied::Changed(Change::Deleted { .. })
        ));
        assert!(
            matches!(apply(publish("/a/y", 14, ""), true), Applied::Nothing),
            "nothing to delete"
        );
        assert!(matches!(
            apply(publish("/a/x", 16, "1"), true),
            Applied::Gap { expected: 15, got: 16 }
        ));
        assert!(matches!(
            apply(Update::Hugz { sequence: 15 }, true),
            Applied::Gap { .. }
        ));
        assert!(matches!(
            apply(Update::Hugz { sequence: 3 }, true),
            Applied::Backwards { .. }
        ));
        assert!(matches!(apply(Update::Hugz { sequence: 3 }, false), Applied::Nothing));
        assert_eq!(sequence, 14);
    }

    #[test]
    fn an_update_older_than_the_snapshot_entry_is_skipped() {
        // The snapshot sent /a/x in its state at 15 though KTHXBAI said 12.
        let mut entries = BTreeMap::new();
        let newer = MirrorEntry {
            value: Bytes::from_static(b"15"),
            sequence: 15,
            properties: vec![],
        };
        entries.insert("/a/x".to_owned(), newer.clone());
        let mut sequence = 12;
        for (update, seq) in [(publish("/a/x", 13, "13"), 13), (publish("/a/x", 14, ""), 14)] {
            assert!(matches!(
                View::apply(&mut entries, &mut sequence, "", update, false),
                Applied::Nothing
            ));
            assert_eq!(sequence, seq);
        }
        assert_eq!(entries["/a/x"], newer);
        let same = View::apply(&mut entries, &mut sequence, "", publish("/a/x", 15, "15"), false);
        assert!(matches!(same, Applied::Nothing));
        let applied = View::apply(&mut entries, &mut sequence, "", publish("/a/x", 16, "16"), false);
        assert!(matches!(applied, Applied::Changed(_)));
        assert_eq!(entries["/a/x"].value, "16");
    }
}
