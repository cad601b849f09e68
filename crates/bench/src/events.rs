//! `majordome bench events`: one publisher to S subscribers through the
//! event forwarder, and optionally through a bare libzmq XSUB/XPUB
//! `zmq_proxy` in the same run: the physical limit for this pattern.
//!
//! Both run in this process, each on its own ZeroMQ context (so each has its
//! own I/O thread, as a separate process would), with the same high-water
//! marks. The publisher sends as fast as it can; what counts is what the
//! subscribers receive.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use majordome_events::{Forwarder, Settings};
use majordome_net::{self as net, Shutdown};

use crate::reqrep::median;

/// What `majordome bench events` was asked to do.
#[derive(Debug, Clone)]
pub struct EventsOptions {
    /// An external forwarder's (publisher, subscriber) endpoints; `None`
    /// runs majordome's forwarder in this process.
    pub forwarder: Option<(String, String)>,
    /// Subscriber threads.
    pub subscribers: usize,
    /// Events per run.
    pub events: usize,
    /// Bytes of each event's JSON payload.
    pub size: usize,
    /// Also measure a bare XSUB/XPUB proxy.
    pub baseline_proxy: bool,
    /// Runs of each target; figures are medians.
    pub runs: usize,
    /// High-water mark of both forwarders, per subscriber.
    pub high_water_mark: i32,
}

/// Figures of one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventFigures {
    /// Events received per second, all subscribers together.
    pub delivered_per_second: f64,
    /// Share of the events each subscriber should have had that arrived.
    pub delivered_share: f64,
}

/// What one subscriber counted, and when its last event came.
type SubscriberRun = (u64, Option<Instant>);

/// How long a subscriber waits for the next event before the run is over.
const QUIET: Duration = Duration::from_secs(1);

/// Runs the benchmark and prints progress and results to `out`.
pub fn run(options: &EventsOptions, out: &mut dyn Write) -> Result<(EventFigures, Option<EventFigures>)> {
    ensure!(options.subscribers >= 1, "--subscribers must be at least 1");
    ensure!(options.events >= 1, "--events must be at least 1");
    ensure!(options.size >= 2, "--size must be at least 2 (a JSON payload)");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    ensure!(options.high_water_mark >= 1, "--high-water-mark must be at least 1");
    writeln!(
        out,
        "bench events: 1 publisher -> {} subscribers, {} events of {} B, {} runs, high-water mark {}",
        options.subscribers, options.events, options.size, options.runs, options.high_water_mark
    )?;
    let ours = match &options.forwarder {
        Some((publish, subscribe)) => Target::External {
            publish: publish.clone(),
            subscribe: subscribe.clone(),
        },
        None => Target::start_forwarder(options.high_water_mark)?,
    };
    let proxy = if options.baseline_proxy {
        Some(Target::start_proxy(options.high_water_mark)?)
    } else {
        None
    };
    let (mut forwarder_runs, mut proxy_runs) = (Vec::new(), Vec::new());
    for run_index in 1..=options.runs {
        let figures = measure(ours.endpoints(), options)?;
        writeln!(
            out,
            "run {run_index}/{} forwarder: {}",
            options.runs,
            describe(&figures)
        )?;
        out.flush()?;
        forwarder_runs.push(figures);
        if let Some(proxy) = &proxy {
            let figures = measure(proxy.endpoints(), options)?;
            writeln!(
                out,
                "run {run_index}/{} proxy:     {}",
                options.runs,
                describe(&figures)
            )?;
            out.flush()?;
            proxy_runs.push(figures);
        }
    }
    let medians = |runs: &[EventFigures]| EventFigures {
        delivered_per_second: median(&runs.iter().map(|f| f.delivered_per_second).collect::<Vec<_>>()),
        delivered_share: median(&runs.iter().map(|f| f.delivered_share).collect::<Vec<_>>()),
    };
    let forwarder = medians(&forwarder_runs);
    writeln!(out, "median of {} runs:", options.runs)?;
    writeln!(out, "  forwarder: {}", describe(&forwarder))?;
    let proxy_figures = (!proxy_runs.is_empty()).then(|| medians(&proxy_runs));
    if let Some(proxy) = &proxy_figures {
        writeln!(out, "  proxy:     {}", describe(proxy))?;
        writeln!(
            out,
            "ratio forwarder/proxy: {:.2} (events/s delivered)",
            forwarder.delivered_per_second / proxy.delivered_per_second
        )?;
    }
    out.flush()?;
    drop(ours);
    drop(proxy);
    Ok((forwarder, proxy_figures))
}

