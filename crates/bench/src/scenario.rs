//! `majordome bench scenario`: how quickly the scenario engine reacts, and
//! how many events it evaluates.
//!
//! In this process: a majordome broker, forwarder and Clone server, the
//! device and scenario services on a fresh database, and a bench plugin
//! (`plugin-bench.local`) that answers every command with `success` and
//! notes when each arrived.
//!
//! Reaction: an event `bench.trigger` fires a scenario whose action is a
//! command to the plugin's switch; the figure is the time from publishing
//! the event to the plugin receiving the command, one at a time. The
//! baseline, in the same run: the same command sent directly to the
//! device service, from sending to the plugin receiving it. The
//! difference is what the event's trip and the engine cost.
//!
//! Evaluation: with N scenarios enabled, each with an event trigger that
//! the flood does not match (so every event is compared with every
//! trigger and none runs), the bench publishes E events and reads the
//! engine's `events` counter; the figure is events evaluated per second.
//! The baseline, in the same run: the same flood with every scenario
//! disabled (the engine's plumbing alone). Publishing keeps at most
//! `window` events ahead of the engine, so none is lost at a high-water
//! mark: the forwarder queues 500 events per subscriber
//! (`events.high_water_mark`), and libzmq counts a queued event as gone
//! only when the reading thread acknowledges it, every 250 or so; so a
//! burst of a few hundred, faster than the acknowledgements, loses some
//! even to a subscriber that reads and has room (measured: 3,000 back to
//! back, to a subscriber with room for 100,000, lost 0 to 550, in runs
//! starting at multiples of 500).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use majordome_client::{Client, Message, Publisher};
use majordome_hub::{HubConfig, Parts};
use serde_json::{json, Value};

use crate::reqrep::{median, percentile};

/// What `majordome bench scenario` was asked to do.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// Reactions timed per run.
    pub samples: usize,
    /// Scenarios enabled for the evaluation.
    pub scenarios: usize,
    /// Events published per evaluation.
    pub events: usize,
    /// Events published ahead of what the engine has evaluated, at most.
    pub window: usize,
    pub runs: usize,
    pub data: Option<PathBuf>,
}

/// Median figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScenarioFigures {
    pub reaction_p50_us: f64,
    pub reaction_p99_us: f64,
    pub direct_p50_us: f64,
    pub direct_p99_us: f64,
    pub evaluated_per_second: f64,
    pub plumbing_per_second: f64,
}

use crate::PLUGIN;

struct Stack {
    broker: String,
    publish: String,
    /// When the plugin received each command.
    received: mpsc::Receiver<Instant>,
    _background: crate::Background,
    _folder: Option<tempfile::TempDir>,
}

impl Stack {
    fn start(options: &ScenarioOptions) -> Result<Stack> {
        let (folder, path) = crate::data_folder(options.data.as_ref(), "majordome-bench-scenario")?;
        let config = HubConfig::on_free_ports(
            &path,
            Parts {
                broker: true,
                events: true,
                state: true,
                devices: true,
                scenario: true,
                ..Parts::none()
            },
        );
        let (mut background, endpoints) = crate::Background::start_hub(&config)?;
        let (arrived, received) = mpsc::channel();
        background.spawn_plugin(&endpoints.broker, move || {
            let _ = arrived.send(Instant::now());
        })?;
        Ok(Stack {
            broker: endpoints.broker,
            publish: endpoints.publish,
            received,
            _background: background,
            _folder: folder,
        })
    }
}

fn ask(client: &mut Client, action: &str, data: Value) -> Result<Value> {
    let reply = client.request_message("scenario", &Message::new(action, data))?;
    ensure!(reply.status() != Some(false), "{action}: {:?}", reply.reason());
    Ok(reply.data)
}

/// Waits for the plugin to receive a command; when.
fn arrival(stack: &Stack) -> Result<Instant> {
    stack
        .received
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the command never reached the plugin"))
}

