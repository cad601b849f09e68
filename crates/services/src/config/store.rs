//! The `config` table: one row per (client, key), the value as JSON.

use majordome_client::unix_now;
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, StoreError};
use serde_json::{Map, Value};

use majordome_api::config::Target;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS config (
    type    TEXT NOT NULL,
    name    TEXT NOT NULL,
    host    TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (type, name, host, key)
);
";

/// Stored values of `target`, by key.
pub(crate) fn stored(reader: &Connection, target: &Target) -> Result<Map<String, Value>, StoreError> {
    let mut statement = reader
        .prepare_cached("SELECT key, value FROM config WHERE type = ?1 AND name = ?2 AND host = ?3 ORDER BY key")?;
    let rows = statement.query_map(params![target.kind, target.name, target.host], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut values = Map::new();
    for row in rows {
        let (key, text) = row?;
        values.insert(key, serde_json::from_str(&text).unwrap_or(Value::String(text)));
    }
    Ok(values)
}

/// Stores `values` of `target`; returns once they are durable.
pub(crate) fn save(committer: &Committer, target: &Target, values: &[(String, Value)]) -> Result<(), StoreError> {
    let rows: Vec<(String, String)> = values.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    let t = target.clone();
    let now = unix_now();
    committer.submit(move |c| {
        for (key, value) in &rows {
            c.execute(
                "INSERT INTO config (type, name, host, key, value, updated) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (type, name, host, key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                params![t.kind, t.name, t.host, key, value, now],
            )?;
        }
        Ok(())
    })
}

/// Deletes one key of `target`, or all of them; how many rows went.
pub(crate) fn remove(committer: &Committer, target: &Target, key: Option<String>) -> Result<usize, StoreError> {
    let t = target.clone();
    committer.submit(move |c| match &key {
        Some(key) => c.execute(
            "DELETE FROM config WHERE type = ?1 AND name = ?2 AND host = ?3 AND key = ?4",
            params![t.kind, t.name, t.host, key],
        ),
        None => c.execute(
            "DELETE FROM config WHERE type = ?1 AND name = ?2 AND host = ?3",
            params![t.kind, t.name, t.host],
        ),
    })
}