fn describe(figures: &EventFigures) -> String {
    format!(
        "{:.0} events/s delivered, {:.1}% of events reached each subscriber",
        figures.delivered_per_second,
        figures.delivered_share * 100.0
    )
}

/// Something events go through.
enum Target {
    /// majordome's forwarder or a bare proxy, running in this process.
    Local {
        publish: String,
        subscribe: String,
        stop: Box<dyn FnMut() + Send>,
        thread: Option<JoinHandle<()>>,
    },
    /// A forwarder elsewhere.
    External { publish: String, subscribe: String },
}

impl Target {
    fn start_forwarder(high_water_mark: i32) -> Result<Target> {
        let settings = Settings {
            high_water_mark,
            ..Settings::default()
        };
        let forwarder = Forwarder::bind("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", settings)?;
        let (publish, subscribe) = (
            forwarder.publisher_endpoint().to_owned(),
            forwarder.subscriber_endpoint().to_owned(),
        );
        let shutdown = Shutdown::new()?;
        let inside = shutdown.clone();
        let thread = thread::spawn(move || {
            if let Err(e) = forwarder.run(&inside) {
                eprintln!("the forwarder failed: {e}");
            }
        });
        Ok(Target::Local {
            publish,
            subscribe,
            stop: Box::new(move || shutdown.trigger()),
            thread: Some(thread),
        })
    }

    fn start_proxy(high_water_mark: i32) -> Result<Target> {
        let context = zmq::Context::new();
        let xsub = context.socket(zmq::XSUB)?;
        let xpub = context.socket(zmq::XPUB)?;
        for socket in [&xsub, &xpub] {
            socket.set_linger(0)?;
            socket.set_sndhwm(high_water_mark)?;
            socket.set_rcvhwm(high_water_mark)?;
            socket.bind("tcp://127.0.0.1:0")?;
        }
        let (publish, subscribe) = (net::bound_endpoint(&xsub)?, net::bound_endpoint(&xpub)?);
        let control_inside = context.socket(zmq::PAIR)?;
        control_inside.bind("inproc://bench-events-proxy")?;
        let control = context.socket(zmq::PAIR)?;
        control.connect("inproc://bench-events-proxy")?;
        let thread = thread::spawn(move || {
            let (mut xsub, mut xpub, mut control) = (xsub, xpub, control_inside);
            let _ = zmq::proxy_steerable(&mut xsub, &mut xpub, &mut control);
            drop((xsub, xpub, control));
            drop(context);
        });
        let stop = move || {
            let _ = control.send("TERMINATE", 0);
        };
        Ok(Target::Local {
            publish,
            subscribe,
            stop: Box::new(stop),
            thread: Some(thread),
        })
    }

