//! The dispatcher: sends each stored request to its service and stores the
//! reply.
//!
//! One thread owns all of its state. Events come through one channel: a new
//! request (after its commit), a closed one, a reply ready (the waker of
//! each in-flight request names it), attempts marked in the database, or
//! stop. Per service, requests wait in creation order; the service is asked
//! about with `mmi.service` before any is sent, and asked again with a
//! growing backoff while it has no worker.
//!
//! **One attempt at a time per request, and never two copies running.**
//! An attempt carries a Domogik timeout frame, so the broker itself expires
//! it at `attempt_timeout`. If it expired while a worker held it (the
//! broker says `no_answer`, or nothing came back at all), that worker may
//! still be running it: the retry then waits until a `mmi.stats` asked
//! after the failure shows no *late* worker for the service (a late worker
//! is one still holding an expired request; it stops being late when its
//! reply comes, or when it is declared dead). Other failures (no worker,
//! worker gone, queue full) retry after the backoff alone.
//!
//! Across a restart: before an attempt is sent, its deadline is committed
//! to the request's row (one commit for all the attempts of a round,
//! shared with the other writes; a first attempt sent within
//! `FIRST_ATTEMPT_WINDOW` of `titanic.request` is covered by the deadline
//! stored with the request, so the common case waits for no commit). A restarted Titanic holds back every
//! pending request that has such a deadline until either the deadline has
//! passed and the broker shows no late worker for its service, as above,
//! or the broker shows the service quiet (no worker holding a request,
//! none queued), which it checks from one `DEADLINE_MARGIN` after its
//! start: then no copy from the previous run can be running or waiting.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_client::{AsyncClient, ClientError, Frames, PendingReply};
use majordome_mdp::domogik::{self, Message};
use majordome_net::Shutdown;
use majordome_store::Committer;

use crate::{store, Counters, NewRequest, Settings, TitanicError};

/// What reaches the dispatcher.
pub(crate) enum Event {
    New(NewRequest),
    Closed(String),
    Ready(u64),
    /// The attempts of a batch are marked in the database (or could not be).
    Marked(u64, Result<(), String>),
}

/// Wakes the dispatcher when the reply `id` is ready.
struct ReplyWaker {
    id: u64,
    events: mpsc::Sender<Event>,
}

impl Wake for ReplyWaker {
    fn wake(self: Arc<Self>) {
        let _ = self.events.send(Event::Ready(self.id));
    }
}

/// The broker's own failure kinds (`error` in its `.result` replies).
const BROKER_FAILURES: &[&str] = &[
    "no_worker",
    "no_answer",
    "worker_gone",
    "queue_full",
    "too_many_services",
    "bad_service_name",
];

/// The deadline stored for an attempt is this much later than the one the
/// broker enforces: room for the attempt's way to the broker.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_secs(1);
/// `titanic.request` stores a deadline that covers a first attempt sent
/// within this of the request's commit.
pub(crate) const FIRST_ATTEMPT_WINDOW: Duration = Duration::from_secs(1);
/// The client waits this much longer than the broker's deadline, so that
/// it hears the broker's failure rather than time out first.
const CLIENT_GRACE: Duration = Duration::from_secs(5);
/// An attempt left with less than this of its deadline once marked (a very
/// slow commit) is marked again rather than sent.
const MIN_ATTEMPT: Duration = Duration::from_millis(10);

#[derive(PartialEq, Eq)]
enum JobState {
    /// In its service's `ready` or `gated`, or waiting out a backoff.
    Waiting,
    /// Its attempt's deadline is being committed.
    Marking,
    /// Its attempt is at the broker (or at a worker).
    Running,
}

struct Job {
    /// Creation order.
    seq: u64,
    service: String,
    body: Frames,
    attempts: u32,
    state: JobState,
    /// Closed while marking or running: forgotten once that attempt ends.
    closed: bool,
    /// A first attempt sent by then needs no mark: the stored row covers it.
    sendable_until: Option<Instant>,
}

