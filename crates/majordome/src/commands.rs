//! What each command does. Everything here is a thin layer over the library
//! crates.

use std::io::Write;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use majordome_broker::stats::Snapshot;
use majordome_broker::Broker;
use majordome_client::{domogik_handler, Bytes, Client, ClientOptions, Message, Shutdown, Worker, WorkerOptions};
use majordome_mdp::domogik;
use serde_json::Value;

use crate::cli::{Bench, BrokerArgs, Command};

/// Runs one command.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Broker { broker } => broker_only(&broker),
        Command::Up { broker } => up(&broker),
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
    }
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

fn up(args: &BrokerArgs) -> Result<ExitCode> {
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let broker = Broker::bind(&args.bind, args.settings()?)?;
    let endpoint = broker.endpoint().to_owned();
    let broker_shutdown = shutdown.clone();
    let broker_thread = thread::Builder::new()
        .name("broker".into())
        .spawn(move || broker.run(&broker_shutdown))?;
    let echo_endpoint = endpoint.clone();
    let echo_shutdown = shutdown.clone();
    let echo_thread = thread::Builder::new().name("echo".into()).spawn(move || {
        Worker::new(&echo_endpoint, "echo", WorkerOptions::default()).run(echo_body(Duration::ZERO), &echo_shutdown)
    })?;
    println!("majordome broker listening on {endpoint}");
    println!("  request/reply (MDP/0.1, MMI, Domogik dialect)  {endpoint}");
    println!(
        "  services                                       echo, mmi.service, mmi.services, mmi.discovery, mmi.stats"
    );
    println!("try: majordome call echo ping.get '{{\"hello\": \"world\"}}' --broker {endpoint}");
    println!("stop with Ctrl-C");
    std::io::stdout().flush()?;
    shutdown.wait();
    let echo_result = echo_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the echo service panicked"))?;
    let broker_result = broker_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the broker panicked"))?;
    broker_result?;
    echo_result?;
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
    Ok(ExitCode::SUCCESS)
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
        "{:width$}  {:>7} {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>5}\n",
        "SERVICE", "WORKERS", "IDLE", "QUEUED", "REQUESTS", "REPLIES", "EXPIRED", "REJECTED", "LATE"
    );
    for (name, s) in &stats.services {
        out += &format!(
            "{name:width$}  {:>7} {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>5}\n",
            s.workers,
            s.idle_workers,
            s.queued,
            s.counters.requests,
            s.counters.replies,
            s.counters.expired,
            s.counters.rejected,
            s.counters.late_replies
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
    }
    Ok(ExitCode::SUCCESS)
}
