//! Devices, their values and sensors, and the counters: a pure model.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::schema::Schema;

/// The most quantities (sensors) one device may have values for; values
/// of further quantities are dropped and counted, so that a plugin making
/// up names cannot grow the registry without bound.
pub(crate) const MAX_QUANTITIES: usize = 64;

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

/// A current value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reading {
    pub(crate) level: Value,
    pub(crate) unit: Value,
    pub(crate) time: f64,
}

/// A device as the registry holds it.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub(crate) uuid: String,
    pub(crate) client: String,
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) room: String,
    pub(crate) stale_after: Option<f64>,
    pub(crate) created: f64,
    pub(crate) values: BTreeMap<String, Reading>,
    /// Its sensors (Domogik's name for a quantity of a device): those of
    /// its type, and any other it has had values for.
    pub(crate) sensors: BTreeMap<String, i64>,
    /// Unix time of the last value, if any.
    pub(crate) last_seen: Option<f64>,
    /// Silence is counted from here: the last value, or when the service
    /// started knowing the device.
    pub(crate) heard_at: Instant,
    pub(crate) stale: bool,
}

impl Device {
    /// RasPy's name: `<host>.<service>.<device>`, from the client id
    /// `<type>-<name>.<host>`.
    pub(crate) fn raspy_name(&self) -> String {
        let (service, host) = self.client.rsplit_once('.').unwrap_or((&self.client, ""));
        let service = service.split_once('-').map_or(service, |(_, name)| name);
        format!("{host}.{service}.{}", self.id)
    }

    pub(crate) fn info(&self) -> Value {
        json!({
            "uuid": self.uuid, "client": self.client, "id": self.id, "type": self.kind,
            "name": self.name, "room": self.room, "raspy_name": self.raspy_name(),
            "stale_after": self.stale_after, "created": self.created,
            "lastseen": self.last_seen, "stale": self.stale,
        })
    }

    /// Adds the sensors its type declares.
    pub(crate) fn add_type_sensors(&mut self, schema: &Schema) {
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
    pub(crate) fn inventory_entry(&self, schema: &Schema) -> Value {
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
pub(crate) struct Registry {
    pub(crate) devices: HashMap<String, Device>,
    pub(crate) by_key: HashMap<(String, String), String>,
    pub(crate) by_raspy: HashMap<String, String>,
    /// Sensor id → (uuid, quantity), for Domogik's `client.sensor`.
    pub(crate) sensors: HashMap<i64, (String, String)>,
    /// Which plugin owns which device and sensor, shared with the
    /// forwarder (which checks that a plugin speaks for itself only).
    pub(crate) owners: std::sync::Arc<majordome_access::Owners>,
}

impl Registry {
    /// Shares `owners` and fills it with the devices known now.
    pub(crate) fn share_owners(&mut self, owners: std::sync::Arc<majordome_access::Owners>) {
        for device in self.devices.values() {
            owners.set_device(&device.uuid, &device.client);
            for id in device.sensors.values() {
                owners.set_sensor(*id, &device.client);
            }
        }
        self.owners = owners;
    }

    pub(crate) fn insert(&mut self, device: Device) {
        self.owners.set_device(&device.uuid, &device.client);
        for id in device.sensors.values() {
            self.owners.set_sensor(*id, &device.client);
        }
        self.by_key
            .insert((device.client.clone(), device.id.clone()), device.uuid.clone());
        self.by_raspy.insert(device.raspy_name(), device.uuid.clone());
        for (quantity, id) in &device.sensors {
            self.sensors.insert(*id, (device.uuid.clone(), quantity.clone()));
        }
        self.devices.insert(device.uuid.clone(), device);
    }

    pub(crate) fn remove(&mut self, uuid: &str) -> Option<Device> {
        let device = self.devices.remove(uuid)?;
        self.owners.remove_device(uuid, device.sensors.values().copied());
        self.by_key.remove(&(device.client.clone(), device.id.clone()));
        self.by_raspy.remove(&device.raspy_name());
        for id in device.sensors.values() {
            self.sensors.remove(id);
        }
        Some(device)
    }

    /// The sensor of a device's quantity, added if new; `None` for an
    /// unknown device, or one that already has `MAX_QUANTITIES`.
    pub(crate) fn sensor(&mut self, uuid: &str, quantity: &str) -> Option<i64> {
        let device = self.devices.get_mut(uuid)?;
        if let Some(id) = device.sensors.get(quantity) {
            return Some(*id);
        }
        if device.sensors.len() >= MAX_QUANTITIES {
            return None;
        }
        let id = sensor_id(uuid, quantity);
        self.owners.set_sensor(id, &device.client);
        device.sensors.insert(quantity.to_owned(), id);
        self.sensors.insert(id, (uuid.to_owned(), quantity.to_owned()));
        Some(id)
    }

    /// A device by uuid, or by its RasPy name.
    pub(crate) fn find(&self, name: &str) -> Option<&Device> {
        self.devices
            .get(name)
            .or_else(|| self.by_raspy.get(name).and_then(|uuid| self.devices.get(uuid)))
    }
}

/// Per plugin counts.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ClientStats {
    pub(crate) commands: u64,
    pub(crate) errors: u64,
    pub(crate) values: u64,
}

/// What `stats.get` tells.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: BTreeMap<String, u64>,
    /// Command outcomes by ago identifier.
    pub(crate) outcomes: BTreeMap<String, u64>,
    /// The latest command round trips through a plugin, in seconds.
    pub(crate) latencies: VecDeque<f64>,
    pub(crate) events: u64,
    pub(crate) values: u64,
    pub(crate) unknown_device: u64,
    /// `client.sensor` values for a sensor id no device has.
    pub(crate) unknown_sensor: u64,
    /// Values of a quantity past a device's `MAX_QUANTITIES`.
    pub(crate) too_many_quantities: u64,
    /// `device-stats` the publisher could not take.
    pub(crate) device_stats_dropped: u64,
    pub(crate) malformed_events: u64,
    pub(crate) failed_later: u64,
    pub(crate) clone_failures: u64,
    pub(crate) stale_marked: u64,
    pub(crate) clients: BTreeMap<String, ClientStats>,
}

pub(crate) const LATENCY_WINDOW: usize = 1024;

impl Stats {
    pub(crate) fn outcome(&mut self, client: Option<&str>, identifier: &str) {
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

pub(crate) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[index.min(sorted.len() - 1)])
}

pub(crate) fn device_unit(schema: &Schema, kind: &str, quantity: &str) -> Value {
    schema
        .get(kind)
        .and_then(|t| t.values.get(quantity))
        .and_then(|v| v.unit.clone())
        .map_or(Value::Null, Value::String)
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
}
