//! Shared state for majordome: the Clone pattern of the zguide, as ZeroMQ
//! RFC 12 (CHP) specifies it.
//!
//! The [`Server`] holds a key-value map, durable in SQLite, and three
//! sockets on consecutive ports P, P+1, P+2 (40413–40415 by default):
//!
//! - **snapshot** (ROUTER, P): a client sends `ICANHAZ? | subtree` and gets
//!   one KVSYNC per key under the subtree, then `KTHXBAI` with the
//!   sequence number the snapshot is consistent with;
//! - **updates** (PUB, P+1): every change as a KVPUB with a strictly
//!   increasing sequence number, and a HUGZ about every second;
//! - **collector** (SUB, P+2): clients' PUB sockets connect here and send
//!   KVSET; the server orders them, makes them durable, then publishes them.
//!
//! A [`Mirror`] keeps a local copy of a subtree up to date (snapshot, then
//! updates, with gap and silence detection); a [`Writer`] sends KVSETs and
//! waits until the server has published them; [`snapshot`] fetches a
//! subtree once.
//!
//! [`chp`] is the wire codec and does no I/O.

use std::time::Duration;

use majordome_store::{rusqlite, Durability, StoreError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod chp;
mod db;
pub mod mirror;
pub mod server;
#[cfg(test)]
mod socket_tests;

pub use chp::{ChpError, KvMsg, Limits};

/// A Clone value as JSON, the way majordome's own clients read values: a
/// value that is not JSON is taken as a string.
pub fn json_value(value: &[u8]) -> serde_json::Value {
    serde_json::from_slice(value)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(value).into_owned()))
}
pub use mirror::{
    set_and_confirm, snapshot, Change, Mirror, MirrorEntry, MirrorOptions, ToEndpoints, Writer, WriterOptions,
};
pub use server::{Counters, DropReason, Server, Stats};

/// Where the state server listens by default (snapshot port; updates and
/// collector are the next two).
pub const DEFAULT_ENDPOINT: &str = majordome_net::ports::STATE;

