//! `majordome bench reqrep`: C clients and W echo workers through an
//! MDP/0.1 broker, and optionally through a bare libzmq `zmq_proxy`
//! (ROUTER↔DEALER) with the same client and worker logic in the same run.
//! The proxy is the physical limit for this pattern: it relays frames and
//! does nothing else.
//!
//! Only standard MDP/0.1 frames (and RFC 8's `mmi.service`, to wait for the
//! idle services) are used, so `--broker` may point at any RFC 7 broker.

mod idle;
mod load;
mod proxy;
mod spawn;
#[cfg(test)]
mod test_broker;

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;

use idle::IdleFleet;
#[cfg(test)]
use load::run_load;
use load::{measure, EchoWorkers, Target};
use proxy::Proxy;
use spawn::SpawnedBroker;

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
    /// What each echo worker announces in READY (1: a plain RFC 7 worker).
    pub worker_capacity: u32,
    /// Extra idle workers, each on its own service, registered during the run.
    pub idle_services: usize,
    /// Runs of each target; figures are medians.
    pub runs: usize,
    /// How often each idle worker heartbeats the broker.
    pub idle_heartbeat: Duration,
    /// Extra arguments for the broker the bench starts (when `broker` is
    /// `None`), e.g. `--worker-prefetch 4`.
    pub broker_args: Vec<String>,
    /// Have the broker the bench starts ask for logins (`loopback =
    /// "authenticated"`), and log every client and worker in: the cost of
    /// ZAP and of reading each message's identity.
    pub logins: bool,
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
    /// On-CPU time of the broker (all its threads) or of the proxy (its
    /// thread and its context's), per request, microseconds: the work the
    /// relay itself did, which a busy machine does not change as much as
    /// it changes the throughput. `None` for a broker the bench did not
    /// start.
    pub cpu_us_per_request: Option<f64>,
}

/// The medians of all runs.
#[derive(Debug, Clone)]
pub struct ReqRepReport {
    /// Through the broker.
    pub broker: Figures,
    /// Through the bare proxy, when asked for.
    pub proxy: Option<Figures>,
    /// Resident memory of the broker the bench started, after the idle
    /// services registered and before the load ran.
    pub broker_rss_kib: Option<u64>,
}

/// How long any single wait may last before the bench gives up with an error.
const STALL: Duration = Duration::from_secs(10);

/// How long the idle services may take to register, all together.
const REGISTRATION_DEADLINE: Duration = Duration::from_secs(30);

/// Writes one line to `out` and flushes it: runs can take a while, and
/// whoever watches (or pipes the output to `tee`) should see each line as
/// soon as it is known.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        writeln!($out, $($arg)*)?;
        $out.flush()?;
    }};
}

