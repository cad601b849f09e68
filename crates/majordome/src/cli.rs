//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use majordome_hub::Override;

/// The default request/reply endpoint: Domogik's port, so its plugins find us.
pub const DEFAULT_BROKER: &str = majordome_net::ports::BROKER;

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
    ///
    /// Settings come from `majordome.toml` in the data folder (or --config
    /// FILE), and the flags below override it; `majordome config show`
    /// prints what is in effect and where each value came from.
    Up(UpArgs),
    /// The configuration: `config show` prints the settings in effect (the
    /// defaults, then the file, then the flags given here, as `up` would
    /// take them), each with where it came from.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Run only the event forwarder (Domogik pub/sub: XSUB/XPUB).
    Forwarder {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        events: EventArgs,
    },
    /// Run only the HTTP gateway (JSON-RPC, REST, metrics), against a
    /// running hub's broker.
    Gateway {
        #[command(flatten)]
        config: ConfigArgs,
        /// The hub's broker [default: the configuration's, tcp://127.0.0.1:40410].
        #[arg(long)]
        broker: Option<String>,
        #[command(flatten)]
        http: HttpArgs,
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
        config: ConfigArgs,
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
    /// Scenarios (the `scenario` service): list, show, run, stop, enable,
    /// disable, test (a dry run), history, import, export, delete.
    Scenario {
        #[command(subcommand)]
        action: ScenarioAction,
        #[arg(long, default_value = DEFAULT_BROKER, global = true)]
        broker: String,
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
            default_value = DEFAULT_BROKER,
            global = true
        )]
        broker: String,
        /// The forwarder's publisher side (MAJORDOME_PUBLISH).
        #[arg(
            long,
            env = "MAJORDOME_PUBLISH",
            default_value = DEFAULT_PUBLISH,
            global = true
        )]
        publish: String,
        /// The forwarder's subscriber side (MAJORDOME_SUBSCRIBE).
        #[arg(
            long,
            env = "MAJORDOME_SUBSCRIBE",
            default_value = DEFAULT_SUBSCRIBE,
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
    /// Copy the database now, while majordome runs or not: to FILE, or into
    /// `backups/` of the data folder (kept in rotation with the scheduled
    /// ones, `[backup] keep`). The copy is checked before it is kept.
    Backup {
        /// Where to write the copy.
        file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
        /// The data folder [default: as `up` takes it].
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Put a backup in place of the database: FILE is checked first, and
    /// the database it replaces is set aside beside it, not deleted.
    /// Refused while majordome runs on the data folder.
    Restore {
        /// The backup, e.g. one from `backups/` in the data folder.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
        /// The data folder [default: as `up` takes it].
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Identities that log in to the hub (the users file of the data
    /// folder): needed to listen beyond loopback, and for every client with
    /// `[security] loopback = "authenticated"`.
    User {
        #[command(subcommand)]
        user: UserCommand,
        #[command(flatten)]
        config: ConfigArgs,
        /// The data folder [default: as `up` takes it].
        #[arg(long, global = true)]
        data: Option<PathBuf>,
    },
    /// Tokens for the HTTP gateway (`Authorization: Bearer <token>`), in
    /// the data folder's `tokens.toml`.
    Token {
        #[command(subcommand)]
        token: TokenCommand,
        #[command(flatten)]
        config: ConfigArgs,
        /// The data folder [default: as `up` takes it].
        #[arg(long, global = true)]
        data: Option<PathBuf>,
    },
    /// Load generators.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

/// What `majordome user` does.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Make a user and print its secret, once: clients log in with
    /// MAJORDOME_USER=NAME and MAJORDOME_PASSWORD=<secret>.
    Add { name: String },
    /// Give a user a new secret (printed once); the old one stops working
    /// for new connections.
    Reset { name: String },
    /// Remove a user; its open connections stay until they close.
    Remove { name: String },
    /// The users, and what `[permissions]` gives each.
    List,
}

/// What `majordome scenario` does.
#[derive(Debug, Subcommand)]
pub enum ScenarioAction {
    /// Every scenario: enabled, mode, triggers, running, last result.
    List,
    /// One scenario's JSON and live state.
    Show {
        name: String,
    },
    /// Run it now (its conditions skipped, its mode kept).
    Run {
        name: String,
    },
    /// Stop its runs (and empty its queue).
    Stop {
        name: String,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    /// What it would do now, and why, without doing it: NAME, or a
    /// scenario's JSON in FILE (checked first).
    Test {
        name: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Its last runs: when, what fired, how it ended, each action.
    History {
        name: String,
        #[arg(long, default_value_t = 10)]
        last: u64,
        /// The whole records, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Scenarios from FILE (`{"scenarios": […]}` as export writes, a list,
    /// or one scenario): all are checked, then all stored, or none.
    Import {
        file: PathBuf,
    },
    /// One scenario, or all, as JSON `import` takes.
    Export {
        name: Option<String>,
    },
    Delete {
        name: String,
    },
}

/// What `majordome token` does.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for the identity NAME and print it, once. It has
    /// NAME's `[permissions.NAME]`, or, with --permissions, its own rules.
    Create {
        name: String,
        /// A rule `KIND=PATTERN` (KIND: call, publish, read, write, serve),
        /// repeated: `--permissions call=devices --permissions read=/device/`.
        #[arg(long = "permissions", value_name = "KIND=PATTERN")]
        permissions: Vec<String>,
    },
    /// The tokens: id, identity, when made, rules.
    List,
    /// Forget a token (by the id before the dot).
    Revoke { id: String },
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
        /// Values published ahead of what history has committed, at most
        /// (well below the forwarder's 500 per subscriber: with 1,000, about
        /// 750 of 100,000 were lost in each run).
        #[arg(long, default_value_t = 200)]
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
    /// The scenario engine: event to device command against the same
    /// command sent directly, and events evaluated per second with many
    /// scenarios enabled against none; in this process.
    Scenario {
        /// Reactions timed per run, one at a time.
        #[arg(long, default_value_t = 500)]
        samples: usize,
        /// Scenarios enabled for the evaluation.
        #[arg(long, default_value_t = 1_000)]
        scenarios: usize,
        /// Events per evaluation.
        #[arg(long, default_value_t = 50_000)]
        events: usize,
        /// Events published ahead of what the engine has evaluated, at most
        /// (well below the forwarder's 500 per subscriber: a faster burst
        /// loses some).
        #[arg(long, default_value_t = 200)]
        window: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Folder for the bench's database (default: a temporary one).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
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
    /// The HTTP gateway against the bus in the same run: agorpc's
    /// `message` inventory over JSON-RPC from keep-alive connections vs
    /// the same call on the bus; events/s one WebSocket client receives vs
    /// a bus subscriber.
    Http {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Requests per run, shared among the connections.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Devices in the inventory.
        #[arg(long, default_value_t = 20)]
        devices: usize,
        /// Events sent for the event comparison.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
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
        #[arg(long, default_value_t = 5)]
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
        /// Have the broker ask every client and worker to log in (PLAIN,
        /// checked by ZAP), as `loopback = "authenticated"` does: what
        /// logins cost.
        #[arg(long)]
        logins: bool,
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
pub const DEFAULT_PUBLISH: &str = majordome_net::ports::PUBLISH;
/// Where events are subscribed from (Domogik's port).
pub const DEFAULT_SUBSCRIBE: &str = majordome_net::ports::SUBSCRIBE;

/// Where the configuration file is.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file (default: `majordome.toml` in the data
    /// folder, when there is one). Flags override what it says.
    #[arg(long, env = "MAJORDOME_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// Everything `up` takes; `config show` takes the same.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Where the HTTP gateway listens. Default: the configuration.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// `HOST:PORT` [default: 127.0.0.1:40406]; port 0 picks a free one.
    #[arg(long)]
    pub http_bind: Option<String>,
}

impl HttpArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) {
        if let Some(v) = &self.http_bind {
            out.push(Override::new("http.bind", "--http-bind", v.clone()));
        }
    }
}

impl UpArgs {
    /// The flags given, as settings of the configuration.
    pub fn overrides(&self) -> anyhow::Result<Vec<Override>> {
        let mut out = Vec::new();
        self.broker.overrides(&mut out)?;
        self.events.overrides(&mut out);
        self.state.overrides(&mut out);
        self.data.overrides(&mut out)?;
        self.plugins.overrides(&mut out)?;
        self.http.overrides(&mut out);
        Ok(out)
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the settings in effect as a TOML file, each with where it
    /// came from (default, the file, or a flag).
    Show(UpArgs),
}

/// A number of seconds from a flag, as a duration (at most a day).
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        value.is_finite() && value > 0.0,
        "{flag} must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(value.min(86_400.0)))
}

/// Where the event forwarder listens and its bounds. Defaults: the
/// configuration (`majordome config show`).
#[derive(Debug, Args)]
pub struct EventArgs {
    /// Endpoint publishers connect to (the forwarder's XSUB) [default:
    /// tcp://127.0.0.1:40411].
    #[arg(long)]
    pub pub_bind: Option<String>,
    /// Endpoint subscribers connect to (the forwarder's XPUB) [default:
    /// tcp://127.0.0.1:40412].
    #[arg(long)]
    pub sub_bind: Option<String>,
    /// Events queued per subscriber before a slow one loses some [default:
    /// 10000].
    #[arg(long)]
    pub event_high_water_mark: Option<i32>,
}

impl EventArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) {
        if let Some(v) = &self.pub_bind {
            out.push(Override::new("listen.publish", "--pub-bind", v.clone()));
        }
        if let Some(v) = &self.sub_bind {
            out.push(Override::new("listen.subscribe", "--sub-bind", v.clone()));
        }
        if let Some(v) = self.event_high_water_mark {
            out.push(Override::new("events.high_water_mark", "--event-high-water-mark", v));
        }
    }
}

/// Where the broker listens and its bounds. Defaults: the configuration
/// (`majordome config show`).
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Endpoint to listen on; port 0 picks a free port [default:
    /// tcp://127.0.0.1:40410].
    #[arg(long)]
    pub bind: Option<String>,
    /// Heartbeat interval with workers, in milliseconds [default: 1000].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Heartbeats a worker may miss before it is declared dead [default: 5].
    #[arg(long)]
    pub liveness: Option<u32>,
    /// How long, in seconds, a request without a timeout frame may go
    /// without progress (its service answering nobody, or its worker not
    /// answering it); waiting behind requests that are answered is free
    /// [default: 10].
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// Bytes of requests waiting per service before new ones are rejected
    /// (each counts its frames plus 256) [default: 64 MiB].
    #[arg(long)]
    pub max_queue_bytes: Option<usize>,
    /// The same for all services together [default: 256 MiB].
    #[arg(long)]
    pub max_queued_bytes: Option<usize>,
    /// Requests a worker may hold before answering the first (1: one at a
    /// time, as RFC 7; more saves wake-ups under load, idle workers first)
    /// [default: 1].
    #[arg(long)]
    pub worker_prefetch: Option<usize>,
    /// Frames per message; more is dropped and counted [default: 64].
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// Bytes per message; more is dropped and counted [default: 16 MiB].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
}

impl BrokerArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) -> anyhow::Result<()> {
        if let Some(v) = &self.bind {
            out.push(Override::new("listen.broker", "--bind", v.clone()));
        }
        if let Some(v) = self.heartbeat_ms {
            anyhow::ensure!(v > 0, "--heartbeat-ms must be above 0");
            out.push(Override::duration(
                "broker.heartbeat_interval",
                "--heartbeat-ms",
                Duration::from_millis(v),
            ));
        }
        if let Some(v) = self.liveness {
            out.push(Override::new("broker.liveness", "--liveness", i64::from(v)));
        }
        if let Some(v) = self.request_timeout {
            let timeout = seconds("--request-timeout", v)?;
            out.push(Override::duration(
                "broker.request_timeout",
                "--request-timeout",
                timeout,
            ));
        }
        let sizes = [
            (
                "broker.max_queue_bytes_per_service",
                "--max-queue-bytes",
                self.max_queue_bytes,
            ),
            ("broker.max_queued_bytes", "--max-queued-bytes", self.max_queued_bytes),
            ("broker.worker_prefetch", "--worker-prefetch", self.worker_prefetch),
            ("broker.max_frames", "--max-frames", self.max_frames),
            (
                "broker.max_message_bytes",
                "--max-message-bytes",
                self.max_message_bytes,
            ),
        ];
        for (key, flag, value) in sizes {
            if let Some(v) = value {
                let v = i64::try_from(v).map_err(|_| anyhow::anyhow!("{flag} is too large"))?;
                out.push(Override::new(key, flag, v));
            }
        }
        Ok(())
    }
}

