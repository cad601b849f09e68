//! What each command does. Everything here is a thin layer over the library
//! crates.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use majordome_broker::stats::Snapshot;
use majordome_client::{Bytes, Client, ClientOptions, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions};
use serde_json::Value;

use crate::cli::{Bench, BrokerArgs, Command, ConfigAction, ConfigArgs, EventArgs, UpArgs};
use majordome_hub::{Hub, HubConfig, Loaded, Override, Parts};

/// Runs one command.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Broker { config, broker } => broker_only(&config, &broker),
        Command::Up(args) => up(&args),
        Command::Config { action } => config_command(&action),
        Command::State(command) => crate::state_cmd::run(command),
        Command::Titanic { action } => crate::titanic_cmd::run(action),
        Command::Scenario { action, broker } => crate::scenario_cmd::run(action, &broker),
        Command::Forwarder { config, events } => forwarder_only(&config, &events),
        Command::Gateway { config, broker, http } => gateway_only(&config, broker, &http),
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
        Command::Backup { file, config, data } => crate::backup_cmd::backup(file.as_deref(), &config, data),
        Command::Restore { file, config, data } => crate::backup_cmd::restore(&file, &config, data),
        Command::User { user, config, data } => crate::backup_cmd::user(user, &config, data),
        Command::Token { token, config, data } => crate::backup_cmd::token(token, &config, data),
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

/// The configuration in effect: defaults, the file, then `overrides`.
pub fn load_config(config: &ConfigArgs, overrides: &[Override]) -> Result<Loaded> {
    Ok(Loaded::load(config.config.as_deref(), overrides)?)
}

/// Starts the parts of `config` that `parts` names; their endpoints are in
/// the returned hub.
pub fn start_hub(mut config: HubConfig, parts: Parts, shutdown: &Shutdown) -> Result<Hub> {
    config.parts = parts;
    Ok(Hub::start(&config, shutdown)?)
}

/// Waits for the hub to stop, and says why if a part stopped it.
pub fn wait_for(hub: Hub) -> Result<ExitCode> {
    hub.join()?;
    Ok(ExitCode::SUCCESS)
}

fn broker_only(config: &ConfigArgs, args: &BrokerArgs) -> Result<ExitCode> {
    let mut overrides = Vec::new();
    args.overrides(&mut overrides)?;
    let loaded = load_config(config, &overrides)?;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let parts = Parts {
        broker: true,
        ..Parts::none()
    };
    let hub = start_hub(loaded.config, parts, &shutdown)?;
    // Tests and the bench read this line to learn the port.
    println!("majordome broker listening on {}", hub.endpoints().broker);
    std::io::stdout().flush()?;
    wait_for(hub)
}

fn up(args: &UpArgs) -> Result<ExitCode> {
    // Settings first: nothing is bound or started for a bad configuration.
    let loaded = load_config(&args.config, &args.overrides()?)?;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let hub = start_hub(loaded.config.clone(), loaded.config.parts, &shutdown)?;
    let endpoints = hub.endpoints();
    let endpoint = &endpoints.broker;
    println!("majordome broker listening on {endpoint}");
    println!("  request/reply (MDP/0.1, MMI, Domogik dialect)  {endpoint}");
    println!("  events: publishers connect to                  {}", endpoints.publish);
    println!(
        "  events: subscribers connect to                 {}",
        endpoints.subscribe
    );
    crate::state_cmd::print_endpoints(&endpoints.state);
    println!(
        "  database                                       {}",
        endpoints.database.display()
    );
    if let Some(address) = endpoints.http {
        println!("  HTTP: JSON-RPC, metrics, status                http://{address}");
    }
    println!("  services                                       config (dbmgr, admin, dbmanager), manager, devices, history, scenario, echo, events, state, titanic.*, mmi.*");
    let plugins = hub.plugins();
    println!(
        "  plugin manifests                               {} from {}, {} shipped (started: {})",
        plugins.from_folder,
        loaded.config.plugins.folder.display(),
        plugins.shipped,
        if plugins.autostarted.is_empty() {
            "none".to_owned()
        } else {
            plugins.autostarted.join(", ")
        }
    );
    println!(
        "  configuration                                  {}",
        match &loaded.file {
            Some(path) => path.display().to_string(),
            None => "defaults and flags (no majordome.toml)".to_owned(),
        }
    );
    println!("try: majordome call echo ping.get '{{\"hello\": \"world\"}}' --broker {endpoint}");
    println!("stop with Ctrl-C");
    std::io::stdout().flush()?;
    wait_for(hub)
}

