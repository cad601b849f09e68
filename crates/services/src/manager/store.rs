//! The `client_history` table: every status change of every client, the
//! last `history_limit` per client.

use std::path::Path;
use std::sync::Arc;

use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, Durability};

use super::ManagerError;

/// One row of `client_history`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The client id, `<type>-<name>.<host>`.
    pub client: String,
    /// Unix time of the change.
    pub time: f64,
    pub status: String,
    pub comment: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS client_history (
    client  TEXT NOT NULL,
    time    REAL NOT NULL,
    status  TEXT NOT NULL,
    comment TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS client_history_by_client ON client_history (client);
";

/// The `client_history` table: writes go through a [`Committer`] and are
/// not waited for, so a status change never holds the registry's lock for
/// an fsync; the committer finishes them when the registry is dropped.
pub(super) struct HistoryStore {
    committer: Arc<Committer>,
    limit: usize,
}

impl HistoryStore {
    /// Opens the table, trims it to `limit` rows per client (the limit may
    /// have been lowered since the last run) and reads it, oldest first.
    pub(super) fn open(
        database: &Path,
        durability: Durability,
        limit: usize,
    ) -> Result<(HistoryStore, Vec<HistoryRow>), ManagerError> {
        let connection = majordome_store::open(database, durability)?;
        connection.execute_batch(SCHEMA)?;
        connection.execute(
            "DELETE FROM client_history WHERE rowid IN (
                 SELECT rowid FROM (
                     SELECT rowid, ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid DESC) AS newer
                     FROM client_history)
                 WHERE newer > ?1)",
            params![limit as i64],
        )?;
        let rows = read_history(&connection)?;
        drop(connection);
        let store = HistoryStore {
            committer: majordome_store::shared_committer(database, durability)?,
            limit,
        };
        Ok((store, rows))
    }

    /// Records one change and forgets what falls past the limit.
    pub(super) fn record(&self, row: HistoryRow) {
        let limit = self.limit as i64;
        // The ticket is dropped: the write lands with the next batch, and
        // an error is logged here since nobody waits for it.
        let _ = self.committer.enqueue(move |c| {
            let written = c
                .execute(
                    "INSERT INTO client_history (client, time, status, comment) VALUES (?1, ?2, ?3, ?4)",
                    params![row.client, row.time, row.status, row.comment],
                )
                .and_then(|_| {
                    // Rows are appended in order, so rowid orders them; the
                    // index on client holds rowid, so this reads only the
                    // client's own rows.
                    c.execute(
                        "DELETE FROM client_history WHERE client = ?1 AND rowid <= (
                             SELECT rowid FROM client_history WHERE client = ?1
                             ORDER BY rowid DESC LIMIT 1 OFFSET ?2)",
                        params![row.client, limit],
                    )
                });
            if let Err(e) = &written {
                tracing::warn!(client = %row.client, error = %e, "could not record a status change");
            }
            written.map(|_| ())
        });
    }
}

fn read_history(connection: &Connection) -> Result<Vec<HistoryRow>, ManagerError> {
    let mut statement =
        connection.prepare("SELECT client, time, status, comment FROM client_history ORDER BY rowid")?;
    let rows = statement.query_map([], |row| {
        Ok(HistoryRow {
            client: row.get(0)?,
            time: row.get(1)?,
            status: row.get(2)?,
            comment: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