/// The data folder. Defaults: the configuration (`majordome config show`).
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Folder of the SQLite database (`majordome.db`), the plugin logs and
    /// `majordome.toml`; created if missing [default: ./majordome-data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Days of sensor history kept; 0 keeps everything [default: 365].
    #[arg(long)]
    pub history_days: Option<f64>,
}

impl DataArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) -> anyhow::Result<()> {
        if let Some(v) = &self.data {
            out.push(Override::new("data", "--data", v.display().to_string()));
        }
        if let Some(v) = self.history_days {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "--history-days must be a number of days (0 keeps everything)"
            );
            out.push(Override::new("history.days", "--history-days", v));
        }
        Ok(())
    }
}

/// Where plugin manifests are read from, and how plugins are watched.
/// Defaults: the configuration (`majordome config show`).
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// Folder of plugin manifests (`*.json`); the config service checks
    /// values against them. A missing folder means none [default:
    /// ./plugins].
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// Start no plugin (not even the fake one); `plugin.start.do` still
    /// starts them on request.
    #[arg(long)]
    pub no_autostart: bool,
    /// Seconds without a `plugin.status` after which a running client is
    /// declared dead (clients send one every 15 s) [default: 30].
    #[arg(long)]
    pub dead_after: Option<f64>,
}

