//! `/metrics`: what `majordome status` shows, in Prometheus's text format,
//! every name prefixed `majordome_`. Each scrape asks the bus (`mmi.stats`,
//! the `events`, `state`, `devices` and `history` services' `stats.get`,
//! the manager's client list) and encodes the answers with
//! `prometheus-client`; the gateway keeps no counters of its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use majordome_broker::stats::Snapshot;
use majordome_client::AsyncClient;
use majordome_mdp::domogik::Message;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

/// How long a scrape waits for each answer.
const WAIT: Duration = Duration::from_secs(2);

type Labels = Vec<(String, String)>;

/// One metric family: samples by label set.
#[derive(Debug)]
struct Family {
    help: String,
    counter: bool,
    samples: Vec<(Labels, f64)>,
}

/// One histogram of a family: its labels, sum, count and buckets (each
/// with the count of its own range).
type HistogramSample = (Labels, f64, u64, Vec<(f64, u64)>);

/// One histogram family.
#[derive(Debug)]
struct Histograms {
    help: String,
    samples: Vec<HistogramSample>,
}

/// The families of one scrape, by name (without the prefix).
#[derive(Debug, Default)]
pub struct Scrape {
    families: BTreeMap<String, Family>,
    histograms: BTreeMap<String, Histograms>,
}

