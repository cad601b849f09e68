//! The event forwarder as its users see it: Domogik's pub/sub frames through
//! a real `majordome forwarder`, the library, and `majordome pub`/`sub`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use majordome_client::{Publisher, Subscriber};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(20);

/// A running forwarder: (process, where publishers connect, where
/// subscribers connect).
fn forwarder(extra: &[&str]) -> (Process, String, String) {
    let args = [
        &[
            "forwarder",
            "--pub-bind",
            "tcp://127.0.0.1:0",
            "--sub-bind",
            "tcp://127.0.0.1:0",
        ],
        extra,
    ]
    .concat();
    let (process, lines) = Process::start_reading(&args, 2);
    (process, last_word(&lines[0]), last_word(&lines[1]))
}

fn sub_socket(endpoint: &str, prefix: &str) -> zmq::Socket {
    let socket = socket(zmq::SUB, endpoint);
    socket.set_subscribe(prefix.as_bytes()).unwrap();
    socket
}

/// Publishes `frames` every 20 ms until `subscriber` gets a message (the
/// subscription must first travel to the publisher), and returns it.
fn publish_until_received(publisher: &zmq::Socket, subscriber: &zmq::Socket, frames: &[Bytes]) -> Vec<Bytes> {
    let start = Instant::now();
    loop {
        send(publisher, frames);
        if let Some(message) = try_recv(subscriber, Duration::from_millis(20)) {
            return message;
        }
        assert!(start.elapsed() < LIMIT, "the event never came through");
    }
}

#[test]
fn domogik_events_pass_through_unchanged_and_prefixes_filter() {
    let (_forwarder, publish_at, subscribe_at) = forwarder(&[]);
    let status = sub_socket(&subscribe_at, "plugin.status");
    let clients = sub_socket(&subscribe_at, "clients.list");
    let publisher = socket(zmq::PUB, &publish_at);
    // Exactly what a Domogik plugin publishes on start (seed 001).
    let event = strings(&[
        "plugin.status.1371476851_54.0_1",
        r#"{"type": "plugin", "id": "diskfree", "host": "darkstar", "event": "starting"}"#,
    ]);
    assert_eq!(publish_until_received(&publisher, &status, &event), event);
    assert!(
        try_recv(&clients, Duration::from_millis(200)).is_none(),
        "clients.list subscribers get no plugin.status"
    );
    let list = strings(&[
        "clients.list.1371071554_16.0_1",
        r#"{"domogik-diskfree.darkstar": {"status": "unknown"}}"#,
    ]);
    assert_eq!(publish_until_received(&publisher, &clients, &list), list);
}

