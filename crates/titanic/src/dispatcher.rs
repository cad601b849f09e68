//! The dispatcher: sends each stored request to its service and stores the
//! reply.
//!
//! One thread owns all of its state. Events come through one channel: a new
//! request (after its commit), a closed one, a reply ready (the waker of
//! each in-flight request names it), or stop. Per service, requests wait in
//! a FIFO; the service is asked about with `mmi.service` before any is
//! sent, and asked again with a growing backoff while it has no worker.
//!
//! **One attempt at a time per request, and never two copies running.**
//! An attempt carries a Domogik timeout frame, so the broker itself expires
//! it at `attempt_timeout`. If it expired while a worker held it (the
//! broker says `no_answer`, or nothing came back at all), that worker may
//! still be running it: the retry then waits until the broker's `mmi.stats`
//! shows no *late* worker for the service (a late worker is one still
//! holding an expired request; it stops being late when its reply comes,
//! or when it is declared dead). Other failures (no worker, worker gone,
//! queue full) retry after the backoff alone.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
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
    Stop,
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

struct Job {
    service: String,
    body: Frames,
    attempts: u32,
    running: bool,
}

#[derive(Default)]
struct ServiceState {
    /// Requests ready to go, oldest first.
    ready: VecDeque<String>,
    /// Requests waiting until no worker of the service is late.
    gated: Vec<String>,
    in_flight: usize,
    /// A worker was there as of the last `mmi.service`, until then.
    up_until: Option<Instant>,
    next_check: Option<Instant>,
    backoff: Duration,
    checking: bool,
    next_late_check: Option<Instant>,
    late_backoff: Duration,
    checking_late: bool,
}

enum Purpose {
    Attempt(String),
    ServiceCheck(String),
    LateCheck(String),
}

