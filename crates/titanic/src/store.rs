//! Titanic's table in the one SQLite database, and the frame encoding.

use bytes::Bytes;
use majordome_client::Frames;
use majordome_store::rusqlite::{self, params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// One row per request. Times are Unix seconds. `attempt_deadline` is
/// committed before an attempt is sent (with the row itself for a first
/// attempt sent soon after): while the request is pending, a copy may be
/// running at a worker until then, which is what a restarted Titanic must
/// wait out. `next_attempt` is when the dispatcher
/// meant to try again after a failure (for `titanic.list`).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS titanic_requests (
    uuid             TEXT PRIMARY KEY,
    service          TEXT NOT NULL,
    request          BLOB NOT NULL,
    reply            BLOB,
    created          REAL NOT NULL,
    completed        REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    attempt_deadline REAL,
    next_attempt     REAL,
    owner            TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS titanic_pending ON titanic_requests (created) WHERE reply IS NULL;
";

/// Columns added after the table's first version, for databases made then.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("attempt_deadline", "REAL"),
    ("next_attempt", "REAL"),
    ("owner", "TEXT NOT NULL DEFAULT ''"),
];

/// Creates the table, or brings an older one up to date.
pub fn prepare(connection: &Connection) -> rusqlite::Result<()> {
    connection.execute_batch(SCHEMA)?;
    let columns = connection
        .prepare("SELECT name FROM pragma_table_info('titanic_requests')")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    for (name, kind) in ADDED_COLUMNS {
        if !columns.iter().any(|c| c == name) {
            connection.execute_batch(&format!("ALTER TABLE titanic_requests ADD COLUMN {name} {kind}"))?;
        }
    }
    Ok(())
}

pub use majordome_client::unix_now;

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

/// A new request of `owner` (the caller's identity, "" for local
/// clients); `attempt_deadline` covers a first attempt sent soon.
pub fn insert(
    connection: &Connection,
    uuid: &str,
    owner: &str,
    service: &str,
    body: &[Bytes],
    attempt_deadline: f64,
) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO titanic_requests (uuid, service, request, created, attempt_deadline, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![uuid, service, encode(body), unix_now(), attempt_deadline, owner],
    )?;
    Ok(())
}

/// Attempts about to be sent: their count, and the deadline until which
/// each may run at a worker.
pub fn mark_attempts(connection: &Connection, attempts: &[(String, u32)], deadline: f64) -> rusqlite::Result<()> {
    let mut statement = connection
        .prepare_cached("UPDATE titanic_requests SET attempts = ?2, attempt_deadline = ?3 WHERE uuid = ?1")?;
    for (uuid, count) in attempts {
        statement.execute(params![uuid, count, deadline])?;
    }
    Ok(())
}

pub fn store_reply(connection: &Connection, uuid: &str, reply: &[Bytes]) -> rusqlite::Result<usize> {
    connection.execute(
        "UPDATE titanic_requests SET reply = ?2, completed = ?3, last_error = NULL, next_attempt = NULL
         WHERE uuid = ?1 AND reply IS NULL",
        params![uuid, encode(reply), unix_now()],
    )
}

pub fn record_failure(connection: &Connection, uuid: &str, error: &str, next_attempt: f64) -> rusqlite::Result<usize> {
    connection.execute(
        "UPDATE titanic_requests SET last_error = ?2, next_attempt = ?3 WHERE uuid = ?1",
        params![uuid, error, next_attempt],
    )
}

/// Deletes `owner`'s request `uuid`; how many rows went (0 or 1).
pub fn delete(connection: &Connection, uuid: &str, owner: &str) -> rusqlite::Result<usize> {
    connection.execute(
        "DELETE FROM titanic_requests WHERE uuid = ?1 AND owner = ?2",
        [uuid, owner],
    )
}

/// What `titanic.reply` finds.
pub enum Lookup {
    Unknown,
    Pending,
    Done(Frames),
}

/// `owner`'s request `uuid`: another's is [`Lookup::Unknown`].
pub fn lookup(connection: &Connection, uuid: &str, owner: &str) -> rusqlite::Result<Lookup> {
    let row: Option<Option<Vec<u8>>> = connection
        .prepare_cached("SELECT reply FROM titanic_requests WHERE uuid = ?1 AND owner = ?2")?
        .query_row([uuid, owner], |row| row.get(0))
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
    /// Set once an attempt was sent: a copy may run at a worker until then.
    pub attempt_deadline: Option<f64>,
}

