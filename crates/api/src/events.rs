//! Events on the bus (Domogik's pub/sub: a category, a JSON object), those
//! the core services read and say.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{ClientId, ClientStatus};
use crate::ApiError;

/// `plugin.status`: what every client says of itself when it starts, then
/// every 15 s (a supervised plugin: a third of the manager's `dead_after`,
/// at most 15 s), and when it stops. Domogik's clients name themselves with
/// `id` (the name), majordome's with `name` too; `type` defaults to
/// `plugin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PluginStatus {
    #[serde(rename = "type", default = "plugin")]
    pub kind: String,
    pub name: String,
    pub host: String,
    pub event: ClientStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

fn plugin() -> String {
    "plugin".to_owned()
}

impl PluginStatus {
    pub const CATEGORY: &'static str = "plugin.status";

    /// Reads an event's data; `name` may come as `id`, as Domogik sends it.
    pub fn parse(data: &Value) -> Result<PluginStatus, ApiError> {
        let fields = crate::Fields::of(Self::CATEGORY, data)?;
        let status = fields.text("event")?;
        Ok(PluginStatus {
            kind: fields.text_or("type", "plugin")?,
            name: fields.either("id", "name")?,
            host: fields.text("host")?,
            event: status
                .parse()
                .map_err(|e: crate::client::BadStatus| fields.invalid("event", e.to_string()))?,
            comment: fields.optional_text("comment")?.unwrap_or_default(),
        })
    }

    pub fn id(&self) -> ClientId {
        ClientId::new(&self.kind, &self.name, &self.host)
    }

    /// The event's data as every reader expects it: majordome's `name`
    /// and Domogik's `id` both, and the comment even when empty.
    pub fn to_data(&self) -> Value {
        serde_json::json!({
            "type": self.kind, "name": self.name, "id": self.name, "host": self.host,
            "event": self.event, "comment": self.comment,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn plugin_status_as_domogik_and_majordome_send_it() {
        let domogik = json!({"type": "plugin", "id": "diskfree", "host": "darkstar", "event": "alive"});
        let status = PluginStatus::parse(&domogik).unwrap();
        assert_eq!(status.id().to_string(), "plugin-diskfree.darkstar");
        assert_eq!(status.event, ClientStatus::Alive);
        let ours = json!({"name": "fake", "host": "box", "event": "stopped", "comment": "bye"});
        let status = PluginStatus::parse(&ours).unwrap();
        assert_eq!((status.kind.as_str(), status.comment.as_str()), ("plugin", "bye"));
        for (bad, field) in [
            (json!({"id": "x", "host": "h", "event": "sleeping"}), "event"),
            (json!({"id": "x", "event": "alive"}), "host"),
            (json!({"host": "h", "event": "alive"}), "id"),
            (json!({"id": 3, "host": "h", "event": "alive"}), "id"),
        ] {
            let error = PluginStatus::parse(&bad).unwrap_err();
            assert_eq!(error.field(), Some(field), "{bad}: {error}");
        }
        assert!(PluginStatus::parse(&json!("text")).is_err());
        let said = PluginStatus::parse(&ours).unwrap().to_data();
        assert_eq!(PluginStatus::parse(&said).unwrap(), PluginStatus::parse(&ours).unwrap());
        assert_eq!((&said["id"], &said["event"]), (&json!("fake"), &json!("stopped")));
    }
}
