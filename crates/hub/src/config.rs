//! Every setting of the hub with its default, read from `majordome.toml`
//! and overridden by the command line.
//!
//! The order is fixed: the defaults (each part's own `Settings::default()`,
//! the ports of [`majordome_net::ports`]), then the file, then the flags.
//! Each value remembers which of the three it came from, for `majordome
//! config show`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use majordome_services::manager::ManagerSettings;
use majordome_services::{DeviceSettings, HistorySettings};
use majordome_store::Durability;
use serde::{Deserialize, Serialize};

/// The file's name in the data folder.
pub const FILE_NAME: &str = "majordome.toml";

/// The data folder when neither the file nor `--data` names one.
pub const DEFAULT_DATA: &str = "./majordome-data";

/// The whole hub's configuration: what `majordome.toml` may hold. Every
/// section is optional, and so is every key in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// The folder of the database (`majordome.db`) and the plugins' logs.
    pub data: PathBuf,
    /// What a commit survives: `full` (a loss of power) or `process` (a
    /// crash of the process only; faster on slow disks).
    pub durability: Durability,
    /// Where each socket of the hub listens: the one place for the ports.
    pub listen: Listen,
    /// Which parts this process runs.
    pub parts: Parts,
    pub broker: majordome_broker::Settings,
    pub events: majordome_events::Settings,
    pub state: majordome_state::Settings,
    pub titanic: majordome_titanic::Settings,
    pub plugins: Plugins,
    pub manager: ManagerSettings,
    pub devices: DeviceSettings,
    pub history: HistorySettings,
    pub backup: Backup,
    /// Who must log in.
    pub security: Security,
    /// What each identity may do, by name (`[permissions.NAME]`, and
    /// `[permissions."*"]` for those without a table of their own).
    pub permissions: majordome_access::Policy,
    /// The HTTP gateway (JSON-RPC, REST, metrics).
    pub http: majordome_gateway::Settings,
    /// The scenario service (the hub's place, history kept, a test clock).
    pub scenario: majordome_scenario::ScenarioSettings,
}

/// Who must log in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// `trusted` (the default): anonymous peers on loopback are local
    /// clients with every permission. `authenticated`: every peer logs in,
    /// loopback or not (supervised plugins get their own logins).
    pub loopback: majordome_access::Loopback,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data: PathBuf::from(DEFAULT_DATA),
            durability: Durability::Full,
            listen: Listen::default(),
            parts: Parts::default(),
            broker: Default::default(),
            events: Default::default(),
            state: Default::default(),
            titanic: Default::default(),
            plugins: Plugins::default(),
            manager: Default::default(),
            devices: Default::default(),
            history: Default::default(),
            backup: Backup::default(),
            security: Security::default(),
            permissions: Default::default(),
            http: Default::default(),
            scenario: Default::default(),
        }
    }
}

impl HubConfig {
    /// The defaults, with `parts` only, every socket on a free loopback
    /// port and the data in `data`: what tests and the bench start.
    pub fn on_free_ports(data: &Path, parts: Parts) -> HubConfig {
        let any = "tcp://127.0.0.1:0".to_owned();
        HubConfig {
            data: data.to_owned(),
            parts,
            listen: Listen {
                broker: any.clone(),
                publish: any.clone(),
                subscribe: any.clone(),
                state: any,
                ..Listen::default()
            },
            http: majordome_gateway::Settings {
                bind: "127.0.0.1:0".into(),
                ..Default::default()
            },
            ..HubConfig::default()
        }
    }
}

/// The endpoints the hub binds. Port 0 picks a free port (for the Clone
/// server, three in a row).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Request/reply: MDP/0.1, MMI and the Domogik dialect.
    pub broker: String,
    /// The event forwarder's side publishers connect to (XSUB).
    pub publish: String,
    /// The event forwarder's side subscribers connect to (XPUB).
    pub subscribe: String,
    /// The Clone server's snapshot socket; updates on the next port, the
    /// collector on the one after.
    pub state: String,
    /// Listen on addresses other than loopback without asking anybody to
    /// log in: anyone who reaches a port can do anything (for old peers
    /// that cannot log in, on a network you trust entirely). Off by
    /// default: such a listener asks for a login, and the hub refuses to
    /// start while no user can log in.
    pub allow_network_without_credentials: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            broker: majordome_net::ports::BROKER.into(),
            publish: majordome_net::ports::PUBLISH.into(),
            subscribe: majordome_net::ports::SUBSCRIBE.into(),
            state: majordome_net::ports::STATE.into(),
            allow_network_without_credentials: false,
        }
    }
}

