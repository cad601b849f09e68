//! The manager's client registry (service `manager`): which clients
//! (plugins, core parts) exist and whether they are alive, built from the
//! `plugin.status` events every client publishes (on start, then every
//! 15 s) and from the plugin manifests.
//!
//! Statuses are Domogik's: unknown, starting, not-configured, alive,
//! stop-request, stopped, dead, invalid. A client not heard from for
//! `dead_after` (30 s) while it should be running becomes dead. Actions:
//! `client.list.get`, `client.detail.get` (also the seed's `clients.*`
//! spellings), `client.history.get`, `package.detail.get`,
//! `device_types.get`. Every change is published as `client.list` and
//! `client.detail`.
//!
//! `plugin.start.do` and `plugin.stop.do` go to the supervisor
//! (`supervisor.rs`), which runs the plugins' processes.
//!
//! Not here yet: status history that survives a restart (it is kept in
//! memory), and `configured` fed from the config service.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use majordome_client::{domogik_handler, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions};
use serde_json::{json, Map, Value};

use crate::manifest::Manifest;
use crate::supervisor::Supervisor;

/// Domogik's client statuses.
pub const STATUSES: &[&str] = &[
    "unknown",
    "starting",
    "not-configured",
    "alive",
    "stop-request",
    "stopped",
    "dead",
    "invalid",
];

/// Statuses in which a client is expected to keep saying so.
const RUNNING: &[&str] = &["starting", "not-configured", "alive", "stop-request"];

#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// Silence after which a running client is declared dead.
    pub dead_after: Duration,
    /// Status changes kept per client for `client.history.get`.
    pub history_limit: usize,
    /// The host that manifests without a running client are listed on.
    pub host: String,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            dead_after: Duration::from_secs(30),
            history_limit: 100,
            host: local_host(),
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

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

struct Client {
    kind: String,
    name: String,
    host: String,
    status: String,
    comment: String,
    /// Unix time it was last heard from, if ever.
    last_seen: Option<f64>,
    seen_at: Option<Instant>,
    /// (unix time, status, comment), oldest first.
    history: VecDeque<(f64, String, String)>,
}

/// The registry: clients by id (`<type>-<name>.<host>`).
pub struct Registry {
    clients: BTreeMap<String, Client>,
    manifests: Vec<Manifest>,
    settings: ManagerSettings,
    /// `plugin.status` events that were not understood.
    pub malformed: u64,
}

fn client_id(kind: &str, name: &str, host: &str) -> String {
    format!("{kind}-{name}.{host}")
}

impl Registry {
    pub fn new(manifests: Vec<Manifest>, settings: ManagerSettings) -> Registry {
        let mut registry = Registry {
            clients: BTreeMap::new(),
            manifests,
            settings,
            malformed: 0,
        };
        // Every plugin with a manifest is listed, unknown until heard from.
        for manifest in registry.manifests.clone() {
            let host = registry.settings.host.clone();
            registry.entry(&manifest.kind, &manifest.name, &host);
        }
        registry
    }

    fn entry(&mut self, kind: &str, name: &str, host: &str) -> &mut Client {
        self.clients
            .entry(client_id(kind, name, host))
            .or_insert_with(|| Client {
                kind: kind.to_owned(),
                name: name.to_owned(),
                host: host.to_owned(),
                status: "unknown".to_owned(),
                comment: String::new(),
                last_seen: None,
                seen_at: None,
                history: VecDeque::new(),
            })
    }

    fn set_status(&mut self, id: &str, status: &str, comment: &str) -> bool {
        let limit = self.settings.history_limit;
        let Some(client) = self.clients.get_mut(id) else {
            return false;
        };
        if client.status == status && client.comment == comment {
            return false;
        }
        client.status = status.to_owned();
        client.comment = comment.to_owned();
        client
            .history
            .push_back((unix_now(), status.to_owned(), comment.to_owned()));
        while client.history.len() > limit {
            client.history.pop_front();
        }
        true
    }

    /// Applies one `plugin.status` event; true when something changed.
    pub fn on_status(&mut self, data: &Value, now: Instant) -> bool {
        let text = |field: &str| data.get(field).and_then(Value::as_str).filter(|s| !s.is_empty());
        let (Some(name), Some(host), Some(event)) = (text("id").or_else(|| text("name")), text("host"), text("event"))
        else {
            self.malformed += 1;
            return false;
        };
        if !STATUSES.contains(&event) {
            self.malformed += 1;
            return false;
        }
        let kind = text("type").unwrap_or("plugin");
        let comment = text("comment").unwrap_or_default().to_owned();
        let id = client_id(kind, name, host);
        let client = self.entry(kind, name, host);
        client.last_seen = Some(unix_now());
        client.seen_at = Some(now);
        self.set_status(&id, event, &comment)
    }

    /// Applies what the supervisor saw of a plugin it runs on this host;
    /// true when something changed. A plugin it (re)started is given the
    /// usual time to speak before silence counts.
    pub fn on_supervisor(&mut self, report: &crate::supervisor::Report, now: Instant) -> bool {
        let host = self.settings.host.clone();
        let id = client_id(&report.kind, &report.name, &host);
        let client = self.entry(&report.kind, &report.name, &host);
        client.seen_at = Some(now);
        self.set_status(&id, report.status, &report.comment)
    }