impl Scrape {
    fn add(&mut self, name: &str, help: &str, counter: bool, labels: &[(&str, &str)], value: f64) {
        let family = self.families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            counter,
            samples: Vec::new(),
        });
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        family.samples.push((labels, value));
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, false, labels, value);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, true, labels, value);
    }

    /// The broker's statistics.
    pub fn broker(&mut self, stats: &Snapshot) {
        let none: &[(&str, &str)] = &[];
        self.gauge(
            "broker_up_seconds",
            "Seconds since the broker started.",
            none,
            stats.uptime_seconds as f64,
        );
        self.gauge("broker_workers", "Workers registered.", none, stats.workers as f64);
        self.gauge(
            "broker_requests_in_flight",
            "Requests accepted and not yet answered or expired.",
            none,
            stats.requests_in_flight as f64,
        );
        self.gauge(
            "broker_queued_bytes",
            "Bytes of the requests waiting for a worker.",
            none,
            stats.queued_bytes as f64,
        );
        self.gauge(
            "broker_unsent_bytes",
            "Bytes waiting for peers that do not read.",
            none,
            stats.unsent_bytes as f64,
        );
        for (direction, n) in &stats.messages {
            self.counter(
                "broker_messages",
                "Messages handled, by direction.",
                &[("direction", direction)],
                *n as f64,
            );
        }
        for (reason, n) in &stats.dropped {
            self.counter(
                "broker_dropped",
                "Messages dropped, by reason.",
                &[("reason", reason)],
                *n as f64,
            );
        }
        self.counter(
            "broker_workers_expired",
            "Workers declared dead for silence.",
            none,
            stats.workers_expired as f64,
        );
        self.counter(
            "broker_workers_disconnected",
            "Workers sent DISCONNECT for breaking the protocol.",
            none,
            stats.workers_disconnected as f64,
        );
        self.counter(
            "broker_services_evicted",
            "Services without a worker forgotten to make room.",
            none,
            stats.services_evicted as f64,
        );
        self.counter(
            "logins_refused",
            "Logins (PLAIN, through ZAP) refused.",
            none,
            stats.logins_refused as f64,
        );
        for (name, service) in &stats.services {
            let labels = [("service", name.as_str())];
            let c = &service.counters;
            self.counter(
                "service_requests",
                "Requests accepted, by service.",
                &labels,
                c.requests as f64,
            );
            self.counter(
                "service_replies",
                "Replies delivered, by service.",
                &labels,
                c.replies as f64,
            );
            self.counter(
                "service_expired",
                "Requests that expired, by service.",
                &labels,
                c.expired as f64,
            );
            self.counter(
                "service_rejected",
                "Requests refused (queue full), by service.",
                &labels,
                c.rejected as f64,
            );
            self.counter(
                "service_late_replies",
                "Replies that came after their request expired.",
                &labels,
                c.late_replies as f64,
            );
            self.gauge(
                "service_queued",
                "Requests waiting for a worker, by service.",
                &labels,
                service.queued as f64,
            );
            self.gauge(
                "service_queued_bytes",
                "Bytes waiting for a worker, by service.",
                &labels,
                service.queued_bytes as f64,
            );
            self.gauge(
                "service_workers",
                "Workers, by service.",
                &labels,
                service.workers as f64,
            );
            self.gauge(
                "service_idle_workers",
                "Idle workers, by service.",
                &labels,
                service.idle_workers as f64,
            );
            if let Some(latency) = &service.latency {
                let histograms = self
                    .histograms
                    .entry("service_latency_seconds".to_owned())
                    .or_insert_with(|| Histograms {
                        help: "Request to reply time through the broker, by service (buckets a factor of √2 apart)."
                            .to_owned(),
                        samples: Vec::new(),
                    });
                histograms.samples.push((
                    vec![("service".to_owned(), name.clone())],
                    latency.sum_seconds,
                    latency.count,
                    fixed_buckets(latency),
                ));
            }
        }
    }

    /// A service's `stats.get` answer: every number at the top level, and
    /// every map of numbers (`dropped`, by reason) with its keys as a
    /// label.
    pub fn service_stats(&mut self, part: &str, stats: &Value) {
        let Some(object) = stats.as_object() else { return };
        for (key, value) in object {
            let name = format!("{part}_{}", sanitize(key));
            match value {
                Value::Number(n) => {
                    let help = format!("The {part} service's `{key}` (stats.get).");
                    self.gauge(&name, &help, &[], n.as_f64().unwrap_or_default());
                }
                Value::Object(map) => {
                    for (label, inner) in map {
                        if let Some(n) = inner.as_f64() {
                            let help = format!("The {part} service's `{key}`, by its keys (stats.get).");
                            self.gauge(&name, &help, &[("key", label)], n);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The manager's client list: one sample per client, its status as a
    /// label.
    pub fn clients(&mut self, list: &Value) {
        let Some(clients) = list.as_object() else { return };
        for (id, client) in clients {
            let status = client.get("status").and_then(Value::as_str).unwrap_or("unknown");
            self.gauge(
                "client_status",
                "Each client (plugin) known to the manager, 1 with its status as a label.",
                &[("client", id), ("status", status)],
                1.0,
            );
        }
    }

    /// The text format.
    pub fn encode(self) -> String {
        let mut registry = Registry::with_prefix("majordome");
        registry.register_collector(Box::new(Collector(self)));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The same buckets for every scrape and service, as Prometheus wants
/// them: powers of two from 16 µs to 64 s (every other bucket of the
/// broker's √2-wide ones, so the counts are exact), then +Inf (which
/// `prometheus-client` writes for `f64::MAX`). Each with the count of its
/// own range: the encoder adds them up.
fn fixed_buckets(latency: &majordome_broker::stats::LatencyBuckets) -> Vec<(f64, u64)> {
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = (4..=26)
        .map(|power: i32| {
            // The broker's bucket i ends at 2^((i+1)/2) µs.
            let index = (2 * power - 1) as usize;
            let cumulative = latency.cumulative.get(index).map_or(latency.count, |(_, count)| *count);
            let own = cumulative - below;
            below = cumulative;
            (2f64.powi(power) / 1e6, own)
        })
        .collect();
    buckets.push((f64::MAX, latency.count - below));
    buckets
}

/// A name part made of what Prometheus allows.
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[derive(Debug)]
struct Collector(Scrape);

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, family) in &self.0.histograms {
            let mut metric = encoder.encode_descriptor(name, &family.help, None, MetricType::Histogram)?;
            for (labels, sum, count, buckets) in &family.samples {
                metric
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
            }
        }
        for (name, family) in &self.0.families {
            let kind = if family.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(name, &family.help, None, kind)?;
            match family.samples.as_slice() {
                // One sample without labels: no `{}` after the name.
                [(labels, value)] if labels.is_empty() => {
                    Sample {
                        counter: family.counter,
                        value: *value,
                    }
                    .encode(metric)?;
                }
                samples => {
                    for (labels, value) in samples {
                        let sample = Sample {
                            counter: family.counter,
                            value: *value,
                        };
                        sample.encode(metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One value, encoded as its family's kind.
#[derive(Debug)]
struct Sample {
    counter: bool,
    value: f64,
}

impl EncodeMetric for Sample {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        // Counts are written as integers; the rest (seconds) as floats.
        let whole = self.value.fract() == 0.0 && self.value.abs() < 9.0e15;
        match (self.counter, whole) {
            (true, true) => encoder.encode_counter::<NoLabelSet, _, u64>(&(self.value.max(0.0) as u64), None),
            (true, false) => encoder.encode_counter::<NoLabelSet, _, f64>(&self.value, None),
            (false, true) => encoder.encode_gauge(&(self.value as i64)),
            (false, false) => encoder.encode_gauge(&self.value),
        }
    }

    fn metric_type(&self) -> MetricType {
        if self.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        }
    }
}

/// Asks the bus for everything and encodes it. A part that does not
/// answer is left out (the others are still shown).
pub async fn scrape(bus: &Arc<AsyncClient>, caller: &crate::rpc::Caller) -> String {
    let mut scrape = Scrape::default();
    if let Ok(reply) = bus.request("mmi.stats", Vec::new(), WAIT).await {
        if let Some(stats) = reply.first().and_then(|f| serde_json::from_slice::<Snapshot>(f).ok()) {
            scrape.broker(&stats);
        }
    }
    for part in ["events", "state", "devices", "history", "scenario"] {
        // What the caller may not call, it does not see here either.
        if caller.may_call(part, "stats.get").is_err() {
            continue;
        }
        if let Ok(reply) = bus
            .request_message(part, &Message::new("stats.get", serde_json::json!({})), WAIT)
            .await
        {
            if reply.action == "stats.result" {
                scrape.service_stats(part, &reply.data);
            }
        }
    }
    scrape.gauge(
        "http_websocket_clients",
        "WebSocket clients connected to this gateway.",
        &[],
        crate::ws::CONNECTED.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    scrape.counter(
        "http_websocket_slow_clients",
        "WebSocket clients closed for not reading what was sent to them.",
        &[],
        crate::ws::CLOSED_SLOW.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    let list = Message::new("client.list.get", serde_json::json!({}));
    if caller.may_call("manager", "client.list.get").is_ok() {
        if let Ok(reply) = bus.request_message("manager", &list, WAIT).await {
            scrape.clients(&reply.data);
        }
    }
    scrape.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_types_labels_and_the_prefix() {
        let mut scrape = Scrape::default();
        scrape.counter("service_requests", "Requests.", &[("service", "echo")], 3.0);
        scrape.service_stats(
            "events",
            &serde_json::json!({"messages": 5, "dropped": {"oversized": 2}, "x": "text"}),
        );
        let text = scrape.encode();
        assert!(text.contains("# TYPE majordome_service_requests counter"), "{text}");
        assert!(
            text.contains("majordome_service_requests_total{service=\"echo\"} 3"),
            "{text}"
        );
        assert!(text.contains("majordome_events_messages 5"), "{text}");
        assert!(text.contains("majordome_events_dropped{key=\"oversized\"} 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let mut histogram = majordome_broker::stats::LatencyHistogram::default();
        for micros in [300, 700, 700, 5_000] {
            histogram.record(std::time::Duration::from_micros(micros));
        }
        let mut scrape = Scrape::default();
        let service = majordome_broker::stats::ServiceStats {
            counters: Default::default(),
            queued: 0,
            queued_bytes: 0,
            workers: 1,
            idle_workers: 1,
            late_workers: 0,
            latency_p50_us: histogram.quantile_us(0.5),
            latency_p99_us: histogram.quantile_us(0.99),
            latency: histogram.buckets(),
        };
        let snapshot = Snapshot {
            services: [("echo".to_owned(), service)].into_iter().collect(),
            ..Snapshot::default()
        };
        scrape.broker(&snapshot);
        let text = scrape.encode();
        assert!(
            text.contains("# TYPE majordome_service_latency_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("majordome_service_latency_seconds_count{service=\"echo\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("majordome_service_latency_seconds_sum{service=\"echo\"} 0.0067"),
            "{text}"
        );
        assert!(text.contains("le=\"+Inf\",service=\"echo\"} 4"), "{text}");
        // 300 µs is under 512 µs; the two of 700 µs under 1,024 µs.
        assert!(text.contains("le=\"0.000512\",service=\"echo\"} 1"), "{text}");
        assert!(text.contains("le=\"0.001024\",service=\"echo\"} 3"), "{text}");
    }
}
