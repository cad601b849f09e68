//! Plugin manifests: what a plugin is, how it starts, and the config keys
//! it takes, with their types. One JSON file per plugin in the plugins
//! folder.
//!
//! ```json
//! {
//!   "name": "fake", "type": "plugin", "version": "1.0",
//!   "description": "Fake devices",
//!   "command": ["majordome", "plugin", "fake"],
//!   "config": [
//!     {"key": "interval", "type": "integer", "default": 5, "min": 1,
//!      "description": "Seconds between readings"}
//!   ],
//!   "device_types": ["switch", "dimmer"]
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

fn default_type() -> String {
    "plugin".to_owned()
}

/// A plugin's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Domogik's client type: `plugin` (default), `core`, …
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// The command that starts it (program and arguments); empty for a
    /// plugin that is started elsewhere.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub config: Vec<ConfigKey>,
    #[serde(default)]
    pub device_types: Vec<String>,
    /// Device types this plugin defines beyond the shipped schema, in the
    /// schema's own form (see `devices::schema`), by type name.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub define_types: serde_json::Map<String, Value>,
    /// `majordome up` starts it (through the manager's supervisor).
    #[serde(default)]
    pub autostart: bool,
    /// The supervisor restarts it when it dies (with backoff and a limit).
    #[serde(default)]
    pub restart: bool,
}

/// The type of a config value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    String,
    Integer,
    Number,
    Boolean,
}

/// One config key a plugin takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKey {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: ValueType,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub description: String,
    /// A plugin is configured once every required key has a value.
    #[serde(default)]
    pub required: bool,
    /// The only values allowed, if given.
    #[serde(default)]
    pub choices: Option<Vec<Value>>,
    /// Bounds for numbers.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl ConfigKey {
    /// `value` if it fits this key, else why not. Numbers and booleans
    /// given as strings (as UIs often send them) are converted.
    pub fn check(&self, value: &Value) -> Result<Value, String> {
        let key = &self.key;
        let value = match (self.kind, value) {
            (ValueType::String, Value::String(_)) => value.clone(),
            (ValueType::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => value.clone(),
            (ValueType::Integer, Value::String(s)) => match s.trim().parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => return Err(format!("'{key}' must be an integer, not \"{s}\"")),
            },
            (ValueType::Number, Value::Number(_)) => value.clone(),
            (ValueType::Number, Value::String(s)) => match s.trim().parse::<f64>().ok().filter(|n| n.is_finite()) {
                Some(n) => Value::from(n),
                None => return Err(format!("'{key}' must be a number, not \"{s}\"")),
            },
            (ValueType::Boolean, Value::Bool(_)) => value.clone(),
            (ValueType::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" | "on" => Value::Bool(true),
                "false" | "no" | "n" | "0" | "off" => Value::Bool(false),
                _ => return Err(format!("'{key}' must be true or false, not \"{s}\"")),
            },
            (kind, other) => {
                let kind = match kind {
                    ValueType::String => "a string",
                    ValueType::Integer => "an integer",
                    ValueType::Number => "a number",
                    ValueType::Boolean => "true or false",
                };
                return Err(format!("'{key}' must be {kind}, not {other}"));
            }
        };
        if let Some(n) = value.as_f64() {
            if self.min.is_some_and(|min| n < min) || self.max.is_some_and(|max| n > max) {
                let bound = |b: Option<f64>| b.map_or("…".to_owned(), |b| b.to_string());
                return Err(format!(
                    "'{key}' must be between {} and {}, not {n}",
                    bound(self.min),
                    bound(self.max)
                ));
            }
        }
        if let Some(choices) = &self.choices {
            if !choices.contains(&value) {
                let list: Vec<String> = choices.iter().map(Value::to_string).collect();
                return Err(format!("'{key}' must be one of {}, not {value}", list.join(", ")));
            }
        }
        Ok(value)
    }
}

impl Manifest {
    pub fn key(&self, key: &str) -> Option<&ConfigKey> {
        self.config.iter().find(|k| k.key == key)
    }