    /// The host this manager runs on.
    pub fn host(&self) -> &str {
        &self.settings.host
    }

    /// Declares dead the running clients silent for too long; true when
    /// one was.
    pub fn tick(&mut self, now: Instant) -> bool {
        let dead_after = self.settings.dead_after;
        let silent: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| RUNNING.contains(&c.status.as_str()))
            .filter(|(_, c)| {
                c.seen_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= dead_after)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = false;
        for id in silent {
            let comment = format!("not heard from for {} s", dead_after.as_secs_f64());
            changed |= self.set_status(&id, "dead", &comment);
        }
        changed
    }

    fn manifest(&self, kind: &str, name: &str) -> Option<&Manifest> {
        self.manifests.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// `{id: {status, host, type, id, configured}}`, as `client.list`.
    pub fn list(&self) -> Value {
        let clients: Map<String, Value> = self
            .clients
            .iter()
            .map(|(id, c)| {
                let entry =
                    json!({"status": c.status, "host": c.host, "type": c.kind, "id": c.name, "configured": null});
                (id.clone(), entry)
            })
            .collect();
        Value::Object(clients)
    }

    /// The list's fields plus last seen, comment and the manifest.
    pub fn detail(&self, only: Option<&str>) -> Value {
        let clients: Map<String, Value> = self
            .clients
            .iter()
            .filter(|(id, _)| only.is_none_or(|only| only == id.as_str()))
            .map(|(id, c)| {
                let manifest = self.manifest(&c.kind, &c.name);
                let entry = json!({
                    "status": c.status, "host": c.host, "type": c.kind, "id": c.name, "configured": null,
                    "comment": c.comment, "last_seen": c.last_seen,
                    "data": manifest.map_or(json!({}), |m| json!({
                        "version": m.version, "description": m.description,
                        "config": m.config, "device_types": m.device_types,
                    })),
                });
                (id.clone(), entry)
            })
            .collect();
        Value::Object(clients)
    }

    fn history(&self, id: &str) -> Option<Value> {
        let client = self.clients.get(id)?;
        let history: Vec<Value> = client
            .history
            .iter()
            .map(|(time, status, comment)| json!({"time": time, "status": status, "comment": comment}))
            .collect();
        Some(Value::Array(history))
    }

    /// Answers one request to the manager.
    pub fn handle(&self, message: &Message) -> Message {
        let action = message.action.as_str();
        let reply = |data: Value| Message::new(majordome_mdp::domogik::result_action(action), data);
        match action {
            "client.list.get" | "clients.list.get" => reply(json!({"clients": self.list()})),
            "client.detail.get" | "clients.detail.get" => {
                let only = message.data.get("id").and_then(Value::as_str);
                let detail = self.detail(only);
                if only.is_some() && detail.as_object().is_some_and(Map::is_empty) {
                    return Message::failure(action, format!("no client '{}'", only.unwrap_or_default()));
                }
                reply(json!({"clients": detail}))
            }
            "client.history.get" | "clients.history.get" => {
                let Some(id) = message.data.get("id").and_then(Value::as_str) else {
                    return Message::failure(action, "client.history.get needs 'id', e.g. plugin-fake.box");
                };
                match self.history(id) {
                    Some(history) => reply(json!({"id": id, "history": history})),
                    None => Message::failure(action, format!("no client '{id}'")),
                }
            }
            "package.detail.get" | "packages.detail.get" => {
                let packages: Map<String, Value> = self
                    .manifests
                    .iter()
                    .map(|m| (format!("{}-{}", m.kind, m.name), json!(m)))
                    .collect();
                reply(json!({"packages": packages}))
            }
            "device_types.get" => {
                let types: Map<String, Value> = self
                    .manifests
                    .iter()
                    .map(|m| (m.name.clone(), json!(m.device_types)))
                    .collect();
                reply(json!({"device_types": types}))
            }
            other => Message::failure(
                other,
                format!(
                    "unknown action '{other}': the manager answers client.list.get, client.detail.get, \
                     client.history.get, package.detail.get, device_types.get, plugin.start.do, plugin.stop.do"
                ),
            ),
        }
    }
}

/// Runs the manager: a worker for `manager` at `broker`, and a thread that
/// follows `plugin.status` at `subscribe_at`, drives the supervisor (when
/// given) and publishes changes to `publish_at`, until `shutdown`; then
/// stops the plugins it started.
pub fn run(
    registry: Registry,
    supervisor: Option<Supervisor>,
    broker: &str,
    subscribe_at: &str,
    publish_at: &str,
    shutdown: &Shutdown,
) -> Result<(), majordome_client::ClientError> {
    let registry = Arc::new(Mutex::new(registry));
    let supervisor = Arc::new(Mutex::new(supervisor));
    let mut subscriber = Subscriber::connect(subscribe_at, &["plugin.status"])?;
    let mut publisher = Publisher::connect(publish_at)?;
    {
        let now = Instant::now();
        let reports = lock(&supervisor)
            .as_mut()
            .map(Supervisor::autostart)
            .unwrap_or_default();
        let mut registry = lock(&registry);
        for report in &reports {
            registry.on_supervisor(report, now);
        }
    }
    let (shared, supervised) = (registry.clone(), supervisor.clone());
    let stop = shutdown.clone();
    let follower = thread::Builder::new()
        .name("manager-status".into())
        .spawn(move || -> Result<(), majordome_client::ClientError> {
            let mut publish_all = true;
            while !stop.is_triggered() {
                let event = subscriber.recv(Duration::from_millis(100))?;
                let now = Instant::now();
                let reports = lock(&supervised).as_mut().map(|s| s.tick(now)).unwrap_or_default();
                let mut registry = lock(&shared);
                let mut changed = std::mem::take(&mut publish_all);
                changed |= event.is_some_and(|e| registry.on_status(&e.data, now));
                for report in &reports {
                    changed |= registry.on_supervisor(report, now);
                }
                changed |= registry.tick(now);
                if changed {
                    let (list, detail) = (registry.list(), registry.detail(None));
                    drop(registry);
                    for (category, data) in [("client.list", list), ("client.detail", detail)] {
                        if let Err(e) = publisher.publish(category, &data) {
                            tracing::warn!(error = %e, category, "could not publish");
                        }
                    }
                }
            }
            if let Some(supervisor) = lock(&supervised).as_mut() {
                supervisor.shutdown();
            }
            Ok(())
        })
        .map_err(|_| majordome_client::ClientError::Closed)?;
    let handler = domogik_handler(move |message: Message| match message.action.as_str() {
        action @ ("plugin.start.do" | "plugin.stop.do") => {
            let host = lock(&registry).host().to_owned();
            let text = |field: &str| {
                message
                    .data
                    .get(field)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            };
            let Some(name) = text("name").or_else(|| text("id")) else {
                return Message::failure(action, format!("{action} needs 'name' (or 'id'), e.g. fake"));
            };
            let kind = text("type").unwrap_or("plugin");
            if text("host").is_some_and(|h| h != host) {
                return Message::failure(
                    action,
                    format!(
                        "this manager runs plugins on {host} only, not on {}",
                        text("host").unwrap_or_default()
                    ),
                );
            }
            let service = client_id(kind, name, &host);
            let outcome = match lock(&supervisor).as_mut() {
                None => Err("this manager does not supervise plugins".to_owned()),
                Some(s) if action == "plugin.start.do" => s.start(kind, name),
                Some(s) => s.stop(kind, name, &service),
            };
            match outcome {
                Ok(report) => {
                    lock(&registry).on_supervisor(&report, Instant::now());
                    Message::new(
                        majordome_mdp::domogik::result_action(action),
                        json!({"status": true, "reason": "", "id": service, "comment": report.comment}),
                    )
                }
                Err(why) => Message::failure(action, why),
            }
        }
        _ => lock(&registry).handle(&message),
    });
    let served = Worker::new(broker, "manager", WorkerOptions::default()).run(handler, shutdown);
    let followed = follower.join().unwrap_or(Err(majordome_client::ClientError::Closed));
    served.and(followed)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ManagerSettings {
        ManagerSettings {
            dead_after: Duration::from_secs(30),
            history_limit: 3,
            host: "box".into(),
        }
    }

    #[test]
    fn statuses_come_from_events_and_silence_makes_a_client_dead() {
        let manifest = Manifest::parse(r#"{"name": "fake", "version": "1", "device_types": ["switch"]}"#).unwrap();
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
        assert_eq!(statuses, ["alive", "stop-request", "stopped"]);
    }

    #[test]
    fn actions_in_both_spellings_and_clear_errors() {
        let manifest =
            Manifest::parse(r#"{"name": "fake", "version": "2", "device_types": ["switch", "dimmer"]}"#).unwrap();
        let registry = Registry::new(vec![manifest], settings());
        for action in ["client.list.get", "clients.list.get"] {
            let reply = registry.handle(&Message::new(action, json!({})));
            assert!(reply.action.ends_with(".list.result"));
            assert_eq!(reply.data["clients"]["plugin-fake.box"]["id"], "fake");
        }
        let detail = registry.handle(&Message::new("clients.detail.get", json!({"id": "plugin-fake.box"})));
        assert_eq!(detail.data["clients"]["plugin-fake.box"]["data"]["version"], "2");
        let missing = registry.handle(&Message::new("client.detail.get", json!({"id": "nope"})));
        assert_eq!(missing.status(), Some(false));
        let types = registry.handle(&Message::new("device_types.get", json!({})));
        assert_eq!(types.data["device_types"]["fake"], json!(["switch", "dimmer"]));
        let unknown = registry.handle(&Message::new("plugin.frob.do", json!({})));
        assert_eq!(unknown.action, "plugin.frob.result");
        assert!(unknown.reason().unwrap().contains("unknown action"));
    }
}
