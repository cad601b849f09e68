//! The scenario tables of the one database: `scenarios` (one row per
//! scenario, its JSON and whether it is enabled) and `scenario_runs` (each
//! run's record, the newest `history_limit` per scenario kept).

use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, StoreError};
use serde_json::Value;

use crate::model::{self, Scenario};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS scenarios (
    name    TEXT PRIMARY KEY,
    body    TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scenario_runs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    name     TEXT NOT NULL,
    started  REAL NOT NULL,
    result   TEXT NOT NULL,
    record   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS scenario_runs_by_name ON scenario_runs (name, id);
";

/// Every stored scenario; one that no longer reads (a newer version's,
/// a hand edit) is skipped and said, not fatal.
pub(crate) fn load(reader: &Connection) -> Result<Vec<Scenario>, StoreError> {
    let mut statement = reader.prepare("SELECT name, body, enabled FROM scenarios ORDER BY name")?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, bool>(2)?,
        ))
    })?;
    let mut scenarios = Vec::new();
    for row in rows {
        let (name, body, enabled) = row?;
        let read = serde_json::from_str::<Value>(&body)
            .map_err(|e| e.to_string())
            .and_then(|value| model::read(&value).map_err(|e| e.to_string()));
        match read {
            Ok(mut scenario) => {
                scenario.enabled = enabled;
                scenarios.push(scenario);
            }
            Err(why) => tracing::error!(scenario = %name, "a stored scenario does not read, skipped: {why}"),
        }
    }
    Ok(scenarios)
}

/// Stores scenarios (new or replaced); returns once durable.
pub(crate) fn save(committer: &Committer, scenarios: Vec<Scenario>, now: f64) -> Result<(), StoreError> {
    committer.submit(move |c| {
        for scenario in &scenarios {
            let body = serde_json::to_string(scenario).expect("a scenario is JSON");
            c.execute(
                "INSERT INTO scenarios (name, body, enabled, updated) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body, enabled = excluded.enabled,
                 updated = excluded.updated",
                params![scenario.name, body, scenario.enabled, now],
            )?;
        }
        Ok(())
    })
}

/// Deletes a scenario and its runs; whether it was there.
pub(crate) fn delete(committer: &Committer, name: &str) -> Result<bool, StoreError> {
    let name = name.to_owned();
    committer.submit(move |c| {
        c.execute("DELETE FROM scenario_runs WHERE name = ?1", params![name])?;
        Ok(c.execute("DELETE FROM scenarios WHERE name = ?1", params![name])? > 0)
    })
}

/// Enables or disables a scenario (its body keeps the flag too).
pub(crate) fn set_enabled(committer: &Committer, scenario: &Scenario, now: f64) -> Result<(), StoreError> {
    save(committer, vec![scenario.clone()], now)
}

/// Records a run, keeping the newest `keep` of its scenario; not waited
/// for (a run record lost in a crash is a line of history, not a setting).
pub(crate) fn record(committer: &Committer, record: Value, keep: usize) {
    let name = record["scenario"].as_str().unwrap_or_default().to_owned();
    let started = record["started"].as_f64().unwrap_or_default();
    let result = record["result"].as_str().unwrap_or_default().to_owned();
    let _ticket = committer.enqueue(move |c| {
        c.execute(
            "INSERT INTO scenario_runs (name, started, result, record) VALUES (?1, ?2, ?3, ?4)",
            params![name, started, result, record.to_string()],
        )?;
        c.execute(
            "DELETE FROM scenario_runs WHERE name = ?1 AND id NOT IN
             (SELECT id FROM scenario_runs WHERE name = ?1 ORDER BY id DESC LIMIT ?2)",
            params![name, keep as i64],
        )?;
        Ok(())
    });
}

/// The last `last` runs of a scenario, newest first.
pub(crate) fn history(reader: &Connection, name: &str, last: usize) -> Result<Vec<Value>, StoreError> {
    let mut statement =
        reader.prepare_cached("SELECT record FROM scenario_runs WHERE name = ?1 ORDER BY id DESC LIMIT ?2")?;
    let rows = statement.query_map(params![name, last as i64], |row| row.get::<_, String>(0))?;
    let mut runs = Vec::new();
    for row in rows {
        runs.push(serde_json::from_str(&row?).unwrap_or(Value::Null));
    }
    Ok(runs)
}
