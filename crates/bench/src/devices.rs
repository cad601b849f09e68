//! `majordome bench devices`: device commands and history writes.
//!
//! In this process: a majordome broker, forwarder and Clone server, the
//! device and history services on a fresh database, and a bench plugin
//! (`plugin-bench.local`) that answers every command with `success`.
//!
//! Commands: C clients send `device.command.do` (`setlevel` on a dimmer)
//! to `devices`, one at a time each; every command is checked against the
//! schema, forwarded to the plugin and answered. With `--baseline direct`
//! the same clients send the same command straight to the plugin through
//! the broker in the same run: the ratio is what the device service costs.
//!
//! History: one publisher sends V temperature values spread over S
//! sensors as `event.environment.temperaturechanged` events, never more
//! than `window` ahead of what history has committed (so nothing is
//! dropped at a high-water mark: the forwarder keeps 500 events per
//! subscriber, fewer in a burst, see `scenario.rs`); the figure is values
//! committed per second, each also applied to the inventory and mirrored
//! into Clone.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use majordome_client::{Client, Message, Publisher};
use majordome_hub::{HubConfig, Parts};
use majordome_services::history::HistoryCounters;

use serde_json::json;

use crate::reqrep::{median, percentile};

/// What `majordome bench devices` was asked to do.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub clients: usize,
    /// Commands per run, shared among the clients.
    pub commands: usize,
    /// Values per run for the history part.
    pub values: usize,
    /// Sensors the values are spread over.
    pub sensors: usize,
    /// Values published but not yet committed, at most.
    pub window: usize,
    pub runs: usize,
    /// Also send the commands straight to the plugin.
    pub baseline_direct: bool,
    /// Folder for the database; `None`: a temporary one.
    pub data: Option<PathBuf>,
    pub durability: majordome_store::Durability,
}

/// Median figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceFigures {
    pub commands_per_second: f64,
    pub command_p50_us: f64,
    pub command_p99_us: f64,
    pub direct_p50_us: Option<f64>,
    pub values_per_second: f64,
}

use crate::PLUGIN;

/// One run: commands/s, p50, p99, direct p50, values/s.
type RunRow = (f64, f64, f64, Option<f64>, f64);

struct Stack {
    broker: String,
    publish: String,
    /// Held for its Drop: stops and joins the stack before the folder goes.
    _background: crate::Background,
    history: Arc<HistoryCounters>,
    commits: Arc<majordome_store::CommitStats>,
    _folder: Option<tempfile::TempDir>,
}

impl Stack {
    fn start(options: &DeviceOptions) -> Result<Stack> {
        let (folder, path) = crate::data_folder(options.data.as_ref(), "majordome-bench-devices")?;
        let mut config = HubConfig::on_free_ports(
            &path,
            Parts {
                broker: true,
                events: true,
                state: true,
                devices: true,
                ..Parts::none()
            },
        );
        config.durability = options.durability;
        let (mut background, endpoints) = crate::Background::start_hub(&config)?;
        let counters = background.hub().context("the bench started a hub")?.counters().clone();
        let (history, commits) = (
            counters.history.context("the device service keeps history counters")?,
            counters
                .history_commits
                .context("the device service keeps commit stats")?,
        );
        // The plugin: as quick as a plugin can be, so the figure is the
        // bus's and the device service's.
        for _ in 0..2 {
            background.spawn_plugin(&endpoints.broker, || {})?;
        }
        Ok(Stack {
            broker: endpoints.broker,
            publish: endpoints.publish,
            _background: background,
            history,
            commits,
            _folder: folder,
        })
    }
}

