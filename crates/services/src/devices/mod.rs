//! The device service (service `devices`): the device registry, commands
//! checked against the schema and forwarded to the owning plugin, current
//! values, stale marking and the inventory. See "Devices and plugins: the
//! contract" in `ARCHITECTURE.md` for every message.
//!
//! Threads: `workers` threads answer `devices` (a slow plugin holds only
//! the thread that forwards to it, up to `command_timeout`); one follower
//! reads the `event.` events, updates current values, appends them to the
//! history in batches, mirrors them into Clone under
//! `/device/<uuid>/<quantity>`, and marks silent devices stale. The device
//! table is written through the group committer, and a write is durable
//! before its reply.
//!
//! Domogik's side of values: each (device, quantity) is a *sensor* with a
//! number of its own ([`sensor_id`]), listed in the device's `sensors`.
//! Domogik plugins publish `client.sensor` (`{"<sensor id>": value, …,
//! "atTimestamp"?}`); those values are taken like ago's events. Every
//! stored value, from either, is published as `device-stats`
//! (`{timestamp, device_id, sensor_id, stored_value}`) once its history
//! commit is durable, and every change to a device as `device.update`
//! (`{device_id, client_id}`), as Domogik's own services did.
//!
//! The modules: `model` (devices, their values and sensors, counters: no
//! socket, no clock), `store` (the `devices` table), `requests` (the
//! service's answers), `values` (the follower: events in, inventory, Clone
//! and history out), and here the threads that run them.

mod model;
mod requests;
mod store;
mod values;

pub use model::sensor_id;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use majordome_api::devices::DeviceRequest;
use majordome_client::{
    domogik_handler, Client, ClientOptions, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions,
};
use majordome_state::{Writer, WriterOptions};
use majordome_store::{Committer, Durability, StoreError};

use crate::history::{HistoryCounters, HistoryWriter};
use crate::schema::Schema;
use model::{device_unit, Reading, Registry, Stats};
use store::SCHEMA;
use values::follow;

/// The actions `devices` answers.
pub(crate) const ACTIONS: &[&str] = DeviceRequest::ACTIONS;

/// The Domogik category of sensor values.
pub(crate) const CLIENT_SENSOR: &str = "client.sensor";

/// Subjects the service publishes itself; the follower skips them.
pub(crate) const OWN_SUBJECTS: &[&str] = &["event.device.announce", "event.device.remove", "event.device.stale"];

/// How the device service behaves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSettings {
    /// Threads answering `devices`.
    pub workers: usize,
    /// How long a plugin has to answer a command.
    #[serde(with = "majordome_net::duration_text")]
    pub command_timeout: Duration,
    /// How often silent devices are looked for.
    #[serde(with = "majordome_net::duration_text")]
    pub stale_check: Duration,
    /// The most devices the registry holds.
    pub max_devices: usize,
    /// Events taken in one batch (one history job, one Clone confirm).
    pub batch: usize,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        DeviceSettings {
            workers: 4,
            command_timeout: Duration::from_secs(5),
            stale_check: Duration::from_secs(1),
            max_devices: 10_000,
            batch: 1000,
        }
    }
}

/// Where the service finds the rest of the bus.
#[derive(Debug, Clone)]
pub struct DeviceEndpoints {
    pub broker: String,
    /// The forwarder's side publishers connect to.
    pub publish: String,
    /// The forwarder's side subscribers connect to.
    pub subscribe: String,
    /// The Clone server's base endpoint (snapshots; updates and collector
    /// follow), if values are to be mirrored there.
    pub state: Option<String>,
}

