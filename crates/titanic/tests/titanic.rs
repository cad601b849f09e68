//! Titanic with a real broker, real workers and a real database: the
//! RFC 9 cycle, durability across a restart, no concurrent duplicates, and
//! bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_broker::Broker;
use majordome_client::{Client, ClientOptions, Frames, Message, Worker, WorkerOptions};
use majordome_net::Shutdown;
use majordome_titanic::{client, ReplyStatus, Settings, Titanic};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

/// Threads that stop together.
struct Running {
    shutdown: Shutdown,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    fn new() -> Running {
        Running {
            shutdown: Shutdown::new().unwrap(),
            threads: Vec::new(),
        }
    }

    fn spawn(&mut self, f: impl FnOnce(Shutdown) + Send + 'static) {
        let stop = self.shutdown.clone();
        self.threads.push(thread::spawn(move || f(stop)));
    }

    fn stop(mut self) {
        self.shutdown.trigger();
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
    }
}

fn broker(running: &mut Running) -> String {
    let broker = Broker::bind("tcp://127.0.0.1:0", majordome_broker::Settings::default()).unwrap();
    let endpoint = broker.endpoint().to_owned();
    running.spawn(move |stop| broker.run(&stop).unwrap());
    endpoint
}

fn titanic(running: &mut Running, broker: &str, database: &Path, settings: Settings) {
    let titanic = Titanic::start(broker, database, settings).unwrap();
    running.spawn(move |stop| titanic.run(&stop).unwrap());
}

fn worker<H>(running: &mut Running, broker: &str, service: &str, handler: H)
where
    H: FnMut(Frames) -> Frames + Send + 'static,
{
    let worker = Worker::new(broker, service, WorkerOptions::default());
    running.spawn(move |stop| worker.run(handler, &stop).unwrap());
}

fn client_for(broker: &str) -> Client {
    Client::new(
        broker,
        ClientOptions {
            timeout: LIMIT,
            ..ClientOptions::default()
        },
    )
}

fn frames(parts: &[&str]) -> Frames {
    parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
}

fn database(dir: &tempfile::TempDir) -> PathBuf {
    majordome_store::database_path(dir.path())
}

/// Asks `titanic.reply` until it is not pending (bounded).
fn wait_done(client_: &mut Client, uuid: &str) -> Frames {
    let start = Instant::now();
    loop {
        match client::reply(client_, uuid).unwrap() {
            ReplyStatus::Done(reply) => return reply,
            ReplyStatus::Pending => assert!(start.elapsed() < LIMIT, "{uuid} never completed"),
            ReplyStatus::Unknown => panic!("{uuid} is unknown"),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Settings with short backoffs, for tests.
fn quick() -> Settings {
    Settings {
        retry_backoff: Duration::from_millis(50),
        service_backoff: Duration::from_millis(20),
        max_service_backoff: Duration::from_millis(200),
        ..Settings::default()
    }
}

#[test]
fn a_request_waits_for_its_service_then_completes_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    titanic(&mut running, &endpoint, &database(&dir), quick());
    let mut c = client_for(&endpoint);
    let uuid = client::request(&mut c, "lights", frames(&["on", "kitchen"])).unwrap();
    assert_eq!(uuid.len(), 32);
    assert!(uuid.bytes().all(|b| b.is_ascii_hexdigit()));
    // No worker yet: pending, and listed as such.
    assert_eq!(client::reply(&mut c, &uuid).unwrap(), ReplyStatus::Pending);
    let listed = client::list(&mut c).unwrap();
    assert!(listed
        .iter()
        .any(|e| e.uuid == uuid && e.state == "pending" && e.service == "lights"));
    // The service comes up: the request reaches it unchanged.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    worker(&mut running, &endpoint, "lights", move |body| {
        log.lock().unwrap().push(body.clone());
        frames(&["done"])
    });
    assert_eq!(wait_done(&mut c, &uuid), frames(&["done"]));
    assert_eq!(*seen.lock().unwrap(), vec![frames(&["on", "kitchen"])]);
    // reply is idempotent; uppercase uuids are the same request.
    assert_eq!(
        client::reply(&mut c, &uuid.to_uppercase()).unwrap(),
        ReplyStatus::Done(frames(&["done"]))
    );
    client::close(&mut c, &uuid).unwrap();
    assert_eq!(client::reply(&mut c, &uuid).unwrap(), ReplyStatus::Unknown);
    // close is idempotent, also for uuids never seen.
    client::close(&mut c, &uuid).unwrap();
    client::close(&mut c, "0123456789abcdef0123456789abcdef").unwrap();
    running.stop();
}

