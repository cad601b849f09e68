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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use majordome_api::devices::{DeviceCommand, DeviceCreate, DeviceQuery, DeviceRequest, DeviceUpdate};
use majordome_client::{
    domogik_handler, unix_now, Client, ClientOptions, Event, Message, Publisher, Shutdown, Subscriber, Worker,
    WorkerOptions,
};
use majordome_state::{Writer, WriterOptions};
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, Durability, StoreError, Ticket};
use serde_json::{json, Map, Value};

use crate::history::{HistoryCounters, HistoryWriter, Sample};
use crate::lock;
use crate::schema::{error_map, valid_name, Schema};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    uuid        TEXT PRIMARY KEY,
    client      TEXT NOT NULL,
    internal_id TEXT NOT NULL,
    type        TEXT NOT NULL,
    name        TEXT NOT NULL,
    room        TEXT NOT NULL,
    stale_after REAL,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    UNIQUE (client, internal_id)
);
";

/// The actions `devices` answers.
const ACTIONS: &[&str] = DeviceRequest::ACTIONS;

/// The most quantities (sensors) one device may have values for; values
/// of further quantities are dropped and counted, so that a plugin making
/// up names cannot grow the registry without bound.
const MAX_QUANTITIES: usize = 64;

/// The Domogik category of sensor values.
const CLIENT_SENSOR: &str = "client.sensor";

/// A sensor's number: a 53-bit FNV-1a hash of `<uuid>/<quantity>`, so it
/// is the same on every start and in every process without being stored,
/// and exact as a JSON number in any language. Domogik's sensor ids were
/// database rows; any number serves, since plugins read theirs from
/// `device.get`.
pub fn sensor_id(uuid: &str, quantity: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in uuid.bytes().chain(std::iter::once(b'/')).chain(quantity.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    // Never 0, so that it cannot be mistaken for "no sensor".
    ((hash & ((1 << 53) - 1)) as i64).max(1)
}

/// Subjects the service publishes itself; the follower skips them.
const OWN_SUBJECTS: &[&str] = &["event.device.announce", "event.device.remove", "event.device.stale"];

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

/// A current value.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    level: Value,
    unit: Value,
    time: f64,
}

/// A device as the registry holds it.
#[derive(Debug, Clone)]
struct Device {
    uuid: String,
    client: String,
    id: String,
    kind: String,
    name: String,
    room: String,
    stale_after: Option<f64>,
    created: f64,
    values: BTreeMap<String, Reading>,
    /// Its sensors (Domogik's name for a quantity of a device): those of
    /// its type, and any other it has had values for.
    sensors: BTreeMap<String, i64>,
    /// Unix time of the last value, if any.
    last_seen: Option<f64>,
    /// Silence is counted from here: the last value, or when the service
    /// started knowing the device.
    heard_at: Instant,
    stale: bool,
}

impl Device {
    /// RasPy's name: `<host>.<service>.<device>`, from the client id
    /// `<type>-<name>.<host>`.
    fn raspy_name(&self) -> String {
        let (service, host) = self.client.rsplit_once('.').unwrap_or((&self.client, ""));
        let service = service.split_once('-').map_or(service, |(_, name)| name);
        format!("{host}.{service}.{}", self.id)
    }

    fn info(&self) -> Value {
        json!({
            "uuid": self.uuid, "client": self.client, "id": self.id, "type": self.kind,
            "name": self.name, "room": self.room, "raspy_name": self.raspy_name(),
            "stale_after": self.stale_after, "created": self.created,
            "lastseen": self.last_seen, "stale": self.stale,
        })
    }

    /// Adds the sensors its type declares.
    fn add_type_sensors(&mut self, schema: &Schema) {
        if let Some(kind) = schema.get(&self.kind) {
            for quantity in kind.values.keys() {
                self.sensors
                    .entry(quantity.clone())
                    .or_insert_with(|| sensor_id(&self.uuid, quantity));
            }
        }
    }

