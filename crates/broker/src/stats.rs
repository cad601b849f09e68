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
    /// Their bytes, as counted against the queue bound.
    #[serde(default)]
    pub queued_bytes: usize,
    /// Workers registered now.
    pub workers: usize,
    /// Of those, workers waiting for a request.
    pub idle_workers: usize,
    /// Of those, workers still holding a request that expired at them:
    /// they may still be running it.
    #[serde(default)]
    pub late_workers: usize,
    /// Median time from request to reply since the service was first
    /// seen, in µs (to within a factor of √2), if it has replied.
    #[serde(default)]
    pub latency_p50_us: Option<u64>,
    /// The 99th percentile of the same.
    #[serde(default)]
    pub latency_p99_us: Option<u64>,
    /// The whole histogram, for `/metrics`: cumulative counts by upper
    /// bound, up to the last bucket that holds any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyBuckets>,
}

/// A latency histogram as Prometheus takes it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyBuckets {
    /// The sum of every latency, in seconds.
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound in seconds, how many took at most that), increasing.
    pub cumulative: Vec<(f64, u64)>,
}

impl Eq for LatencyBuckets {}

/// Request → reply times in buckets a factor of √2 apart (1 µs to about
/// an hour): constant memory and constant time per reply, and a quantile
/// good to within a bucket.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: [u64; LATENCY_BUCKETS],
    total: u64,
    /// The sum of every time counted, in µs.
    sum_us: u128,
}

const LATENCY_BUCKETS: usize = 64;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; LATENCY_BUCKETS],
            total: 0,
            sum_us: 0,
        }
    }
}

impl LatencyHistogram {
    /// Counts one request → reply time.
    pub fn record(&mut self, elapsed: std::time::Duration) {
        let micros = elapsed.as_micros().max(1) as f64;
        let bucket = ((micros.log2() * 2.0).floor() as usize).min(LATENCY_BUCKETS - 1);
        self.counts[bucket] += 1;
        self.total += 1;
        self.sum_us += elapsed.as_micros();
    }

    /// The histogram for Prometheus, `None` before the first reply.
    pub fn buckets(&self) -> Option<LatencyBuckets> {
        let last = self.counts.iter().rposition(|&count| count > 0)?;
        let mut seen = 0;
        let cumulative = self.counts[..=last]
            .iter()
            .enumerate()
            .map(|(bucket, count)| {
                seen += count;
                (2f64.powf((bucket + 1) as f64 / 2.0) / 1e6, seen)
            })
            .collect();
        Some(LatencyBuckets {
            sum_seconds: self.sum_us as f64 / 1e6,
            count: self.total,
            cumulative,
        })
    }

    /// The upper bound of the bucket holding quantile `q`, in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(2f64.powf((bucket + 1) as f64 / 2.0).round() as u64);
            }
        }
        None
    }
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
    /// Bytes of all the requests waiting for a worker.
    #[serde(default)]
    pub queued_bytes: usize,
    /// Messages handled, by direction: `in`, `out`.
    pub messages: BTreeMap<String, u64>,
    /// Messages dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Workers declared dead for silence.
    pub workers_expired: u64,
    /// Workers sent DISCONNECT for breaking the protocol.
    pub workers_disconnected: u64,
    /// Services without a worker forgotten to make room for others.
    #[serde(default)]
    pub services_evicted: u64,
    /// Bytes waiting for peers whose pipe is full (slow readers).
    #[serde(default)]
    pub unsent_bytes: usize,
    /// Logins (PLAIN, through ZAP) refused in this process: a wrong user
    /// name or password.
    #[serde(default)]
    pub logins_refused: u64,
    /// Per service, by name.
    pub services: BTreeMap<String, ServiceStats>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_quantiles_fall_in_the_right_bucket() {
        let mut histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile_us(0.5), None);
        for _ in 0..98 {
            histogram.record(Duration::from_micros(500));
        }
        histogram.record(Duration::from_millis(20));
        histogram.record(Duration::from_millis(20));
        let p50 = histogram.quantile_us(0.5).unwrap();
        assert!((500..=708).contains(&p50), "{p50}");
        let p99 = histogram.quantile_us(0.99).unwrap();
        assert!((20_000..=28_285).contains(&p99), "{p99}");
        histogram.record(Duration::from_secs(100_000));
        assert!(
            histogram.quantile_us(1.0).is_some(),
            "huge times land in the last bucket"
        );
    }
}
