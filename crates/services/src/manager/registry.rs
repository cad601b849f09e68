//! The client registry: statuses from events, the supervisor and
//! silence; `configured`; the answers to the manager's requests. A pure
//! model: it touches no socket and reads no clock (callers pass `now`).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use majordome_api::manager::{ClientEntry as Listed, HistoryEntry, ManagerRequest, PluginTarget};
use majordome_api::{ClientId, ClientStatus, PluginStatus};
use majordome_client::{unix_now, Message};
use majordome_store::Durability;
use serde_json::{json, Map, Value};

use super::store::{HistoryRow, HistoryStore};
use super::{ManagerError, ManagerSettings};
use crate::manifest::Manifest;
use crate::supervisor::ProcessEvent;

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
    pub(super) fn check_target(&self, target: &PluginTarget) -> Result<(String, String), String> {
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
    pub(super) fn answer(&self, action: &str, request: ManagerRequest) -> Message {
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
            ManagerRequest::PluginStart(_) | ManagerRequest::PluginStop(_) | ManagerRequest::PluginLog { .. } => {
                Message::failure(
                    action,
                    format!("{action} needs the manager's supervisor, which this registry runs without"),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