/// Runs the benchmark, printing progress and results to `out`.
///
/// For each of `options.runs` runs, loads the broker (and then the bare
/// proxy, with `baseline_proxy`), printing one line per measured run, then
/// prints the medians, the broker/proxy `ratio` line and the broker's RSS,
/// and returns them. Fails with a readable error if the options make no
/// sense, if the broker cannot be started or reached, or if any wait for a
/// reply lasts more than 10 s: the bench never hangs.
pub fn run(options: &ReqRepOptions, out: &mut dyn Write) -> Result<ReqRepReport> {
    validate(options)?;
    // Each idle service costs two descriptors (its TCP connection and its
    // socket's mailbox), and the default soft limit is often 1024.
    spawn::raise_fd_limit();
    ensure!(
        !(options.logins && options.broker.is_some()),
        "--logins needs a broker the bench starts (no --broker)"
    );
    // With logins: a data folder with one user, and a configuration that
    // makes the broker ask every client to log in.
    let logins = if options.logins {
        let folder = tempfile::tempdir().context("cannot make a data folder for the broker")?;
        let mut users = majordome_access::Users::load(folder.path())?;
        let secret = users.add("bench")?;
        users.save()?;
        let file = folder.path().join("majordome.toml");
        std::fs::write(
            &file,
            format!(
                "data = {:?}\n[security]\nloopback = \"authenticated\"\n",
                folder.path().display().to_string()
            ),
        )?;
        Some((folder, file, secret))
    } else {
        None
    };
    let mut broker_args = options.broker_args.clone();
    if let Some((_, file, _)) = &logins {
        broker_args.extend(["--config".to_owned(), file.display().to_string()]);
    }
    let spawned = match &options.broker {
        Some(_) => None,
        None => Some(SpawnedBroker::start(&options.majordome_exe, &broker_args)?),
    };
    let endpoint = match (&options.broker, &spawned) {
        (Some(endpoint), _) => endpoint.clone(),
        (None, Some(spawned)) => spawned.endpoint.clone(),
        (None, None) => unreachable!("a broker is spawned when none is given"),
    };
    if let Some((_, _, secret)) = &logins {
        majordome_net::zap::share_login(&endpoint, "bench", secret);
    }
    say!(
        out,
        "bench reqrep: {} clients x {} workers, {} requests of {} B, window {}, {} runs, broker {}{}{}",
        options.clients,
        options.workers,
        options.requests,
        options.size,
        options.window,
        options.runs,
        endpoint,
        if spawned.is_some() {
            " (started by the bench)"
        } else {
            ""
        },
        if options.logins {
            ", every client and worker logged in (PLAIN, ZAP)"
        } else {
            ""
        }
    );
    let fleet = if options.idle_services > 0 {
        let started = Instant::now();
        let mut fleet = IdleFleet::start(&endpoint, options.idle_services, options.idle_heartbeat)?;
        fleet.wait_registered(&endpoint, REGISTRATION_DEADLINE)?;
        say!(
            out,
            "{} idle services registered in {:.2} s",
            options.idle_services,
            started.elapsed().as_secs_f64()
        );
        Some(fleet)
    } else {
        None
    };
    // Measured now, with the idle services in and before any load, so that
    // it shows what the registered services cost and not the queues.
    let broker_rss_kib = spawned.as_ref().and_then(|s| spawn::rss_kib(s.pid()));

    let broker_target = Target::Broker {
        endpoint: endpoint.clone(),
        service: Bytes::from(options.service.clone()),
        capacity: options.worker_capacity,
    };
    let mut broker_workers = EchoWorkers::start(&broker_target, options.workers)?;
    // The workers of each target live through all its runs, so that no
    // run starts while a broker still holds (and feeds) workers of the
    // previous one, and a broker's bookkeeping of leaving workers is not
    // part of the bench.
    let mut baseline = if options.baseline_proxy {
        let proxy = Proxy::start()?;
        let workers = EchoWorkers::start(&proxy.target(), options.workers)?;
        Some((proxy, workers))
    } else {
        None
    };
    let mut broker_runs = Vec::with_capacity(options.runs);
    let mut proxy_runs = Vec::with_capacity(options.runs);
    let broker_cpu = || spawned.as_ref().and_then(SpawnedBroker::cpu_ns);
    for run_index in 1..=options.runs {
        let figures = measure_with_cpu(&broker_target, options, &mut broker_workers, broker_cpu)?;
        say!(out, "run {run_index}/{} broker: {}", options.runs, describe(&figures));
        broker_runs.push(figures);
        if let Some((proxy, workers)) = &mut baseline {
            let figures = measure_with_cpu(&proxy.target(), options, workers, || proxy.cpu_ns())?;
            say!(out, "run {run_index}/{} proxy:  {}", options.runs, describe(&figures));
            proxy_runs.push(figures);
        }
    }
    broker_workers.stop()?;
    if let Some((proxy, workers)) = baseline {
        workers.stop()?;
        drop(proxy);
    }
    drop(fleet);

    let broker = median_figures(&broker_runs);
    let proxy = (!proxy_runs.is_empty()).then(|| median_figures(&proxy_runs));
    say!(out, "median of {} runs:", options.runs);
    say!(out, "  broker: {}", describe(&broker));
    if let Some(proxy) = &proxy {
        say!(out, "  proxy:  {}", describe(proxy));
        say!(out, "{}", ratio_line(&broker, proxy));
    }
    if let Some(rss) = broker_rss_kib {
        say!(
            out,
            "broker RSS: {rss} KiB with {} idle services, before the load",
            options.idle_services
        );
    }
    Ok(ReqRepReport {
        broker,
        proxy,
        broker_rss_kib,
    })
}

