//! The whole hub: the only code that knows every part. [`HubConfig`] holds
//! every setting with its default (read from `majordome.toml`, overridden by
//! flags: [`config`]); [`Hub::start`] binds and starts the parts it names,
//! each on its own thread, and returns their endpoints, a shutdown handle
//! and a join. `majordome up`, the single-part commands (`broker`,
//! `forwarder`, `state serve`, `titanic serve`), the integration tests and
//! the bench all start the hub through it.
//!
//! The hub is all or nothing: a part that ends before the hub is told to
//! stop (an error, a panic, or returning at all) stops every part, and
//! [`Hub::join`] names it. Supervised plugins are not parts: the manager
//! restarts them.

mod backups;
pub mod config;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use majordome_access::{Credentials, Loopback, Owners, HUB_IDENTITY};
use majordome_broker::Broker;
use majordome_client::{domogik_handler, Bytes, Message, Worker, WorkerOptions};
use majordome_events::Forwarder;
use majordome_mdp::domogik;
use majordome_net::{zap, Shutdown};
use majordome_services::history::HistoryCounters;
use majordome_services::manager::{ManagerEndpoints, Registry};
use majordome_services::{ConfigService, DeviceEndpoints, DeviceService, HistoryService, Manifest, Schema};

pub use config::{ConfigError, HubConfig, Loaded, Override, Parts, Security, Source};

/// Set to a part's name, that part fails as it starts: how the tests check
/// that one failing part stops the whole hub.
pub const FAIL_PART_FOR_TESTS: &str = "MAJORDOME_TEST_FAIL_PART";

/// What any part's failure is, for the message that names it.
type PartError = Box<dyn std::error::Error + Send + Sync>;

