//! The broker the bench starts when it is given none, and the process
//! facts it reads.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use super::STALL;

/// What the broker prints, followed by its endpoint, once it listens.
const LISTENING: &str = "listening on ";

/// `majordome broker --bind tcp://127.0.0.1:0` started for the run, killed
/// (and reaped) when dropped, whatever path the bench leaves by.
pub(super) struct SpawnedBroker {
    child: Child,
    /// Where it listens, as it printed it.
    pub(super) endpoint: String,
}

impl SpawnedBroker {
    /// Starts `exe broker --bind tcp://127.0.0.1:0 extra…` and waits (up to
    /// [`STALL`]) for the line that ends with its endpoint.
    pub(super) fn start(exe: &Path, extra: &[String]) -> Result<SpawnedBroker> {
        let mut child = Command::new(exe)
            .args(["broker", "--bind", "tcp://127.0.0.1:0"])
            .args(extra)
            // Its own start line is read from stdout; its log would only
            // clutter the bench's report.
            .env("MAJORDOME_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // From here on, the guard kills the broker on every error path.
        let mut spawned = SpawnedBroker {
            child,
            endpoint: String::new(),
        };
        let (line_tx, line_rx) = mpsc::channel();
        thread::Builder::new()
            .name("bench-broker-stdout".into())
            .spawn(move || {
                // Read to the end even once nobody listens: a broker that
                // writes to a full pipe would block.
                let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
                for line in lines.by_ref() {
                    if line_tx.send(line).is_err() {
                        break;
                    }
                }
                lines.for_each(drop);
            })
            .context("cannot start the thread that reads the broker's output")?;
        let deadline = Instant::now() + STALL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match line_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(anyhow!(
                        "{} did not print \"{LISTENING}<endpoint>\" within {} s",
                        exe.display(),
                        STALL.as_secs()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = spawned.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(anyhow!(
                        "the broker ({} broker) stopped before saying where it listens ({status}); its errors are above",
                        exe.display()
                    ));
                }
            };
            if line.contains(LISTENING) {
                spawned.endpoint = line.split_whitespace().last().unwrap_or_default().to_owned();
                return Ok(spawned);
            }
        }
    }

    /// The broker's process id.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// On-CPU time so far of all the broker's threads, in nanoseconds.
    pub(super) fn cpu_ns(&self) -> Option<u64> {
        cpu_ns(self.pid(), |_| true)
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` (`VmRSS` in `/proc/<pid>/status`), KiB.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// On-CPU time so far of the threads of process `pid` whose name `keep`
/// accepts, in nanoseconds: the sum of the first field of each
/// `/proc/<pid>/task/<tid>/schedstat`. A thread that ends while it is read
/// is left out; `None` when the process cannot be read at all.
pub(super) fn cpu_ns(pid: u32, keep: impl Fn(&str) -> bool) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let path = task.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !keep(name.trim_end()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Many sockets need many descriptors: raises the soft limit to the hard one.
pub(super) fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            // Not fatal: the bench says so when it runs out of descriptors.
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// Held while writing and starting a script: a process forked by one
    /// test while another still has its script open for writing would make
    /// that script fail to start ("text file busy").
    static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A stand-in for `majordome` that runs `script` whatever its arguments.
    fn fake_exe(name: &str, script: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("majordome-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn alive(pid: u32) -> bool {
        // No signal: only whether the process exists.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
    }

    #[test]
    fn reads_the_endpoint_measures_and_kills_the_broker() {
        let guard = SPAWNING.lock().unwrap();
        let exe = fake_exe(
            "listening",
            r#"echo "starting $1 $2 $3 $4 $5"; echo "majordome broker listening on tcp://127.0.0.1:41234"; exec sleep 60"#,
        );
        let broker = SpawnedBroker::start(&exe, &["--worker-prefetch".into(), "4".into()]).unwrap();
        drop(guard);
        assert_eq!(broker.endpoint, "tcp://127.0.0.1:41234");
        let pid = broker.pid();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        drop(broker);
        assert!(!alive(pid), "the broker outlived the bench");
        std::fs::remove_file(exe).unwrap();
    }

    #[test]
    fn a_broker_that_exits_early_is_a_clear_error() {
        let guard = SPAWNING.lock().unwrap();
        let exe = fake_exe("exits", "echo 'cannot bind' >&2; exit 3");
        let error = SpawnedBroker::start(&exe, &[]).err().unwrap().to_string();
        drop(guard);
        assert!(error.contains("stopped before saying where it listens"), "{error}");
        assert!(error.contains("3"), "{error}");
        std::fs::remove_file(exe).unwrap();
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let _guard = SPAWNING.lock().unwrap();
        let error = SpawnedBroker::start(Path::new("/nonexistent/majordome"), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("cannot start /nonexistent/majordome"), "{error}");
    }

    #[test]
    fn counts_the_cpu_time_of_the_named_threads_only() {
        use nix::time::{clock_gettime, ClockId};
        let thread_cpu = || std::time::Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap());
        let (spun_tx, spun_rx) = mpsc::channel();
        let busy = thread::Builder::new()
            .name("cpu-ns-test".into())
            .spawn(move || {
                // Spins until it has had 30 ms of CPU (whatever the load),
                // then stays alive, and named, until it has been read.
                let mut spins = 0u64;
                while thread_cpu() < std::time::Duration::from_millis(30) {
                    spins = std::hint::black_box(spins + 1);
                }
                spun_tx.send(()).unwrap();
                thread::park();
            })
            .unwrap();
        spun_rx.recv().unwrap();
        let named = cpu_ns(std::process::id(), |n| n == "cpu-ns-test").unwrap();
        let all = cpu_ns(std::process::id(), |_| true).unwrap();
        assert!(named >= 30_000_000 && all >= named, "{named} of {all}");
        assert_eq!(cpu_ns(std::process::id(), |n| n == "no-such-thread"), Some(0));
        assert_eq!(cpu_ns(u32::MAX, |_| true), None);
        busy.thread().unpark();
        busy.join().unwrap();
    }

    #[test]
    fn reads_rss_of_this_process() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
