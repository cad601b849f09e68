//! The `history` table and its one writer.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{HistoryCounters, HistoryError, HistorySettings, Sample};
use majordome_client::unix_now;
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{CommitStats, Committer, Durability, StoreError, Ticket};
use serde_json::Value;

pub(crate) const SCHEMA: &str = "
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

/// The writing side: owned by the devices service.
pub struct HistoryWriter {
    committer: Arc<Committer>,
    counters: Arc<HistoryCounters>,
    retention: Option<Duration>,
    last_prune: Option<Instant>,
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
pub(crate) fn level_of(raw: &Value) -> Option<f64> {
    match raw {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}