struct InFlight {
    purpose: Purpose,
    reply: PendingReply,
    waker: Waker,
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
        let mut dispatcher = Dispatcher {
            client: AsyncClient::connect(broker)?,
            committer,
            counters,
            settings,
            jobs: HashMap::new(),
            services: HashMap::new(),
            backoff: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_id: 0,
            events,
        };
        if !pending.is_empty() {
            tracing::info!(pending = pending.len(), "titanic resumes pending requests");
        }
        for request in pending {
            dispatcher.add(request.uuid, request.service, request.body, request.attempts);
        }
        Ok(dispatcher)
    }

    fn add(&mut self, uuid: String, service: String, body: Frames, attempts: u32) {
        self.services
            .entry(service.clone())
            .or_default()
            .ready
            .push_back(uuid.clone());
        self.jobs.insert(
            uuid,
            Job {
                service,
                body,
                attempts,
                running: false,
            },
        );
    }

    pub(crate) fn run(mut self, events: mpsc::Receiver<Event>, shutdown: &Shutdown) -> Result<(), TitanicError> {
        let stop = shutdown.clone();
        let stopper = self.events.clone();
        std::thread::Builder::new().name("titanic-stop".into()).spawn(move || {
            stop.wait();
            let _ = stopper.send(Event::Stop);
        })?;
        loop {
            let now = Instant::now();
            self.dispatch(now);
            self.counters.pending.store(self.jobs.len() as u64, Ordering::Relaxed);
            self.counters
                .in_flight
                .store(self.in_flight.len() as u64, Ordering::Relaxed);
            let wait = self
                .next_timer()
                .map_or(Duration::from_secs(1), |at| at.saturating_duration_since(now))
                .min(Duration::from_secs(1));
            let mut event = match events.recv_timeout(wait) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            // Everything that is waiting, before dispatching again.
            while let Some(next) = event {
                match next {
                    Event::New(request) => self.add(request.uuid, request.service, request.body, 0),
                    Event::Closed(uuid) => self.forget(&uuid),
                    Event::Ready(id) => self.collect(id),
                    Event::Stop => return Ok(()),
                }
                event = events.try_recv().ok();
            }
        }
    }

    /// A closed request that is not running is not sent at all.
    fn forget(&mut self, uuid: &str) {
        if self.jobs.get(uuid).is_some_and(|job| !job.running) {
            let job = self.jobs.remove(uuid).expect("just seen");
            if let Some(service) = self.services.get_mut(&job.service) {
                service.ready.retain(|u| u != uuid);
                service.gated.retain(|u| u != uuid);
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let mut next = self.backoff.peek().map(|Reverse((at, _))| *at);
        for service in self.services.values() {
            let wants_check = !service.ready.is_empty() && service.up_until.is_none() && !service.checking;
            if wants_check {
                next = earliest(next, service.next_check);
            }
            if !service.gated.is_empty() && !service.checking_late {
                next = earliest(next, service.next_late_check);
            }
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
            Purpose::LateCheck(name) => self.late_checked(name, outcome),
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
                service.ready.push_front(uuid);
            }
        }
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.ready.is_empty() || !s.gated.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            self.dispatch_service(&name, now);
        }
        self.services.retain(|_, s| {
            !s.ready.is_empty() || !s.gated.is_empty() || s.in_flight > 0 || s.checking || s.checking_late
        });
    }

    fn dispatch_service(&mut self, name: &str, now: Instant) {
        let attempt_timeout = self.settings.attempt_timeout;
        let (per_service, total) = (self.settings.max_in_flight_per_service, self.settings.max_in_flight);
        let service = self.services.get_mut(name).expect("listed");
        if !service.gated.is_empty() && !service.checking_late && service.next_late_check.is_none_or(|at| at <= now) {
            service.checking_late = true;
            self.send(
                Purpose::LateCheck(name.to_owned()),
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
        let timeout_frame = Bytes::from(format!("{}", attempt_timeout.as_secs_f64()));
        let client_timeout = attempt_timeout + Duration::from_secs(5);
        loop {
            let service = self.services.get_mut(name).expect("listed");
            if service.in_flight >= per_service || self.in_flight.len() >= total {
                return;
            }
            let Some(uuid) = service.ready.pop_front() else {
                return;
            };
            let Some(job) = self.jobs.get_mut(&uuid) else {
                continue; // closed meanwhile
            };
            service.in_flight += 1;
            job.running = true;
            job.attempts += 1;
            // The broker strips the timeout frame when a frame follows it;
            // an empty body keeps the broker's default deadline.
            let mut body = Vec::with_capacity(job.body.len() + 1);
            if !job.body.is_empty() {
                body.push(timeout_frame.clone());
            }
            body.extend(job.body.iter().cloned());
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.send(Purpose::Attempt(uuid), name, body, client_timeout);
        }
    }

    fn attempt_done(&mut self, uuid: String, outcome: Result<Frames, ClientError>) {
        let Some(job) = self.jobs.get_mut(&uuid) else {
            return;
        };
        job.running = false;
        let service_name = job.service.clone();
        if let Some(service) = self.services.get_mut(&service_name) {
            service.in_flight = service.in_flight.saturating_sub(1);
        }
        match classify(&job.body, outcome) {
            Ok(reply) => {
                let attempts = job.attempts;
                self.jobs.remove(&uuid);
                self.counters.done.fetch_add(1, Ordering::Relaxed);
                let ticket = self
                    .committer
                    .enqueue(move |c| store::store_reply(c, &uuid, &reply, attempts));
                // Not waited for: the reply is readable once committed, and
                // if the commit fails the request stays pending in the
                // database and runs again after a restart.
                drop(ticket);
            }
            Err(failure) => {
                self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                let attempts = job.attempts;
                tracing::debug!(
                    uuid,
                    service = service_name,
                    error = failure.kind,
                    "titanic attempt failed"
                );
                let (record_uuid, error) = (uuid.clone(), format!("{}: {}", failure.kind, failure.reason));
                drop(
                    self.committer
                        .enqueue(move |c| store::record_failure(c, &record_uuid, attempts, &error)),
                );
                let service = self.services.entry(service_name).or_default();
                if failure.kind != "no_answer" {
                    // Whatever it was, ask MMI again before the next try.
                    service.up_until = None;
                }
                let backoff = backoff(self.settings.retry_backoff, self.settings.max_retry_backoff, attempts);
                if failure.maybe_running {
                    service.gated.push(uuid.clone());
                    let at = Instant::now() + backoff;
                    service.next_late_check = Some(service.next_late_check.map_or(at, |t| t.min(at)));
                } else {
                    self.backoff.push(Reverse((Instant::now() + backoff, uuid)));
                }
            }
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

    fn late_checked(&mut self, name: String, outcome: Result<Frames, ClientError>) {
        let settings = &self.settings;
        let service = self.services.entry(name.clone()).or_default();
        service.checking_late = false;
        let late = outcome.ok().and_then(|frames| {
            let stats: majordome_broker::stats::Snapshot = serde_json::from_slice(frames.first()?).ok()?;
            Some(stats.services.get(&name).map_or(0, |s| s.late_workers))
        });
        if late == Some(0) {
            // Nobody can still be running them: retry, oldest first.
            service.late_backoff = Duration::ZERO;
            service.next_late_check = None;
            for uuid in service.gated.drain(..).rev() {
                service.ready.push_front(uuid);
            }
        } else {
            service.late_backoff = if service.late_backoff.is_zero() {
                settings.service_backoff
            } else {
                (service.late_backoff * 2).min(settings.max_service_backoff)
            };
            service.next_late_check = Some(Instant::now() + service.late_backoff);
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
    fn backoff_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let waits: Vec<u64> = (1..=8).map(|n| backoff(first, max, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(first, max, u32::MAX), max);
    }
}
