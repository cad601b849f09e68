//! `majordome bench state`: the Clone server (RFC 12).
//!
//! 1. Loads K keys through the collector, acknowledged (each batch is
//!    confirmed by its KVPUB, which the server sends only once committed).
//! 2. Times a snapshot of all K keys to a new client (`ICANHAZ?` until
//!    `KTHXBAI`), several runs.
//! 3. Times update → mirror: one writer sets a key, one mirror waits for
//!    the change, one at a time, N times; p50/p99.
//!
//! The baseline, with `--baseline relay`, is the same update round trip
//! through a bare libzmq SUB→PUB relay in this process: the two socket
//! hops of the Clone path with no ordering, storage or fsync.

use std::io::Write;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bytes::Bytes;
use majordome_net::{self as net, Shutdown};
use majordome_state::{Change, Endpoints, Mirror, MirrorOptions, Server, Writer, WriterOptions};

use crate::reqrep::{median, percentile};

/// What `majordome bench state` was asked to do.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// An external server's snapshot endpoint; `None` starts one in this
    /// process on a fresh database.
    pub endpoint: Option<String>,
    /// Keys loaded, then fetched by each snapshot.
    pub keys: usize,
    /// Bytes per value.
    pub size: usize,
    /// Update round trips timed.
    pub updates: usize,
    /// Snapshot runs; the figure is their median.
    pub runs: usize,
    /// Also time the update round trip through a bare SUB→PUB relay.
    pub baseline_relay: bool,
    /// Where the in-process server keeps its database; `None`: a
    /// temporary folder.
    pub data: Option<PathBuf>,
}

/// The figures of one bench.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateFigures {
    pub load_keys_per_second: f64,
    pub snapshot_seconds: f64,
    pub update_p50_us: f64,
    pub update_p99_us: f64,
    pub relay_p50_us: Option<f64>,
    pub relay_p99_us: Option<f64>,
}

/// A server run in this process for the bench.
struct LocalServer {
    endpoints: Endpoints,
    /// Held for its Drop: stops and joins the server before the folder goes.
    _background: crate::Background,
    _folder: Option<tempfile::TempDir>,
}

impl LocalServer {
    fn start(data: Option<&PathBuf>) -> Result<LocalServer> {
        let (folder, path) = crate::data_folder(data, "majordome-bench-state")?;
        let server = Server::bind(
            "tcp://127.0.0.1:0",
            &majordome_store::database_path(&path),
            majordome_state::Settings::default(),
        )?;
        let endpoints = server.endpoints().clone();
        let mut background = crate::Background::new()?;
        background.spawn("bench-state", move |stop| server.run(stop))?;
        Ok(LocalServer {
            endpoints,
            _background: background,
            _folder: folder,
        })
    }
}

/// KVSETs sent before waiting for the server to confirm the last one (the
/// writer itself waits for a confirmation every 500: with 10,000 at once,
/// a commit's burst of updates now and then lost the confirming one, and
/// this bench's test timed out after 30 s).
const LOAD_BATCH: usize = 10_000;