impl Listen {
    /// The endpoints this process would listen on that reach beyond this
    /// machine: TCP on any address but loopback's (`*`, `0.0.0.0`, a LAN
    /// address, an interface name).
    pub fn network_endpoints(&self, parts: &Parts) -> Vec<&str> {
        let mut mine = Vec::new();
        if parts.broker {
            mine.push(self.broker.as_str());
        }
        if parts.events {
            mine.extend([self.publish.as_str(), self.subscribe.as_str()]);
        }
        if parts.state {
            mine.push(self.state.as_str());
        }
        mine.into_iter().filter(|endpoint| !is_local(endpoint)).collect()
    }
}

/// Whether only this machine can reach `endpoint`.
pub fn is_local(endpoint: &str) -> bool {
    if !endpoint.starts_with("tcp://") {
        // inproc:// and ipc:// do not leave the machine.
        return true;
    }
    majordome_net::bind::tcp_host_port(endpoint).is_some_and(|(host, _)| {
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|address| address.is_loopback())
    })
}

/// Which parts run in this process. A part that does not run here is
/// looked for at its `listen` endpoint (another process's).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Parts {
    pub broker: bool,
    pub events: bool,
    pub state: bool,
    pub titanic: bool,
    pub config: bool,
    pub manager: bool,
    pub devices: bool,
    pub history: bool,
    /// The `echo` service (for trying the bus, and for `majordome bench`).
    pub echo: bool,
    /// The `events` and `state` services, which answer `stats.get` with the
    /// forwarder's and the Clone server's counters.
    pub stats: bool,
    /// Backups of the database on a schedule (see `[backup]`).
    pub backup: bool,
    /// The HTTP gateway (see `[http]`).
    pub gateway: bool,
    /// The scenario service (see `[scenario]`).
    pub scenario: bool,
}

impl Default for Parts {
    fn default() -> Self {
        Parts::all()
    }
}

impl Parts {
    /// Every part: what `majordome up` runs.
    pub fn all() -> Parts {
        Parts {
            broker: true,
            events: true,
            state: true,
            titanic: true,
            config: true,
            manager: true,
            devices: true,
            history: true,
            echo: true,
            stats: true,
            backup: true,
            gateway: true,
            scenario: true,
        }
    }

    /// The broker and the event forwarder: a bus for services to be tried
    /// on (the tests' and the bench's).
    pub fn bus() -> Parts {
        Parts {
            broker: true,
            events: true,
            ..Parts::none()
        }
    }

    /// No part: a start for choosing a few.
    pub fn none() -> Parts {
        Parts {
            broker: false,
            events: false,
            state: false,
            titanic: false,
            config: false,
            manager: false,
            devices: false,
            history: false,
            echo: false,
            stats: false,
            backup: false,
            gateway: false,
            scenario: false,
        }
    }
}

impl Parts {
    /// Whether any of these parts opens the database.
    pub fn use_database(&self) -> bool {
        self.state
            || self.titanic
            || self.config
            || self.manager
            || self.devices
            || self.history
            || self.backup
            || self.scenario
    }
}

/// Backups of the database, kept in `backups/` in the data folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backup {
    /// How often: the first at start when the newest backup is older than
    /// this (or there is none).
    #[serde(with = "majordome_net::duration_text")]
    pub every: Duration,
    /// How many to keep (older ones are removed); 0 makes none on a
    /// schedule (`majordome backup` still does).
    pub keep: usize,
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            every: Duration::from_secs(24 * 3600),
            keep: 7,
        }
    }
}

/// The plugins the manager knows and starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plugins {
    /// Folder of plugin manifests (`*.json`); a missing folder means none.
    /// The shipped plugins are known unless this folder has a manifest of
    /// the same name.
    pub folder: PathBuf,
    /// Start the plugins whose manifest says `autostart` (false: start
    /// none; `plugin.start.do` still starts them on request).
    pub autostart: bool,
}

