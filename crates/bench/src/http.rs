//! `majordome bench http`: the HTTP gateway's cost, against the bus in the
//! same run.
//!
//! 1. agorpc's `message` `{"command": "inventory"}` over `POST /jsonrpc`,
//!    from `connections` keep-alive HTTP/1.1 connections (one thread
//!    each), against the same call (`devices inventory.get`) made directly
//!    on the bus by as many synchronous clients: requests/s and latency;
//!    the ratio is the gateway's overhead.
//! 2. Events: one WebSocket client subscribed to a category and one bus
//!    subscriber to the same, while a publisher sends `events` of 100 B:
//!    events per second each received (and how many the WebSocket client
//!    was told it lost).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use majordome_client::{Message, Publisher, Subscriber};
use majordome_hub::{HubConfig, Parts};
use serde_json::{json, Value};

use crate::reqrep::{median, percentile};

/// What `majordome bench http` was asked to do.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub connections: usize,
    /// Requests per run, shared among the connections.
    pub requests: usize,
    /// Devices in the inventory.
    pub devices: usize,
    /// Events sent for the event comparison.
    pub events: usize,
    pub runs: usize,
}

/// Medians of the runs.
#[derive(Debug, Clone)]
pub struct HttpReport {
    pub gateway: Calls,
    pub direct: Calls,
    pub websocket_events_per_second: f64,
    pub bus_events_per_second: f64,
}

/// Throughput and latency of one way of calling.
#[derive(Debug, Clone, Copy)]
pub struct Calls {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// How long any single wait may last.
const STALL: Duration = Duration::from_secs(30);

struct Stack {
    http: String,
    broker: String,
    publish: String,
    subscribe: String,
    token: String,
    _background: crate::Background,
    _folder: Option<tempfile::TempDir>,
}

impl Stack {
    fn start(devices: usize) -> Result<Stack> {
        let (folder, path) = crate::data_folder(None, "majordome-bench-http")?;
        let mut tokens = majordome_access::tokens::Tokens::load(&path)?;
        let (_, token) = tokens.create("bench", None)?;
        tokens.save()?;
        let config = HubConfig::on_free_ports(
            &path,
            Parts {
                broker: true,
                events: true,
                state: true,
                devices: true,
                gateway: true,
                ..Parts::none()
            },
        );
        let (background, endpoints) = crate::Background::start_hub(&config)?;
        let http = endpoints.http.context("the gateway runs")?.to_string();
        let mut client = crate::client(&endpoints.broker);
        for n in 0..devices {
            let request = json!({"client": "plugin-bench.local", "id": format!("lamp-{n}"), "type": "switch"});
            let reply = client.request_message("devices", &Message::new("device.create.do", request))?;
            ensure!(reply.status() == Some(true), "device.create.do: {:?}", reply.reason());
        }
        Ok(Stack {
            http,
            broker: endpoints.broker,
            publish: endpoints.publish,
            subscribe: endpoints.subscribe,
            token,
            _background: background,
            _folder: folder,
        })
    }
}

/// Writes one line and flushes it.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        writeln!($out, $($arg)*)?;
        $out.flush()?;
    }};
}

