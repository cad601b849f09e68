//! Titanic's table in the one SQLite database, and the frame encoding.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use majordome_client::Frames;
use majordome_store::rusqlite::{self, params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS titanic_requests (
    uuid       TEXT PRIMARY KEY,
    service    TEXT NOT NULL,
    request    BLOB NOT NULL,
    reply      BLOB,
    created    REAL NOT NULL,
    completed  REAL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS titanic_pending ON titanic_requests (created) WHERE reply IS NULL;
";

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Frames as one blob: each frame as a 4-byte big-endian length, then its
/// bytes.
pub fn encode(frames: &[Bytes]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
    for frame in frames {
        blob.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        blob.extend_from_slice(frame);
    }
    blob
}

/// The inverse of [`encode`]; `None` for a blob it did not write.
pub fn decode(blob: &[u8]) -> Option<Frames> {
    let mut frames = Vec::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let (length, tail) = rest.split_first_chunk::<4>()?;
        let length = u32::from_be_bytes(*length) as usize;
        if tail.len() < length {
            return None;
        }
        frames.push(Bytes::copy_from_slice(&tail[..length]));
        rest = &tail[length..];
    }
    Some(frames)
}

pub fn insert(connection: &Connection, uuid: &str, service: &str, body: &[Bytes]) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO titanic_requests (uuid, service, request, created) VALUES (?1, ?2, ?3, ?4)",
        params![uuid, service, encode(body), unix_now()],
    )?;
    Ok(())
}

pub fn store_reply(connection: &Connection, uuid: &str, reply: &[Bytes], attempts: u32) -> rusqlite::Result<usize> {
    connection.execute(
        "UPDATE titanic_requests SET reply = ?2, completed = ?3, attempts = ?4, last_error = NULL
         WHERE uuid = ?1 AND reply IS NULL",
        params![uuid, encode(reply), unix_now(), attempts],
    )
}

pub fn record_failure(connection: &Connection, uuid: &str, attempts: u32, error: &str) -> rusqlite::Result<usize> {
    connection.execute(
        "UPDATE titanic_requests SET attempts = ?2, last_error = ?3 WHERE uuid = ?1",
        params![uuid, attempts, error],
    )
}

pub fn delete(connection: &Connection, uuid: &str) -> rusqlite::Result<usize> {
    connection.execute("DELETE FROM titanic_requests WHERE uuid = ?1", [uuid])
}

/// What `titanic.reply` finds.
pub enum Lookup {
    Unknown,
    Pending,
    Done(Frames),
}

pub fn lookup(connection: &Connection, uuid: &str) -> rusqlite::Result<Lookup> {
    let row: Option<Option<Vec<u8>>> = connection
        .prepare_cached("SELECT reply FROM titanic_requests WHERE uuid = ?1")?
        .query_row([uuid], |row| row.get(0))
        .optional()?;
    Ok(match row {
        None => Lookup::Unknown,
        Some(None) => Lookup::Pending,
        Some(Some(blob)) => match decode(&blob) {
            Some(frames) => Lookup::Done(frames),
            None => Lookup::Unknown,
        },
    })
}

/// A request waiting for its reply, as the dispatcher loads it at start.
pub struct Pending {
    pub uuid: String,
    pub service: String,
    pub body: Frames,
    pub attempts: u32,
}

/// Every pending request, oldest first.
pub fn load_pending(connection: &Connection) -> rusqlite::Result<Vec<Pending>> {
    let mut statement = connection
        .prepare("SELECT uuid, service, request, attempts FROM titanic_requests WHERE reply IS NULL ORDER BY rowid")?;
    let rows = statement.query_map([], |row| {
        let blob: Vec<u8> = row.get(2)?;
        Ok(Pending {
            uuid: row.get(0)?,
            service: row.get(1)?,
            body: decode(&blob).unwrap_or_default(),
            attempts: row.get(3)?,
        })
    })?;
    rows.collect()
}

/// One line of `titanic.list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListEntry {
    pub uuid: String,
    pub service: String,
    /// `pending` or `done`.
    pub state: String,
    /// Unix time, seconds.
    pub created: f64,
    pub completed: Option<f64>,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Pending requests first (oldest first), then the latest done ones; at
/// most `limit` of each.
pub fn list(connection: &Connection, limit: usize) -> rusqlite::Result<Vec<ListEntry>> {
    let mut entries = Vec::new();
    for (sql, state) in [
        (
            "SELECT uuid, service, created, completed, attempts, last_error FROM titanic_requests
             WHERE reply IS NULL ORDER BY rowid LIMIT ?1",
            "pending",
        ),
        (
            "SELECT uuid, service, created, completed, attempts, last_error FROM titanic_requests
             WHERE reply IS NOT NULL ORDER BY completed DESC LIMIT ?1",
            "done",
        ),
    ] {
        let mut statement = connection.prepare_cached(sql)?;
        let rows = statement.query_map([limit as i64], |row| {
            Ok(ListEntry {
                uuid: row.get(0)?,
                service: row.get(1)?,
                state: state.to_owned(),
                created: row.get(2)?,
                completed: row.get(3)?,
                attempts: row.get(4)?,
                last_error: row.get(5)?,
            })
        })?;
        for row in rows {
            entries.push(row?);
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_blob() {
        for frames in [
            vec![],
            vec![Bytes::new()],
            vec![Bytes::from_static(b"a"), Bytes::new(), Bytes::from(vec![0u8; 70_000])],
        ] {
            assert_eq!(decode(&encode(&frames)).unwrap(), frames);
        }
        assert!(decode(&[0, 0, 0, 5, b'x']).is_none(), "truncated");
        assert!(decode(&[0, 0]).is_none(), "a partial length");
    }
}
