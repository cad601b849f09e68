//! The `fake` plugin: five devices that behave like real ones, so a new
//! installation shows live values and answers commands at once.
//!
//! - `fake-cyclic` (temperaturesensor): rises from `cyclic_min` to
//!   `cyclic_max` over the first half of `cycle_length`, back down over
//!   the second half;
//! - `fake-linear` (energymeter): starts at `linear_start`, adds
//!   `linear_step` at each reading;
//! - `fake-switch` (switch): `on`/`off`, carried out at once;
//! - `fake-dimmer` (dimmer): `setlevel`/`on`/`off`, carried out after
//!   `dimmer_ramp` seconds, so it answers `success.queued` and the
//!   `statechanged` that follows carries the `ref`;
//! - `fake-binary` (binarysensor): flips every `binary_period` seconds.
//!
//! Every device reports its value every `interval` seconds.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use majordome_client::{Message, Shutdown};
use serde_json::{json, Map, Value};

use crate::{Command, Device, Endpoints, Handler, Outcome, Plugin, PluginError, PluginSettings, Values};

/// The fake plugin's settings, from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeConfig {
    /// Seconds between two readings of every device.
    pub interval: f64,
    /// Seconds of one cycle of the cyclic sensor.
    pub cycle_length: f64,
    /// The cyclic sensor's value at the start and end of a cycle.
    pub cyclic_min: f64,
    /// The cyclic sensor's value at half cycle.
    pub cyclic_max: f64,
    /// The cyclic sensor's unit.
    pub cyclic_unit: String,
    /// The linear sensor's first value.
    pub linear_start: f64,
    /// What the linear sensor adds at each reading.
    pub linear_step: f64,
    /// Seconds the dimmer takes to reach a new level.
    pub dimmer_ramp: f64,
    /// Seconds between two flips of the binary sensor.
    pub binary_period: f64,
    /// The room of every fake device.
    pub room: String,
}

impl FakeConfig {
    /// Reads the config, with the manifest's defaults for what is missing.
    pub fn from_map(config: &Map<String, Value>) -> FakeConfig {
        let number = |key: &str, default: f64, min: f64| {
            config
                .get(key)
                .and_then(Value::as_f64)
                .filter(|n| n.is_finite())
                .unwrap_or(default)
                .max(min)
        };
        let text = |key: &str, default: &str| config.get(key).and_then(Value::as_str).unwrap_or(default).to_owned();
        FakeConfig {
            interval: number("interval", 5.0, 0.05),
            cycle_length: number("cycle_length", 60.0, 1.0),
            cyclic_min: number("cyclic_min", 15.0, f64::MIN),
            cyclic_max: number("cyclic_max", 25.0, f64::MIN),
            cyclic_unit: text("cyclic_unit", "degC"),
            linear_start: number("linear_start", 0.0, f64::MIN),
            linear_step: number("linear_step", 1.0, f64::MIN),
            dimmer_ramp: number("dimmer_ramp", 0.2, 0.0),
            binary_period: number("binary_period", 30.0, 0.05),
            room: text("room", "Living room"),
        }
    }
}

/// The cyclic sensor's value `elapsed` seconds into its life: `min` at the
/// start of a cycle, `max` at half cycle, `min` again at the end.
pub fn cyclic_value(elapsed: f64, length: f64, min: f64, max: f64) -> f64 {
    let phase = (elapsed.rem_euclid(length)) / length;
    let rise = if phase < 0.5 { phase * 2.0 } else { (1.0 - phase) * 2.0 };
    let value = min + (max - min) * rise;
    (value * 100.0).round() / 100.0
}

#[derive(Default)]
struct State {
    switch_on: bool,
    dimmer_level: i64,
    binary_on: bool,
    linear: f64,
    values_published: u64,
    commands: u64,
}

struct Uuids {
    cyclic: String,
    linear: String,
    switch: String,
    dimmer: String,
    binary: String,
}