/// Why the hub could not start, or why it stopped.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot start the {part} part: {why}")]
    Start { part: &'static str, why: String },
    #[error("cannot start the {part} thread: {source}")]
    Thread { part: &'static str, source: std::io::Error },
    /// A part that ended before the hub was told to stop, the first one.
    #[error("the {part} part stopped ({why}), so majordome stopped")]
    PartStopped { part: &'static str, why: String },
    #[error("{0}")]
    Config(String),
    /// The database did not check out; nothing was started.
    #[error("{0}")]
    Damaged(String),
    /// Another process holds the data folder in a way that excludes this one.
    #[error("{0}")]
    DataFolder(String),
}

fn start_error(part: &'static str, why: impl std::fmt::Display) -> HubError {
    HubError::Start {
        part,
        why: why.to_string(),
    }
}

/// The service names of the parts in `parts` that serve on the broker:
/// in a hub that runs them, nobody else may serve them (a peer that
/// registered `config` would get every `config.set`).
fn own_services(parts: &Parts) -> Vec<String> {
    let mut names: Vec<&str> = Vec::new();
    if parts.config {
        names.extend(majordome_services::SERVICE_NAMES);
    }
    if parts.manager {
        names.push("manager");
    }
    if parts.devices {
        names.push("devices");
    }
    if parts.history {
        names.push("history");
    }
    if parts.titanic {
        names.extend(majordome_titanic::SERVICES);
    }
    if parts.stats && parts.events {
        names.push("events");
    }
    if parts.stats && parts.state {
        names.push("state");
    }
    if parts.scenario {
        names.push("scenario");
    }
    names.into_iter().map(str::to_owned).collect()
}

/// The message for a database that did not check out: what is wrong, that
/// nothing was changed, and the way back.
fn damaged(data: &std::path::Path, database: &std::path::Path, damage: &majordome_store::check::Damage) -> HubError {
    let folder = majordome_store::backup::folder(data);
    let way_back = match majordome_store::backup::list(&folder).last() {
        Some(latest) => format!(
            "To go back to the latest backup, run `majordome restore {}` (the damaged files are kept beside the \
             database), then start again.",
            latest.display()
        ),
        None => match damage {
            majordome_store::check::Damage::Wal { wal, .. } => format!(
                "There is no backup in {}. Keep a copy of the damaged files; to start from what is still \
                 readable, move {} aside (what follows the damage is then lost) and start again.",
                folder.display(),
                wal.display()
            ),
            _ => format!(
                "There is no backup in {}. Keep a copy of the damaged files; SQLite's `sqlite3 {} .recover` \
                 salvages what it can into a new database.",
                folder.display(),
                database.display()
            ),
        },
    };
    HubError::Damaged(format!(
        "the database {} is damaged: {damage}. Nothing was started or changed. {way_back}",
        database.display()
    ))
}

/// Where the hub's parts can be reached (bound ports, not port 0).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub broker: String,
    /// Where publishers connect.
    pub publish: String,
    /// Where subscribers connect.
    pub subscribe: String,
    /// The Clone server's three sockets.
    pub state: majordome_state::Endpoints,
    /// The database file.
    pub database: PathBuf,
    /// Where the HTTP gateway listens (`None`: it does not run here).
    pub http: Option<std::net::SocketAddr>,
}

/// What the manager found to run, for the banner of `up`.
#[derive(Debug, Clone, Default)]
pub struct PluginSummary {
    /// Manifests read from the folder.
    pub from_folder: usize,
    /// Shipped manifests added (those the folder did not override).
    pub shipped: usize,
    /// The plugins that start on their own.
    pub autostarted: Vec<String>,
}

/// Counters of the parts, for whoever reports them (the bench).
#[derive(Clone, Default)]
pub struct Counters {
    pub history: Option<Arc<HistoryCounters>>,
    pub history_commits: Option<Arc<majordome_store::CommitStats>>,
    pub titanic_commits: Option<Arc<majordome_store::CommitStats>>,
}

/// A running hub.
pub struct Hub {
    endpoints: Endpoints,
    shutdown: Shutdown,
    threads: Vec<(&'static str, JoinHandle<()>)>,
    failures: Failures,
    plugins: PluginSummary,
    counters: Counters,
    /// Where this process's parts reach the broker: its `inproc://`
    /// endpoint when it runs here, else `endpoints.broker`.
    local_broker: String,
    /// Held while parts that use the database run: a restore waits for it.
    _data_lock: Option<majordome_store::backup::DataLock>,
    /// The `backup` part (database, data folder, settings), run by `join`.
    backups: Option<(PathBuf, PathBuf, config::Backup)>,
    /// The endpoints this process's own clients log in to (forgotten at
    /// the end).
    logins: Vec<String>,
}

impl Hub {
    /// Binds and starts every part that `config.parts` names, each on its
    /// own thread, stopping when `shutdown` is triggered (by a signal, the
    /// caller, or a part that failed). Nothing is started for a
    /// configuration that cannot work; a part that cannot start stops the
    /// ones already started.
    pub fn start(config: &HubConfig, shutdown: &Shutdown) -> Result<Hub, HubError> {
        let mut hub = Hub {
            endpoints: Endpoints {
                broker: config.listen.broker.clone(),
                publish: config.listen.publish.clone(),
                subscribe: config.listen.subscribe.clone(),
                state: state_endpoints(config)?,
                database: majordome_store::database_path(&config.data),
                http: None,
            },
            shutdown: shutdown.clone(),
            threads: Vec::new(),
            failures: Failures::default(),
            plugins: PluginSummary::default(),
            counters: Counters::default(),
            local_broker: config.listen.broker.clone(),
            _data_lock: None,
            backups: None,
            logins: Vec::new(),
        };
        match hub.start_parts(config) {
            Ok(()) => Ok(hub),
            Err(e) => {
                hub.shutdown.trigger();
                for endpoint in &hub.logins {
                    zap::unshare_login(endpoint);
                }
                for (_, thread) in hub.threads.drain(..) {
                    let _ = thread.join();
                }
                // A part that failed while the others started is the cause
                // (the later ones found it gone).
                match hub.failures.first() {
                    Some((part, why)) => Err(HubError::PartStopped { part, why }),
                    None => Err(e),
                }
            }
        }
    }

    fn start_parts(&mut self, config: &HubConfig) -> Result<(), HubError> {
        let parts = config.parts;
        let database = self.endpoints.database.clone();
        let durability = config.durability;
        let network = config.listen.network_endpoints(&parts);
        let open_network = !network.is_empty() && config.listen.allow_network_without_credentials;
        let authenticated = config.security.loopback == Loopback::Authenticated;
        // Every listener asks for a login, or none does: a client cannot
        // tell which kind it reaches, and the hub's plugins are given one
        // set of endpoints.
        let logins = authenticated || (!network.is_empty() && !open_network);
        let credentials = Arc::new(Credentials::new(&config.data));
        if let Some(first) = network.first() {
            if open_network {
                tracing::warn!(
                    endpoints = ?network,
                    "listening on the network WITHOUT logins or encryption \
                     (allow_network_without_credentials): anyone who reaches these ports can do anything"
                );
            } else if !credentials.has_users() {
                return Err(HubError::Config(format!(
                    "refusing to listen on {first}: it reaches beyond this machine, and nobody could log in: \
                     there is no user in {}. Make one with `majordome user add NAME` (its clients then log in \
                     with MAJORDOME_USER and MAJORDOME_PASSWORD), or listen on 127.0.0.1 (the default). For old \
                     peers that cannot log in, on a network you trust entirely, \
                     allow_network_without_credentials = true under [listen] lets anyone in",
                    majordome_access::Users::path(&config.data).display()
                )));
            } else {
                tracing::warn!(
                    endpoints = ?network,
                    "listening on the network: clients log in with a user name and password (PLAIN), which, \
                     like all the traffic, travel NOT encrypted (this libzmq has no CURVE)"
                );
            }
        }
        if parts.broker && !logins && config.listen.broker.starts_with("ipc://") {
            return Err(HubError::Config(format!(
                "the broker cannot listen on {} without logins: libzmq gives an ipc:// peer no address, so it \
                 could not tell the hub's own workers from anyone's. Listen on tcp://127.0.0.1:PORT, or set \
                 loopback = \"authenticated\" under [security]",
                config.listen.broker
            )));
        }
        let policy = Arc::new(config.permissions.clone());
        // The secret of this process's own clients, made before any login
        // can be checked.
        let hub_secret = logins.then(|| credentials.issue(HUB_IDENTITY));
        let mut zap = logins.then(|| {
            let (credentials, policy) = (credentials.clone(), policy.clone());
            zap::Handler::new(Arc::new(move |domain: &str, user: &str, password: &[u8]| {
                if !credentials.verify(user, password) {
                    return Err("wrong user name or password".to_owned());
                }
                if domain == zap::UPDATES_DOMAIN {
                    // Updates reach every subscriber alike.
                    let who = majordome_access::Who::of(false, Some(user));
                    return policy.may_follow_all(who).map_err(|denied| {
                        format!("{denied}: the Clone updates are for identities that may read every key")
                    });
                }
                Ok(())
            }))
        });
        if logins {
            // A misspelt table restricts nobody: say so.
            for name in policy.tables() {
                let known = name == majordome_access::policy::ANYONE
                    || majordome_access::is_plugin_identity(name)
                    || credentials.knows(name);
                if !known {
                    tracing::warn!(
                        "[permissions.{name}] in the configuration names nobody: there is no user '{name}' in {}",
                        majordome_access::Users::path(&config.data).display()
                    );
                }
            }
        }
        let owners = Arc::new(Owners::default());
        if parts.use_database() {
            // Before anything opens it: SQLite would quietly drop what
            // follows a damaged frame of the log, for good.
            self._data_lock = Some(
                majordome_store::backup::DataLock::shared(&config.data)
                    .map_err(|e| HubError::DataFolder(e.to_string()))?,
            );
            majordome_store::check::check(&database).map_err(|damage| damaged(&config.data, &database, &damage))?;
        }
        if parts.broker {
            let settings = majordome_broker::Settings {
                in_process_only: own_services(&parts),
                caller_frame_for: if parts.titanic {
                    majordome_titanic::SERVICES.iter().map(|s| s.to_string()).collect()
                } else {
                    Vec::new()
                },
                ..config.broker.clone()
            };
            let mut broker = Broker::bind_with(&config.listen.broker, settings, zap.as_mut())
                .map_err(|e| start_error("broker", e))?;
            broker.set_policy(policy.clone());
            self.endpoints.broker = broker.endpoint().to_owned();
            // The parts of this process reach it in-process.
            self.local_broker = broker.bind_inproc().map_err(|e| start_error("broker", e))?;
            self.spawn("broker", move |stop| Ok(broker.run(stop)?))?;
        } else {
            self.needs_port(
                "broker",
                &config.listen.broker,
                parts.titanic || parts.config || parts.manager,
            )?;
        }
        if parts.events {
            let mut forwarder = Forwarder::bind_with(
                &config.listen.publish,
                &config.listen.subscribe,
                config.events.clone(),
                zap.as_mut(),
            )
            .map_err(|e| start_error("forwarder", e))?;
            forwarder.set_access(policy.clone(), owners.clone());
            self.endpoints.publish = forwarder.publisher_endpoint().to_owned();
            self.endpoints.subscribe = forwarder.subscriber_endpoint().to_owned();
            let counters = forwarder.counters();
            self.spawn("forwarder", move |stop| Ok(forwarder.run(stop)?))?;
            if parts.stats {
                let at = self.local_broker.clone();
                self.spawn("events-stats", move |stop| {
                    stats_service(&at, "events", stop, move || serde_json::to_value(counters.snapshot()))
                })?;
            }
        } else {
            let needed = parts.config || parts.manager || parts.devices;
            self.needs_port("events", &config.listen.publish, needed)?;
            self.needs_port("events", &config.listen.subscribe, needed)?;
        }
        if parts.state {
            let mut state = majordome_state::Server::bind_with(
                &config.listen.state,
                &database,
                majordome_state::Settings {
                    durability,
                    ..config.state.clone()
                },
                zap.as_mut(),
            )
            .map_err(|e| start_error("state", e))?;
            state.set_policy(policy.clone());
            self.endpoints.state = state.endpoints().clone();
            let counters = state.counters();
            self.spawn("state", move |stop| Ok(state.run(stop)?))?;
            if parts.stats {
                let at = self.local_broker.clone();
                self.spawn("state-stats", move |stop| {
                    stats_service(&at, "state", stop, move || serde_json::to_value(counters.snapshot()))
                })?;
            }
        }
        if let Some(handler) = zap.take().filter(zap::Handler::is_attached) {
            // The listeners are bound; logins wait in the handler's
            // sockets until this thread answers them.
            self.spawn("zap", move |stop| Ok(handler.run(stop)?))?;
        }
        // This process's own clients (the Clone mirror of the devices, the
        // manager's and config's publishers) log in as the hub to the
        // listeners of this process that ask for it, and to none otherwise
        // (whatever MAJORDOME_USER says); a part elsewhere is not told the
        // hub's secret.
        let state = &self.endpoints.state;
        let mine = [
            (parts.broker, &self.endpoints.broker),
            (parts.events, &self.endpoints.publish),
            (parts.events, &self.endpoints.subscribe),
            (parts.state, &state.snapshot),
            (parts.state, &state.updates),
            (parts.state, &state.collector),
        ];
        for (here, endpoint) in mine {
            if here && !endpoint.is_empty() {
                match &hub_secret {
                    Some(secret) => zap::share_login(endpoint, HUB_IDENTITY, secret),
                    None => zap::share_no_login(endpoint),
                }
                self.logins.push(endpoint.clone());
            }
        }
        if parts.titanic {
            let titanic = majordome_titanic::Titanic::start(
                &self.local_broker,
                &database,
                majordome_titanic::Settings {
                    durability,
                    // The broker of this hub says who calls.
                    callers: parts.broker,
                    policy: policy.clone(),
                    ..config.titanic.clone()
                },
            )
            .map_err(|e| start_error("titanic", e))?;
            self.counters.titanic_commits = Some(titanic.commit_stats());
            self.spawn("titanic", move |stop| Ok(titanic.run(stop)?))?;
        }
        let manifests = if parts.config || parts.manager || parts.devices {
            self.manifests(config)?
        } else {
            Vec::new()
        };
        if parts.config {
            let service =
                ConfigService::open(&database, manifests.clone(), durability).map_err(|e| start_error("config", e))?;
            let (at, publish) = (self.local_broker.clone(), self.endpoints.publish.clone());
            self.spawn("config", move |stop| Ok(service.run(&at, Some(&publish), stop)?))?;
        }
        if parts.manager {
            self.start_manager(config, manifests.clone(), logins.then(|| credentials.clone()))?;
        }
        if parts.devices || parts.history {
            self.start_devices(config, &manifests, owners)?;
        }
        if parts.backup && config.backup.keep > 0 {
            // No thread of its own: the one that waits in `join` makes them.
            self.backups = Some((database.clone(), config.data.clone(), config.backup.clone()));
        }
        if parts.scenario {
            self.start_scenario(config)?;
        }
        if parts.gateway {
            self.start_gateway(config, policy.clone())?;
        }
        if parts.echo {
            let at = self.local_broker.clone();
            self.spawn("echo", move |stop| {
                // Echoing is quick: answered on the socket thread, and the
                // broker may keep several requests in flight to it, which
                // saves wake-ups.
                let options = WorkerOptions {
                    capacity: 16,
                    ..WorkerOptions::default()
                };
                Ok(Worker::new(&at, "echo", options).run_inline(echo_body(Duration::ZERO), stop)?)
            })?;
        }
        Ok(())
    }

    /// The HTTP gateway, a client of the broker like any other. Clients
    /// without a token are local clients only on a loopback-only gateway
    /// of a hub that trusts loopback; beyond loopback it needs tokens.
    fn start_gateway(&mut self, config: &HubConfig, policy: Arc<majordome_access::Policy>) -> Result<(), HubError> {
        let bind = &config.http.bind;
        let host = bind.rsplit_once(':').map_or(bind.as_str(), |(host, _)| host);
        let local = config::is_local(&format!("tcp://{host}:0"));
        let tokens = majordome_access::tokens::TokenCheck::new(&config.data);
        if !local && !tokens.any() {
            return Err(HubError::Config(format!(
                "refusing to serve HTTP on {bind}: it reaches beyond this machine, and nobody has a token. Make \
                 one with `majordome token create NAME` (clients send `Authorization: Bearer <token>`; plain \
                 HTTP is not encrypted), or serve it on 127.0.0.1 (the default)"
            )));
        }
        let access = majordome_gateway::Access {
            tokens,
            policy,
            anonymous: local && config.http.anonymous_loopback && config.security.loopback == Loopback::Trusted,
        };
        self.needs_port("gateway", &config.listen.broker, !config.parts.broker)?;
        self.needs_port("gateway", &config.listen.subscribe, !config.parts.events)?;
        let state = &self.endpoints.state.snapshot;
        let wiring = majordome_gateway::Wiring {
            broker: self.local_broker.clone(),
            subscribe: self.endpoints.subscribe.clone(),
            state: (config.parts.state || !state.ends_with(":0")).then(|| state.clone()),
            host: config.manager.host.clone(),
        };
        let gateway = majordome_gateway::Gateway::bind(wiring, config.http.clone(), access)
            .map_err(|e| start_error("gateway", e))?;
        self.endpoints.http = Some(gateway.address());
        self.spawn("gateway", move |stop| Ok(gateway.run(stop)?))
    }

    /// A part that runs elsewhere must be found at a real port.
    fn needs_port(&self, part: &'static str, endpoint: &str, needed: bool) -> Result<(), HubError> {
        if needed && endpoint.ends_with(":0") {
            return Err(HubError::Config(format!(
                "the {part} part does not run here, and {endpoint} is no address to find it at: \
                 give its real endpoint under [listen]"
            )));
        }
        Ok(())
    }

    /// The manifests of the folder, plus the shipped ones it does not
    /// override; autostart off when the configuration says so.
    fn manifests(&mut self, config: &HubConfig) -> Result<Vec<Manifest>, HubError> {
        let mut loaded = majordome_services::load_folder(&config.plugins.folder);
        for (path, why) in &loaded.invalid {
            tracing::warn!(path = %path.display(), "ignored an invalid plugin manifest: {why}");
        }
        let from_folder = loaded.manifests.len();
        for (name, text) in majordome_plugin::builtin_manifests() {
            if !loaded.manifests.iter().any(|m| m.name == *name) {
                let manifest = Manifest::parse(text).map_err(|e| HubError::Start {
                    part: "manager",
                    why: format!("the shipped manifest of '{name}' is invalid: {e}"),
                })?;
                loaded.manifests.push(manifest);
            }
        }
        if !config.plugins.autostart {
            for manifest in &mut loaded.manifests {
                manifest.autostart = false;
            }
        }
        self.plugins = PluginSummary {
            from_folder,
            shipped: loaded.manifests.len() - from_folder,
            autostarted: loaded
                .manifests
                .iter()
                .filter(|m| m.autostart && !m.command.is_empty())
                .map(|m| m.name.clone())
                .collect(),
        };
        Ok(loaded.manifests)
    }

    fn start_manager(
        &mut self,
        config: &HubConfig,
        manifests: Vec<Manifest>,
        logins: Option<Arc<Credentials>>,
    ) -> Result<(), HubError> {
        let dead_after = config.manager.dead_after;
        let mut settings = config.manager.clone();
        // Plugins we start speak often enough never to look dead.
        settings.plugin_environment.push((
            "MAJORDOME_STATUS_INTERVAL".into(),
            (dead_after.as_secs_f64() / 3.0).min(15.0).to_string(),
        ));
        let registry = Registry::open(manifests, settings, &self.endpoints.database, config.durability)
            .map_err(|e| start_error("manager", e))?;
        // Each plugin the manager starts writes its output here.
        let log_dir = config.data.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|e| HubError::Start {
            part: "manager",
            why: format!("cannot create the plugin log folder {}: {e}", log_dir.display()),
        })?;
        let endpoints = ManagerEndpoints {
            broker: self.endpoints.broker.clone(),
            publish: self.endpoints.publish.clone(),
            subscribe: self.endpoints.subscribe.clone(),
            local_broker: Some(self.local_broker.clone()),
            logins,
        };
        self.spawn("manager", move |stop| {
            Ok(majordome_services::manager::run(registry, &endpoints, &log_dir, stop)?)
        })
    }

    /// The scenario service: it follows events and every Clone key, and
    /// acts through the device service and the bus.
    fn start_scenario(&mut self, config: &HubConfig) -> Result<(), HubError> {
        self.needs_port("scenario", &config.listen.state, !config.parts.state)?;
        let endpoints = majordome_scenario::Endpoints {
            broker: self.local_broker.clone(),
            publish: self.endpoints.publish.clone(),
            subscribe: self.endpoints.subscribe.clone(),
            state: self.endpoints.state.snapshot.clone(),
            host: config.manager.host.clone(),
        };
        let (settings, database, durability) = (
            config.scenario.clone(),
            self.endpoints.database.clone(),
            config.durability,
        );
        self.spawn("scenario", move |stop| {
            Ok(majordome_scenario::run(
                settings, &database, durability, endpoints, stop,
            )?)
        })
    }

    /// The device service and the history it feeds, in the same database.
    /// Started once the Clone server runs: the service writes values there.
    fn start_devices(
        &mut self,
        config: &HubConfig,
        manifests: &[Manifest],
        owners: Arc<Owners>,
    ) -> Result<(), HubError> {
        let database = self.endpoints.database.clone();
        let mut history_counters = Arc::new(HistoryCounters::default());
        if config.parts.devices {
            let (schema, rejected) = Schema::shipped().with_manifests(manifests);
            for (plugin, why) in rejected {
                tracing::warn!(plugin, "ignored a device type from a manifest: {why}");
            }
            let state = (config.parts.state || !config.listen.state.ends_with(":0"))
                .then(|| self.endpoints.state.snapshot.clone());
            let devices = DeviceService::open(
                &database,
                schema,
                config.durability,
                config.devices.clone(),
                &config.history,
                DeviceEndpoints {
                    broker: self.local_broker.clone(),
                    publish: self.endpoints.publish.clone(),
                    subscribe: self.endpoints.subscribe.clone(),
                    state,
                },
            )
            .map_err(|e| start_error("devices", e))?;
            devices.share_owners(owners);
            history_counters = devices.history_counters();
            self.counters.history = Some(history_counters.clone());
            self.counters.history_commits = Some(devices.history_commit_stats());
            self.spawn("devices", move |stop| Ok(devices.run(stop)?))?;
        }
        if config.parts.history {
            let history = HistoryService::new(&database, config.history.clone(), history_counters);
            let at = self.local_broker.clone();
            self.spawn("history", move |stop| Ok(history.run(&at, stop)?))?;
        }
        Ok(())
    }

    /// Runs a part on its own thread. A part that ends before the hub is
    /// told to stop (an error, or returning at all) stops the whole hub:
    /// half a hub would look alive while it is not.
    fn spawn<F>(&mut self, name: &'static str, run: F) -> Result<(), HubError>
    where
        F: FnOnce(&Shutdown) -> Result<(), PartError> + Send + 'static,
    {
        let (stop, failures) = (self.shutdown.clone(), self.failures.clone());
        let fail_on_purpose = std::env::var(FAIL_PART_FOR_TESTS).is_ok_and(|part| part == name);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let outcome = if fail_on_purpose {
                    Err(format!("failed on purpose: {FAIL_PART_FOR_TESTS}={name}").into())
                } else {
                    run(&stop)
                };
                if stop.is_triggered() && outcome.is_ok() {
                    return;
                }
                let why = match outcome {
                    Ok(()) => "it ended on its own".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(part = name, "{why}; stopping majordome");
                failures.record(name, why);
                stop.trigger();
            })
            .map_err(|source| HubError::Thread { part: name, source })?;
        self.threads.push((name, thread));
        Ok(())
    }

    /// Where the parts can be reached.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The plugins the manager knows (empty when it does not run here).
    pub fn plugins(&self) -> &PluginSummary {
        &self.plugins
    }

    /// The parts' counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Triggering it stops every part.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Waits until the hub is told to stop (or a part fails), then for
    /// every part to end. Names the first part that stopped on its own.
    /// Meanwhile it runs the `backup` part, if the hub has it: a hub that
    /// is only ever `stop`ped makes no scheduled backups.
    pub fn join(self) -> Result<(), HubError> {
        match &self.backups {
            // The `backup` part runs here, on the thread that waits anyway.
            Some((database, data, settings)) => backups::run(database, data, settings, &self.shutdown),
            None => self.shutdown.wait(),
        }
        self.join_parts()
    }

    /// Stops every part and waits for them.
    pub fn stop(self) -> Result<(), HubError> {
        self.shutdown.trigger();
        self.join_parts()
    }

    fn join_parts(self) -> Result<(), HubError> {
        for endpoint in &self.logins {
            zap::unshare_login(endpoint);
        }
        for (name, thread) in self.threads {
            // A part's own failure is in `failures`; a panic has no other
            // trace.
            if thread.join().is_err() {
                self.failures.record(name, "panicked".into());
            }
            tracing::debug!(part = name, "stopped");
        }
        match self.failures.first() {
            Some((part, why)) => Err(HubError::PartStopped { part, why }),
            None => Ok(()),
        }
    }
}

/// The Clone server's endpoints as configured; those of a server on port 0
/// are known once it is bound.
fn state_endpoints(config: &HubConfig) -> Result<majordome_state::Endpoints, HubError> {
    if config.listen.state.ends_with(":0") {
        return Ok(majordome_state::Endpoints {
            snapshot: config.listen.state.clone(),
            updates: String::new(),
            collector: String::new(),
        });
    }
    majordome_state::Endpoints::from_base(&config.listen.state)
        .map_err(|e| HubError::Config(format!("listen.state: {e}")))
}

/// The parts that stopped before they were asked to, with why, first
/// first.
#[derive(Clone, Default)]
struct Failures(Arc<Mutex<Vec<(&'static str, String)>>>);

impl Failures {
    fn record(&self, name: &'static str, why: String) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push((name, why));
    }

    fn first(&self) -> Option<(&'static str, String)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).first().cloned()
    }
}

/// Serves `service` at `broker`, answering `stats.get` with `snapshot()`,
/// until `shutdown`.
fn stats_service<F>(broker: &str, service: &'static str, shutdown: &Shutdown, snapshot: F) -> Result<(), PartError>
where
    F: Fn() -> serde_json::Result<serde_json::Value> + Send + 'static,
{
    let handler = domogik_handler(move |message: Message| match message.action.as_str() {
        "stats.get" => Message::new("stats.result", snapshot().unwrap_or_default()),
        other => Message::failure(
            other,
            format!("unknown action '{other}': the {service} service answers stats.get"),
        ),
    });
    // Reading counters is quick: answered on the socket thread, several in
    // flight at once.
    let options = WorkerOptions {
        capacity: 16,
        ..WorkerOptions::default()
    };
    Ok(Worker::new(broker, service, options).run_inline(handler, shutdown)?)
}

/// The echo service's handler: a Domogik request `x.get` is answered as
/// `x.result` with the same data; any other body is sent back as it came,
/// after `delay`.
pub fn echo_body(delay: Duration) -> impl FnMut(Vec<Bytes>) -> Vec<Bytes> + Send + 'static {
    let mut domogik =
        domogik_handler(|message: Message| Message::new(domogik::result_action(&message.action), message.data));
    move |body| {
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        if domogik::dialect_action(&body).is_some() {
            domogik(body)
        } else {
            body
        }
    }
}