/// Errors starting the service.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device database: {0}")]
    Store(#[from] StoreError),
    #[error("device database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    #[error(transparent)]
    Client(#[from] majordome_client::ClientError),
    #[error("Clone server: {0}")]
    State(#[from] majordome_state::StateError),
    #[error("cannot start a device thread: {0}")]
    Thread(#[from] std::io::Error),
}

pub(crate) struct Shared {
    schema: Schema,
    settings: DeviceSettings,
    registry: Mutex<Registry>,
    committer: Arc<Committer>,
    publisher: Mutex<Publisher>,
    writer: Option<Mutex<Writer>>,
    stats: Mutex<Stats>,
    history: Arc<HistoryCounters>,
}

/// The device service, ready to run.
pub struct DeviceService {
    shared: Arc<Shared>,
    history: HistoryWriter,
    endpoints: DeviceEndpoints,
}

impl DeviceService {
    /// Opens the device table and the history in `database`, and loads
    /// the devices and their last values.
    pub fn open(
        database: &Path,
        schema: Schema,
        durability: Durability,
        settings: DeviceSettings,
        history_settings: &crate::history::HistorySettings,
        endpoints: DeviceEndpoints,
    ) -> Result<DeviceService, DeviceError> {
        let connection = majordome_store::open(database, durability)?;
        connection.execute_batch(SCHEMA)?;
        let mut registry = Registry::default();
        for mut device in store::load(&connection, Instant::now())? {
            device.add_type_sensors(&schema);
            registry.insert(device);
        }
        let history = HistoryWriter::open(database, durability, history_settings)?;
        for (uuid, quantity, time, raw) in HistoryWriter::latest(database)? {
            if registry.sensor(&uuid, &quantity).is_none() {
                continue;
            }
            if let Some(device) = registry.devices.get_mut(&uuid) {
                let unit = device_unit(&schema, &device.kind, &quantity);
                device.values.insert(quantity, Reading { level: raw, unit, time });
                device.last_seen = Some(device.last_seen.map_or(time, |seen: f64| seen.max(time)));
            }
        }
        let publisher = Publisher::connect(&endpoints.publish)?;
        let writer = match &endpoints.state {
            Some(state) => {
                // It writes device values only; other keys' updates would
                // pile up unread between its writes.
                let options = WriterOptions {
                    subtree: "/device/".into(),
                    ..WriterOptions::default()
                };
                Some(Mutex::new(Writer::connect(state.as_str(), options)?))
            }
            None => None,
        };
        let shared = Shared {
            schema,
            settings,
            registry: Mutex::new(registry),
            committer: majordome_store::shared_committer(database, durability)?,
            publisher: Mutex::new(publisher),
            writer,
            stats: Mutex::default(),
            history: history.counters(),
        };
        Ok(DeviceService {
            shared: Arc::new(shared),
            history,
            endpoints,
        })
    }

    /// The history's counters, for the `history` service.
    /// Keeps `owners` (device and sensor → plugin) up to date, for the
    /// forwarder of the same hub.
    pub fn share_owners(&self, owners: Arc<majordome_access::Owners>) {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .share_owners(owners);
    }

    pub fn history_counters(&self) -> Arc<HistoryCounters> {
        self.history.counters()
    }

    /// The history's committer counters (commits, jobs).
    pub fn history_commit_stats(&self) -> Arc<majordome_store::CommitStats> {
        self.history.commit_stats()
    }

    /// Runs the workers and the follower until `shutdown`.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), DeviceError> {
        let DeviceService {
            shared,
            history,
            endpoints,
        } = self;
        // Values come in bursts (a plugin starting, a gateway catching up):
        // hold many rather than drop them.
        let subscriber =
            Subscriber::connect_with_high_water_mark(&endpoints.subscribe, &["event.", CLIENT_SENSOR], 100_000)?;
        let mut threads = Vec::new();
        // One worker, a handler thread per request it may hold: a slow
        // plugin holds only the thread that forwards to it.
        let workers = shared.settings.workers.max(1);
        let options = WorkerOptions {
            capacity: workers as u32,
            ..WorkerOptions::default()
        };
        let worker = Worker::new(&endpoints.broker, "devices", options);
        let (pool_shared, broker) = (shared.clone(), endpoints.broker.clone());
        let (follower_shared, stop) = (shared.clone(), shutdown.clone());
        threads.push(
            thread::Builder::new()
                .name("devices-follower".into())
                .spawn(move || follow(&follower_shared, subscriber, history, &stop))?,
        );
        // The worker on this thread, until shutdown.
        let handler = |_| {
            let worker_shared = pool_shared.clone();
            let options = ClientOptions {
                timeout: pool_shared.settings.command_timeout,
                ..ClientOptions::default()
            };
            let mut client = Client::new(&broker, options).stop_on(shutdown);
            domogik_handler(move |message: Message| worker_shared.handle(&mut client, &message))
        };
        let mut outcome = worker.run_pool(workers, handler, shutdown).map_err(DeviceError::from);
        for thread in threads {
            let result = thread.join().unwrap_or(Err(DeviceError::Thread(std::io::Error::other(
                "a device thread panicked",
            ))));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}