#[derive(Default)]
struct ServiceState {
    /// Requests ready to go, by creation order.
    ready: BTreeMap<u64, String>,
    /// Requests a worker may still be running, until a `mmi.stats` frees
    /// them (see [`Gate`]).
    gated: Vec<Gate>,
    /// Attempts being marked or sent.
    in_flight: usize,
    /// A worker was there as of the last `mmi.service`, until then.
    up_until: Option<Instant>,
    next_check: Option<Instant>,
    backoff: Duration,
    checking: bool,
    /// After a `mmi.stats` that showed late workers: no new one before.
    late_check_after: Option<Instant>,
    late_backoff: Duration,
    checking_late: bool,
}

impl ServiceState {
    /// When to ask `mmi.stats` for the gated requests.
    fn next_late_check(&self) -> Option<Instant> {
        if self.checking_late {
            return None;
        }
        let earliest = self.gated.iter().map(Gate::first_chance).min()?;
        Some(self.late_check_after.map_or(earliest, |after| after.max(earliest)))
    }

    fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.gated.is_empty() && self.in_flight == 0 && !self.checking && !self.checking_late
    }
}

/// A request held back because a worker may still be running it.
struct Gate {
    uuid: String,
    /// Freed by a `mmi.stats` asked at or after this that shows no late
    /// worker for the service.
    at: Instant,
    /// Freed sooner by one asked at or after this that shows the service
    /// quiet: no worker holding a request, none queued (for requests the
    /// previous run may have sent).
    quiet_at: Option<Instant>,
}

impl Gate {
    fn first_chance(&self) -> Instant {
        self.quiet_at.map_or(self.at, |quiet| quiet.min(self.at))
    }
}

/// What `mmi.stats` says about a service, for the gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServiceView {
    late: usize,
    quiet: bool,
}

impl ServiceView {
    fn of(stats: Option<&majordome_broker::stats::ServiceStats>) -> ServiceView {
        match stats {
            // Unknown to the broker: no worker, nothing queued.
            None => ServiceView { late: 0, quiet: true },
            Some(s) => ServiceView {
                late: s.late_workers,
                quiet: s.late_workers == 0 && s.queued == 0 && s.idle_workers >= s.workers,
            },
        }
    }

    /// Whether `gate` may go, by a `mmi.stats` asked at `asked_at`.
    fn frees(self, gate: &Gate, asked_at: Instant) -> bool {
        let deadline_passed = gate.at <= asked_at && self.late == 0;
        deadline_passed || (self.quiet && gate.quiet_at.is_some_and(|at| at <= asked_at))
    }
}

enum Purpose {
    Attempt(String),
    ServiceCheck(String),
    /// `mmi.stats` about a service, asked at that time.
    LateCheck(String, Instant),
}

struct InFlight {
    purpose: Purpose,
    reply: PendingReply,
    waker: Waker,
}

/// Attempts whose deadline is being committed.
struct Batch {
    deadline: Instant,
    uuids: Vec<String>,
}

pub(crate) struct Dispatcher {
    client: AsyncClient,
    committer: Arc<Committer>,
    counters: Arc<Counters>,
    settings: Settings,
    jobs: HashMap<String, Job>,
    services: HashMap<String, ServiceState>,
    /// Failed requests waiting out their backoff.
    backoff: BinaryHeap<Reverse<(Instant, String)>>,
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    next_seq: u64,
    /// Attempts being marked or sent, all services.
    attempts_in_flight: usize,
    marking: HashMap<u64, Batch>,
    events: mpsc::Sender<Event>,
}

/// Waits for MMI answers this long.
const MMI_TIMEOUT: Duration = Duration::from_secs(5);
/// A `200` from `mmi.service` is trusted this long.
const UP_FOR: Duration = Duration::from_secs(1);