/// Runs the benchmark and prints progress and results to `out`.
pub fn run(options: &StateOptions, out: &mut dyn Write) -> Result<StateFigures> {
    ensure!(options.keys >= 1, "--keys must be at least 1");
    ensure!(options.size >= 1, "--size must be at least 1 (an empty value deletes)");
    ensure!(options.updates >= 1, "--updates must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    writeln!(
        out,
        "bench state: {} keys of {} B, {} snapshot runs, {} update round trips",
        options.keys, options.size, options.runs, options.updates
    )?;
    let local = match &options.endpoint {
        Some(_) => None,
        None => Some(LocalServer::start(options.data.as_ref())?),
    };
    let endpoints = match (&options.endpoint, &local) {
        (Some(endpoint), _) => Endpoints::from_base(endpoint)?,
        (None, Some(local)) => local.endpoints.clone(),
        (None, None) => unreachable!("a local server is started when no endpoint is given"),
    };
    let timeout = Duration::from_secs(30);

    // 1. Load.
    let mut writer = Writer::connect(&endpoints, WriterOptions::default())?;
    let value = Bytes::from(vec![b'v'; options.size]);
    let start = Instant::now();
    let mut loaded = 0;
    while loaded < options.keys {
        let batch = LOAD_BATCH.min(options.keys - loaded);
        let mut last = Bytes::new();
        for i in loaded..loaded + batch {
            last = writer.send(&format!("/bench/k{i:07}"), value.clone(), None)?;
        }
        writer.confirm(&last, timeout)?;
        loaded += batch;
    }
    let load_seconds = start.elapsed().as_secs_f64();
    let load_rate = options.keys as f64 / load_seconds;
    writeln!(
        out,
        "load: {} keys stored and published in {load_seconds:.2} s ({load_rate:.0} keys/s, acknowledged)",
        options.keys
    )?;

    // 2. Snapshots.
    let mut times = Vec::new();
    for run in 1..=options.runs {
        let start = Instant::now();
        let (messages, sequence) = majordome_state::snapshot(&endpoints, "/bench/k", timeout)?;
        let seconds = start.elapsed().as_secs_f64();
        ensure!(
            messages.len() == options.keys,
            "the snapshot had {} keys, expected {}",
            messages.len(),
            options.keys
        );
        writeln!(
            out,
            "snapshot run {run}: {} keys in {:.3} s (sequence {sequence})",
            messages.len(),
            seconds
        )?;
        times.push(seconds);
    }
    let snapshot_seconds = median(&times);

    // 3. Update → mirror.
    let mut mirror = Mirror::connect(&endpoints, "/bench/latency/", MirrorOptions::default())?;
    let mut latencies = Vec::with_capacity(options.updates);
    for i in 0..options.updates {
        let key = format!("/bench/latency/{}", i % 100);
        let start = Instant::now();
        writer.send(&key, value.clone(), None)?;
        loop {
            match mirror.next(timeout)? {
                Some(Change::Set { key: got, .. }) if got == key => break,
                Some(Change::Lost { reason }) => anyhow::bail!("the mirror lost the server: {reason}"),
                Some(_) => {}
                None => anyhow::bail!("update {i} did not reach the mirror within {timeout:?}"),
            }
        }
        latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    latencies.sort_unstable();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    writeln!(out, "update -> mirror: p50 {p50:.0} us, p99 {p99:.0} us")?;

    let (relay_p50, relay_p99) = if options.baseline_relay {
        let (p50r, p99r) = relay_round_trips(options.updates, options.size)?;
        writeln!(out, "bare SUB->PUB relay: p50 {p50r:.0} us, p99 {p99r:.0} us")?;
        writeln!(
            out,
            "ratio relay/state (latency): p50 {:.2}, p99 {:.2}",
            p50r / p50.max(1.0),
            p99r / p99.max(1.0)
        )?;
        (Some(p50r), Some(p99r))
    } else {
        (None, None)
    };
    writeln!(
        out,
        "summary: snapshot of {} keys {:.3} s (median of {}), update -> mirror p50 {p50:.0} us p99 {p99:.0} us",
        options.keys, snapshot_seconds, options.runs
    )?;
    Ok(StateFigures {
        load_keys_per_second: load_rate,
        snapshot_seconds,
        update_p50_us: p50,
        update_p99_us: p99,
        relay_p50_us: relay_p50,
        relay_p99_us: relay_p99,
    })
}

/// The same round trip through a bare relay: our PUB → relay SUB, relay
/// PUB → our SUB, five-frame messages, one at a time.
fn relay_round_trips(count: usize, size: usize) -> Result<(f64, f64)> {
    let context = zmq::Context::new();
    let inbound = context.socket(zmq::SUB)?;
    inbound.set_subscribe(b"")?;
    inbound.bind("tcp://127.0.0.1:0")?;
    let outbound = context.socket(zmq::PUB)?;
    outbound.bind("tcp://127.0.0.1:0")?;
    let inbound_at = net::bound_endpoint(&inbound)?;
    let outbound_at = net::bound_endpoint(&outbound)?;
    let shutdown = Shutdown::new()?;
    let stop = shutdown.clone();
    let relay = thread::spawn(move || -> Result<()> {
        let mut scratch = zmq::Message::new();
        loop {
            let mut items = [
                inbound.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(stop.fd(), zmq::POLLIN),
            ];
            zmq::poll(&mut items, -1)?;
            if items[1].is_readable() {
                return Ok(());
            }
            while let Some(net::Received::Message(frames)) = net::recv_frames(&inbound, &mut scratch, 16, 1 << 20)? {
                net::send_frames(&outbound, &frames, zmq::DONTWAIT)?;
            }
        }
    });
    let client_context = zmq::Context::new();
    let publisher = client_context.socket(zmq::PUB)?;
    publisher.set_linger(0)?;
    publisher.connect(&inbound_at)?;
    let subscriber = client_context.socket(zmq::SUB)?;
    subscriber.set_linger(0)?;
    subscriber.set_subscribe(b"")?;
    subscriber.connect(&outbound_at)?;
    let message = |key: &str| -> Vec<Bytes> {
        vec![
            Bytes::copy_from_slice(key.as_bytes()),
            Bytes::copy_from_slice(&0i64.to_be_bytes()),
            Bytes::from(vec![7u8; 16]),
            Bytes::new(),
            Bytes::from(vec![b'v'; size]),
        ]
    };
    // Both subscriptions must travel first: probe until the path is open.
    let start = Instant::now();
    loop {
        net::send_frames(&publisher, &message("/probe"), 0)?;
        if subscriber.poll(zmq::POLLIN, 20)? > 0 {
            break;
        }
        ensure!(start.elapsed() < Duration::from_secs(10), "the relay never opened");
    }
    let drain = |subscriber: &zmq::Socket| -> Result<()> {
        while subscriber.poll(zmq::POLLIN, 50)? > 0 {
            net::recv_all(subscriber)?;
        }
        Ok(())
    };
    drain(&subscriber)?;
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("/bench/latency/{}", i % 100);
        let start = Instant::now();
        net::send_frames(&publisher, &message(&key), 0)?;
        ensure!(subscriber.poll(zmq::POLLIN, 10_000)? > 0, "the relay lost a message");
        net::recv_all(&subscriber)?;
        latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    shutdown.trigger();
    relay.join().map_err(|_| anyhow::anyhow!("the relay panicked"))??;
    latencies.sort_unstable();
    Ok((percentile(&latencies, 0.5), percentile(&latencies, 0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_loads_snapshots_and_times_updates() {
        let options = StateOptions {
            endpoint: None,
            keys: 2_500,
            size: 10,
            updates: 50,
            runs: 2,
            baseline_relay: true,
            data: None,
        };
        let mut out = Vec::new();
        let figures = run(&options, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("snapshot run 2: 2500 keys"), "{text}");
        assert!(text.contains("ratio relay/state"), "{text}");
        assert!(figures.snapshot_seconds > 0.0 && figures.update_p99_us >= figures.update_p50_us);
        assert!(figures.relay_p50_us.is_some());
    }
}