/// Every 200 is durable: a new Titanic on the same database runs them all,
/// each once.
#[test]
fn acknowledged_requests_survive_a_restart_and_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    let mut first = Running::new();
    titanic(&mut first, &endpoint, &database(&dir), quick());
    let mut c = client_for(&endpoint);
    let uuids: Vec<(String, String)> = (0..200)
        .map(|i| {
            let body = format!("job-{i}");
            (client::request(&mut c, "later", frames(&[&body])).unwrap(), body)
        })
        .collect();
    first.stop();
    titanic(&mut running, &endpoint, &database(&dir), quick());
    let runs = Arc::new(Mutex::new(HashMap::<Frames, usize>::new()));
    let counter = runs.clone();
    worker(&mut running, &endpoint, "later", move |body| {
        *counter.lock().unwrap().entry(body.clone()).or_default() += 1;
        body
    });
    for (uuid, body) in &uuids {
        assert_eq!(wait_done(&mut c, uuid), frames(&[body]));
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 200);
    assert!(runs.values().all(|n| *n == 1), "each request ran once: {runs:?}");
    running.stop();
}

/// Per request id: (copies running now, most at once, runs in all).
type Runs = Arc<Mutex<HashMap<String, (u32, u32, u32)>>>;

/// A handler that keeps [`Runs`] for each request (its id read by `id`);
/// the first run of each request takes `first_run` and says so on
/// `started`; the reply is `reply(id, body)`.
fn tracking(
    runs: Runs,
    first_run: Duration,
    started: Option<std::sync::mpsc::Sender<()>>,
    id: fn(&Frames) -> String,
    reply: fn(&str, Frames) -> Frames,
) -> impl FnMut(Frames) -> Frames + Send + 'static {
    move |body| {
        let id = id(&body);
        let first = {
            let mut runs = runs.lock().unwrap();
            let entry = runs.entry(id.clone()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
            entry.2 += 1;
            entry.2 == 1
        };
        if first {
            if let Some(started) = &started {
                let _ = started.send(());
            }
            thread::sleep(first_run);
        }
        runs.lock().unwrap().get_mut(&id).unwrap().0 -= 1;
        reply(&id, body)
    }
}

/// The zguide's Titanic resends while the first copy still runs. Here the
/// first run of each request outlasts its deadline; the retry waits until
/// that worker is done, so no request ever runs twice at once.
#[test]
fn a_slow_service_never_runs_a_request_twice_at_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    let settings = Settings {
        attempt_timeout: Duration::from_millis(300),
        ..quick()
    };
    titanic(&mut running, &endpoint, &database(&dir), settings);
    let state = Runs::default();
    for _ in 0..2 {
        let handler = tracking(
            state.clone(),
            Duration::from_millis(800),
            None,
            |body| {
                Message::from_frames(body).unwrap().data["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            },
            |id, _| Message::new("work.result", json!({"id": id, "status": true})).to_frames(),
        );
        worker(&mut running, &endpoint, "slow", handler);
    }
    let mut c = client_for(&endpoint);
    // One at a time, so that the other worker is idle when the retry comes:
    // sent to it at once, the request would run twice at the same time.
    for i in 0..2 {
        let body = Message::new("work.do", json!({"id": format!("r{i}")})).to_frames();
        let uuid = client::request(&mut c, "slow", body).unwrap();
        let reply = Message::from_frames(&wait_done(&mut c, &uuid)).unwrap();
        assert_eq!(
            reply.status(),
            Some(true),
            "the service's answer, not the broker's expiry: {reply:?}"
        );
    }
    let state = state.lock().unwrap();
    assert_eq!(state.len(), 2);
    for (id, (_, most, runs)) in state.iter() {
        assert_eq!(*most, 1, "{id} ran {most} times at once");
        assert!(*runs >= 2, "{id}: its first run was too slow, so it ran again");
    }
    running.stop();
}

#[test]
fn bad_input_gets_rfc_status_codes_and_titanic_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    titanic(
        &mut running,
        &endpoint,
        &database(&dir),
        Settings {
            max_request_bytes: 1000,
            ..quick()
        },
    );
    let mut c = client_for(&endpoint);
    let big = "x".repeat(2000);
    let cases: &[(&str, Frames, &str)] = &[
        ("titanic.request", vec![], "400"),
        ("titanic.request", frames(&[""]), "400"),
        ("titanic.request", frames(&["svc"]), "400"),
        ("titanic.request", frames(&["", "x"]), "400"),
        ("titanic.request", vec![Bytes::from_static(&[0xff, 0xfe])], "400"),
        ("titanic.request", frames(&[&"s".repeat(300)]), "400"),
        ("titanic.request", frames(&["titanic.request", "x"]), "400"),
        ("titanic.request", frames(&["mmi.service", "x"]), "400"),
        ("titanic.request", frames(&["svc", &big]), "400"),
        ("titanic.reply", vec![], "400"),
        ("titanic.reply", frames(&["a", "b"]), "400"),
        ("titanic.reply", frames(&["not-a-uuid"]), "400"),
        ("titanic.reply", frames(&["0123456789abcdef0123456789abcdeg"]), "400"),
        ("titanic.reply", frames(&["0123456789abcdef0123456789abcdef"]), "400"),
        ("titanic.close", vec![], "400"),
        ("titanic.close", frames(&["short"]), "400"),
    ];
    for (service, body, want) in cases {
        let reply = c.request(service, body.clone()).unwrap();
        let status = String::from_utf8_lossy(&reply[0]).into_owned();
        assert!(status.starts_with(want), "{service} {body:?}: {status}");
    }
    // Still serving.
    worker(&mut running, &endpoint, "svc", |body| body);
    let uuid = client::request(&mut c, "svc", frames(&["ok"])).unwrap();
    assert_eq!(wait_done(&mut c, &uuid), frames(&["ok"]));
    running.stop();
}

