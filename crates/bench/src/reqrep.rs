//! `majordome bench reqrep`: C clients and W echo workers through an
//! MDP/0.1 broker, and optionally through a bare libzmq `zmq_proxy`
//! (ROUTER↔DEALER) with the same client and worker logic in the same run.
//! The proxy is the physical limit for this pattern: it relays frames and
//! does nothing else.
//!
//! Only standard MDP/0.1 frames are used, so `--broker` may point at any
//! RFC 7 broker.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use majordome_mdp::mdp;
use majordome_net as net;

/// What `majordome bench reqrep` was asked to do.
#[derive(Debug, Clone)]
pub struct ReqRepOptions {
    /// Broker to load; `None` spawns `majordome broker` (see `majordome_exe`) on a free port.
    pub broker: Option<String>,
    /// Path of the `majordome` binary, used to spawn a broker when `broker` is `None`.
    pub majordome_exe: std::path::PathBuf,
    /// Number of client threads.
    pub clients: usize,
    /// Number of echo worker threads.
    pub workers: usize,
    /// Total requests per run, split among the clients.
    pub requests: usize,
    /// Body size in bytes (at least 16).
    pub size: usize,
    /// Requests each client keeps in flight.
    pub window: usize,
    /// Service name the echo workers register.
    pub service: String,
    /// Also run a bare libzmq proxy in the same run and print the ratio.
    pub baseline_proxy: bool,
    /// Extra idle workers, each on its own service, registered during the run.
    pub idle_services: usize,
    /// Runs of each target; figures are medians.
    pub runs: usize,
    /// How often each idle worker heartbeats the broker.
    pub idle_heartbeat: Duration,
    /// Extra arguments for the broker the bench starts (when `broker` is
    /// `None`), e.g. `--worker-prefetch 4`.
    pub broker_args: Vec<String>,
}

/// Throughput and latency of one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Requests per second, end to end.
    pub requests_per_second: f64,
    /// Round-trip latency percentiles, microseconds.
    pub p50_us: f64,
    /// See `p50_us`.
    pub p90_us: f64,
    /// See `p50_us`.
    pub p99_us: f64,
    /// See `p50_us`.
    pub max_us: f64,
}

/// The medians of all runs.
#[derive(Debug, Clone)]
pub struct ReqRepReport {
    /// Through the broker.
    pub broker: Figures,
    /// Through the bare proxy, when asked for.
    pub proxy: Option<Figures>,
    /// Resident memory of the broker the bench started, after the idle
    /// services registered.
    pub broker_rss_kib: Option<u64>,
}

/// How long any single wait may last before the bench gives up with an error.
const STALL: Duration = Duration::from_secs(10);

/// Runs the benchmark, printing progress and results to `out`.
pub fn run(options: &ReqRepOptions, out: &mut dyn Write) -> Result<ReqRepReport> {
    validate(options)?;
    raise_fd_limit();
    let spawned = match &options.broker {
        Some(_) => None,
        None => Some(SpawnedBroker::start(&options.majordome_exe, &options.broker_args)?),
    };
    let endpoint = options
        .broker
        .clone()
        .or_else(|| spawned.as_ref().map(|s| s.endpoint.clone()))
        .expect("one or other");
    writeln!(
        out,
        "bench reqrep: {} clients x {} workers, {} requests of {} B, window {}, {} runs, broker {}{}",
        options.clients,
        options.workers,
        options.requests,
        options.size,
        options.window,
        options.runs,
        endpoint,
        if spawned.is_some() {
            " (started for this run)"
        } else {
            ""
        }
    )?;
    let fleet = if options.idle_services > 0 {
        let started = Instant::now();
        let fleet = IdleFleet::start(&endpoint, options.idle_services, options.idle_heartbeat)?;
        fleet.wait_registered(&endpoint)?;
        writeln!(
            out,
            "{} idle services registered in {:.2} s",
            options.idle_services,
            started.elapsed().as_secs_f64()
        )?;
        Some(fleet)
    } else {
        None
    };
    let broker_rss_kib = spawned.as_ref().and_then(|s| rss_kib(s.child.id()));
    if let Some(rss) = broker_rss_kib {
        writeln!(
            out,
            "broker RSS: {rss} KiB with {} idle services",
            options.idle_services
        )?;
    }
    out.flush()?;
    let proxy = if options.baseline_proxy {
        Some(Proxy::start()?)
    } else {
        None
    };
    let mut broker_runs = Vec::new();
    let mut proxy_runs = Vec::new();
    for run_index in 1..=options.runs {
        let target = Target::Broker {
            endpoint: endpoint.clone(),
            service: Bytes::from(options.service.clone()),
        };
        let figures = run_load(&target, options)?;
        writeln!(out, "run {run_index}/{} broker: {}", options.runs, describe(&figures))?;
        out.flush()?;
        broker_runs.push(figures);
        if let Some(proxy) = &proxy {
            let target = Target::Proxy {
                frontend: proxy.frontend.clone(),
                backend: proxy.backend.clone(),
            };
            let figures = run_load(&target, options)?;
            writeln!(out, "run {run_index}/{} proxy:  {}", options.runs, describe(&figures))?;
            out.flush()?;
            proxy_runs.push(figures);
        }
    }
    drop(fleet);
    let broker = median_figures(&broker_runs);
    let proxy_figures = (!proxy_runs.is_empty()).then(|| median_figures(&proxy_runs));
    writeln!(out, "median of {} runs:", options.runs)?;
    writeln!(out, "  broker: {}", describe(&broker))?;
    if let Some(proxy) = &proxy_figures {
        writeln!(out, "  proxy:  {}", describe(proxy))?;
        writeln!(
            out,
            "ratio broker/proxy: {:.2} (req/s), p50 latency {:.2}x the proxy's",
            broker.requests_per_second / proxy.requests_per_second,
            broker.p50_us / proxy.p50_us
        )?;
    }
    out.flush()?;
    Ok(ReqRepReport {
        broker,
        proxy: proxy_figures,
        broker_rss_kib,
    })
}

