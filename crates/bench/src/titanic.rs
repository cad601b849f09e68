//! `majordome bench titanic`: durable requests end to end.
//!
//! In this process: a majordome broker, Titanic on a fresh database (WAL,
//! synced commits), and 4 echo workers for `bench.echo`. C clients each
//! keep K requests going; every request is the whole RFC 9 cycle —
//! `titanic.request` (durable before 200), the dispatcher sends it to the
//! echo service and stores the reply, `titanic.reply` until 200,
//! `titanic.close` — and counts once closed.
//!
//! With `--baseline direct`, the same clients send the same bodies
//! straight to `bench.echo` through the broker (nothing stored), in the
//! same run: the ratio says what durability costs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use majordome_client::{Client, Worker, WorkerOptions};
use majordome_hub::{Hub, HubConfig, Parts};
use majordome_titanic::{client, ReplyStatus};

use crate::reqrep::{median, percentile};

/// What `majordome bench titanic` was asked to do.
#[derive(Debug, Clone)]
pub struct TitanicOptions {
    pub clients: usize,
    /// Requests per run, shared among the clients.
    pub requests: usize,
    /// Requests each client keeps going at once.
    pub window: usize,
    /// Bytes per request body.
    pub size: usize,
    pub runs: usize,
    /// Also run the same load straight to the service, not stored.
    pub baseline_direct: bool,
    /// Folder for the database; `None`: a temporary one.
    pub data: Option<PathBuf>,
    /// What a commit survives (the default syncs every commit).
    pub durability: majordome_store::Durability,
}

/// Median figures of one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TitanicFigures {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

const SERVICE: &str = "bench.echo";
const ECHO_WORKERS: usize = 4;

/// The broker, Titanic and the echo workers, each on its own thread.
struct Stack {
    broker: String,
    /// Held for its Drop: stops and joins the stack before the folder goes.
    _background: crate::Background,
    commits: Arc<majordome_store::CommitStats>,
    _folder: Option<tempfile::TempDir>,
}

impl Stack {
    fn start(data: Option<&PathBuf>, durability: majordome_store::Durability) -> Result<Stack> {
        let (folder, path) = crate::data_folder(data, "majordome-bench-titanic")?;
        let mut background = crate::Background::new()?;
        let mut config = HubConfig::on_free_ports(
            &path,
            Parts {
                broker: true,
                titanic: true,
                ..Parts::none()
            },
        );
        config.durability = durability;
        let hub = Hub::start(&config, &background.shutdown)?;
        let endpoint = hub.endpoints().broker.clone();
        let commits = hub
            .counters()
            .titanic_commits
            .clone()
            .context("titanic keeps commit stats")?;
        background.hub = Some(hub);
        for _ in 0..ECHO_WORKERS {
            let at = endpoint.clone();
            background.spawn("bench-echo", move |stop| {
                Worker::new(&at, SERVICE, WorkerOptions::default()).run(|body| body, stop)
            })?;
        }
        Ok(Stack {
            broker: endpoint,
            _background: background,
            commits,
            _folder: folder,
        })
    }
}

/// One request through Titanic, from `titanic.request` to `titanic.close`;
/// returns how many times it asked `titanic.reply`.
fn durable_round(client_: &mut Client, body: &Bytes) -> Result<u32> {
    let uuid = client::request(client_, SERVICE, vec![body.clone()])?;
    let mut wait = Duration::from_micros(500);
    let mut polls = 0;
    loop {
        polls += 1;
        match client::reply(client_, &uuid)? {
            ReplyStatus::Done(reply) => {
                ensure!(reply.first() == Some(body), "the reply is not the echo of the request");
                break;
            }
            ReplyStatus::Pending => {
                thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(5));
            }
            ReplyStatus::Unknown => bail!("titanic lost {uuid}"),
        }
    }
    client::close(client_, &uuid)?;
    Ok(polls)
}