impl Dispatcher {
    pub(crate) fn new(
        broker: &str,
        committer: Arc<Committer>,
        counters: Arc<Counters>,
        settings: Settings,
        pending: Vec<store::Pending>,
        events: mpsc::Sender<Event>,
    ) -> Result<Dispatcher, TitanicError> {
        let client = AsyncClient::connect(broker)?;
        let mut dispatcher = Dispatcher {
            client,
            committer,
            counters,
            settings,
            jobs: HashMap::new(),
            services: HashMap::new(),
            backoff: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_id: 0,
            next_seq: 0,
            attempts_in_flight: 0,
            marking: HashMap::new(),
            events,
        };
        let held = pending.iter().filter(|p| p.attempt_deadline.is_some()).count();
        if !pending.is_empty() {
            tracing::info!(
                pending = pending.len(),
                held,
                "titanic resumes pending requests (held: sent before, they wait until their last deadline and no late worker)"
            );
        }
        let (now, wall) = (Instant::now(), store::unix_now());
        let longest = dispatcher.settings.attempt_timeout + DEADLINE_MARGIN;
        for request in pending {
            // The previous run may have sent it: a copy may run until the
            // stored deadline (at most one attempt_timeout away, whatever
            // the wall clock did meanwhile), or wait at the broker.
            let hold = request.attempt_deadline.map(|deadline| {
                let left = Duration::try_from_secs_f64((deadline - wall).max(0.0)).unwrap_or(longest);
                Gate {
                    uuid: request.uuid.clone(),
                    at: now + left.min(longest),
                    quiet_at: Some(now + DEADLINE_MARGIN),
                }
            });
            dispatcher.add(request.uuid, request.service, request.body, request.attempts, hold);
        }
        Ok(dispatcher)
    }

    /// A request to send: at once, or once its `hold` frees it.
    fn add(&mut self, uuid: String, service: String, body: Frames, attempts: u32, hold: Option<Gate>) {
        self.add_job(uuid, service, body, attempts, hold, None);
    }

    fn add_job(
        &mut self,
        uuid: String,
        service: String,
        body: Frames,
        attempts: u32,
        hold: Option<Gate>,
        sendable_until: Option<Instant>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let state = self.services.entry(service.clone()).or_default();
        match hold {
            Some(gate) => state.gated.push(gate),
            None => {
                state.ready.insert(seq, uuid.clone());
            }
        }
        self.jobs.insert(
            uuid,
            Job {
                seq,
                service,
                body,
                attempts,
                state: JobState::Waiting,
                closed: false,
                sendable_until,
            },
        );
    }

    pub(crate) fn run(mut self, events: mpsc::Receiver<Event>, shutdown: &Shutdown) -> Result<(), TitanicError> {
        self.serve(&events, shutdown);
        // Marks handed in are committed (the committer finishes its queue);
        // their requests wait out that deadline after a restart.
        Ok(())
    }

    fn serve(&mut self, events: &mpsc::Receiver<Event>, shutdown: &Shutdown) {
        // The channel cannot be polled with the shutdown's descriptor, so
        // the wait is cut into slices short enough to stop promptly.
        const STOP_CHECK: Duration = Duration::from_millis(250);
        while !shutdown.is_triggered() {
            let now = Instant::now();
            self.dispatch(now);
            self.counters.pending.store(self.jobs.len() as u64, Ordering::Relaxed);
            self.counters
                .in_flight
                .store(self.attempts_in_flight as u64, Ordering::Relaxed);
            let wait = self
                .next_timer()
                .map_or(Duration::from_secs(1), |at| at.saturating_duration_since(now))
                .min(STOP_CHECK);
            let mut event = match events.recv_timeout(wait) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // Everything that is waiting, before dispatching again.
            while let Some(next) = event {
                match next {
                    Event::New(request) => self.add_job(
                        request.uuid,
                        request.service,
                        request.body,
                        0,
                        None,
                        Some(request.sendable_until),
                    ),
                    Event::Closed(uuid) => self.forget(&uuid),
                    Event::Ready(id) => self.collect(id),
                    Event::Marked(id, outcome) => self.marked(id, outcome),
                }
                event = events.try_recv().ok();
            }
        }
    }

    /// A closed request is not sent again; one being marked or running is
    /// forgotten when that attempt ends.
    fn forget(&mut self, uuid: &str) {
        let Some(job) = self.jobs.get_mut(uuid) else {
            return;
        };
        if job.state != JobState::Waiting {
            job.closed = true;
            return;
        }
        let job = self.jobs.remove(uuid).expect("just seen");
        if let Some(service) = self.services.get_mut(&job.service) {
            service.ready.remove(&job.seq);
            service.gated.retain(|gate| gate.uuid != uuid);
        }
        // A backoff entry left behind is skipped when it comes up.
    }

