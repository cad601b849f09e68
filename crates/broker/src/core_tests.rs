//! The broker state machine under a fake clock: no sockets, time is an
//! `Instant` the test moves by hand.

use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_mdp::domogik::Message;
use majordome_mdp::mdp::{self, ToWorker};
use majordome_mdp::Frames;
use serde_json::json;

use super::Core;
use crate::settings::Settings;

fn f(parts: &[&str]) -> Frames {
    parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
}

struct Harness {
    core: Core,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::with(Settings::default())
    }

    fn with(settings: Settings) -> Self {
        let now = Instant::now();
        Harness {
            core: Core::new(settings, now),
            now,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.core.tick(self.now);
    }

    fn input(&mut self, frames: Frames) -> Vec<Frames> {
        self.core.handle_message(self.now, frames);
        self.core.drain_outbox().collect()
    }

    fn out(&mut self) -> Vec<Frames> {
        self.core.drain_outbox().collect()
    }

    fn ready(&mut self, worker: &str, service: &str) -> Vec<Frames> {
        self.input(f(&[worker, "", "MDPW01", "\x01", service]))
    }

    fn request(&mut self, client: &str, service: &str, body: &[&str]) -> Vec<Frames> {
        let mut frames = f(&[client, "", "MDPC01", service]);
        frames.extend(f(body));
        self.input(frames)
    }

    fn reply(&mut self, worker: &str, client: &str, body: &[&str]) -> Vec<Frames> {
        let mut frames = f(&[worker, "", "MDPW01", "\x03", client, ""]);
        frames.extend(f(body));
        self.input(frames)
    }
}

/// What a worker got: (worker identity, client address, body).
fn as_request(frames: &Frames) -> (Bytes, Bytes, Frames) {
    match mdp::parse_to_worker(frames[1..].to_vec()) {
        Ok(ToWorker::Request { client, body }) => (frames[0].clone(), client, body),
        other => panic!("expected a REQUEST, got {other:?} from {frames:?}"),
    }
}

/// What a client got: (client identity, service, body).
fn as_reply(frames: &Frames) -> (Bytes, Bytes, Frames) {
    let (service, body) = mdp::parse_client_reply(frames[1..].to_vec()).expect("a client reply");
    (frames[0].clone(), service, body)
}

fn is_disconnect(frames: &Frames, worker: &str) -> bool {
    frames == &f(&[worker, "", "MDPW01", "\x05"])
}

#[test]
fn routes_a_request_to_a_worker_and_the_reply_back() {
    let mut h = Harness::new();
    assert!(h.ready("w1", "echo").is_empty());
    let out = h.request("c1", "echo", &["hello"]);
    assert_eq!(out.len(), 1);
    assert_eq!(as_request(&out[0]), ("w1".into(), "c1".into(), f(&["hello"])));
    let out = h.reply("w1", "c1", &["hello"]);
    assert_eq!(out, vec![f(&["c1", "", "MDPC01", "echo", "hello"])]);
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["echo"].counters.requests, 1);
    assert_eq!(stats.services["echo"].counters.replies, 1);
    assert_eq!(stats.requests_in_flight, 0);
}