/// Runs `requests` rounds over `clients × window` threads; returns
/// (requests/s, latencies in µs, `titanic.reply` polls).
fn load(options: &TitanicOptions, broker: &str, durable: bool) -> Result<(f64, Vec<u32>, u64)> {
    let threads = options.clients * options.window;
    let barrier = Arc::new(Barrier::new(threads + 1));
    let body = Bytes::from(vec![b'x'; options.size]);
    let mut handles = Vec::new();
    for t in 0..threads {
        let share = options.requests / threads + usize::from(t < options.requests % threads);
        let (barrier, broker, body) = (barrier.clone(), broker.to_owned(), body.clone());
        handles.push(thread::spawn(move || -> Result<(Vec<u32>, u64)> {
            let mut client_ = crate::client(&broker);
            barrier.wait();
            let mut latencies = Vec::with_capacity(share);
            let mut polls = 0;
            for _ in 0..share {
                let start = Instant::now();
                if durable {
                    polls += u64::from(durable_round(&mut client_, &body)?);
                } else {
                    let reply = client_.request(SERVICE, vec![body.clone()])?;
                    ensure!(reply.first() == Some(&body), "the reply is not the echo of the request");
                }
                latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok((latencies, polls))
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(options.requests);
    let mut polls = 0;
    for handle in handles {
        let (some, their_polls) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a bench client panicked"))??;
        latencies.extend(some);
        polls += their_polls;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok((options.requests as f64 / elapsed, latencies, polls))
}

/// Runs the benchmark and prints progress and results to `out`.
pub fn run(options: &TitanicOptions, out: &mut dyn Write) -> Result<(TitanicFigures, Option<TitanicFigures>)> {
    ensure!(options.clients >= 1, "--clients must be at least 1");
    ensure!(options.window >= 1, "--window must be at least 1");
    ensure!(options.requests >= 1, "--requests must be at least 1");
    ensure!(options.runs >= 1, "--runs must be at least 1");
    writeln!(
        out,
        "bench titanic: {} clients x window {}, {} requests of {} B per run, {} runs; {ECHO_WORKERS} echo workers; durability {:?}",
        options.clients, options.window, options.requests, options.size, options.runs, options.durability
    )?;
    let stack = Stack::start(options.data.as_ref(), options.durability)?;
    // Warm up: the workers must be registered before timing.
    durable_round(&mut crate::client(&stack.broker), &Bytes::from_static(b"warm-up"))?;
    let mut figures: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=options.runs {
        let targets: &[bool] = if options.baseline_direct {
            &[true, false]
        } else {
            &[true]
        };
        for &durable in targets {
            let (commits, writes) = (
                stack.commits.commits.load(Ordering::Relaxed),
                stack.commits.jobs.load(Ordering::Relaxed),
            );
            let (rate, latencies, polls) = load(options, &stack.broker, durable)?;
            let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
            let name = if durable { "titanic" } else { "direct" };
            let mut line = format!("run {run} {name}: {rate:.0} req/s, p50 {p50:.0} us, p99 {p99:.0} us");
            if durable {
                let commits = stack.commits.commits.load(Ordering::Relaxed) - commits;
                let writes = stack.commits.jobs.load(Ordering::Relaxed) - writes;
                line.push_str(&format!(
                    "; {writes} writes in {commits} commits ({:.1} per commit); {:.1} titanic.reply polls per request",
                    writes as f64 / commits.max(1) as f64,
                    polls as f64 / options.requests as f64
                ));
            }
            writeln!(out, "{line}")?;
            figures[usize::from(!durable)].push((rate, p50, p99));
        }
    }
    let summarize = |runs: &[(f64, f64, f64)]| TitanicFigures {
        per_second: median(&runs.iter().map(|r| r.0).collect::<Vec<_>>()),
        p50_us: median(&runs.iter().map(|r| r.1).collect::<Vec<_>>()),
        p99_us: median(&runs.iter().map(|r| r.2).collect::<Vec<_>>()),
    };
    let titanic = summarize(&figures[0]);
    writeln!(
        out,
        "titanic: {:.0} durable req/s (request, dispatch, reply, close), p50 {:.0} us, p99 {:.0} us (medians)",
        titanic.per_second, titanic.p50_us, titanic.p99_us
    )?;
    let direct = options.baseline_direct.then(|| summarize(&figures[1]));
    if let Some(direct) = direct {
        writeln!(
            out,
            "direct: {:.0} req/s, p50 {:.0} us; ratio titanic/direct {:.2}",
            direct.per_second,
            direct.p50_us,
            titanic.per_second / direct.per_second.max(1e-9)
        )?;
    }
    Ok((titanic, direct))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_completes_every_request() {
        let options = TitanicOptions {
            clients: 2,
            requests: 200,
            window: 2,
            size: 10,
            runs: 1,
            baseline_direct: true,
            data: None,
            durability: majordome_store::Durability::Full,
        };
        let mut out = Vec::new();
        let (titanic, direct) = run(&options, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ratio titanic/direct"), "{text}");
        assert!(titanic.per_second > 0.0 && direct.unwrap().per_second > 0.0);
    }
}
