//! Which plugin owns which device: what the forwarder checks a plugin's
//! events against, so that a plugin speaks only for itself. The device
//! service keeps it up to date as devices and their sensors come and go;
//! the forwarder reads it. Both run in the hub's process.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use serde_json::Value;

/// Device uuid → client id, and Domogik sensor id → client id.
#[derive(Debug, Default)]
pub struct Owners {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    devices: HashMap<String, String>,
    sensors: HashMap<i64, String>,
}

/// The category plugins say how they are under.
pub const PLUGIN_STATUS: &str = "plugin.status";
/// Domogik's category for sensor values, keyed by sensor id.
pub const CLIENT_SENSOR: &str = "client.sensor";

impl Owners {
    /// `uuid` belongs to the plugin `client` (`plugin-<name>.<host>`).
    pub fn set_device(&self, uuid: &str, client: &str) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.devices.insert(uuid.to_owned(), client.to_owned());
    }

    /// `uuid` is gone, with its sensors.
    pub fn remove_device(&self, uuid: &str, sensors: impl IntoIterator<Item = i64>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.devices.remove(uuid);
        for id in sensors {
            inner.sensors.remove(&id);
        }
    }

    /// The sensor `id` belongs to the plugin `client`.
    pub fn set_sensor(&self, id: i64, client: &str) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.sensors.insert(id, client.to_owned());
    }

    /// Whether the plugin `identity` may publish this event: its own
    /// status, and values of its own devices (or of devices nobody owns
    /// yet). `Err` says what it tried.
    pub fn speaks_for_itself(&self, identity: &str, category: &str, data: &Value) -> Result<(), String> {
        if category.starts_with("plugin.") {
            // `plugin.status`, `plugin.configuration` and whatever a reader
            // takes by prefix, as the manager and the plugins read them:
            // `type` (plugin when absent), the name under `id` (Domogik),
            // `name` or `plugin`, and `host`. Each name given must be the
            // plugin's own.
            let field = |name| data.get(name).and_then(Value::as_str);
            let kind = field("type").unwrap_or("plugin");
            let host = field("host").unwrap_or("");
            for name in [field("id"), field("name"), field("plugin")].into_iter().flatten() {
                let about = format!("{kind}-{name}.{host}");
                if about != identity {
                    return Err(format!("'{identity}' may not publish {category} of '{about}'"));
                }
            }
            return Ok(());
        }
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let device = |uuid: &str| match inner.devices.get(uuid) {
            Some(owner) if owner != identity => Err(format!(
                "'{identity}' may not publish values of device {uuid}, which belongs to '{owner}'"
            )),
            _ => Ok(()),
        };
        if category == CLIENT_SENSOR {
            for key in data.as_object().into_iter().flat_map(|o| o.keys()) {
                match key.parse::<i64>() {
                    Ok(id) => match inner.sensors.get(&id) {
                        Some(owner) if owner != identity => {
                            return Err(format!(
                                "'{identity}' may not publish values of sensor {id}, which belongs to '{owner}'"
                            ))
                        }
                        _ => {}
                    },
                    Err(_) => device(key.split_once('/').map_or(key.as_str(), |(uuid, _)| uuid))?,
                }
            }
            return Ok(());
        }
        match data.get("uuid").and_then(Value::as_str) {
            Some(uuid) => device(uuid),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_plugin_speaks_for_itself_and_its_devices_only() {
        let owners = Owners::default();
        owners.set_device("lamp", "plugin-fake.box");
        owners.set_device("door", "plugin-zwave.box");
        owners.set_sensor(42, "plugin-zwave.box");
        let me = "plugin-fake.box";
        let status = |name: &str| json!({"type": "plugin", "name": name, "host": "box", "event": "alive"});
        assert!(owners.speaks_for_itself(me, PLUGIN_STATUS, &status("fake")).is_ok());
        let other = owners
            .speaks_for_itself(me, PLUGIN_STATUS, &status("zwave"))
            .unwrap_err();
        assert_eq!(
            other,
            "'plugin-fake.box' may not publish plugin.status of 'plugin-zwave.box'"
        );
        // A longer category that a prefix subscriber takes for a status, or
        // a configuration notice, is held to the same.
        assert!(owners
            .speaks_for_itself(me, "plugin.status.x", &status("zwave"))
            .is_err());
        assert!(owners
            .speaks_for_itself(me, "plugin.configuration", &json!({"plugin": "zwave", "host": "box"}))
            .is_err());
        // Domogik's `id` is what the manager reads first.
        let sly = json!({"name": "fake", "id": "zwave", "host": "box", "event": "dead"});
        assert!(owners.speaks_for_itself(me, PLUGIN_STATUS, &sly).is_err());
        let domogik = json!({"id": "fake", "host": "box", "event": "alive"});
        assert!(owners.speaks_for_itself(me, PLUGIN_STATUS, &domogik).is_ok());
        let value = |uuid: &str| json!({"uuid": uuid, "event": "event.device.statechanged", "data": {"level": 1}});
        assert!(owners
            .speaks_for_itself(me, "event.device.statechanged", &value("lamp"))
            .is_ok());
        assert!(owners
            .speaks_for_itself(me, "event.device.statechanged", &value("new"))
            .is_ok());
        assert!(owners
            .speaks_for_itself(me, "event.device.statechanged", &value("door"))
            .is_err());
        assert!(owners.speaks_for_itself(me, CLIENT_SENSOR, &json!({"42": 1})).is_err());
        assert!(owners
            .speaks_for_itself(me, CLIENT_SENSOR, &json!({"door/level": 1}))
            .is_err());
        assert!(owners
            .speaks_for_itself(me, CLIENT_SENSOR, &json!({"lamp/level": 1, "7": 2}))
            .is_ok());
        owners.remove_device("door", [42]);
        assert!(owners.speaks_for_itself(me, CLIENT_SENSOR, &json!({"42": 1})).is_ok());
    }
}
