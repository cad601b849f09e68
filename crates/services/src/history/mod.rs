//! Sensor history (service `history`): every numeric device value with its
//! time, in the `history` table of the one database.
//!
//! The devices service appends values in batches through the group
//! committer (one transaction and one fsync per batch, not per value).
//! `history.get` (also Domogik's `sensor_history.get`) reads through its
//! own connection: the last N values, or a period, which comes back as
//! min/avg/max per time bucket when it holds more values than
//! `max_points`. Values older than the retention are pruned at start and
//! then every hour.
//!
//! The modules: `writer` (the table and its writes: batches, retention)
//! and `service` (the `history` service's reads and threads).

mod service;
mod writer;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use majordome_store::StoreError;
use serde_json::Value;
pub use service::HistoryService;
pub use writer::HistoryWriter;

/// How history behaves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// Values older than this are deleted; `None` keeps everything.
    #[serde(rename = "days", with = "retention_days")]
    pub retention: Option<Duration>,
    /// The most values one answer lists; a longer period is bucketed.
    pub max_points: usize,
    /// Worker threads answering `history`.
    pub workers: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            retention: Some(Duration::from_secs(365 * 86_400)),
            max_points: 1000,
            workers: 2,
        }
    }
}

/// `retention` as the configuration file says it: days, 0 for forever.
mod retention_days {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// The longest retention a file may ask for (100 years).
    const MAX_DAYS: f64 = 36_500.0;

    pub fn serialize<S: Serializer>(retention: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(retention.map_or(0.0, |r| r.as_secs_f64() / 86_400.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let days = f64::deserialize(deserializer)?;
        if !(days.is_finite() && days >= 0.0) {
            return Err(serde::de::Error::custom(
                "days must be a number of days, 0 to keep everything",
            ));
        }
        Ok((days > 0.0).then(|| Duration::from_secs_f64(days.min(MAX_DAYS) * 86_400.0)))
    }
}

/// One value to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub uuid: String,
    pub quantity: String,
    /// Unix seconds.
    pub time: f64,
    /// The value as sent (a number, a string, …).
    pub raw: Value,
}

/// Counters of the history store.
#[derive(Debug, Default)]
pub struct HistoryCounters {
    /// Values handed to the committer.
    pub appended: AtomicU64,
    /// Values in batches whose commit succeeded.
    pub stored: AtomicU64,
    /// Values lost because their batch failed to commit.
    pub failed: AtomicU64,
    /// Rows deleted by retention.
    pub pruned: AtomicU64,
    /// `history.get` answers given.
    pub queries: AtomicU64,
}

/// Errors opening the history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history database: {0}")]
    Store(#[from] StoreError),
    #[error("history database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    Client(#[from] majordome_client::ClientError),
    #[error("cannot start a history thread: {0}")]
    Thread(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use majordome_client::{unix_now, Message};
    use majordome_store::Durability;
    use serde_json::json;

    use super::*;

    fn sample(uuid: &str, quantity: &str, time: f64, raw: Value) -> Sample {
        Sample {
            uuid: uuid.into(),
            quantity: quantity.into(),
            time,
            raw,
        }
    }

    #[test]
    fn last_values_periods_and_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("majordome.db");
        let settings = HistorySettings {
            max_points: 10,
            retention: None,
            workers: 1,
        };
        let mut writer = HistoryWriter::open(&database, Durability::Process, &settings).unwrap();
        let samples: Vec<Sample> = (0..100)
            .map(|i| sample("u1", "temperature", 1000.0 + i as f64, json!(i as f64 / 2.0)))
            .chain([sample("u1", "state", 1000.0, json!("on"))])
            .collect();
        writer.append(samples);
        writer.flush().unwrap();
        assert_eq!(writer.counters().stored.load(Ordering::Relaxed), 101);
        let service = HistoryService::new(&database, settings, writer.counters());
        let connection = majordome_store::open(&database, Durability::Process).unwrap();
        let ask = |data: Value| service.handle(&connection, &Message::new("history.get", data));

        let needs_quantity = ask(json!({"uuid": "u1"}));
        assert!(needs_quantity.reason().unwrap().contains("state, temperature"));
        let last = ask(json!({"uuid": "u1", "quantity": "temperature", "last": 3}));
        let values: Vec<f64> = last.data["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"].as_f64().unwrap())
            .collect();
        assert_eq!(values, [48.5, 49.0, 49.5], "oldest first");

        let short = ask(json!({"uuid": "u1", "quantity": "temperature", "from": 1000, "to": 1005}));
        assert_eq!(short.data["values"].as_array().unwrap().len(), 5);
        // 100 values in the period, more than max_points: buckets.
        let long = service.handle(
            &connection,
            &Message::new(
                "sensor_history.get",
                json!({"sensor_id": "u1", "quantity": "temperature", "mode": "period", "from": 1000, "to": 1100}),
            ),
        );
        assert_eq!(long.action, "sensor_history.result");
        let buckets = long.data["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), 10);
        assert_eq!(
            buckets[0],
            json!({"start": 1000.0, "count": 10, "min": 0.0, "avg": 2.25, "max": 4.5})
        );
        let minute =
            ask(json!({"uuid": "u1", "quantity": "temperature", "from": 1000, "to": 1100, "interval": "minute"}));
        assert_eq!(minute.data["buckets"].as_array().unwrap().len(), 2);
        // A non-numeric value is kept as it was sent.
        let state = ask(json!({"uuid": "u1", "quantity": "state"}));
        assert_eq!(state.data["values"][0]["value"], "on");

        for (bad, why) in [
            (json!({}), "needs 'uuid'"),
            (
                json!({"uuid": "u1", "quantity": "temperature", "from": 5, "to": 1}),
                "must come before",
            ),
            (
                json!({"uuid": "u1", "quantity": "temperature", "from": "x"}),
                "must be a number",
            ),
            (
                json!({"uuid": "u1", "quantity": "temperature", "last": 0}),
                "at least 1",
            ),
            (
                json!({"uuid": "u1", "quantity": "temperature", "from": 0, "interval": "fortnight"}),
                "unknown interval",
            ),
            (
                json!({"uuid": "u1", "quantity": "temperature", "from": 0, "to": 1e9, "bucket": 1}),
                "too many",
            ),
            (
                json!({"uuid": "u1", "quantity": "temperature", "mode": "best"}),
                "unknown mode",
            ),
        ] {
            let reply = ask(bad.clone());
            assert_eq!(reply.status(), Some(false), "{bad}");
            assert!(reply.reason().unwrap().contains(why), "{bad}: {:?}", reply.reason());
        }
        let latest = HistoryWriter::latest(&database).unwrap();
        assert!(latest.contains(&("u1".into(), "temperature".into(), 1099.0, json!(49.5))));
    }

    #[test]
    fn retention_prunes_old_values() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("majordome.db");
        let settings = HistorySettings {
            retention: Some(Duration::from_secs(86_400)),
            ..HistorySettings::default()
        };
        let mut writer = HistoryWriter::open(&database, Durability::Process, &settings).unwrap();
        let now = unix_now();
        writer.append(vec![
            sample("u", "t", now - 2.0 * 86_400.0, json!(1)),
            sample("u", "t", now, json!(2)),
        ]);
        writer.flush().unwrap();
        // The first prune is queued right behind the first batch, so it
        // deletes that batch's old row and keeps the new one.
        assert_eq!(writer.counters().pruned.load(Ordering::Relaxed), 1);
        let latest = HistoryWriter::latest(&database).unwrap();
        assert_eq!(latest.len(), 1);
    }
}
