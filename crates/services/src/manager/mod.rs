//! The manager (service `manager`): which clients (plugins, core parts)
//! exist and whether they are alive, and the plugins of this host run as
//! supervised child processes.
//!
//! Statuses are Domogik's: unknown, starting, not-configured, alive,
//! stop-request, stopped, dead, invalid. They come from the
//! `plugin.status` events every client publishes (on start, then every
//! 15 s; the plugins this manager starts, every third of `dead_after`, at
//! most 15 s, so three can be missed), from the supervisor (`supervisor.rs`) for the plugins it runs,
//! and from silence: a client not heard from for `dead_after` (30 s) while
//! it should be running becomes dead. Every status change is kept in the
//! `client_history` table of the one database (the last `history_limit`
//! per client), so statuses and their history survive a restart.
//! `configured` comes from the config service: asked once per manifest at
//! start, then followed through `plugin.configuration` events.
//!
//! Actions: `client.list.get`, `client.detail.get` (also the seed's
//! `clients.*` spellings), `client.history.get`, `package.detail.get`,
//! `device_types.get`, `plugin.start.do`, `plugin.stop.do`,
//! `plugin.log.get` (the end of a plugin's output). Every change is
//! published as `client.list` and `client.detail`.

//!
//! The modules: `registry` (the clients: a pure model, no socket, no
//! clock), `store` (the `client_history` table), `config_asker` (asking
//! the config service at start), and here the threads that run them.

mod config_asker;
mod registry;
mod store;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use majordome_api::manager::{ManagerRequest, PluginTarget};
use majordome_api::PluginStatus;
use majordome_client::{domogik_handler, ClientError, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions};
use majordome_store::StoreError;
use serde_json::json;

use crate::lock;
use crate::supervisor::{self, SupervisorHandle, SupervisorSettings};
use config_asker::ConfigAsker;
pub use registry::{client_id, Registry};
pub use store::HistoryRow;

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
    /// How often the supervisor looks for children that exited (250 ms).
    #[serde(with = "majordome_net::duration_text")]
    pub reap_interval: Duration,
    /// The most a plugin's log (`<data>/logs/<type>-<name>.log`) holds
    /// (8 MiB); past it, it moves to `<…>.log.1` and starts again.
    pub max_log_bytes: u64,
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
            reap_interval: Duration::from_millis(250),
            max_log_bytes: 8 * 1024 * 1024,
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
            max_log_bytes: self.max_log_bytes,
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
#[derive(Clone)]
pub struct ManagerEndpoints {
    /// The broker (`MAJORDOME_BROKER`).
    pub broker: String,
    /// The forwarder's side publishers connect to (`MAJORDOME_PUBLISH`).
    pub publish: String,
    /// The forwarder's side subscribers connect to (`MAJORDOME_SUBSCRIBE`).
    pub subscribe: String,
    /// Where the manager itself reaches the broker, when not at `broker`
    /// (the hub's `inproc://` endpoint: plugins are other processes and
    /// are told `broker`).
    pub local_broker: Option<String>,
    /// When the hub's listeners ask for logins: where each plugin's
    /// secret is made (for its client id, at each start, given to it with
    /// the endpoints as `MAJORDOME_USER` and `MAJORDOME_PASSWORD`) and
    /// forgotten (when it exits).
    pub logins: Option<Arc<majordome_access::Credentials>>,
}

impl ManagerEndpoints {
    /// The broker, as the manager itself reaches it.
    fn own_broker(&self) -> &str {
        self.local_broker.as_deref().unwrap_or(&self.broker)
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
        broker: endpoints.own_broker().to_owned(),
        environment,
        log_dir: PathBuf::from(log_dir),
        logins: endpoints.logins.clone(),
    };
    let (reports, reported) = mpsc::channel();
    take(&registry).follow(reported);
    let (supervisor, supervisor_thread) =
        supervisor::start(&manifests, settings.supervisor(), wiring, reports, shutdown)?;

    let (shared, stop, told) = (registry.clone(), shutdown.clone(), supervisor.clone());
    let mut asker = ConfigAsker::new(&take(&registry), endpoints.own_broker(), Instant::now());
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
                    // Exactly: the subscription is a prefix, and a longer
                    // category is something else.
                    Some(e) if e.category != "plugin.status" => {}
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
    let log_dir = PathBuf::from(log_dir);
    let handler = domogik_handler(move |message: Message| match ManagerRequest::parse(&message) {
        Ok(ManagerRequest::PluginStart(target) | ManagerRequest::PluginStop(target)) => {
            supervise(&shared, &supervisor, &message.action, &target)
        }
        Ok(ManagerRequest::PluginLog { target, lines }) => {
            let checked = take(&shared).check_target(&target);
            match checked {
                Ok((kind, name)) => match supervisor::log_tail(&supervisor::log_path(&log_dir, &kind, &name), lines) {
                    Ok(tail) => Message::new(
                        "plugin.log.result",
                        json!({"status": true, "reason": "", "type": kind, "name": name, "lines": tail}),
                    ),
                    Err(reason) => Message::failure(&message.action, reason),
                },
                Err(reason) => Message::failure(&message.action, reason),
            }
        }
        Ok(request) => take(&shared).answer(&message.action, request),
        Err(e) => Message::failure(&message.action, e.to_string()),
    });
    // One handler thread (the registry is one lock anyway); the broker may
    // hand it a few requests at once, which then wait here, not there.
    let options = WorkerOptions {
        capacity: 4,
        ..WorkerOptions::default()
    };
    let served = Worker::new(endpoints.own_broker(), "manager", options).run(handler, shutdown);

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