/// Every pending request, oldest first.
pub fn load_pending(connection: &Connection) -> rusqlite::Result<Vec<Pending>> {
    let mut statement = connection.prepare(
        "SELECT uuid, service, request, attempts, attempt_deadline FROM titanic_requests
         WHERE reply IS NULL ORDER BY rowid",
    )?;
    let rows = statement.query_map([], |row| {
        let blob: Vec<u8> = row.get(2)?;
        Ok((
            decode(&blob),
            Pending {
                uuid: row.get(0)?,
                service: row.get(1)?,
                body: Frames::new(),
                attempts: row.get(3)?,
                attempt_deadline: row.get(4)?,
            },
        ))
    })?;
    let mut pending = Vec::new();
    for row in rows {
        match row? {
            (Some(body), request) => pending.push(Pending { body, ..request }),
            // Not written by `encode`: sending it would send something else.
            (None, request) => tracing::error!(uuid = request.uuid, "a stored titanic request is corrupt; not sent"),
        }
    }
    Ok(pending)
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
    /// After a failed attempt: the earliest time of the next one (later if
    /// a worker may still be running the last one).
    #[serde(default)]
    pub next_attempt: Option<f64>,
}

/// Pending requests first (oldest first), then the latest done ones; at
/// most `limit` of each.
/// Only `owner`'s requests.
pub fn list(connection: &Connection, limit: usize, owner: &str) -> rusqlite::Result<Vec<ListEntry>> {
    let mut entries = Vec::new();
    for (sql, state) in [
        (
            "SELECT uuid, service, created, completed, attempts, last_error, next_attempt FROM titanic_requests
             WHERE reply IS NULL AND owner = ?2 ORDER BY rowid LIMIT ?1",
            "pending",
        ),
        (
            "SELECT uuid, service, created, completed, attempts, last_error, next_attempt FROM titanic_requests
             WHERE reply IS NOT NULL AND owner = ?2 ORDER BY completed DESC LIMIT ?1",
            "done",
        ),
    ] {
        let mut statement = connection.prepare_cached(sql)?;
        let rows = statement.query_map(params![limit as i64, owner], |row| {
            Ok(ListEntry {
                uuid: row.get(0)?,
                service: row.get(1)?,
                state: state.to_owned(),
                created: row.get(2)?,
                completed: row.get(3)?,
                attempts: row.get(4)?,
                last_error: row.get(5)?,
                next_attempt: row.get(6)?,
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

    #[test]
    fn a_table_of_the_first_version_gets_the_new_columns() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE titanic_requests (uuid TEXT PRIMARY KEY, service TEXT NOT NULL,
                 request BLOB NOT NULL, reply BLOB, created REAL NOT NULL, completed REAL,
                 attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT);",
            )
            .unwrap();
        connection
            .execute(
                "INSERT INTO titanic_requests (uuid, service, request, created) VALUES ('u', 'svc', ?1, 1.0)",
                [encode(&[Bytes::from_static(b"x")])],
            )
            .unwrap();
        prepare(&connection).unwrap();
        prepare(&connection).unwrap();
        mark_attempts(&connection, &[("u".into(), 1)], 12.5).unwrap();
        let pending = load_pending(&connection).unwrap();
        assert_eq!((pending[0].attempts, pending[0].attempt_deadline), (1, Some(12.5)));
        assert_eq!(pending[0].body, vec![Bytes::from_static(b"x")]);
        record_failure(&connection, "u", "no_answer: late", 20.0).unwrap();
        // A request made before owners were recorded is the local one's.
        let listed = list(&connection, 10, "").unwrap();
        assert_eq!(listed[0].next_attempt, Some(20.0));
        assert_eq!(listed[0].last_error.as_deref(), Some("no_answer: late"));
        assert!(list(&connection, 10, "alice").unwrap().is_empty());
        assert!(matches!(lookup(&connection, "u", "alice").unwrap(), Lookup::Unknown));
        assert_eq!(delete(&connection, "u", "alice").unwrap(), 0);
        assert!(matches!(lookup(&connection, "u", "").unwrap(), Lookup::Pending));
    }
}