fn config_command(action: &ConfigAction) -> Result<ExitCode> {
    match action {
        ConfigAction::Show(args) => {
            let loaded = load_config(&args.config, &args.overrides()?)?;
            print!("{}", loaded.show());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn gateway_only(config: &ConfigArgs, broker: Option<String>, http: &crate::cli::HttpArgs) -> Result<ExitCode> {
    let mut overrides = Vec::new();
    http.overrides(&mut overrides);
    if let Some(broker) = broker {
        overrides.push(Override::new("listen.broker", "--broker", broker));
    }
    let loaded = load_config(config, &overrides)?;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let parts = Parts {
        gateway: true,
        ..Parts::none()
    };
    let hub = start_hub(loaded.config, parts, &shutdown)?;
    if let Some(address) = hub.endpoints().http {
        println!("majordome gateway listening on http://{address}");
    }
    std::io::stdout().flush()?;
    wait_for(hub)
}

fn forwarder_only(config: &ConfigArgs, args: &EventArgs) -> Result<ExitCode> {
    let mut overrides = Vec::new();
    args.overrides(&mut overrides);
    let loaded = load_config(config, &overrides)?;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let parts = Parts {
        events: true,
        ..Parts::none()
    };
    let hub = start_hub(loaded.config, parts, &shutdown)?;
    println!("majordome forwarder: publishers connect to {}", hub.endpoints().publish);
    println!(
        "majordome forwarder: subscribers listening on {}",
        hub.endpoints().subscribe
    );
    std::io::stdout().flush()?;
    wait_for(hub)
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

fn echo(endpoint: &str, service: &str, delay: Duration, heartbeat: Duration) -> Result<ExitCode> {
    anyhow::ensure!(!heartbeat.is_zero(), "--heartbeat-ms must be above 0");
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    println!("echo worker for service '{service}' on {endpoint}");
    std::io::stdout().flush()?;
    let options = WorkerOptions {
        heartbeat_interval: heartbeat,
        ..WorkerOptions::default()
    };
    Worker::new(endpoint, service, options).run(majordome_hub::echo_body(delay), &shutdown)?;
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
    if let Some(scenarios) = ask(&mut client, "scenario", "stats.get") {
        print!("{}", render_scenarios(&scenarios));
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

fn render_scenarios(stats: &Value) -> String {
    let number = |key: &str| stats[key].as_u64().unwrap_or(0);
    format!(
        "scenarios: {} ({} enabled); {} triggers fired from {} events and {} state changes; runs: {} ok, {} failed, \
         {} stopped, {} skipped by a condition; {} ignored while running, {} dropped past max_runs, \
         {} ignored as too fast (a loop?)\n",
        number("scenarios"),
        number("enabled"),
        number("triggers_fired"),
        number("events"),
        number("state_changes"),
        number("runs_ok"),
        number("runs_failed"),
        number("runs_stopped"),
        number("runs_skipped"),
        number("ignored_running"),
        number("dropped_max_runs"),
        number("throttled"),
    )
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
        "dropped messages: {}\nworkers expired: {}, disconnected for protocol errors: {}; logins refused: {}\n",
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        },
        stats.workers_expired,
        stats.workers_disconnected,
        stats.logins_refused
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
        Bench::Http {
            connections,
            requests,
            devices,
            events,
            runs,
        } => {
            let options = majordome_bench::http::HttpOptions {
                connections,
                requests,
                devices,
                events,
                runs,
            };
            majordome_bench::http::run(&options, &mut std::io::stdout())?;
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
            logins,
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
                logins,
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
        Bench::Scenario {
            samples,
            scenarios,
            events,
            window,
            runs,
            data,
        } => {
            let options = majordome_bench::scenario::ScenarioOptions {
                samples,
                scenarios,
                events,
                window,
                runs,
                data,
            };
            majordome_bench::scenario::run(&options, &mut std::io::stdout())?;
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
