//! The broker as a state machine: typed inputs in, messages out.
//!
//! **Invariants**
//! - One thread owns a [`Core`]; nothing in it is shared or locked.
//! - It does no I/O and never reads the clock: every input carries `now`,
//!   and what it wants sent is left in the outbox as whole multipart
//!   messages whose first frame is the peer identity.
//! - No input costs a scan over services, workers or requests. Idle workers
//!   wait in a per-service FIFO (so the least recently used one is served
//!   first), requests in a per-service FIFO, and deadlines in binary heaps.
//!   All three are cleaned lazily: an entry whose target has changed since it
//!   was queued is skipped when it reaches the front, and a structure is
//!   swept once it holds twice its live content, so memory stays bounded by
//!   the live state. The only periodic
//!   sweep is the heartbeat to every worker, once per heartbeat interval,
//!   which the protocol itself asks for.
//! - A worker holds at most its capacity: one for a plain RFC 7 worker
//!   (or `worker_prefetch`), what it announced in READY otherwise. A reply
//!   is matched to a request the broker gave that worker (the oldest, or
//!   the one its token names), never to one it merely names, so a late
//!   reply cannot reach the wrong client.
//! - A request with a timeout frame expires at that fixed deadline; one
//!   without expires after `request_timeout` without progress of its
//!   service (a dispatch or an answer), or of its worker once dispatched.
//!   The heap holds its first possible deadline and pushes it back when it
//!   comes due early, so progress costs nothing on the hot path.
//! - Queued requests are bounded in bytes (frames plus a fixed overhead
//!   each), per service, per client and in all; `queued_bytes` and
//!   `client_bytes` count them exactly.
//! - The service table cannot be filled by clients: services without a
//!   worker are bounded on their own and evicted oldest first (their
//!   waiting requests fail, saying why), so a worker's READY finds room
//!   unless every service has a worker.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
// Quicker than SipHash on these short keys, and seeded per process, so a
// client cannot pick identities or names that collide on purpose.
use foldhash::{HashMap, HashMapExt};
use majordome_access::{Policy, Who};
use majordome_mdp::domogik::{self, Message, TimeoutFrame};
use majordome_mdp::mdp::{self, FromWorker, Inbound};
use majordome_mdp::{mmi, Frames};
use tracing::{debug, info, warn};

use crate::settings::{Settings, QUEUED_REQUEST_OVERHEAD};
use crate::stats::{LatencyHistogram, ServiceCounters, ServiceStats, Snapshot};

/// How often a noisy drop reason may be logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How much earlier than its client's timeout frame a request expires, at
/// most (and at most a tenth of the timeout).
const EXPIRY_HEAD_START: Duration = Duration::from_millis(200);

/// Longest service name accepted, in bytes.
const MAX_SERVICE_NAME: usize = 255;

type RequestId = u64;

/// The whole broker state. See the module documentation for its invariants.
pub struct Core {
    settings: Settings,
    started: Instant,
    services: HashMap<Bytes, Service>,
    workers: HashMap<Bytes, Worker>,
    requests: HashMap<RequestId, Request>,
    next_request: RequestId,
    next_token: u64,
    /// Request deadlines, earliest first; entries of finished requests are
    /// skipped when popped.
    deadlines: BinaryHeap<Reverse<(Instant, RequestId)>>,
    /// One entry per worker: when to look at its liveness next.
    worker_checks: BinaryHeap<Reverse<(Instant, u64, Bytes)>>,
    next_heartbeat: Instant,
    outbox: Vec<Frames>,
    /// Bytes of every queued request, as counted against
    /// `max_queued_bytes`.
    queued_bytes: usize,
    /// The same per client (the first address frame), against
    /// `max_queued_bytes_per_client`; only clients with some.
    client_bytes: HashMap<Bytes, usize>,
    /// Services with at least one worker; the others are "workerless".
    served_services: usize,
    /// Workerless services in the order they became so, each with the mark
    /// it had then; entries of services that got a worker or went away
    /// since are skipped (and swept, as the other FIFOs).
    workerless: VecDeque<(Bytes, u64)>,
    services_evicted: u64,
    /// Bytes of messages waiting for peers that do not read (kept by the
    /// socket loop, reported here).
    unsent_bytes: usize,
    messages_in: u64,
    messages_out: u64,
    dropped: BTreeMap<&'static str, u64>,
    /// Per reason: when it was last logged, and how many since.
    drop_log: HashMap<&'static str, (Option<Instant>, u64)>,
    workers_expired: u64,
    workers_disconnected: u64,
    /// What named identities may do.
    policy: std::sync::Arc<Policy>,
}

struct Service {
    queue: VecDeque<RequestId>,
    /// Live entries of `queue` (it may also hold expired ones).
    queued: usize,
    /// Their bytes, as counted against `max_queue_bytes_per_service`.
    queued_bytes: usize,
    /// When it last gave a request to a worker or had one answered.
    /// Requests without a timeout frame expire only after
    /// `request_timeout` without progress.
    last_progress: Instant,
    /// Workers with nothing in flight, least recently used first.
    idle: VecDeque<(Bytes, u64)>,
    /// Live entries of `idle`.
    idle_workers: usize,
    /// Workers with something in flight but room for more (only with
    /// `worker_prefetch` above 1).
    spare: VecDeque<(Bytes, u64)>,
    workers: usize,
    counters: ServiceCounters,
    /// Request → reply times, for `mmi.stats`.
    latency: LatencyHistogram,
    last_active: Instant,
    /// While it has no worker: the mark of its entry in `Core::workerless`.
    workerless_mark: u64,
}

impl Service {
    fn new(now: Instant, workerless_mark: u64) -> Self {
        Service {
            queue: VecDeque::new(),
            queued: 0,
            queued_bytes: 0,
            last_progress: now,
            idle: VecDeque::new(),
            idle_workers: 0,
            spare: VecDeque::new(),
            workers: 0,
            counters: ServiceCounters::default(),
            latency: LatencyHistogram::default(),
            last_active: now,
            workerless_mark,
        }
    }
}