#[test]
fn the_domogik_timeout_frame_is_removed_before_the_worker_sees_the_request() {
    let mut h = Harness::new();
    h.ready("dbmgr-worker", "dbmgr");
    let out = h.request(
        "c",
        "dbmgr",
        &[
            "10",
            "config.get",
            r#"{"host":"igor","plugin":"velbus","key":"protocol"}"#,
        ],
    );
    let (_, _, body) = as_request(&out[0]);
    assert_eq!(
        body,
        f(&["config.get", r#"{"host":"igor","plugin":"velbus","key":"protocol"}"#])
    );
}

#[test]
fn the_timeout_frame_sets_the_deadline() {
    let mut h = Harness::new();
    h.request("c", "slow", &["2", "x.get", "{}"]);
    h.advance(Duration::from_millis(1790));
    assert!(h.out().is_empty(), "not expired before its deadline");
    // Domogik's MQSyncReq waits exactly its timeout: the broker answers
    // 200 ms before, so the client learns why instead of getting nothing.
    h.advance(Duration::from_millis(10));
    let out = h.out();
    assert_eq!(out.len(), 1);
    let (client, service, body) = as_reply(&out[0]);
    assert_eq!((client, service), ("c".into(), "slow".into()));
    let message = Message::from_frames(&body).unwrap();
    assert_eq!(message.action, "x.result");
    assert_eq!(message.status(), Some(false));
    assert!(message.reason().unwrap().contains("'slow'"), "{message:?}");
}

#[test]
fn requests_without_timeout_frame_get_the_default_deadline() {
    let mut h = Harness::with(Settings {
        request_timeout: Duration::from_secs(3),
        ..Settings::default()
    });
    h.request("c", "nobody", &["client.list.get", "{}"]);
    h.advance(Duration::from_millis(2900));
    assert!(h.out().iter().all(|m| m[0] != "c"));
    h.advance(Duration::from_millis(200));
    let replies: Vec<_> = h.out().into_iter().filter(|m| m[0] == "c").collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(h.core.stats(h.now).services["nobody"].counters.expired, 1);
}

/// Domogik's broker: a request a worker never answers blocked its service
/// forever. Here it expires, and the next request is served.
#[test]
fn regression_unanswered_request_does_not_block_the_service() {
    let mut h = Harness::new();
    h.ready("w", "svc");
    let out = h.request("c1", "svc", &["1", "a.do", "{}"]);
    assert_eq!(out.len(), 1, "dispatched to w");
    let out = h.request("c2", "svc", &["5", "b.do", "{}"]);
    assert!(out.is_empty(), "w is busy, c2 waits");
    h.advance(Duration::from_millis(1001));
    let out = h.out();
    let failure = out
        .iter()
        .find(|m| m[0] == "c1")
        .expect("c1 is told its request expired");
    let message = Message::from_frames(&as_reply(failure).2).unwrap();
    assert_eq!(message.action, "a.result");
    assert!(message.reason().unwrap().contains("did not answer"), "{message:?}");
    // Machine-readable too: Titanic retries on it rather than store it.
    assert_eq!(message.data["error"], "no_answer");
    // w still holds c1's request, and may still be running it.
    assert_eq!(h.core.stats(h.now).services["svc"].late_workers, 1);
    // The worker finally answers c1: dropped and counted, not given to c2.
    let out = h.reply("w", "c1", &["a.result", "{\"status\":true}"]);
    assert_eq!(out.len(), 1);
    let (worker, client, body) = as_request(&out[0]);
    assert_eq!((worker, client), ("w".into(), "c2".into()));
    assert_eq!(body, f(&["b.do", "{}"]));
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["svc"].counters.late_replies, 1);
    assert_eq!(stats.dropped["late_reply"], 1);
    assert_eq!(stats.services["svc"].late_workers, 0, "w answered: no longer late");
}

/// Domogik's broker: a request to an unknown service got no reply at all.
#[test]
fn regression_unknown_service_gets_a_clear_error_at_its_deadline() {
    let mut h = Harness::new();
    assert!(h.request("c", "nothere", &["1", "foo.get", "{}"]).is_empty());
    h.advance(Duration::from_secs(1));
    let out = h.out();
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert_eq!(message.status(), Some(false));
    assert!(
        message.reason().unwrap().contains("no worker for service 'nothere'"),
        "{message:?}"
    );
    assert_eq!(message.data["error"], "no_worker");
}

/// Domogik's broker: plugins that started before their service gave up,
/// and a new worker did not drain the backlog.
#[test]
fn regression_new_worker_drains_the_backlog_in_arrival_order() {
    let mut h = Harness::new();
    for i in 0..5 {
        let body = format!("{i}");
        assert!(h
            .request(&format!("c{i}"), "late", &["5", "n.get", &format!("{{\"n\":{body}}}")])
            .is_empty());
    }
    h.advance(Duration::from_secs(1));
    let mut out = h.ready("w", "late");
    for i in 0..5 {
        assert_eq!(out.len(), 1, "one request at a time");
        let (_, client, body) = as_request(&out[0]);
        assert_eq!(client, Bytes::from(format!("c{i}")));
        assert_eq!(body[1], Bytes::from(format!("{{\"n\":{i}}}")));
        out = h.reply("w", &format!("c{i}"), &["n.result", "{}"]);
        assert_eq!(as_reply(&out[0]).0, Bytes::from(format!("c{i}")));
        out.remove(0);
    }
    assert!(out.is_empty());
}

#[test]
fn dispatches_to_the_least_recently_used_idle_worker() {
    let mut h = Harness::new();
    h.ready("w1", "svc");
    h.ready("w2", "svc");
    h.ready("w3", "svc");
    let first = h.request("c", "svc", &["x"]);
    assert_eq!(as_request(&first[0]).0, "w1");
    h.reply("w1", "c", &["x"]);
    // w1 is now the most recently used: w2 then w3 come first.
    let order: Vec<Bytes> = (0..3)
        .map(|_| {
            let out = h.request("c", "svc", &["x"]);
            as_request(&out[0]).0
        })
        .collect();
    assert_eq!(order, vec![Bytes::from("w2"), Bytes::from("w3"), Bytes::from("w1")]);
}

/// Domogik's broker: a busy worker stopped heartbeating, was declared dead,
/// and its reply was dropped.
#[test]
fn regression_busy_worker_is_not_declared_dead_while_its_request_lives() {
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(100),
        liveness: 3,
        ..Settings::default()
    };
    let mut h = Harness::with(settings);
    h.ready("w", "svc");
    h.request("c", "svc", &["10", "long.do", "{}"]);
    // Two seconds of silence: twenty intervals, far past liveness.
    for _ in 0..20 {
        h.advance(Duration::from_millis(100));
    }
    h.out();
    assert_eq!(h.core.stats(h.now).workers, 1);
    let out = h.reply("w", "c", &["long.result", "{\"status\":true,\"reason\":\"\"}"]);
    assert_eq!(as_reply(&out[0]).0, "c");
}

#[test]
fn silent_idle_worker_expires_and_its_service_disappears_from_mmi() {
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(100),
        liveness: 3,
        ..Settings::default()
    };
    let mut h = Harness::with(settings);
    h.ready("w", "svc");
    let out = h.request("c", mmi_service(), &["svc"]);
    assert_eq!(as_reply(&out[0]).2, f(&["200"]));
    h.advance(Duration::from_millis(250));
    assert_eq!(h.core.stats(h.now).workers, 1, "not yet");
    // Heartbeats keep it alive.
    h.input(f(&["w", "", "MDPW01", "\x04"]));
    h.advance(Duration::from_millis(250));
    assert_eq!(h.core.stats(h.now).workers, 1);
    h.advance(Duration::from_millis(100));
    assert_eq!(h.core.stats(h.now).workers, 0, "300 ms of silence");
    assert_eq!(h.core.stats(h.now).workers_expired, 1);
    h.out();
    let out = h.request("c", mmi_service(), &["svc"]);
    assert_eq!(as_reply(&out[0]).2, f(&["404"]));
}

fn mmi_service() -> &'static str {
    "mmi.service"
}

#[test]
fn late_worker_gets_a_fresh_grace_after_its_request_expires() {
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(100),
        liveness: 3,
        ..Settings::default()
    };
    let mut h = Harness::with(settings);
    h.ready("w", "svc");
    h.request("c", "svc", &["1", "a.do", "{}"]);
    h.advance(Duration::from_millis(1000));
    h.advance(Duration::from_millis(10));
    assert_eq!(h.core.stats(h.now).workers, 1, "grace starts at the expiry");
    h.advance(Duration::from_millis(400));
    assert_eq!(h.core.stats(h.now).workers, 0, "then silence counts");
}

#[test]
fn heartbeats_every_worker_each_interval() {
    let mut h = Harness::new();
    h.ready("w1", "a");
    h.ready("w2", "b");
    h.advance(Duration::from_millis(1000));
    let mut out = h.out();
    out.sort();
    assert_eq!(
        out,
        vec![f(&["w1", "", "MDPW01", "\x04"]), f(&["w2", "", "MDPW01", "\x04"])]
    );
}