/// What can go wrong with the state server or its clients. Each message is
/// one line that says what to check.
#[derive(Debug, Error)]
pub enum StateError {
    /// An endpoint could not be bound.
    #[error(transparent)]
    Bind(#[from] majordome_net::BindError),
    /// The server refused a write, and said why.
    #[error("the state server refused the write: {reason}")]
    Refused { reason: String },
    /// Port 0 was asked for and no three consecutive free ports were found.
    #[error("found no three free consecutive ports for the state server after {attempts} attempts")]
    NoFreePorts { attempts: u32 },
    /// An endpoint that is not `tcp://host:port`.
    #[error("invalid state endpoint '{endpoint}': {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// No connection could be made.
    #[error("nothing is listening at {endpoint} (waited {after:?}; is `majordome up` running?)")]
    NothingListening { endpoint: String, after: Duration },
    /// Connected, but the server did not do what was expected in time.
    #[error("the state server at {endpoint} did not {what} within {after:?}")]
    Timeout {
        endpoint: String,
        what: &'static str,
        after: Duration,
    },
    /// The database could not be opened.
    #[error("state database: {0}")]
    Database(#[from] StoreError),
    /// A database query failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The server sent something that is not CHP.
    #[error("malformed message from the state server: {0}")]
    Protocol(ChpError),
    /// A key (or subtree) that the server would refuse.
    #[error("invalid key or subtree '{key}': {reason}")]
    InvalidKey { key: String, reason: ChpError },
    /// A ZeroMQ call failed.
    #[error("ZeroMQ error: {0}")]
    Zmq(#[from] zmq::Error),
}

/// The three endpoints of a state server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// ROUTER: ICANHAZ? in, KVSYNC… KTHXBAI out (port P).
    pub snapshot: String,
    /// PUB: KVPUB and HUGZ (port P+1).
    pub updates: String,
    /// SUB: KVSET in (port P+2).
    pub collector: String,
}

impl Endpoints {
    /// The endpoints of a server whose snapshot socket is `base`
    /// (`tcp://host:P`): P, P+1 and P+2.
    pub fn from_base(base: &str) -> Result<Endpoints, StateError> {
        let (host, port) = split_endpoint(base)?;
        if port == 0 {
            return Err(StateError::Endpoint {
                endpoint: base.to_owned(),
                reason: "port 0 only makes sense for a server".to_owned(),
            });
        }
        Ok(Endpoints::at(host, port))
    }

    pub(crate) fn at(host: &str, port: u16) -> Endpoints {
        Endpoints {
            snapshot: format!("tcp://{host}:{port}"),
            updates: format!("tcp://{host}:{}", port + 1),
            collector: format!("tcp://{host}:{}", port + 2),
        }
    }
}

/// `tcp://host:port` → (host, port), with room for port + 2.
pub(crate) fn split_endpoint(endpoint: &str) -> Result<(&str, u16), StateError> {
    let fail = |reason: &str| StateError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = endpoint
        .strip_prefix("tcp://")
        .ok_or_else(|| fail("expected tcp://host:port"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| fail("expected tcp://host:port"))?;
    if host.is_empty() {
        return Err(fail("no host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| fail("the port is not a number from 0 to 65533"))?;
    if port > u16::MAX - 2 {
        return Err(fail("the port is not a number from 0 to 65533"));
    }
    Ok((host, port))
}

/// The server's bounds and timers, each with its default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How often HUGZ goes out on the updates socket. Clients declare the
    /// server lost after a few missed ones (the mirror: 3 s).
    #[serde(with = "majordome_net::duration_text")]
    pub hugz_interval: Duration,
    /// Bytes in a key, and in a subtree.
    pub max_key_bytes: usize,
    /// Bytes in a value.
    pub max_value_bytes: usize,
    /// Bytes of the whole state (keys, values and properties); a write
    /// that would go over is refused, and its writer told why.
    pub max_total_bytes: usize,
    /// Bytes in a properties frame.
    pub max_properties_bytes: usize,
    /// Frames in one message; more is dropped as oversized (CHP uses 5, so
    /// a few more are still told apart as a wrong frame count).
    pub max_frames: usize,
    /// ZeroMQ high-water mark (messages) per client of the snapshot
    /// socket. Snapshots larger than this are streamed as the client reads.
    pub snapshot_high_water_mark: i32,
    /// High-water mark per subscriber of the updates socket: a subscriber
    /// this far behind loses updates (and its mirror resyncs).
    pub publish_high_water_mark: i32,
    /// High-water mark of the collector (KVSETs waiting to be read).
    pub collector_high_water_mark: i32,
    /// KVSYNCs sent to one client before the server turns to other work.
    pub snapshot_chunk: usize,
    /// Snapshots being served at once; more ICANHAZ? are dropped.
    pub max_pending_snapshots: usize,
    /// KVSETs (or expiries) applied in one SQLite transaction at most.
    pub write_batch: usize,
    /// Bytes of KVSETs read into one batch at most (with `write_batch`):
    /// what a batch holds in memory while it commits.
    pub write_batch_bytes: usize,
    /// What a commit survives ([`Durability::Full`]: power loss).
    #[serde(skip)]
    pub durability: Durability,
}

impl Default for Settings {
    fn default() -> Self {
        let limits = Limits::default();
        Settings {
            hugz_interval: Duration::from_secs(1),
            max_key_bytes: limits.max_key_bytes,
            max_value_bytes: limits.max_value_bytes,
            max_total_bytes: 64 * 1024 * 1024,
            max_properties_bytes: limits.max_properties_bytes,
            max_frames: 8,
            snapshot_high_water_mark: 64,
            publish_high_water_mark: 1_000,
            collector_high_water_mark: 100,
            snapshot_chunk: 1_000,
            max_pending_snapshots: 16,
            write_batch: 1_000,
            write_batch_bytes: 4 * 1024 * 1024,
            durability: Durability::Full,
        }
    }
}

impl Settings {
    /// The bounds on what clients send.
    pub fn limits(&self) -> Limits {
        Limits {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
            max_properties_bytes: self.max_properties_bytes,
        }
    }

    /// Bytes in one whole message: a key, a value, properties and the
    /// small frames. Larger messages are dropped unread.
    pub fn max_message_bytes(&self) -> usize {
        self.max_key_bytes + self.max_value_bytes + self.max_properties_bytes + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_three_consecutive_ports() {
        let endpoints = Endpoints::from_base("tcp://127.0.0.1:40413").unwrap();
        assert_eq!(endpoints.snapshot, "tcp://127.0.0.1:40413");
        assert_eq!(endpoints.updates, "tcp://127.0.0.1:40414");
        assert_eq!(endpoints.collector, "tcp://127.0.0.1:40415");
        assert_eq!(
            Endpoints::from_base("tcp://[::1]:7").unwrap().collector,
            "tcp://[::1]:9"
        );
        for bad in [
            "127.0.0.1:40413",
            "ipc:///tmp/x",
            "tcp://host",
            "tcp://:1",
            "tcp://h:65534",
            "tcp://h:x",
            "tcp://h:0",
        ] {
            assert!(Endpoints::from_base(bad).is_err(), "{bad}");
        }
    }
}
