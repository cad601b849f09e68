//! The `devices` table: one writer (the service, through the group
//! committer), read whole at start.

use std::collections::BTreeMap;
use std::time::Instant;

use majordome_client::unix_now;
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, StoreError};

use super::model::Device;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    uuid        TEXT PRIMARY KEY,
    client      TEXT NOT NULL,
    internal_id TEXT NOT NULL,
    type        TEXT NOT NULL,
    name        TEXT NOT NULL,
    room        TEXT NOT NULL,
    stale_after REAL,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    UNIQUE (client, internal_id)
);
";

/// Every stored device, with no values yet (`now`: when silence starts
/// counting).
pub(crate) fn load(connection: &Connection, now: Instant) -> Result<Vec<Device>, StoreError> {
    let mut query =
        connection.prepare("SELECT uuid, client, internal_id, type, name, room, stale_after, created FROM devices")?;
    let rows = query.query_map([], |row| {
        Ok(Device {
            uuid: row.get(0)?,
            client: row.get(1)?,
            id: row.get(2)?,
            kind: row.get(3)?,
            name: row.get(4)?,
            room: row.get(5)?,
            stale_after: row.get(6)?,
            created: row.get(7)?,
            values: BTreeMap::new(),
            sensors: BTreeMap::new(),
            last_seen: None,
            heard_at: now,
            stale: false,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Stores a device (new or changed); returns once it is durable.
pub(crate) fn save(committer: &Committer, device: &Device) -> Result<(), StoreError> {
    let row = device.clone();
    committer.submit(move |connection: &Connection| {
        connection.execute(
            "INSERT INTO devices (uuid, client, internal_id, type, name, room, stale_after, created, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (uuid) DO UPDATE SET type = ?4, name = ?5, room = ?6, stale_after = ?7, updated = ?9",
            params![
                row.uuid,
                row.client,
                row.id,
                row.kind,
                row.name,
                row.room,
                row.stale_after,
                row.created,
                unix_now()
            ],
        )?;
        Ok(())
    })
}

/// Deletes a device; returns once it is durable.
pub(crate) fn remove(committer: &Committer, uuid: &str) -> Result<(), StoreError> {
    let row = uuid.to_owned();
    committer.submit(move |connection: &Connection| {
        connection.execute("DELETE FROM devices WHERE uuid = ?1", params![row])?;
        Ok(())
    })
}
