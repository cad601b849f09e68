//! The state server's tables in majordome's SQLite database.
//!
//! ```sql
//! state_keys (key TEXT PRIMARY KEY, value BLOB, sequence INTEGER,
//!             uuid BLOB, properties BLOB, expires_at INTEGER NULL)
//! state_meta (name TEXT PRIMARY KEY, value INTEGER)  -- 'sequence': highest ever used
//! ```
//!
//! `properties` is the CHP properties frame as published; `expires_at` is
//! the absolute expiry (Unix time, milliseconds) of a key set with a `ttl`.
//! Deletions remove the row but still use a sequence number, so the
//! highest sequence lives in `state_meta`.

use std::path::Path;

use bytes::Bytes;
use majordome_store::rusqlite::{self, params, Connection, OptionalExtension};
use majordome_store::Durability;

use crate::StateError;

/// A key's stored state (the value is never empty: empty deletes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub value: Bytes,
    pub sequence: i64,
    pub uuid: Bytes,
    /// The encoded properties frame.
    pub properties: Bytes,
    /// Unix time in milliseconds.
    pub expires_at: Option<i64>,
}

/// One change to write.
pub(crate) enum Write<'a> {
    Put(&'a str, &'a Entry),
    Delete(&'a str),
}

pub(crate) struct Db {
    connection: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS state_keys (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    uuid BLOB NOT NULL,
    properties BLOB NOT NULL,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS state_meta (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO state_meta (name, value) VALUES ('sequence', 0);
";

impl Db {
    /// Opens the database (creating the tables if needed).
    pub fn open(path: &Path, durability: Durability) -> Result<Db, StateError> {
        let connection = majordome_store::open(path, durability)?;
        connection.execute_batch(SCHEMA)?;
        Ok(Db { connection })
    }

    /// Every key, in no particular order, and the highest sequence used.
    pub fn load(&self) -> Result<(Vec<(String, Entry)>, i64), StateError> {
        let mut statement = self
            .connection
            .prepare("SELECT key, value, sequence, uuid, properties, expires_at FROM state_keys")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Entry {
                    value: Bytes::from(row.get::<_, Vec<u8>>(1)?),
                    sequence: row.get(2)?,
                    uuid: Bytes::from(row.get::<_, Vec<u8>>(3)?),
                    properties: Bytes::from(row.get::<_, Vec<u8>>(4)?),
                    expires_at: row.get(5)?,
                },
            ))
        })?;
        let entries = rows.collect::<Result<Vec<_>, _>>()?;
        let meta: Option<i64> = self
            .connection
            .query_row("SELECT value FROM state_meta WHERE name = 'sequence'", [], |row| {
                row.get(0)
            })
            .optional()?;
        let highest_key = entries.iter().map(|(_, e)| e.sequence).max().unwrap_or(0);
        Ok((entries, meta.unwrap_or(0).max(highest_key)))
    }

    /// Applies `writes` in order and records `sequence` as the highest
    /// used, in one transaction: all or nothing, durable on return.
    pub fn commit(&mut self, writes: &[Write<'_>], sequence: i64) -> rusqlite::Result<()> {
        let transaction = self.connection.transaction()?;
        {
            let mut put = transaction.prepare_cached(
                "INSERT INTO state_keys (key, value, sequence, uuid, properties, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, sequence = excluded.sequence,
                   uuid = excluded.uuid, properties = excluded.properties, expires_at = excluded.expires_at",
            )?;
            let mut delete = transaction.prepare_cached("DELETE FROM state_keys WHERE key = ?1")?;
            for write in writes {
                match write {
                    Write::Put(key, entry) => {
                        put.execute(params![
                            key,
                            &entry.value[..],
                            entry.sequence,
                            &entry.uuid[..],
                            &entry.properties[..],
                            entry.expires_at
                        ])?;
                    }
                    Write::Delete(key) => {
                        delete.execute([key])?;
                    }
                }
            }
            transaction.execute("UPDATE state_meta SET value = ?1 WHERE name = 'sequence'", [sequence])?;
        }
        transaction.commit()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Fills a database directly (for tests that need many keys fast).
    pub(crate) fn preload(path: &Path, entries: impl Iterator<Item = (String, Bytes)>) -> i64 {
        let mut db = Db::open(path, Durability::Process).unwrap();
        let (_, mut sequence) = db.load().unwrap();
        let owned: Vec<(String, Entry)> = entries
            .map(|(key, value)| {
                sequence += 1;
                let entry = Entry {
                    value,
                    sequence,
                    uuid: Bytes::new(),
                    properties: Bytes::new(),
                    expires_at: None,
                };
                (key, entry)
            })
            .collect();
        let writes: Vec<Write<'_>> = owned.iter().map(|(k, e)| Write::Put(k, e)).collect();
        db.commit(&writes, sequence).unwrap();
        sequence
    }

    #[test]
    fn writes_are_all_or_nothing_and_the_sequence_survives_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut db = Db::open(&path, Durability::Full).unwrap();
        let entry = |sequence| Entry {
            value: Bytes::from_static(b"v"),
            sequence,
            uuid: Bytes::from_static(&[1; 16]),
            properties: Bytes::from_static(b"ttl=5\n"),
            expires_at: Some(1_000),
        };
        let (a, b) = (entry(1), entry(2));
        db.commit(&[Write::Put("/a", &a), Write::Put("/b", &b)], 2).unwrap();
        db.commit(&[Write::Delete("/a")], 3).unwrap();
        drop(db);
        let db = Db::open(&path, Durability::Full).unwrap();
        let (entries, sequence) = db.load().unwrap();
        assert_eq!(entries, vec![("/b".to_owned(), entry(2))]);
        assert_eq!(sequence, 3);
    }
}