#[test]
fn mmi_answers_service_services_discovery_stats_and_501() {
    let mut h = Harness::new();
    h.ready("w1", "host1.onewire");
    h.ready("w2", "host2.onewire");
    h.ready("w3", "manager");
    // Asked for, but no worker: RFC 8 says 404 (the zguide's broker said 200).
    h.request("c", "ghost", &["x"]);
    let ask = |h: &mut Harness, service: &str, body: &[&str]| as_reply(&h.request("c", service, body)[0]).2;
    assert_eq!(ask(&mut h, "mmi.service", &["manager"]), f(&["200"]));
    assert_eq!(ask(&mut h, "mmi.service", &["ghost"]), f(&["404"]));
    assert_eq!(ask(&mut h, "mmi.service", &[]), f(&["404"]));
    assert_eq!(
        ask(&mut h, "mmi.services", &[]),
        f(&["host1.onewire, host2.onewire, manager"])
    );
    assert_eq!(
        ask(&mut h, "mmi.discovery", &[r"^host\d\.onewire$"]),
        f(&["host1.onewire, host2.onewire"])
    );
    assert_eq!(ask(&mut h, "mmi.discovery", &["(unclosed"]), f(&["400"]));
    assert_eq!(ask(&mut h, "mmi.nosuch", &["x"]), f(&["501"]));
    // Domogik's client sends its timeout frame to MMI as well.
    assert_eq!(ask(&mut h, "mmi.service", &["10", "manager"]), f(&["200"]));
    let stats: serde_json::Value = serde_json::from_slice(&ask(&mut h, "mmi.stats", &[])[0]).unwrap();
    assert_eq!(stats["workers"], json!(3));
    assert_eq!(stats["services"]["ghost"]["queued"], json!(1));
}

#[test]
fn a_worker_may_not_register_an_mmi_service() {
    let mut h = Harness::new();
    let out = h.ready("w", "mmi.service");
    assert!(is_disconnect(&out[0], "w"));
    assert_eq!(h.core.stats(h.now).workers, 0);
}

#[test]
fn protocol_errors_get_disconnect() {
    let mut h = Harness::new();
    // HEARTBEAT and REPLY before READY.
    assert!(is_disconnect(&h.input(f(&["x", "", "MDPW01", "\x04"]))[0], "x"));
    assert!(is_disconnect(&h.reply("y", "c", &["z"])[0], "y"));
    // A second READY.
    h.ready("w", "svc");
    assert!(is_disconnect(&h.ready("w", "svc")[0], "w"));
    assert_eq!(h.core.stats(h.now).workers, 0);
    // A reply while idle.
    h.ready("v", "svc");
    assert!(is_disconnect(&h.reply("v", "c", &["z"])[0], "v"));
    let dropped = h.core.stats(h.now).dropped;
    assert_eq!(dropped["heartbeat_from_unknown_worker"], 1);
    assert_eq!(dropped["reply_from_unknown_worker"], 1);
    assert_eq!(dropped["duplicate_ready"], 1);
    assert_eq!(dropped["unexpected_reply"], 1);
}

#[test]
fn a_worker_that_disconnects_mid_request_fails_it_at_once() {
    let mut h = Harness::new();
    h.ready("w", "svc");
    h.request("c", "svc", &["30", "x.do", "{}"]);
    let out = h.input(f(&["w", "", "MDPW01", "\x05"]));
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert!(message.reason().unwrap().contains("went away"), "{message:?}");
}

#[test]
fn plain_mdp_clients_get_no_made_up_reply_on_expiry() {
    let mut h = Harness::new();
    h.request("c", "nothere", &["hello"]);
    h.advance(Duration::from_secs(11));
    assert!(h.out().is_empty());
    assert_eq!(h.core.stats(h.now).services["nothere"].counters.expired, 1);
}

/// Each of these requests counts 256 bytes plus 9 of frames ("c1",
/// "a.get", "{}").
const SMALL_REQUEST: usize = 265;

#[test]
fn a_full_queue_rejects_with_a_clear_error() {
    let mut h = Harness::with(Settings {
        max_queue_bytes_per_service: 2 * SMALL_REQUEST,
        ..Settings::default()
    });
    assert!(h.request("c1", "svc", &["a.get", "{}"]).is_empty());
    assert!(h.request("c2", "svc", &["a.get", "{}"]).is_empty());
    let out = h.request("c3", "svc", &["a.get", "{}"]);
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    let reason = message.reason().unwrap();
    assert!(
        reason.contains("has 2 requests") && reason.contains("try again later"),
        "{message:?}"
    );
    assert_eq!(message.data["error"], "queue_full");
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["svc"].counters.rejected, 1);
    assert_eq!(stats.services["svc"].queued_bytes, 2 * SMALL_REQUEST);
    assert_eq!(stats.queued_bytes, 2 * SMALL_REQUEST);
}

/// The queue bound is in bytes: a few large requests fill it as surely as
/// many small ones, and a dispatched request no longer counts.
#[test]
fn the_queue_bound_counts_bytes_not_requests() {
    let mut h = Harness::with(Settings {
        max_queue_bytes_per_service: 1024 * 1024,
        ..Settings::default()
    });
    let big = format!("{{\"x\": \"{}\"}}", "x".repeat(400 * 1024));
    assert!(h.request("c1", "svc", &["a.get", &big]).is_empty());
    assert!(h.request("c2", "svc", &["a.get", &big]).is_empty());
    let out = h.request("c3", "svc", &["a.get", &big]);
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert_eq!(
        message.data["error"], "queue_full",
        "the third large request is refused"
    );
    // Hundreds of small ones still fit in what is left.
    for i in 0..500 {
        assert!(
            h.request(&format!("s{i}"), "svc", &["a.get", "{}"]).is_empty(),
            "small request {i}"
        );
    }
    // A worker takes the first: its bytes are free again.
    assert_eq!(h.ready("w", "svc").len(), 1);
    assert!(h.request("c3", "svc", &["a.get", &big]).is_empty());
    h.core.check_invariants();
}

#[test]
fn all_queues_together_are_bounded_too() {
    let mut h = Harness::with(Settings {
        max_queue_bytes_per_service: 2 * SMALL_REQUEST,
        max_queued_bytes: 3 * SMALL_REQUEST,
        ..Settings::default()
    });
    assert!(h.request("c1", "a", &["a.get", "{}"]).is_empty());
    assert!(h.request("c2", "a", &["a.get", "{}"]).is_empty());
    assert!(h.request("c3", "b", &["a.get", "{}"]).is_empty());
    let out = h.request("c4", "b", &["a.get", "{}"]);
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert!(message.reason().unwrap().contains("the broker holds"), "{message:?}");
    assert_eq!(message.data["error"], "queue_full");
    h.core.check_invariants();
}

