//! The manager (service `manager`): which clients (plugins, core parts)
//! exist and whether they are alive, and the plugins of this host run as
//! supervised child processes.
//!
//! Statuses are Domogik's: unknown, starting, not-configured, alive,
//! stop-request, stopped, dead, invalid. They come from the
//! `plugin.status` events every client publishes (on start, then every
//! 15 s), from the supervisor (`supervisor.rs`) for the plugins it runs,
//! and from silence: a client not heard from for `dead_after` (30 s) while
//! it should be running becomes dead. Every status change is kept in the
//! `client_history` table of the one database (the last `history_limit`
//! per client), so statuses and their history survive a restart.
//! `configured` comes from the config service: asked once per manifest at
//! start, then followed through `plugin.configuration` events.
//!
//! Actions: `client.list.get`, `client.detail.get` (also the seed's
//! `clients.*` spellings), `client.history.get`, `package.detail.get`,
//! `device_types.get`, `plugin.start.do`, `plugin.stop.do`. Every change is
//! published as `client.list` and `client.detail`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use majordome_client::{
    domogik_handler, unix_now, AsyncClient, ClientError, Message, PendingReply, Publisher, Shutdown, Subscriber,
    Worker, WorkerOptions,
};
use majordome_store::rusqlite::{params, Connection};
use majordome_store::{Committer, Durability, StoreError};
use serde_json::{json, Map, Value};

use crate::lock;
use crate::manifest::Manifest;
use crate::supervisor::{self, ProcessEvent, SupervisorHandle, SupervisorSettings};
use majordome_api::manager::{ClientEntry as Listed, HistoryEntry, ManagerRequest, PluginTarget};
use majordome_api::{ClientId, ClientStatus, PluginStatus};

/// Every timer and bound of the manager, with its default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerSettings {
    /// Silence after which a running client is declared dead (30 s).
    #[serde(with = "majordome_net::duration_text")]
    pub dead_after: Duration,
    /// Status changes kept per client, in memory and in the database (100).
    pub history_limit: usize,
    /// The host this manager runs plugins on, and lists manifests without
    /// a running client on (this machine's short name).
    pub host: String,
    /// How long the plugin's own `plugin.stop.do` may take (2 s; never
    /// more than the stop's grace).
    #[serde(with = "majordome_net::duration_text")]
    pub stop_request_timeout: Duration,
    /// After `plugin.stop.do`, how long a plugin has to exit before
    /// SIGTERM (5 s).
    #[serde(with = "majordome_net::duration_text")]
    pub stop_grace: Duration,
    /// After SIGTERM, how long before SIGKILL (5 s).
    #[serde(with = "majordome_net::duration_text")]
    pub kill_grace: Duration,
    /// `stop_grace` when the manager itself stops (2 s): the whole hub is
    /// going down, and a plugin whose broker has gone cannot hear its
    /// `plugin.stop.do` anyway.
    #[serde(with = "majordome_net::duration_text")]
    pub shutdown_stop_grace: Duration,
    /// `kill_grace` when the manager itself stops (2 s).
    #[serde(with = "majordome_net::duration_text")]
    pub shutdown_kill_grace: Duration,
    /// The delay before restarting a crashed plugin whose manifest says
    /// `restart` (1 s); it doubles at each restart within the window.
    #[serde(with = "majordome_net::duration_text")]
    pub restart_backoff: Duration,
    /// The longest such delay (60 s).
    #[serde(with = "majordome_net::duration_text")]
    pub restart_backoff_max: Duration,
    /// At most this many restarts within `restart_window` (5); then the
    /// supervisor gives up and the plugin stays dead.
    pub restart_limit: u32,
    /// The window of `restart_limit` (10 min). A plugin that stayed up
    /// longer than this has its count reset.
    #[serde(with = "majordome_net::duration_text")]
    pub restart_window: Duration,
    /// How often the supervisor looks for children that exited (100 ms).
    #[serde(with = "majordome_net::duration_text")]
    pub reap_interval: Duration,
    /// How long one `config.get` (for `configured`) may take (2 s).
    #[serde(with = "majordome_net::duration_text")]
    pub config_timeout: Duration,
    /// How long the manager keeps asking the config service, which may
    /// come up after it, at start (60 s).
    #[serde(with = "majordome_net::duration_text")]
    pub config_wait: Duration,
    /// Environment variables given to every plugin besides
    /// `MAJORDOME_BROKER`, `MAJORDOME_PUBLISH`, `MAJORDOME_SUBSCRIBE` and
    /// `MAJORDOME_HOST` (none).
    #[serde(skip)]
    pub plugin_environment: Vec<(String, String)>,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            dead_after: Duration::from_secs(30),
            history_limit: 100,
            host: local_host(),
            stop_request_timeout: Duration::from_secs(2),
            stop_grace: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            shutdown_stop_grace: Duration::from_secs(2),
            shutdown_kill_grace: Duration::from_secs(2),
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(60),
            restart_limit: 5,
            restart_window: Duration::from_secs(600),
            reap_interval: Duration::from_millis(100),
            config_timeout: Duration::from_secs(2),
            config_wait: Duration::from_secs(60),
            plugin_environment: Vec::new(),
        }
    }
}

impl ManagerSettings {
    /// What the supervisor needs of them.
    pub fn supervisor(&self) -> SupervisorSettings {
        SupervisorSettings {
            host: self.host.clone(),
            stop_request_timeout: self.stop_request_timeout,
            stop_grace: self.stop_grace,
            kill_grace: self.kill_grace,
            shutdown_stop_grace: self.shutdown_stop_grace,
            shutdown_kill_grace: self.shutdown_kill_grace,
            restart_backoff: self.restart_backoff,
            restart_backoff_max: self.restart_backoff_max,
            restart_limit: self.restart_limit,
            restart_window: self.restart_window,
            reap_interval: self.reap_interval,
        }
    }
}