    /// What `device.get` and the inventory say of it: its info, current
    /// values and state, plus the fields a Domogik plugin reads from its
    /// device list (`device_type_id`, `client_id`, `sensors` with their
    /// ids, `commands`, and empty `parameters`, `xpl_stats`,
    /// `xpl_commands`).
    fn inventory_entry(&self, schema: &Schema) -> Value {
        let sensors: Map<String, Value> = self
            .sensors
            .iter()
            .map(|(quantity, id)| {
                let reading = self.values.get(quantity);
                let sensor = json!({
                    "id": id, "name": quantity, "reference": quantity,
                    "unit": reading.map_or_else(|| device_unit(schema, &self.kind, quantity), |r| r.unit.clone()),
                    "last_value": reading.map(|r| r.level.clone()),
                    "last_received": reading.map(|r| r.time),
                });
                (quantity.clone(), sensor)
            })
            .collect();
        let commands: Map<String, Value> = schema
            .get(&self.kind)
            .map(|kind| {
                kind.commands
                    .keys()
                    .map(|name| (name.clone(), json!({"name": name})))
                    .collect()
            })
            .unwrap_or_default();
        let values: Map<String, Value> = self
            .values
            .iter()
            .map(|(q, r)| {
                (
                    q.clone(),
                    json!({"level": r.level, "unit": r.unit, "timestamp": r.time}),
                )
            })
            .collect();
        let state = self
            .values
            .get("state")
            .or_else(|| self.values.values().next())
            .map_or(Value::Null, |r| r.level.clone());
        let mut entry = self.info();
        entry["state"] = state;
        entry["values"] = Value::Object(values);
        entry["devicetype"] = self.kind.clone().into();
        entry["device_type_id"] = self.kind.clone().into();
        entry["client_id"] = self.client.clone().into();
        entry["sensors"] = Value::Object(sensors);
        entry["commands"] = Value::Object(commands);
        for empty in ["parameters", "xpl_stats", "xpl_commands"] {
            entry[empty] = json!({});
        }
        entry
    }
}

#[derive(Default)]
struct Registry {
    devices: HashMap<String, Device>,
    by_key: HashMap<(String, String), String>,
    by_raspy: HashMap<String, String>,
    /// Sensor id → (uuid, quantity), for Domogik's `client.sensor`.
    sensors: HashMap<i64, (String, String)>,
}

impl Registry {
    fn insert(&mut self, device: Device) {
        self.by_key
            .insert((device.client.clone(), device.id.clone()), device.uuid.clone());
        self.by_raspy.insert(device.raspy_name(), device.uuid.clone());
        for (quantity, id) in &device.sensors {
            self.sensors.insert(*id, (device.uuid.clone(), quantity.clone()));
        }
        self.devices.insert(device.uuid.clone(), device);
    }

    fn remove(&mut self, uuid: &str) -> Option<Device> {
        let device = self.devices.remove(uuid)?;
        self.by_key.remove(&(device.client.clone(), device.id.clone()));
        self.by_raspy.remove(&device.raspy_name());
        for id in device.sensors.values() {
            self.sensors.remove(id);
        }
        Some(device)
    }

    /// The sensor of a device's quantity, added if new; `None` for an
    /// unknown device, or one that already has `MAX_QUANTITIES`.
    fn sensor(&mut self, uuid: &str, quantity: &str) -> Option<i64> {
        let device = self.devices.get_mut(uuid)?;
        if let Some(id) = device.sensors.get(quantity) {
            return Some(*id);
        }
        if device.sensors.len() >= MAX_QUANTITIES {
            return None;
        }
        let id = sensor_id(uuid, quantity);
        device.sensors.insert(quantity.to_owned(), id);
        self.sensors.insert(id, (uuid.to_owned(), quantity.to_owned()));
        Some(id)
    }

    /// A device by uuid, or by its RasPy name.
    fn find(&self, name: &str) -> Option<&Device> {
        self.devices
            .get(name)
            .or_else(|| self.by_raspy.get(name).and_then(|uuid| self.devices.get(uuid)))
    }
}

/// Per plugin counts.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct ClientStats {
    commands: u64,
    errors: u64,
    values: u64,
}

/// What `stats.get` tells.
#[derive(Default)]
struct Stats {
    requests: BTreeMap<String, u64>,
    /// Command outcomes by ago identifier.
    outcomes: BTreeMap<String, u64>,
    /// The latest command round trips through a plugin, in seconds.
    latencies: VecDeque<f64>,
    events: u64,
    values: u64,
    unknown_device: u64,
    /// `client.sensor` values for a sensor id no device has.
    unknown_sensor: u64,
    /// Values of a quantity past a device's `MAX_QUANTITIES`.
    too_many_quantities: u64,
    /// `device-stats` the publisher could not take.
    device_stats_dropped: u64,
    malformed_events: u64,
    failed_later: u64,
    clone_failures: u64,
    stale_marked: u64,
    clients: BTreeMap<String, ClientStats>,
}