/// The zguide's `mdclient2` sends 100,000 requests before reading a reply.
/// With a deadline counted from arrival, the tail of such a burst expired
/// while its service was busy answering the head, and RFC 7 gave no way to
/// say so: the client just lost them. Without a timeout frame, the clock
/// runs only while the service makes no progress.
#[test]
fn regression_pipelined_plain_requests_live_while_their_service_answers() {
    let mut h = Harness::with(Settings {
        request_timeout: Duration::from_secs(1),
        ..Settings::default()
    });
    h.ready("w", "echo");
    let mut out = Vec::new();
    for i in 0..50 {
        out.extend(h.request(&format!("c{i}"), "echo", &["hello"]));
    }
    assert_eq!(out.len(), 1, "one at a time");
    // The worker answers one request every 200 ms: the last is answered
    // 10 s after it arrived, ten times the timeout.
    let is_request = |m: &Frames| m.len() > 3 && m[3] == Bytes::from_static(b"\x02");
    for i in 0..50 {
        let request = out.iter().find(|m| is_request(m)).expect("w has a request");
        assert_eq!(as_request(request).1, Bytes::from(format!("c{i}")));
        h.advance(Duration::from_millis(200));
        out = h.reply("w", &format!("c{i}"), &["hello"]);
        assert!(out.iter().any(|m| m[0] == format!("c{i}")), "c{i} has its reply");
        h.core.check_invariants();
    }
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["echo"].counters.replies, 50);
    assert_eq!(stats.services["echo"].counters.expired, 0);
}

/// Without progress, the same requests expire after the timeout: a worker
/// that holds one and never answers frees its queue.
#[test]
fn plain_requests_expire_after_the_timeout_without_progress() {
    let mut h = Harness::with(Settings {
        request_timeout: Duration::from_secs(1),
        ..Settings::default()
    });
    h.ready("w", "svc");
    assert_eq!(h.request("c0", "svc", &["a"]).len(), 1);
    h.advance(Duration::from_millis(600));
    assert!(h.request("c1", "svc", &["b"]).is_empty());
    // The held request expires 1 s after it was given to the worker.
    h.advance(Duration::from_millis(399));
    assert_eq!(h.core.stats(h.now).services["svc"].counters.expired, 0);
    h.advance(Duration::from_millis(2));
    assert_eq!(h.core.stats(h.now).services["svc"].counters.expired, 1);
    // The waiting one lives 1 s from when it came, the service having
    // made no progress since.
    h.advance(Duration::from_millis(598));
    assert_eq!(h.core.stats(h.now).services["svc"].counters.expired, 1);
    h.advance(Duration::from_millis(2));
    assert_eq!(h.core.stats(h.now).services["svc"].counters.expired, 2);
    h.core.check_invariants();
}

/// A request with a timeout frame keeps its deadline however busy its
/// service: its client gives up then.
#[test]
fn a_timeout_frame_deadline_does_not_move_with_progress() {
    let mut h = Harness::new();
    h.ready("w", "svc");
    assert_eq!(h.request("c0", "svc", &["x.get", "{}"]).len(), 1);
    assert!(h.request("c1", "svc", &["1", "y.get", "{}"]).is_empty());
    h.advance(Duration::from_millis(500));
    let out = h.reply("w", "c0", &["x.result", "{}"]);
    assert_eq!(out.len(), 2, "c0's reply, and c1's request to w");
    h.advance(Duration::from_millis(401));
    let out = h.out();
    let failure = out.iter().find(|m| m[0] == "c1").expect("c1 is told at 0.9 s");
    let message = Message::from_frames(&as_reply(failure).2).unwrap();
    assert_eq!(message.data["error"], "no_answer");
}

/// Domogik's client with a 2 s timeout is answered at 1.8 s; the reason
/// said "within 2.0 s". It says what happened.
#[test]
fn a_failure_says_how_long_the_request_waited() {
    let mut h = Harness::new();
    h.request("c", "nobody", &["2", "x.get", "{}"]);
    h.advance(Duration::from_millis(1800));
    let out = h.out();
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert_eq!(
        message.reason().unwrap(),
        "no worker for service 'nobody' became available within 1.8 s"
    );
}

#[test]
fn a_table_full_of_served_services_refuses_new_ones() {
    let mut h = Harness::with(Settings {
        max_services: 2,
        ..Settings::default()
    });
    h.ready("wa", "a");
    h.ready("wb", "b");
    assert!(h.request("c", "c", &["x"]).is_empty(), "a plain client is told nothing");
    assert!(is_disconnect(&h.ready("w", "d")[0], "w"));
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services.len(), 2);
    assert_eq!(stats.dropped["too_many_services"], 2);
    assert_eq!(stats.services_evicted, 0);
}

/// The table once held for minutes after a client named 100,000 services:
/// a worker's READY now always finds room while any service has no worker.
#[test]
fn a_ready_evicts_the_oldest_workerless_service() {
    let mut h = Harness::with(Settings {
        max_services: 3,
        ..Settings::default()
    });
    h.request("c", "old", &["5", "a.get", "{}"]);
    h.advance(Duration::from_millis(10));
    h.request("c", "mid", &["5", "a.get", "{}"]);
    h.ready("wz", "served");
    h.advance(Duration::from_millis(10));
    let out = h.ready("w", "new");
    // The failure goes to the client of the evicted service; the worker is kept.
    assert_eq!(out.len(), 1, "{out:?}");
    let (client, service, body) = as_reply(&out[0]);
    assert_eq!((client, service), ("c".into(), "old".into()));
    let message = Message::from_frames(&body).unwrap();
    assert_eq!(message.status(), Some(false));
    assert_eq!(message.data["error"], "evicted");
    assert!(
        message
            .reason()
            .unwrap()
            .contains("'old' had no worker and was evicted"),
        "{message:?}"
    );
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services_evicted, 1);
    assert!(stats.services.contains_key("new") && stats.services.contains_key("mid"));
    assert!(!stats.services.contains_key("old"));
    assert_eq!(stats.queued_bytes, stats.services["mid"].queued_bytes);
    // The new worker is served.
    let out = h.request("c2", "new", &["hello"]);
    assert_eq!(as_request(&out[0]).2, f(&["hello"]));
    h.core.check_invariants();
}

