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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use majordome_api::history::{HistoryQuery, HistoryRequest, Range, MAX_BUCKETS};
use majordome_client::{domogik_handler, unix_now, Message, Shutdown, Worker, WorkerOptions};
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{CommitStats, Committer, Durability, StoreError, Ticket};
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS history (
    uuid     TEXT NOT NULL,
    quantity TEXT NOT NULL,
    time     REAL NOT NULL,
    level    REAL,
    raw      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_series ON history (uuid, quantity, time);
CREATE INDEX IF NOT EXISTS history_by_time ON history (time);
";

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

/// The writing side: owned by the devices service.
pub struct HistoryWriter {
    committer: Arc<Committer>,
    counters: Arc<HistoryCounters>,
    retention: Option<Duration>,
    last_prune: Option<Instant>,
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

impl HistoryWriter {
    /// Opens (creating if needed) the `history` table for writing.
    pub fn open(database: &Path, durability: Durability, settings: &HistorySettings) -> Result<Self, HistoryError> {
        let connection = majordome_store::open(database, durability)?;
        connection.execute_batch(SCHEMA)?;
        Ok(HistoryWriter {
            committer: majordome_store::shared_committer(database, durability)?,
            counters: Arc::default(),
            retention: settings.retention,
            last_prune: None,
        })
    }

    /// Its counters, shared with the `history` service.
    pub fn counters(&self) -> Arc<HistoryCounters> {
        self.counters.clone()
    }

    /// The committer's counters (commits, jobs).
    pub fn commit_stats(&self) -> Arc<CommitStats> {
        self.committer.stats()
    }

    /// Queues `samples` as one job; it commits with whatever else is
    /// queued. Returns at once: the commit's outcome is counted, and the
    /// ticket (none for no samples) says when they are durable.
    pub fn append(&mut self, samples: Vec<Sample>) -> Option<Ticket<()>> {
        if samples.is_empty() {
            return None;
        }
        let count = samples.len() as u64;
        self.counters.appended.fetch_add(count, Ordering::Relaxed);
        let counters = self.counters.clone();
        // Nobody waits on the fsync here: the reader of a value is whoever
        // asks history later, and the follower only looks at the ticket
        // to say `device-stats` once durable. The job counts its own
        // outcome (a failed job rolls back alone, in its savepoint; a
        // failed commit is counted by the committer's own stats).
        let ticket = self.committer.enqueue(move |connection: &Connection| {
            let inserted = (|| {
                let mut insert = connection.prepare_cached(
                    "INSERT INTO history (uuid, quantity, time, level, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for sample in &samples {
                    insert.execute(params![
                        sample.uuid,
                        sample.quantity,
                        sample.time,
                        level_of(&sample.raw),
                        sample.raw.to_string()
                    ])?;
                }
                Ok(())
            })();
            let counter = if inserted.is_ok() {
                &counters.stored
            } else {
                &counters.failed
            };
            counter.fetch_add(count, Ordering::Relaxed);
            inserted
        });
        self.prune_if_due();
        Some(ticket)
    }

    /// Waits until everything appended so far is committed.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.committer.submit(|_connection: &Connection| Ok(()))
    }

    fn prune_if_due(&mut self) {
        let Some(retention) = self.retention else {
            return;
        };
        if self
            .last_prune
            .is_some_and(|at| at.elapsed() < Duration::from_secs(3600))
        {
            return;
        }
        self.last_prune = Some(Instant::now());
        let before = unix_now() - retention.as_secs_f64();
        let counters = self.counters.clone();
        let _ = self.committer.enqueue(move |connection: &Connection| {
            let deleted = connection.execute("DELETE FROM history WHERE time < ?1", params![before])?;
            counters.pruned.fetch_add(deleted as u64, Ordering::Relaxed);
            Ok(())
        });
    }

    /// The last stored value of every series, for restoring the inventory
    /// after a restart: (uuid, quantity, time, raw).
    pub fn latest(database: &Path) -> Result<Vec<(String, String, f64, Value)>, HistoryError> {
        let connection = majordome_store::open(database, Durability::Process)?;
        connection.execute_batch(SCHEMA)?;
        let mut query = connection.prepare(
            "SELECT h.uuid, h.quantity, h.time, h.raw FROM history h
             JOIN (SELECT uuid, quantity, MAX(time) AS time FROM history GROUP BY uuid, quantity) last
             ON h.uuid = last.uuid AND h.quantity = last.quantity AND h.time = last.time",
        )?;
        let rows = query.query_map([], |row| {
            let raw: String = row.get(3)?;
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                serde_json::from_str(&raw).unwrap_or(Value::Null),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The number a value stands for: numbers as they are, booleans as 0/1,
/// numeric strings parsed; anything else has none (stored, not averaged).
fn level_of(raw: &Value) -> Option<f64> {
    match raw {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

/// What a `history.get` asks for.
#[derive(Debug, Clone, PartialEq)]
enum Query {
    Last(usize),
    Period { from: f64, to: f64, bucket: Option<f64> },
}

/// The `history` service's readers.
pub struct HistoryService {
    database: PathBuf,
    settings: HistorySettings,
    counters: Arc<HistoryCounters>,
}

impl HistoryService {
    /// A service reading the history at `database`; `counters` are the
    /// writer's, so `stats.get` tells both sides.
    pub fn new(database: &Path, settings: HistorySettings, counters: Arc<HistoryCounters>) -> Self {
        HistoryService {
            database: database.to_owned(),
            settings,
            counters,
        }
    }

    /// Serves `history` at `broker` with `settings.workers` threads until
    /// `shutdown`.
    pub fn run(self, broker: &str, shutdown: &Shutdown) -> Result<(), HistoryError> {
        let service = Arc::new(self);
        let threads = service.settings.workers.max(1);
        // Each handler thread reads through its own connection (WAL).
        let mut connections = Vec::new();
        for _ in 0..threads {
            let connection = majordome_store::open(&service.database, Durability::Process)?;
            connection.execute_batch(SCHEMA)?;
            connections.push(connection);
        }
        let options = WorkerOptions {
            capacity: threads as u32,
            ..WorkerOptions::default()
        };
        let worker = Worker::new(broker, "history", options);
        let handler = |_| {
            let (service, connection) = (service.clone(), connections.pop().expect("one per thread"));
            domogik_handler(move |message: Message| service.handle(&connection, &message))
        };
        Ok(worker.run_pool(threads, handler, shutdown)?)
    }

    /// Answers one request.
    pub fn handle(&self, connection: &Connection, message: &Message) -> Message {
        let action = message.action.as_str();
        match HistoryRequest::parse(message) {
            Ok(HistoryRequest::Get(query)) => match self.get(connection, &query) {
                Ok(data) => {
                    self.counters.queries.fetch_add(1, Ordering::Relaxed);
                    Message::new(majordome_mdp::domogik::result_action(action), data)
                }
                Err(why) => Message::failure(action, why),
            },
            Ok(HistoryRequest::Stats) => Message::new("stats.result", self.stats(connection)),
            Err(e) => Message::failure(action, e.to_string()),
        }
    }

    /// The range asked for, within this service's bounds.
    fn query(&self, range: &Range) -> Result<Query, String> {
        match *range {
            Range::Last(count) => Ok(Query::Last(
                (count.min(usize::MAX as u64) as usize).min(self.settings.max_points.max(1) * 10),
            )),
            Range::Period { from, to, bucket } => {
                let to = to.unwrap_or_else(|| unix_now() + 1.0);
                if !(from.is_finite() && to.is_finite() && from < to) {
                    return Err(format!("'from' ({from}) must come before 'to' ({to})"));
                }
                if let Some(bucket) = bucket {
                    if (to - from) / bucket > MAX_BUCKETS {
                        return Err(format!(
                            "{} buckets of {bucket} s is too many: ask for a shorter period or larger buckets",
                            ((to - from) / bucket).ceil()
                        ));
                    }
                }
                Ok(Query::Period { from, to, bucket })
            }
        }
    }

    fn stats(&self, connection: &Connection) -> Value {
        let rows: i64 = connection
            .query_row("SELECT COUNT(*) FROM history", [], |row| row.get(0))
            .unwrap_or(-1);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        json!({
            "rows": rows,
            "appended": load(&self.counters.appended),
            "stored": load(&self.counters.stored),
            "failed": load(&self.counters.failed),
            "pruned": load(&self.counters.pruned),
            "queries": load(&self.counters.queries),
            "retention_days": self.settings.retention.map(|r| r.as_secs_f64() / 86_400.0),
        })
    }

    fn get(&self, connection: &Connection, request: &HistoryQuery) -> Result<Value, String> {
        let uuid = &request.uuid;
        let quantities: Vec<String> = connection
            .prepare_cached("SELECT DISTINCT quantity FROM history WHERE uuid = ?1 ORDER BY quantity")
            .and_then(|mut q| {
                q.query_map(params![uuid], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()
            })
            .map_err(|e| format!("the history store failed: {e}"))?;
        let quantity = match &request.quantity {
            Some(quantity) => quantity.clone(),
            None if quantities.len() <= 1 => quantities.first().cloned().unwrap_or_default(),
            None => {
                return Err(format!(
                    "the device {uuid} has several values ({}): say which with 'quantity'",
                    quantities.join(", ")
                ))
            }
        };
        let query = self.query(&request.range)?;
        let mut answer = json!({"uuid": uuid, "quantity": quantity, "quantities": quantities});
        let failed = |e: majordome_store::rusqlite::Error| format!("the history store failed: {e}");
        match query {
            Query::Last(count) => {
                let mut values = read_values(
                    connection,
                    "SELECT time, raw FROM history WHERE uuid = ?1 AND quantity = ?2 ORDER BY time DESC LIMIT ?3",
                    params![uuid, quantity, count as i64],
                )
                .map_err(failed)?;
                values.reverse();
                answer["values"] = Value::Array(values);
            }
            Query::Period { from, to, bucket } => {
                let count: i64 = connection
                    .query_row(
                        "SELECT COUNT(*) FROM history WHERE uuid = ?1 AND quantity = ?2 AND time >= ?3 AND time < ?4",
                        params![uuid, quantity, from, to],
                        |row| row.get(0),
                    )
                    .map_err(failed)?;
                answer["from"] = json!(from);
                answer["to"] = json!(to);
                answer["count"] = json!(count);
                let bucket = bucket.or_else(|| {
                    ((count as usize) > self.settings.max_points)
                        .then(|| ((to - from) / self.settings.max_points as f64).max(1.0).ceil())
                });
                match bucket {
                    None => {
                        answer["values"] = Value::Array(
                            read_values(
                                connection,
                                "SELECT time, raw FROM history WHERE uuid = ?1 AND quantity = ?2 AND time >= ?3 \
                                 AND time < ?4 ORDER BY time",
                                params![uuid, quantity, from, to],
                            )
                            .map_err(failed)?,
                        );
                    }
                    Some(bucket) => {
                        answer["bucket"] = json!(bucket);
                        answer["buckets"] =
                            Value::Array(read_buckets(connection, uuid, &quantity, from, to, bucket).map_err(failed)?);
                    }
                }
            }
        }
        Ok(answer)
    }
}

fn read_values(
    connection: &Connection,
    sql: &str,
    parameters: impl majordome_store::rusqlite::Params,
) -> majordome_store::rusqlite::Result<Vec<Value>> {
    let mut query = connection.prepare_cached(sql)?;
    let rows = query.query_map(parameters, |row| {
        let time: f64 = row.get(0)?;
        let raw: String = row.get(1)?;
        Ok(json!({"time": time, "value": serde_json::from_str::<Value>(&raw).unwrap_or(Value::Null)}))
    })?;
    rows.collect()
}

fn read_buckets(
    connection: &Connection,
    uuid: &str,
    quantity: &str,
    from: f64,
    to: f64,
    bucket: f64,
) -> majordome_store::rusqlite::Result<Vec<Value>> {
    let mut query = connection.prepare_cached(
        "SELECT CAST((time - ?3) / ?5 AS INTEGER) AS b, COUNT(*), MIN(level), AVG(level), MAX(level)
         FROM history WHERE uuid = ?1 AND quantity = ?2 AND time >= ?3 AND time < ?4
         GROUP BY b ORDER BY b",
    )?;
    let rows = query.query_map(params![uuid, quantity, from, to, bucket], |row| {
        let index: i64 = row.get(0)?;
        let count: i64 = row.get(1)?;
        let (min, avg, max): (Option<f64>, Option<f64>, Option<f64>) = (row.get(2)?, row.get(3)?, row.get(4)?);
        Ok(json!({"start": from + index as f64 * bucket, "count": count, "min": min, "avg": avg, "max": max}))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
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
