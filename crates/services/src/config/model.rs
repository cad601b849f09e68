//! The configuration model: whether a client is configured, which keys
//! it lacks, and the values a `config.set` may store. Pure: no socket, no
//! database.

use serde_json::{Map, Value};

use crate::manifest::Manifest;
use majordome_api::config::{Target, CONFIGURED};

/// A `configured` value as Domogik writes it: a JSON boolean, or the
/// strings "1"/"0", "true"/"false", "True"/"False".
pub(crate) fn configured_flag(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::Number(n) if n.as_i64() == Some(1) => Some(true),
        Value::Number(n) if n.as_i64() == Some(0) => Some(false),
        Value::String(text) => match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "y" => Some(true),
            "0" | "false" | "n" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the client is configured: not if `configured` was set to
/// false; else every required key of its manifest has a value (stored or
/// default), or, with no manifest, some key was set.
pub(crate) fn configured(manifest: Option<&Manifest>, stored: &Map<String, Value>) -> bool {
    let explicit = stored.get(CONFIGURED).and_then(configured_flag);
    if explicit == Some(false) {
        return false;
    }
    match manifest {
        Some(_) => missing_required(manifest, stored).is_empty(),
        None => explicit == Some(true) || stored.keys().any(|key| key != CONFIGURED),
    }
}

/// The required keys of the client's manifest that have no value.
pub(crate) fn missing_required(manifest: Option<&Manifest>, stored: &Map<String, Value>) -> Vec<String> {
    manifest.map_or_else(Vec::new, |manifest| {
        manifest
            .config
            .iter()
            .filter(|k| k.required && !stored.contains_key(&k.key) && k.default.is_none())
            .map(|k| k.key.clone())
            .collect()
    })
}

/// The values of a `config.set`, checked (and converted) against the
/// manifest, or why they cannot be stored.
pub(crate) fn checked(
    manifest: Option<&Manifest>,
    target: &Target,
    mut values: Vec<(String, Value)>,
) -> Result<Vec<(String, Value)>, String> {
    for (key, value) in values.iter_mut() {
        if key.is_empty() || key.len() > 255 {
            return Err("a config key must be 1 to 255 bytes long".into());
        }
        if value.is_null() {
            return Err(format!("'{key}' has no value; use config.delete to remove it"));
        }
        if key == CONFIGURED {
            match configured_flag(value) {
                Some(flag) => *value = Value::Bool(flag),
                None => return Err(format!("'{CONFIGURED}' must be true or false, not {value}")),
            }
            continue;
        }
        if let Some(manifest) = manifest {
            let Some(spec) = manifest.key(key) else {
                let known: Vec<&str> = manifest.config.iter().map(|k| k.key.as_str()).collect();
                return Err(format!(
                    "{} '{}' has no config key '{key}' (it has: {})",
                    target.kind,
                    target.name,
                    known.join(", ")
                ));
            };
            *value = spec.check(value)?;
        }
    }
    Ok(values)
}

/// A client's values with the manifest's defaults filled in.
pub(crate) fn with_defaults(manifest: Option<&Manifest>, stored: Map<String, Value>) -> Map<String, Value> {
    let mut values = Map::new();
    if let Some(manifest) = manifest {
        for key in &manifest.config {
            if let Some(default) = &key.default {
                values.insert(key.key.clone(), default.clone());
            }
        }
    }
    values.extend(stored);
    values
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn manifest() -> Manifest {
        Manifest::parse(
            &json!({"name": "fake", "version": "1", "config": [
                {"key": "interval", "type": "integer", "min": 1, "max": 60, "required": true},
                {"key": "unit", "type": "string", "default": "C"},
            ]})
            .to_string(),
        )
        .unwrap()
    }

    fn target() -> Target {
        Target {
            kind: "plugin".into(),
            name: "fake".into(),
            host: "box".into(),
        }
    }

    #[test]
    fn configured_needs_the_required_keys_and_false_wins() {
        let manifest = manifest();
        let mut stored = Map::new();
        assert!(!configured(Some(&manifest), &stored));
        assert_eq!(missing_required(Some(&manifest), &stored), ["interval"]);
        stored.insert("interval".into(), json!(5));
        assert!(configured(Some(&manifest), &stored));
        stored.insert(CONFIGURED.into(), json!("0"));
        assert!(!configured(Some(&manifest), &stored), "an explicit false wins");
        // No manifest: configured once anything was set.
        assert!(!configured(None, &Map::new()));
        assert!(configured(None, &Map::from_iter([("x".to_owned(), json!(1))])));
        assert_eq!(
            with_defaults(Some(&manifest), Map::new()),
            Map::from_iter([("unit".to_owned(), json!("C"))])
        );
    }

    #[test]
    fn values_are_checked_and_converted() {
        let manifest = manifest();
        let values = vec![
            ("interval".to_owned(), json!("30")),
            (CONFIGURED.to_owned(), json!("True")),
        ];
        let good = checked(Some(&manifest), &target(), values).unwrap();
        assert_eq!(
            good,
            [("interval".to_owned(), json!(30)), (CONFIGURED.to_owned(), json!(true))]
        );
        for (bad, why) in [
            (("interval", json!(0)), "between 1 and 60"),
            (("colour", json!("red")), "has no config key 'colour'"),
            (("unit", Value::Null), "use config.delete"),
            (("", json!(1)), "1 to 255 bytes"),
            ((CONFIGURED, json!("maybe")), "must be true or false"),
        ] {
            let error = checked(Some(&manifest), &target(), vec![(bad.0.to_owned(), bad.1)]).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
