//! The client library against a real broker on a free port.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use majordome_broker::{Broker, Settings};
use majordome_client::{
    domogik_handler, AsyncClient, Bytes, Client, ClientError, ClientOptions, Message, Shutdown, Worker, WorkerOptions,
};
use serde_json::json;

struct Running {
    endpoint: String,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(endpoint: &str, settings: Settings) -> Running {
        let broker = Broker::bind(endpoint, settings).expect("bind");
        let endpoint = broker.endpoint().to_owned();
        let shutdown = Shutdown::new().unwrap();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || broker.run(&stop).expect("broker runs"));
        Running {
            endpoint,
            shutdown,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn fast() -> Settings {
    Settings {
        heartbeat_interval: Duration::from_millis(100),
        liveness: 3,
        ..Settings::default()
    }
}

fn fast_worker() -> WorkerOptions {
    WorkerOptions {
        heartbeat_interval: Duration::from_millis(100),
        liveness: 3,
        reconnect_delay: Duration::from_millis(100),
        ..WorkerOptions::default()
    }
}

fn spawn_worker<H>(endpoint: &str, service: &str, handler: H) -> (Shutdown, JoinHandle<()>)
where
    H: FnMut(Vec<Bytes>) -> Vec<Bytes> + Send + 'static,
{
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let worker = Worker::new(endpoint, service, fast_worker());
    let thread = std::thread::spawn(move || worker.run(handler, &stop).expect("worker runs"));
    (shutdown, thread)
}

fn client(endpoint: &str, timeout: Duration) -> Client {
    Client::new(
        endpoint,
        ClientOptions {
            timeout,
            ..ClientOptions::default()
        },
    )
}

fn stats(endpoint: &str) -> serde_json::Value {
    let reply = client(endpoint, Duration::from_secs(10))
        .request("mmi.stats", vec![])
        .unwrap();
    serde_json::from_slice(&reply[0]).unwrap()
}

fn wait_for(endpoint: &str, service: &str) {
    let start = Instant::now();
    let mut c = client(endpoint, Duration::from_secs(10));
    while c.request("mmi.service", vec![Bytes::from(service.to_owned())]).unwrap() != vec![Bytes::from_static(b"200")] {
        assert!(start.elapsed() < Duration::from_secs(20), "{service} never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The worker keeps heartbeating while its handler runs for ten of the
/// broker's liveness windows, so it is neither expired nor reconnected.
#[test]
fn worker_heartbeats_while_its_handler_runs() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let (stop, thread) = spawn_worker(
        &broker.endpoint,
        "slow",
        domogik_handler(move |m: Message| {
            std::thread::sleep(Duration::from_secs(3));
            count.fetch_add(1, Ordering::SeqCst);
            Message::new("work.result", json!({"status": true, "reason": "", "got": m.data}))
        }),
    );
    wait_for(&broker.endpoint, "slow");
    let mut c = client(&broker.endpoint, Duration::from_secs(10));
    let reply = c
        .request_message("slow", &Message::new("work.do", json!({"n": 1})))
        .unwrap();
    assert_eq!(reply.action, "work.result");
    assert_eq!(reply.data["got"], json!({"n": 1}));
    let stats = stats(&broker.endpoint);
    assert_eq!(stats["workers_expired"], json!(0));
    assert_eq!(stats["services"]["slow"]["workers"], json!(1));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    stop.trigger();
    thread.join().unwrap();
}

/// The broker goes away and comes back on the same endpoint: the worker
/// notices (DISCONNECT, then silence) and registers again.
#[test]
fn worker_reconnects_after_the_broker_restarts() {
    let mut first = Running::start("tcp://127.0.0.1:0", fast());
    let endpoint = first.endpoint.clone();
    let (stop, thread) = spawn_worker(&endpoint, "echo", |body| body);
    wait_for(&endpoint, "echo");
    first.stop();
    let second = Running::start(&endpoint, fast());
    wait_for(&second.endpoint, "echo");
    let reply = client(&endpoint, Duration::from_secs(10))
        .request("echo", vec![Bytes::from("again")])
        .unwrap();
    assert_eq!(reply, vec![Bytes::from("again")]);
    stop.trigger();
    thread.join().unwrap();
}

/// Many requests in flight on one socket, each reply matched to its own
/// request although two workers answer them in any order.
#[test]
fn async_client_keeps_many_requests_in_flight() {
    let broker = Running::start("tcp://127.0.0.1:0", Settings::default());
    let workers: Vec<_> = (0..2)
        .map(|_| spawn_worker(&broker.endpoint, "echo", |body| body))
        .collect();
    wait_for(&broker.endpoint, "echo");
    let client = AsyncClient::connect(&broker.endpoint).unwrap();
    let pending: Vec<_> = (0..500)
        .map(|i| {
            client.request(
                "echo",
                vec![Bytes::from(format!("request {i}"))],
                Duration::from_secs(20),
            )
        })
        .collect();
    for (i, reply) in pending.into_iter().enumerate() {
        assert_eq!(reply.wait().unwrap(), vec![Bytes::from(format!("request {i}"))]);
    }
    for (stop, thread) in workers {
        stop.trigger();
        thread.join().unwrap();
    }
}

#[test]
fn async_client_times_out_and_speaks_the_domogik_dialect() {
    let broker = Running::start("tcp://127.0.0.1:0", Settings::default());
    let client = AsyncClient::connect(&broker.endpoint).unwrap();
    let raw = client
        .request("nobody", vec![Bytes::from("x")], Duration::from_millis(300))
        .wait();
    assert!(matches!(raw, Err(ClientError::Timeout { .. })), "{raw:?}");
    // In the dialect, the broker's own expiry answer arrives first.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = runtime
        .block_on(client.request_message("nobody", &Message::new("x.get", json!({})), Duration::from_millis(300)))
        .unwrap();
    assert_eq!(reply.status(), Some(false));
    assert!(reply.reason().unwrap().contains("'nobody'"));
}

/// A handler that panics does not take the worker down: the request fails
/// at once and the next one is served.
#[test]
fn a_panicking_handler_fails_its_request_and_the_worker_goes_on() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let (stop, thread) = spawn_worker(
        &broker.endpoint,
        "fragile",
        domogik_handler(|m: Message| {
            if m.action == "boom.do" {
                panic!("handler bug");
            }
            Message::new("ok.result", json!({}))
        }),
    );
    wait_for(&broker.endpoint, "fragile");
    let mut c = client(&broker.endpoint, Duration::from_secs(10));
    let failed = c
        .request_message("fragile", &Message::new("boom.do", json!({})))
        .unwrap();
    assert_eq!(failed.status(), Some(false));
    assert!(failed.reason().unwrap().contains("went away"), "{failed:?}");
    wait_for(&broker.endpoint, "fragile");
    let ok = c
        .request_message("fragile", &Message::new("ok.get", json!({})))
        .unwrap();
    assert_eq!(ok.action, "ok.result");
    stop.trigger();
    thread.join().unwrap();
}

#[test]
fn malformed_domogik_requests_get_a_reason_not_a_crash() {
    let broker = Running::start("tcp://127.0.0.1:0", Settings::default());
    let (stop, thread) = spawn_worker(&broker.endpoint, "strict", domogik_handler(|m: Message| m));
    wait_for(&broker.endpoint, "strict");
    let mut c = client(&broker.endpoint, Duration::from_secs(10));
    let reply = c
        .request("strict", vec![Bytes::from("conf.get"), Bytes::from("{not json")])
        .unwrap();
    let message = Message::from_frames(&reply).unwrap();
    assert_eq!(message.action, "conf.result");
    assert!(message.reason().unwrap().contains("malformed request"), "{message:?}");
    stop.trigger();
    thread.join().unwrap();
}

#[test]
fn sync_client_reports_nothing_listening() {
    let mut c = Client::new(
        "tcp://127.0.0.1:1",
        ClientOptions {
            connect_timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        },
    );
    assert!(matches!(
        c.request("echo", vec![]),
        Err(ClientError::NotConnected { .. })
    ));
}

/// A broker that prefetches hands one worker several requests before the
/// first is answered; the worker answers them all, in order.
#[test]
fn worker_answers_every_request_a_prefetching_broker_hands_it() {
    let broker = Running::start(
        "tcp://127.0.0.1:0",
        Settings {
            worker_prefetch: 4,
            ..Settings::default()
        },
    );
    let (stop, thread) = spawn_worker(&broker.endpoint, "echo", |body| {
        std::thread::sleep(Duration::from_millis(2));
        body
    });
    wait_for(&broker.endpoint, "echo");
    let client = AsyncClient::connect(&broker.endpoint).unwrap();
    let pending: Vec<_> = (0..100)
        .map(|i| client.request("echo", vec![Bytes::from(format!("r{i}"))], Duration::from_secs(20)))
        .collect();
    for (i, reply) in pending.into_iter().enumerate() {
        assert_eq!(reply.wait().unwrap(), vec![Bytes::from(format!("r{i}"))]);
    }
    assert_eq!(stats(&broker.endpoint)["services"]["echo"]["replies"], json!(100));
    stop.trigger();
    thread.join().unwrap();
}

/// A handler that stops its own worker (a plugin answering
/// `plugin.stop.do`) must still get its reply out: the shutdown fires
/// before the handler returns, and the worker used to leave at once.
#[test]
fn a_handler_that_stops_its_worker_still_gets_its_reply_out() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let shutdown = Shutdown::new().unwrap();
    let (stop, at) = (shutdown.clone(), broker.endpoint.clone());
    let worker = std::thread::spawn(move || {
        let trigger = stop.clone();
        let handler = domogik_handler(move |message: Message| {
            trigger.trigger();
            // The socket loop sees the shutdown while this reply is built.
            std::thread::sleep(Duration::from_millis(50));
            Message::new(
                "plugin.stop.result",
                json!({"status": true, "reason": "", "asked": message.action}),
            )
        });
        Worker::new(&at, "stoppable", fast_worker())
            .run(handler, &stop)
            .unwrap();
    });
    wait_for(&broker.endpoint, "stoppable");
    let reply = client(&broker.endpoint, Duration::from_secs(5))
        .request_message("stoppable", &Message::new("plugin.stop.do", json!({})))
        .unwrap();
    assert_eq!(reply.status(), Some(true), "{:?}", reply.data);
    assert_eq!(reply.data["asked"], "plugin.stop.do");
    worker.join().unwrap();
    assert!(shutdown.is_triggered());
}

/// A worker with a capacity of four and four handler threads holds four
/// requests at once and runs them together: each handler waits at a
/// barrier that opens only when all four are inside. Replies go back in
/// whatever order the handlers finish, each to its own request.
#[test]
fn a_worker_with_a_capacity_runs_its_requests_concurrently() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let options = WorkerOptions {
        capacity: 4,
        ..fast_worker()
    };
    let worker = Worker::new(&broker.endpoint, "together", options);
    let thread = std::thread::spawn(move || {
        worker
            .run_pool(
                4,
                |index| {
                    let barrier = barrier.clone();
                    move |body: Vec<Bytes>| {
                        barrier.wait();
                        // Later threads answer first.
                        std::thread::sleep(Duration::from_millis(10 * (4 - index as u64)));
                        body
                    }
                },
                &stop,
            )
            .expect("worker runs")
    });
    wait_for(&broker.endpoint, "together");
    let client = AsyncClient::connect(&broker.endpoint).unwrap();
    let pending: Vec<_> = (0..4)
        .map(|i| client.request("together", vec![Bytes::from(format!("{i}"))], Duration::from_secs(20)))
        .collect();
    for (i, reply) in pending.into_iter().enumerate() {
        assert_eq!(reply.wait().unwrap(), vec![Bytes::from(format!("{i}"))]);
    }
    shutdown.trigger();
    thread.join().unwrap();
}

/// One worker serving two names (Domogik's aliases of one service): each
/// name is registered and answered, by the same handler threads, on one
/// socket thread.
#[test]
fn one_worker_serves_several_names() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let worker = Worker::serving(&broker.endpoint, &["config", "dbmgr"], fast_worker());
    let thread = std::thread::spawn(move || {
        worker
            .run_pool(2, |_| |body: Vec<Bytes>| body, &stop)
            .expect("worker runs")
    });
    wait_for(&broker.endpoint, "config");
    wait_for(&broker.endpoint, "dbmgr");
    let mut c = client(&broker.endpoint, Duration::from_secs(10));
    for name in ["config", "dbmgr", "config"] {
        let reply = c.request(name, vec![Bytes::from(name)]).unwrap();
        assert_eq!(reply, vec![Bytes::from(name)]);
    }
    let services = c.request("mmi.services", vec![]).unwrap();
    assert_eq!(services, vec![Bytes::from_static(b"config, dbmgr")]);
    shutdown.trigger();
    thread.join().unwrap();
}

/// A handler run on the socket thread answers like any other; one that
/// panics makes the worker start over, and the next request is served.
#[test]
fn an_inline_handler_answers_and_survives_a_panic() {
    let broker = Running::start("tcp://127.0.0.1:0", fast());
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let worker = Worker::new(&broker.endpoint, "inline", fast_worker());
    let thread = std::thread::spawn(move || {
        let handler = |body: Vec<Bytes>| {
            assert!(body[0] != "boom", "asked to panic");
            body
        };
        worker.run_inline(handler, &stop).expect("worker runs")
    });
    wait_for(&broker.endpoint, "inline");
    let mut c = client(&broker.endpoint, Duration::from_secs(2));
    assert_eq!(
        c.request("inline", vec![Bytes::from("a")]).unwrap(),
        vec![Bytes::from("a")]
    );
    assert!(
        c.request("inline", vec![Bytes::from("boom")]).is_err(),
        "no reply to a panic"
    );
    let mut c = client(&broker.endpoint, Duration::from_secs(10));
    assert_eq!(
        c.request("inline", vec![Bytes::from("b")]).unwrap(),
        vec![Bytes::from("b")]
    );
    shutdown.trigger();
    thread.join().unwrap();
}