/// Titanic stops while a worker still runs one of its requests. The new
/// Titanic on the same database must not send it again until that copy is
/// over (the broker shows no late worker once its deadline passed), even
/// though another worker of the service is idle.
#[test]
fn a_restart_does_not_resend_a_request_that_may_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    let settings = Settings {
        attempt_timeout: Duration::from_millis(300),
        ..quick()
    };
    let mut first = Running::new();
    titanic(&mut first, &endpoint, &database(&dir), settings.clone());
    let state = Runs::default();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    for _ in 0..2 {
        // The first run outlasts the deadline and the restart's margin.
        let handler = tracking(
            state.clone(),
            Duration::from_millis(2500),
            Some(started_tx.clone()),
            |body| String::from_utf8_lossy(&body[0]).into_owned(),
            |_, body| body,
        );
        worker(&mut running, &endpoint, "slow", handler);
    }
    let mut c = client_for(&endpoint);
    let uuid = client::request(&mut c, "slow", frames(&["r0"])).unwrap();
    started.recv_timeout(LIMIT).expect("the first run starts");
    first.stop();
    titanic(&mut running, &endpoint, &database(&dir), settings);
    assert_eq!(wait_done(&mut c, &uuid), frames(&["r0"]));
    let (_, most, runs) = state.lock().unwrap()["r0"];
    assert_eq!(most, 1, "ran {most} times at once ({runs} runs)");
    running.stop();
}

/// A request closed while its attempt runs is not tried again when that
/// attempt fails: Titanic forgets it.
#[test]
fn a_request_closed_while_it_runs_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = Running::new();
    let endpoint = broker(&mut running);
    let settings = Settings {
        attempt_timeout: Duration::from_millis(300),
        ..quick()
    };
    let titanic = Titanic::start(&endpoint, &database(&dir), settings).unwrap();
    let counters = titanic.counters();
    running.spawn(move |stop| titanic.run(&stop).unwrap());
    let runs = Arc::new(Mutex::new(0u32));
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let log = runs.clone();
    worker(&mut running, &endpoint, "slow", move |body| {
        *log.lock().unwrap() += 1;
        let _ = started_tx.send(());
        // Outlasts the deadline: the attempt fails with no_answer.
        thread::sleep(Duration::from_millis(800));
        body
    });
    let mut c = client_for(&endpoint);
    let uuid = client::request(&mut c, "slow", frames(&["once"])).unwrap();
    started.recv_timeout(LIMIT).expect("the first run starts");
    client::close(&mut c, &uuid).unwrap();
    let start = Instant::now();
    while counters.pending.load(std::sync::atomic::Ordering::Relaxed) != 0
        || counters.in_flight.load(std::sync::atomic::Ordering::Relaxed) != 0
    {
        assert!(start.elapsed() < LIMIT, "titanic still holds the closed request");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*runs.lock().unwrap(), 1, "a closed request ran again");
    assert_eq!(client::reply(&mut c, &uuid).unwrap(), ReplyStatus::Unknown);
    running.stop();
}