    /// Parses and checks a manifest.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if manifest.name.is_empty()
            || !manifest
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "the name '{}' must be letters, digits, '-' or '_'",
                manifest.name
            ));
        }
        for key in &manifest.config {
            if let Some(default) = &key.default {
                key.check(default).map_err(|e| format!("the default of {e}"))?;
            }
        }
        Ok(manifest)
    }
}

/// What [`load_folder`] found: the manifests, and the files it could not
/// use with why.
#[derive(Debug, Default)]
pub struct Loaded {
    pub manifests: Vec<Manifest>,
    pub invalid: Vec<(PathBuf, String)>,
}

/// Reads every `*.json` in `folder` (sorted by name). A missing folder is
/// no manifest at all; a bad file is reported, not fatal.
pub fn load_folder(folder: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return loaded;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| Manifest::parse(&t))
        {
            Ok(manifest)
                if loaded
                    .manifests
                    .iter()
                    .any(|m| m.name == manifest.name && m.kind == manifest.kind) =>
            {
                loaded
                    .invalid
                    .push((path, format!("a second manifest for '{}'", manifest.name)));
            }
            Ok(manifest) => loaded.manifests.push(manifest),
            Err(e) => loaded.invalid.push((path, e)),
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(kind: ValueType) -> ConfigKey {
        ConfigKey {
            key: "k".into(),
            kind,
            default: None,
            description: String::new(),
            required: false,
            choices: None,
            min: None,
            max: None,
        }
    }

    #[test]
    fn values_are_checked_and_converted_by_type() {
        let integer = ConfigKey {
            min: Some(1.0),
            max: Some(60.0),
            ..key(ValueType::Integer)
        };
        assert_eq!(integer.check(&json!(5)), Ok(json!(5)));
        assert_eq!(integer.check(&json!("7")), Ok(json!(7)));
        assert!(integer.check(&json!(0)).unwrap_err().contains("between 1 and 60"));
        assert!(integer
            .check(&json!(2.5))
            .unwrap_err()
            .contains("must be an integer, not 2.5"));
        assert!(integer.check(&json!("x")).unwrap_err().contains("must be an integer"));
        let boolean = key(ValueType::Boolean);
        assert_eq!(boolean.check(&json!("yes")), Ok(json!(true)));
        assert_eq!(boolean.check(&json!(false)), Ok(json!(false)));
        assert!(boolean.check(&json!(3)).is_err());
        let number = key(ValueType::Number);
        assert_eq!(number.check(&json!("2.5")), Ok(json!(2.5)));
        assert!(number.check(&json!("NaN")).is_err());
        let choice = ConfigKey {
            choices: Some(vec![json!("C"), json!("F")]),
            ..key(ValueType::String)
        };
        assert_eq!(choice.check(&json!("C")), Ok(json!("C")));
        assert!(choice.check(&json!("K")).unwrap_err().contains("one of \"C\", \"F\""));
        assert!(key(ValueType::String).check(&json!({"a": 1})).is_err());
    }

    #[test]
    fn manifests_load_from_a_folder_and_bad_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let good =
            json!({"name": "fake", "version": "1", "config": [{"key": "interval", "type": "integer", "default": 5}]});
        std::fs::write(dir.path().join("fake.json"), good.to_string()).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{not json").unwrap();
        let bad_default =
            json!({"name": "x", "version": "1", "config": [{"key": "k", "type": "boolean", "default": "maybe"}]});
        std::fs::write(dir.path().join("x.json"), bad_default.to_string()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let loaded = load_folder(dir.path());
        assert_eq!(loaded.manifests.len(), 1);
        assert_eq!(loaded.manifests[0].kind, "plugin");
        assert_eq!(loaded.manifests[0].key("interval").unwrap().default, Some(json!(5)));
        assert_eq!(loaded.invalid.len(), 2, "{:?}", loaded.invalid);
        assert!(load_folder(&dir.path().join("missing")).manifests.is_empty());
    }
}