fn validate(options: &ReqRepOptions) -> Result<()> {
    ensure!(options.clients >= 1, "--clients must be at least 1");
    ensure!(options.workers >= 1, "--workers must be at least 1");
    ensure!(
        options.requests >= options.clients,
        "--requests ({}) must be at least --clients ({}): each client sends at least one",
        options.requests,
        options.clients
    );
    ensure!(
        options.size >= 16,
        "--size must be at least 16 bytes (the send time rides in the body), not {}",
        options.size
    );
    ensure!(options.window >= 1, "--window must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    ensure!(!options.service.is_empty(), "--service must not be empty");
    ensure!(
        options.idle_services == 0 || !options.idle_heartbeat.is_zero(),
        "the idle workers' heartbeat interval must be more than zero"
    );
    Ok(())
}

/// [`measure`], with the on-CPU time that `cpu_ns` reads before and after
/// divided among the requests.
fn measure_with_cpu(
    target: &Target,
    options: &ReqRepOptions,
    workers: &mut EchoWorkers,
    cpu_ns: impl Fn() -> Option<u64>,
) -> Result<Figures> {
    let before = cpu_ns();
    let figures = measure(target, options, workers)?;
    let used = before.zip(cpu_ns()).map(|(before, after)| after.saturating_sub(before));
    Ok(Figures {
        cpu_us_per_request: used.map(|ns| ns as f64 / 1000.0 / options.requests as f64),
        ..figures
    })
}

/// One measured run or median, on one line: easy to read and to grep.
fn describe(figures: &Figures) -> String {
    let cpu = figures
        .cpu_us_per_request
        .map(|us| format!(", CPU {us:.1} us/req"))
        .unwrap_or_default();
    format!(
        "{:.0} req/s, latency p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us{cpu}",
        figures.requests_per_second, figures.p50_us, figures.p90_us, figures.p99_us, figures.max_us
    )
}

fn ratio_line(broker: &Figures, proxy: &Figures) -> String {
    let latency = if proxy.p50_us > 0.0 {
        format!("{:.2}x", broker.p50_us / proxy.p50_us)
    } else {
        // Latencies are whole microseconds; a zero median cannot be divided by.
        "n/a".to_owned()
    };
    let cpu = match (broker.cpu_us_per_request, proxy.cpu_us_per_request) {
        (Some(broker), Some(proxy)) if proxy > 0.0 => format!(", CPU per request {:.2}x", broker / proxy),
        _ => String::new(),
    };
    format!(
        "ratio broker/proxy: {:.2} (req/s), p50 {latency} (latency){cpu}",
        broker.requests_per_second / proxy.requests_per_second
    )
}

/// The median of `values` (the mean of the two middle ones when even; 0
/// when empty).
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

/// Field by field median of several runs' figures.
fn median_figures(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Figures {
        requests_per_second: pick(|f| f.requests_per_second),
        p50_us: pick(|f| f.p50_us),
        p90_us: pick(|f| f.p90_us),
        p99_us: pick(|f| f.p99_us),
        max_us: pick(|f| f.max_us),
        cpu_us_per_request: runs
            .iter()
            .map(|f| f.cpu_us_per_request)
            .collect::<Option<Vec<f64>>>()
            .filter(|cpu| !cpu.is_empty())
            .map(|cpu| median(&cpu)),
    }
}

/// The `q` quantile (0..=1) of ascending `sorted` values, by nearest rank
/// (so always one of the values; 0 when there are none).
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

/// The figures of one run: `requests` answered in `elapsed`, with these
/// latencies (microseconds, in any order).
fn figures_of(mut latencies: Vec<u32>, requests: usize, elapsed: Duration) -> Figures {
    latencies.sort_unstable();
    Figures {
        requests_per_second: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: percentile(&latencies, 0.50),
        p90_us: percentile(&latencies, 0.90),
        p99_us: percentile(&latencies, 0.99),
        max_us: percentile(&latencies, 1.0),
        cpu_us_per_request: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn options() -> ReqRepOptions {
        ReqRepOptions {
            broker: Some("tcp://127.0.0.1:1".into()),
            majordome_exe: "majordome".into(),
            clients: 2,
            workers: 2,
            requests: 200,
            size: 100,
            window: 4,
            service: "echo".into(),
            baseline_proxy: true,
            worker_capacity: 1,
            idle_services: 0,
            runs: 1,
            idle_heartbeat: Duration::from_secs(1),
            broker_args: vec![],
            logins: false,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.9), 90.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&[7], 0.5), 7.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert_eq!(percentile(&[1, 2, 3], 0.5), 2.0);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn medians_take_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
        let run = |r: f64, p50: f64| Figures {
            requests_per_second: r,
            p50_us: p50,
            p90_us: p50 * 2.0,
            p99_us: p50 * 3.0,
            max_us: p50 * 4.0,
            cpu_us_per_request: Some(p50 / 10.0),
        };
        // Each field is the median of that field, not the figures of the median run.
        let median = median_figures(&[run(100.0, 30.0), run(300.0, 10.0), run(200.0, 20.0)]);
        assert_eq!(median, run(200.0, 20.0));
        let median = median_figures(&[run(100.0, 50.0), run(300.0, 10.0), run(200.0, 20.0)]);
        assert_eq!(median.requests_per_second, 200.0);
        assert_eq!(median.p50_us, 20.0);
        assert_eq!(median.cpu_us_per_request, Some(2.0));
        // CPU time is a median only when every run has it.
        let unknown = Figures {
            cpu_us_per_request: None,
            ..run(400.0, 40.0)
        };
        let median = median_figures(&[run(100.0, 50.0), unknown, run(200.0, 20.0)]);
        assert_eq!(median.cpu_us_per_request, None);
    }

    #[test]
    fn figures_sort_the_latencies_and_divide_by_the_elapsed_time() {
        let latencies: Vec<u32> = (1..=1000).rev().collect();
        let figures = figures_of(latencies, 1000, Duration::from_millis(500));
        assert_eq!(
            figures,
            Figures {
                requests_per_second: 2000.0,
                p50_us: 500.0,
                p90_us: 900.0,
                p99_us: 990.0,
                max_us: 1000.0,
                cpu_us_per_request: None,
            }
        );
    }

    #[test]
    fn the_ratio_line_names_both_ratios() {
        let broker = Figures {
            requests_per_second: 830.0,
            p50_us: 112.0,
            p90_us: 0.0,
            p99_us: 0.0,
            max_us: 0.0,
            cpu_us_per_request: None,
        };
        let proxy = Figures {
            requests_per_second: 1000.0,
            p50_us: 100.0,
            ..broker
        };
        assert_eq!(
            ratio_line(&broker, &proxy),
            "ratio broker/proxy: 0.83 (req/s), p50 1.12x (latency)"
        );
        let instant = Figures { p50_us: 0.0, ..proxy };
        assert!(ratio_line(&broker, &instant).contains("p50 n/a"));
        let broker = Figures {
            cpu_us_per_request: Some(15.0),
            ..broker
        };
        let proxy = Figures {
            cpu_us_per_request: Some(12.0),
            ..proxy
        };
        assert_eq!(
            ratio_line(&broker, &proxy),
            "ratio broker/proxy: 0.83 (req/s), p50 1.12x (latency), CPU per request 1.25x"
        );
    }

    #[test]
    fn rejects_bad_options_with_a_reason() {
        type Change = fn(&mut ReqRepOptions);
        let cases: Vec<(Change, &str)> = vec![
            (|o| o.clients = 0, "--clients must be at least 1"),
            (|o| o.workers = 0, "--workers must be at least 1"),
            (|o| o.requests = 1, "--requests (1) must be at least --clients (2)"),
            (|o| o.size = 15, "--size must be at least 16 bytes"),
            (|o| o.window = 0, "--window must be at least 1"),
            (|o| o.runs = 0, "--runs must be at least 1"),
            (|o| o.service.clear(), "--service must not be empty"),
            (
                |o| {
                    o.idle_services = 3;
                    o.idle_heartbeat = Duration::ZERO;
                },
                "heartbeat interval",
            ),
        ];
        for (change, reason) in cases {
            let mut o = options();
            change(&mut o);
            let error = validate(&o).unwrap_err().to_string();
            assert!(error.contains(reason), "{error}");
            // `run` refuses before touching the network or spawning anything.
            let error = run(&o, &mut Vec::new()).unwrap_err().to_string();
            assert!(error.contains(reason), "{error}");
        }
        assert!(validate(&options()).is_ok());
        let edge = ReqRepOptions {
            clients: 1,
            workers: 1,
            requests: 1,
            size: 16,
            window: 1,
            runs: 1,
            ..options()
        };
        assert!(validate(&edge).is_ok());
    }

    /// The proxy path end to end: every request is answered and the
    /// figures are consistent.
    #[test]
    fn a_small_load_through_the_proxy_completes() {
        let proxy = Proxy::start().unwrap();
        let figures = run_load(&proxy.target(), &options()).unwrap();
        assert!(figures.requests_per_second > 0.0, "{figures:?}");
        assert!(
            0.0 <= figures.p50_us
                && figures.p50_us <= figures.p90_us
                && figures.p90_us <= figures.p99_us
                && figures.p99_us <= figures.max_us,
            "{figures:?}"
        );
    }

    /// Uneven shares, a window wider than a client's share, and more
    /// workers than clients all complete.
    #[test]
    fn odd_shapes_through_the_proxy_complete() {
        let proxy = Proxy::start().unwrap();
        let options = ReqRepOptions {
            clients: 3,
            workers: 5,
            requests: 7,
            size: 16,
            window: 10,
            ..options()
        };
        let figures = run_load(&proxy.target(), &options).unwrap();
        assert!(figures.requests_per_second > 0.0, "{figures:?}");
        assert!(figures.p50_us <= figures.max_us, "{figures:?}");
    }

    /// The whole of `run` against a small RFC 7 broker: the MDP framing,
    /// the idle services and their MMI check, several interleaved runs
    /// sharing each target's workers, and the output.
    #[test]
    fn run_against_a_minimal_mdp_broker_with_the_proxy_baseline() {
        let broker = test_broker::TestBroker::start();
        let options = ReqRepOptions {
            broker: Some(broker.endpoint.clone()),
            idle_services: 5,
            idle_heartbeat: Duration::from_millis(100),
            runs: 2,
            ..options()
        };
        let mut out = Vec::new();
        let report = run(&options, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        for figures in [report.broker, report.proxy.expect("the proxy was asked for")] {
            assert!(figures.requests_per_second > 0.0, "{figures:?}");
            assert!(
                figures.p50_us <= figures.p99_us && figures.p99_us <= figures.max_us,
                "{figures:?}"
            );
        }
        assert_eq!(report.broker_rss_kib, None, "only a spawned broker is measured");
        for expected in [
            "5 idle services registered in ",
            "run 1/2 broker: ",
            "run 1/2 proxy: ",
            "run 2/2 broker: ",
            "run 2/2 proxy: ",
            "median of 2 runs:",
            "ratio broker/proxy: ",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
        }
        assert!(!out.contains("RSS"), "{out}");
        let stats = broker.stop();
        assert_eq!(stats.idle_ready, 5, "{stats:?}");
        // The same two echo workers served both runs, and said goodbye.
        assert_eq!(stats.echo_ready, 2, "{stats:?}");
        assert_eq!(stats.echo_disconnects, 2, "{stats:?}");
    }

    #[test]
    fn without_the_baseline_there_are_no_proxy_figures() {
        let broker = test_broker::TestBroker::start();
        let options = ReqRepOptions {
            broker: Some(broker.endpoint.clone()),
            baseline_proxy: false,
            requests: 50,
            ..options()
        };
        let mut out = Vec::new();
        let report = run(&options, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(report.proxy.is_none());
        assert!(!out.contains("proxy"), "{out}");
        assert!(!out.contains("ratio"), "{out}");
    }
}