#[test]
fn workerless_services_are_bounded_on_their_own() {
    let mut h = Harness::with(Settings {
        max_workerless_services: 2,
        ..Settings::default()
    });
    h.ready("w", "served");
    for name in ["s1", "s2", "s3", "s4"] {
        h.request("c", name, &["x"]);
    }
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services_evicted, 2);
    let names: Vec<&String> = stats.services.keys().collect();
    assert_eq!(names, ["s3", "s4", "served"]);
    // A service that loses its worker joins the back of the line.
    h.input(f(&["w", "", "MDPW01", "\x05"]));
    h.request("c", "s5", &["x"]);
    let names: Vec<String> = h.core.stats(h.now).services.into_keys().collect();
    assert_eq!(names, ["s5", "served"]);
    h.core.check_invariants();
}

#[test]
fn one_client_cannot_hold_more_than_its_share_of_the_queues() {
    let mut h = Harness::with(Settings {
        max_queued_bytes_per_client: 2 * SMALL_REQUEST,
        ..Settings::default()
    });
    assert!(h.request("c1", "svc", &["a.get", "{}"]).is_empty());
    assert!(h.request("c1", "other", &["a.get", "{}"]).is_empty());
    let out = h.request("c1", "svc", &["a.get", "{}"]);
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert_eq!(message.data["error"], "queue_full");
    assert!(
        message
            .reason()
            .unwrap()
            .contains("this client has 0.0 MiB of requests waiting already"),
        "{message:?}"
    );
    // Another client still gets in, and the first again once a worker
    // has taken one of its requests.
    assert!(h.request("c2", "svc", &["a.get", "{}"]).is_empty());
    h.ready("w", "svc");
    assert!(h.request("c1", "svc", &["a.get", "{}"]).is_empty());
    let stats = h.core.stats(h.now);
    assert_eq!(stats.dropped["client_queue_full"], 1);
    assert_eq!(stats.services["svc"].counters.rejected, 1);
    h.core.check_invariants();
}

/// A Domogik client once parked a request for a year: its deadline is
/// clipped, and the failure says so.
#[test]
fn a_year_long_timeout_frame_is_clipped_and_the_failure_says_so() {
    let mut h = Harness::with(Settings {
        max_request_timeout: Duration::from_secs(60),
        ..Settings::default()
    });
    h.request("c", "nobody", &["31536000", "a.get", "{}"]);
    h.advance(Duration::from_secs(59));
    assert!(h.out().iter().all(|m| m[0] != "c"));
    h.advance(Duration::from_secs(1));
    let replies: Vec<_> = h.out().into_iter().filter(|m| m[0] == "c").collect();
    assert_eq!(replies.len(), 1);
    let message = Message::from_frames(&as_reply(&replies[0]).2).unwrap();
    let reason = message.reason().unwrap();
    assert!(
        reason.contains("no worker for service 'nobody'")
            && reason.contains("asked for 31536000 s; the broker's max_request_timeout is 60 s"),
        "{reason}"
    );
    assert_eq!(h.core.stats(h.now).requests_in_flight, 0);
}

#[test]
fn idle_services_are_forgotten_after_the_retention() {
    let mut h = Harness::with(Settings {
        idle_service_retention: Duration::from_secs(5),
        ..Settings::default()
    });
    h.request("c", "once", &["x"]);
    h.advance(Duration::from_secs(11));
    assert!(h.core.stats(h.now).services.contains_key("once"));
    h.advance(Duration::from_secs(5));
    assert!(!h.core.stats(h.now).services.contains_key("once"));
}

#[test]
fn async_clients_extra_envelope_frames_come_back_with_the_reply() {
    let mut h = Harness::new();
    h.ready("w", "echo");
    let out = h.input(f(&["client", "request-7", "", "MDPC01", "echo", "hi"]));
    let (_, client, _) = as_request(&out[0]);
    assert_eq!(client, "client");
    let out = h.reply("w", "client", &["hi"]);
    assert_eq!(out, vec![f(&["client", "request-7", "", "MDPC01", "echo", "hi"])]);
}

#[test]
fn a_reply_naming_another_client_is_refused() {
    let mut h = Harness::new();
    h.ready("w", "svc");
    h.request("c", "svc", &["5", "a.do", "{}"]);
    let out = h.reply("w", "intruder", &["a.result", "{}"]);
    assert!(out.iter().any(|m| is_disconnect(m, "w")));
    assert!(out.iter().all(|m| m[0] != "intruder"));
    let failure = out.iter().find(|m| m[0] == "c").expect("c is told");
    assert!(Message::from_frames(&as_reply(failure).2)
        .unwrap()
        .reason()
        .unwrap()
        .contains("went away"));
}

#[test]
fn shutdown_disconnects_every_worker() {
    let mut h = Harness::new();
    h.ready("w1", "a");
    h.ready("w2", "a");
    h.core.shutdown();
    let out = h.out();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|m| m[3] == Bytes::from_static(b"\x05")));
}

#[test]
fn next_wakeup_is_the_earliest_timer() {
    let mut h = Harness::new();
    assert_eq!(h.core.next_wakeup(), h.now + Duration::from_secs(1));
    h.request("c", "svc", &["0.25", "a.get", "{}"]);
    assert_eq!(h.core.next_wakeup(), h.now + Duration::from_millis(225));
}

#[test]
fn empty_and_overlong_service_names_are_dropped() {
    let mut h = Harness::new();
    // Plain MDP bodies: dropped and counted (a dialect body is told why,
    // see below).
    assert!(h.request("c", "", &["x"]).is_empty());
    let long = "s".repeat(300);
    assert!(h.request("c", &long, &["x"]).is_empty());
    assert!(is_disconnect(&h.ready("w", &long)[0], "w"));
    let stats = h.core.stats(h.now);
    assert_eq!(stats.dropped["bad_service_name"], 3);
    assert!(stats.services.is_empty());
}

fn prefetch(n: usize) -> Settings {
    Settings {
        worker_prefetch: n,
        ..Settings::default()
    }
}