impl Default for Plugins {
    fn default() -> Self {
        Plugins {
            folder: PathBuf::from("./plugins"),
            autostart: true,
        }
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    /// The flag that set it, e.g. `--bind`.
    Flag(&'static str),
}

/// One flag given on the command line: the key it sets.
#[derive(Debug, Clone)]
pub struct Override {
    /// Dotted, e.g. `broker.liveness`.
    pub key: &'static str,
    /// As typed, e.g. `--liveness`.
    pub flag: &'static str,
    pub value: toml::Value,
}

impl Override {
    pub fn new(key: &'static str, flag: &'static str, value: impl Into<toml::Value>) -> Override {
        Override {
            key,
            flag,
            value: value.into(),
        }
    }

    /// A duration, written as the file would have it.
    pub fn duration(key: &'static str, flag: &'static str, duration: Duration) -> Override {
        Override::new(key, flag, majordome_net::duration_text::format(duration))
    }
}

/// A configuration that could not be used. Each says where to look.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file's own words (line, column, key) from the TOML reader.
    #[error("the configuration file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A value of the right type but out of its bounds.
    #[error("{key} = {value} ({from}): {why}")]
    Bad {
        key: String,
        value: String,
        from: String,
        why: String,
    },
    #[error("the command-line flags do not make a valid configuration: {0}")]
    Flags(String),
}

/// The configuration in effect, and where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: HubConfig,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    effective: toml::Table,
    sources: BTreeMap<String, Source>,
}

