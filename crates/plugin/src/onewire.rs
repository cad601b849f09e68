//! The `onewire` plugin: DS18B20 thermometers read from the kernel's w1
//! files, `<sysfs_root>/28-*/w1_slave`:
//!
//! ```text
//! 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
//! 72 01 4b 46 7f ff 0e 10 57 t=23125
//! ```
//!
//! (millidegrees Celsius on the second line). A reading whose CRC says
//! `NO`, or a file that does not parse, is skipped and counted; a sensor
//! that vanishes is no longer reported, so the device service marks it
//! stale after `3 × interval`. New sensors are registered as they appear.
//! The sysfs root is a setting, so tests use a folder of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use majordome_client::{Message, Shutdown};
use serde_json::{json, Value};

use crate::{Command, Device, Endpoints, Handler, Outcome, Plugin, PluginError, PluginSettings, Values};

/// What one `w1_slave` file says.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Degrees Celsius.
    Celsius(f64),
    /// The CRC line ends in `NO`.
    BadCrc,
    /// Not the two lines expected.
    Unreadable,
}

/// Parses the text of a `w1_slave` file.
pub fn parse_w1_slave(text: &str) -> Reading {
    let mut lines = text.lines();
    let (Some(crc), Some(data)) = (lines.next(), lines.next()) else {
        return Reading::Unreadable;
    };
    match crc.trim_end().rsplit(' ').next() {
        Some("YES") => {}
        Some("NO") => return Reading::BadCrc,
        _ => return Reading::Unreadable,
    }
    match data
        .rsplit_once("t=")
        .and_then(|(_, milli)| milli.trim().parse::<i64>().ok())
    {
        Some(milli) => Reading::Celsius(milli as f64 / 1000.0),
        None => Reading::Unreadable,
    }
}

/// The sensor folders (`28-*`) under `root`, by name.
pub fn sensors(root: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.starts_with("28-").then(|| (name, e.path().join("w1_slave")))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The plugin's counters.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters {
    /// Good readings, each published.
    pub reads: u64,
    /// Readings skipped because the CRC line said `NO`.
    pub crc_errors: u64,
    /// Files that could not be read or parsed.
    pub unreadable: u64,
    /// Sensors that were there and went away (each counted once).
    pub vanished: u64,
}

struct OneWireHandler {
    counters: Arc<Mutex<Counters>>,
}

impl Handler for OneWireHandler {
    fn command(&mut self, command: &Command, _values: &Values) -> Outcome {
        Outcome::Failed {
            identifier: "error.command.invalid".into(),
            message: format!("a thermometer takes no command ('{}')", command.command),
        }
    }

    fn action(&mut self, message: &Message) -> Option<Message> {
        (message.action == "stats.get").then(|| {
            let c = self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Message::new(
                "stats.result",
                json!({"reads": c.reads, "crc_errors": c.crc_errors, "unreadable": c.unreadable, "vanished": c.vanished}),
            )
        })
    }
}

/// Runs the onewire plugin until `plugin.stop.do` or `shutdown`.
pub fn run(settings: PluginSettings, endpoints: Endpoints, shutdown: &Shutdown) -> Result<(), PluginError> {
    // A stop asked for while it still waits for its services is a clean
    // stop (it has said `stopped`), not a failure.
    match run_onewire(settings, endpoints, shutdown) {
        Err(PluginError::Stopped(what)) => {
            tracing::info!("onewire: stopped before {what}");
            Ok(())
        }
        other => other,
    }
}