struct Worker {
    service: Bytes,
    /// Unique per registration, so a heap entry of a former worker with the
    /// same identity is recognised as stale.
    generation: u64,
    /// The requests given to it, oldest first (at most `capacity`). A slot
    /// that is no longer `live` expired: the worker still owes its reply,
    /// which will be dropped, and gets no new work in its place until then.
    in_flight: VecDeque<Slot>,
    /// How many requests it may hold: what it announced in READY, else
    /// `worker_prefetch`.
    capacity: usize,
    /// It announced its capacity: its requests carry a token in place of
    /// the client address, and its replies are matched by token, in any
    /// order. Other workers answer in order.
    tokens: bool,
    /// Its live entry in its service's `idle` or `spare` FIFO, if any.
    ready_token: Option<u64>,
    last_seen: Instant,
    /// Silence is counted from here when later than `last_seen`: a worker
    /// that was busy could not heartbeat, so its clock restarts when its
    /// request expires.
    grace_from: Instant,
}

/// A request a worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: RequestId,
    live: bool,
}

/// The token that stands for request `id` in place of the client address,
/// for workers that announced a capacity.
fn token_of(id: RequestId) -> Bytes {
    Bytes::copy_from_slice(&id.to_be_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RequestState {
    Queued,
    Dispatched { worker: Bytes, at: Instant },
}

struct Request {
    service: Bytes,
    address: Frames,
    /// Kept until dispatch; empty afterwards.
    body: Frames,
    /// The action when the body is in the Domogik dialect: failures are then
    /// reported to the client as a `.result` with `status: false`.
    dialect_action: Option<Bytes>,
    timeout: Duration,
    /// The client sent a timeout frame: the deadline is fixed, since the
    /// client gives up then. Otherwise it counts from progress (see
    /// `Settings::request_timeout`).
    fixed_deadline: bool,
    /// What it counts against the queue bounds while queued.
    cost: usize,
    /// The timeout its client asked for, when longer than the broker's
    /// `max_request_timeout` and so clipped to it.
    clipped_from: Option<Duration>,
    state: RequestState,
    /// When the broker took it: its reply's latency counts from here.
    accepted_at: Instant,
}

/// Why a request failed, as told to a Domogik-dialect client.
#[derive(Clone, Copy)]
enum Failure {
    NoWorker,
    NoAnswer,
    WorkerGone,
    QueueFull,
    ClientFull,
    BrokerFull,
    TooManyServices,
    BadServiceName,
    Evicted,
}

impl Failure {
    /// The `error` field of the failure reply.
    fn name(self) -> &'static str {
        match self {
            Failure::NoWorker => "no_worker",
            Failure::NoAnswer => "no_answer",
            Failure::WorkerGone => "worker_gone",
            Failure::QueueFull | Failure::BrokerFull | Failure::ClientFull => "queue_full",
            Failure::TooManyServices => "too_many_services",
            Failure::BadServiceName => "bad_service_name",
            Failure::Evicted => "evicted",
        }
    }
}

impl Core {
    /// A broker with no peers, started at `now`.
    pub fn new(mut settings: Settings, now: Instant) -> Self {
        // A zero interval would make every timer due at once, forever.
        settings.heartbeat_interval = settings.heartbeat_interval.max(Duration::from_millis(1));
        settings.liveness = settings.liveness.max(1);
        let next_heartbeat = now + settings.heartbeat_interval;
        Core {
            settings,
            started: now,
            services: HashMap::new(),
            workers: HashMap::new(),
            requests: HashMap::new(),
            next_request: 1,
            next_token: 1,
            deadlines: BinaryHeap::new(),
            worker_checks: BinaryHeap::new(),
            next_heartbeat,
            outbox: Vec::new(),
            queued_bytes: 0,
            client_bytes: HashMap::new(),
            served_services: 0,
            workerless: VecDeque::new(),
            services_evicted: 0,
            unsent_bytes: 0,
            messages_in: 0,
            messages_out: 0,
            dropped: BTreeMap::new(),
            drop_log: HashMap::new(),
            workers_expired: 0,
            workers_disconnected: 0,
            policy: Default::default(),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Takes the messages to send, in order. Each starts with the identity
    /// of the peer it goes to.
    pub fn drain_outbox(&mut self) -> std::vec::Drain<'_, Frames> {
        self.messages_out += self.outbox.len() as u64;
        self.outbox.drain(..)
    }

    /// The latest time at which [`Core::tick`] must be called.
    pub fn next_wakeup(&self) -> Instant {
        let mut next = self.next_heartbeat;
        if let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            next = next.min(*deadline);
        }
        if let Some(Reverse((check, _, _))) = self.worker_checks.peek() {
            next = next.min(*check);
        }
        next
    }

    /// The permissions that requests and READYs from named identities are
    /// checked against (none: everything is allowed).
    pub fn set_policy(&mut self, policy: std::sync::Arc<Policy>) {
        self.policy = policy;
    }

    /// A message as read from the ROUTER socket (identity first), from an
    /// anonymous peer in another process.
    pub fn handle_message(&mut self, now: Instant, frames: Frames) {
        self.handle_message_from(now, frames, Who::Local);
    }

    /// The same, saying who sent it: only the hub itself (a peer in this
    /// process) may serve a name of `in_process_only`, and a named
    /// identity's requests and READYs are checked against the policy.
    pub fn handle_message_from(&mut self, now: Instant, frames: Frames, who: Who<'_>) {
        self.messages_in += 1;
        match mdp::parse_inbound(frames, self.settings.max_envelope) {
            Ok(Inbound::Client { address, service, body }) => self.on_client(now, address, service, body, who),
            Ok(Inbound::Worker { identity, message }) => self.on_worker(now, identity, message, who),
            Err(malformed) => self.drop_message(now, malformed.reason()),
        }
    }

    /// A message that was too large to read; it was thrown away.
    pub fn handle_oversized(&mut self, now: Instant) {
        self.messages_in += 1;
        self.drop_message(now, "oversized");
    }

    /// What the socket loop could not send: `dropped` messages for
    /// `reason`, and the bytes still waiting for slow peers.
    pub fn count_unsent(&mut self, now: Instant, dropped: usize, reason: &'static str, waiting_bytes: usize) {
        for _ in 0..dropped {
            self.drop_message(now, reason);
        }
        self.unsent_bytes = waiting_bytes;
    }

    /// Expires requests and workers whose time has come, and heartbeats.
    pub fn tick(&mut self, now: Instant) {
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            self.expire_request(now, id);
        }
        while let Some(Reverse((check, _, _))) = self.worker_checks.peek() {
            if *check > now {
                break;
            }
            let Reverse((_, generation, identity)) = self.worker_checks.pop().expect("peeked");
            self.check_worker(now, generation, identity);
        }
        if now >= self.next_heartbeat {
            for identity in self.workers.keys() {
                self.outbox.push(mdp::worker_heartbeat(identity));
            }
            self.next_heartbeat = now + self.settings.heartbeat_interval;
            self.forget_idle_services(now);
        }
    }

    /// Says DISCONNECT to every worker, so that each reconnects to the next
    /// broker instead of waiting out its liveness.
    pub fn shutdown(&mut self) {
        for identity in self.workers.keys() {
            self.outbox.push(mdp::worker_disconnect(identity));
        }
    }

    /// The statistics `mmi.stats` serves.
    pub fn stats(&self, now: Instant) -> Snapshot {
        // Not on the hot path: one pass over the workers for the late ones.
        let mut late: HashMap<&Bytes, usize> = HashMap::new();
        for worker in self.workers.values() {
            if worker.in_flight.iter().any(|slot| !slot.live) {
                *late.entry(&worker.service).or_default() += 1;
            }
        }
        let services = self
            .services
            .iter()
            .map(|(name, service)| {
                let stats = ServiceStats {
                    counters: service.counters.clone(),
                    queued: service.queued,
                    queued_bytes: service.queued_bytes,
                    workers: service.workers,
                    idle_workers: service.idle_workers,
                    late_workers: late.get(name).copied().unwrap_or(0),
                    latency_p50_us: service.latency.quantile_us(0.5),
                    latency_p99_us: service.latency.quantile_us(0.99),
                    latency: service.latency.buckets(),
                };
                (String::from_utf8_lossy(name).into_owned(), stats)
            })
            .collect();
        Snapshot {
            uptime_seconds: now.saturating_duration_since(self.started).as_secs(),
            workers: self.workers.len(),
            requests_in_flight: self.requests.len(),
            queued_bytes: self.queued_bytes,
            messages: BTreeMap::from([
                ("in".to_owned(), self.messages_in),
                ("out".to_owned(), self.messages_out),
            ]),
            dropped: self
                .dropped
                .iter()
                .map(|(reason, count)| ((*reason).to_owned(), *count))
                .collect(),
            workers_expired: self.workers_expired,
            workers_disconnected: self.workers_disconnected,
            services_evicted: self.services_evicted,
            logins_refused: majordome_net::zap::refused(),
            unsent_bytes: self.unsent_bytes,
            services,
        }
    }

    fn on_client(&mut self, now: Instant, address: Frames, service: Bytes, mut body: Frames, who: Who<'_>) {
        let frame = self
            .settings
            .domogik_timeout_frame
            .then(|| domogik::take_timeout_frame(&mut body));
        let mut clipped_from = None;
        let (timeout, expires_in, fixed_deadline) = match frame.flatten() {
            Some(TimeoutFrame::Seconds(asked)) if asked > self.settings.max_request_timeout => {
                // The client waits longer than the broker keeps anything:
                // it hears at the cap why, and that the cap cut its wait.
                clipped_from = Some(asked);
                let cap = self.settings.max_request_timeout;
                (cap, cap, true)
            }
            // Domogik's client waits exactly its timeout; the broker answers
            // a little before, so that the client hears why.
            Some(TimeoutFrame::Seconds(seconds)) => (seconds, seconds - (seconds / 10).min(EXPIRY_HEAD_START), true),
            Some(TimeoutFrame::Unset) | None => (
                self.settings.request_timeout.min(self.settings.max_request_timeout),
                self.settings.request_timeout.min(self.settings.max_request_timeout),
                false,
            ),
        };
        if mmi::is_internal(&service) {
            self.on_mmi(now, address, service, body);
            return;
        }
        let dialect_action = domogik::dialect_action(&body).map(|_| body[0].clone());
        if let Who::Named(_) = who {
            let action = dialect_action.as_ref().map(|a| String::from_utf8_lossy(a));
            if let Err(denied) = self
                .policy
                .may_call(who, &String::from_utf8_lossy(&service), action.as_deref())
            {
                self.drop_message(now, "forbidden");
                self.refuse(&address, &service, dialect_action.as_ref(), denied.to_string());
                return;
            }
        }
        if self
            .settings
            .caller_frame_for
            .iter()
            .any(|s| s.as_bytes() == service.as_ref())
        {
            // The hub's own service (Titanic) learns who asks: one frame,
            // always there, before the body.
            body.insert(0, Bytes::copy_from_slice(who.name().as_bytes()));
        }
        if service.is_empty() || service.len() > MAX_SERVICE_NAME {
            self.drop_message(now, "bad_service_name");
            self.fail(
                &address,
                &service,
                dialect_action.as_ref(),
                Failure::BadServiceName,
                Duration::ZERO,
            );
            return;
        }
        let cost = QUEUED_REQUEST_OVERHEAD + body.iter().chain(address.iter()).map(Bytes::len).sum::<usize>();
        let client = address[0].clone();
        let client_has = self.client_bytes.get(&client).copied().unwrap_or(0);
        if client_has + cost > self.settings.max_queued_bytes_per_client {
            // Checked before the service is made, so that one client's
            // flood cannot even churn the table.
            self.drop_message(now, "client_queue_full");
            if let Some(entry) = self.services.get_mut(&service) {
                entry.counters.rejected += 1;
            }
            self.fail(
                &address,
                &service,
                dialect_action.as_ref(),
                Failure::ClientFull,
                Duration::ZERO,
            );
            return;
        }
        if !self.services.contains_key(&service) && !self.make_room(now, false) {
            self.drop_message(now, "too_many_services");
            self.fail(
                &address,
                &service,
                dialect_action.as_ref(),
                Failure::TooManyServices,
                Duration::ZERO,
            );
            return;
        }
        let total_full = self.queued_bytes + cost > self.settings.max_queued_bytes;
        if !self.services.contains_key(&service) {
            self.add_service(now, &service);
        }
        let entry = self.services.get_mut(&service).expect("made above");
        entry.last_active = now;
        if total_full || entry.queued_bytes + cost > self.settings.max_queue_bytes_per_service {
            entry.counters.rejected += 1;
            let failure = if total_full {
                Failure::BrokerFull
            } else {
                Failure::QueueFull
            };
            self.fail(&address, &service, dialect_action.as_ref(), failure, Duration::ZERO);
            return;
        }
        entry.counters.requests += 1;
        entry.queued += 1;
        entry.queued_bytes += cost;
        self.queued_bytes += cost;
        *self.client_bytes.entry(client).or_default() += cost;
        let id = self.next_request;
        self.next_request += 1;
        entry.queue.push_back(id);
        self.deadlines.push(Reverse((now + expires_in, id)));
        self.requests.insert(
            id,
            Request {
                service: service.clone(),
                address,
                body,
                dialect_action,
                timeout,
                fixed_deadline,
                cost,
                clipped_from,
                state: RequestState::Queued,
                accepted_at: now,
            },
        );
        self.dispatch(now, &service);
    }

    fn on_worker(&mut self, now: Instant, identity: Bytes, message: FromWorker, who: Who<'_>) {
        if let FromWorker::Ready { service, capacity } = message {
            self.on_ready(now, identity, service, capacity, who);
            return;
        }
        let Some(worker) = self.workers.get_mut(&identity) else {
            // RFC 7: HEARTBEAT and REPLY only after READY. Tell the peer to
            // start over; a DISCONNECT from a stranger needs no answer.
            match message {
                FromWorker::Disconnect => self.drop_message(now, "disconnect_from_unknown_worker"),
                FromWorker::Reply { .. } => {
                    self.drop_message(now, "reply_from_unknown_worker");
                    self.outbox.push(mdp::worker_disconnect(&identity));
                }
                _ => {
                    self.drop_message(now, "heartbeat_from_unknown_worker");
                    self.outbox.push(mdp::worker_disconnect(&identity));
                }
            }
            return;
        };
        // Any command counts as a heartbeat.
        worker.last_seen = now;
        match message {
            FromWorker::Heartbeat => {}
            FromWorker::Disconnect => {
                debug!(worker = ?identity, "worker disconnected");
                self.remove_worker(now, &identity);
            }
            FromWorker::Reply { client, body } => self.on_reply(now, identity, client, body),
            FromWorker::Ready { .. } => unreachable!("handled above"),
        }
    }

    fn on_ready(&mut self, now: Instant, identity: Bytes, service: Bytes, capacity: Option<u32>, who: Who<'_>) {
        if self.workers.contains_key(&identity) {
            // RFC 7: a second READY is a protocol error.
            self.drop_message(now, "duplicate_ready");
            self.disconnect_worker(now, &identity);
            return;
        }
        if service.len() > MAX_SERVICE_NAME {
            self.drop_message(now, "bad_service_name");
            self.workers_disconnected += 1;
            self.outbox.push(mdp::worker_disconnect(&identity));
            return;
        }
        let hub_only = || {
            who != Who::Hub
                && self
                    .settings
                    .in_process_only
                    .iter()
                    .any(|name| name.as_bytes() == service.as_ref())
        };
        if mmi::is_internal(&service) || hub_only() {
            self.drop_message(now, "reserved_service");
            self.workers_disconnected += 1;
            self.outbox.push(mdp::worker_disconnect(&identity));
            return;
        }
        if let Err(denied) = self.policy.may_serve(who, &String::from_utf8_lossy(&service)) {
            debug!("{denied}");
            self.drop_message(now, "forbidden_service");
            self.workers_disconnected += 1;
            self.outbox.push(mdp::worker_disconnect(&identity));
            return;
        }
        if !self.services.contains_key(&service) {
            if !self.make_room(now, true) {
                self.drop_message(now, "too_many_services");
                self.workers_disconnected += 1;
                self.outbox.push(mdp::worker_disconnect(&identity));
                return;
            }
            self.add_service(now, &service);
        }
        let generation = self.token();
        let entry = self.services.get_mut(&service).expect("made above");
        let was_workerless = entry.workers == 0;
        entry.workers += 1;
        entry.idle_workers += 1;
        entry.last_active = now;
        self.worker_checks.push(Reverse((
            now + self.settings.worker_expiry(),
            generation,
            identity.clone(),
        )));
        self.workers.insert(
            identity.clone(),
            Worker {
                service: service.clone(),
                generation,
                in_flight: VecDeque::new(),
                capacity: capacity.map_or(self.settings.worker_prefetch, |c| c as usize).max(1),
                tokens: capacity.is_some(),
                ready_token: None,
                last_seen: now,
                grace_from: now,
            },
        );
        if was_workerless {
            self.served_services += 1;
            self.compact_workerless();
        }
        debug!(worker = ?identity, service = %String::from_utf8_lossy(&service), "worker ready");
        self.make_ready(&identity);
        self.dispatch(now, &service);
    }

    fn on_reply(&mut self, now: Instant, identity: Bytes, client: Bytes, body: Frames) {
        let worker = self.workers.get(&identity).expect("caller checked");
        let service = worker.service.clone();
        // A worker that announced its capacity names the request by its
        // token; others answer in the order they were asked, so the reply
        // is for the oldest request in flight.
        let position = if worker.tokens {
            let id = <[u8; 8]>::try_from(client.as_ref()).map(RequestId::from_be_bytes);
            id.ok()
                .and_then(|id| worker.in_flight.iter().position(|slot| slot.id == id))
        } else {
            (!worker.in_flight.is_empty()).then_some(0)
        };
        match position.map(|at| worker.in_flight[at]) {
            Some(Slot { id, live: true }) => {
                let request = self.requests.get(&id).expect("a request in flight exists");
                if !worker.tokens && request.address.first() != Some(&client) {
                    // The worker answered for someone it was not asked by:
                    // a broken worker. Its requests fail now.
                    self.drop_message(now, "reply_client_mismatch");
                    self.disconnect_worker(now, &identity);
                    return;
                }
                let request = self.requests.remove(&id).expect("checked above");
                self.compact_deadlines();
                self.outbox.push(mdp::client_reply(&request.address, &service, body));
                if let Some(entry) = self.services.get_mut(&service) {
                    entry.counters.replies += 1;
                    entry.latency.record(now.saturating_duration_since(request.accepted_at));
                    entry.last_active = now;
                    entry.last_progress = now;
                }
            }
            Some(Slot { live: false, .. }) => {
                if let Some(entry) = self.services.get_mut(&service) {
                    entry.counters.late_replies += 1;
                }
                self.drop_message(now, "late_reply");
            }
            None => {
                self.drop_message(now, "unexpected_reply");
                self.disconnect_worker(now, &identity);
                return;
            }
        }
        let worker = self.workers.get_mut(&identity).expect("still there");
        worker.in_flight.remove(position.expect("matched above"));
        if worker.in_flight.is_empty() {
            if let Some(entry) = self.services.get_mut(&service) {
                entry.idle_workers += 1;
            }
        }
        self.make_ready(&identity);
        self.dispatch(now, &service);
    }

    fn on_mmi(&mut self, now: Instant, address: Frames, service: Bytes, body: Frames) {
        let names_with_workers = |services: &HashMap<Bytes, Service>, keep: &dyn Fn(&str) -> bool| {
            let mut names: Vec<String> = services
                .iter()
                .filter(|(_, s)| s.workers > 0)
                .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
                .filter(|name| keep(name))
                .collect();
            names.sort();
            Bytes::from(names.join(", "))
        };
        let answer: Bytes = match service.as_ref() {
            mmi::SERVICE => {
                let registered = body
                    .first()
                    .and_then(|name| self.services.get(name))
                    .is_some_and(|s| s.workers > 0);
                Bytes::from_static(if registered { mmi::OK } else { mmi::NOT_FOUND })
            }
            mmi::SERVICES => names_with_workers(&self.services, &|_| true),
            mmi::DISCOVERY => {
                let pattern = body
                    .first()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default();
                match regex::RegexBuilder::new(&pattern).size_limit(1 << 20).build() {
                    Ok(regex) => names_with_workers(&self.services, &|name| regex.is_match(name)),
                    Err(_) => {
                        self.drop_message(now, "bad_discovery_pattern");
                        Bytes::from_static(mmi::BAD_REQUEST)
                    }
                }
            }
            mmi::STATS => Bytes::from(serde_json::to_vec(&self.stats(now)).expect("stats serialize")),
            _ => Bytes::from_static(mmi::NOT_IMPLEMENTED),
        };
        self.outbox.push(mdp::client_reply(&address, &service, [answer]));
    }

    /// Gives queued requests of `service` to its workers, oldest request
    /// first: to the least recently used idle worker, or, when none is idle
    /// and `worker_prefetch` allows, to a worker with room for more.
    fn dispatch(&mut self, now: Instant, service_name: &Bytes) {
        let Some(service) = self.services.get_mut(service_name) else {
            return;
        };
        while service.queued > 0 {
            let live = |workers: &HashMap<Bytes, Worker>, (identity, token): &(Bytes, u64)| {
                workers.get(identity).is_some_and(|w| w.ready_token == Some(*token))
            };
            let identity = if service.idle_workers > 0 {
                loop {
                    let entry = service.idle.pop_front().expect("idle_workers counts live entries");
                    if live(&self.workers, &entry) {
                        break entry.0;
                    }
                }
            } else {
                let mut found = None;
                while let Some(entry) = service.spare.pop_front() {
                    if live(&self.workers, &entry) {
                        found = Some(entry.0);
                        break;
                    }
                }
                match found {
                    Some(identity) => identity,
                    None => break,
                }
            };
            let id = loop {
                let id = service.queue.pop_front().expect("queued counts live entries");
                if matches!(self.requests.get(&id), Some(r) if r.state == RequestState::Queued) {
                    break id;
                }
            };
            let request = self.requests.get_mut(&id).expect("checked live");
            service.queued -= 1;
            service.queued_bytes -= request.cost;
            self.queued_bytes -= request.cost;
            release(&mut self.client_bytes, &request.address[0], request.cost);
            service.last_progress = now;
            let body = std::mem::take(&mut request.body);
            let worker = self.workers.get_mut(&identity).expect("checked live");
            let address = if worker.tokens {
                token_of(id)
            } else {
                request.address[0].clone()
            };
            self.outbox.push(mdp::worker_request(&identity, &address, body));
            request.state = RequestState::Dispatched {
                worker: identity.clone(),
                at: now,
            };
            if worker.in_flight.is_empty() {
                service.idle_workers -= 1;
            }
            worker.in_flight.push_back(Slot { id, live: true });
            worker.ready_token = None;
            if worker.in_flight.len() < worker.capacity {
                self.next_token += 1;
                worker.ready_token = Some(self.next_token);
                service.spare.push_back((identity, self.next_token));
            }
        }
        self.compact(service_name);
    }

    /// Queues a worker as ready for work according to what it has in
    /// flight: idle when nothing, spare when it has room, else nowhere.
    /// `idle_workers` is kept by the callers, who know what changed.
    fn make_ready(&mut self, identity: &Bytes) {
        let token = self.token();
        let worker = self.workers.get_mut(identity).expect("caller checked");
        let service = self
            .services
            .get_mut(&worker.service)
            .expect("a worker's service exists");
        worker.ready_token = None;
        if worker.in_flight.is_empty() {
            service.idle.push_back((identity.clone(), token));
            worker.ready_token = Some(token);
        } else if worker.in_flight.len() < worker.capacity {
            service.spare.push_back((identity.clone(), token));
            worker.ready_token = Some(token);
        }
        // No sweep here: every caller dispatches the service next, which does.
    }

    /// Drops stale entries from a service's FIFOs once they outnumber the
    /// live ones. Each sweep leaves only live entries, so its cost is paid
    /// by the pushes since the last one: amortised O(1), and the FIFOs stay
    /// bounded by the live state whatever the traffic.
    fn compact(&mut self, name: &Bytes) {
        let Some(service) = self.services.get_mut(name) else {
            return;
        };
        let workers = &self.workers;
        let live =
            |(identity, token): &(Bytes, u64)| workers.get(identity).is_some_and(|w| w.ready_token == Some(*token));
        if service.idle.len() > 2 * service.workers + 8 {
            service.idle.retain(|entry| live(entry));
        }
        if service.spare.len() > 2 * service.workers + 8 {
            service.spare.retain(|entry| live(entry));
        }
        if service.queue.len() > 2 * service.queued + 8 {
            let requests = &self.requests;
            service
                .queue
                .retain(|id| matches!(requests.get(id), Some(r) if r.state == RequestState::Queued));
        }
    }

    /// The same for the deadline heap, whose entries outlive the requests
    /// answered before their deadline (which may be a year away).
    fn compact_deadlines(&mut self) {
        if self.deadlines.len() > 2 * self.requests.len() + 1024 {
            let requests = &self.requests;
            self.deadlines.retain(|Reverse((_, id))| requests.contains_key(id));
        }
    }

    fn expire_request(&mut self, now: Instant, id: RequestId) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        if !request.fixed_deadline {
            // No timeout frame: the request lives while its service makes
            // progress. Waiting behind requests that are being answered
            // does not count, so its deadline moves on, lazily, here.
            let progress_from = match &request.state {
                RequestState::Queued => self
                    .services
                    .get(&request.service)
                    .map_or(request.accepted_at, |s| s.last_progress.max(request.accepted_at)),
                RequestState::Dispatched { at, .. } => *at,
            };
            let due = progress_from + request.timeout;
            if due > now {
                self.deadlines.push(Reverse((due, id)));
                return;
            }
        }
        let request = self.requests.remove(&id).expect("found above");
        let failure = match &request.state {
            RequestState::Queued => {
                if let Some(service) = self.services.get_mut(&request.service) {
                    service.queued -= 1;
                    service.queued_bytes -= request.cost;
                }
                self.queued_bytes -= request.cost;
                release(&mut self.client_bytes, &request.address[0], request.cost);
                Failure::NoWorker
            }
            RequestState::Dispatched { worker, .. } => {
                if let Some(worker) = self.workers.get_mut(worker) {
                    if let Some(slot) = worker.in_flight.iter_mut().find(|slot| slot.id == id) {
                        slot.live = false;
                        worker.grace_from = now;
                    }
                }
                Failure::NoAnswer
            }
        };
        if let Some(service) = self.services.get_mut(&request.service) {
            service.counters.expired += 1;
            service.last_active = now;
        }
        self.fail_clipped(
            &request.address,
            &request.service,
            request.dialect_action.as_ref(),
            failure,
            now.saturating_duration_since(request.accepted_at),
            request.clipped_from,
        );
        self.compact(&request.service);
    }

    fn check_worker(&mut self, now: Instant, generation: u64, identity: Bytes) {
        let Some(worker) = self.workers.get(&identity) else {
            return;
        };
        if worker.generation != generation {
            return;
        }
        let expiry = self.settings.worker_expiry();
        // A busy worker may be unable to heartbeat (the zguide's and
        // Domogik's workers cannot); it lives while a request it holds does,
        // and its silence is counted from that request's expiry.
        let busy = worker.in_flight.iter().any(|slot| slot.live);
        let next_check = if busy {
            Some(now + expiry)
        } else {
            let due = worker.last_seen.max(worker.grace_from) + expiry;
            (due > now).then_some(due)
        };
        match next_check {
            Some(at) => self.worker_checks.push(Reverse((at, generation, identity))),
            None => {
                info!(worker = ?identity, service = %String::from_utf8_lossy(&worker.service), "worker expired: silent too long");
                self.workers_expired += 1;
                self.remove_worker(now, &identity);
            }
        }
    }

    /// Sends DISCONNECT and forgets the worker, for protocol errors.
    fn disconnect_worker(&mut self, now: Instant, identity: &Bytes) {
        self.workers_disconnected += 1;
        self.outbox.push(mdp::worker_disconnect(identity));
        self.remove_worker(now, identity);
    }

    /// Forgets a worker; the requests it held fail at once rather than at
    /// their deadline, since nobody will answer them.
    fn remove_worker(&mut self, now: Instant, identity: &Bytes) {
        let Some(worker) = self.workers.remove(identity) else {
            return;
        };
        let mark = self.token();
        if let Some(service) = self.services.get_mut(&worker.service) {
            service.workers -= 1;
            service.last_active = now;
            if worker.in_flight.is_empty() {
                service.idle_workers -= 1;
            }
            if service.workers == 0 {
                self.served_services -= 1;
                service.workerless_mark = mark;
                self.workerless.push_back((worker.service.clone(), mark));
            }
        }
        self.compact_workerless();
        for id in worker
            .in_flight
            .into_iter()
            .filter(|slot| slot.live)
            .map(|slot| slot.id)
        {
            if let Some(request) = self.requests.remove(&id) {
                if let Some(service) = self.services.get_mut(&request.service) {
                    service.counters.expired += 1;
                }
                self.fail(
                    &request.address,
                    &request.service,
                    request.dialect_action.as_ref(),
                    Failure::WorkerGone,
                    now.saturating_duration_since(request.accepted_at),
                );
            }
        }
        self.compact(&worker.service);
        self.compact_deadlines();
    }

    /// Tells a Domogik-dialect client that it may not make this request
    /// (`error: forbidden`); a plain MDP client gets nothing, as in
    /// [`Core::fail`].
    fn refuse(&mut self, address: &[Bytes], service: &Bytes, action: Option<&Bytes>, reason: String) {
        let Some(action) = action else { return };
        let mut message = Message::failure(&String::from_utf8_lossy(action), reason);
        message.data["error"] = "forbidden".into();
        self.outbox
            .push(mdp::client_reply(address, service, message.to_frames()));
    }

    /// Tells a Domogik-dialect client that its request failed, `waited`
    /// after the broker took it. A plain MDP client gets nothing: RFC 7 has
    /// no error reply, and anything sent would be taken for the service's
    /// answer.
    fn fail(&mut self, address: &[Bytes], service: &Bytes, action: Option<&Bytes>, failure: Failure, waited: Duration) {
        self.fail_clipped(address, service, action, failure, waited, None);
    }

    /// [`Core::fail`] for a request whose timeout was clipped from
    /// `clipped_from` to `max_request_timeout`: the reason says so.
    fn fail_clipped(
        &mut self,
        address: &[Bytes],
        service: &Bytes,
        action: Option<&Bytes>,
        failure: Failure,
        waited: Duration,
        clipped_from: Option<Duration>,
    ) {
        let Some(action) = action else { return };
        let name = String::from_utf8_lossy(service);
        let mebibytes = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
        let reason = match failure {
            Failure::NoWorker => {
                format!(
                    "no worker for service '{name}' became available within {:.1} s",
                    waited.as_secs_f64()
                )
            }
            Failure::NoAnswer => format!("service '{name}' did not answer within {:.1} s", waited.as_secs_f64()),
            Failure::WorkerGone => format!("the worker of service '{name}' went away while handling the request"),
            Failure::QueueFull => {
                let (queued, bytes) = self
                    .services
                    .get(service)
                    .map_or((0, 0), |s| (s.queued, s.queued_bytes));
                format!(
                    "service '{name}' has {queued} requests ({:.1} MiB) waiting already, its limit is {:.1} MiB; \
                     try again later",
                    mebibytes(bytes),
                    mebibytes(self.settings.max_queue_bytes_per_service)
                )
            }
            Failure::BrokerFull => format!(
                "the broker holds {:.1} MiB of waiting requests, its limit; try again later",
                mebibytes(self.queued_bytes)
            ),
            Failure::ClientFull => format!(
                "this client has {:.1} MiB of requests waiting already, the limit per client is {:.1} MiB; \
                 wait for replies before sending more",
                mebibytes(
                    address
                        .first()
                        .and_then(|c| self.client_bytes.get(c))
                        .copied()
                        .unwrap_or(0)
                ),
                mebibytes(self.settings.max_queued_bytes_per_client)
            ),
            Failure::Evicted => format!(
                "service '{name}' had no worker and was evicted to make room for another \
                 (max_workerless_services {}, max_services {}); no worker became available within {:.1} s",
                self.settings.max_workerless_services,
                self.settings.max_services,
                waited.as_secs_f64()
            ),
            Failure::BadServiceName => {
                format!("the service name must be 1 to {MAX_SERVICE_NAME} bytes long")
            }
            Failure::TooManyServices => {
                format!(
                    "the broker already knows {} services; refusing '{name}'",
                    self.settings.max_services
                )
            }
        };
        let reason = match clipped_from {
            Some(asked) => format!(
                "{reason} (the request asked for {} s; the broker's max_request_timeout is {} s)",
                asked.as_secs_f64(),
                self.settings.max_request_timeout.as_secs_f64()
            ),
            None => reason,
        };
        let action = String::from_utf8_lossy(action);
        let mut message = Message::failure(&action, reason);
        // Machine-readable, so that a client (Titanic) can tell the
        // broker's failure from the service's own `status: false`.
        message.data["error"] = failure.name().into();
        self.outbox
            .push(mdp::client_reply(address, service, message.to_frames()));
    }

    fn forget_idle_services(&mut self, now: Instant) {
        let retention = self.settings.idle_service_retention;
        // Only services without a worker go: `served_services` holds.
        self.services.retain(|_, service| {
            service.workers > 0 || service.queued > 0 || now.saturating_duration_since(service.last_active) < retention
        });
        self.compact_workerless();
    }

    /// A new service, without a worker yet: it joins the back of the
    /// workerless FIFO.
    fn add_service(&mut self, now: Instant, name: &Bytes) {
        let mark = self.token();
        self.services.insert(name.clone(), Service::new(now, mark));
        self.workerless.push_back((name.clone(), mark));
        self.compact_workerless();
    }

    /// Whether a new service may be added, evicting the oldest workerless
    /// service when the table (or, for a service a request names, the
    /// workerless part of it) is full. `false` when it is full of served
    /// services.
    fn make_room(&mut self, now: Instant, for_worker: bool) -> bool {
        // More than one may go: services that lost their worker become
        // workerless without counting against the bound until now.
        loop {
            let workerless = self.services.len() - self.served_services;
            let full = self.services.len() >= self.settings.max_services
                || (!for_worker && workerless >= self.settings.max_workerless_services);
            if !full {
                return true;
            }
            if !self.evict_oldest_workerless(now) {
                return false;
            }
        }
    }

    /// Forgets the service that has been without a worker longest; its
    /// waiting requests fail with [`Failure::Evicted`]. `false` when every
    /// service has a worker.
    fn evict_oldest_workerless(&mut self, now: Instant) -> bool {
        let name = loop {
            let Some((name, mark)) = self.workerless.pop_front() else {
                return false;
            };
            if self
                .services
                .get(&name)
                .is_some_and(|s| s.workers == 0 && s.workerless_mark == mark)
            {
                break name;
            }
        };
        let service = self.services.remove(&name).expect("checked above");
        self.services_evicted += 1;
        debug!(service = %String::from_utf8_lossy(&name), queued = service.queued, "evicted a service without a worker");
        for id in service.queue {
            // The queue may still name requests that expired (gone).
            let request = match self.requests.entry(id) {
                std::collections::hash_map::Entry::Occupied(entry) if entry.get().state == RequestState::Queued => {
                    entry.remove()
                }
                _ => continue,
            };
            self.queued_bytes -= request.cost;
            release(&mut self.client_bytes, &request.address[0], request.cost);
            self.fail_clipped(
                &request.address,
                &name,
                request.dialect_action.as_ref(),
                Failure::Evicted,
                now.saturating_duration_since(request.accepted_at),
                None,
            );
        }
        self.compact_deadlines();
        true
    }

    /// Sweeps the workerless FIFO once stale entries outnumber live ones.
    fn compact_workerless(&mut self) {
        let workerless = self.services.len() - self.served_services;
        if self.workerless.len() > 2 * workerless + 8 {
            let services = &self.services;
            self.workerless.retain(|(name, mark)| {
                services
                    .get(name)
                    .is_some_and(|s| s.workers == 0 && s.workerless_mark == *mark)
            });
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Counts a dropped message and logs it, at most once per reason every
    /// few seconds so that a flood of garbage cannot flood the log.
    fn drop_message(&mut self, now: Instant, reason: &'static str) {
        *self.dropped.entry(reason).or_default() += 1;
        let (last, suppressed) = self.drop_log.entry(reason).or_insert((None, 0));
        if last.is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY) {
            warn!(reason, suppressed_since_last_log = *suppressed, "dropped a message");
            *last = Some(now);
            *suppressed = 0;
        } else {
            *suppressed += 1;
        }
    }
}

