//! The manager (`manager`): clients, their statuses and history, and the
//! plugins this host runs.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{ClientId, ClientStatus};
use crate::{ApiError, Fields, Message};

/// One request to the manager, read once.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagerRequest {
    /// `client.list.get` (flat, as Domogik's manager answers) or the
    /// seed's `clients.list.get` (wrapped in `clients`).
    ClientList {
        wrapped: bool,
    },
    /// `client.detail.get` / `clients.detail.get`: every client, or the
    /// one `id` names.
    ClientDetail {
        id: Option<String>,
        wrapped: bool,
    },
    /// `client.history.get`: by `id`, or by `type`, `name` and `host`.
    ClientHistory(ClientId),
    /// `package.detail.get`: the manifests.
    PackageDetail,
    /// `device_types.get`: each plugin's device types.
    DeviceTypes,
    PluginStart(PluginTarget),
    PluginStop(PluginTarget),
    /// `plugin.log.get`: the last `lines` lines (1 to 1,000, default 100)
    /// of the log the manager keeps of a plugin it runs.
    PluginLog {
        target: PluginTarget,
        lines: usize,
    },
}

/// The most lines `plugin.log.get` returns.
pub const MAX_LOG_LINES: usize = 1000;

/// Which plugin `plugin.start.do` / `plugin.stop.do` is about: `name` (or
/// `id`), `type` (default `plugin`), `host` (default: the manager's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PluginTarget {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl ManagerRequest {
    /// The actions, for the error that lists them.
    pub const ACTIONS: &'static str = "client.list.get, client.detail.get, client.history.get, package.detail.get, \
                                       device_types.get, plugin.start.do, plugin.stop.do, plugin.log.get";

    pub fn parse(message: &Message) -> Result<ManagerRequest, ApiError> {
        let action = message.action.as_str();
        let fields = Fields::of(action, &message.data)?;
        Ok(match action {
            "client.list.get" | "clients.list.get" => ManagerRequest::ClientList {
                wrapped: action.starts_with("clients."),
            },
            "client.detail.get" | "clients.detail.get" => ManagerRequest::ClientDetail {
                id: fields.optional_text("id")?,
                wrapped: action.starts_with("clients."),
            },
            "client.history.get" | "clients.history.get" => {
                let id = match (
                    fields.optional_text("id")?,
                    fields.optional_text("name")?,
                    fields.optional_text("host")?,
                ) {
                    (Some(id), _, _) => id
                        .parse()
                        .map_err(|e: crate::client::BadClientId| fields.invalid("id", e.to_string()))?,
                    (None, Some(name), Some(host)) => ClientId::new(&fields.text_or("type", "plugin")?, &name, &host),
                    _ => return Err(fields.needs("'id' (e.g. plugin-fake.box), or 'type', 'name' and 'host'")),
                };
                ManagerRequest::ClientHistory(id)
            }
            "package.detail.get" | "packages.detail.get" => ManagerRequest::PackageDetail,
            "device_types.get" => ManagerRequest::DeviceTypes,
            "plugin.start.do" | "plugin.stop.do" | "plugin.log.get" => {
                let Some(name) = fields.optional_text("name")?.or(fields.optional_text("id")?) else {
                    return Err(fields.needs("'name' (or 'id'), e.g. {\"type\": \"plugin\", \"name\": \"fake\"}"));
                };
                let target = PluginTarget {
                    kind: fields.text_or("type", "plugin")?,
                    name,
                    host: fields.optional_text("host")?,
                };
                match action {
                    "plugin.start.do" => ManagerRequest::PluginStart(target),
                    "plugin.stop.do" => ManagerRequest::PluginStop(target),
                    _ => {
                        let lines = fields.number("lines")?.unwrap_or(100.0);
                        if !(1.0..=MAX_LOG_LINES as f64).contains(&lines) {
                            return Err(fields.invalid("lines", format!("must be 1 to {MAX_LOG_LINES}, not {lines}")));
                        }
                        ManagerRequest::PluginLog {
                            target,
                            lines: lines as usize,
                        }
                    }
                }
            }
            other => {
                return Err(ApiError::UnknownAction {
                    service: "manager",
                    action: other.to_owned(),
                    known: Self::ACTIONS.to_owned(),
                })
            }
        })
    }
}

/// One client as the manager lists it: Domogik's fields (its manager's
/// `Clients.add`), plus the seed's `id` (the name) and majordome's
/// `comment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClientEntry {
    pub name: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub host: String,
    pub status: ClientStatus,
    /// Unknown (null) until the config service said.
    pub configured: Option<bool>,
    /// Its process while this manager runs it (Domogik said 0 otherwise).
    pub pid: Option<u32>,
    /// `<type>-<name>`.
    pub package_id: String,
    /// `domogik-<name>.<host>`.
    pub xpl_source: String,
    /// Unix time it was last heard from.
    pub last_seen: Option<f64>,
    pub comment: String,
    /// Always empty here (no xPL).
    pub compliant_xpl_clients: Vec<String>,
    pub xpl_clients_only: Vec<String>,
    /// `client.detail.get` only: what the manifest says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// One status change, as `client.history.get` lists them (newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HistoryEntry {
    pub status: ClientStatus,
    pub comment: String,
    /// Unix time (Domogik's name).
    pub timestamp: f64,
    /// The same, majordome's name.
    pub time: f64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(action: &str, data: Value) -> Result<ManagerRequest, ApiError> {
        ManagerRequest::parse(&Message::new(action, data))
    }

    #[test]
    fn both_spellings_and_domogik_s_names() {
        assert_eq!(
            parse("clients.list.get", json!({})).unwrap(),
            ManagerRequest::ClientList { wrapped: true }
        );
        let by_parts = parse(
            "client.history.get",
            json!({"type": "plugin", "name": "fake", "host": "box"}),
        );
        assert_eq!(
            by_parts.unwrap(),
            ManagerRequest::ClientHistory(ClientId::new("plugin", "fake", "box"))
        );
        let start = parse("plugin.start.do", json!({"id": "fake"})).unwrap();
        assert_eq!(
            start,
            ManagerRequest::PluginStart(PluginTarget {
                kind: "plugin".into(),
                name: "fake".into(),
                host: None
            })
        );
        let error = parse("plugin.stop.do", json!({})).unwrap_err().to_string();
        assert!(error.contains("needs 'name' (or 'id')"), "{error}");
        let error = parse("client.history.get", json!({"id": "fake"})).unwrap_err();
        assert_eq!(error.field(), Some("id"));
        assert!(parse("client.frobnicate", json!({})).is_err());
    }

    #[test]
    fn a_log_tail_is_1_to_1000_lines() {
        let asked = parse("plugin.log.get", json!({"name": "fake"})).unwrap();
        assert!(matches!(asked, ManagerRequest::PluginLog { lines: 100, .. }));
        let asked = parse("plugin.log.get", json!({"name": "fake", "lines": "20"})).unwrap();
        assert!(matches!(asked, ManagerRequest::PluginLog { lines: 20, .. }));
        for lines in [json!(0), json!(1001), json!("many"), json!(-3), json!([1])] {
            let error = parse("plugin.log.get", json!({"name": "fake", "lines": lines})).unwrap_err();
            assert_eq!(error.field(), Some("lines"), "{lines}");
        }
    }
}
