//! Counters the broker keeps, and their JSON form as `mmi.stats` serves it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of one service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Requests accepted for the service.
    pub requests: u64,
    /// Replies delivered to clients.
    pub replies: u64,
    /// Requests that reached their deadline unanswered.
    pub expired: u64,
    /// Requests refused (queue full, too many services).
    pub rejected: u64,
    /// Replies that came after their request expired, and were dropped.
    pub late_replies: u64,
}

/// One service in a statistics snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStats {
    /// Counters since the service was first seen.
    #[serde(flatten)]
    pub counters: ServiceCounters,
    /// Requests waiting for a worker now.
    pub queued: usize,
    /// Workers registered now.
    pub workers: usize,
    /// Of those, workers waiting for a request.
    pub idle_workers: usize,
    /// Of those, workers still holding a request that expired at them:
    /// they may still be running it.
    #[serde(default)]
    pub late_workers: usize,
}

/// The broker's statistics as `mmi.stats` returns them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Seconds since the broker started.
    pub uptime_seconds: u64,
    /// Workers registered now.
    pub workers: usize,
    /// Requests accepted and not yet answered or expired.
    pub requests_in_flight: usize,
    /// Messages handled, by direction: `in`, `out`.
    pub messages: BTreeMap<String, u64>,
    /// Messages dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Workers declared dead for silence.
    pub workers_expired: u64,
    /// Workers sent DISCONNECT for breaking the protocol.
    pub workers_disconnected: u64,
    /// Per service, by name.
    pub services: BTreeMap<String, ServiceStats>,
}
