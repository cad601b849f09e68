//! Command-line arguments.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use majordome_broker::Settings;

/// The default request/reply endpoint: Domogik's port, so its plugins find us.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:40410";

/// majordome: message bus and service hub for home automation.
#[derive(Debug, Parser)]
#[command(name = "majordome", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything: the broker and the built-in services.
    Up {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        events: EventArgs,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Run only the event forwarder (Domogik pub/sub: XSUB/XPUB).
    Forwarder {
        #[command(flatten)]
        events: EventArgs,
    },
    /// Publish one event: `pub CATEGORY JSON`, as Domogik's publishers do.
    Pub {
        /// Category, e.g. `plugin.status`.
        category: String,
        /// The event's JSON.
        json: String,
        /// Where publishers connect.
        #[arg(long, default_value = DEFAULT_PUBLISH)]
        endpoint: String,
        /// Seconds to wait for a subscriber that wants the category.
        #[arg(long, default_value_t = 2.0)]
        wait: f64,
    },
    /// Print events as they come, one line each: time, category, JSON.
    Sub {
        /// Prefixes of the event id to subscribe to (categories); none: all.
        prefixes: Vec<String>,
        /// Where subscribers connect.
        #[arg(long, default_value = DEFAULT_SUBSCRIBE)]
        endpoint: String,
        /// One JSON object per line: {"id", "category", "data"}.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Run only the broker (MDP/0.1 + MMI + the Domogik dialect).
    Broker {
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Send one request and print the reply.
    ///
    /// By default in the Domogik dialect: `call SERVICE ACTION [JSON]`.
    /// With --raw, the arguments after SERVICE are sent as plain MDP body
    /// frames and the reply's frames are printed one per line.
    Call {
        /// Service to call, e.g. `manager`, `echo`, `mmi.services`.
        service: String,
        /// ACTION and optional JSON object; with --raw, the body frames.
        args: Vec<String>,
        /// Seconds to wait; in the Domogik dialect also the deadline the
        /// broker enforces.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Send plain MDP frames instead of the Domogik dialect.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Run an echo worker for SERVICE: replies with what it gets (a Domogik
    /// `x.get` is answered as `x.result` with the same data).
    Echo {
        service: String,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
        /// Wait this long before each reply (to play a slow service).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Heartbeat interval with the broker, in milliseconds; match the
        /// broker's `--heartbeat-ms`.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
    },
    /// Shared state (the Clone server, RFC 12): print a subtree, or set,
    /// delete and watch keys; `state serve` runs the server alone.
    State(StateCommand),
    /// Durable requests (Titanic, RFC 9): `titanic request`, `reply`,
    /// `close`, `list`; `titanic serve` runs the service alone.
    Titanic {
        #[command(subcommand)]
        action: TitanicAction,
    },
    /// Show the broker's services, workers, queues and counters.
    Status {
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
        /// Print the raw statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a plugin that ships with majordome, as its own process.
    Plugin {
        #[command(subcommand)]
        plugin: PluginKind,
        /// The broker; `majordome up` passes it as MAJORDOME_BROKER.
        #[arg(
            long,
            env = "MAJORDOME_BROKER",
            default_value = "tcp://127.0.0.1:40410",
            global = true
        )]
        broker: String,
        /// The forwarder's publisher side (MAJORDOME_PUBLISH).
        #[arg(
            long,
            env = "MAJORDOME_PUBLISH",
            default_value = "tcp://127.0.0.1:40411",
            global = true
        )]
        publish: String,
        /// The forwarder's subscriber side (MAJORDOME_SUBSCRIBE).
        #[arg(
            long,
            env = "MAJORDOME_SUBSCRIBE",
            default_value = "tcp://127.0.0.1:40412",
            global = true
        )]
        subscribe: String,
        /// The host in its client id `plugin-<name>.<host>` (MAJORDOME_HOST;
        /// default: this machine's short name).
        #[arg(long, env = "MAJORDOME_HOST", global = true)]
        host: Option<String>,
        /// Seconds between two `alive` statuses (MAJORDOME_STATUS_INTERVAL;
        /// `majordome up` passes a third of its --dead-after, at most 15).
        #[arg(long, env = "MAJORDOME_STATUS_INTERVAL", default_value_t = 15.0, global = true)]
        status_interval: f64,
    },
    /// Load generators.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