    fn next_timer(&self) -> Option<Instant> {
        let mut next = self.backoff.peek().map(|Reverse((at, _))| *at);
        for service in self.services.values() {
            let wants_check = !service.ready.is_empty() && service.up_until.is_none() && !service.checking;
            if wants_check {
                next = earliest(next, service.next_check);
            }
            next = earliest(next, service.next_late_check());
            if !service.ready.is_empty() {
                next = earliest(next, service.up_until);
            }
        }
        next
    }

    fn send(&mut self, purpose: Purpose, service: &str, body: Frames, timeout: Duration) {
        self.next_id += 1;
        let id = self.next_id;
        let waker = Waker::from(Arc::new(ReplyWaker {
            id,
            events: self.events.clone(),
        }));
        let reply = self.client.request(service, body, timeout);
        self.in_flight.insert(id, InFlight { purpose, reply, waker });
        // A first poll registers the waker.
        self.collect(id);
    }

    fn collect(&mut self, id: u64) {
        let Some(entry) = self.in_flight.get_mut(&id) else {
            return;
        };
        let mut context = Context::from_waker(&entry.waker);
        let Poll::Ready(outcome) = Pin::new(&mut entry.reply).poll(&mut context) else {
            return;
        };
        let entry = self.in_flight.remove(&id).expect("just polled");
        match entry.purpose {
            Purpose::Attempt(uuid) => self.attempt_done(uuid, outcome),
            Purpose::ServiceCheck(name) => self.service_checked(name, outcome),
            Purpose::LateCheck(name, asked_at) => self.late_checked(name, asked_at, outcome),
        }
    }

    fn dispatch(&mut self, now: Instant) {
        // Backoffs that ran out.
        while let Some(Reverse((at, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, uuid)) = self.backoff.pop().expect("peeked");
            if let Some(job) = self.jobs.get(&uuid) {
                let service = self.services.entry(job.service.clone()).or_default();
                service.ready.insert(job.seq, uuid);
            }
        }
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.ready.is_empty() || !s.gated.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        let (mut marks, mut covered) = (Vec::new(), Vec::new());
        for name in names {
            self.dispatch_service(&name, now, &mut marks, &mut covered);
        }
        if !marks.is_empty() {
            self.mark(marks);
        }
        for uuid in covered {
            self.start_attempt(uuid, self.settings.attempt_timeout);
        }
        self.services.retain(|_, s| !s.is_idle());
    }

    /// Takes the requests of `name` that may go now, up to the limits: into
    /// `marks`, or `covered` for a first attempt its stored row covers.
    fn dispatch_service(
        &mut self,
        name: &str,
        now: Instant,
        marks: &mut Vec<(String, u32)>,
        covered: &mut Vec<String>,
    ) {
        let (per_service, total) = (self.settings.max_in_flight_per_service, self.settings.max_in_flight);
        let service = self.services.get_mut(name).expect("listed");
        if service.next_late_check().is_some_and(|at| at <= now) {
            service.checking_late = true;
            self.send(
                Purpose::LateCheck(name.to_owned(), now),
                "mmi.stats",
                Vec::new(),
                MMI_TIMEOUT,
            );
        }
        let service = self.services.get_mut(name).expect("listed");
        if service.ready.is_empty() {
            return;
        }
        if service.up_until.is_some_and(|until| until <= now) {
            service.up_until = None;
        }
        if service.up_until.is_none() {
            if !service.checking && service.next_check.is_none_or(|at| at <= now) {
                service.checking = true;
                let body = vec![Bytes::copy_from_slice(name.as_bytes())];
                self.send(Purpose::ServiceCheck(name.to_owned()), "mmi.service", body, MMI_TIMEOUT);
            }
            return;
        }
        while service.in_flight < per_service && self.attempts_in_flight < total {
            let Some((_, uuid)) = service.ready.pop_first() else {
                return;
            };
            let Some(job) = self.jobs.get_mut(&uuid) else {
                continue; // closed meanwhile
            };
            service.in_flight += 1;
            self.attempts_in_flight += 1;
            job.attempts += 1;
            if job.sendable_until.take().is_some_and(|until| now < until) {
                job.state = JobState::Running;
                covered.push(uuid);
            } else {
                job.state = JobState::Marking;
                marks.push((uuid, job.attempts));
            }
        }
    }

