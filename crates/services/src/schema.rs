//! Device types: the schema shipped with majordome
//! (`schema/device_types.json`), plus the types plugins define in their
//! manifests. A type lists its commands (with parameters, checked like
//! config keys) and its values (with a unit and the event subject that
//! carries them). RasPy's oids (`sensor.temperature`, …) are aliases.
//!
//! Checking a command is pure: [`Schema::check_command`] turns a request
//! into the parameters to forward, or into ago control's error map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::manifest::{ConfigKey, Manifest};

/// The schema majordome ships.
pub const SHIPPED: &str = include_str!("../schema/device_types.json");

/// One command of a device type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    #[serde(default)]
    pub description: String,
    /// Its parameters, with the same rules as config keys.
    #[serde(default)]
    pub parameters: Vec<ConfigKey>,
}

/// One value a device of a type reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueSpec {
    pub unit: Option<String>,
    /// The event subject that carries it, e.g.
    /// `event.environment.temperaturechanged`.
    pub event: String,
}

/// A device type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceType {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub commands: BTreeMap<String, CommandSpec>,
    #[serde(default)]
    pub values: BTreeMap<String, ValueSpec>,
    /// Seconds of silence after which a device is stale; none for devices
    /// that only speak when something changes.
    #[serde(default)]
    pub stale_after: Option<f64>,
}

/// The whole schema: units, types, aliases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    pub units: BTreeMap<String, String>,
    pub types: BTreeMap<String, DeviceType>,
    /// Other names for types (RasPy's oids), to the type's name.
    pub aliases: BTreeMap<String, String>,
}

/// ago control's error map: `{"identifier", "message", "data":
/// {"description"}}`.
pub fn error_map(identifier: &str, message: impl Into<String>) -> Value {
    let message = message.into();
    json!({"identifier": identifier, "message": message, "data": {"description": message}})
}

impl Schema {
    /// The shipped schema.
    pub fn shipped() -> Schema {
        Schema::parse(SHIPPED).expect("the shipped device schema is valid")
    }

    /// Parses a schema and checks its parameters' defaults and aliases.
    pub fn parse(text: &str) -> Result<Schema, String> {
        let schema: Schema = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (name, kind) in &schema.types {
            check_type(name, kind)?;
        }
        for (alias, target) in &schema.aliases {
            if !schema.types.contains_key(target) {
                return Err(format!("the alias '{alias}' names no type ('{target}')"));
            }
        }
        Ok(schema)
    }

    /// The shipped schema plus the types the manifests define. A manifest
    /// cannot redefine a shipped type; what it gets wrong is returned as
    /// (plugin, why) and skipped.
    pub fn with_manifests(mut self, manifests: &[Manifest]) -> (Schema, Vec<(String, String)>) {
        let mut rejected = Vec::new();
        for manifest in manifests {
            for (name, definition) in &manifest.define_types {
                let parsed = serde_json::from_value::<DeviceType>(definition.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|kind| check_type(name, &kind).map(|()| kind));
                match parsed {
                    Ok(_) if self.resolve(name).is_some() => {
                        rejected.push((manifest.name.clone(), format!("the type '{name}' already exists")))
                    }
                    Ok(kind) => {
                        self.types.insert(name.clone(), kind);
                    }
                    Err(why) => rejected.push((manifest.name.clone(), format!("type '{name}': {why}"))),
                }
            }
        }
        (self, rejected)
    }

    /// The canonical name of a type or alias.
    pub fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if let Some((name, _)) = self.types.get_key_value(name) {
            return Some(name);
        }
        self.aliases.get(name).map(String::as_str)
    }

    /// A type by name or alias.
    pub fn get(&self, name: &str) -> Option<&DeviceType> {
        self.resolve(name).and_then(|name| self.types.get(name))
    }

    /// Checks `command` with its parameters for a device of type
    /// `type_name`; returns the parameters converted to their types, or
    /// ago's error map. Parameters the command does not take are passed
    /// through untouched (plugins may know more than the schema).
    pub fn check_command(
        &self,
        type_name: &str,
        command: &str,
        parameters: &Map<String, Value>,
    ) -> Result<Value, Value> {
        let Some(kind) = self.get(type_name) else {
            return Err(error_map(
                "error.device.invalid",
                format!("the device's type '{type_name}' is not in the schema"),
            ));
        };
        let Some(spec) = kind.commands.get(command) else {
            let known: Vec<&str> = kind.commands.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "it takes no command".to_owned()
            } else {
                format!("it takes {}", known.join(", "))
            };
            return Err(error_map(
                "error.command.invalid",
                format!("a {type_name} has no command '{command}': {known}"),
            ));
        };
        let mut checked = parameters.clone();
        for parameter in &spec.parameters {
            match parameters.get(&parameter.key) {
                None | Some(Value::Null) => {
                    if let Some(default) = &parameter.default {
                        checked.insert(parameter.key.clone(), default.clone());
                    } else if parameter.required {
                        return Err(error_map(
                            "error.parameter.missing",
                            format!("'{command}' needs the parameter '{}'", parameter.key),
                        ));
                    }
                }
                Some(value) => match parameter.check(value) {
                    Ok(value) => {
                        checked.insert(parameter.key.clone(), value);
                    }
                    Err(why) => return Err(error_map("error.parameter.invalid", why)),
                },
            }
        }
        Ok(Value::Object(checked))
    }

    /// The quantity an event is about: `data.quantity` when given, else
    /// the type's value carried by this subject, else the subject's last
    /// word without `changed` (`temperaturechanged` → `temperature`).
    pub fn quantity_of(&self, type_name: &str, subject: &str, data: &Value) -> String {
        if let Some(quantity) = data.get("quantity").and_then(Value::as_str).filter(|q| valid_name(q)) {
            return quantity.to_owned();
        }
        if let Some(kind) = self.get(type_name) {
            if let Some((quantity, _)) = kind.values.iter().find(|(_, v)| v.event == subject) {
                return quantity.clone();
            }
        }
        let word = subject.rsplit('.').next().unwrap_or(subject);
        let word = word.strip_suffix("changed").unwrap_or(word);
        if valid_name(word) {
            word.to_owned()
        } else {
            "value".to_owned()
        }
    }
}