    fn endpoints(&self) -> (&str, &str) {
        match self {
            Target::Local { publish, subscribe, .. } | Target::External { publish, subscribe } => (publish, subscribe),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Target::Local { stop, thread, .. } = self {
            stop();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// One run: subscribers connect and receive a warm-up event each, then the
/// publisher sends `events` as fast as it can and each subscriber counts
/// what arrives until `QUIET` passes without one.
fn measure((publish, subscribe): (&str, &str), options: &EventsOptions) -> Result<EventFigures> {
    let warmed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(options.subscribers + 1));
    let subscribers: Vec<JoinHandle<Result<SubscriberRun>>> = (0..options.subscribers)
        .map(|_| {
            let (endpoint, warmed, done, barrier) =
                (subscribe.to_owned(), warmed.clone(), done.clone(), barrier.clone());
            thread::spawn(move || subscriber(&endpoint, &warmed, &done, &barrier))
        })
        .collect();
    let publisher = net::context().socket(zmq::PUB)?;
    publisher.set_linger(0)?;
    publisher.set_sndhwm(1_000_000)?;
    publisher
        .connect(publish)
        .with_context(|| format!("cannot connect to {publish}"))?;
    // Warm up until every subscriber has had an event: only then are all
    // subscriptions in place end to end.
    let warm = [Bytes::from_static(b"bench.warm.0_0.0_1"), Bytes::from_static(b"{}")];
    let started = Instant::now();
    while warmed.load(Ordering::SeqCst) < options.subscribers as u64 {
        net::send_frames(&publisher, &warm, zmq::DONTWAIT).ok();
        thread::sleep(Duration::from_millis(5));
        if started.elapsed() > Duration::from_secs(10) {
            done.store(true, Ordering::SeqCst);
            barrier.wait();
            bail!("the subscribers got nothing through {publish} -> {subscribe} within 10 s: is a forwarder there?");
        }
    }
    barrier.wait();
    let payload = format!("\"{}\"", "x".repeat(options.size - 2));
    let start = Instant::now();
    for _ in 0..options.events {
        let frames = [Bytes::from_static(b"bench.event.0_0.0_1"), Bytes::from(payload.clone())];
        net::send_frames(&publisher, &frames, 0)?;
    }
    let mut delivered = 0;
    let mut last = start;
    for subscriber in subscribers {
        let (count, at) = subscriber
            .join()
            .map_err(|_| anyhow::anyhow!("a subscriber panicked"))??;
        delivered += count;
        if let Some(at) = at {
            last = last.max(at);
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-9);
    Ok(EventFigures {
        delivered_per_second: delivered as f64 / elapsed,
        delivered_share: delivered as f64 / (options.events * options.subscribers) as f64,
    })
}

fn subscriber(
    endpoint: &str,
    warmed: &AtomicU64,
    done: &AtomicBool,
    barrier: &Barrier,
) -> Result<(u64, Option<Instant>)> {
    let socket = net::context().socket(zmq::SUB)?;
    socket.set_linger(0)?;
    socket.set_rcvhwm(1_000_000)?;
    socket.connect(endpoint)?;
    socket.set_subscribe(b"bench.")?;
    // Warm-up: wait for one event, then for the start.
    while !done.load(Ordering::SeqCst) {
        if socket.poll(zmq::POLLIN, 50)? > 0 {
            net::recv_all(&socket)?;
            warmed.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    barrier.wait();
    let mut count = 0;
    let mut last = None;
    while socket.poll(zmq::POLLIN, QUIET.as_millis() as i64)? > 0 {
        while let Ok(message) = socket.recv_msg(zmq::DONTWAIT) {
            let mut more = message.get_more();
            let is_warm = message.ends_with(b"warm.0_0.0_1");
            while more {
                more = socket.recv_msg(0)?.get_more();
            }
            if !is_warm {
                count += 1;
                last = Some(Instant::now());
            }
        }
    }
    Ok((count, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both targets end to end on a small run: every subscriber gets events
    /// and the figures are consistent.
    #[test]
    fn a_small_run_through_both_targets() {
        let options = EventsOptions {
            forwarder: None,
            subscribers: 3,
            events: 2_000,
            size: 100,
            baseline_proxy: true,
            runs: 1,
            high_water_mark: 100_000,
        };
        let mut out = Vec::new();
        let (forwarder, proxy) = run(&options, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ratio forwarder/proxy"), "{text}");
        for figures in [forwarder, proxy.unwrap()] {
            assert!(figures.delivered_per_second > 0.0);
            // A high-water mark above the event count: nothing may be lost.
            assert_eq!(figures.delivered_share, 1.0, "{text}");
        }
    }

    #[test]
    fn an_absent_forwarder_is_a_clear_error() {
        let options = EventsOptions {
            forwarder: Some(("tcp://127.0.0.1:1".into(), "tcp://127.0.0.1:2".into())),
            subscribers: 1,
            events: 10,
            size: 10,
            baseline_proxy: false,
            runs: 1,
            high_water_mark: 10,
        };
        let error = run(&options, &mut Vec::new()).unwrap_err().to_string();
        assert!(error.contains("is a forwarder there?"), "{error}");
    }
}