    /// Commits the deadline of these attempts; they are sent once it is
    /// durable ([`Dispatcher::marked`]).
    fn mark(&mut self, marks: Vec<(String, u32)>) {
        self.next_id += 1;
        let id = self.next_id;
        let timeout = self.settings.attempt_timeout;
        let deadline = store::unix_now() + (timeout + DEADLINE_MARGIN).as_secs_f64();
        let uuids = marks.iter().map(|(uuid, _)| uuid.clone()).collect();
        // Told on the committer's thread once durable, as an event.
        let events = self.events.clone();
        self.committer.enqueue_then(
            move |c| store::mark_attempts(c, &marks, deadline),
            move |outcome| {
                let _ = events.send(Event::Marked(id, outcome.map_err(|e| e.to_string())));
            },
        );
        self.marking.insert(
            id,
            Batch {
                deadline: Instant::now() + timeout,
                uuids,
            },
        );
    }

    fn marked(&mut self, id: u64, outcome: Result<(), String>) {
        let Some(batch) = self.marking.remove(&id) else {
            return;
        };
        let left = batch.deadline.saturating_duration_since(Instant::now());
        for uuid in batch.uuids {
            if let Err(e) = &outcome {
                if self.end_attempt(&uuid) {
                    let failure = Failure {
                        kind: "database",
                        reason: format!("could not record the attempt: {e}"),
                        maybe_running: false,
                    };
                    self.attempt_failed(uuid, failure);
                }
                continue;
            }
            if left < MIN_ATTEMPT {
                // The commit took (nearly) the whole deadline: mark again.
                if self.end_attempt(&uuid) {
                    let job = &self.jobs[&uuid];
                    let seq = job.seq;
                    self.services
                        .entry(job.service.clone())
                        .or_default()
                        .ready
                        .insert(seq, uuid);
                }
                continue;
            }
            self.start_attempt(uuid, left);
        }
    }

    /// Sends the attempt of `uuid`, with a deadline of `timeout` (covered
    /// by the one stored in its row).
    fn start_attempt(&mut self, uuid: String, timeout: Duration) {
        let Some(job) = self.jobs.get_mut(&uuid) else {
            return;
        };
        if job.closed {
            self.end_attempt(&uuid);
            return;
        }
        job.state = JobState::Running;
        // The broker strips the timeout frame when a frame follows it (and
        // only then: an empty body, which titanic.request no longer takes,
        // keeps the broker's default deadline).
        let mut body = Vec::with_capacity(job.body.len() + 1);
        if !job.body.is_empty() {
            body.push(Bytes::from(format!("{:.3}", timeout.as_secs_f64())));
        }
        body.extend(job.body.iter().cloned());
        let service = job.service.clone();
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        self.send(Purpose::Attempt(uuid), &service, body, timeout + CLIENT_GRACE);
    }

    /// The attempt of `uuid` is over (or never left): frees its slot.
    /// False when the request is gone (closed meanwhile).
    fn end_attempt(&mut self, uuid: &str) -> bool {
        let Some(job) = self.jobs.get_mut(uuid) else {
            return false;
        };
        job.state = JobState::Waiting;
        self.attempts_in_flight = self.attempts_in_flight.saturating_sub(1);
        if let Some(service) = self.services.get_mut(&job.service) {
            service.in_flight = service.in_flight.saturating_sub(1);
        }
        if job.closed {
            self.jobs.remove(uuid);
            return false;
        }
        true
    }

    fn attempt_done(&mut self, uuid: String, outcome: Result<Frames, ClientError>) {
        if !self.end_attempt(&uuid) {
            return;
        }
        match classify(&self.jobs[&uuid].body, outcome) {
            Ok(reply) => {
                self.jobs.remove(&uuid);
                self.counters.done.fetch_add(1, Ordering::Relaxed);
                let ticket = self.committer.enqueue(move |c| store::store_reply(c, &uuid, &reply));
                // Not waited for: the reply is readable once committed, and
                // if the commit fails the request stays pending in the
                // database and runs again after a restart.
                drop(ticket);
            }
            Err(failure) => self.attempt_failed(uuid, failure),
        }
    }