/// Event → scenario → command, one at a time: latencies in µs, sorted.
fn reactions(stack: &Stack, publisher: &mut Publisher, samples: usize) -> Result<Vec<u32>> {
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let sent = Instant::now();
        publisher.publish("bench.trigger", &json!({"n": i}))?;
        latencies.push(arrival(stack)?.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// The same command straight to the device service, one at a time.
fn direct(stack: &Stack, client: &mut Client, switch: &str, samples: usize) -> Result<Vec<u32>> {
    let mut latencies = Vec::with_capacity(samples);
    let command = Message::new("device.command.do", json!({"uuid": switch, "command": "on"}));
    for _ in 0..samples {
        let sent = Instant::now();
        let reply = client.request_message("devices", &command)?;
        ensure!(reply.data["result"]["identifier"] == "success", "{:?}", reply.data);
        latencies.push(arrival(stack)?.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// Events the engine has evaluated so far.
fn evaluated(client: &mut Client) -> Result<u64> {
    Ok(ask(client, "stats.get", json!({}))?["events"].as_u64().unwrap_or(0))
}

/// Publishes `options.events` events nobody's trigger matches, at most
/// `window` ahead of the engine; events evaluated per second.
fn flood(options: &ScenarioOptions, stack: &Stack, publisher: &mut Publisher, client: &mut Client) -> Result<f64> {
    let base = evaluated(client)?;
    let start = Instant::now();
    let mut seen = 0;
    let mut stalled = Instant::now();
    for i in 0..options.events {
        while i as u64 >= seen + options.window as u64 {
            let now = evaluated(client)? - base;
            if now != seen {
                (seen, stalled) = (now, Instant::now());
            } else if stalled.elapsed() > Duration::from_secs(10) {
                bail!("the engine stopped at {now} of {i} events published (lost at a high-water mark?)");
            } else {
                // Each look is a request the engine answers between events.
                thread::sleep(Duration::from_micros(500));
            }
        }
        publisher.publish("event.bench.flood", &json!({"n": i, "level": i % 100}))?;
    }
    while seen < options.events as u64 {
        let now = evaluated(client)? - base;
        if now != seen {
            (seen, stalled) = (now, Instant::now());
        } else if stalled.elapsed() > Duration::from_secs(10) {
            bail!(
                "the engine evaluated {now} of {} events: the rest were lost",
                options.events
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
    let _ = stack;
    Ok(options.events as f64 / start.elapsed().as_secs_f64())
}

/// Stores the scenarios the flood is compared with, enabled or not: an
/// event trigger each, of a category the flood never has (imported 200 at
/// a time: one check of the devices and one commit per 200).
fn switch_all(client: &mut Client, count: usize, enabled: bool) -> Result<()> {
    let never: Vec<Value> = (0..count)
        .map(|i| {
            json!({"name": format!("never-{i}"), "enabled": enabled,
                   "triggers": [{"trigger": "event", "category": format!("bench.never.{i}"), "match": {"n": -1}}],
                   "actions": [{"action": "log", "message": "never"}]})
        })
        .collect();
    for chunk in never.chunks(200) {
        ask(client, "scenario.import.do", json!({"scenarios": chunk}))?;
    }
    settle(client)
}

/// Waits until what an import set going has finished: each scenario's
/// live state written to Clone (and its device registered, the first
/// time), which comes back to the engine as Clone changes. Quiet is the
/// engine's count of Clone changes not moving for half a second.
fn settle(client: &mut Client) -> Result<()> {
    let changes = |client: &mut Client| -> Result<u64> {
        Ok(ask(client, "stats.get", json!({}))?["state_changes"]
            .as_u64()
            .unwrap_or(0))
    };
    let started = Instant::now();
    let mut last = changes(client)?;
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = changes(client)?;
        if now == last {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the scenario service did not settle after an import"
        );
        last = now;
    }
}

pub fn run(options: &ScenarioOptions, out: &mut dyn Write) -> Result<ScenarioFigures> {
    ensure!(options.samples >= 1, "--samples must be at least 1");
    ensure!(options.events >= 1, "--events must be at least 1");
    ensure!(options.window >= 1, "--window must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    writeln!(
        out,
        "bench scenario: {} reactions, then {} events against {} scenarios (window {}) per run, {} runs",
        options.samples, options.events, options.scenarios, options.window, options.runs
    )?;
    let stack = Stack::start(options)?;
    let mut client = crate::client(&stack.broker);
    let created = client.request_message(
        "devices",
        &Message::new(
            "device.create.do",
            json!({"client": PLUGIN, "id": "switch", "type": "switch"}),
        ),
    )?;
    let switch = created.data["uuid"]
        .as_str()
        .context("device.create.do gave no uuid")?
        .to_owned();
    ask(
        &mut client,
        "scenario.new.do",
        json!({"scenario": {"name": "react", "mode": "parallel", "max_runs": 100,
                            "triggers": [{"trigger": "event", "category": "bench.trigger"}],
                            "actions": [{"action": "command", "device": switch, "command": "on"}]}}),
    )?;
    let mut publisher = Publisher::connect(&stack.publish)?;
    ensure!(
        publisher.wait_for_subscriber("bench.trigger", Duration::from_secs(10))?,
        "the scenario service did not subscribe to events"
    );
    // Warm up: the plugin's worker and the engine's executors.
    reactions(&stack, &mut publisher, 10).context("warming up")?;
    direct(&stack, &mut client, &switch, 10).context("warming up")?;
    type Row = (f64, f64, f64, f64, f64, f64);
    let mut rows: Vec<Row> = Vec::new();
    for run in 1..=options.runs {
        let through = reactions(&stack, &mut publisher, options.samples)?;
        let straight = direct(&stack, &mut client, &switch, options.samples)?;
        let (p50, p99) = (percentile(&through, 0.5), percentile(&through, 0.99));
        let (d50, d99) = (percentile(&straight, 0.5), percentile(&straight, 0.99));
        writeln!(
            out,
            "run {run} reaction: event to command p50 {p50:.0} us, p99 {p99:.0} us; \
             the command sent directly p50 {d50:.0} us, p99 {d99:.0} us"
        )?;
        switch_all(&mut client, options.scenarios, false)?;
        let plumbing = flood(options, &stack, &mut publisher, &mut client)?;
        switch_all(&mut client, options.scenarios, true)?;
        let rate = flood(options, &stack, &mut publisher, &mut client)?;
        writeln!(
            out,
            "run {run} evaluation: {rate:.0} events/s against {} enabled scenarios; {plumbing:.0}/s with them disabled",
            options.scenarios
        )?;
        rows.push((p50, p99, d50, d99, rate, plumbing));
    }
    let column = |pick: fn(&Row) -> f64| median(&rows.iter().map(pick).collect::<Vec<_>>());
    let figures = ScenarioFigures {
        reaction_p50_us: column(|r| r.0),
        reaction_p99_us: column(|r| r.1),
        direct_p50_us: column(|r| r.2),
        direct_p99_us: column(|r| r.3),
        evaluated_per_second: column(|r| r.4),
        plumbing_per_second: column(|r| r.5),
    };
    writeln!(out, "median of {} runs:", options.runs)?;
    writeln!(
        out,
        "  event to command: p50 {:.0} us, p99 {:.0} us; directly: p50 {:.0} us, p99 {:.0} us; ratio p50 {:.2}x, p99 {:.2}x",
        figures.reaction_p50_us,
        figures.reaction_p99_us,
        figures.direct_p50_us,
        figures.direct_p99_us,
        figures.reaction_p50_us / figures.direct_p50_us.max(1.0),
        figures.reaction_p99_us / figures.direct_p99_us.max(1.0),
    )?;
    writeln!(
        out,
        "  events evaluated: {:.0}/s with {} scenarios enabled, {:.0}/s with none: ratio {:.2}",
        figures.evaluated_per_second,
        options.scenarios,
        figures.plumbing_per_second,
        figures.evaluated_per_second / figures.plumbing_per_second.max(1.0),
    )?;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_reacts_and_evaluates() {
        let options = ScenarioOptions {
            samples: 5,
            scenarios: 20,
            events: 200,
            window: 100,
            runs: 1,
            data: None,
        };
        let mut out = Vec::new();
        let figures = run(&options, &mut out).unwrap();
        let said = String::from_utf8(out).unwrap();
        assert!(
            figures.reaction_p50_us > 0.0 && figures.evaluated_per_second > 0.0,
            "{said}"
        );
        assert!(said.contains("events evaluated"), "{said}");
    }
}
