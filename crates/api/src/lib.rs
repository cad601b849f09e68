//! majordome's bus API, typed: one Rust type per action and event of the
//! core services, and one enum per service whose `parse` reads a Domogik
//! [`Message`] once (as mini-redis's `Command::from_frame` does), so a
//! service's handler matches on variants, never on strings. No I/O: the
//! services, the plugin SDK and the gateway use these types; the bytes on
//! the wire are what Domogik's clients send and read.
//!
//! With the `schema` feature every type also derives a JSON Schema, for
//! the gateway's OpenAPI document.

pub mod client;
pub mod config;
pub mod devices;
pub mod manager;

pub use client::{ClientId, ClientStatus};
pub use events::PluginStatus;
pub use majordome_mdp::domogik::Message;
pub mod events;
pub mod history;

use serde_json::{Map, Value};

/// A message the API cannot read, naming what is wrong; its text is the
/// `reason` a service answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The data is not a JSON object.
    #[error("{what} needs a JSON object, not {found}")]
    NotAnObject { what: String, found: String },
    #[error("{what} needs '{field}'{example}")]
    Missing {
        what: String,
        field: &'static str,
        example: String,
    },
    #[error("{what}: '{field}' {why}")]
    Invalid {
        what: String,
        field: &'static str,
        why: String,
    },
    /// A request that lacks what it needs, said as a whole.
    #[error("{what} needs {needs}")]
    Needs { what: String, needs: &'static str },
    #[error("unknown action '{action}': the {service} service answers {known}")]
    UnknownAction {
        service: &'static str,
        action: String,
        known: String,
    },
}

impl ApiError {
    /// The field at fault, if one is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::Missing { field, .. } | ApiError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The fields of a message's data, read with errors that name the action
/// and the field: the one place that reads untyped JSON.
pub(crate) struct Fields<'a> {
    what: &'a str,
    pub(crate) map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn of(what: &'a str, data: &'a Value) -> Result<Fields<'a>, ApiError> {
        match data {
            Value::Object(map) => Ok(Fields { what, map }),
            other => Err(ApiError::NotAnObject {
                what: what.to_owned(),
                found: kind_of(other).to_owned(),
            }),
        }
    }

    pub(crate) fn invalid(&self, field: &'static str, why: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            what: self.what.to_owned(),
            field,
            why: why.into(),
        }
    }

    pub(crate) fn needs(&self, needs: &'static str) -> ApiError {
        ApiError::Needs {
            what: self.what.to_owned(),
            needs,
        }
    }

    fn missing(&self, field: &'static str) -> ApiError {
        ApiError::Missing {
            what: self.what.to_owned(),
            field,
            example: String::new(),
        }
    }

    /// A present, non-null field.
    pub(crate) fn value(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// A non-empty string, if there is one; another type is an error.
    pub(crate) fn optional_text(&self, field: &'static str) -> Result<Option<String>, ApiError> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.invalid(field, format!("must be a string, not {}", kind_of(other)))),
        }
    }

    pub(crate) fn text(&self, field: &'static str) -> Result<String, ApiError> {
        self.optional_text(field)?.ok_or_else(|| self.missing(field))
    }

    pub(crate) fn text_or(&self, field: &'static str, default: &str) -> Result<String, ApiError> {
        Ok(self.optional_text(field)?.unwrap_or_else(|| default.to_owned()))
    }

    /// `first`, or else `second`; missing both names `first`.
    pub(crate) fn either(&self, first: &'static str, second: &'static str) -> Result<String, ApiError> {
        match self.optional_text(first)? {
            Some(text) => Ok(text),
            None => self.optional_text(second)?.ok_or_else(|| self.missing(first)),
        }
    }
}

/// How a JSON value is named in an error.
impl Fields<'_> {
    /// A number, or a string that holds one; absent or null is `None`.
    pub(crate) fn number(&self, field: &'static str) -> Result<Option<f64>, ApiError> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| self.invalid(field, format!("must be a number, not \"{s}\""))),
            Some(other) => Err(self.invalid(field, format!("must be a number, not {other}"))),
        }
    }
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(all(test, feature = "schema"))]
mod schema_tests {
    use super::*;

    /// Every request and reply type has a JSON Schema that names its
    /// fields as the wire does (`type`, not `kind`).
    #[test]
    fn schemas_use_the_wire_names() {
        let create = serde_json::to_value(schemars::schema_for!(devices::DeviceCreate)).unwrap();
        let properties = create["properties"].as_object().expect("an object schema");
        assert!(
            properties.contains_key("type") && !properties.contains_key("kind"),
            "{create}"
        );
        assert_eq!(create["required"], serde_json::json!(["client", "id", "type"]));
        let status = serde_json::to_value(schemars::schema_for!(ClientStatus)).unwrap();
        assert!(status.to_string().contains("not-configured"), "{status}");
        for schema in [
            schemars::schema_for!(config::ConfigGet),
            schemars::schema_for!(manager::ClientEntry),
            schemars::schema_for!(history::HistoryQuery),
            schemars::schema_for!(devices::DeviceCommand),
            schemars::schema_for!(events::PluginStatus),
        ] {
            assert!(serde_json::to_value(schema).unwrap().is_object());
        }
    }
}