pub fn run(options: &HttpOptions, out: &mut dyn Write) -> Result<HttpReport> {
    ensure!(
        options.connections >= 1 && options.requests >= options.connections,
        "--requests must be at least --connections"
    );
    ensure!(
        options.runs >= 1 && options.events >= 1,
        "--runs and --events must be at least 1"
    );
    let stack = Stack::start(options.devices)?;
    say!(
        out,
        "bench http: {} connections, {} requests of `message` inventory ({} devices) per run, {} runs; gateway http://{}",
        options.connections,
        options.requests,
        options.devices,
        options.runs,
        stack.http
    );
    let (mut gateway_runs, mut direct_runs, mut ws_rates, mut bus_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let gateway = load(options, |_| http_caller(&stack.http))?;
        say!(out, "run {run}/{} gateway: {}", options.runs, describe(&gateway));
        let direct = load(options, |_| direct_caller(&stack.broker))?;
        say!(out, "run {run}/{} direct:  {}", options.runs, describe(&direct));
        let got = events(&stack, options.events)?;
        say!(
            out,
            "run {run}/{} events: WebSocket {:.0}/s ({} of {}, {} reported lost), bus subscriber {:.0}/s ({} of {})",
            options.runs,
            got.websocket_rate,
            got.websocket_received,
            options.events,
            got.websocket_told_lost,
            got.bus_rate,
            got.bus_received,
            options.events
        );
        let (ws, bus) = (got.websocket_rate, got.bus_rate);
        gateway_runs.push(gateway);
        direct_runs.push(direct);
        ws_rates.push(ws);
        bus_rates.push(bus);
    }
    let medians = |runs: &[Calls]| Calls {
        per_second: median(&runs.iter().map(|c| c.per_second).collect::<Vec<_>>()),
        p50_us: median(&runs.iter().map(|c| c.p50_us).collect::<Vec<_>>()),
        p99_us: median(&runs.iter().map(|c| c.p99_us).collect::<Vec<_>>()),
    };
    let report = HttpReport {
        gateway: medians(&gateway_runs),
        direct: medians(&direct_runs),
        websocket_events_per_second: median(&ws_rates),
        bus_events_per_second: median(&bus_rates),
    };
    say!(out, "median of {} runs:", options.runs);
    say!(out, "  gateway (JSON-RPC over HTTP): {}", describe(&report.gateway));
    say!(out, "  direct on the bus:            {}", describe(&report.direct));
    say!(
        out,
        "ratio gateway/direct: {:.2} (req/s), p99 {:.2}x (latency)",
        report.gateway.per_second / report.direct.per_second,
        report.gateway.p99_us / report.direct.p99_us
    );
    say!(
        out,
        "events: one WebSocket client {:.0}/s, one bus subscriber {:.0}/s: ratio {:.2}",
        report.websocket_events_per_second,
        report.bus_events_per_second,
        report.websocket_events_per_second / report.bus_events_per_second
    );
    Ok(report)
}

fn describe(calls: &Calls) -> String {
    format!(
        "{:.0} req/s, latency p50 {:.0} us, p99 {:.0} us",
        calls.per_second, calls.p50_us, calls.p99_us
    )
}

/// Something that makes one call and waits for its answer.
type Caller = Box<dyn FnMut() -> Result<()> + Send>;