impl Loaded {
    /// Reads the configuration: the defaults, then `file` (or, when `None`,
    /// `majordome.toml` in the data folder if there is one), then the
    /// flags. A file named by `--config` must exist.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Loaded, ConfigError> {
        let defaults = table_of(&HubConfig::default());
        let (path, text) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                (Some(path.to_owned()), Some(text))
            }
            None => {
                // The data folder the flags name, else the default one.
                let data = overrides
                    .iter()
                    .find(|o| o.key == "data")
                    .and_then(|o| o.value.as_str().map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
                let path = data.join(FILE_NAME);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (Some(path), Some(text)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                    Err(source) => return Err(ConfigError::Read { path, source }),
                }
            }
        };
        let from_file = match (&path, &text) {
            (Some(path), Some(text)) => {
                // Typed first, so that a wrong key or type is reported with
                // its line; then as a table, to know which keys it set.
                let invalid = |message: String| ConfigError::Invalid {
                    path: path.clone(),
                    message: message.trim_end().to_owned(),
                };
                toml::from_str::<HubConfig>(text).map_err(|e| invalid(e.to_string()))?;
                text.parse::<toml::Table>().map_err(|e| invalid(e.to_string()))?
            }
            _ => toml::Table::new(),
        };
        let mut effective = defaults;
        merge(&mut effective, &from_file);
        for o in overrides {
            set(&mut effective, o.key, o.value.clone());
        }
        let config = HubConfig::deserialize(toml::Value::Table(effective.clone()))
            .map_err(|e| ConfigError::Flags(e.to_string()))?;
        let mut sources = BTreeMap::new();
        for key in leaves(&effective) {
            let source = if let Some(o) = overrides.iter().rev().find(|o| o.key == key) {
                Source::Flag(o.flag)
            } else if get(&from_file, &key).is_some() {
                Source::File
            } else {
                Source::Default
            };
            sources.insert(key, source);
        }
        let loaded = Loaded {
            config,
            file: path,
            effective,
            sources,
        };
        loaded.check()?;
        Ok(loaded)
    }

    /// Where `key` (dotted) came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.sources.get(key)
    }

    fn source_text(&self, key: &str) -> String {
        // A table shown inline (`[permissions]`'s `panel = {…}`) came from
        // where its keys came from.
        let within = format!("{key}.");
        let source = self.sources.get(key).or_else(|| {
            self.sources
                .iter()
                .filter(|(k, _)| k.starts_with(&within))
                .map(|(_, source)| source)
                .find(|source| !matches!(source, Source::Default))
        });
        match source {
            Some(Source::Flag(flag)) => flag.to_string(),
            Some(Source::File) => match &self.file {
                Some(path) => path.display().to_string(),
                None => "the file".into(),
            },
            _ => "default".into(),
        }
    }

    /// The effective configuration as a TOML file, each value followed by
    /// where it came from: what `majordome config show` prints.
    pub fn show(&self) -> String {
        let mut out = String::new();
        let file = match &self.file {
            Some(path) => path.display().to_string(),
            None => format!("none ({FILE_NAME} in the data folder, or --config FILE)"),
        };
        let _ = writeln!(out, "# majordome's configuration in effect; file: {file}");
        let _ = writeln!(
            out,
            "# each value says where it came from: default, the file, or a flag"
        );
        let mut sections = Vec::new();
        let mut rows = Vec::new();
        for (key, value) in &self.effective {
            match value {
                toml::Value::Table(table) => sections.push((key, table)),
                _ => rows.push((key.clone(), key.clone(), value)),
            }
        }
        self.write_rows(&mut out, &rows);
        for (section, table) in sections {
            let _ = writeln!(out, "\n[{section}]");
            let rows: Vec<_> = table
                .iter()
                .map(|(key, value)| (key.clone(), format!("{section}.{key}"), value))
                .collect();
            self.write_rows(&mut out, &rows);
        }
        out
    }

    fn write_rows(&self, out: &mut String, rows: &[(String, String, &toml::Value)]) {
        let lines: Vec<(String, String)> = rows
            .iter()
            .map(|(key, full, value)| (format!("{key} = {value}"), self.source_text(full)))
            .collect();
        let width = lines.iter().map(|(line, _)| line.len()).max().unwrap_or(0);
        for (line, source) in lines {
            let _ = writeln!(out, "{line:width$}  # {source}");
        }
    }

    /// Values of the right type that make no sense, refused with the key
    /// and where it came from.
    fn check(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let zero = Duration::ZERO;
        let rules: [(&str, bool, &str); 21] = [
            (
                "broker.heartbeat_interval",
                c.broker.heartbeat_interval > zero,
                "must be above 0",
            ),
            ("broker.liveness", c.broker.liveness > 0, "must be above 0"),
            (
                "broker.request_timeout",
                c.broker.request_timeout > zero,
                "must be above 0",
            ),
            ("broker.max_frames", c.broker.max_frames >= 4, "must be at least 4"),
            (
                "broker.worker_prefetch",
                c.broker.worker_prefetch >= 1,
                "must be at least 1",
            ),
            ("broker.max_services", c.broker.max_services >= 1, "must be at least 1"),
            (
                "backup.every",
                c.backup.every >= Duration::from_millis(10),
                "must be at least 10ms",
            ),
            (
                "broker.max_workerless_services",
                c.broker.max_workerless_services >= 1,
                "must be at least 1",
            ),
            (
                "broker.max_queued_bytes_per_client",
                c.broker.max_queued_bytes_per_client >= 1024,
                "must be at least 1024",
            ),
            (
                "broker.max_request_timeout",
                c.broker.max_request_timeout > zero,
                "must be above 0",
            ),
            (
                "events.high_water_mark",
                c.events.high_water_mark > 0,
                "must be above 0",
            ),
            ("state.hugz_interval", c.state.hugz_interval > zero, "must be above 0"),
            (
                "titanic.request_workers",
                c.titanic.request_workers >= 1,
                "must be at least 1",
            ),
            (
                "titanic.close_workers",
                c.titanic.close_workers >= 1,
                "must be at least 1",
            ),
            ("manager.dead_after", c.manager.dead_after > zero, "must be above 0"),
            ("devices.workers", c.devices.workers >= 1, "must be at least 1"),
            ("history.workers", c.history.workers >= 1, "must be at least 1"),
            ("devices.batch", c.devices.batch >= 1, "must be at least 1"),
            ("devices.stale_check", c.devices.stale_check > zero, "must be above 0"),
            (
                "manager.reap_interval",
                c.manager.reap_interval > zero,
                "must be above 0",
            ),
            (
                "manager.max_log_bytes",
                c.manager.max_log_bytes >= 4096,
                "must be at least 4096",
            ),
        ];
        for (key, ok, why) in rules {
            if !ok {
                return Err(ConfigError::Bad {
                    key: key.into(),
                    value: get(&self.effective, key).map(|v| v.to_string()).unwrap_or_default(),
                    from: self.source_text(key),
                    why: why.into(),
                });
            }
        }
        Ok(())
    }
}

/// `value` as a TOML table (every settings type serializes to one).
fn table_of(value: &HubConfig) -> toml::Table {
    toml::Table::try_from(value).expect("the default configuration is a TOML table")
}

/// Copies `from` over `into`, section by section.
fn merge(into: &mut toml::Table, from: &toml::Table) {
    for (key, value) in from {
        match (into.get_mut(key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => merge(mine, theirs),
            _ => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Sets the dotted `key` in `table`, making sections as needed.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((section, rest)) => {
            let entry = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                set(inner, rest, value);
            }
        }
        None => {
            table.insert(key.to_owned(), value);
        }
    }
}

/// The value at the dotted `key`, if `table` has it.
fn get<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    match key.split_once('.') {
        Some((section, rest)) => match table.get(section)? {
            toml::Value::Table(inner) => get(inner, rest),
            _ => None,
        },
        None => table.get(key),
    }
}

