//! What each command does. Everything here is a thin layer over the library
//! crates.

use std::io::Write;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use majordome_broker::stats::Snapshot;
use majordome_broker::Broker;
use majordome_client::{
    domogik_handler, Bytes, Client, ClientOptions, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions,
};
use majordome_mdp::domogik;
use serde_json::Value;

use crate::cli::{Bench, BrokerArgs, Command, DataArgs, EventArgs, PluginArgs, StateArgs};
use majordome_events::Forwarder;

/// Runs one command.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Broker { broker } => broker_only(&broker),
        Command::Up {
            broker,
            events,
            state,
            data,
            plugins,
        } => up(&broker, &events, &state, &data, &plugins),
        Command::State(command) => crate::state_cmd::run(command),
        Command::Titanic { action } => crate::titanic_cmd::run(action),
        Command::Forwarder { events } => forwarder_only(&events),
        Command::Pub {
            category,
            json,
            endpoint,
            wait,
        } => publish(&endpoint, &category, &json, wait),
        Command::Sub {
            prefixes,
            endpoint,
            json,
            count,
        } => subscribe(&endpoint, &prefixes, json, count),
        Command::Call {
            service,
            args,
            timeout,
            raw,
            broker,
        } => call(&broker, &service, &args, timeout, raw),
        Command::Echo {
            service,
            broker,
            delay_ms,
            heartbeat_ms,
        } => echo(
            &broker,
            &service,
            Duration::from_millis(delay_ms),
            Duration::from_millis(heartbeat_ms),
        ),
        Command::Status { broker, json } => status(&broker, json),
        Command::Bench { bench } => bench_command(bench),
        Command::Plugin {
            plugin,
            broker,
            publish,
            subscribe,
            host,
            status_interval,
        } => plugin_command(plugin, broker, publish, subscribe, host, status_interval),
    }
}