fn validate(options: &ReqRepOptions) -> Result<()> {
    ensure!(options.clients >= 1, "--clients must be at least 1");
    ensure!(options.workers >= 1, "--workers must be at least 1");
    ensure!(
        options.requests >= options.clients,
        "--requests must be at least --clients"
    );
    ensure!(
        options.size >= 16,
        "--size must be at least 16 bytes (the send time rides in the body)"
    );
    ensure!(options.window >= 1, "--window must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    ensure!(!options.service.is_empty(), "--service must not be empty");
    Ok(())
}

fn describe(figures: &Figures) -> String {
    format!(
        "{:.0} req/s, latency p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us",
        figures.requests_per_second, figures.p50_us, figures.p90_us, figures.p99_us, figures.max_us
    )
}

/// The median of `values` (the mean of the two middle ones when even).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.is_empty() {
        0.0
    } else if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

fn median_figures(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Figures {
        requests_per_second: pick(|f| f.requests_per_second),
        p50_us: pick(|f| f.p50_us),
        p90_us: pick(|f| f.p90_us),
        p99_us: pick(|f| f.p99_us),
        max_us: pick(|f| f.max_us),
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

/// Where the load goes, and how it is framed.
#[derive(Debug, Clone)]
enum Target {
    /// An MDP/0.1 broker: clients and workers both connect to it.
    Broker { endpoint: String, service: Bytes },
    /// A bare proxy: clients connect to its ROUTER, workers to its DEALER.
    Proxy { frontend: String, backend: String },
}

/// What one client measured: its latencies (µs) and when it finished.
type ClientRun = (Vec<u32>, Instant);

/// Runs one measured load against `target` and returns its figures.
fn run_load(target: &Target, options: &ReqRepOptions) -> Result<Figures> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<JoinHandle<Result<()>>> = (0..options.workers)
        .map(|_| {
            let target = target.clone();
            let stop = stop.clone();
            thread::spawn(move || echo_worker(&target, &stop))
        })
        .collect();
    let epoch = Instant::now();
    let barrier = Arc::new(Barrier::new(options.clients + 1));
    let clients: Vec<JoinHandle<Result<ClientRun>>> = (0..options.clients)
        .map(|index| {
            let share = options.requests / options.clients + usize::from(index < options.requests % options.clients);
            let target = target.clone();
            let barrier = barrier.clone();
            let (size, window) = (options.size, options.window);
            thread::spawn(move || client(&target, share, size, window, epoch, &barrier))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(options.requests);
    let mut end = start;
    let mut failure = None;
    for client in clients {
        match client.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))? {
            Ok((mut client_latencies, finished)) => {
                latencies.append(&mut client_latencies);
                end = end.max(finished);
            }
            Err(e) => failure = Some(e),
        }
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    latencies.sort_unstable();
    let elapsed = end.duration_since(start).as_secs_f64().max(1e-9);
    Ok(Figures {
        requests_per_second: options.requests as f64 / elapsed,
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p99_us: percentile(&latencies, 0.99),
        max_us: percentile(&latencies, 1.0),
    })
}

fn bench_socket(kind: zmq::SocketType, endpoint: &str) -> Result<zmq::Socket> {
    let socket = net::context().socket(kind)?;
    socket.set_linger(0)?;
    socket.set_sndhwm(100_000)?;
    socket.set_rcvhwm(100_000)?;
    socket
        .connect(endpoint)
        .with_context(|| format!("cannot connect to {endpoint}"))?;
    Ok(socket)
}

/// One client: a warm-up of `window` sequential round trips (so that every
/// connection and worker registration is in place), the barrier, then
/// `count` requests keeping `window` in flight. Latency comes from the send
/// time carried in the echoed body, so replies may come in any order.
fn client(
    target: &Target,
    count: usize,
    size: usize,
    window: usize,
    epoch: Instant,
    barrier: &Barrier,
) -> Result<ClientRun> {
    let endpoint = match target {
        Target::Broker { endpoint, .. } => endpoint,
        Target::Proxy { frontend, .. } => frontend,
    };
    let socket = match bench_socket(zmq::DEALER, endpoint) {
        Ok(socket) => socket,
        Err(e) => {
            barrier.wait();
            return Err(e);
        }
    };
    let filler = vec![b'x'; size - 8];
    let send = |socket: &zmq::Socket| -> Result<()> {
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        body.extend_from_slice(&filler);
        let frames = match target {
            Target::Broker { service, .. } => mdp::client_request(service, [Bytes::from(body)]),
            Target::Proxy { .. } => vec![Bytes::new(), Bytes::from(body)],
        };
        net::send_frames(socket, &frames, 0)?;
        Ok(())
    };
    let body_of = |frames: &[Bytes]| -> Option<u64> {
        let body = match target {
            Target::Broker { .. } => frames.get(3)?,
            Target::Proxy { .. } => frames.get(1)?,
        };
        Some(u64::from_le_bytes(body.get(..8)?.try_into().ok()?))
    };
    let warm_up = (|| -> Result<()> {
        for _ in 0..window.max(4) {
            send(&socket)?;
            wait_readable(&socket, endpoint)?;
            net::recv_all(&socket)?;
        }
        Ok(())
    })();
    barrier.wait();
    warm_up?;
    let mut latencies = Vec::with_capacity(count);
    let mut sent = 0;
    while latencies.len() < count {
        while sent < count && sent - latencies.len() < window {
            send(&socket)?;
            sent += 1;
        }
        wait_readable(&socket, endpoint)?;
        loop {
            let frames = match socket.recv_msg(zmq::DONTWAIT) {
                Ok(first) => {
                    let mut frames = vec![Bytes::copy_from_slice(&first)];
                    let mut more = first.get_more();
                    while more {
                        let next = socket.recv_msg(0)?;
                        more = next.get_more();
                        frames.push(Bytes::copy_from_slice(&next));
                    }
                    frames
                }
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            };
            let now = epoch.elapsed().as_nanos() as u64;
            let sent_at = body_of(&frames).context("a reply without the echoed body")?;
            latencies.push((now.saturating_sub(sent_at) / 1000) as u32);
        }
    }
    Ok((latencies, Instant::now()))
}

fn wait_readable(socket: &zmq::Socket, endpoint: &str) -> Result<()> {
    if socket.poll(zmq::POLLIN, STALL.as_millis() as i64)? == 0 {
        bail!(
            "no reply from {endpoint} within {} s: is a broker running there, and does it have echo workers?",
            STALL.as_secs()
        );
    }
    Ok(())
}

/// An echo worker: MDP/0.1 for a broker (with a HEARTBEAT whenever it has
/// been quiet for a second), or a plain envelope echo behind the proxy.
fn echo_worker(target: &Target, stop: &AtomicBool) -> Result<()> {
    let (endpoint, service) = match target {
        Target::Broker { endpoint, service } => (endpoint, Some(service)),
        Target::Proxy { backend, .. } => (backend, None),
    };
    let socket = bench_socket(zmq::DEALER, endpoint)?;
    if let Some(service) = service {
        net::send_frames(&socket, &mdp::ready(service), 0)?;
    }
    let mut last_sent = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if service.is_some() && last_sent.elapsed() >= Duration::from_secs(1) {
            net::send_frames(&socket, &mdp::heartbeat(), 0)?;
            last_sent = Instant::now();
        }
        if socket.poll(zmq::POLLIN, 100)? == 0 {
            continue;
        }
        while let Ok(first) = socket.recv_msg(zmq::DONTWAIT) {
            let mut frames = vec![Bytes::copy_from_slice(&first)];
            let mut more = first.get_more();
            while more {
                let next = socket.recv_msg(0)?;
                more = next.get_more();
                frames.push(Bytes::copy_from_slice(&next));
            }
            match service {
                None => net::send_frames(&socket, &frames, 0)?,
                Some(service) => match mdp::parse_to_worker(frames) {
                    Ok(mdp::ToWorker::Request { client, body }) => {
                        net::send_frames(&socket, &mdp::reply(&client, body), 0)?;
                        last_sent = Instant::now();
                    }
                    Ok(mdp::ToWorker::Disconnect) => net::send_frames(&socket, &mdp::ready(service), 0)?,
                    _ => {}
                },
            }
        }
    }
    if service.is_some() {
        let _ = net::send_frames(&socket, &mdp::disconnect(), 0);
    }
    Ok(())
}

/// A bare libzmq proxy on its own context (so its own I/O thread, as a
/// separate process would have).
struct Proxy {
    frontend: String,
    backend: String,
    control: zmq::Socket,
    thread: Option<JoinHandle<()>>,
    _context: zmq::Context,
}

impl Proxy {
    fn start() -> Result<Proxy> {
        let context = zmq::Context::new();
        let frontend = context.socket(zmq::ROUTER)?;
        let backend = context.socket(zmq::DEALER)?;
        for socket in [&frontend, &backend] {
            socket.set_linger(0)?;
            socket.set_sndhwm(100_000)?;
            socket.set_rcvhwm(100_000)?;
            socket.bind("tcp://127.0.0.1:0")?;
        }
        let frontend_endpoint = net::bound_endpoint(&frontend)?;
        let backend_endpoint = net::bound_endpoint(&backend)?;
        let control_address = "inproc://bench-proxy-control";
        let control_inside = context.socket(zmq::PAIR)?;
        control_inside.bind(control_address)?;
        let control = context.socket(zmq::PAIR)?;
        control.connect(control_address)?;
        let thread = thread::spawn(move || {
            let (mut frontend, mut backend, mut control) = (frontend, backend, control_inside);
            let _ = zmq::proxy_steerable(&mut frontend, &mut backend, &mut control);
        });
        Ok(Proxy {
            frontend: frontend_endpoint,
            backend: backend_endpoint,
            control,
            thread: Some(thread),
            _context: context,
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.control.send("TERMINATE", 0);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `majordome broker` started for the run, killed when dropped.
struct SpawnedBroker {
    child: Child,
    endpoint: String,
}

impl SpawnedBroker {
    fn start(exe: &Path, extra: &[String]) -> Result<SpawnedBroker> {
        let mut child = Command::new(exe)
            .args(["broker", "--bind", "tcp://127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    // Keep draining so the broker never blocks on stdout.
                    continue;
                }
            }
        });
        let mut spawned = SpawnedBroker {
            child,
            endpoint: String::new(),
        };
        let deadline = Instant::now() + STALL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = line_rx
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("the broker did not start within {STALL:?}"))?;
            if line.contains("listening on ") {
                spawned.endpoint = line.split_whitespace().last().unwrap_or_default().to_owned();
                return Ok(spawned);
            }
        }
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Many sockets need many descriptors: raise the soft limit to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// M idle workers, each on its own service `bench-idle-<i>`, all served by
/// one thread on their own context (a context allows 1023 sockets).
struct IdleFleet {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    count: usize,
}

impl IdleFleet {
    fn start(endpoint: &str, count: usize, heartbeat: Duration) -> Result<IdleFleet> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let endpoint = endpoint.to_owned();
        let thread = thread::spawn(move || -> Result<()> {
            let mut context = zmq::Context::new();
            let sockets = (0..count)
                .map(|i| -> Result<(zmq::Socket, Bytes)> {
                    let socket = context.socket(zmq::DEALER)?;
                    socket.set_linger(0)?;
                    socket.connect(&endpoint)?;
                    let service = Bytes::from(format!("bench-idle-{i}"));
                    net::send_frames(&socket, &mdp::ready(&service), 0)?;
                    Ok((socket, service))
                })
                .collect::<Result<Vec<_>>>()
                .context("cannot open the idle workers' sockets")?;
            // One pass a second over all sockets, never a poll over them:
            // waking on each of the broker's heartbeats would cost the bench
            // an O(M) poll per message and steal CPU from the clients it
            // measures.
            while !flag.load(Ordering::Relaxed) {
                for (socket, service) in &sockets {
                    while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
                        if frames.get(2).map(Vec::as_slice) == Some(&[mdp::command::DISCONNECT][..]) {
                            net::send_frames(socket, &mdp::ready(service), 0)?;
                        }
                    }
                    net::send_frames(socket, &mdp::heartbeat(), zmq::DONTWAIT)?;
                }
                let pass_started = Instant::now();
                while pass_started.elapsed() < heartbeat && !flag.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            for (socket, _) in &sockets {
                let _ = net::send_frames(socket, &mdp::disconnect(), zmq::DONTWAIT);
            }
            drop(sockets);
            let _ = context.destroy();
            Ok(())
        });
        Ok(IdleFleet {
            stop,
            thread: Some(thread),
            count,
        })
    }

    /// Waits until `mmi.service` says 200 for every idle service.
    fn wait_registered(&self, endpoint: &str) -> Result<()> {
        let client = bench_socket(zmq::DEALER, endpoint)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.count {
            let name = Bytes::from(format!("bench-idle-{i}"));
            loop {
                net::send_frames(&client, &mdp::client_request(b"mmi.service", [name.clone()]), 0)?;
                wait_readable(&client, endpoint)?;
                let reply = net::recv_all(&client)?;
                if reply.get(3).map(|f| f.as_ref()) == Some(&b"200"[..]) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the idle services did not all register within 30 s"
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }
}

impl Drop for IdleFleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ReqRepOptions {
        ReqRepOptions {
            broker: Some("tcp://127.0.0.1:1".into()),
            majordome_exe: "majordome".into(),
            clients: 2,
            workers: 2,
            requests: 400,
            size: 100,
            window: 4,
            service: "echo".into(),
            baseline_proxy: true,
            idle_services: 0,
            runs: 1,
            idle_heartbeat: Duration::from_secs(1),
            broker_args: vec![],
        }
    }

    #[test]
    fn percentiles_and_medians() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert_eq!(percentile(&[7], 0.5), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rejects_bad_options_with_a_reason() {
        type Change = fn(&mut ReqRepOptions);
        let cases: Vec<(Change, &str)> = vec![
            (|o| o.clients = 0, "--clients"),
            (|o| o.workers = 0, "--workers"),
            (|o| o.requests = 1, "--requests"),
            (|o| o.size = 8, "--size"),
            (|o| o.window = 0, "--window"),
            (|o| o.runs = 0, "--runs"),
        ];
        for (change, flag) in cases {
            let mut o = options();
            change(&mut o);
            let error = validate(&o).unwrap_err().to_string();
            assert!(error.contains(flag), "{error}");
        }
        assert!(validate(&options()).is_ok());
    }

    /// The proxy path end to end: every request is answered and the
    /// figures are consistent.
    #[test]
    fn a_small_load_through_the_proxy_completes() {
        let proxy = Proxy::start().unwrap();
        let target = Target::Proxy {
            frontend: proxy.frontend.clone(),
            backend: proxy.backend.clone(),
        };
        let figures = run_load(&target, &options()).unwrap();
        assert!(figures.requests_per_second > 0.0);
        assert!(
            figures.p50_us <= figures.p99_us && figures.p99_us <= figures.max_us,
            "{figures:?}"
        );
    }

    #[test]
    fn an_absent_broker_is_a_clear_error_not_a_hang() {
        let target = Target::Broker {
            endpoint: "tcp://127.0.0.1:1".into(),
            service: Bytes::from("echo"),
        };
        let error = run_load(
            &target,
            &ReqRepOptions {
                clients: 1,
                workers: 1,
                ..options()
            },
        )
        .unwrap_err();
        assert!(error.to_string().contains("no reply from tcp://127.0.0.1:1"), "{error}");
    }
}