    /// Schedules the next attempt of `uuid` after a failed one.
    fn attempt_failed(&mut self, uuid: String, failure: Failure) {
        self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let job = &self.jobs[&uuid];
        tracing::debug!(
            uuid,
            service = job.service,
            error = failure.kind,
            "titanic attempt failed"
        );
        // Never zero: a gated request must wait for a `mmi.stats` asked
        // after this failure, not one already on its way.
        let wait = backoff(
            self.settings.retry_backoff,
            self.settings.max_retry_backoff,
            job.attempts,
        )
        .max(Duration::from_millis(1));
        let (record_uuid, error) = (uuid.clone(), format!("{}: {}", failure.kind, failure.reason));
        let next = store::unix_now() + wait.as_secs_f64();
        drop(
            self.committer
                .enqueue(move |c| store::record_failure(c, &record_uuid, &error, next)),
        );
        let service = self.services.entry(job.service.clone()).or_default();
        if failure.kind != "no_answer" {
            // Whatever it was, ask MMI again before the next try.
            service.up_until = None;
        }
        let at = Instant::now() + wait;
        if failure.maybe_running {
            service.gated.push(Gate {
                uuid,
                at,
                quiet_at: None,
            });
        } else {
            self.backoff.push(Reverse((at, uuid)));
        }
    }

    fn service_checked(&mut self, name: String, outcome: Result<Frames, ClientError>) {
        let settings = &self.settings;
        let service = self.services.entry(name.clone()).or_default();
        service.checking = false;
        let up = matches!(&outcome, Ok(frames) if frames.first().is_some_and(|f| f.as_ref() == b"200"));
        let now = Instant::now();
        if up {
            service.up_until = Some(now + UP_FOR);
            service.backoff = Duration::ZERO;
            service.next_check = None;
        } else {
            service.backoff = if service.backoff.is_zero() {
                settings.service_backoff
            } else {
                (service.backoff * 2).min(settings.max_service_backoff)
            };
            service.next_check = Some(now + service.backoff);
            if let Err(e) = outcome {
                tracing::warn!(error = %e, service = name, "titanic could not ask the broker about a service");
            }
        }
    }