struct FakeHandler {
    state: Arc<Mutex<State>>,
    config: Arc<Mutex<FakeConfig>>,
    dimmer: String,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handler for FakeHandler {
    fn command(&mut self, command: &Command, values: &Values) -> Outcome {
        lock(&self.state).commands += 1;
        match command.command.as_str() {
            "on" | "off" if command.uuid != self.dimmer => {
                let on = command.command == "on";
                lock(&self.state).switch_on = on;
                let level = if on { 255 } else { 0 };
                values.publish(
                    &command.uuid,
                    "event.device.statechanged",
                    "state",
                    level.into(),
                    "level",
                    None,
                );
                Outcome::Done
            }
            "on" | "off" | "setlevel" => {
                let level = match command.command.as_str() {
                    "on" => 100,
                    "off" => 0,
                    _ => match command.data.get("level").and_then(Value::as_i64) {
                        Some(level) => level.clamp(0, 100),
                        None => {
                            return Outcome::Failed {
                                identifier: "error.parameter.missing".into(),
                                message: "setlevel needs 'level'".into(),
                            }
                        }
                    },
                };
                let reference = Outcome::new_ref();
                let ramp = Duration::from_secs_f64(lock(&self.config).dimmer_ramp);
                let (state, values, uuid, event_ref) = (
                    self.state.clone(),
                    values.clone(),
                    command.uuid.clone(),
                    reference.clone(),
                );
                // The dimmer takes its time, like a real one: the reply
                // goes now, the event when the level is reached.
                thread::spawn(move || {
                    thread::sleep(ramp);
                    lock(&state).dimmer_level = level;
                    values.publish(
                        &uuid,
                        "event.device.statechanged",
                        "state",
                        level.into(),
                        "percent",
                        Some(&event_ref),
                    );
                });
                Outcome::Queued(reference)
            }
            other => Outcome::Failed {
                identifier: "error.command.invalid".into(),
                message: format!("the fake devices do not know '{other}'"),
            },
        }
    }

    fn action(&mut self, message: &Message) -> Option<Message> {
        (message.action == "stats.get").then(|| {
            let state = lock(&self.state);
            Message::new(
                "stats.result",
                json!({"values_published": state.values_published, "commands": state.commands}),
            )
        })
    }
}

/// Runs the fake plugin until `plugin.stop.do` or `shutdown`.
pub fn run(settings: PluginSettings, endpoints: Endpoints, shutdown: &Shutdown) -> Result<(), PluginError> {
    // A stop asked for while it still waits for its services is a clean
    // stop (it has said `stopped`), not a failure.
    match run_fake(settings, endpoints, shutdown) {
        Err(PluginError::Stopped(what)) => {
            tracing::info!("fake: stopped before {what}");
            Ok(())
        }
        other => other,
    }
}

fn run_fake(settings: PluginSettings, endpoints: Endpoints, shutdown: &Shutdown) -> Result<(), PluginError> {
    let mut plugin = Plugin::start(settings, endpoints)?;
    let config = FakeConfig::from_map(&plugin.config(shutdown)?);
    let device = |id: &str, kind: &str, name: &str| Device {
        room: config.room.clone(),
        ..Device::new(id, kind, name)
    };
    let uuids = Uuids {
        cyclic: plugin.register(
            &device("fake-cyclic", "temperaturesensor", "Fake thermometer"),
            shutdown,
        )?,
        linear: plugin.register(&device("fake-linear", "energymeter", "Fake energy meter"), shutdown)?,
        switch: plugin.register(&device("fake-switch", "switch", "Fake switch"), shutdown)?,
        dimmer: plugin.register(&device("fake-dimmer", "dimmer", "Fake dimmer"), shutdown)?,
        binary: plugin.register(&device("fake-binary", "binarysensor", "Fake motion sensor"), shutdown)?,
    };
    let state = Arc::new(Mutex::new(State {
        linear: config.linear_start,
        ..State::default()
    }));
    let shared_config = Arc::new(Mutex::new(config));
    let handler = FakeHandler {
        state: state.clone(),
        config: shared_config.clone(),
        dimmer: uuids.dimmer.clone(),
    };
    let running = plugin.serve(handler, shutdown)?;
    let values = running.values();
    let started = Instant::now();
    let mut last_flip = Instant::now();
    loop {
        if let Some(new) = running.new_config() {
            let new = FakeConfig::from_map(&new);
            tracing::info!(interval = new.interval, "fake: new config");
            *lock(&shared_config) = new;
        }
        let config = lock(&shared_config).clone();
        let published = {
            let mut state = lock(&state);
            if last_flip.elapsed().as_secs_f64() >= config.binary_period {
                state.binary_on = !state.binary_on;
                last_flip = Instant::now();
            }
            let cyclic = cyclic_value(
                started.elapsed().as_secs_f64(),
                config.cycle_length,
                config.cyclic_min,
                config.cyclic_max,
            );
            let readings = [
                (
                    &uuids.cyclic,
                    "event.environment.temperaturechanged",
                    "temperature",
                    json!(cyclic),
                    config.cyclic_unit.as_str(),
                ),
                (
                    &uuids.linear,
                    "event.environment.energychanged",
                    "energy",
                    json!(state.linear),
                    "kWh",
                ),
                (
                    &uuids.switch,
                    "event.device.statechanged",
                    "state",
                    json!(if state.switch_on { 255 } else { 0 }),
                    "level",
                ),
                (
                    &uuids.dimmer,
                    "event.device.statechanged",
                    "state",
                    json!(state.dimmer_level),
                    "percent",
                ),
                (
                    &uuids.binary,
                    "event.device.statechanged",
                    "state",
                    json!(if state.binary_on { 255 } else { 0 }),
                    "level",
                ),
            ];
            state.linear += config.linear_step;
            state.values_published += readings.len() as u64;
            readings
        };
        for (uuid, subject, quantity, level, unit) in published {
            values.publish(uuid, subject, quantity, level, unit, None);
        }
        if running
            .stop_signal()
            .wait_timeout(Duration::from_secs_f64(config.interval))
        {
            break;
        }
    }
    running.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cyclic_sensor_rises_to_max_at_half_cycle_and_comes_back() {
        let value = |t: f64| cyclic_value(t, 60.0, 15.0, 25.0);
        assert_eq!(value(0.0), 15.0);
        assert_eq!(value(15.0), 20.0);
        assert_eq!(value(30.0), 25.0);
        assert_eq!(value(45.0), 20.0);
        assert_eq!(value(60.0), 15.0);
        assert_eq!(value(90.0), 25.0, "the next cycle");
    }

    #[test]
    fn config_falls_back_to_defaults_and_bounds() {
        let config = FakeConfig::from_map(
            &json!({"interval": 0.001, "room": "Attic"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(config.interval, 0.05);
        assert_eq!(config.room, "Attic");
        assert_eq!(config.cycle_length, 60.0);
    }
}