impl Command {
    /// Servers log at info by default; one-shot commands only warn.
    pub fn is_server(&self) -> bool {
        matches!(
            self,
            Command::Up { .. }
                | Command::Broker { .. }
                | Command::Echo { .. }
                | Command::Forwarder { .. }
                | Command::State(StateCommand {
                    action: Some(StateAction::Serve { .. }),
                    ..
                })
                | Command::Titanic {
                    action: TitanicAction::Serve { .. }
                }
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Events from one publisher to many subscribers through the forwarder,
    /// optionally against a bare libzmq XSUB/XPUB proxy in the same run.
    Events {
        /// An external forwarder: where publishers connect.
        #[arg(long, requires = "subscribe")]
        publish: Option<String>,
        /// An external forwarder: where subscribers connect.
        #[arg(long, requires = "publish")]
        subscribe: Option<String>,
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// Bytes of each event's payload.
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long)]
        baseline: Option<Baseline>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// High-water mark per subscriber, for both forwarders.
        #[arg(long, default_value_t = 10_000)]
        high_water_mark: i32,
    },
    /// The Clone server: load K keys, time a whole snapshot to a new
    /// client, and update → mirror latency.
    State {
        /// A running server's snapshot endpoint; by default one is started
        /// in this process on a fresh database.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Bytes per value.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Update round trips timed.
        #[arg(long, default_value_t = 2_000)]
        updates: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        baseline: Option<RelayBaseline>,
        /// Folder for the bench's database (default: a temporary one).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
    },
    /// Device commands through the device service to a plugin, and
    /// history writes; in this process, on a fresh database.
    Devices {
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// Commands per run, shared among the clients.
        #[arg(long, default_value_t = 5_000)]
        commands: usize,
        /// Values per run for the history part.
        #[arg(long, default_value_t = 100_000)]
        values: usize,
        /// Sensors the values are spread over.
        #[arg(long, default_value_t = 100)]
        sensors: usize,
        /// Values published ahead of what history has committed, at most.
        #[arg(long, default_value_t = 1_000)]
        window: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        baseline: Option<DirectBaseline>,
        /// Folder for the bench's database (default: a temporary one).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// `full` syncs every commit (the default); `process` survives a
        /// crash of the process only.
        #[arg(long, default_value = "full")]
        durability: DurabilityArg,
    },
    /// Titanic end to end: request, dispatch to an echo service, reply,
    /// close; in this process, on a fresh database.
    Titanic {
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Requests per run, shared among the clients.
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// Requests each client keeps in flight.
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        baseline: Option<DirectBaseline>,
        /// Folder for the bench's database (default: a temporary one).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// `full` syncs every commit (survives power loss, the default);
        /// `process` survives a crash of the process only.
        #[arg(long, default_value = "full")]
        durability: DurabilityArg,
    },
    /// Request/reply through an MDP/0.1 broker, optionally against a bare
    /// libzmq proxy in the same run.
    Reqrep {
        /// Broker to load; by default a `majordome broker` is started on a
        /// free port for the run.
        #[arg(long)]
        broker: Option<String>,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Requests per run, shared among the clients.
        #[arg(long, default_value_t = 100_000)]
        requests: usize,
        /// Body size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Requests each client keeps in flight.
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Also measure a bare libzmq proxy in the same run.
        #[arg(long)]
        baseline: Option<Baseline>,
        /// Idle workers to register, each on its own service, during the run.
        #[arg(long, default_value_t = 0)]
        idle_services: usize,
        /// Runs of each target; the figures are medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "echo")]
        service: String,
        /// `--worker-prefetch` for the broker the bench starts.
        #[arg(long, default_value_t = 1)]
        worker_prefetch: usize,
        /// How many requests each echo worker says it may hold (READY's
        /// `capacity=N`, as majordome's own workers do); 1 makes them plain
        /// RFC 7 workers.
        #[arg(long, default_value_t = 16)]
        worker_capacity: u32,
        /// `--heartbeat-ms` for the broker the bench starts, and how often
        /// the idle workers heartbeat.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DurabilityArg {
    Full,
    Process,
}

impl From<DurabilityArg> for majordome_store::Durability {
    fn from(value: DurabilityArg) -> Self {
        match value {
            DurabilityArg::Full => majordome_store::Durability::Full,
            DurabilityArg::Process => majordome_store::Durability::Process,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RelayBaseline {
    /// A bare libzmq SUB→PUB relay: the Clone path's two hops, no storage.
    Relay,
}

/// The plugins that ship.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum PluginKind {
    /// Fake devices: a cyclic and a linear sensor, a switch, a dimmer, a
    /// binary sensor.
    Fake,
    /// DS18B20 thermometers on a 1-Wire bus (sysfs).
    Onewire,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DirectBaseline {
    /// The same requests straight to the service through the broker, not
    /// stored.
    Direct,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Baseline {
    /// A ROUTER↔DEALER `zmq_proxy` with the same clients and echo workers.
    Proxy,
}

/// Where events are published to (Domogik's port).
pub const DEFAULT_PUBLISH: &str = "tcp://127.0.0.1:40411";
/// Where events are subscribed from (Domogik's port).
pub const DEFAULT_SUBSCRIBE: &str = "tcp://127.0.0.1:40412";

/// Where the event forwarder listens and its bounds.
#[derive(Debug, Args)]
pub struct EventArgs {
    /// Endpoint publishers connect to (the forwarder's XSUB).
    #[arg(long, default_value = DEFAULT_PUBLISH)]
    pub pub_bind: String,
    /// Endpoint subscribers connect to (the forwarder's XPUB).
    #[arg(long, default_value = DEFAULT_SUBSCRIBE)]
    pub sub_bind: String,
    /// Events queued per subscriber before a slow one loses some.
    #[arg(long, default_value_t = 10_000)]
    pub event_high_water_mark: i32,
}

impl EventArgs {
    pub fn settings(&self) -> anyhow::Result<majordome_events::Settings> {
        anyhow::ensure!(
            self.event_high_water_mark > 0,
            "--event-high-water-mark must be above 0"
        );
        Ok(majordome_events::Settings {
            high_water_mark: self.event_high_water_mark,
            ..majordome_events::Settings::default()
        })
    }
}

/// Where the broker listens and its bounds.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Endpoint to listen on. Port 0 picks a free port.
    #[arg(long, default_value = DEFAULT_BROKER)]
    pub bind: String,
    /// Heartbeat interval with workers, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Heartbeats a worker may miss before it is declared dead.
    #[arg(long, default_value_t = 5)]
    pub liveness: u32,
    /// How long, in seconds, a request without a timeout frame may go
    /// without progress (its service answering nobody, or its worker not
    /// answering it); waiting behind requests that are answered is free.
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    /// Bytes of requests waiting per service before new ones are rejected
    /// (each counts its frames plus 256).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_queue_bytes: usize,
    /// The same for all services together.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub max_queued_bytes: usize,
    /// Requests a worker may hold before answering the first (1: one at a
    /// time, as RFC 7; more saves wake-ups under load, idle workers first).
    #[arg(long, default_value_t = 1)]
    pub worker_prefetch: usize,
    /// Frames per message; more is dropped and counted.
    #[arg(long, default_value_t = 64)]
    pub max_frames: usize,
    /// Bytes per message; more is dropped and counted.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
}

impl BrokerArgs {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        anyhow::ensure!(self.heartbeat_ms > 0, "--heartbeat-ms must be above 0");
        anyhow::ensure!(self.liveness > 0, "--liveness must be above 0");
        anyhow::ensure!(
            self.request_timeout.is_finite() && self.request_timeout > 0.0,
            "--request-timeout must be a positive number of seconds"
        );
        anyhow::ensure!(self.max_frames >= 4, "--max-frames must be at least 4");
        anyhow::ensure!(self.worker_prefetch >= 1, "--worker-prefetch must be at least 1");
        Ok(Settings {
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            liveness: self.liveness,
            request_timeout: Duration::from_secs_f64(self.request_timeout.min(86_400.0)),
            max_queue_bytes_per_service: self.max_queue_bytes,
            max_queued_bytes: self.max_queued_bytes,
            max_frames: self.max_frames,
            worker_prefetch: self.worker_prefetch,
            max_message_bytes: self.max_message_bytes,
            ..Settings::default()
        })
    }
}

/// Where the Clone server's snapshot socket listens (RFC 12: updates on the
/// next port, the collector on the one after).
pub const DEFAULT_STATE: &str = "tcp://127.0.0.1:40413";
/// Where `majordome up` keeps its database.
pub const DEFAULT_DATA: &str = "./majordome-data";

/// The data folder.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Folder of the SQLite database (`majordome.db`); created if missing.
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: std::path::PathBuf,
    /// Days of sensor history kept; 0 keeps everything.
    #[arg(long, default_value_t = 365.0)]
    pub history_days: f64,
}

/// Where plugin manifests are read from, and how plugins are watched.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// Folder of plugin manifests (`*.json`); the config service checks
    /// values against them. A missing folder means none.
    #[arg(long, default_value = "./plugins")]
    pub plugins: std::path::PathBuf,
    /// Start no plugin (not even the fake one); `plugin.start.do` still
    /// starts them on request.
    #[arg(long)]
    pub no_autostart: bool,
    /// Seconds without a `plugin.status` after which a running client is
    /// declared dead (clients send one every 15 s).
    #[arg(long, default_value_t = 30.0)]
    pub dead_after: f64,
}

/// Where the Clone server listens.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Snapshot endpoint P; updates are published on P+1 and the
    /// collector listens on P+2. Port 0 picks three free ports in a row.
    #[arg(long, default_value = DEFAULT_STATE)]
    pub state_bind: String,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct StateCommand {
    #[command(subcommand)]
    pub action: Option<StateAction>,
    /// Print the keys under this subtree (e.g. `/device/`); none: all.
    pub subtree: Option<String>,
    /// The Clone server's snapshot endpoint (updates and collector follow).
    #[arg(long, default_value = DEFAULT_STATE)]
    pub endpoint: String,
    /// One JSON object: {"sequence", "keys": {key: {value, sequence, properties}}}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum StateAction {
    /// Set KEY to VALUE and wait until the server has stored and published it.
    Set {
        key: String,
        value: String,
        /// Seconds after which the server deletes the key.
        #[arg(long)]
        ttl: Option<f64>,
        #[arg(long, default_value = DEFAULT_STATE)]
        endpoint: String,
        /// Seconds to wait for the server to confirm.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Delete KEY (an empty value, as RFC 12 says).
    Delete {
        key: String,
        #[arg(long, default_value = DEFAULT_STATE)]
        endpoint: String,
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Print the subtree, then every change to it as it happens.
    Watch {
        /// e.g. `/device/`; none: everything.
        subtree: Option<String>,
        #[arg(long, default_value = DEFAULT_STATE)]
        endpoint: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many changes (not counting the snapshot).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Run only the Clone server.
    Serve {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TitanicAction {
    /// Store a request for SERVICE durably and print its uuid. Domogik
    /// dialect by default (`ACTION [JSON]`); with --raw, body frames.
    Request {
        service: String,
        args: Vec<String>,
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Print the reply to a request; exit code 2 while it is pending.
    Reply {
        uuid: String,
        /// Keep asking for up to this many seconds while it is pending.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
        /// Print the reply's frames one per line instead of as Domogik JSON.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Forget a request and its reply.
    Close {
        uuid: String,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Pending and done requests.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Run only the Titanic service, on a broker that runs elsewhere.
    Serve {
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
        #[command(flatten)]
        data: DataArgs,
    },
}
