//! `kill -9` in the middle of a burst of Titanic requests and Clone
//! updates, then a restart on the same data folder: every request that got
//! `200` is there and gets executed, every update a subscriber saw
//! published is in the snapshot, and sequence numbers never go backwards.
//!
//! Everything here speaks raw frames (RFC 7, 9 and 12), as a client
//! written with any ZeroMQ binding would.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// `majordome up` on free ports with its data in `data`.
struct Up {
    process: Process,
    broker: String,
    snapshot: String,
    updates: String,
    collector: String,
}

fn up(data: &std::path::Path) -> Up {
    let (process, lines) = Process::up(data, &["--no-autostart"], 7);
    let last = |i: usize| last_word(&lines[i]);
    assert!(lines[4].contains("state: snapshots"), "{lines:?}");
    Up {
        process,
        broker: last(0),
        snapshot: last(4),
        updates: last(5),
        collector: last(6),
    }
}

fn sequence(frame: &Bytes) -> i64 {
    i64::from_be_bytes(frame.as_ref().try_into().expect("an 8-byte sequence"))
}

/// A KVSET as the zguide's clients send it: sequence 0, a 16-byte uuid.
fn kvset(key: &str, value: &str, n: u64) -> Vec<Bytes> {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&n.to_be_bytes());
    vec![
        Bytes::copy_from_slice(key.as_bytes()),
        Bytes::copy_from_slice(&0i64.to_be_bytes()),
        Bytes::copy_from_slice(&uuid),
        Bytes::new(),
        Bytes::copy_from_slice(value.as_bytes()),
    ]
}

/// The whole state: key → (sequence, value), and KTHXBAI's sequence.
fn snapshot(endpoint: &str) -> (BTreeMap<String, (i64, Bytes)>, i64) {
    let dealer = socket(zmq::DEALER, endpoint);
    send(&dealer, &strings(&["ICANHAZ?", ""]));
    let mut state = BTreeMap::new();
    loop {
        let message = recv(&dealer, LIMIT);
        assert_eq!(message.len(), 5, "{message:?}");
        if message[0].as_ref() == b"KTHXBAI" {
            return (state, sequence(&message[1]));
        }
        let key = String::from_utf8(message[0].to_vec()).unwrap();
        state.insert(key, (sequence(&message[1]), message[4].clone()));
    }
}

/// One raw MDP request with a bounded wait; `None` if nothing came back
/// (the server was killed).
fn try_request(dealer: &zmq::Socket, service: &str, body: &[&str], limit: Duration) -> Option<Vec<Bytes>> {
    let mut message = strings(&["", "MDPC01", service]);
    message.extend(strings(body));
    send(dealer, &message);
    let reply = try_recv(dealer, limit)?;
    Some(reply[3..].to_vec())
}