    fn late_checked(&mut self, name: String, asked_at: Instant, outcome: Result<Frames, ClientError>) {
        let settings = &self.settings;
        let service = self.services.entry(name.clone()).or_default();
        service.checking_late = false;
        let view = outcome.ok().and_then(|frames| {
            let stats: majordome_broker::stats::Snapshot = serde_json::from_slice(frames.first()?).ok()?;
            Some(ServiceView::of(stats.services.get(&name)))
        });
        // Those freed go back in creation order; a gate that was due and is
        // still shut makes the next question wait longer.
        let mut still_due = false;
        let jobs = &self.jobs;
        service.gated.retain(|gate| {
            if view.is_some_and(|view| view.frees(gate, asked_at)) {
                if let Some(job) = jobs.get(&gate.uuid) {
                    service.ready.insert(job.seq, gate.uuid.clone());
                }
                return false;
            }
            still_due |= gate.first_chance() <= asked_at;
            true
        });
        if still_due {
            service.late_backoff = if service.late_backoff.is_zero() {
                settings.service_backoff
            } else {
                (service.late_backoff * 2).min(settings.max_service_backoff)
            };
            service.late_check_after = Some(Instant::now() + service.late_backoff);
        } else {
            service.late_backoff = Duration::ZERO;
            service.late_check_after = None;
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `first × 2^(attempts − 1)`, at most `max`.
fn backoff(first: Duration, max: Duration, attempts: u32) -> Duration {
    first
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max)
}

#[derive(Debug)]
struct Failure {
    kind: &'static str,
    reason: String,
    /// The request may have reached a worker that is still running it.
    maybe_running: bool,
}

/// The service's reply, or why the attempt failed. A Domogik-shaped
/// request can be answered by the broker itself with `status: false` and
/// an `error` naming one of its failures: that is not the service's reply.
fn classify(body: &[Bytes], outcome: Result<Frames, ClientError>) -> Result<Frames, Failure> {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(ClientError::Timeout { .. }) => {
            return Err(Failure {
                kind: "no_answer",
                reason: "no reply came back".into(),
                maybe_running: true,
            })
        }
        Err(e) => {
            return Err(Failure {
                kind: "client",
                reason: e.to_string(),
                maybe_running: true,
            })
        }
    };
    if domogik::dialect_action(body).is_some() {
        if let Ok(message) = Message::from_frames(&reply) {
            let error = message.data.get("error").and_then(|e| e.as_str());
            if message.status() == Some(false) {
                if let Some(kind) = error.and_then(|e| BROKER_FAILURES.iter().find(|k| **k == e)) {
                    return Err(Failure {
                        kind,
                        reason: message.reason().unwrap_or_default().to_owned(),
                        maybe_running: *kind == "no_answer",
                    });
                }
            }
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&str]) -> Frames {
        parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
    }

    #[test]
    fn the_brokers_failures_are_not_replies_but_the_services_are() {
        let request = frames(&["light.do", "{}"]);
        let broker = frames(&[
            "light.result",
            r#"{"status": false, "reason": "x", "error": "no_answer"}"#,
        ]);
        let failure = classify(&request, Ok(broker)).expect_err("a failure");
        assert_eq!((failure.kind, failure.maybe_running), ("no_answer", true));
        let gone = frames(&[
            "light.result",
            r#"{"status": false, "reason": "x", "error": "worker_gone"}"#,
        ]);
        assert!(!classify(&request, Ok(gone)).unwrap_err().maybe_running);
        let own = frames(&["light.result", r#"{"status": false, "reason": "bulb missing"}"#]);
        assert_eq!(classify(&request, Ok(own.clone())).ok(), Some(own));
        // A raw request's reply is the reply, whatever it looks like.
        let raw = frames(&["hello"]);
        let lookalike = frames(&["x.result", r#"{"status": false, "error": "no_answer"}"#]);
        assert!(classify(&raw, Ok(lookalike)).is_ok());
        let timeout = ClientError::Timeout {
            service: "s".into(),
            after: Duration::from_secs(1),
        };
        assert!(classify(&raw, Err(timeout)).unwrap_err().maybe_running);
    }

    #[test]
    fn a_gate_opens_after_its_deadline_without_late_workers_or_when_the_service_is_quiet() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let stats = |queued, workers, idle_workers, late_workers| majordome_broker::stats::ServiceStats {
            counters: Default::default(),
            queued,
            queued_bytes: 0,
            workers,
            idle_workers,
            late_workers,
            latency_p50_us: None,
            latency_p99_us: None,
            latency: None,
        };
        let after_failure = Gate {
            uuid: "a".into(),
            at: at(100),
            quiet_at: None,
        };
        let after_restart = Gate {
            uuid: "b".into(),
            at: at(5000),
            quiet_at: Some(at(1000)),
        };
        let busy = ServiceView::of(Some(&stats(0, 2, 1, 0)));
        let late = ServiceView::of(Some(&stats(0, 2, 1, 1)));
        let queued = ServiceView::of(Some(&stats(1, 2, 2, 0)));
        let quiet = ServiceView::of(Some(&stats(0, 2, 2, 0)));
        let gone = ServiceView::of(None);
        // Asked too early: shut whatever the broker says.
        assert!(!quiet.frees(&after_failure, at(50)));
        assert!(!quiet.frees(&after_restart, at(500)));
        // After the deadline: no late worker is enough.
        assert!(busy.frees(&after_failure, at(100)) && !late.frees(&after_failure, at(100)));
        assert!(busy.frees(&after_restart, at(5000)) && !late.frees(&after_restart, at(6000)));
        // Before it, only a quiet service frees a request of the last run.
        assert!(!busy.frees(&after_restart, at(1000)) && !queued.frees(&after_restart, at(1000)));
        assert!(quiet.frees(&after_restart, at(1000)) && gone.frees(&after_restart, at(1000)));
        assert_eq!(after_restart.first_chance(), at(1000));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let waits: Vec<u64> = (1..=8).map(|n| backoff(first, max, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(first, max, u32::MAX), max);
    }
}