#[test]
fn with_prefetch_idle_workers_come_first_then_busy_ones_take_more() {
    let mut h = Harness::with(prefetch(2));
    h.ready("w1", "svc");
    h.ready("w2", "svc");
    let to: Vec<Bytes> = (0..4)
        .map(|i| as_request(&h.request(&format!("c{i}"), "svc", &["x"])[0]).0)
        .collect();
    assert_eq!(
        to,
        vec![
            Bytes::from("w1"),
            Bytes::from("w2"),
            Bytes::from("w1"),
            Bytes::from("w2")
        ]
    );
    assert!(
        h.request("c4", "svc", &["x"]).is_empty(),
        "both are full: c4 waits at the broker"
    );
    // Replies come in the order each worker was asked; w1's first reply
    // frees room for c4.
    let out = h.reply("w1", "c0", &["x"]);
    assert_eq!(as_reply(&out[0]).0, "c0");
    assert_eq!(as_request(&out[1]), ("w1".into(), "c4".into(), f(&["x"])));
    assert_eq!(as_reply(&h.reply("w1", "c2", &["x"])[0]).0, "c2");
    assert_eq!(as_reply(&h.reply("w1", "c4", &["x"])[0]).0, "c4");
    // w1 is idle again and w2 still holds two: the next request goes to w1.
    assert_eq!(as_request(&h.request("c5", "svc", &["x"])[0]).0, "w1");
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["svc"].idle_workers, 0);
    assert_eq!(stats.requests_in_flight, 3);
}

#[test]
fn with_prefetch_an_expired_request_keeps_its_place_and_its_late_reply_is_dropped() {
    let mut h = Harness::with(prefetch(2));
    h.ready("w", "svc");
    h.request("c1", "svc", &["1", "a.do", "{}"]);
    h.request("c2", "svc", &["10", "b.do", "{}"]);
    h.advance(Duration::from_secs(1));
    assert!(h.out().iter().any(|m| m[0] == "c1"), "c1 is told it expired");
    assert!(
        h.reply("w", "c1", &["a.result", "{}"]).is_empty(),
        "the late reply goes nowhere"
    );
    let out = h.reply("w", "c2", &["b.result", "{}"]);
    assert_eq!(as_reply(&out[0]).0, "c2");
    assert_eq!(h.core.stats(h.now).dropped["late_reply"], 1);
}

#[test]
fn with_prefetch_a_worker_that_leaves_fails_everything_it_held() {
    let mut h = Harness::with(prefetch(3));
    h.ready("w", "svc");
    for i in 0..3 {
        h.request(&format!("c{i}"), "svc", &["10", "x.do", "{}"]);
    }
    let out = h.input(f(&["w", "", "MDPW01", "\x05"]));
    let told: Vec<Bytes> = out.iter().map(|m| m[0].clone()).collect();
    assert_eq!(told, vec![Bytes::from("c0"), Bytes::from("c1"), Bytes::from("c2")]);
    assert_eq!(h.core.stats(h.now).requests_in_flight, 0);
}

/// A small deterministic generator, so that a failing seed reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Thousands of random inputs — valid, out of order and malformed — with
/// random jumps of the clock: nothing panics, every counter matches the
/// live state after every step, and every request is answered, expired or
/// still pending (none is lost).
#[test]
fn random_inputs_never_panic_and_keep_every_counter_true() {
    let workers = ["w0", "w1", "w2", "w3"];
    let clients = ["c0", "c1", "c2"];
    let services = ["s0", "s1", "s2", "mmi.service", ""];
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let settings = Settings {
            heartbeat_interval: Duration::from_millis(100),
            liveness: 3,
            request_timeout: Duration::from_millis(700),
            max_queue_bytes_per_service: 4 * 300,
            max_queued_bytes: 6 * 300,
            max_services: 3,
            max_workerless_services: 1 + rng.below(3),
            max_queued_bytes_per_client: 3 * 300,
            worker_prefetch: 1 + rng.below(3),
            idle_service_retention: Duration::from_millis(500),
            ..Settings::default()
        };
        let mut h = Harness::with(settings);
        // What each worker was asked, in order: (client address frame).
        let mut asked: std::collections::HashMap<Bytes, std::collections::VecDeque<Bytes>> = Default::default();
        for _ in 0..400 {
            let worker = rng.pick(&workers);
            let client = rng.pick(&clients);
            let service = rng.pick(&services);
            let frames: Frames = match rng.below(12) {
                0 => f(&[worker, "", "MDPW01", "\x01", service]),
                1 => f(&[worker, "", "MDPW01", "\x01", service, "capacity=3"]),
                2..=4 => {
                    // A reply, usually to the request the worker holds.
                    let owed = asked
                        .get_mut(&Bytes::copy_from_slice(worker.as_bytes()))
                        .and_then(|q| q.pop_front());
                    let to = match owed {
                        Some(address) if rng.below(8) > 0 => String::from_utf8_lossy(&address).into_owned(),
                        _ => client.to_owned(),
                    };
                    f(&[worker, "", "MDPW01", "\x03", &to, "", "x.result", "{}"])
                }
                5 => f(&[worker, "", "MDPW01", "\x04"]),
                6 => f(&[worker, "", "MDPW01", "\x05"]),
                7..=9 => match rng.below(4) {
                    0 => f(&[client, "", "MDPC01", service, "0.3", "a.get", "{}"]),
                    1 => f(&[client, "", "MDPC01", service, "a.do", "{}"]),
                    2 => f(&[client, "rid", "", "MDPC01", service, "raw"]),
                    _ => f(&[client, "", "MDPC01", service]),
                },
                10 => {
                    let garbage = [
                        f(&[worker]),
                        f(&[worker, ""]),
                        f(&[worker, "", "MDPW01", "\x03"]),
                        f(&[worker, "", "MDPW01", "\x01", "a", "b"]),
                        f(&[worker, "", "MDPW01", "\x02", "c", "", "x"]),
                        f(&[worker, "x", "", "MDPW01", "\x04"]),
                        f(&[client, "", "MDPC01"]),
                        f(&[client, "a", "b", "c", "d", "e", "", "MDPC01", "s0"]),
                    ];
                    garbage[rng.below(garbage.len())].clone()
                }
                _ => {
                    h.advance(Duration::from_millis(rng.below(400) as u64));
                    h.core.check_invariants();
                    continue;
                }
            };
            h.core.handle_message(h.now, frames);
            for message in h.out() {
                if message.len() > 4 && message[2] == "MDPW01" && message[3] == Bytes::from_static(b"\x02") {
                    asked
                        .entry(message[0].clone())
                        .or_default()
                        .push_back(message[4].clone());
                }
                if message.len() == 4 && message[3] == Bytes::from_static(b"\x05") {
                    asked.remove(&message[0]);
                }
            }
            h.core.check_invariants();
        }
        // Past every deadline and liveness window, nothing is left in flight.
        h.advance(Duration::from_secs(5));
        h.advance(Duration::from_secs(5));
        h.core.check_invariants();
        let stats = h.core.stats(h.now);
        assert_eq!(
            stats.requests_in_flight, 0,
            "seed {seed}: every request was answered or expired"
        );
        assert_eq!(stats.workers, 0, "seed {seed}: silent workers expired");
    }
}

