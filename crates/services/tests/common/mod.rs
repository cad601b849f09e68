//! What the services' integration tests share: a bus on free ports (a real
//! broker and forwarder, and a Clone server when asked), a client, and a
//! bounded wait.

#![allow(dead_code)]

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use majordome_client::{Client, ClientOptions, Shutdown};
use majordome_hub::{Hub, HubConfig, Parts};

/// How long any awaited state may take to show.
pub const LIMIT: Duration = Duration::from_secs(20);

/// A broker and a forwarder (and maybe a Clone server) on port 0: the
/// hub's own start with those parts only.
pub struct Bus {
    hub: Hub,
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
        let parts = Parts {
            state: state_data.is_some(),
            ..Parts::bus()
        };
        // Without a Clone server nothing is written to the data folder.
        let data = state_data.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let hub = Hub::start(&HubConfig::on_free_ports(&data, parts), &Shutdown::new().unwrap()).unwrap();
        let endpoints = hub.endpoints().clone();
        Bus {
            hub,
            broker: endpoints.broker,
            publish_at: endpoints.publish,
            subscribe_at: endpoints.subscribe,
            state: state_data.map(|_| endpoints.state.snapshot),
        }
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
        self.hub.stop().unwrap();
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
