//! The `history` service: reads, answered by a pool of threads each with
//! its own connection.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::writer::SCHEMA;
use super::{HistoryCounters, HistoryError, HistorySettings};
use majordome_api::history::{HistoryQuery, HistoryRequest, Range, MAX_BUCKETS};
use majordome_client::{domogik_handler, unix_now, Message, Shutdown, Worker, WorkerOptions};
use majordome_store::rusqlite::{params, Connection};
use majordome_store::Durability;
use serde_json::{json, Value};

/// What a `history.get` asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Query {
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

pub(crate) fn read_values(
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

pub(crate) fn read_buckets(
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
