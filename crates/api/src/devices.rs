//! The device service (`devices`): the device registry, commands, the
//! inventory.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{ApiError, Fields, Message};

/// One request to the device service, read once.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceRequest {
    /// `device.create.do`: register (or register again) a plugin's device.
    Create(DeviceCreate),
    /// `device.get` (also `devices.get`): one device, or a list.
    Get(DeviceQuery),
    /// `device.update.do`: rename, move, change the silence allowed.
    Update(DeviceUpdate),
    /// `device.delete.do`.
    Delete { uuid: String },
    /// `device.command.do`: a command to a device, through its plugin.
    Command(DeviceCommand),
    /// `inventory.get` (also `inventory`, and ago's `device.command.do`
    /// with command `inventory`).
    Inventory,
    /// `device_types.get`: the schema.
    DeviceTypes,
    /// `stats.get`.
    Stats,
}

/// `device.create.do`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceCreate {
    /// The plugin's client id, e.g. `plugin-fake.box`.
    pub client: String,
    /// The plugin's own name for the device (at most 200 characters, no
    /// `/`).
    pub id: String,
    /// Its type (see `device_types.get`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Shown name; the `id` when not said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Seconds of silence before it is stale; the type's when not said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<f64>,
}

/// `device.get`: one device by `uuid`, or those of a `client` and/or
/// `room` (all when neither).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

/// `device.update.do`: what is not said is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceUpdate {
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An empty room takes the device out of its room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// `Some(None)`: never stale (`null` on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<Option<f64>>,
}

/// `device.command.do`: `uuid`, `command` and its parameters in `data` (or,
/// as ago's older clients send them, beside the other fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceCommand {
    pub uuid: String,
    pub command: String,
    #[serde(default)]
    pub data: Map<String, Value>,
}

impl DeviceCommand {
    /// ago control's error identifier for a command that could not be
    /// read.
    pub fn error_identifier(error: &ApiError) -> &'static str {
        match error.field() {
            Some("command") => "error.command.missing",
            Some("data") => "error.parameter.invalid",
            _ => "error.parameter.missing",
        }
    }
}

impl DeviceRequest {
    /// The actions, for the error that lists them and the counters.
    pub const ACTIONS: &'static [&'static str] = &[
        "device.create.do",
        "device.get",
        "devices.get",
        "device.update.do",
        "device.delete.do",
        "device.command.do",
        "inventory.get",
        "inventory",
        "device_types.get",
        "stats.get",
    ];

    pub fn parse(message: &Message) -> Result<DeviceRequest, ApiError> {
        let action = message.action.as_str();
        let empty = Map::new();
        // Requests without data (`inventory.get`, say) may send none.
        let data = match &message.data {
            Value::Null => Value::Object(empty),
            data => data.clone(),
        };
        let fields = Fields::of(action, &data)?;
        Ok(match action {
            "device.create.do" => {
                let (Some(client), Some(id), Some(kind)) = (
                    fields.trimmed("client")?,
                    fields.trimmed("id")?,
                    fields.trimmed("type")?,
                ) else {
                    return Err(fields.needs(
                        "'client' (e.g. plugin-fake.box), 'id' (the plugin's own name for the device) and 'type' \
                         (see device_types.get)",
                    ));
                };
                if id.len() > 200 || id.contains('/') {
                    return Err(fields.invalid("id", "has at most 200 characters and no '/'"));
                }
                DeviceRequest::Create(DeviceCreate {
                    client,
                    id,
                    kind,
                    name: fields.trimmed("name")?,
                    room: fields.trimmed("room")?,
                    stale_after: fields.seconds("stale_after")?.flatten(),
                })
            }
            "device.get" | "devices.get" => DeviceRequest::Get(DeviceQuery {
                uuid: fields.optional_text("uuid")?,
                client: fields.optional_text("client")?,
                room: fields.optional_text("room")?,
            }),
            "device.update.do" => {
                let name = match fields.value("name") {
                    None => None,
                    Some(Value::String(name)) if !name.trim().is_empty() => Some(name.trim().to_owned()),
                    Some(other) => {
                        return Err(fields.invalid("name", format!("must be a non-empty string, not {other}")))
                    }
                };
                let room = match fields.value("room") {
                    None => None,
                    Some(Value::String(room)) => Some(room.trim().to_owned()),
                    Some(other) => return Err(fields.invalid("room", format!("must be a string, not {other}"))),
                };
                DeviceRequest::Update(DeviceUpdate {
                    uuid: fields.text("uuid")?,
                    name,
                    room,
                    stale_after: fields.seconds("stale_after")?,
                })
            }
            "device.delete.do" => DeviceRequest::Delete {
                uuid: fields.text("uuid")?,
            },
            "device.command.do" if fields.optional_text("command")?.as_deref() == Some("inventory") => {
                DeviceRequest::Inventory
            }
            "device.command.do" => {
                let data = match fields.map.get("data") {
                    Some(Value::Object(parameters)) => parameters.clone(),
                    Some(Value::Null) | None => fields
                        .map
                        .iter()
                        .filter(|(k, _)| !["uuid", "command", "data"].contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    Some(other) => {
                        return Err(fields.invalid("data", format!("must be an object of parameters, not {other}")))
                    }
                };
                DeviceRequest::Command(DeviceCommand {
                    uuid: fields.text("uuid")?,
                    command: fields.text("command")?,
                    data,
                })
            }
            "inventory.get" | "inventory" => DeviceRequest::Inventory,
            "device_types.get" => DeviceRequest::DeviceTypes,
            "stats.get" => DeviceRequest::Stats,
            other => {
                return Err(ApiError::UnknownAction {
                    service: "devices",
                    action: other.to_owned(),
                    known: Self::ACTIONS.join(", "),
                })
            }
        })
    }
}