// Regressions found in review: each lazily cleaned structure stayed bounded
// only while its front was being consumed. They must stay bounded by the
// live state whatever the traffic.

#[test]
fn regression_spare_fifo_does_not_grow_with_prefetch() {
    let mut h = Harness::with(prefetch(2));
    h.ready("w", "svc");
    for _ in 0..1000 {
        h.request("c", "svc", &["x"]);
        h.reply("w", "c", &["x"]);
    }
    let service = &h.core.services[&Bytes::from("svc")];
    assert!(
        service.spare.len() < 16,
        "spare holds {} stale entries",
        service.spare.len()
    );
    h.core.check_invariants();
}

#[test]
fn regression_queue_does_not_keep_expired_ids_without_a_worker() {
    let mut h = Harness::new();
    for _ in 0..1000 {
        h.request("c", "nobody", &["0", "a.get", "{}"]);
        h.advance(Duration::from_millis(1));
    }
    let service = &h.core.services[&Bytes::from("nobody")];
    assert!(
        service.queue.len() < 32,
        "queue holds {} stale ids",
        service.queue.len()
    );
    h.core.check_invariants();
}

#[test]
fn regression_idle_fifo_does_not_grow_with_ready_disconnect_churn() {
    let mut h = Harness::new();
    h.ready("stay", "svc");
    for _ in 0..1000 {
        h.ready("w", "svc");
        h.input(f(&["w", "", "MDPW01", "\x05"]));
    }
    let service = &h.core.services[&Bytes::from("svc")];
    assert!(
        service.idle.len() < 16,
        "idle holds {} stale entries",
        service.idle.len()
    );
    h.core.check_invariants();
}

#[test]
fn regression_answered_requests_do_not_stay_in_the_deadline_heap() {
    let mut h = Harness::new();
    h.ready("w", "echo");
    for _ in 0..5000 {
        h.request("c", "echo", &["31536000", "a.get", "{}"]);
        h.reply("w", "c", &["a.result", "{}"]);
    }
    assert!(
        h.core.deadlines.len() <= 2048,
        "{} dead entries",
        h.core.deadlines.len()
    );
    h.core.check_invariants();
}

#[test]
fn a_zero_heartbeat_interval_cannot_make_tick_spin() {
    let mut h = Harness::with(Settings {
        heartbeat_interval: Duration::ZERO,
        ..Settings::default()
    });
    h.ready("w", "svc");
    h.request("c", "svc", &["5", "a.do", "{}"]);
    h.advance(Duration::from_millis(10));
    assert_eq!(h.core.stats(h.now).workers, 1);
}

#[test]
fn a_dialect_request_with_a_bad_service_name_is_told_why() {
    let mut h = Harness::new();
    let out = h.request("c", "", &["5", "a.get", "{}"]);
    let message = Message::from_frames(&as_reply(&out[0]).2).unwrap();
    assert!(message.reason().unwrap().contains("service name"), "{message:?}");
}

#[test]
fn stats_give_each_service_its_request_to_reply_latency() {
    let mut h = Harness::new();
    h.ready("w1", "slow");
    assert_eq!(h.core.stats(h.now).services["slow"].latency_p50_us, None);
    for _ in 0..3 {
        h.request("c1", "slow", &["x"]);
        h.advance(Duration::from_millis(3));
        h.reply("w1", "c1", &["x"]);
    }
    let stats = h.core.stats(h.now);
    // 3 ms lands in the bucket [2.9 ms, 4.1 ms).
    let p50 = stats.services["slow"].latency_p50_us.unwrap();
    assert!((3000..=4100).contains(&p50), "{p50}");
    assert_eq!(stats.services["slow"].latency_p99_us, Some(p50));
}

/// RFC 7: a worker that announces nothing gets one request at a time, and
/// its REQUEST carries the client's address.
#[test]
fn a_plain_rfc7_worker_gets_one_request_at_a_time() {
    let mut h = Harness::new();
    h.ready("w", "svc");
    let out = h.request("c1", "svc", &["a"]);
    assert_eq!(as_request(&out[0]).1, Bytes::from("c1"));
    assert!(h.request("c2", "svc", &["b"]).is_empty(), "c2 waits for w's reply");
    let out = h.reply("w", "c1", &["a"]);
    assert_eq!(out.len(), 2, "c1's reply, then c2's request");
    assert_eq!(as_request(&out[1]).1, Bytes::from("c2"));
    h.core.check_invariants();
}

fn ready_with(h: &mut Harness, worker: &str, service: &str, capacity: &str) -> Vec<Frames> {
    h.input(f(&[worker, "", "MDPW01", "\x01", service, capacity]))
}

/// A worker that announces a capacity is given that many requests, each
/// with a token in place of the client address, and may answer them in
/// any order.
#[test]
fn a_worker_with_a_capacity_gets_that_many_and_answers_in_any_order() {
    let mut h = Harness::new();
    ready_with(&mut h, "w", "svc", "capacity=3");
    let mut tokens = Vec::new();
    for i in 0..4 {
        let out = h.request(&format!("c{i}"), "svc", &[&format!("{i}")]);
        if i < 3 {
            let (worker, token, body) = as_request(&out[0]);
            assert_eq!(worker, Bytes::from("w"));
            assert_eq!(token.len(), 8, "a token, not the client's address");
            assert_eq!(body, f(&[&format!("{i}")]));
            tokens.push(token);
        } else {
            assert!(out.is_empty(), "the fourth waits: w holds three");
        }
    }
    h.core.check_invariants();
    // The second answered first: to c1, and w takes the fourth.
    let mut reply = f(&["w", "", "MDPW01", "\x03"]);
    reply.push(tokens[1].clone());
    reply.extend(f(&["", "one"]));
    let out = h.input(reply);
    assert_eq!(as_reply(&out[0]).0, Bytes::from("c1"));
    assert_eq!(as_request(&out[1]).2, f(&["3"]));
    // A token it does not hold: the worker is broken.
    let mut bogus = f(&["w", "", "MDPW01", "\x03"]);
    bogus.push(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 99]));
    bogus.extend(f(&["", "x"]));
    let out = h.input(bogus);
    assert!(is_disconnect(&out[0], "w"), "{out:?}");
    h.core.check_invariants();
}