const LATENCY_WINDOW: usize = 1024;

impl Stats {
    fn outcome(&mut self, client: Option<&str>, identifier: &str) {
        // Plugins choose their identifiers: past a few dozen kinds, new
        // ones count together, so the map stays bounded.
        let known = self.outcomes.len() < 64 || self.outcomes.contains_key(identifier);
        let counted = if known { identifier } else { "other" };
        *self.outcomes.entry(counted.to_owned()).or_default() += 1;
        if let Some(client) = client {
            let entry = self.clients.entry(client.to_owned()).or_default();
            entry.commands += 1;
            if identifier.starts_with("error") {
                entry.errors += 1;
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[index.min(sorted.len() - 1)])
}

struct Shared {
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

/// A `.do` reply with Domogik's `status`/`reason` and ago's maps.
fn outcome_reply(action: &str, mut data: Map<String, Value>) -> Message {
    let error = data.get("error").filter(|e| e.is_object()).cloned();
    data.insert("status".into(), error.is_none().into());
    let reason = error
        .as_ref()
        .and_then(|e| e.get("message").and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned();
    data.insert("reason".into(), reason.into());
    Message::new(majordome_mdp::domogik::result_action(action), Value::Object(data))
}

fn command_error(action: &str, identifier: &str, message: impl Into<String>) -> Message {
    let mut data = Map::new();
    data.insert("error".into(), error_map(identifier, message));
    outcome_reply(action, data)
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
        let now = Instant::now();
        {
            let mut query = connection
                .prepare("SELECT uuid, client, internal_id, type, name, room, stale_after, created FROM devices")?;
            let rows = query.query_map([], |row| {
                Ok(Device {
                    uuid: row.get(0)?,
                    client: row.get(1)?,
                    id: row.get(2)?,
                    kind: row.get(3)?,
                    name: row.get(4)?,
                    room: row.get(5)?,
                    stale_after: row.get(6)?,
                    created: row.get(7)?,
                    values: BTreeMap::new(),
                    sensors: BTreeMap::new(),
                    last_seen: None,
                    heard_at: now,
                    stale: false,
                })
            })?;
            for device in rows {
                let mut device = device?;
                device.add_type_sensors(&schema);
                registry.insert(device);
            }
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
            Some(state) => Some(Mutex::new(Writer::connect(state.as_str(), WriterOptions::default())?)),
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

fn device_unit(schema: &Schema, kind: &str, quantity: &str) -> Value {
    schema
        .get(kind)
        .and_then(|t| t.values.get(quantity))
        .and_then(|v| v.unit.clone())
        .map_or(Value::Null, Value::String)
}

/// What a batch of events gave.
#[derive(Default)]
struct Applied {
    /// Values for the history.
    samples: Vec<Sample>,
    /// Clone keys to write.
    mirrored: Vec<(String, Value)>,
    /// `device-stats` to publish once the samples are durable.
    stored: Vec<Value>,
}

/// The follower: events in, values out to the inventory, history, Clone.
fn follow(
    shared: &Shared,
    mut subscriber: Subscriber,
    mut history: HistoryWriter,
    shutdown: &Shutdown,
) -> Result<(), DeviceError> {
    let mut last_check = Instant::now();
    // History commits in flight, oldest first, with the `device-stats`
    // each will let out once durable.
    let mut pending: VecDeque<(Ticket<()>, Vec<Value>)> = VecDeque::new();
    while !shutdown.is_triggered() {
        let mut batch = Vec::new();
        // While commits are in flight, look at them often: their
        // `device-stats` wait for them.
        let wait = if pending.is_empty() {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(2)
        };
        if let Some(event) = subscriber.recv(wait)? {
            batch.push(event);
            while batch.len() < shared.settings.batch {
                match subscriber.recv(Duration::ZERO)? {
                    Some(event) => batch.push(event),
                    None => break,
                }
            }
        }
        if !batch.is_empty() {
            let applied = shared.apply_events(&batch);
            if let Some(ticket) = history.append(applied.samples) {
                pending.push_back((ticket, applied.stored));
            }
            shared.mirror(applied.mirrored);
        }
        while let Some(outcome) = pending.front().and_then(|(ticket, _)| ticket.try_get()) {
            let (_, stored) = pending.pop_front().expect("peeked");
            // A failed commit is counted by the history; its values were
            // not stored, so nothing is said of them.
            if outcome.is_ok() {
                shared.publish_stored(stored);
            }
        }
        if last_check.elapsed() >= shared.settings.stale_check {
            last_check = Instant::now();
            shared.mark_stale();
        }
    }
    lock(&shared.stats).malformed_events += subscriber.malformed();
    for (ticket, stored) in pending {
        if ticket.wait().is_ok() {
            shared.publish_stored(stored);
        }
    }
    history.flush()?;
    Ok(())
}

impl Shared {
    fn publish(&self, subject: &str, data: &Value) {
        if let Err(e) = lock(&self.publisher).publish(subject, data) {
            tracing::warn!(error = %e, subject, "could not publish");
        }
    }

    /// Says `device.update` (`{device_id, client_id}`), as Domogik's admin
    /// did after a change: its plugins then read their devices again.
    fn device_changed(&self, device: &Device) {
        self.publish(
            "device.update",
            &json!({"device_id": device.uuid, "client_id": device.client}),
        );
    }

    /// Says `device-stats` for values now stored. The publisher drops what
    /// its subscribers do not take in time; those are counted, not logged
    /// one by one.
    fn publish_stored(&self, stored: Vec<Value>) {
        let mut publisher = lock(&self.publisher);
        if !publisher.is_wanted("device-stats") {
            return;
        }
        let dropped = stored
            .iter()
            .filter(|stat| publisher.publish("device-stats", stat).is_err())
            .count();
        if dropped > 0 {
            lock(&self.stats).device_stats_dropped += dropped as u64;
        }
    }

    /// Writes keys to Clone and waits until the last one is published, so
    /// the writer's update socket is drained and failures are seen.
    fn mirror(&self, entries: Vec<(String, Value)>) {
        let Some(writer) = &self.writer else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let mut writer = lock(writer);
        let mut last = None;
        for (key, value) in entries {
            let body = if value.is_null() {
                Vec::new()
            } else {
                value.to_string().into_bytes()
            };
            match writer.send(&key, body, None) {
                Ok(uuid) => last = Some(uuid),
                Err(e) => {
                    lock(&self.stats).clone_failures += 1;
                    tracing::warn!(error = %e, key, "could not write to Clone");
                }
            }
        }
        if let Some(uuid) = last {
            if let Err(e) = writer.confirm(&uuid, Duration::from_secs(5)) {
                lock(&self.stats).clone_failures += 1;
                tracing::warn!(error = %e, "Clone did not confirm device values");
            }
        }
    }

    /// Applies a batch of events (ago's `event.*` and Domogik's
    /// `client.sensor`).
    fn apply_events(&self, events: &[Event]) -> Applied {
        let mut applied = Applied::default();
        let mut stats = lock(&self.stats);
        let mut registry = lock(&self.registry);
        let now = unix_now();
        // A plugin's clock is trusted unless it is far off.
        let plausible = |time: Option<f64>| {
            time.filter(|t| (now - 86_400.0..=now + 60.0).contains(t))
                .unwrap_or(now)
        };
        for event in events {
            stats.events += 1;
            if OWN_SUBJECTS.contains(&event.category.as_str()) {
                continue;
            }
            let data = &event.data;
            if event.category == CLIENT_SENSOR {
                let Some(values) = data.as_object() else {
                    stats.malformed_events += 1;
                    continue;
                };
                // Domogik sends its `atTimestamp` as a string or a number.
                let time = values.get("atTimestamp").and_then(|t| match t {
                    Value::String(text) => text.trim().parse().ok(),
                    other => other.as_f64(),
                });
                let time = plausible(time);
                for (key, level) in values.iter().filter(|(key, _)| *key != "atTimestamp") {
                    // The sensor's number, or majordome's `<uuid>/<quantity>`.
                    let target = match key.parse::<i64>() {
                        Ok(id) => registry.sensors.get(&id).cloned(),
                        Err(_) => key
                            .split_once('/')
                            .filter(|(uuid, quantity)| registry.devices.contains_key(*uuid) && valid_name(quantity))
                            .map(|(uuid, quantity)| (uuid.to_owned(), quantity.to_owned())),
                    };
                    let Some((uuid, quantity)) = target.filter(|_| !level.is_null()) else {
                        stats.unknown_sensor += 1;
                        continue;
                    };
                    self.take_value(
                        &mut registry,
                        &mut stats,
                        &mut applied,
                        &uuid,
                        &quantity,
                        level,
                        None,
                        time,
                    );
                }
                continue;
            }
            let Some(uuid) = data.get("uuid").and_then(Value::as_str) else {
                stats.malformed_events += 1;
                continue;
            };
            let Some(device) = registry.devices.get(uuid) else {
                stats.unknown_device += 1;
                continue;
            };
            if data.get("error").is_some() {
                stats.failed_later += 1;
                continue;
            }
            let values = data.get("data").unwrap_or(&Value::Null);
            let Some(level) = values.get("level").filter(|l| !l.is_null()) else {
                stats.malformed_events += 1;
                continue;
            };
            let quantity = self.schema.quantity_of(&device.kind, &event.category, values);
            let unit = values.get("unit").filter(|u| u.is_string()).cloned();
            let time = plausible(data.get("timestamp").and_then(Value::as_f64));
            self.take_value(
                &mut registry,
                &mut stats,
                &mut applied,
                uuid,
                &quantity,
                level,
                unit,
                time,
            );
        }
        applied
    }

    /// One value of a known device: into the inventory, and on its way to
    /// Clone and history.
    #[allow(clippy::too_many_arguments)]
    fn take_value(
        &self,
        registry: &mut Registry,
        stats: &mut Stats,
        applied: &mut Applied,
        uuid: &str,
        quantity: &str,
        level: &Value,
        unit: Option<Value>,
        time: f64,
    ) {
        let Some(sensor) = registry.sensor(uuid, quantity) else {
            stats.too_many_quantities += 1;
            return;
        };
        let device = registry.devices.get_mut(uuid).expect("sensor() found it");
        let unit = unit.unwrap_or_else(|| device_unit(&self.schema, &device.kind, quantity));
        applied.mirrored.push((
            format!("/device/{uuid}/{quantity}"),
            json!({"level": level, "unit": unit, "timestamp": time}),
        ));
        applied.samples.push(Sample {
            uuid: uuid.to_owned(),
            quantity: quantity.to_owned(),
            time,
            raw: level.clone(),
        });
        applied.stored.push(json!({
            "timestamp": time, "device_id": uuid, "sensor_id": sensor, "stored_value": level,
            "quantity": quantity,
        }));
        device.values.insert(
            quantity.to_owned(),
            Reading {
                level: level.clone(),
                unit,
                time,
            },
        );
        device.last_seen = Some(time);
        device.heard_at = Instant::now();
        if device.stale {
            device.stale = false;
            applied.mirrored.push((format!("/device/{uuid}/info"), device.info()));
        }
        stats.values += 1;
        stats.clients.entry(device.client.clone()).or_default().values += 1;
    }

    fn mark_stale(&self) {
        let mut newly = Vec::new();
        {
            let mut registry = lock(&self.registry);
            for device in registry.devices.values_mut() {
                let Some(after) = device.stale_after.filter(|a| *a > 0.0) else {
                    continue;
                };
                if !device.stale && device.heard_at.elapsed().as_secs_f64() >= after {
                    device.stale = true;
                    newly.push((device.uuid.clone(), device.info()));
                }
            }
        }
        if newly.is_empty() {
            return;
        }
        lock(&self.stats).stale_marked += newly.len() as u64;
        let mut mirrored = Vec::new();
        for (uuid, info) in newly {
            self.publish(
                "event.device.stale",
                &json!({"uuid": uuid, "event": "event.device.stale", "data": {"stale": true, "lastseen": info["lastseen"]}}),
            );
            mirrored.push((format!("/device/{uuid}/info"), info));
        }
        self.mirror(mirrored);
    }

    fn handle(&self, client: &mut Client, message: &Message) -> Message {
        let action = message.action.as_str();
        // Counted by action, but any action a client makes up counts as
        // "unknown": the map must not grow with bad input.
        let counted = if ACTIONS.contains(&action) { action } else { "unknown" };
        *lock(&self.stats).requests.entry(counted.to_owned()).or_default() += 1;
        match DeviceRequest::parse(message) {
            Ok(DeviceRequest::Create(create)) => self.create(action, &create),
            Ok(DeviceRequest::Get(query)) => self.get(action, &query),
            Ok(DeviceRequest::Update(update)) => self.update(action, &update),
            Ok(DeviceRequest::Delete { uuid }) => self.delete(action, &uuid),
            Ok(DeviceRequest::Command(command)) => self.command(client, action, &command),
            Ok(DeviceRequest::Inventory) if action == "device.command.do" => self.inventory("inventory.get"),
            Ok(DeviceRequest::Inventory) => self.inventory(action),
            Ok(DeviceRequest::DeviceTypes) => Message::new("device_types.result", json!({"schema": self.schema})),
            Ok(DeviceRequest::Stats) => Message::new("stats.result", self.stats()),
            Err(e) if action == "device.command.do" => {
                let identifier = DeviceCommand::error_identifier(&e);
                lock(&self.stats).outcome(None, identifier);
                command_error(action, identifier, e.to_string())
            }
            Err(e) => Message::failure(action, e.to_string()),
        }
    }

    fn store(&self, device: &Device) -> Result<(), StoreError> {
        let row = device.clone();
        self.committer.submit(move |connection: &Connection| {
            connection.execute(
                "INSERT INTO devices (uuid, client, internal_id, type, name, room, stale_after, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (uuid) DO UPDATE SET type = ?4, name = ?5, room = ?6, stale_after = ?7, updated = ?9",
                params![
                    row.uuid,
                    row.client,
                    row.id,
                    row.kind,
                    row.name,
                    row.room,
                    row.stale_after,
                    row.created,
                    unix_now()
                ],
            )?;
            Ok(())
        })
    }

    fn create(&self, action: &str, request: &DeviceCreate) -> Message {
        let (client, id) = (request.client.as_str(), request.id.as_str());
        let kind = request.kind.as_str();
        let Some(kind) = self.schema.resolve(kind) else {
            let known: Vec<&str> = self.schema.types.keys().map(String::as_str).collect();
            return Message::failure(
                action,
                format!("unknown device type '{kind}'; known types: {}", known.join(", ")),
            );
        };
        let stale_after = request
            .stale_after
            .or_else(|| self.schema.get(kind).and_then(|t| t.stale_after));
        let mut registry = lock(&self.registry);
        let existing = registry.by_key.get(&(client.to_owned(), id.to_owned())).cloned();
        let (mut device, changed, created) = match existing.and_then(|uuid| registry.devices.get(&uuid).cloned()) {
            // Registering again keeps what a user renamed or moved.
            Some(mut device) => {
                let before = (device.kind.clone(), device.stale_after);
                device.kind = kind.to_owned();
                if request.stale_after.is_some() {
                    device.stale_after = stale_after;
                }
                let changed = before != (device.kind.clone(), device.stale_after);
                (device, changed, false)
            }
            None => {
                if registry.devices.len() >= self.settings.max_devices {
                    return Message::failure(
                        action,
                        format!("the registry is full ({} devices)", self.settings.max_devices),
                    );
                }
                let device = Device {
                    uuid: uuid::Uuid::new_v4().to_string(),
                    client: client.to_owned(),
                    id: id.to_owned(),
                    kind: kind.to_owned(),
                    name: request.name.clone().unwrap_or_else(|| id.to_owned()),
                    room: request.room.clone().unwrap_or_default(),
                    stale_after,
                    created: unix_now(),
                    values: BTreeMap::new(),
                    sensors: BTreeMap::new(),
                    last_seen: None,
                    heard_at: Instant::now(),
                    stale: false,
                };
                (device, true, true)
            }
        };
        device.add_type_sensors(&self.schema);
        if let Err(e) = self.store(&device) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let info = device.info();
        registry.insert(device.clone());
        drop(registry);
        if created {
            self.publish(
                "event.device.announce",
                &json!({"uuid": device.uuid, "event": "event.device.announce", "data": info}),
            );
        }
        if changed {
            self.device_changed(&device);
        }
        self.mirror(vec![(format!("/device/{}/info", device.uuid), info.clone())]);
        outcome_reply(
            action,
            json!({"uuid": device.uuid, "created": created, "device": info})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
    }

    fn get(&self, action: &str, query: &DeviceQuery) -> Message {
        let registry = lock(&self.registry);
        let result = majordome_mdp::domogik::result_action(action);
        if let Some(uuid) = query.uuid.as_deref() {
            return match registry.find(uuid) {
                Some(device) => Message::new(result, json!({"devices": [device.inventory_entry(&self.schema)]})),
                None => Message::failure(action, format!("no device '{uuid}'")),
            };
        }
        let mut devices: Vec<&Device> = registry
            .devices
            .values()
            .filter(|d| query.client.as_ref().is_none_or(|c| *c == d.client))
            .filter(|d| query.room.as_ref().is_none_or(|r| *r == d.room))
            .collect();
        devices.sort_by(|a, b| (&a.client, &a.id).cmp(&(&b.client, &b.id)));
        let devices: Vec<Value> = devices.iter().map(|d| d.inventory_entry(&self.schema)).collect();
        Message::new(result, json!({"devices": devices}))
    }

    fn update(&self, action: &str, update: &DeviceUpdate) -> Message {
        let uuid = update.uuid.as_str();
        let mut registry = lock(&self.registry);
        let Some(mut device) = registry.find(uuid).cloned() else {
            return Message::failure(action, format!("no device '{uuid}'"));
        };
        if let Some(name) = &update.name {
            device.name = name.clone();
        }
        if let Some(room) = &update.room {
            device.room = room.clone();
        }
        if let Some(stale_after) = update.stale_after {
            device.stale_after = stale_after;
        }
        if let Err(e) = self.store(&device) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let info = device.info();
        registry.remove(&device.uuid);
        registry.insert(device.clone());
        drop(registry);
        self.device_changed(&device);
        self.mirror(vec![(format!("/device/{}/info", device.uuid), info.clone())]);
        outcome_reply(action, json!({"device": info}).as_object().cloned().unwrap_or_default())
    }

    fn delete(&self, action: &str, uuid: &str) -> Message {
        let mut registry = lock(&self.registry);
        let Some(uuid) = registry.find(uuid).map(|d| d.uuid.clone()) else {
            return Message::failure(action, format!("no device '{uuid}'"));
        };
        let row = uuid.clone();
        if let Err(e) = self.committer.submit(move |connection: &Connection| {
            connection.execute("DELETE FROM devices WHERE uuid = ?1", params![row])?;
            Ok(())
        }) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let device = registry.remove(&uuid).expect("found above");
        drop(registry);
        self.device_changed(&device);
        self.publish(
            "event.device.remove",
            &json!({"uuid": uuid, "event": "event.device.remove", "data": {}}),
        );
        let mut keys: Vec<(String, Value)> = device
            .values
            .keys()
            .map(|q| (format!("/device/{uuid}/{q}"), Value::Null))
            .collect();
        keys.push((format!("/device/{uuid}/info"), Value::Null));
        self.mirror(keys);
        outcome_reply(action, json!({"uuid": uuid}).as_object().cloned().unwrap_or_default())
    }

    fn command(&self, client: &mut Client, action: &str, request: &DeviceCommand) -> Message {
        let (uuid, command, parameters) = (request.uuid.as_str(), request.command.as_str(), &request.data);
        let Some(device) = lock(&self.registry).find(uuid).cloned() else {
            lock(&self.stats).outcome(None, "error.device.invalid");
            return command_error(action, "error.device.invalid", format!("no device '{uuid}'"));
        };
        let checked = match self.schema.check_command(&device.kind, command, parameters) {
            Ok(checked) => checked,
            Err(error) => {
                let identifier = error["identifier"].as_str().unwrap_or("error.internal").to_owned();
                lock(&self.stats).outcome(Some(&device.client), &identifier);
                let mut reply = Map::new();
                reply.insert("error".into(), error);
                return outcome_reply(action, reply);
            }
        };
        let forwarded = Message::new(
            "device.command.do",
            json!({"uuid": device.uuid, "id": device.id, "command": command, "data": checked}),
        );
        let started = Instant::now();
        let reply = client.request_message(&device.client, &forwarded);
        let elapsed = started.elapsed().as_secs_f64();
        let mut answer = match reply {
            Ok(reply) => {
                let mut answer = reply.data.as_object().cloned().unwrap_or_default();
                let has_result = answer.get("result").is_some_and(Value::is_object);
                let has_error = answer.get("error").is_some_and(Value::is_object);
                if !has_result && !has_error {
                    if reply.status() == Some(false) {
                        // The broker's own failure (no worker, expired) or
                        // a plugin that answered the Domogik way.
                        let why = reply.reason().unwrap_or("no reason given").to_owned();
                        answer.remove("error");
                        answer.insert(
                            "error".into(),
                            error_map(
                                "error.no.reply",
                                format!("{} did not carry it out: {why}", device.client),
                            ),
                        );
                    } else {
                        answer.insert("result".into(), json!({"identifier": "success"}));
                    }
                }
                answer
            }
            Err(e) => {
                let mut answer = Map::new();
                answer.insert(
                    "error".into(),
                    error_map("error.no.reply", format!("no answer from {}: {e}", device.client)),
                );
                answer
            }
        };
        answer.remove("status");
        answer.remove("reason");
        let identifier = answer
            .get("result")
            .or_else(|| answer.get("error"))
            .and_then(|m| m.get("identifier"))
            .and_then(Value::as_str)
            .unwrap_or("success")
            .to_owned();
        {
            let mut stats = lock(&self.stats);
            stats.outcome(Some(&device.client), &identifier);
            if stats.latencies.len() == LATENCY_WINDOW {
                stats.latencies.pop_front();
            }
            stats.latencies.push_back(elapsed);
        }
        outcome_reply(action, answer)
    }

    fn inventory(&self, action: &str) -> Message {
        let registry = lock(&self.registry);
        let mut rooms: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let devices: Map<String, Value> = registry
            .devices
            .values()
            .map(|d| {
                if !d.room.is_empty() {
                    rooms.entry(d.room.clone()).or_default().push(d.uuid.clone());
                }
                (d.uuid.clone(), d.inventory_entry(&self.schema))
            })
            .collect();
        let rooms: Map<String, Value> = rooms
            .into_iter()
            .map(|(name, mut devices)| {
                devices.sort();
                (name.clone(), json!({"name": name, "devices": devices}))
            })
            .collect();
        Message::new(
            majordome_mdp::domogik::result_action(action),
            json!({"devices": devices, "rooms": rooms, "schema": self.schema}),
        )
    }

    fn stats(&self) -> Value {
        let (devices, stale) = {
            let registry = lock(&self.registry);
            (
                registry.devices.len(),
                registry.devices.values().filter(|d| d.stale).count(),
            )
        };
        let stats = lock(&self.stats);
        let mut sorted: Vec<f64> = stats.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let micros = |p: f64| percentile(&sorted, p).map(|s| (s * 1e6).round());
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        json!({
            "devices": devices,
            "stale": stale,
            "requests": stats.requests,
            "commands": stats.outcomes,
            "command_latency_us": {"p50": micros(0.5), "p99": micros(0.99), "samples": sorted.len()},
            "events": stats.events,
            "values": stats.values,
            "values_stored": load(&self.history.stored),
            "values_failed": load(&self.history.failed),
            "unknown_device": stats.unknown_device,
            "unknown_sensor": stats.unknown_sensor,
            "too_many_quantities": stats.too_many_quantities,
            "device_stats_dropped": stats.device_stats_dropped,
            "malformed_events": stats.malformed_events,
            "failed_later": stats.failed_later,
            "stale_marked": stats.stale_marked,
            "clone_failures": stats.clone_failures,
            "clients": stats.clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raspy_names_come_from_the_client_id() {
        let device = Device {
            uuid: "u".into(),
            client: "plugin-fake.box".into(),
            id: "fake-dimmer".into(),
            kind: "dimmer".into(),
            name: "Dimmer".into(),
            room: String::new(),
            stale_after: None,
            created: 0.0,
            values: BTreeMap::new(),
            sensors: BTreeMap::new(),
            last_seen: None,
            heard_at: Instant::now(),
            stale: false,
        };
        assert_eq!(device.raspy_name(), "box.fake.fake-dimmer");
    }

    /// Sensor ids are FNV-1a of `<uuid>/<quantity>` (the 64-bit function's
    /// published offset and prime), cut to 53 bits: the same in every
    /// process and on every start, and exact as a JSON number anywhere.
    #[test]
    fn sensor_ids_are_a_stable_hash() {
        assert_eq!(sensor_id("3f2c", "temperature"), 4_662_061_468_038_534);
        assert_ne!(sensor_id("3f2c", "temperature"), sensor_id("3f2c", "humidity"));
        assert_ne!(sensor_id("3f2", "c/temperature"), 0);
    }

    #[test]
    fn replies_carry_status_and_reason_from_the_maps() {
        let ok = outcome_reply(
            "device.command.do",
            json!({"result": {"identifier": "success"}})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(ok.action, "device.command.result");
        assert_eq!(ok.status(), Some(true));
        assert_eq!(ok.reason(), Some(""));
        let error = command_error("device.command.do", "error.device.invalid", "no device 'x'");
        assert_eq!(error.status(), Some(false));
        assert_eq!(error.reason(), Some("no device 'x'"));
        assert_eq!(error.data["error"]["identifier"], "error.device.invalid");
    }
}