/// This machine's short host name, as Domogik names clients.
pub fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().split('.').next().unwrap_or_default().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Errors starting or running the manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("manager database: {0}")]
    Store(#[from] StoreError),
    #[error("manager database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot start a manager thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the manager's {0} thread panicked")]
    Panicked(&'static str),
}

/// Where the manager finds the bus; plugins it starts are given the same.
#[derive(Debug, Clone)]
pub struct ManagerEndpoints {
    /// The broker (`MAJORDOME_BROKER`).
    pub broker: String,
    /// The forwarder's side publishers connect to (`MAJORDOME_PUBLISH`).
    pub publish: String,
    /// The forwarder's side subscribers connect to (`MAJORDOME_SUBSCRIBE`).
    pub subscribe: String,
}

/// One row of `client_history`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The client id, `<type>-<name>.<host>`.
    pub client: String,
    /// Unix time of the change.
    pub time: f64,
    pub status: String,
    pub comment: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS client_history (
    client  TEXT NOT NULL,
    time    REAL NOT NULL,
    status  TEXT NOT NULL,
    comment TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS client_history_by_client ON client_history (client);
";

/// The `client_history` table: writes go through a [`Committer`] and are
/// not waited for, so a status change never holds the registry's lock for
/// an fsync; the committer finishes them when the registry is dropped.
struct HistoryStore {
    committer: Arc<Committer>,
    limit: usize,
}

impl HistoryStore {
    /// Opens the table, trims it to `limit` rows per client (the limit may
    /// have been lowered since the last run) and reads it, oldest first.
    fn open(
        database: &Path,
        durability: Durability,
        limit: usize,
    ) -> Result<(HistoryStore, Vec<HistoryRow>), ManagerError> {
        let connection = majordome_store::open(database, durability)?;
        connection.execute_batch(SCHEMA)?;
        connection.execute(
            "DELETE FROM client_history WHERE rowid IN (
                 SELECT rowid FROM (
                     SELECT rowid, ROW_NUMBER() OVER (PARTITION BY client ORDER BY rowid DESC) AS newer
                     FROM client_history)
                 WHERE newer > ?1)",
            params![limit as i64],
        )?;
        let rows = read_history(&connection)?;
        drop(connection);
        let store = HistoryStore {
            committer: majordome_store::shared_committer(database, durability)?,
            limit,
        };
        Ok((store, rows))
    }

    /// Records one change and forgets what falls past the limit.
    fn record(&self, row: HistoryRow) {
        let limit = self.limit as i64;
        // The ticket is dropped: the write lands with the next batch, and
        // an error is logged here since nobody waits for it.
        let _ = self.committer.enqueue(move |c| {
            let written = c
                .execute(
                    "INSERT INTO client_history (client, time, status, comment) VALUES (?1, ?2, ?3, ?4)",
                    params![row.client, row.time, row.status, row.comment],
                )
                .and_then(|_| {
                    // Rows are appended in order, so rowid orders them; the
                    // index on client holds rowid, so this reads only the
                    // client's own rows.
                    c.execute(
                        "DELETE FROM client_history WHERE client = ?1 AND rowid <= (
                             SELECT rowid FROM client_history WHERE client = ?1
                             ORDER BY rowid DESC LIMIT 1 OFFSET ?2)",
                        params![row.client, limit],
                    )
                });
            if let Err(e) = &written {
                tracing::warn!(client = %row.client, error = %e, "could not record a status change");
            }
            written.map(|_| ())
        });
    }
}