/// `requests` calls from `connections` threads, each with its own caller.
fn load(options: &HttpOptions, make: impl Fn(usize) -> Result<Caller>) -> Result<Calls> {
    let per = options.requests / options.connections;
    let mut callers = (0..options.connections).map(&make).collect::<Result<Vec<_>>>()?;
    // One warm-up call each: connections open, caches warm.
    for caller in &mut callers {
        caller()?;
    }
    let start = Instant::now();
    let threads: Vec<_> = callers
        .into_iter()
        .map(|mut caller| {
            thread::spawn(move || -> Result<Vec<u32>> {
                let mut latencies = Vec::with_capacity(per);
                for _ in 0..per {
                    let sent = Instant::now();
                    caller()?;
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per * options.connections);
    for thread in threads {
        latencies.extend(thread.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Calls {
        per_second: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

/// One keep-alive HTTP/1.1 connection posting agorpc's inventory message.
fn http_caller(address: &str) -> Result<Caller> {
    let stream = TcpStream::connect(address).with_context(|| format!("cannot connect to {address}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STALL))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let body = json!({"jsonrpc": "2.0", "method": "message", "params": {"content": {"command": "inventory"}}, "id": 1})
        .to_string();
    let request = format!(
        "POST /jsonrpc HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Ok(Box::new(move || {
        writer.write_all(request.as_bytes())?;
        let mut length = None;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        ensure!(status.contains(" 200 "), "the gateway answered {status:?}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let Some(length) = length else {
            bail!("no Content-Length in the gateway's answer")
        };
        let mut answer = vec![0u8; length];
        reader.read_exact(&mut answer)?;
        let answer: Value = serde_json::from_slice(&answer)?;
        ensure!(answer["result"]["devices"].is_object(), "not an inventory: {answer}");
        Ok(())
    }))
}

/// The same call directly on the bus.
fn direct_caller(broker: &str) -> Result<Caller> {
    let mut client = crate::client(broker);
    Ok(Box::new(move || {
        let reply = client.request_message("devices", &Message::new("inventory.get", json!({})))?;
        ensure!(reply.data["devices"].is_object(), "not an inventory: {:?}", reply.data);
        Ok(())
    }))
}

/// Sends `count` events as fast as one publisher can; what a WebSocket
/// client and a bus subscriber received, and how fast.
fn events(stack: &Stack, count: usize) -> Result<Received> {
    let category = "bench.http";
    // The WebSocket client, authenticated and subscribed.
    let stream = TcpStream::connect(&stack.http)?;
    stream.set_read_timeout(Some(STALL))?;
    let (mut socket, _) = tungstenite::client(format!("ws://{}/api/websocket", stack.http), stream)
        .map_err(|e| anyhow::anyhow!("WebSocket handshake: {e}"))?;
    let next = |socket: &mut tungstenite::WebSocket<TcpStream>| -> Result<Value> {
        loop {
            match socket.read()? {
                tungstenite::Message::Text(text) => return Ok(serde_json::from_str(&text)?),
                tungstenite::Message::Close(frame) => bail!("the gateway closed the WebSocket: {frame:?}"),
                _ => continue,
            }
        }
    };
    next(&mut socket)?;
    let auth = json!({"type": "auth", "access_token": stack.token}).to_string();
    socket.send(tungstenite::Message::text(auth))?;
    ensure!(
        next(&mut socket)?["type"] == "auth_ok",
        "the WebSocket refused the token"
    );
    let subscribe = json!({"id": 1, "type": "subscribe_events", "event_type": category}).to_string();
    socket.send(tungstenite::Message::text(subscribe))?;
    ensure!(next(&mut socket)?["success"] == true, "subscribe_events failed");
    let mut bus = Subscriber::connect_with_high_water_mark(&stack.subscribe, &[category], 1_000_000)?;
    let mut publisher = Publisher::connect(&stack.publish)?;
    ensure!(
        publisher.wait_for_subscriber(category, STALL)?,
        "nobody subscribed to {category}"
    );
    // Both subscriptions must have reached the publisher: one marker that
    // both see first.
    let marker = json!({"marker": true});
    publisher.publish(category, &marker)?;
    ensure!(bus.recv(STALL)?.is_some(), "the bus subscriber saw no marker");
    loop {
        let message = next(&mut socket)?;
        if message["type"] == "event" {
            break;
        }
    }
    let payload = json!({"n": 0, "pad": "x".repeat(80)});
    // Each receiver counts until a second passes without an event: what
    // the forwarder's queues could not hold is lost on the way (counted
    // below), and a rate is what arrived over the time it took.
    let quiet = Duration::from_secs(1);
    let start = Instant::now();
    // The first event may take long on a busy machine; after it, a quiet
    // second ends the count.
    let receiver = thread::spawn(move || -> Result<(u64, Duration)> {
        let (mut received, mut last) = (0u64, Duration::ZERO);
        let mut wait = STALL;
        while let Some(_event) = bus.recv(wait)? {
            received += 1;
            last = start.elapsed();
            wait = quiet;
        }
        Ok((received, last))
    });
    // Published from a thread of its own: this one reads the WebSocket
    // meanwhile, as a client that keeps up does.
    let sender = thread::spawn(move || -> Result<()> {
        for _ in 0..count {
            publisher.publish(category, &payload)?;
        }
        Ok(())
    });
    socket.get_mut().set_read_timeout(Some(STALL))?;
    let (mut received, mut lost, mut last) = (0u64, 0u64, Duration::ZERO);
    let mut counting = false;
    loop {
        let message = match socket.read() {
            Ok(tungstenite::Message::Text(text)) => serde_json::from_str::<Value>(&text)?,
            Ok(tungstenite::Message::Close(frame)) => bail!("the gateway closed the WebSocket: {frame:?}"),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                break
            }
            Err(e) => return Err(e.into()),
        };
        if message["type"] != "event" {
            continue;
        }
        match message["event"]["event_type"].as_str() {
            Some("event.overflow") => lost += message["event"]["data"]["dropped"].as_u64().unwrap_or(0),
            _ => {
                received += 1;
                last = start.elapsed();
            }
        }
        if !counting {
            // After the first, a quiet second ends the count.
            socket.get_mut().set_read_timeout(Some(quiet))?;
            counting = true;
        }
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))??;
    let (bus_received, bus_last) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the subscriber thread panicked"))??;
    ensure!(received > 0 && bus_received > 0, "no event arrived");
    Ok(Received {
        websocket_rate: received as f64 / last.as_secs_f64().max(1e-6),
        websocket_received: received,
        websocket_told_lost: lost,
        bus_rate: bus_received as f64 / bus_last.as_secs_f64().max(1e-6),
        bus_received,
    })
}

/// What the event comparison found.
struct Received {
    websocket_rate: f64,
    websocket_received: u64,
    websocket_told_lost: u64,
    bus_rate: f64,
    bus_received: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_measures_both_ways_and_the_events() {
        let options = HttpOptions {
            connections: 2,
            requests: 40,
            devices: 5,
            events: 200,
            runs: 1,
        };
        let mut out = Vec::new();
        let report = run(&options, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ratio gateway/direct"), "{text}");
        assert!(report.gateway.per_second > 0.0 && report.direct.per_second > 0.0);
        assert!(report.websocket_events_per_second > 0.0 && report.bus_events_per_second > 0.0);
    }
}
