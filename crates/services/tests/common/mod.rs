//! What the services' integration tests share: a bus on free ports (a real
//! broker and forwarder, and a Clone server when asked), a client, and a
//! bounded wait.

#![allow(dead_code)]

use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use majordome_broker::Broker;
use majordome_client::{Client, ClientOptions, Shutdown};
use majordome_events::Forwarder;

/// How long any awaited state may take to show.
pub const LIMIT: Duration = Duration::from_secs(20);

/// A broker and a forwarder (and maybe a Clone server), each on its own
/// thread, on port 0.
pub struct Bus {
    shutdown: Shutdown,
    threads: Vec<JoinHandle<()>>,
    pub broker: String,
    /// The forwarder's side publishers connect to.
    pub publish_at: String,
    /// The forwarder's side subscribers connect to.
    pub subscribe_at: String,
    /// The Clone server's base endpoint, when started with one.
    pub state: Option<String>,
}

impl Bus {
    /// A broker and a forwarder.
    pub fn start() -> Bus {
        Bus::start_with(None)
    }

    /// A broker, a forwarder and a Clone server keeping its data in
    /// `data`.
    pub fn with_state(data: &Path) -> Bus {
        Bus::start_with(Some(data))
    }

    fn start_with(state_data: Option<&Path>) -> Bus {
        let shutdown = Shutdown::new().unwrap();
        let broker = Broker::bind("tcp://127.0.0.1:0", majordome_broker::Settings::default()).unwrap();
        let forwarder = Forwarder::bind(
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:0",
            majordome_events::Settings::default(),
        )
        .unwrap();
        let mut bus = Bus {
            shutdown: shutdown.clone(),
            threads: Vec::new(),
            broker: broker.endpoint().to_owned(),
            publish_at: forwarder.publisher_endpoint().to_owned(),
            subscribe_at: forwarder.subscriber_endpoint().to_owned(),
            state: None,
        };
        let (a, b) = (shutdown.clone(), shutdown.clone());
        bus.threads.push(thread::spawn(move || broker.run(&a).unwrap()));
        bus.threads.push(thread::spawn(move || forwarder.run(&b).unwrap()));
        if let Some(data) = state_data {
            let state = majordome_state::Server::bind(
                "tcp://127.0.0.1:0",
                &data.join("state.db"),
                majordome_state::Settings::default(),
            )
            .unwrap();
            bus.state = Some(state.endpoints().snapshot.clone());
            bus.threads.push(thread::spawn(move || state.run(&shutdown).unwrap()));
        }
        bus
    }

    /// A client of the broker that waits up to `timeout` for a reply.
    pub fn client(&self, timeout: Duration) -> Client {
        Client::new(
            &self.broker,
            ClientOptions {
                timeout,
                ..ClientOptions::default()
            },
        )
    }

    /// Stops everything and waits for it.
    pub fn stop(self) {
        self.shutdown.trigger();
        for thread in self.threads {
            thread.join().unwrap();
        }
    }
}

/// Polls `check` until it gives something; fails after [`LIMIT`].
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        // The pause between two looks, not the assertion.
        thread::sleep(Duration::from_millis(20));
    }
}