impl PluginArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) -> anyhow::Result<()> {
        if let Some(v) = &self.plugins {
            out.push(Override::new("plugins.folder", "--plugins", v.display().to_string()));
        }
        if self.no_autostart {
            out.push(Override::new("plugins.autostart", "--no-autostart", false));
        }
        if let Some(v) = self.dead_after {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "--dead-after must be a positive number of seconds"
            );
            out.push(Override::duration(
                "manager.dead_after",
                "--dead-after",
                Duration::from_secs_f64(v.min(86_400.0)),
            ));
        }
        Ok(())
    }
}

/// Where the Clone server listens. Default: the configuration.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Snapshot endpoint P; updates are published on P+1 and the
    /// collector listens on P+2. Port 0 picks three free ports in a row
    /// [default: tcp://127.0.0.1:40413].
    #[arg(long)]
    pub state_bind: Option<String>,
}

impl StateArgs {
    pub fn overrides(&self, out: &mut Vec<Override>) {
        if let Some(v) = &self.state_bind {
            out.push(Override::new("listen.state", "--state-bind", v.clone()));
        }
    }
}

/// Where the Clone server's snapshot socket listens (RFC 12: updates on the
/// next port, the collector on the one after).
pub const DEFAULT_STATE: &str = majordome_net::ports::STATE;

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
        config: ConfigArgs,
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
        config: ConfigArgs,
        #[command(flatten)]
        data: DataArgs,
    },
}