fn register(client: &mut Client, id: &str, kind: &str) -> Result<String> {
    let reply = client.request_message(
        "devices",
        &Message::new(
            "device.create.do",
            json!({"client": PLUGIN, "id": id, "type": kind, "stale_after": 0}),
        ),
    )?;
    ensure!(reply.status() == Some(true), "device.create.do: {:?}", reply.reason());
    reply.data["uuid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("device.create.do gave no uuid"))
}

/// Sends `commands` commands from `clients` threads; returns (commands/s,
/// sorted latencies in µs).
fn commands(options: &DeviceOptions, broker: &str, uuid: &str, direct: bool) -> Result<(f64, Vec<u32>)> {
    let barrier = Arc::new(Barrier::new(options.clients + 1));
    let mut handles = Vec::new();
    for t in 0..options.clients {
        let share = options.commands / options.clients + usize::from(t < options.commands % options.clients);
        let (barrier, broker, uuid) = (barrier.clone(), broker.to_owned(), uuid.to_owned());
        handles.push(thread::spawn(move || -> Result<Vec<u32>> {
            let mut client = crate::client(&broker);
            let (service, message) = if direct {
                let data = json!({"uuid": uuid, "id": "dimmer", "command": "setlevel", "data": {"level": 50}});
                (PLUGIN, Message::new("device.command.do", data))
            } else {
                let data = json!({"uuid": uuid, "command": "setlevel", "data": {"level": 50}});
                ("devices", Message::new("device.command.do", data))
            };
            barrier.wait();
            let mut latencies = Vec::with_capacity(share);
            for _ in 0..share {
                let start = Instant::now();
                let reply = client.request_message(service, &message)?;
                ensure!(
                    reply.data["result"]["identifier"] == "success",
                    "the command failed: {:?}",
                    reply.data
                );
                latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(latencies)
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(options.commands);
    for handle in handles {
        latencies.extend(handle.join().map_err(|_| anyhow!("a bench client panicked"))??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok((options.commands as f64 / elapsed, latencies))
}

/// Publishes `options.values` values over `sensors`, at most
/// `options.window` ahead of the history; returns (values committed/s,
/// values lost on the way).
fn values(options: &DeviceOptions, stack: &Stack, publisher: &mut Publisher, sensors: &[String]) -> Result<(f64, u64)> {
    let base = stack.history.stored.load(Ordering::Relaxed);
    let stored = || stack.history.stored.load(Ordering::Relaxed) - base;
    let start = Instant::now();
    let mut stalled_since = Instant::now();
    let mut last_stored = 0;
    for i in 0..options.values {
        while i as u64 - stored() >= options.window as u64 {
            let now_stored = stored();
            if now_stored != last_stored {
                (last_stored, stalled_since) = (now_stored, Instant::now());
            } else if stalled_since.elapsed() > Duration::from_secs(10) {
                bail!(
                    "history stopped at {now_stored} of {i} values published (dropped on the way? see `devices` stats)"
                );
            }
            thread::sleep(Duration::from_micros(200));
        }
        let sensor = &sensors[i % sensors.len()];
        let event = json!({"uuid": sensor, "event": "event.environment.temperaturechanged",
                           "data": {"level": 20.0 + (i % 100) as f64 / 10.0, "unit": "degC"}});
        publisher.publish("event.environment.temperaturechanged", &event)?;
    }
    // Wait for the last values; if some never come (dropped at a
    // high-water mark on the way), say how many once nothing moves.
    let mut last = (stored(), Instant::now());
    while stored() < options.values as u64 {
        let now_stored = stored();
        if now_stored != last.0 {
            last = (now_stored, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        thread::sleep(Duration::from_micros(200));
    }
    let committed = stored().min(options.values as u64);
    let elapsed = if committed < options.values as u64 {
        last.1.duration_since(start)
    } else {
        start.elapsed()
    };
    Ok((
        committed as f64 / elapsed.as_secs_f64(),
        options.values as u64 - committed,
    ))
}

/// Runs the benchmark and prints progress and results to `out`.
pub fn run(options: &DeviceOptions, out: &mut dyn Write) -> Result<DeviceFigures> {
    ensure!(options.clients >= 1, "--clients must be at least 1");
    ensure!(options.commands >= 1, "--commands must be at least 1");
    ensure!(options.values >= 1, "--values must be at least 1");
    ensure!(options.sensors >= 1, "--sensors must be at least 1");
    ensure!(options.window >= 1, "--window must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    writeln!(
        out,
        "bench devices: {} commands from {} clients, {} values over {} sensors (window {}) per run, {} runs; durability {:?}",
        options.commands, options.clients, options.values, options.sensors, options.window, options.runs, options.durability
    )?;
    let stack = Stack::start(options)?;
    let mut admin = crate::client(&stack.broker);
    let dimmer = register(&mut admin, "dimmer", "dimmer")?;
    let sensors = (0..options.sensors)
        .map(|i| register(&mut admin, &format!("sensor-{i}"), "temperaturesensor"))
        .collect::<Result<Vec<_>>>()?;
    let mut publisher = Publisher::connect(&stack.publish)?;
    ensure!(
        publisher.wait_for_subscriber("event.environment", Duration::from_secs(10))?,
        "the device service did not subscribe to events"
    );
    // Warm up: the plugin's workers must be registered before timing.
    commands(
        &DeviceOptions {
            commands: 10,
            clients: 1,
            ..options.clone()
        },
        &stack.broker,
        &dimmer,
        false,
    )
    .context("warming up")?;
    let mut rows: Vec<RunRow> = Vec::new();
    for run in 1..=options.runs {
        let (rate, latencies) = commands(options, &stack.broker, &dimmer, false)?;
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let mut line = format!("run {run} commands: {rate:.0}/s, p50 {p50:.0} us, p99 {p99:.0} us");
        let direct = if options.baseline_direct {
            let (direct_rate, direct_latencies) = commands(options, &stack.broker, &dimmer, true)?;
            let direct_p50 = percentile(&direct_latencies, 0.5);
            line.push_str(&format!(
                "; direct to the plugin {direct_rate:.0}/s, p50 {direct_p50:.0} us, p99 {:.0} us",
                percentile(&direct_latencies, 0.99)
            ));
            Some(direct_p50)
        } else {
            None
        };
        writeln!(out, "{line}")?;
        let commits = stack.commits.commits.load(Ordering::Relaxed);
        let (per_second, lost) = values(options, &stack, &mut publisher, &sensors)?;
        let commits = stack.commits.commits.load(Ordering::Relaxed) - commits;
        writeln!(
            out,
            "run {run} history: {per_second:.0} values/s committed ({commits} commits, {:.0} values per commit); \
             lost on the way: {lost}",
            options.values as f64 / commits.max(1) as f64
        )?;
        rows.push((rate, p50, p99, direct, per_second));
    }
    let column = |pick: fn(&RunRow) -> f64| median(&rows.iter().map(pick).collect::<Vec<_>>());
    let figures = DeviceFigures {
        commands_per_second: column(|r| r.0),
        command_p50_us: column(|r| r.1),
        command_p99_us: column(|r| r.2),
        direct_p50_us: options.baseline_direct.then(|| column(|r| r.3.unwrap_or_default())),
        values_per_second: column(|r| r.4),
    };
    writeln!(
        out,
        "commands: {:.0}/s, round trip p50 {:.0} us, p99 {:.0} us (medians)",
        figures.commands_per_second, figures.command_p50_us, figures.command_p99_us
    )?;
    if let Some(direct) = figures.direct_p50_us {
        writeln!(
            out,
            "direct to the plugin: p50 {direct:.0} us; ratio devices/direct p50 {:.2}x",
            figures.command_p50_us / direct.max(1e-9)
        )?;
    }
    writeln!(
        out,
        "history: {:.0} values/s committed (median)",
        figures.values_per_second
    )?;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_completes() {
        let options = DeviceOptions {
            clients: 2,
            commands: 100,
            values: 500,
            sensors: 5,
            window: 100,
            runs: 1,
            baseline_direct: true,
            data: None,
            durability: majordome_store::Durability::Process,
        };
        let mut out = Vec::new();
        let figures = run(&options, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ratio devices/direct"), "{text}");
        assert!(figures.values_per_second > 0.0 && figures.commands_per_second > 0.0);
    }
}