fn read_history(connection: &Connection) -> Result<Vec<HistoryRow>, ManagerError> {
    let mut statement =
        connection.prepare("SELECT client, time, status, comment FROM client_history ORDER BY rowid")?;
    let rows = statement.query_map([], |row| {
        Ok(HistoryRow {
            client: row.get(0)?,
            time: row.get(1)?,
            status: row.get(2)?,
            comment: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

struct ClientEntry {
    kind: String,
    name: String,
    host: String,
    status: ClientStatus,
    comment: String,
    /// Unix time it was last heard from (or, restored from the database,
    /// of its last recorded change), if ever.
    last_seen: Option<f64>,
    /// Where silence counts from: its last event, its start by the
    /// supervisor, or the manager's start for a restored running status.
    seen_at: Option<Instant>,
    /// When this run of the manager last had a `plugin.status` from it.
    heard_at: Option<Instant>,
    /// Its process, when the supervisor runs it.
    pid: Option<u32>,
    /// (unix time, status, comment), oldest first.
    history: VecDeque<(f64, ClientStatus, String)>,
}

/// Where a client's `configured` came from: an event is newer than any
/// answer to a `config.get` still in flight, so an answer never overrides
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfiguredFrom {
    Asked,
    Event,
}

/// The registry: clients by id (`<type>-<name>.<host>`). It touches no
/// socket and reads no clock (callers pass `now`), so it is tested alone;
/// [`Registry::open`] adds the database.
pub struct Registry {
    clients: BTreeMap<String, ClientEntry>,
    manifests: Vec<Manifest>,
    settings: ManagerSettings,
    /// By client id; kept apart from `clients` because the config service
    /// may speak of a client before the client itself does.
    configured: BTreeMap<String, (bool, ConfiguredFrom)>,
    store: Option<HistoryStore>,
    /// Grows at every change of what `list` and `detail` show, so the
    /// publishing thread knows when to publish.
    changes: u64,
    /// `plugin.status` events that were not understood.
    pub malformed: u64,
    /// What the supervisor reports, applied by [`Registry::catch_up`].
    process_events: Option<mpsc::Receiver<ProcessEvent>>,
}

/// A client's id: `<type>-<name>.<host>`, also its service on the broker.
pub fn client_id(kind: &str, name: &str, host: &str) -> String {
    ClientId::new(kind, name, host).to_string()
}

impl Registry {
    /// A registry with no database: history lives in memory only.
    pub fn new(manifests: Vec<Manifest>, settings: ManagerSettings) -> Registry {
        let mut registry = Registry {
            clients: BTreeMap::new(),
            manifests,
            settings,
            configured: BTreeMap::new(),
            store: None,
            changes: 0,
            malformed: 0,
            process_events: None,
        };
        // Every plugin with a manifest is listed, unknown until heard from.
        for manifest in registry.manifests.clone() {
            let host = registry.settings.host.clone();
            registry.entry(&manifest.kind, &manifest.name, &host);
        }
        registry
    }

    /// A registry that keeps its history in the `client_history` table of
    /// the database at `database`, restored from it now.
    pub fn open(
        manifests: Vec<Manifest>,
        settings: ManagerSettings,
        database: &Path,
        durability: Durability,
    ) -> Result<Registry, ManagerError> {
        let (store, rows) = HistoryStore::open(database, durability, settings.history_limit)?;
        let mut registry = Registry::new(manifests, settings);
        registry.restore(rows, Instant::now());
        registry.store = Some(store);
        Ok(registry)
    }

    /// Takes back recorded history (oldest first): each client's last row
    /// is its status again. A restored running status is shown as it was
    /// until an event or silence (counted from `now`) changes it.
    pub fn restore(&mut self, rows: Vec<HistoryRow>, now: Instant) {
        let limit = self.settings.history_limit;
        for row in rows {
            let Ok(id) = row.client.parse::<ClientId>() else {
                tracing::warn!(client = %row.client, "ignored a recorded status of a client id that is not <type>-<name>.<host>");
                continue;
            };
            let Ok(status) = row.status.parse::<ClientStatus>() else {
                tracing::warn!(client = %row.client, status = %row.status, "ignored a recorded status that is not Domogik's");
                continue;
            };
            let client = self.entry(&id.kind, &id.name, &id.host);
            client.history.push_back((row.time, status, row.comment.clone()));
            while client.history.len() > limit {
                client.history.pop_front();
            }
            client.status = status;
            client.comment = row.comment;
            client.last_seen = Some(row.time);
            client.seen_at = status.is_running().then_some(now);
        }
        self.changes += 1;
    }

    fn entry(&mut self, kind: &str, name: &str, host: &str) -> &mut ClientEntry {
        let changes = &mut self.changes;
        self.clients.entry(client_id(kind, name, host)).or_insert_with(|| {
            *changes += 1;
            ClientEntry {
                kind: kind.to_owned(),
                name: name.to_owned(),
                host: host.to_owned(),
                status: ClientStatus::Unknown,
                comment: String::new(),
                last_seen: None,
                seen_at: None,
                heard_at: None,
                pid: None,
                history: VecDeque::new(),
            }
        })
    }

    fn set_status(&mut self, id: &str, status: ClientStatus, comment: &str) -> bool {
        let limit = self.settings.history_limit;
        let Some(client) = self.clients.get_mut(id) else {
            return false;
        };
        if client.status == status && client.comment == comment {
            return false;
        }
        let time = unix_now();
        client.status = status;
        client.comment = comment.to_owned();
        client.history.push_back((time, status, comment.to_owned()));
        while client.history.len() > limit {
            client.history.pop_front();
        }
        if let Some(store) = &self.store {
            store.record(HistoryRow {
                client: id.to_owned(),
                time,
                status: status.as_str().to_owned(),
                comment: comment.to_owned(),
            });
        }
        self.changes += 1;
        true
    }

    /// Applies one `plugin.status` event; true when something changed.
    pub fn on_status(&mut self, data: &Value, now: Instant) -> bool {
        match PluginStatus::parse(data) {
            Ok(status) => self.on_plugin_status(&status, now),
            Err(_) => {
                self.malformed += 1;
                false
            }
        }
    }

    /// Applies one `plugin.status` event, read; true when something changed.
    pub fn on_plugin_status(&mut self, status: &PluginStatus, now: Instant) -> bool {
        let id = status.id().to_string();
        let client = self.entry(&status.kind, &status.name, &status.host);
        client.last_seen = Some(unix_now());
        client.seen_at = Some(now);
        client.heard_at = Some(now);
        self.set_status(&id, status.event, &status.comment)
    }

    /// Applies what the supervisor saw of a plugin it runs (`pid` is its
    /// process, if running); true when something changed. A plugin it
    /// starts is given the usual time to speak before silence counts.
    pub fn on_process(&mut self, event: &ProcessEvent, now: Instant) -> bool {
        let ProcessEvent {
            id,
            pid,
            status,
            comment,
        } = event;
        let client = self.entry(&id.kind, &id.name, &id.host);
        let pid_changed = client.pid != *pid;
        client.pid = *pid;
        if status.is_running() {
            client.seen_at = Some(now);
        }
        if pid_changed {
            self.changes += 1;
        }
        self.set_status(&id.to_string(), *status, comment) || pid_changed
    }

    /// Takes its reports from a supervisor, from now on.
    pub fn follow(&mut self, events: mpsc::Receiver<ProcessEvent>) {
        self.process_events = Some(events);
    }

    /// Applies what the supervisor reported since the last look: called by
    /// whoever takes the registry, before reading or changing it.
    pub fn catch_up(&mut self, now: Instant) {
        let Some(events) = self.process_events.take() else {
            return;
        };
        while let Ok(event) = events.try_recv() {
            self.on_process(&event, now);
        }
        self.process_events = Some(events);
    }

    /// Applies one `plugin.configuration` event (from the config service:
    /// `{type, name, host, configured, …}`); true when something changed.
    pub fn on_configuration(&mut self, data: &Value) -> bool {
        let text = |field: &str| data.get(field).and_then(Value::as_str).filter(|s| !s.is_empty());
        let (Some(name), Some(host), Some(configured)) = (
            text("name").or_else(|| text("id")),
            text("host"),
            data.get("configured").and_then(Value::as_bool),
        ) else {
            tracing::debug!(%data, "ignored a plugin.configuration event without name, host and configured");
            return false;
        };
        let id = client_id(text("type").unwrap_or("plugin"), name, host);
        let before = self.configured.insert(id, (configured, ConfiguredFrom::Event));
        let changed = before.map(|(c, _)| c) != Some(configured);
        if changed {
            self.changes += 1;
        }
        changed
    }

    /// Takes the `configured` of a `config.get` answer, unless an event
    /// has said otherwise meanwhile; true when something changed.
    pub fn set_configured(&mut self, id: &str, configured: bool) -> bool {
        match self.configured.get(id) {
            Some((_, ConfiguredFrom::Event)) => false,
            Some((known, _)) if *known == configured => false,
            _ => {
                self.configured
                    .insert(id.to_owned(), (configured, ConfiguredFrom::Asked));
                self.changes += 1;
                true
            }
        }
    }

    /// Whether the client's required config is set, when known.
    pub fn configured(&self, id: &str) -> Option<bool> {
        self.configured.get(id).map(|(c, _)| *c)
    }

    /// The host this manager runs on.
    pub fn host(&self) -> &str {
        &self.settings.host
    }

    /// Its settings.
    pub fn settings(&self) -> &ManagerSettings {
        &self.settings
    }

    /// The manifests it lists.
    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// A count that grows whenever what `list` or `detail` shows changes.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// A client's status, if the client is known.
    pub fn status(&self, id: &str) -> Option<ClientStatus> {
        self.clients.get(id).map(|c| c.status)
    }

    /// A client's process, when the supervisor runs it.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.clients.get(id)?.pid
    }

    /// The status of a client that this run of the manager has heard say
    /// it is running while the supervisor runs no process for it (it was
    /// started by someone else); such a client must not be started twice.
    /// A status restored from the database does not count: it is only a
    /// memory of the last run.
    pub fn running_unsupervised(&self, id: &str) -> Option<ClientStatus> {
        let client = self.clients.get(id)?;
        (client.pid.is_none() && client.heard_at.is_some() && client.status.is_running()).then_some(client.status)
    }

    /// Declares dead the running clients silent for too long; true when
    /// one was.
    pub fn tick(&mut self, now: Instant) -> bool {
        let dead_after = self.settings.dead_after;
        let silent: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| c.status.is_running())
            .filter(|(_, c)| {
                c.seen_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= dead_after)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = false;
        for id in silent {
            let comment = format!("not heard from for {} s", dead_after.as_secs_f64());
            changed |= self.set_status(&id, ClientStatus::Dead, &comment);
        }
        changed
    }

    fn manifest(&self, kind: &str, name: &str) -> Option<&Manifest> {
        self.manifests.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// Checks a `plugin.start.do` or `plugin.stop.do` (`name` or `id`,
    /// `type` defaulting to `plugin`, `host` to this manager's): the
    /// plugin must be one this manager can run. Returns (type, name), or
    /// why not.
    pub fn supervised_target(&self, action: &str, data: &Value) -> Result<(String, String), String> {
        match ManagerRequest::parse(&Message::new(action, data.clone())) {
            Ok(ManagerRequest::PluginStart(target) | ManagerRequest::PluginStop(target)) => self.check_target(&target),
            Ok(_) => Err(format!("{action} is not plugin.start.do or plugin.stop.do")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The plugin of a start or stop must be one this manager can run;
    /// (type, name), or why not.
    fn check_target(&self, target: &PluginTarget) -> Result<(String, String), String> {
        let (kind, name) = (target.kind.as_str(), target.name.as_str());
        let host = self.host();
        if let Some(other) = target.host.as_deref().filter(|h| *h != host) {
            return Err(format!(
                "this manager runs the plugins of host '{host}' only, not of '{other}'; ask the manager there"
            ));
        }
        let Some(manifest) = self.manifest(kind, name) else {
            let known: Vec<String> = self
                .manifests
                .iter()
                .filter(|m| !m.command.is_empty())
                .map(|m| format!("{}-{}", m.kind, m.name))
                .collect();
            return Err(format!(
                "no manifest for {kind} '{name}' in the plugins folder (this manager can run: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        if manifest.command.is_empty() {
            return Err(format!(
                "the manifest of {kind} '{name}' has no command: it is started elsewhere, not by this manager"
            ));
        }
        Ok((kind.to_owned(), name.to_owned()))
    }

    /// One client as Domogik's manager lists it (`Clients.add` in its
    /// `manager.py`): `name`, `type`, `host`, `status`, `configured`,
    /// `pid` (null when not running here; Domogik said 0), `package_id`
    /// (`<type>-<name>`),
    /// `xpl_source` (`domogik-<name>.<host>`), `last_seen` (unix time), the
    /// xPL client lists (always empty here), plus the seed's `id` (the
    /// name) and majordome's `comment`.
    fn listed(&self, id: &str, client: &ClientEntry) -> Listed {
        Listed {
            name: client.name.clone(),
            id: client.name.clone(),
            kind: client.kind.clone(),
            host: client.host.clone(),
            status: client.status,
            configured: self.configured(id),
            pid: client.pid,
            package_id: format!("{}-{}", client.kind, client.name),
            xpl_source: format!("domogik-{}.{}", client.name, client.host),
            last_seen: client.last_seen,
            comment: client.comment.clone(),
            compliant_xpl_clients: Vec::new(),
            xpl_clients_only: Vec::new(),
            data: None,
        }
    }

    /// Every client by id, flat, as Domogik's `client.list.get` answers and
    /// its `client.list` event carries: `{"plugin-fake.box": {…}, …}`.
    pub fn list(&self) -> Value {
        let clients: Map<String, Value> = self
            .clients
            .iter()
            .map(|(id, c)| (id.clone(), json!(self.listed(id, c))))
            .collect();
        Value::Object(clients)
    }

    /// The list's entries plus `data`, what the manifest says (version,
    /// description, config keys, device types), as Domogik's
    /// `client.detail.get`; `only` keeps one client.
    pub fn detail(&self, only: Option<&str>) -> Value {
        let clients: Map<String, Value> = self
            .clients
            .iter()
            .filter(|(id, _)| only.is_none_or(|only| only == id.as_str()))
            .map(|(id, c)| {
                let mut entry = self.listed(id, c);
                let manifest = self.manifest(&c.kind, &c.name);
                entry.data = Some(manifest.map_or(json!({}), |m| {
                    json!({
                        "version": m.version, "description": m.description,
                        "config": m.config, "device_types": m.device_types,
                    })
                }));
                (id.clone(), json!(entry))
            })
            .collect();
        Value::Object(clients)
    }

    /// A client's status changes, newest first (as Domogik's database
    /// gives them), each `{status, comment, timestamp}` plus `time` (the
    /// same unix time).
    fn history(&self, id: &str) -> Option<Value> {
        let client = self.clients.get(id)?;
        let history: Vec<Value> = client
            .history
            .iter()
            .rev()
            .map(|(time, status, comment)| {
                json!(HistoryEntry {
                    status: *status,
                    comment: comment.clone(),
                    timestamp: *time,
                    time: *time,
                })
            })
            .collect();
        Some(Value::Array(history))
    }

    /// `client.history.get`, for a client named by `id` or, as Domogik's
    /// admin asks, by `type`, `name` and `host`. The reply carries both
    /// forms and Domogik's `status`/`reason`; an unknown client has an
    /// empty history and status false.
    fn history_reply(&self, action: &str, client: &ClientId) -> Message {
        let id = client.to_string();
        let (status, reason, history) = match self.history(&id) {
            Some(history) => (true, String::new(), history),
            None => (false, format!("no client '{id}'"), json!([])),
        };
        let (kind, name, host) = (&client.kind, &client.name, &client.host);
        Message::new(
            majordome_mdp::domogik::result_action(action),
            json!({
                "id": id, "type": kind, "name": name, "host": host, "history": history,
                "status": status, "reason": reason,
            }),
        )
    }

    /// Answers one request to the manager, except `plugin.start.do` and
    /// `plugin.stop.do`, which need the supervisor that [`run`] starts.
    pub fn handle(&self, message: &Message) -> Message {
        match ManagerRequest::parse(message) {
            Ok(request) => self.answer(&message.action, request),
            Err(e) => Message::failure(&message.action, e.to_string()),
        }
    }

    /// Answers one request, read.
    fn answer(&self, action: &str, request: ManagerRequest) -> Message {
        let reply = |data: Value| Message::new(majordome_mdp::domogik::result_action(action), data);
        match request {
            // Domogik's own code answers the singular spelling with the
            // clients at the top level of the data; the seed documents'
            // plural spelling wraps them in "clients".
            ManagerRequest::ClientList { wrapped: false } => reply(self.list()),
            ManagerRequest::ClientList { wrapped: true } => reply(json!({"clients": self.list()})),
            ManagerRequest::ClientDetail { id, wrapped } => {
                // Domogik asks for every client; `id` (majordome's) keeps one.
                let detail = self.detail(id.as_deref());
                if let (Some(id), Some(true)) = (&id, detail.as_object().map(Map::is_empty)) {
                    return Message::failure(action, format!("no client '{id}'"));
                }
                match wrapped {
                    false => reply(detail),
                    true => reply(json!({"clients": detail})),
                }
            }
            ManagerRequest::ClientHistory(client) => self.history_reply(action, &client),
            ManagerRequest::PackageDetail => {
                let packages: Map<String, Value> = self
                    .manifests
                    .iter()
                    .map(|m| (format!("{}-{}", m.kind, m.name), json!(m)))
                    .collect();
                reply(json!({"packages": packages}))
            }
            ManagerRequest::DeviceTypes => {
                let types: Map<String, Value> = self
                    .manifests
                    .iter()
                    .map(|m| (m.name.clone(), json!(m.device_types)))
                    .collect();
                reply(json!({"device_types": types}))
            }
            ManagerRequest::PluginStart(_) | ManagerRequest::PluginStop(_) => Message::failure(
                action,
                format!("{action} needs the manager's supervisor, which this registry runs without"),
            ),
        }
    }
}

/// The registry, up to date with what the supervisor reported: how every
/// thread of the manager takes it.
fn take(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    let mut registry = lock(registry);
    registry.catch_up(Instant::now());
    registry
}

/// Answers `plugin.start.do` / `plugin.stop.do` through the supervisor,
/// without holding the registry's lock while the supervisor works (it
/// takes that lock to record what it does).
fn supervise(
    registry: &Mutex<Registry>,
    supervisor: &SupervisorHandle,
    action: &str,
    target: &PluginTarget,
) -> Message {
    let (target, host, elsewhere, known) = {
        let registry = take(registry);
        let target = registry.check_target(target);
        let host = registry.host().to_owned();
        let id = target.as_ref().map(|(kind, name)| client_id(kind, name, &host));
        let (elsewhere, known) = match &id {
            Ok(id) => (registry.running_unsupervised(id), registry.status(id)),
            Err(_) => (None, None),
        };
        (target, host, elsewhere, known)
    };
    let (kind, name) = match target {
        Ok(target) => target,
        Err(reason) => return Message::failure(action, reason),
    };
    let outcome = if action.starts_with("plugin.start") {
        supervisor.start(&kind, &name, elsewhere).map(Some)
    } else {
        supervisor.stop(&kind, &name, known).map(|()| None)
    };
    let id = client_id(&kind, &name, &host);
    let (status, reason, pid) = match outcome {
        Ok(pid) => (true, String::new(), pid),
        Err(reason) => (false, reason, None),
    };
    let mut data = json!({
        "status": status, "reason": reason, "type": kind, "name": name, "id": name, "host": host, "client": id,
    });
    if let Some(pid) = pid {
        data["pid"] = pid.into();
    }
    Message::new(majordome_mdp::domogik::result_action(action), data)
}

/// Asks the config service whether each manifest plugin of this host is
/// configured, until each is answered or `config_wait` passes. The config
/// service may come up after the manager, so what is unanswered is asked
/// again a second later. A state machine stepped by the manager's event
/// thread ([`ConfigAsker::step`], with the time as an input); its bus
/// client (and that client's I/O thread) lives only while it asks.
struct ConfigAsker {
    broker: String,
    /// Not answered yet.
    pending: Vec<ClientId>,
    in_flight: Vec<(ClientId, PendingReply)>,
    next_round: Instant,
    deadline: Instant,
    timeout: Duration,
    bus: Option<AsyncClient>,
}

impl ConfigAsker {
    fn new(registry: &Registry, broker: &str, now: Instant) -> ConfigAsker {
        let host = registry.host();
        let settings = registry.settings();
        ConfigAsker {
            broker: broker.to_owned(),
            pending: registry
                .manifests()
                .iter()
                .map(|m| ClientId::new(&m.kind, &m.name, host))
                .collect(),
            in_flight: Vec::new(),
            next_round: now,
            deadline: now + settings.config_wait,
            timeout: settings.config_timeout,
            bus: None,
        }
    }

    /// Takes the answers that came and sends what is due.
    fn step(&mut self, registry: &mut Registry, now: Instant) {
        let mut answered = Vec::new();
        self.in_flight.retain_mut(|(id, reply)| {
            let Some(outcome) = reply.try_take() else { return true };
            let configured = outcome
                .ok()
                .and_then(|body| Message::from_frames(&body).ok())
                .and_then(|reply| reply.data.get("configured").and_then(Value::as_bool));
            match configured {
                Some(configured) => {
                    registry.set_configured(&id.to_string(), configured);
                    answered.push(id.clone());
                }
                None => tracing::debug!(client = %id, "config.get not answered yet"),
            }
            false
        });
        self.pending.retain(|id| !answered.contains(id));
        if self.pending.is_empty() {
            self.bus = None;
            return;
        }
        if !self.in_flight.is_empty() || now < self.next_round {
            return;
        }
        if now >= self.deadline {
            for id in self.pending.drain(..) {
                tracing::warn!(
                    client = %id,
                    "the config service did not say whether it is configured; waiting for plugin.configuration events"
                );
            }
            self.bus = None;
            return;
        }
        if self.bus.is_none() {
            match AsyncClient::connect(&self.broker) {
                Ok(bus) => self.bus = Some(bus),
                Err(e) => tracing::debug!(error = %e, "cannot reach the broker to ask the config service"),
            }
        }
        if let Some(bus) = &self.bus {
            for id in &self.pending {
                let ask = json!({"type": id.kind, "name": id.name, "host": id.host});
                let body = Message::new("config.get", ask).to_frames();
                self.in_flight
                    .push((id.clone(), bus.request("config", body, self.timeout)));
            }
        }
        self.next_round = now + Duration::from_secs(1);
    }
}

/// Runs the manager until `shutdown`: the `manager` worker at the broker;
/// a thread that follows `plugin.status` and `plugin.configuration`,
/// applies silence and publishes every change as `client.list` and
/// `client.detail`; one that asks the config service about `configured`;
/// and the supervisor, which autostarts plugins, runs them with their
/// output in `<log_dir>/<type>-<name>.log`, and, on `shutdown`, stops and
/// reaps every one of them before this returns.
pub fn run(
    registry: Registry,
    endpoints: &ManagerEndpoints,
    log_dir: &Path,
    shutdown: &Shutdown,
) -> Result<(), ManagerError> {
    let settings = registry.settings().clone();
    let manifests = registry.manifests().to_vec();
    let registry = Arc::new(Mutex::new(registry));
    let mut subscriber = Subscriber::connect(&endpoints.subscribe, &["plugin.status", "plugin.configuration"])?;
    let mut publisher = Publisher::connect(&endpoints.publish)?;

    let mut environment = vec![
        ("MAJORDOME_BROKER".to_owned(), endpoints.broker.clone()),
        ("MAJORDOME_PUBLISH".to_owned(), endpoints.publish.clone()),
        ("MAJORDOME_SUBSCRIBE".to_owned(), endpoints.subscribe.clone()),
        ("MAJORDOME_HOST".to_owned(), settings.host.clone()),
    ];
    environment.extend(settings.plugin_environment.iter().cloned());
    let wiring = supervisor::Wiring {
        broker: endpoints.broker.clone(),
        environment,
        log_dir: PathBuf::from(log_dir),
    };
    let (reports, reported) = mpsc::channel();
    take(&registry).follow(reported);
    let (supervisor, supervisor_thread) =
        supervisor::start(&manifests, settings.supervisor(), wiring, reports, shutdown)?;

    let (shared, stop, told) = (registry.clone(), shutdown.clone(), supervisor.clone());
    let mut asker = ConfigAsker::new(&take(&registry), &endpoints.broker, Instant::now());
    let follower = thread::Builder::new()
        .name("manager-status".into())
        .spawn(move || -> Result<(), ClientError> {
            let mut published = None;
            while !stop.is_triggered() {
                let event = subscriber.recv(Duration::from_millis(250))?;
                let now = Instant::now();
                let mut registry = take(&shared);
                match event {
                    Some(e) if e.category == "plugin.configuration" => {
                        registry.on_configuration(&e.data);
                    }
                    Some(e) => match PluginStatus::parse(&e.data) {
                        Ok(status) => {
                            registry.on_plugin_status(&status, now);
                            // The supervisor tells a plugin that meant to
                            // stop from one that crashed.
                            told.said(status.id(), status.event);
                        }
                        Err(_) => registry.malformed += 1,
                    },
                    None => {}
                }
                registry.tick(now);
                asker.step(&mut registry, now);
                // Changes come from this thread, the supervisor and the
                // config service alike; this one publishes them all, at most
                // a quarter of a second late.
                if published != Some(registry.changes()) {
                    published = Some(registry.changes());
                    let (list, detail) = (registry.list(), registry.detail(None));
                    drop(registry);
                    for (category, data) in [("client.list", list), ("client.detail", detail)] {
                        if let Err(e) = publisher.publish(category, &data) {
                            tracing::warn!(error = %e, category, "could not publish");
                        }
                    }
                }
            }
            Ok(())
        })?;

    let shared = registry.clone();
    let handler = domogik_handler(move |message: Message| match ManagerRequest::parse(&message) {
        Ok(ManagerRequest::PluginStart(target) | ManagerRequest::PluginStop(target)) => {
            supervise(&shared, &supervisor, &message.action, &target)
        }
        Ok(request) => take(&shared).answer(&message.action, request),
        Err(e) => Message::failure(&message.action, e.to_string()),
    });
    let served = Worker::new(&endpoints.broker, "manager", WorkerOptions::default()).run(handler, shutdown);

    // The worker ends at shutdown (or fails to start); the other threads
    // end at shutdown too, the supervisor once every child is reaped.
    let followed = follower.join().map_err(|_| ManagerError::Panicked("status"))?;
    supervisor_thread
        .join()
        .map_err(|_| ManagerError::Panicked("supervisor"))?;
    // What the supervisor said last (the plugins it stopped) is recorded.
    take(&registry).catch_up(Instant::now());
    // The last reference: dropping it finishes the history writes.
    drop(registry);
    served?;
    followed?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ManagerSettings {
        ManagerSettings {
            dead_after: Duration::from_secs(30),
            history_limit: 3,
            host: "box".into(),
            ..ManagerSettings::default()
        }
    }

    fn manifest(text: Value) -> Manifest {
        Manifest::parse(&text.to_string()).unwrap()
    }

    #[test]
    fn statuses_come_from_events_and_silence_makes_a_client_dead() {
        let manifest = manifest(json!({"name": "fake", "version": "1", "device_types": ["switch"]}));
        let mut registry = Registry::new(vec![manifest], settings());
        assert_eq!(registry.list()["plugin-fake.box"]["status"], "unknown");
        let t0 = Instant::now();
        let alive = json!({"type": "plugin", "id": "diskfree", "host": "darkstar", "event": "alive"});
        assert!(registry.on_status(&alive, t0));
        assert!(!registry.on_status(&alive, t0), "the same status again is no change");
        assert_eq!(registry.list()["plugin-diskfree.darkstar"]["status"], "alive");
        assert!(!registry.tick(t0 + Duration::from_secs(29)));
        assert!(registry.tick(t0 + Duration::from_secs(30)));
        assert_eq!(registry.list()["plugin-diskfree.darkstar"]["status"], "dead");
        assert!(!registry.tick(t0 + Duration::from_secs(60)), "dead once");
        // Stopped clients are not expected to speak.
        let stopped = json!({"id": "fake", "host": "box", "event": "stopped"});
        assert!(registry.on_status(&stopped, t0));
        assert!(!registry.tick(t0 + Duration::from_secs(120)));
        // Bad events are counted, not fatal.
        for bad in [
            json!({}),
            json!({"id": "x", "host": "h", "event": "sleeping"}),
            json!("text"),
        ] {
            assert!(!registry.on_status(&bad, t0));
        }
        assert_eq!(registry.malformed, 3);
        // History is bounded.
        for event in ["starting", "alive", "stop-request", "stopped"] {
            registry.on_status(&json!({"id": "diskfree", "host": "darkstar", "event": event}), t0);
        }
        let reply = registry.handle(&Message::new(
            "client.history.get",
            json!({"id": "plugin-diskfree.darkstar"}),
        ));
        let history = reply.data["history"].as_array().unwrap();
        let statuses: Vec<&str> = history.iter().map(|h| h["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, ["stopped", "stop-request", "alive"], "newest first");
    }

    #[test]
    fn actions_in_both_spellings_and_clear_errors() {
        let manifest = manifest(json!({"name": "fake", "version": "2", "device_types": ["switch", "dimmer"]}));
        let registry = Registry::new(vec![manifest], settings());
        // The seed's plural spelling wraps the clients; Domogik's code
        // answers the singular one flat.
        let seed = registry.handle(&Message::new("clients.list.get", json!({})));
        assert_eq!(seed.action, "clients.list.result");
        assert_eq!(seed.data["clients"]["plugin-fake.box"]["id"], "fake");
        let domogik = registry.handle(&Message::new("client.list.get", json!({})));
        assert_eq!(domogik.action, "client.list.result");
        assert_eq!(domogik.data["plugin-fake.box"]["name"], "fake");
        let detail = registry.handle(&Message::new("clients.detail.get", json!({"id": "plugin-fake.box"})));
        assert_eq!(detail.data["clients"]["plugin-fake.box"]["data"]["version"], "2");
        let detail = registry.handle(&Message::new("client.detail.get", json!({})));
        assert_eq!(detail.data["plugin-fake.box"]["data"]["version"], "2");
        let missing = registry.handle(&Message::new("client.detail.get", json!({"id": "nope"})));
        assert_eq!(missing.status(), Some(false));
        let types = registry.handle(&Message::new("device_types.get", json!({})));
        assert_eq!(types.data["device_types"]["fake"], json!(["switch", "dimmer"]));
        let unknown = registry.handle(&Message::new("plugin.frob.do", json!({})));
        assert_eq!(unknown.action, "plugin.frob.result");
        assert!(unknown.reason().unwrap().contains("unknown action"));
    }

    /// Domogik's admin reads `client.list.get` as `{id: entry}` and each
    /// entry's fields by name (`admin/views/clients.py`, the templates):
    /// every field Domogik's manager gives is there.
    #[test]
    fn regression_client_list_and_detail_have_domogik_s_flat_shape_and_fields() {
        let mut registry = Registry::new(vec![manifest(json!({"name": "fake", "version": "2"}))], settings());
        registry.on_status(
            &json!({"id": "diskfree", "host": "darkstar", "event": "alive"}),
            Instant::now(),
        );
        let list = registry.handle(&Message::new("client.list.get", json!({})));
        assert_eq!(list.action, "client.list.result");
        let ids: Vec<&String> = list.data.as_object().unwrap().keys().collect();
        assert_eq!(ids, ["plugin-diskfree.darkstar", "plugin-fake.box"]);
        let entry = &list.data["plugin-diskfree.darkstar"];
        for field in [
            "status",
            "name",
            "xpl_source",
            "configured",
            "pid",
            "package_id",
            "host",
            "type",
            "last_seen",
            "compliant_xpl_clients",
            "xpl_clients_only",
        ] {
            assert!(entry.get(field).is_some(), "{field} in {entry}");
        }
        assert_eq!(
            (&entry["name"], &entry["type"], &entry["host"], &entry["status"]),
            (
                &json!("diskfree"),
                &json!("plugin"),
                &json!("darkstar"),
                &json!("alive")
            )
        );
        assert_eq!(entry["package_id"], "plugin-diskfree");
        assert_eq!(entry["xpl_source"], "domogik-diskfree.darkstar");
        assert_eq!(entry["pid"], Value::Null, "not running here");
        assert!(entry["last_seen"].as_f64().unwrap() > 1e9);
        let detail = registry.handle(&Message::new("client.detail.get", json!({})));
        assert_eq!(detail.data["plugin-fake.box"]["package_id"], "plugin-fake");
        assert_eq!(detail.data["plugin-fake.box"]["data"]["version"], "2");
        // The admin asks for a history by type, name and host.
        let history = registry.handle(&Message::new(
            "client.history.get",
            json!({"type": "plugin", "name": "diskfree", "host": "darkstar"}),
        ));
        assert_eq!(history.status(), Some(true));
        assert_eq!(
            (&history.data["type"], &history.data["name"], &history.data["host"]),
            (&json!("plugin"), &json!("diskfree"), &json!("darkstar"))
        );
        assert_eq!(history.data["history"][0]["status"], "alive");
        assert!(history.data["history"][0]["timestamp"].as_f64().is_some());
        let unknown = registry.handle(&Message::new(
            "client.history.get",
            json!({"type": "plugin", "name": "nope", "host": "darkstar"}),
        ));
        assert_eq!((unknown.status(), &unknown.data["history"]), (Some(false), &json!([])));
    }

    #[test]
    fn the_supervisor_s_reports_carry_the_pid_and_restart_the_silence_clock() {
        let manifest = manifest(json!({"name": "fake", "version": "1", "command": ["sleep", "9"]}));
        let mut registry = Registry::new(vec![manifest], settings());
        let t0 = Instant::now();
        assert!(registry.on_process(
            &report(Some(42), ClientStatus::Starting, "started by the manager, pid 42"),
            t0
        ));
        let detail = registry.detail(Some("plugin-fake.box"));
        assert_eq!(detail["plugin-fake.box"]["pid"], 42);
        assert_eq!(detail["plugin-fake.box"]["status"], "starting");
        // A plugin that never speaks is dead after the usual silence.
        assert!(!registry.tick(t0 + Duration::from_secs(29)));
        assert!(registry.tick(t0 + Duration::from_secs(30)));
        assert!(registry.on_process(&report(None, ClientStatus::Dead, "exited with status 3"), t0));
        assert_eq!(registry.pid("plugin-fake.box"), None);
        // (An id that is not <type>-<name>.<host> cannot be reported: a
        // ClientId is always one.)
    }

    /// What the supervisor reports of plugin-fake.box.
    fn report(pid: Option<u32>, status: ClientStatus, comment: &str) -> ProcessEvent {
        ProcessEvent {
            id: ClientId::new("plugin", "fake", "box"),
            pid,
            status,
            comment: comment.into(),
        }
    }

    #[test]
    fn a_client_started_elsewhere_is_not_started_twice_but_a_memory_is_no_obstacle() {
        let manifest = manifest(json!({"name": "fake", "version": "1", "command": ["sleep", "9"]}));
        let mut registry = Registry::new(vec![manifest], settings());
        let t0 = Instant::now();
        registry.restore(
            vec![HistoryRow {
                client: "plugin-fake.box".into(),
                time: 1.0,
                status: "alive".into(),
                comment: String::new(),
            }],
            t0,
        );
        assert_eq!(registry.running_unsupervised("plugin-fake.box"), None);
        registry.on_status(&json!({"id": "fake", "host": "box", "event": "alive"}), t0);
        assert_eq!(
            registry.running_unsupervised("plugin-fake.box"),
            Some(ClientStatus::Alive)
        );
        registry.on_process(
            &report(Some(7), ClientStatus::Starting, "started by the manager, pid 7"),
            t0,
        );
        assert_eq!(registry.running_unsupervised("plugin-fake.box"), None, "ours now");
    }

    #[test]
    fn restored_history_is_bounded_and_a_running_status_waits_for_silence() {
        let mut registry = Registry::new(Vec::new(), settings());
        let row = |client: &str, time: f64, status: &str| HistoryRow {
            client: client.into(),
            time,
            status: status.into(),
            comment: format!("at {time}"),
        };
        let t0 = Instant::now();
        registry.restore(
            vec![
                row("plugin-fake.box", 1.0, "starting"),
                row("plugin-fake.box", 2.0, "alive"),
                row("core-rest.box", 2.5, "stopped"),
                row("plugin-fake.box", 3.0, "stop-request"),
                row("plugin-fake.box", 4.0, "alive"),
                row("not-an-id", 5.0, "alive"),
            ],
            t0,
        );
        let detail = registry.detail(None);
        assert_eq!(detail["plugin-fake.box"]["status"], "alive");
        assert_eq!(detail["plugin-fake.box"]["comment"], "at 4");
        assert_eq!(detail["plugin-fake.box"]["last_seen"], 4.0);
        assert_eq!(detail["core-rest.box"]["status"], "stopped");
        assert_eq!(detail.as_object().unwrap().len(), 2, "{detail}");
        let history = registry.history("plugin-fake.box").unwrap();
        let times: Vec<f64> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["time"].as_f64().unwrap())
            .collect();
        assert_eq!(times, [4.0, 3.0, 2.0], "newest first");
        assert!(!registry.tick(t0 + Duration::from_secs(29)));
        assert!(registry.tick(t0 + Duration::from_secs(30)));
        assert_eq!(registry.status("plugin-fake.box"), Some(ClientStatus::Dead));
        assert_eq!(registry.status("core-rest.box"), Some(ClientStatus::Stopped));
    }

    #[test]
    fn configured_comes_from_answers_and_events_and_events_win() {
        let manifest = manifest(json!({"name": "fake", "version": "1"}));
        let mut registry = Registry::new(vec![manifest], settings());
        assert_eq!(registry.list()["plugin-fake.box"]["configured"], Value::Null);
        let before = registry.changes();
        assert!(registry.set_configured("plugin-fake.box", false));
        assert!(registry.changes() > before);
        assert_eq!(registry.list()["plugin-fake.box"]["configured"], false);
        let event = json!({"type": "plugin", "name": "fake", "host": "box", "event": "updated", "keys": ["unit"], "configured": true});
        assert!(registry.on_configuration(&event));
        assert!(!registry.on_configuration(&event));
        assert_eq!(registry.detail(None)["plugin-fake.box"]["configured"], true);
        assert!(
            !registry.set_configured("plugin-fake.box", false),
            "a late answer is older than the event"
        );
        assert_eq!(registry.configured("plugin-fake.box"), Some(true));
        assert!(!registry.on_configuration(&json!({"name": "fake", "host": "box"})));
        // A client the config service speaks of before it appears.
        registry.on_configuration(&json!({"name": "diskfree", "host": "darkstar", "configured": false}));
        registry.on_status(
            &json!({"id": "diskfree", "host": "darkstar", "event": "alive"}),
            Instant::now(),
        );
        assert_eq!(registry.list()["plugin-diskfree.darkstar"]["configured"], false);
    }

    #[test]
    fn start_and_stop_requests_are_checked_against_the_manifests() {
        let manifests = vec![
            manifest(json!({"name": "fake", "version": "1", "command": ["majordome", "plugin", "fake"]})),
            manifest(json!({"name": "remote", "version": "1"})),
        ];
        let registry = Registry::new(manifests, settings());
        let check = |data: Value| registry.supervised_target("plugin.start.do", &data);
        assert_eq!(check(json!({"name": "fake"})), Ok(("plugin".into(), "fake".into())));
        assert_eq!(
            check(json!({"id": "fake", "type": "plugin", "host": "box"})),
            Ok(("plugin".into(), "fake".into()))
        );
        for (data, reason) in [
            (json!({}), "needs 'name' (or 'id')"),
            (
                json!({"name": "fake", "host": "elsewhere"}),
                "of host 'box' only, not of 'elsewhere'",
            ),
            (
                json!({"name": "nope"}),
                "no manifest for plugin 'nope' in the plugins folder (this manager can run: plugin-fake)",
            ),
            (json!({"name": "remote"}), "has no command"),
            (json!({"name": "fake", "type": "core"}), "no manifest for core 'fake'"),
        ] {
            let error = check(data.clone()).unwrap_err();
            assert!(error.contains(reason), "{data}: {error}");
        }
        let reply = registry.handle(&Message::new("plugin.start.do", json!({"name": "fake"})));
        assert_eq!(reply.status(), Some(false));
    }

    #[test]
    fn history_survives_in_the_database_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let database = majordome_store::database_path(dir.path());
        let mut registry = Registry::open(Vec::new(), settings(), &database, Durability::Process).unwrap();
        let t0 = Instant::now();
        for event in ["starting", "alive", "stop-request", "stopped"] {
            registry.on_status(&json!({"id": "fake", "host": "box", "event": event}), t0);
        }
        registry.on_status(&json!({"id": "other", "host": "box", "event": "alive"}), t0);
        drop(registry);
        let registry = Registry::open(Vec::new(), settings(), &database, Durability::Process).unwrap();
        let statuses = |id: &str| -> Vec<String> {
            registry
                .history(id)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["status"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(statuses("plugin-fake.box"), ["stopped", "stop-request", "alive"]);
        assert_eq!(statuses("plugin-other.box"), ["alive"]);
        assert_eq!(registry.status("plugin-fake.box"), Some(ClientStatus::Stopped));
        drop(registry);
        // A lower limit trims the table itself at the next start.
        let fewer = ManagerSettings {
            history_limit: 1,
            ..settings()
        };
        drop(Registry::open(Vec::new(), fewer, &database, Durability::Process).unwrap());
        let connection = majordome_store::open(&database, Durability::Process).unwrap();
        let rows: i64 = connection
            .query_row("SELECT COUNT(*) FROM client_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2);
    }
}
