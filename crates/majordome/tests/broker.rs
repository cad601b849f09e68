//! The broker as its users see it: real processes on free ports, real frames.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);

fn json_of(frame: &Bytes) -> Value {
    serde_json::from_slice(frame).expect("a JSON frame")
}

/// Exactly what Domogik's `MQSyncReq.request(service, msg, timeout=10)`
/// sends: a REQ socket, then `MDPC01 | service | "10" | action | JSON`.
#[test]
fn domogik_mqsyncreq_frames_reach_the_worker_without_the_timeout_frame() {
    let broker = Process::broker(&[]);
    let worker = raw_worker(&broker.endpoint, "dbmgr");
    let client = socket(zmq::REQ, &broker.endpoint);
    let config_get = r#"{"host": "igor", "plugin": "velbus", "key": "protocol"}"#;
    send(&client, &strings(&["MDPC01", "dbmgr", "10", "config.get", config_get]));
    let (address, body) = next_request(&worker, LIMIT);
    assert_eq!(body, strings(&["config.get", config_get]));
    send_reply(
        &worker,
        &address,
        &["config.result", r#"{"data": {"protocol": "serial"}}"#],
    );
    let reply = recv(&client, LIMIT);
    assert_eq!(&reply[..3], &strings(&["MDPC01", "dbmgr", "config.result"])[..]);
    assert_eq!(json_of(&reply[3]), json!({"data": {"protocol": "serial"}}));

    // Without a timeout, MQSyncReq sends str(None): still removed.
    send(
        &client,
        &strings(&["MDPC01", "dbmgr", "None", "config.get", config_get]),
    );
    let (address, body) = next_request(&worker, LIMIT);
    assert_eq!(body, strings(&["config.get", config_get]));
    send_reply(&worker, &address, &["config.result", "{}"]);
    assert_eq!(recv(&client, LIMIT)[2], "config.result");
}

/// Domogik's broker never answered a request for an unknown service.
#[test]
fn regression_unknown_service_answers_status_false_naming_the_service() {
    let broker = Process::broker(&[]);
    let client = socket(zmq::REQ, &broker.endpoint);
    send(
        &client,
        &strings(&["MDPC01", "nosuchplugin", "1", "plugin.start.do", "{}"]),
    );
    let reply = recv(&client, LIMIT);
    assert_eq!(reply[2], "plugin.start.result");
    let data = json_of(&reply[3]);
    assert_eq!(data["status"], json!(false));
    assert!(data["reason"].as_str().unwrap().contains("'nosuchplugin'"), "{data}");
}

/// Domogik's plugins gave up when they started before their service.
#[test]
fn regression_request_waits_for_a_service_that_starts_later() {
    let broker = Process::broker(&[]);
    let client = socket(zmq::REQ, &broker.endpoint);
    send(
        &client,
        &strings(&["MDPC01", "config", "15", "config.get", r#"{"key": "x"}"#]),
    );
    assert!(
        try_recv(&client, Duration::from_millis(200)).is_none(),
        "nobody can answer yet"
    );
    let _echo = Process::start(&["echo", "config", "--broker", &broker.endpoint]);
    let reply = recv(&client, LIMIT);
    assert_eq!(&reply[..3], &strings(&["MDPC01", "config", "config.result"])[..]);
    assert_eq!(json_of(&reply[3]), json!({"key": "x"}));
}

#[test]
fn regression_new_worker_drains_the_backlog_in_arrival_order() {
    let broker = Process::broker(&[]);
    let clients: Vec<zmq::Socket> = (0..5).map(|_| socket(zmq::DEALER, &broker.endpoint)).collect();
    for (i, client) in clients.iter().enumerate() {
        send(
            client,
            &strings(&["", "MDPC01", "late", "15", "n.get", &format!("{{\"n\": {i}}}")]),
        );
        // One at a time, so that "arrival order" is well defined.
        let start = Instant::now();
        while stats(&broker.endpoint)["services"]["late"]["queued"] != json!(i + 1) {
            assert!(start.elapsed() < LIMIT);
        }
    }
    let worker = raw_worker(&broker.endpoint, "late");
    for i in 0..5 {
        let (address, body) = next_request(&worker, LIMIT);
        assert_eq!(json_of(&body[1]), json!({"n": i}), "request {i} in order");
        send_reply(&worker, &address, &["n.result", &format!("{{\"n\": {i}}}")]);
    }
    for (i, client) in clients.iter().enumerate() {
        let reply = recv(client, LIMIT);
        assert_eq!(json_of(&reply[4]), json!({"n": i}));
    }
}

/// A plain RFC 7 worker (like the zguide's) does not heartbeat while busy.
/// Domogik's broker declared it dead and dropped its reply.
#[test]
fn regression_busy_worker_without_heartbeats_keeps_its_request() {
    // Liveness is 300 ms; the worker stays silent for 1.5 s.
    let broker = Process::broker(&["--heartbeat-ms", "100", "--liveness", "3"]);
    let worker = raw_worker(&broker.endpoint, "slow");
    let client = socket(zmq::REQ, &broker.endpoint);
    send(&client, &strings(&["MDPC01", "slow", "10", "work.do", "{}"]));
    let (address, _) = next_request(&worker, LIMIT);
    std::thread::sleep(Duration::from_millis(1500));
    send_reply(&worker, &address, &["work.result", r#"{"status": true, "reason": ""}"#]);
    let reply = recv(&client, LIMIT);
    assert_eq!(reply[2], "work.result");
    assert_eq!(json_of(&reply[3])["status"], json!(true));
}

/// A reply after the deadline is dropped and counted, never delivered to
/// the next request.
#[test]
fn late_reply_is_dropped_and_counted_not_misdelivered() {
    let broker = Process::broker(&[]);
    let worker = raw_worker(&broker.endpoint, "svc");
    let first = socket(zmq::REQ, &broker.endpoint);
    send(&first, &strings(&["MDPC01", "svc", "0.5", "first.do", "{}"]));
    let (first_address, _) = next_request(&worker, LIMIT);
    let expired = recv(&first, LIMIT);
    assert_eq!(json_of(&expired[3])["status"], json!(false));
    assert!(json_of(&expired[3])["reason"]
        .as_str()
        .unwrap()
        .contains("did not answer"));

    let second = socket(zmq::REQ, &broker.endpoint);
    send(&second, &strings(&["MDPC01", "svc", "10", "second.do", "{}"]));
    send_reply(&worker, &first_address, &["first.result", r#"{"who": "first"}"#]);
    let (second_address, body) = next_request(&worker, LIMIT);
    assert_eq!(body[0], "second.do");
    send_reply(&worker, &second_address, &["second.result", r#"{"who": "second"}"#]);
    let reply = recv(&second, LIMIT);
    assert_eq!(json_of(&reply[3]), json!({"who": "second"}));
    let stats = stats(&broker.endpoint);
    assert_eq!(stats["services"]["svc"]["late_replies"], json!(1));
    assert_eq!(stats["dropped"]["late_reply"], json!(1));
}

/// `kill -9` of a worker holding a request: the client gets a clear error at
/// its deadline, the dead worker is forgotten, and a new worker serves.
#[test]
fn worker_killed_with_sigkill_mid_request() {
    let broker = Process::broker(&["--heartbeat-ms", "100", "--liveness", "3"]);
    let hung = Process::start(&[
        "echo",
        "svc",
        "--delay-ms",
        "600000",
        "--heartbeat-ms",
        "100",
        "--broker",
        &broker.endpoint,
    ]);
    wait_for_service(&broker.endpoint, "svc", "200");
    let client = socket(zmq::REQ, &broker.endpoint);
    send(&client, &strings(&["MDPC01", "svc", "2", "x.do", "{}"]));
    let start = Instant::now();
    while stats(&broker.endpoint)["requests_in_flight"] != json!(1) {
        assert!(start.elapsed() < LIMIT);
    }
    hung.signal(libc::SIGKILL);
    let reply = recv(&client, LIMIT);
    let data = json_of(&reply[3]);
    assert_eq!(data["status"], json!(false));
    assert!(data["reason"].as_str().unwrap().contains("'svc'"), "{data}");
    wait_for_service(&broker.endpoint, "svc", "404");
    assert_eq!(stats(&broker.endpoint)["workers_expired"], json!(1));
    let _fresh = Process::start(&["echo", "svc", "--heartbeat-ms", "100", "--broker", &broker.endpoint]);
    wait_for_service(&broker.endpoint, "svc", "200");
    send(
        &client,
        &strings(&["MDPC01", "svc", "10", "x.get", r#"{"again": true}"#]),
    );
    let reply = recv(&client, LIMIT);
    assert_eq!(json_of(&reply[3]), json!({"again": true}));
    // Only the killed worker ever expired: the live ones never flapped.
    assert_eq!(stats(&broker.endpoint)["workers_expired"], json!(1));
}

#[test]
fn mmi_over_the_wire() {
    let broker = Process::broker(&[]);
    let _a = raw_worker(&broker.endpoint, "host1.onewire");
    let _b = raw_worker(&broker.endpoint, "manager");
    // Only asked for: RFC 8 says 404.
    let asker = socket(zmq::DEALER, &broker.endpoint);
    send(&asker, &strings(&["", "MDPC01", "ghost", "x"]));
    assert_eq!(
        mdp_request(&broker.endpoint, "mmi.service", &["ghost"]),
        strings(&["404"])
    );
    assert_eq!(
        mdp_request(&broker.endpoint, "mmi.service", &["manager"]),
        strings(&["200"])
    );
    assert_eq!(
        mdp_request(&broker.endpoint, "mmi.services", &[]),
        strings(&["host1.onewire, manager"])
    );
    assert_eq!(
        mdp_request(&broker.endpoint, "mmi.discovery", &["onewire$"]),
        strings(&["host1.onewire"])
    );
    assert_eq!(mdp_request(&broker.endpoint, "mmi.whatever", &[]), strings(&["501"]));
}

/// Every kind of bad message we could think of; after all of them the
/// broker still serves, and each was counted under its reason.
#[test]
fn bad_input_is_dropped_counted_and_the_broker_keeps_serving() {
    let broker = Process::broker(&["--max-frames", "16", "--max-message-bytes", "65536"]);
    let endpoint = &broker.endpoint;
    let _echo = Process::start(&["echo", "echo", "--broker", endpoint]);
    wait_for_service(endpoint, "echo", "200");
    let big = vec![b'x'; 70_000];
    let many: Vec<&[u8]> = vec![b"f"; 40];
    let mut with_delimiter = vec![&b""[..], b"MDPC01", b"echo"];
    with_delimiter.extend(many.iter().copied());
    let invalid_utf8_service: &[u8] = b"\xff\xfe";
    // (what is sent from a DEALER, the counter it must land in; None when
    // it must only not hurt)
    let rows: Vec<(Vec<Bytes>, Option<&str>)> = vec![
        (frames(&[b"hello"]), Some("missing_delimiter")),
        (frames(&[b"", b"HTTP/1.1"]), Some("unknown_header")),
        (frames(&[b""]), Some("unknown_header")),
        (frames(&[b"", b"MDPC01"]), Some("missing_service")),
        (frames(&[b"", b"MDPC01", b"", b"x"]), Some("bad_service_name")),
        (frames(&[b"", b"MDPW01"]), Some("missing_command")),
        (frames(&[b"", b"MDPW01", b"\x07"]), Some("unknown_command")),
        (frames(&[b"", b"MDPW01", b"READY"]), Some("unknown_command")),
        (
            frames(&[b"", b"MDPW01", b"\x02", b"c", b"", b"x"]),
            Some("unknown_command"),
        ),
        (frames(&[b"", b"MDPW01", b"\x01"]), Some("bad_ready")),
        (frames(&[b"", b"MDPW01", b"\x01", b"a", b"b"]), Some("bad_ready")),
        (
            frames(&[b"", b"MDPW01", b"\x01", b"mmi.service"]),
            Some("reserved_service"),
        ),
        (frames(&[b"", b"MDPW01", b"\x03", b"c"]), Some("bad_reply")),
        (frames(&[b"", b"MDPW01", b"\x04", b"extra"]), Some("trailing_frames")),
        (
            frames(&[b"", b"MDPW01", b"\x04"]),
            Some("heartbeat_from_unknown_worker"),
        ),
        (
            frames(&[b"", b"MDPW01", b"\x03", b"c", b"", b"x"]),
            Some("reply_from_unknown_worker"),
        ),
        (
            frames(&[b"a", b"b", b"c", b"d", b"", b"MDPC01", b"echo", b"x"]),
            Some("envelope_too_long"),
        ),
        (frames(&with_delimiter), Some("oversized")),
        (
            frames(&[b"", b"MDPC01", b"mmi.discovery", b"(("]),
            Some("bad_discovery_pattern"),
        ),
        (frames(&[b"", b"MDPC01", invalid_utf8_service, b"x.get", b"{}"]), None),
        (frames(&[b"", b"MDPC01", b"echo", b"not json", b"{"]), None),
        // One frame over the socket's limit: libzmq closes that connection.
        (frames(&[b"", b"MDPC01", b"echo", &big]), None),
    ];
    for (message, _) in &rows {
        let dealer = socket(zmq::DEALER, endpoint);
        send(&dealer, message);
        // Every message that gets a DISCONNECT or an answer gets it on this
        // socket; what matters is that the broker is still there.
        assert_eq!(
            mdp_request(endpoint, "echo", &["still", "here"]),
            strings(&["still", "here"])
        );
    }
    let dropped = &stats(endpoint)["dropped"];
    for (message, reason) in &rows {
        if let Some(reason) = reason {
            assert!(
                dropped[reason].as_u64().unwrap_or(0) >= 1,
                "{reason} not counted for {message:?}: {dropped}"
            );
        }
    }
    // A garbage-only ROUTER peer and a PUB socket are not MDP peers at all.
    let router = socket(zmq::ROUTER, endpoint);
    drop(router);
    let status = run(&["status", "--broker", endpoint]);
    assert!(status.status.success());
}

#[test]
fn sigterm_stops_the_broker_cleanly() {
    let mut broker = Process::broker(&[]);
    let worker = raw_worker(&broker.endpoint, "svc");
    broker.signal(libc::SIGTERM);
    let status = broker.wait_exit(LIMIT).expect("the broker exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // Workers are told to go, so they reconnect at once to the next broker.
    let start = Instant::now();
    loop {
        let message = recv(&worker, LIMIT.saturating_sub(start.elapsed()));
        if message[2] == "\x05" {
            break;
        }
    }
}

#[test]
fn up_starts_the_broker_and_an_echo_service() {
    let data = tempfile::tempdir().unwrap();
    let (mut up, lines) = Process::up(data.path(), &[], 1);
    up.endpoint = last_word(&lines[0]);
    wait_for_service(&up.endpoint, "echo", "200");
    let out = run(&[
        "call",
        "echo",
        "ping.get",
        r#"{"hello": "world"}"#,
        "--broker",
        &up.endpoint,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("ping.result\n"), "{stdout}");
    assert!(stdout.contains("\"hello\": \"world\""), "{stdout}");
    up.signal(libc::SIGINT);
    assert!(up.wait_exit(LIMIT).expect("up exits on SIGINT").success());
}

#[test]
fn cli_errors_are_one_clear_line_and_a_failure_code() {
    let broker = Process::broker(&[]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["call", "echo", "a.get", "{bad", "--broker", &broker.endpoint],
            "not valid JSON",
        ),
        (
            vec!["call", "echo", "a.get", "[1, 2]", "--broker", &broker.endpoint],
            "must be an object",
        ),
        (vec!["call", "echo", "--broker", &broker.endpoint], "missing ACTION"),
        (
            vec!["call", "echo", "a.get", "--timeout", "0", "--broker", &broker.endpoint],
            "--timeout",
        ),
        (
            vec![
                "call",
                "echo",
                "a.get",
                "--timeout",
                "1",
                "--broker",
                "tcp://127.0.0.1:1",
            ],
            "nothing is listening",
        ),
        (
            vec!["call", "echo", "a.get", "--broker", "nonsense"],
            "invalid broker endpoint",
        ),
        (
            vec![
                "call",
                "nobody",
                "a.get",
                "--timeout",
                "0.5",
                "--broker",
                &broker.endpoint,
            ],
            "no worker for service 'nobody'",
        ),
        (
            vec![
                "call",
                "nobody",
                "--raw",
                "x",
                "--timeout",
                "0.5",
                "--broker",
                &broker.endpoint,
            ],
            "no reply from service 'nobody'",
        ),
        (vec!["broker", "--bind", &broker.endpoint], "cannot listen on"),
    ];
    for (args, expected) in cases {
        let out = run(&args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, got {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn status_shows_services_and_counters() {
    let broker = Process::broker(&[]);
    let _echo = Process::start(&["echo", "echo", "--broker", &broker.endpoint]);
    wait_for_service(&broker.endpoint, "echo", "200");
    assert_eq!(mdp_request(&broker.endpoint, "echo", &["x"]), strings(&["x"]));
    let out = run(&["status", "--broker", &broker.endpoint]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let echo_line = stdout
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let columns: Vec<&str> = echo_line.split_whitespace().collect();
    // SERVICE WORKERS IDLE QUEUED REQUESTS REPLIES …
    assert_eq!(&columns[..6], &["echo", "1", "1", "0", "1", "1"], "{stdout}");
    assert!(stdout.contains("dropped messages: none"), "{stdout}");
}

/// A client that named 100,000 services in under a second once filled the
/// service table for five minutes: a new worker's READY got DISCONNECT.
/// Services without a worker are now evicted, oldest first, to make room.
#[test]
fn a_flood_of_service_names_never_locks_out_a_new_worker() {
    let broker = Process::broker(&[]);
    const NAMES: usize = 30_000;
    flood_service_names(&broker.endpoint, NAMES);
    let counters = stats(&broker.endpoint);
    assert!(
        counters["services_evicted"].as_u64().unwrap() >= (NAMES - 1_000) as u64,
        "{counters}"
    );
    assert_eq!(counters["dropped"].get("too_many_services"), None, "{counters}");

    // A new worker is registered and served at once.
    let worker = raw_worker(&broker.endpoint, "fresh");
    let client = socket(zmq::DEALER, &broker.endpoint);
    send(&client, &strings(&["", "MDPC01", "fresh", "hello"]));
    let (address, body) = next_request(&worker, LIMIT);
    assert_eq!(body, strings(&["hello"]));
    send_reply(&worker, &address, &["world"]);
    assert_eq!(recv(&client, LIMIT)[3], "world");
    let counters = stats(&broker.endpoint);
    assert!(
        counters["services"].as_object().unwrap().len() <= 1_001 + 1,
        "{counters}"
    );
}