/// Takes `cost` off what `client` has queued, forgetting the client at 0.
fn release(client_bytes: &mut HashMap<Bytes, usize>, client: &Bytes, cost: usize) {
    if let Some(bytes) = client_bytes.get_mut(client) {
        *bytes -= cost;
        if *bytes == 0 {
            client_bytes.remove(client);
        }
    }
}

#[cfg(test)]
impl Core {
    /// Recomputes every counter and cross-reference from the live state and
    /// panics on the first mismatch. For tests that drive the core with
    /// random inputs.
    pub(crate) fn check_invariants(&self) {
        for (name, service) in &self.services {
            let workers: Vec<(&Bytes, &Worker)> = self.workers.iter().filter(|(_, w)| w.service == name).collect();
            assert_eq!(service.workers, workers.len(), "workers of {name:?}");
            let idle = workers.iter().filter(|(_, w)| w.in_flight.is_empty()).count();
            assert_eq!(service.idle_workers, idle, "idle workers of {name:?}");
            for (identity, worker) in &workers {
                if worker.in_flight.is_empty() {
                    let token = worker.ready_token.expect("an idle worker is queued");
                    assert!(
                        service.idle.contains(&((*identity).clone(), token)),
                        "idle entry of {identity:?}"
                    );
                }
            }
            let queued: Vec<RequestId> = self
                .requests
                .iter()
                .filter(|(_, r)| r.service == name && r.state == RequestState::Queued)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(service.queued, queued.len(), "queued of {name:?}");
            let bytes: usize = queued.iter().map(|id| self.requests[id].cost).sum();
            assert_eq!(service.queued_bytes, bytes, "queued bytes of {name:?}");
            for id in queued {
                assert!(service.queue.contains(&id), "request {id} is in its queue");
            }
            assert!(
                service.queued == 0 || service.idle_workers == 0,
                "{name:?}: work and an idle worker both wait"
            );
        }
        let total: usize = self.services.values().map(|s| s.queued_bytes).sum();
        assert_eq!(self.queued_bytes, total, "queued bytes of the broker");
        let mut per_client: HashMap<Bytes, usize> = HashMap::new();
        for request in self.requests.values().filter(|r| r.state == RequestState::Queued) {
            *per_client.entry(request.address[0].clone()).or_default() += request.cost;
        }
        assert_eq!(self.client_bytes, per_client, "queued bytes per client");
        let served = self.services.values().filter(|s| s.workers > 0).count();
        assert_eq!(self.served_services, served, "services with a worker");
        for (name, service) in self.services.iter().filter(|(_, s)| s.workers == 0) {
            assert!(
                self.workerless.contains(&(name.clone(), service.workerless_mark)),
                "{name:?} is in the workerless FIFO"
            );
        }
        assert!(
            self.workerless.len() <= 2 * (self.services.len() - served) + 8,
            "the workerless FIFO is swept"
        );
        for (id, request) in &self.requests {
            assert!(
                self.services.contains_key(&request.service),
                "request {id} has its service"
            );
            assert!(
                self.deadlines.iter().any(|Reverse((_, entry))| entry == id),
                "request {id} has a deadline"
            );
            if let RequestState::Dispatched { worker, .. } = &request.state {
                let holder = self.workers.get(worker).expect("a dispatched request's worker exists");
                assert!(
                    holder.in_flight.contains(&Slot { id: *id, live: true }),
                    "request {id} is in its worker's list"
                );
            }
        }
        for (identity, worker) in &self.workers {
            assert!(
                worker.in_flight.len() <= worker.capacity,
                "{identity:?} over its capacity"
            );
            for id in worker.in_flight.iter().filter(|slot| slot.live).map(|slot| &slot.id) {
                let request = self.requests.get(id).expect("a request in flight exists");
                assert!(
                    matches!(&request.state, RequestState::Dispatched { worker, .. } if worker == identity),
                    "request {id} is dispatched to {identity:?}"
                );
            }
            let checks = self
                .worker_checks
                .iter()
                .filter(|Reverse((_, g, i))| *g == worker.generation && i == identity);
            assert_eq!(checks.count(), 1, "{identity:?} has one liveness check");
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