/// Quantities become Clone keys: keep them to plain words.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

fn check_type(name: &str, kind: &DeviceType) -> Result<(), String> {
    if !valid_name(name) {
        return Err(format!("the type name '{name}' must be letters, digits, '-' or '_'"));
    }
    for (command, spec) in &kind.commands {
        for parameter in &spec.parameters {
            if let Some(default) = &parameter.default {
                parameter
                    .check(default)
                    .map_err(|e| format!("{name}.{command}: the default of {e}"))?;
            }
        }
    }
    for quantity in kind.values.keys() {
        if !valid_name(quantity) {
            return Err(format!("{name}: the value name '{quantity}' must be a plain word"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_shipped_schema_has_ago_and_raspy_types() {
        let schema = Schema::shipped();
        for name in ["switch", "dimmer", "temperaturesensor", "binarysensor", "thermostat"] {
            assert!(schema.get(name).is_some(), "{name}");
        }
        for (oid, name) in [
            ("sensor.temperature", "temperaturesensor"),
            ("sensor.wind", "windsensor"),
            ("media.camera", "camera"),
            ("media.tv", "tv"),
        ] {
            assert_eq!(schema.resolve(oid), Some(name));
        }
        assert_eq!(schema.resolve("toaster"), None);
    }

    #[test]
    fn commands_are_checked_with_ago_identifiers() {
        let schema = Schema::shipped();
        let ok = schema.check_command("dimmer", "setlevel", &params(json!({"level": "40"})));
        assert_eq!(ok, Ok(json!({"level": 40})));
        let identifier = |r: Result<Value, Value>| r.unwrap_err()["identifier"].as_str().unwrap().to_owned();
        assert_eq!(
            identifier(schema.check_command("dimmer", "setlevel", &Map::new())),
            "error.parameter.missing"
        );
        assert_eq!(
            identifier(schema.check_command("dimmer", "setlevel", &params(json!({"level": 101})))),
            "error.parameter.invalid"
        );
        assert_eq!(
            identifier(schema.check_command("dimmer", "setlevel", &params(json!({"level": "high"})))),
            "error.parameter.invalid"
        );
        assert_eq!(
            identifier(schema.check_command("switch", "setlevel", &Map::new())),
            "error.command.invalid"
        );
        assert_eq!(
            identifier(schema.check_command("thermostat", "setthermostatmode", &params(json!({"mode": "warp"})))),
            "error.parameter.invalid"
        );
        let error = schema
            .check_command("temperaturesensor", "on", &Map::new())
            .unwrap_err();
        assert!(error["message"].as_str().unwrap().contains("takes no command"));
        assert_eq!(error["data"]["description"], error["message"]);
        assert_eq!(
            schema.check_command("media.tv", "setchannel", &params(json!({"channel": 7, "extra": true}))),
            Ok(json!({"channel": 7, "extra": true}))
        );
    }

    #[test]
    fn quantities_come_from_the_event() {
        let schema = Schema::shipped();
        assert_eq!(
            schema.quantity_of("temperaturesensor", "event.environment.temperaturechanged", &json!({})),
            "temperature"
        );
        assert_eq!(
            schema.quantity_of("dimmer", "event.device.statechanged", &json!({"level": 3})),
            "state"
        );
        assert_eq!(
            schema.quantity_of("energymeter", "event.environment.powerchanged", &json!({})),
            "power"
        );
        assert_eq!(
            schema.quantity_of("x", "event.environment.humiditychanged", &json!({})),
            "humidity"
        );
        assert_eq!(schema.quantity_of("x", "event.a", &json!({"quantity": "../etc"})), "a");
    }

    #[test]
    fn manifests_add_types_but_cannot_replace_shipped_ones() {
        let manifest = Manifest::parse(
            r#"{"name": "pool", "version": "1", "define_types": {
                "poolpump": {"commands": {"setspeed": {"parameters": [{"key": "rpm", "type": "integer", "min": 0, "max": 3000, "required": true}]}},
                             "values": {"speed": {"unit": null, "event": "event.device.statechanged"}}},
                "switch": {"commands": {}},
                "broken": {"commands": 3}
            }}"#,
        )
        .unwrap();
        let (schema, rejected) = Schema::shipped().with_manifests(&[manifest]);
        assert!(schema.get("poolpump").is_some());
        assert_eq!(schema.get("switch"), Schema::shipped().get("switch"));
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(schema
            .check_command("poolpump", "setspeed", &params(json!({"rpm": 5000})))
            .is_err());
    }
}