#[test]
fn malformed_events_are_forwarded_but_the_library_skips_and_counts_them() {
    let (_forwarder, publish_at, subscribe_at) = forwarder(&[]);
    let mut subscriber = Subscriber::connect(&subscribe_at, &[]).unwrap();
    let publisher = socket(zmq::PUB, &publish_at);
    let start = Instant::now();
    // Probe until the path is open.
    loop {
        send(&publisher, &strings(&["probe.1_0.0_1", "{}"]));
        if subscriber.recv(Duration::from_millis(20)).unwrap().is_some() {
            break;
        }
        assert!(start.elapsed() < LIMIT);
    }
    send(&publisher, &strings(&["just one frame"]));
    send(&publisher, &strings(&["bad.1_0.0_1", "{not json"]));
    send(&publisher, &strings(&["a", "b", "c"]));
    send(&publisher, &strings(&["done.1_0.0_1", r#"{"last": true}"#]));
    loop {
        let event = subscriber.recv(LIMIT).unwrap().expect("the last event");
        if event.category == "done" {
            assert_eq!(event.data, json!({"last": true}));
            break;
        }
    }
    assert_eq!(subscriber.malformed(), 3);
}

/// A subscriber that never reads loses what passes its queue; the others
/// get every event, in order.
#[test]
fn a_slow_subscriber_does_not_slow_the_others() {
    const HWM: usize = 100;
    const BATCH: usize = 20; // well under the HWM: a fast reader never overflows
    const BATCHES: usize = 250;
    let (_forwarder, publish_at, subscribe_at) = forwarder(&["--event-high-water-mark", &HWM.to_string()]);
    let stuck = majordome_net::context().socket(zmq::SUB).unwrap();
    stuck.set_rcvhwm(10).unwrap();
    // A fixed kernel buffer (no autotuning), so that what the stuck reader
    // can hold is small next to what is published.
    stuck.set_rcvbuf(64 * 1024).unwrap();
    stuck.set_linger(0).unwrap();
    stuck.connect(&subscribe_at).unwrap();
    stuck.set_subscribe(b"").unwrap();
    let mut fast = Subscriber::connect(&subscribe_at, &["sensor"]).unwrap();
    let mut publisher = Publisher::connect(&publish_at).unwrap();
    // The stuck subscriber's "" matches everything, so a subscription seen
    // at the publisher does not prove that `fast`'s has arrived: probe
    // until `fast` itself gets one.
    let start = Instant::now();
    loop {
        publisher.publish("sensor.probe", &json!({})).unwrap();
        if fast.recv(Duration::from_millis(20)).unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the fast subscription never reached the publisher"
        );
    }
    // 8 KB events, 40 MB in all: far more than the stuck reader's queues
    // and socket buffers can hold.
    let padding = "x".repeat(8 * 1024);
    for batch in 0..BATCHES {
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            publisher
                .publish("sensor.value", &json!({"n": n, "pad": padding}))
                .unwrap();
        }
        let mut i = 0;
        while i < BATCH {
            let event = fast.recv(LIMIT).unwrap().expect("the fast subscriber gets every event");
            if event.category == "sensor.probe" {
                continue; // probes still in flight when the path opened
            }
            assert_eq!(event.data["n"], json!(batch * BATCH + i));
            i += 1;
        }
    }
    // The stuck subscriber now reads what it was left: far from everything.
    let mut kept = 0;
    while try_recv(&stuck, Duration::from_millis(500)).is_some() {
        kept += 1;
    }
    assert!(kept < BATCH * BATCHES / 2, "the stuck subscriber kept {kept} events");
}

#[test]
fn pub_and_sub_commands() {
    let (_forwarder, publish_at, subscribe_at) = forwarder(&[]);
    let mut sub = majordome()
        .args(["sub", "plugin.", "--count", "1", "--endpoint", &subscribe_at])
        .env("MAJORDOME_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run(&[
        "pub",
        "plugin.status",
        r#"{"event": "alive"}"#,
        "--endpoint",
        &publish_at,
        "--wait",
        "20",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "delivered without a note: {out:?}");
    let stdout = sub.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = line_rx.recv_timeout(LIMIT).expect("sub prints the event");
    let fields: Vec<&str> = line.splitn(3, ' ').collect();
    assert!(fields[0].parse::<f64>().is_ok(), "a time first: {line}");
    assert_eq!(fields[1], "plugin.status");
    assert_eq!(fields[2].trim(), r#"{"event":"alive"}"#);
    let mut sub = Process {
        child: sub,
        endpoint: String::new(),
    };
    assert!(sub.wait_exit(LIMIT).expect("sub exits after --count events").success());

    // Nobody listening: said plainly, not an error.
    let out = run(&["pub", "nobody.cares", "{}", "--endpoint", &publish_at, "--wait", "0.3"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nobody subscribed to 'nobody.cares'"),
        "{out:?}"
    );
    // Bad input: one line, exit 1.
    let out = run(&["pub", "x.y", "{bad", "--endpoint", &publish_at]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: the JSON argument is not valid JSON"));
}

/// `majordome sub` stopped by SIGTERM printed "Error: ZeroMQ error:
/// Interrupted system call" and exited 1: the signal interrupts its wait.
#[test]
fn regression_sub_leaves_quietly_on_sigterm() {
    let (_forwarder, publish_at, subscribe_at) = forwarder(&[]);
    let mut sub = majordome()
        .args(["sub", "plugin.", "--endpoint", &subscribe_at])
        .env("MAJORDOME_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has printed an event, it is in its receive loop.
    let out = run(&["pub", "plugin.status", "{}", "--endpoint", &publish_at, "--wait", "20"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let mut line = String::new();
    BufReader::new(sub.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("plugin.status"), "{line}");
    let mut stderr = sub.stderr.take().unwrap();
    let mut sub = Process {
        child: sub,
        endpoint: String::new(),
    };
    sub.signal(libc::SIGTERM);
    let status = sub.wait_exit(LIMIT).expect("sub exits on SIGTERM");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    assert!(status.success(), "{status:?}: {said}");
    assert_eq!(said, "", "nothing on stderr");
}

#[test]
fn up_serves_events_and_their_counters() {
    let data = tempfile::tempdir().unwrap();
    // No plugin, so that the only event is the test's own.
    let (mut up, lines) = Process::up(data.path(), &["--no-autostart"], 4);
    let (broker, publish_at, subscribe_at) = (last_word(&lines[0]), last_word(&lines[2]), last_word(&lines[3]));
    let mut subscriber = Subscriber::connect(&subscribe_at, &["device"]).unwrap();
    let mut publisher = Publisher::connect(&publish_at).unwrap();
    assert!(publisher.wait_for_subscriber("device.update", LIMIT).unwrap());
    publisher.publish("device.update", &json!({"id": 1})).unwrap();
    assert_eq!(subscriber.recv(LIMIT).unwrap().unwrap().category, "device.update");
    wait_for_service(&broker, "events", "200");
    let out = run(&["call", "events", "stats.get", "--broker", &broker]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stats: serde_json::Value = serde_json::from_str(stdout.split_once('\n').unwrap().1).unwrap();
    assert_eq!(stats["messages"], json!(1));
    // Ours, the manager's `plugin.status` and `plugin.configuration`, the
    // device service's `event.` and `client.sensor`, and the HTTP
    // gateway's (everything); theirs may still be on their way.
    let subscriptions = stats["subscriptions"].as_u64().unwrap();
    assert!((1..=6).contains(&subscriptions), "{stats}");
    up.signal(libc::SIGTERM);
    assert!(up.wait_exit(LIMIT).expect("up exits").success());
}