impl Fields<'_> {
    /// A string, trimmed; empty is absent.
    fn trimmed(&self, field: &'static str) -> Result<Option<String>, ApiError> {
        Ok(self
            .optional_text(field)?
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()))
    }

    /// Seconds ≥ 0: absent is `None`, null is `Some(None)`.
    fn seconds(&self, field: &'static str) -> Result<Option<Option<f64>>, ApiError> {
        match self.map.get(field) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(value) => match value.as_f64().filter(|s| s.is_finite() && *s >= 0.0) {
                Some(seconds) => Ok(Some(Some(seconds))),
                None => Err(self.invalid(field, format!("must be seconds ≥ 0, not {value}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(action: &str, data: Value) -> Result<DeviceRequest, ApiError> {
        DeviceRequest::parse(&Message::new(action, data))
    }

    #[test]
    fn commands_in_both_of_ago_s_forms() {
        let new = parse(
            "device.command.do",
            json!({"uuid": "u", "command": "setlevel", "data": {"level": 4}}),
        );
        let old = parse(
            "device.command.do",
            json!({"uuid": "u", "command": "setlevel", "level": 4}),
        );
        assert_eq!(new.unwrap(), old.unwrap());
        assert_eq!(
            parse("device.command.do", json!({"command": "inventory"})).unwrap(),
            DeviceRequest::Inventory
        );
        for (bad, identifier) in [
            (json!({"command": "on"}), "error.parameter.missing"),
            (json!({"uuid": "u"}), "error.command.missing"),
            (
                json!({"uuid": "u", "command": "on", "data": 3}),
                "error.parameter.invalid",
            ),
        ] {
            let error = parse("device.command.do", bad.clone()).unwrap_err();
            assert_eq!(DeviceCommand::error_identifier(&error), identifier, "{bad}: {error}");
        }
    }

    #[test]
    fn creates_and_updates_are_checked() {
        let create = parse(
            "device.create.do",
            json!({"client": "plugin-fake.box", "id": " lamp ", "type": "switch"}),
        );
        let DeviceRequest::Create(create) = create.unwrap() else {
            panic!()
        };
        assert_eq!((create.id.as_str(), create.name), ("lamp", None));
        assert!(parse("device.create.do", json!({"id": "x"}))
            .unwrap_err()
            .to_string()
            .contains("needs 'client'"));
        let slash = parse(
            "device.create.do",
            json!({"client": "c", "id": "a/b", "type": "switch"}),
        );
        assert_eq!(slash.unwrap_err().field(), Some("id"));
        let never = parse("device.update.do", json!({"uuid": "u", "stale_after": null})).unwrap();
        assert!(matches!(
            never,
            DeviceRequest::Update(DeviceUpdate {
                stale_after: Some(None),
                ..
            })
        ));
        let bad = parse("device.update.do", json!({"uuid": "u", "name": " "})).unwrap_err();
        assert_eq!(bad.field(), Some("name"));
        assert!(parse("inventory.get", Value::Null).is_ok());
    }
}