/// The dotted keys of every value that is not a section.
fn leaves(table: &toml::Table) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => keys.extend(leaves(inner).into_iter().map(|k| format!("{key}.{k}"))),
            _ => keys.push(key.clone()),
        }
    }
    keys
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn only_loopback_inproc_and_ipc_are_local() {
        for local in [
            "tcp://127.0.0.1:40410",
            "tcp://127.0.0.2:1",
            "tcp://localhost:1",
            "tcp://[::1]:1",
            "inproc://x",
            "ipc:///tmp/x",
        ] {
            assert!(is_local(local), "{local}");
        }
        for network in [
            "tcp://0.0.0.0:1",
            "tcp://*:1",
            "tcp://192.168.1.2:1",
            "tcp://eth0:1",
            "tcp://[::]:1",
        ] {
            assert!(!is_local(network), "{network}");
        }
        let listen = Listen {
            subscribe: "tcp://*:40412".into(),
            ..Listen::default()
        };
        assert_eq!(listen.network_endpoints(&Parts::all()), ["tcp://*:40412"]);
        assert!(listen.network_endpoints(&Parts::none()).is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join(FILE_NAME);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_come_from_each_part() {
        let loaded = Loaded::load(Some(Path::new("/dev/null")), &[]).unwrap();
        assert_eq!(loaded.config.listen.broker, majordome_net::ports::BROKER);
        assert_eq!(
            loaded.config.broker.liveness,
            majordome_broker::Settings::default().liveness
        );
        assert_eq!(loaded.source("broker.liveness"), Some(&Source::Default));
    }

    #[test]
    fn the_file_then_the_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[broker]\nliveness = 7\nheartbeat_interval = \"250ms\"\n\n[listen]\nbroker = \"tcp://127.0.0.1:5555\"\n",
        );
        let flags = [Override::new("broker.liveness", "--liveness", 9)];
        let loaded = Loaded::load(Some(&path), &flags).unwrap();
        assert_eq!(loaded.config.broker.liveness, 9);
        assert_eq!(loaded.config.broker.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(loaded.config.listen.broker, "tcp://127.0.0.1:5555");
        assert_eq!(loaded.source("broker.liveness"), Some(&Source::Flag("--liveness")));
        assert_eq!(loaded.source("broker.heartbeat_interval"), Some(&Source::File));
        assert_eq!(loaded.source("listen.publish"), Some(&Source::Default));
        let shown = loaded.show();
        assert!(shown.contains("heartbeat_interval = \"250ms\""), "{shown}");
        assert!(shown.contains("liveness = 9"), "{shown}");
        // What `show` prints is itself a valid file that means the same.
        let again: HubConfig = toml::from_str(&shown).unwrap();
        assert_eq!(again.broker.liveness, 9);
    }

    #[test]
    fn the_file_in_the_data_folder_is_read() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "[history]\ndays = 30\n");
        let data = [Override::new("data", "--data", dir.path().display().to_string())];
        let loaded = Loaded::load(None, &data).unwrap();
        assert_eq!(loaded.config.history.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(loaded.file.as_deref(), Some(dir.path().join(FILE_NAME).as_path()));
        // None there: the defaults.
        let empty = tempfile::tempdir().unwrap();
        let data = [Override::new("data", "--data", empty.path().display().to_string())];
        assert!(Loaded::load(None, &data).unwrap().file.is_none());
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "data = \"x\"\n\n[broker]\nlivenes = 3\n");
        let error = Loaded::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("livenes"), "{error}");
        let path = write(dir.path(), "[broker]\nliveness = \"three\"\n");
        let error = Loaded::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("liveness"), "{error}");
        let path = write(dir.path(), "[broker]\nheartbeat_interval = \"soon\"\n");
        let error = Loaded::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(
            error.contains("line 2") && error.contains("heartbeat_interval"),
            "{error}"
        );
        let path = write(dir.path(), "[broker]\nliveness = 0\n");
        let error = Loaded::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(error.starts_with("broker.liveness = 0 ("), "{error}");
        assert!(error.ends_with("must be above 0"), "{error}");
        let missing = Loaded::load(Some(&dir.path().join("nope.toml")), &[]).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
    }
}