fn plugin_command(
    plugin: crate::cli::PluginKind,
    broker: String,
    publish: String,
    subscribe: String,
    host: Option<String>,
    status_interval: f64,
) -> Result<ExitCode> {
    if !(status_interval.is_finite() && status_interval >= 0.05) {
        bail!("--status-interval must be at least 0.05 seconds");
    }
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let host = host
        .filter(|h| !h.is_empty())
        .unwrap_or_else(majordome_services::manager::local_host);
    let name = match plugin {
        crate::cli::PluginKind::Fake => "fake",
        crate::cli::PluginKind::Onewire => "onewire",
    };
    let settings = majordome_plugin::PluginSettings {
        status_interval: Duration::from_secs_f64(status_interval.min(3600.0)),
        ..majordome_plugin::PluginSettings::new(name, &host)
    };
    println!(
        "{name} plugin {} on broker {broker}, events {publish} / {subscribe}",
        settings.client_id()
    );
    std::io::stdout().flush()?;
    let endpoints = majordome_plugin::Endpoints {
        broker,
        publish,
        subscribe,
    };
    match plugin {
        crate::cli::PluginKind::Fake => majordome_plugin::fake::run(settings, endpoints, &shutdown)?,
        crate::cli::PluginKind::Onewire => majordome_plugin::onewire::run(settings, endpoints, &shutdown)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn broker_only(args: &BrokerArgs) -> Result<ExitCode> {
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let broker = Broker::bind(&args.bind, args.settings()?)?;
    // Tests and the bench read this line to learn the port.
    println!("majordome broker listening on {}", broker.endpoint());
    std::io::stdout().flush()?;
    broker.run(&shutdown)?;
    Ok(ExitCode::SUCCESS)
}

fn up(
    args: &BrokerArgs,
    event_args: &EventArgs,
    state_args: &StateArgs,
    data: &DataArgs,
    plugins: &PluginArgs,
) -> Result<ExitCode> {
    // Settings first: nothing is bound or started for a bad command line.
    if !(plugins.dead_after.is_finite() && plugins.dead_after > 0.0) {
        bail!("--dead-after must be a positive number of seconds");
    }
    if !(data.history_days.is_finite() && data.history_days >= 0.0) {
        bail!("--history-days must be a number of days (0 keeps everything)");
    }
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let broker = Broker::bind(&args.bind, args.settings()?)?;
    let forwarder = Forwarder::bind(&event_args.pub_bind, &event_args.sub_bind, event_args.settings()?)?;
    let database = majordome_store::database_path(&data.data);
    let state = majordome_state::Server::bind(&state_args.state_bind, &database, majordome_state::Settings::default())?;
    let state_endpoints = state.endpoints().clone();
    let state_counters = state.counters();
    let titanic =
        majordome_titanic::Titanic::start(broker.endpoint(), &database, majordome_titanic::Settings::default())?;
    let mut manifests = majordome_services::load_folder(&plugins.plugins);
    let manifest_count = manifests.manifests.len();
    for (path, why) in &manifests.invalid {
        tracing::warn!(path = %path.display(), "ignored an invalid plugin manifest: {why}");
    }
    // The plugins that ship, unless the folder has its own manifest for one.
    for (name, text) in majordome_plugin::builtin_manifests() {
        if !manifests.manifests.iter().any(|m| m.name == *name) {
            let manifest = majordome_services::Manifest::parse(text)
                .map_err(|e| anyhow::anyhow!("the shipped manifest of '{name}' is invalid: {e}"))?;
            manifests.manifests.push(manifest);
        }
    }
    let shipped = manifests.manifests.len() - manifest_count;
    if plugins.no_autostart {
        for manifest in &mut manifests.manifests {
            manifest.autostart = false;
        }
    }
    let endpoint = broker.endpoint().to_owned();
    let (publish_at, subscribe_at) = (
        forwarder.publisher_endpoint().to_owned(),
        forwarder.subscriber_endpoint().to_owned(),
    );
    let started: Vec<String> = manifests
        .manifests
        .iter()
        .filter(|m| m.autostart && !m.command.is_empty())
        .map(|m| m.name.clone())
        .collect();
    let registry = majordome_services::manager::Registry::open(
        manifests.manifests.clone(),
        majordome_services::manager::ManagerSettings {
            dead_after: Duration::from_secs_f64(plugins.dead_after.min(86_400.0)),
            // Plugins we start speak often enough never to look dead.
            plugin_environment: vec![(
                "MAJORDOME_STATUS_INTERVAL".into(),
                (plugins.dead_after / 3.0).min(15.0).to_string(),
            )],
            ..Default::default()
        },
        &database,
        majordome_store::Durability::Full,
    )?;
    // Each plugin the manager starts writes its output here.
    let log_dir = data.data.join("logs");
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create the plugin log folder {}", log_dir.display()))?;
    let manager_endpoints = majordome_services::manager::ManagerEndpoints {
        broker: endpoint.clone(),
        publish: publish_at.clone(),
        subscribe: subscribe_at.clone(),
    };
    let config = majordome_services::ConfigService::open(
        &database,
        manifests.manifests.clone(),
        majordome_store::Durability::Full,
    )?;
    let history_settings = majordome_services::HistorySettings {
        retention: (data.history_days > 0.0)
            .then(|| Duration::from_secs_f64(data.history_days.min(36_500.0) * 86_400.0)),
        ..Default::default()
    };
    let (schema, rejected) = majordome_services::Schema::shipped().with_manifests(&manifests.manifests);
    for (plugin, why) in rejected {
        tracing::warn!(plugin, "ignored a device type from a manifest: {why}");
    }
    let counters = forwarder.counters();
    let mut parts = Parts {
        shutdown: shutdown.clone(),
        threads: Vec::new(),
        failed: Default::default(),
    };
    parts.spawn("broker", move |stop| Ok(broker.run(stop)?))?;
    parts.spawn("forwarder", move |stop| Ok(forwarder.run(stop)?))?;
    parts.spawn("state", move |stop| Ok(state.run(stop)?))?;
    let (at, publish) = (endpoint.clone(), publish_at.clone());
    parts.spawn("config", move |stop| Ok(config.run(&at, Some(&publish), stop)?))?;
    parts.spawn("manager", move |stop| {
        Ok(majordome_services::manager::run(
            registry,
            &manager_endpoints,
            &log_dir,
            stop,
        )?)
    })?;
    // The device service and the history it feeds, in the same database.
    // Opened once the Clone server runs: the service writes values there.
    let devices = majordome_services::DeviceService::open(
        &database,
        schema,
        majordome_store::Durability::Full,
        majordome_services::DeviceSettings::default(),
        &history_settings,
        majordome_services::DeviceEndpoints {
            broker: endpoint.clone(),
            publish: publish_at.clone(),
            subscribe: subscribe_at.clone(),
            state: Some(state_endpoints.snapshot.clone()),
        },
    )?;
    let history = majordome_services::HistoryService::new(&database, history_settings, devices.history_counters());
    parts.spawn("devices", move |stop| Ok(devices.run(stop)?))?;
    let at = endpoint.clone();
    parts.spawn("history", move |stop| Ok(history.run(&at, stop)?))?;
    parts.spawn("titanic", move |stop| Ok(titanic.run(stop)?))?;
    let at = endpoint.clone();
    parts.spawn("echo", move |stop| {
        // Echoing is quick: answered on the socket thread, and the broker
        // may keep several requests in flight to it, which saves wake-ups.
        let options = WorkerOptions {
            capacity: 16,
            ..WorkerOptions::default()
        };
        Ok(Worker::new(&at, "echo", options).run_inline(echo_body(Duration::ZERO), stop)?)
    })?;
    // The forwarder's and the Clone server's counters, served on the bus
    // like everything else.
    let at = endpoint.clone();
    parts.spawn("events-stats", move |stop| {
        stats_service(&at, "events", stop, move || serde_json::to_value(counters.snapshot()))
    })?;
    let at = endpoint.clone();
    parts.spawn("state-stats", move |stop| {
        stats_service(&at, "state", stop, move || {
            serde_json::to_value(state_counters.snapshot())
        })
    })?;
    println!("majordome broker listening on {endpoint}");
    println!("  request/reply (MDP/0.1, MMI, Domogik dialect)  {endpoint}");
    println!("  events: publishers connect to                  {publish_at}");
    println!("  events: subscribers connect to                 {subscribe_at}");
    crate::state_cmd::print_endpoints(&state_endpoints);
    println!(
        "  database                                       {}",
        database.display()
    );
    println!("  services                                       config (dbmgr, admin, dbmanager), manager, devices, history, echo, events, state, titanic.*, mmi.*");
    println!(
        "  plugin manifests                               {manifest_count} from {}, {} shipped (started: {})",
        plugins.plugins.display(),
        shipped,
        if started.is_empty() {
            "none".to_owned()
        } else {
            started.join(", ")
        }
    );
    println!("try: majordome call echo ping.get '{{\"hello\": \"world\"}}' --broker {endpoint}");
    println!("stop with Ctrl-C");
    std::io::stdout().flush()?;
    shutdown.wait();
    for (name, thread) in parts.threads {
        // A part's own failure is in `failed`; a panic has no other trace.
        if thread.join().is_err() {
            parts.failed.record(name, "panicked".into());
        }
        tracing::debug!(part = name, "stopped");
    }
    match parts.failed.first() {
        Some((name, why)) => bail!("the {name} part stopped ({why}), so majordome stopped"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The threads of `up`: each named, each stopped by the same signal.
struct Parts {
    shutdown: Shutdown,
    threads: Vec<(&'static str, thread::JoinHandle<()>)>,
    failed: Failures,
}

/// The parts that stopped before they were asked to, with why, first
/// first.
#[derive(Clone, Default)]
struct Failures(std::sync::Arc<std::sync::Mutex<Vec<(&'static str, String)>>>);

impl Failures {
    fn record(&self, name: &'static str, why: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((name, why));
    }

    fn first(&self) -> Option<(&'static str, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).first().cloned()
    }
}

/// Set to a part's name, that part fails as it starts: how the tests check
/// that one failing part stops the whole hub.
const FAIL_PART_FOR_TESTS: &str = "MAJORDOME_TEST_FAIL_PART";

impl Parts {
    /// Runs a part on its own thread. A part that ends before the hub is
    /// told to stop (an error, or returning at all) stops the whole hub:
    /// half a hub would look alive while it is not.
    fn spawn<F>(&mut self, name: &'static str, run: F) -> Result<()>
    where
        F: FnOnce(&Shutdown) -> Result<()> + Send + 'static,
    {
        let (stop, failed) = (self.shutdown.clone(), self.failed.clone());
        let fail_on_purpose = std::env::var(FAIL_PART_FOR_TESTS).is_ok_and(|part| part == name);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let outcome = if fail_on_purpose {
                    Err(anyhow::anyhow!("failed on purpose: {FAIL_PART_FOR_TESTS}={name}"))
                } else {
                    run(&stop)
                };
                if stop.is_triggered() && outcome.is_ok() {
                    return;
                }
                let why = match outcome {
                    Ok(()) => "it ended on its own".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                tracing::error!(part = name, "{why}; stopping majordome");
                failed.record(name, why);
                stop.trigger();
            })
            .with_context(|| format!("cannot start the {name} thread"))?;
        self.threads.push((name, thread));
        Ok(())
    }
}

/// Serves `service` at `broker`, answering `stats.get` with `snapshot()`,
/// until `shutdown`.
fn stats_service<F>(broker: &str, service: &'static str, shutdown: &Shutdown, snapshot: F) -> Result<()>
where
    F: Fn() -> serde_json::Result<Value> + Send + 'static,
{
    let handler = domogik_handler(move |message: Message| match message.action.as_str() {
        "stats.get" => Message::new("stats.result", snapshot().unwrap_or_default()),
        other => Message::failure(
            other,
            format!("unknown action '{other}': the {service} service answers stats.get"),
        ),
    });
    // Reading counters is quick: answered on the socket thread.
    Ok(Worker::new(broker, service, WorkerOptions::default()).run_inline(handler, shutdown)?)
}

fn forwarder_only(args: &EventArgs) -> Result<ExitCode> {
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let forwarder = Forwarder::bind(&args.pub_bind, &args.sub_bind, args.settings()?)?;
    println!(
        "majordome forwarder: publishers connect to {}",
        forwarder.publisher_endpoint()
    );
    println!(
        "majordome forwarder: subscribers listening on {}",
        forwarder.subscriber_endpoint()
    );
    std::io::stdout().flush()?;
    forwarder.run(&shutdown)?;
    Ok(ExitCode::SUCCESS)
}

fn publish(endpoint: &str, category: &str, json: &str, wait: f64) -> Result<ExitCode> {
    if category.is_empty() || category.contains(char::is_whitespace) {
        bail!("the category must be non-empty and without spaces, like plugin.status");
    }
    if !(wait.is_finite() && wait >= 0.0) {
        bail!("--wait must be a number of seconds, not {wait}");
    }
    let data: Value =
        serde_json::from_str(json).with_context(|| format!("the JSON argument is not valid JSON ({json})"))?;
    let mut publisher = Publisher::connect_flushing(endpoint)?;
    // A publisher only sends what somebody subscribed to: wait for one, so
    // that the event is not published into the void unannounced.
    if !publisher.wait_for_subscriber(category, Duration::from_secs_f64(wait.min(3600.0)))? {
        eprintln!("note: nobody subscribed to '{category}' at {endpoint} within {wait} s; the event was not delivered");
        return Ok(ExitCode::SUCCESS);
    }
    publisher.publish(category, &data)?;
    Ok(ExitCode::SUCCESS)
}

fn subscribe(endpoint: &str, prefixes: &[String], json: bool, count: Option<u64>) -> Result<ExitCode> {
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let mut subscriber = Subscriber::connect(endpoint, &prefixes)?;
    let mut seen = 0;
    let mut out = std::io::stdout().lock();
    while count.is_none_or(|limit| seen < limit) && !shutdown.is_triggered() {
        let Some(event) = subscriber.recv(Duration::from_millis(200))? else {
            continue;
        };
        seen += 1;
        if json {
            let line = serde_json::json!({"id": event.id, "category": event.category, "data": event.data});
            writeln!(out, "{line}")?;
        } else {
            let time = event.id.rsplit('.').nth(1).unwrap_or("").replace('_', ".");
            writeln!(out, "{time} {} {}", event.category, event.data)?;
        }
        out.flush()?;
    }
    if subscriber.malformed() > 0 {
        eprintln!(
            "skipped {} messages that were not Domogik events",
            subscriber.malformed()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The echo service's handler: a Domogik request `x.get` is answered as
/// `x.result` with the same data; any other body is sent back as it came.
fn echo_body(delay: Duration) -> impl FnMut(Vec<Bytes>) -> Vec<Bytes> + Send + 'static {
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

fn echo(endpoint: &str, service: &str, delay: Duration, heartbeat: Duration) -> Result<ExitCode> {
    anyhow::ensure!(!heartbeat.is_zero(), "--heartbeat-ms must be above 0");
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    println!("echo worker for service '{service}' on {endpoint}");
    std::io::stdout().flush()?;
    let options = WorkerOptions {
        heartbeat_interval: heartbeat,
        ..WorkerOptions::default()
    };
    Worker::new(endpoint, service, options).run(echo_body(delay), &shutdown)?;
    Ok(ExitCode::SUCCESS)
}

fn client(endpoint: &str, timeout: f64) -> Result<Client> {
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds, not {timeout}");
    }
    let timeout = Duration::from_secs_f64(timeout.min(86_400.0));
    Ok(Client::new(
        endpoint,
        ClientOptions {
            timeout,
            ..ClientOptions::default()
        },
    ))
}

fn call(endpoint: &str, service: &str, args: &[String], timeout: f64, raw: bool) -> Result<ExitCode> {
    let mut client = client(endpoint, timeout)?;
    if raw {
        let body = args.iter().map(|a| Bytes::from(a.clone())).collect();
        let reply = client.request(service, body)?;
        for frame in reply {
            println!("{}", String::from_utf8_lossy(&frame));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (action, json) = match args {
        [action] => (action, "{}"),
        [action, json] => (action, json.as_str()),
        [] => bail!("missing ACTION: usage is `majordome call SERVICE ACTION [JSON]` (or --raw FRAME...)"),
        _ => bail!("too many arguments: usage is `majordome call SERVICE ACTION [JSON]`; quote the JSON"),
    };
    let data: Value =
        serde_json::from_str(json).with_context(|| format!("the JSON argument is not valid JSON ({json})"))?;
    if !data.is_object() {
        bail!("the JSON argument must be an object, like '{{\"key\": \"value\"}}', not {json}");
    }
    let reply = client.request_message(service, &Message::new(action.clone(), data))?;
    println!("{}", reply.action);
    println!("{}", serde_json::to_string_pretty(&reply.data)?);
    if reply.status() == Some(false) {
        eprintln!("error: {}", reply.reason().unwrap_or("the service reported a failure"));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn status(endpoint: &str, json: bool) -> Result<ExitCode> {
    let mut client = client(endpoint, 5.0)?;
    let reply = client.request("mmi.stats", vec![])?;
    let frame = reply.first().context("the broker sent an empty mmi.stats reply")?;
    if json {
        println!("{}", String::from_utf8_lossy(frame));
        return Ok(ExitCode::SUCCESS);
    }
    let stats: Snapshot = serde_json::from_slice(frame)
        .with_context(|| format!("{endpoint} answered mmi.stats with something that is not majordome statistics"))?;
    print!("{}", render_status(endpoint, &stats));
    // The hub's own services, when this broker has them (`majordome up`).
    let ask = |client: &mut Client, service: &str, action: &str| -> Option<Value> {
        if stats.services.get(service).is_none_or(|s| s.workers == 0) {
            return None;
        }
        client
            .request_message(service, &Message::new(action, serde_json::json!({})))
            .ok()
            .filter(|reply| reply.status() != Some(false))
            .map(|reply| reply.data)
    };
    if let Some(list) = ask(&mut client, "manager", "client.list.get") {
        print!("{}", render_clients(&list));
    }
    let devices = ask(&mut client, "devices", "stats.get");
    let history = ask(&mut client, "history", "stats.get");
    if let Some(devices) = devices {
        print!("{}", render_devices(&devices, history.as_ref()));
    }
    Ok(ExitCode::SUCCESS)
}

fn render_clients(list: &Value) -> String {
    let Some(clients) = list.as_object().filter(|c| !c.is_empty()) else {
        return "clients: none\n".to_owned();
    };
    let width = clients.keys().map(String::len).max().unwrap_or(0).max("CLIENT".len());
    let mut out = format!("{:width$}  {:<15} CONFIGURED\n", "CLIENT", "STATUS");
    for (id, client) in clients {
        let configured = match client["configured"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        out += &format!(
            "{id:width$}  {:<15} {configured}\n",
            client["status"].as_str().unwrap_or("?")
        );
    }
    out
}

fn render_devices(devices: &Value, history: Option<&Value>) -> String {
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    let outcomes: Vec<String> = devices["commands"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    let latency = &devices["command_latency_us"];
    let mut out = format!(
        "devices: {} ({} stale); {} values received, {} stored; commands: {}; round trip p50 {} us, p99 {} us\n",
        number(&devices["devices"]),
        number(&devices["stale"]),
        number(&devices["values"]),
        number(&devices["values_stored"]),
        if outcomes.is_empty() {
            "none".to_owned()
        } else {
            outcomes.join(", ")
        },
        latency["p50"].as_f64().map_or("-".to_owned(), |v| format!("{v:.0}")),
        latency["p99"].as_f64().map_or("-".to_owned(), |v| format!("{v:.0}")),
    );
    if let Some(clients) = devices["clients"].as_object() {
        for (id, c) in clients {
            out += &format!(
                "  {id}: {} commands, {} errors, {} values\n",
                number(&c["commands"]),
                number(&c["errors"]),
                number(&c["values"])
            );
        }
    }
    if let Some(history) = history {
        out += &format!(
            "history: {} values kept, {} queries, {} pruned\n",
            history["rows"].as_i64().unwrap_or(-1),
            number(&history["queries"]),
            number(&history["pruned"])
        );
    }
    out
}

fn render_status(endpoint: &str, stats: &Snapshot) -> String {
    let mut out = format!(
        "broker {endpoint}: up {} s, {} workers, {} requests in flight, {} messages in, {} out\n",
        stats.uptime_seconds,
        stats.workers,
        stats.requests_in_flight,
        stats.messages.get("in").copied().unwrap_or(0),
        stats.messages.get("out").copied().unwrap_or(0),
    );
    let width = stats
        .services
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("SERVICE".len());
    out += &format!(
        "{:width$}  {:>7} {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>5} {:>9} {:>9}\n",
        "SERVICE",
        "WORKERS",
        "IDLE",
        "QUEUED",
        "REQUESTS",
        "REPLIES",
        "EXPIRED",
        "REJECTED",
        "LATE",
        "P50 µs",
        "P99 µs"
    );
    let micros = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for (name, s) in &stats.services {
        out += &format!(
            "{name:width$}  {:>7} {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>5} {:>9} {:>9}\n",
            s.workers,
            s.idle_workers,
            s.queued,
            s.counters.requests,
            s.counters.replies,
            s.counters.expired,
            s.counters.rejected,
            s.counters.late_replies,
            micros(s.latency_p50_us),
            micros(s.latency_p99_us)
        );
    }
    let dropped: Vec<String> = stats
        .dropped
        .iter()
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    out += &format!(
        "dropped messages: {}\nworkers expired: {}, disconnected for protocol errors: {}\n",
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        },
        stats.workers_expired,
        stats.workers_disconnected
    );
    out
}

fn bench_command(bench: Bench) -> Result<ExitCode> {
    match bench {
        Bench::Events {
            publish,
            subscribe,
            subscribers,
            events,
            size,
            baseline,
            runs,
            high_water_mark,
        } => {
            let options = majordome_bench::events::EventsOptions {
                forwarder: publish.zip(subscribe),
                subscribers,
                events,
                size,
                baseline_proxy: baseline.is_some(),
                runs,
                high_water_mark,
            };
            majordome_bench::events::run(&options, &mut std::io::stdout())?;
        }
        Bench::Reqrep {
            broker,
            clients,
            workers,
            requests,
            size,
            window,
            baseline,
            idle_services,
            runs,
            service,
            worker_prefetch,
            worker_capacity,
            heartbeat_ms,
        } => {
            let options = majordome_bench::reqrep::ReqRepOptions {
                broker,
                majordome_exe: std::env::current_exe().context("cannot find the majordome binary")?,
                clients,
                workers,
                requests,
                size,
                window,
                service,
                baseline_proxy: baseline.is_some(),
                worker_capacity: worker_capacity.clamp(1, majordome_mdp::mdp::MAX_CAPACITY),
                idle_services,
                runs,
                idle_heartbeat: Duration::from_millis(heartbeat_ms.max(1)),
                broker_args: vec![
                    "--worker-prefetch".into(),
                    worker_prefetch.to_string(),
                    "--heartbeat-ms".into(),
                    heartbeat_ms.max(1).to_string(),
                ],
            };
            majordome_bench::reqrep::run(&options, &mut std::io::stdout())?;
        }
        Bench::State {
            endpoint,
            keys,
            size,
            updates,
            runs,
            baseline,
            data,
        } => {
            let options = majordome_bench::state::StateOptions {
                endpoint,
                keys,
                size,
                updates,
                runs,
                baseline_relay: baseline.is_some(),
                data,
            };
            majordome_bench::state::run(&options, &mut std::io::stdout())?;
        }
        Bench::Devices {
            clients,
            commands,
            values,
            sensors,
            window,
            runs,
            baseline,
            data,
            durability,
        } => {
            let options = majordome_bench::devices::DeviceOptions {
                clients,
                commands,
                values,
                sensors,
                window,
                runs,
                baseline_direct: baseline.is_some(),
                data,
                durability: durability.into(),
            };
            majordome_bench::devices::run(&options, &mut std::io::stdout())?;
        }
        Bench::Titanic {
            clients,
            requests,
            window,
            size,
            runs,
            baseline,
            data,
            durability,
        } => {
            let options = majordome_bench::titanic::TitanicOptions {
                durability: durability.into(),
                clients,
                requests,
                window,
                size,
                runs,
                baseline_direct: baseline.is_some(),
                data,
            };
            majordome_bench::titanic::run(&options, &mut std::io::stdout())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