fn run_onewire(settings: PluginSettings, endpoints: Endpoints, shutdown: &Shutdown) -> Result<(), PluginError> {
    let mut plugin = Plugin::start(settings, endpoints)?;
    let config = plugin.config(shutdown)?;
    let root = PathBuf::from(
        config
            .get("sysfs_root")
            .and_then(Value::as_str)
            .unwrap_or("/sys/bus/w1/devices"),
    );
    let interval = config
        .get("interval")
        .and_then(Value::as_f64)
        .filter(|i| i.is_finite())
        .unwrap_or(30.0)
        .max(0.05);
    let room = config
        .get("room")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let counters = Arc::new(Mutex::new(Counters::default()));
    // Sensors present at start are registered before serving; later ones
    // on the way.
    let mut registered: BTreeMap<String, String> = BTreeMap::new();
    let register = |plugin: &mut Plugin, name: &str| -> Result<String, PluginError> {
        let device = Device {
            room: room.clone(),
            stale_after: Some(3.0 * interval),
            ..Device::new(name, "temperaturesensor", &format!("DS18B20 {name}"))
        };
        plugin.register(&device, shutdown)
    };
    for name in sensors(&root).keys() {
        let uuid = register(&mut plugin, name)?;
        registered.insert(name.clone(), uuid);
    }
    if registered.is_empty() {
        tracing::warn!(root = %root.display(), "onewire: no 28-* sensor found (yet)");
    }
    // A second client for registering sensors that appear later, since
    // `plugin` goes to `serve`.
    let mut late = Plugin::start_quiet(&plugin)?;
    let running = plugin.serve(
        OneWireHandler {
            counters: counters.clone(),
        },
        shutdown,
    )?;
    let values = running.values();
    let mut gone: BTreeSet<String> = BTreeSet::new();
    loop {
        let found = sensors(&root);
        for (name, path) in &found {
            if !registered.contains_key(name) {
                match register(&mut late, name) {
                    Ok(uuid) => {
                        tracing::info!(sensor = name, "onewire: a new sensor");
                        registered.insert(name.clone(), uuid);
                    }
                    Err(e) => tracing::warn!(sensor = name, error = %e, "onewire: could not register"),
                }
            }
            gone.remove(name);
            let reading = std::fs::read_to_string(path).map_or(Reading::Unreadable, |t| parse_w1_slave(&t));
            let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
            match reading {
                Reading::Celsius(celsius) => {
                    c.reads += 1;
                    if let Some(uuid) = registered.get(name) {
                        values.publish(
                            uuid,
                            "event.environment.temperaturechanged",
                            "temperature",
                            json!(celsius),
                            "degC",
                            None,
                        );
                    }
                }
                Reading::BadCrc => c.crc_errors += 1,
                Reading::Unreadable => c.unreadable += 1,
            }
        }
        for name in registered.keys() {
            if !found.contains_key(name) && gone.insert(name.clone()) {
                counters.lock().unwrap_or_else(|p| p.into_inner()).vanished += 1;
                tracing::warn!(sensor = name, "onewire: the sensor vanished");
            }
        }
        if running.stop_signal().wait_timeout(Duration::from_secs_f64(interval)) {
            break;
        }
    }
    running.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w1_slave_files_parse() {
        let good = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        assert_eq!(parse_w1_slave(good), Reading::Celsius(23.125));
        let negative = "ff ff : crc=a1 YES\nff ff t=-1250\n";
        assert_eq!(parse_w1_slave(negative), Reading::Celsius(-1.25));
        let bad_crc = "72 01 4b 46 7f ff 0e 10 57 : crc=57 NO\n72 01 4b 46 7f ff 0e 10 57 t=85000\n";
        assert_eq!(parse_w1_slave(bad_crc), Reading::BadCrc);
        for junk in [
            "",
            "one line only",
            "crc=57 MAYBE\nt=1\n",
            "crc=57 YES\nno temperature\n",
        ] {
            assert_eq!(parse_w1_slave(junk), Reading::Unreadable, "{junk:?}");
        }
    }

    #[test]
    fn only_28_folders_are_sensors() {
        let root = tempfile::tempdir().unwrap();
        for name in ["28-000005e2fdc3", "w1_bus_master1", "10-000802824e58"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        let found = sensors(root.path());
        assert_eq!(found.keys().collect::<Vec<_>>(), ["28-000005e2fdc3"]);
        assert!(sensors(&root.path().join("missing")).is_empty());
    }
}