#[test]
fn kill_9_mid_burst_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let first = up(data.path());
    wait_for_service(&first.broker, "titanic.request", "200");
    wait_for_service(&first.broker, "echo", "200");

    // Watch what the server publishes, as any subscriber would.
    let watcher = socket(zmq::SUB, &first.updates);
    watcher.set_subscribe(b"/crash/").unwrap();
    let writer = socket(zmq::PUB, &first.collector);
    // The collector's subscription must reach our PUB before anything we
    // send is kept: probe until a KVPUB comes back.
    let start = Instant::now();
    loop {
        send(&writer, &kvset("/crash/probe", "1", 0));
        if try_recv(&watcher, Duration::from_millis(50)).is_some() {
            break;
        }
        assert!(start.elapsed() < LIMIT, "the Clone server never published");
    }

    let stop = Arc::new(AtomicBool::new(false));
    // Updates seen published: key → (sequence, value).
    let seen = Arc::new(Mutex::new(BTreeMap::<String, (i64, Bytes)>::new()));
    let max_seen = Arc::new(Mutex::new(0i64));
    let state_thread = {
        let (stop, seen, max_seen) = (stop.clone(), seen.clone(), max_seen.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Bursts of 50, then read what came back.
                for _ in 0..50 {
                    n += 1;
                    send(&writer, &kvset(&format!("/crash/k{n}"), &format!("v{n}"), n));
                }
                while let Some(message) = try_recv(&watcher, Duration::from_millis(5)) {
                    let sequence = sequence(&message[1]);
                    let mut max = max_seen.lock().unwrap();
                    assert!(sequence > *max, "sequence numbers strictly increase");
                    *max = sequence;
                    let key = String::from_utf8(message[0].to_vec()).unwrap();
                    seen.lock().unwrap().insert(key, (sequence, message[4].clone()));
                }
            }
        })
    };

    // Titanic requests: half for `echo` (running), half for `later` (no
    // worker yet, so they are still pending when the server dies).
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let titanic_thread = {
        let (stop, acknowledged, broker) = (stop.clone(), acknowledged.clone(), first.broker.clone());
        std::thread::spawn(move || {
            let mut dealer = socket(zmq::DEALER, &broker);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let service = if n % 2 == 0 { "echo" } else { "later" };
                let body = format!("job-{n}");
                match try_request(&dealer, "titanic.request", &[service, &body], Duration::from_secs(2)) {
                    Some(reply) if reply[0].as_ref() == b"200" => {
                        let uuid = String::from_utf8(reply[1].to_vec()).unwrap();
                        acknowledged.lock().unwrap().push((uuid, body));
                    }
                    Some(reply) => panic!("titanic.request answered {reply:?}"),
                    // Killed: a reply may still be on its way; use a fresh
                    // socket so it cannot be taken for the next answer.
                    None => dealer = socket(zmq::DEALER, &broker),
                }
            }
        })
    };

    // Kill once both bursts are well under way.
    let start = Instant::now();
    while seen.lock().unwrap().len() < 500 || acknowledged.lock().unwrap().len() < 100 {
        assert!(start.elapsed() < LIMIT, "the bursts did not get going");
        std::thread::sleep(Duration::from_millis(10));
    }
    first.process.signal(libc::SIGKILL);
    let mut first = first;
    first.process.wait_exit(LIMIT).expect("killed");
    // Whatever was in flight is now answered by nobody; stop the bursts.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    state_thread.join().unwrap();
    titanic_thread.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let max_seen = *max_seen.lock().unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();

    let second = up(data.path());
    // Clone: every update seen is in the snapshot, sequences continue.
    let (state, kthxbai) = snapshot(&second.snapshot);
    assert!(kthxbai >= max_seen, "KTHXBAI {kthxbai} went back before {max_seen}");
    for (key, (sequence, value)) in &seen {
        let (kept_sequence, kept_value) = state
            .get(key)
            .unwrap_or_else(|| panic!("{key} was published, then lost"));
        // A later change may have been committed and published unseen
        // (the probe is set more than once); never an older one.
        assert!(kept_sequence >= sequence, "{key}: {kept_sequence} < {sequence}");
        if kept_sequence == sequence {
            assert_eq!(kept_value, value, "{key}");
        }
    }
    let watcher = socket(zmq::SUB, &second.updates);
    watcher.set_subscribe(b"/crash/after").unwrap();
    let writer = socket(zmq::PUB, &second.collector);
    let start = Instant::now();
    let after = loop {
        send(&writer, &kvset("/crash/after", "1", 1 << 40));
        if let Some(message) = try_recv(&watcher, Duration::from_millis(50)) {
            break sequence(&message[1]);
        }
        assert!(start.elapsed() < LIMIT, "the restarted server never published");
    };
    assert!(after > kthxbai, "a new update got {after}, not above {kthxbai}");

    // Titanic: every acknowledged request is there; once `later` has a
    // worker, every one of them completes with its echo.
    let _later = Process::start(&["echo", "later", "--broker", &second.broker]);
    let dealer = socket(zmq::DEALER, &second.broker);
    for (uuid, body) in &acknowledged {
        let start = Instant::now();
        loop {
            let reply = try_request(&dealer, "titanic.reply", &[uuid], LIMIT).expect("titanic.reply answers");
            match reply[0].as_ref() {
                b"200" => {
                    assert_eq!(reply[1..], strings(&[body])[..], "{uuid}");
                    break;
                }
                b"300" => {}
                other => panic!("{uuid} acknowledged, then {:?}", String::from_utf8_lossy(other)),
            }
            assert!(start.elapsed() < LIMIT, "{uuid} never completed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(!acknowledged.is_empty() && !seen.is_empty());
}