/// A late reply, by token, to a request that expired at the worker is
/// dropped and counted; the others it holds are answered as usual.
#[test]
fn a_capacity_worker_s_late_reply_is_dropped_by_token() {
    let mut h = Harness::new();
    ready_with(&mut h, "w", "svc", "capacity=2");
    let first = h.request("c0", "svc", &["1", "a.get", "{}"]);
    let second = h.request("c1", "svc", &["5", "b.get", "{}"]);
    let (first, second) = (as_request(&first[0]).1, as_request(&second[0]).1);
    h.advance(Duration::from_millis(1001));
    let told = h.out();
    assert!(told.iter().any(|m| m[0] == "c0"), "c0 is told its request expired");
    let answer = |h: &mut Harness, token: &Bytes| {
        let mut reply = f(&["w", "", "MDPW01", "\x03"]);
        reply.push(token.clone());
        reply.extend(f(&["", "x.result", "{}"]));
        h.input(reply)
    };
    assert!(answer(&mut h, &first).is_empty(), "the late reply goes nowhere");
    let out = answer(&mut h, &second);
    assert_eq!(as_reply(&out[0]).0, Bytes::from("c1"));
    let stats = h.core.stats(h.now);
    assert_eq!(stats.services["svc"].counters.late_replies, 1);
    assert_eq!(stats.services["svc"].late_workers, 0);
    h.core.check_invariants();
}

#[test]
fn a_bad_capacity_frame_is_a_bad_ready() {
    let mut h = Harness::new();
    let out = ready_with(&mut h, "w", "svc", "capacity=lots");
    assert!(out.is_empty(), "dropped, as any malformed message");
    assert_eq!(h.core.stats(h.now).dropped["bad_ready"], 1);
}

/// A peer that registered `config` got every `config.set`: in a hub whose
/// own part serves a name, only a worker of that process may serve it.
#[test]
fn a_name_reserved_for_this_process_is_refused_to_other_peers() {
    let mut h = Harness::with(Settings {
        in_process_only: vec!["config".into()],
        ..Settings::default()
    });
    assert!(is_disconnect(&h.ready("stranger", "config")[0], "stranger"));
    h.core.handle_message_from(
        h.now,
        f(&["own", "", "MDPW01", "\x01", "config"]),
        majordome_access::Who::Hub,
    );
    assert!(h.out().is_empty(), "the hub's own worker is registered");
    // Other names are free to anyone.
    assert!(h.ready("plugin", "plugin-fake.box").is_empty());
    let stats = h.core.stats(h.now);
    assert_eq!(stats.dropped["reserved_service"], 1);
    assert_eq!(stats.services["config"].workers, 1);
}

/// A named identity does what its table lists: a request it may not make
/// is answered `forbidden` (Domogik dialect) or dropped (plain MDP), and a
/// READY for a service it may not serve gets DISCONNECT.
#[test]
fn a_named_identity_is_held_to_its_permissions() {
    use majordome_access::{Policy, Who};
    let mut h = Harness::new();
    let policy: Policy = toml::from_str("[panel]\ncall = [\"svc/ping.get\"]\n").unwrap();
    h.core.set_policy(std::sync::Arc::new(policy));
    assert!(h.ready("w", "svc").is_empty());
    let panel = Who::Named("panel");
    let send = |h: &mut Harness, parts: &[&str], who: Who<'_>| {
        h.core.handle_message_from(h.now, f(parts), who);
        h.out()
    };
    let refused = send(&mut h, &["c1", "", "MDPC01", "svc", "stop.do", "{}"], panel);
    let (_, _, body) = as_reply(&refused[0]);
    let reply: serde_json::Value = serde_json::from_slice(&body[1]).unwrap();
    assert_eq!(body[0], Bytes::from("stop.result"));
    assert_eq!(
        (reply["status"].as_bool(), reply["error"].as_str()),
        (Some(false), Some("forbidden"))
    );
    assert!(send(&mut h, &["c1", "", "MDPC01", "svc", "raw"], panel).is_empty());
    let allowed = send(&mut h, &["c1", "", "MDPC01", "svc", "ping.get", "{}"], panel);
    assert_eq!(as_request(&allowed[0]).0, Bytes::from("w"));
    // Anonymous local clients and the hub are never checked.
    assert_eq!(
        send(&mut h, &["c2", "", "MDPC01", "svc", "stop.do", "{}"], Who::Local).len(),
        0
    );
    let ready = send(&mut h, &["w2", "", "MDPW01", "\x01", "other"], panel);
    assert!(is_disconnect(&ready[0], "w2"));
    let stats = h.core.stats(h.now);
    assert_eq!((stats.dropped["forbidden"], stats.dropped["forbidden_service"]), (2, 1));
}

/// The hub's Titanic learns who asks: one frame, first, always there.
#[test]
fn services_that_want_the_caller_get_its_identity_first() {
    use majordome_access::Who;
    let mut h = Harness::with(Settings {
        caller_frame_for: vec!["titanic.request".into()],
        ..Settings::default()
    });
    assert!(h.ready("t", "titanic.request").is_empty());
    for (who, name) in [(Who::Named("alice"), "alice"), (Who::Local, ""), (Who::Hub, "")] {
        h.core
            .handle_message_from(h.now, f(&["c", "", "MDPC01", "titanic.request", "echo", "hi"]), who);
        let out = h.out();
        let (_, _, body) = as_request(&out[0]);
        assert_eq!(body, f(&[name, "echo", "hi"]));
        h.reply("t", "c", &["200"]);
    }
}
