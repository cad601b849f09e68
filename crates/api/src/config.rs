//! The config service (`config`, also answered as Domogik's `dbmgr`,
//! `admin` and `dbmanager`): plugins' configuration keys.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::ClientId;
use crate::{ApiError, Fields, Message};

/// The built-in key every plugin has: whether it may run.
pub const CONFIGURED: &str = "configured";

/// One request to the config service, read once.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigRequest {
    /// `config.get`: one key (with the manifest's default when unset), or
    /// every key.
    Get(ConfigGet),
    /// `config.set`: one key (`key` + `value`) or several (`data`).
    Set(ConfigSet),
    /// `config.delete`: one key, or all of a client's.
    Delete(ConfigDelete),
    /// Domogik's `device.get` sent to `admin`: the devices of one client,
    /// or of all (answered by asking `devices`).
    DeviceGet { client: Option<ClientId> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ConfigGet {
    #[serde(flatten)]
    pub client: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ConfigSet {
    #[serde(flatten)]
    pub client: Target,
    /// (key, value) in the order given.
    pub values: Vec<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ConfigDelete {
    #[serde(flatten)]
    pub client: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The client a request is about, as Domogik names it: `type` (default
/// `plugin`), `name` (or Domogik's `id`, or the seed's `plugin`), `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Target {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub host: String,
}

impl Target {
    pub fn id(&self) -> ClientId {
        ClientId::new(&self.kind, &self.name, &self.host)
    }

    fn read(fields: &Fields<'_>) -> Result<Target, ApiError> {
        let name = match fields.optional_text("name")? {
            Some(name) => Some(name),
            None => match fields.optional_text("id")? {
                Some(id) => Some(id),
                None => fields.optional_text("plugin")?,
            },
        };
        match (name, fields.optional_text("host")?) {
            (Some(name), Some(host)) => Ok(Target {
                kind: fields.text_or("type", "plugin")?,
                name,
                host,
            }),
            _ => Err(fields.needs(
                "'name' (or 'id') and 'host', e.g. {\"type\": \"plugin\", \"name\": \"fake\", \"host\": \"box\"}",
            )),
        }
    }
}

impl ConfigRequest {
    /// The actions, for the error that lists them.
    pub const ACTIONS: &'static str =
        "config.get, config.set, config.delete (and device.get, from the devices service)";

    pub fn parse(message: &Message) -> Result<ConfigRequest, ApiError> {
        let action = message.action.as_str();
        let fields = Fields::of(action, &message.data)?;
        match action {
            "config.get" => Ok(ConfigRequest::Get(ConfigGet {
                client: Target::read(&fields)?,
                key: fields.key()?,
            })),
            "config.set" => {
                let client = Target::read(&fields)?;
                let values = match (fields.value("key"), fields.value("value"), fields.value("data")) {
                    (Some(Value::String(key)), Some(value), None) => vec![(key.clone(), value.clone())],
                    (None, None, Some(Value::Object(map))) if !map.is_empty() => {
                        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                    }
                    // Set to null: said apart, since it means something.
                    (Some(Value::String(key)), None, None) if fields.map.contains_key("value") => {
                        vec![(key.clone(), Value::Null)]
                    }
                    _ => return Err(fields.needs("'key' and 'value', or 'data' with {key: value, …}")),
                };
                Ok(ConfigRequest::Set(ConfigSet { client, values }))
            }
            "config.delete" => Ok(ConfigRequest::Delete(ConfigDelete {
                client: Target::read(&fields)?,
                key: fields.key()?,
            })),
            "device.get" => {
                let named = ["type", "name", "host"].iter().any(|f| fields.map.contains_key(*f));
                let client = if named { Some(Target::read(&fields)?.id()) } else { None };
                Ok(ConfigRequest::DeviceGet { client })
            }
            other => Err(ApiError::UnknownAction {
                service: "config",
                action: other.to_owned(),
                known: Self::ACTIONS.to_owned(),
            }),
        }
    }
}

impl Fields<'_> {
    /// `key`: absent, or a string.
    fn key(&self) -> Result<Option<String>, ApiError> {
        match self.map.get("key") {
            None => Ok(None),
            Some(Value::String(key)) => Ok(Some(key.clone())),
            Some(_) => Err(self.invalid("key", "must be a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(action: &str, data: Value) -> Result<ConfigRequest, ApiError> {
        ConfigRequest::parse(&Message::new(action, data))
    }

    #[test]
    fn requests_are_read_once_with_domogik_s_names() {
        let get = parse(
            "config.get",
            json!({"type": "plugin", "id": "fake", "host": "box", "key": "unit"}),
        )
        .unwrap();
        let ConfigRequest::Get(get) = get else {
            panic!("{get:?}")
        };
        assert_eq!(get.client.id().to_string(), "plugin-fake.box");
        assert_eq!(get.key.as_deref(), Some("unit"));
        let set = parse(
            "config.set",
            json!({"plugin": "fake", "host": "box", "data": {"a": 1, "b": true}}),
        )
        .unwrap();
        let ConfigRequest::Set(set) = set else {
            panic!("{set:?}")
        };
        assert_eq!(set.values, [("a".to_owned(), json!(1)), ("b".to_owned(), json!(true))]);
        let null = parse(
            "config.set",
            json!({"name": "fake", "host": "box", "key": "unit", "value": null}),
        )
        .unwrap();
        assert!(matches!(null, ConfigRequest::Set(ConfigSet { values, .. }) if values[0].1.is_null()));
        assert_eq!(
            parse("device.get", json!({})).unwrap(),
            ConfigRequest::DeviceGet { client: None }
        );
    }

    #[test]
    fn bad_requests_say_what_is_missing() {
        let no_host = parse("config.get", json!({"name": "fake"})).unwrap_err().to_string();
        assert!(no_host.contains("needs 'name' (or 'id') and 'host'"), "{no_host}");
        let no_value = parse("config.set", json!({"name": "fake", "host": "box", "key": "unit"})).unwrap_err();
        assert!(no_value.to_string().contains("needs 'key' and 'value'"), "{no_value}");
        let key = parse("config.delete", json!({"name": "fake", "host": "box", "key": 3})).unwrap_err();
        assert_eq!(key.field(), Some("key"));
        let unknown = parse("config.frobnicate", json!({})).unwrap_err().to_string();
        assert!(unknown.starts_with("unknown action 'config.frobnicate'"), "{unknown}");
        assert!(parse("config.get", json!([1])).is_err());
    }
}
