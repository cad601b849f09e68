//! The manager's supervisor: starts plugins from their manifest's
//! `command`, keeps their output in a log file, stops them (the plugin's
//! own `plugin.stop.do`, then SIGTERM, then SIGKILL, each after a grace
//! period), and restarts those whose manifest says `restart` when they
//! die, with a doubling backoff and a limit per window.
//!
//! It is driven by [`Supervisor::tick`], called by the manager's status
//! thread a few times a second; it never blocks (the stop request to the
//! plugin goes from a short-lived thread).

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use majordome_client::{Client, ClientOptions, Message};
use serde_json::json;

use crate::manifest::Manifest;

/// How plugins are supervised.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Where `<type>-<name>.log` files go.
    pub log_dir: PathBuf,
    /// The broker, to send a plugin its `plugin.stop.do`.
    pub broker: String,
    /// Environment given to every plugin (the bus's endpoints, the host).
    pub environment: Vec<(String, String)>,
    /// After `plugin.stop.do`, how long before SIGTERM.
    pub stop_grace: Duration,
    /// After SIGTERM, how long before SIGKILL.
    pub kill_grace: Duration,
    /// The first restart's delay; it doubles at each restart.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// At most this many restarts within `restart_window`; then it gives up.
    pub restart_limit: usize,
    pub restart_window: Duration,
}

impl SupervisorSettings {
    /// The defaults, logging to `log_dir` and stopping through `broker`.
    pub fn new(log_dir: PathBuf, broker: &str) -> SupervisorSettings {
        SupervisorSettings {
            log_dir,
            broker: broker.to_owned(),
            environment: Vec::new(),
            stop_grace: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            restart_limit: 5,
            restart_window: Duration::from_secs(600),
        }
    }
}

/// A status change the supervisor reports to the registry: (client id
/// parts kind, name, host are the caller's), status, comment.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub kind: String,
    pub name: String,
    pub status: &'static str,
    pub comment: String,
}

#[derive(Debug)]
enum Stopping {
    /// Asked to stop at this time; TERM and KILL follow.
    Since(Instant),
    Terminated(Instant),
    Killed,
}

struct Supervised {
    manifest: Manifest,
    child: Option<Child>,
    stopping: Option<Stopping>,
    /// Start times of the restarts in the current window.
    restarts: VecDeque<Instant>,
    next_restart: Option<Instant>,
    backoff: Duration,
    started_at: Option<Instant>,
}

/// The supervised plugins, by `<type>-<name>`.
pub struct Supervisor {
    settings: SupervisorSettings,
    plugins: BTreeMap<String, Supervised>,
}

fn key(kind: &str, name: &str) -> String {
    format!("{kind}-{name}")
}

impl Supervisor {
    /// A supervisor for the plugins of `manifests` (those with a command).
    pub fn new(settings: SupervisorSettings, manifests: &[Manifest]) -> Supervisor {
        let plugins = manifests
            .iter()
            .filter(|m| !m.command.is_empty())
            .map(|m| {
                (
                    key(&m.kind, &m.name),
                    Supervised {
                        manifest: m.clone(),
                        child: None,
                        stopping: None,
                        restarts: VecDeque::new(),
                        next_restart: None,
                        backoff: settings.backoff_min,
                        started_at: None,
                    },
                )
            })
            .collect();
        Supervisor { settings, plugins }
    }

    /// The pid of a running plugin.
    pub fn pid(&self, kind: &str, name: &str) -> Option<u32> {
        self.plugins.get(&key(kind, name))?.child.as_ref().map(Child::id)
    }

    /// Starts the plugins whose manifest says `autostart`.
    pub fn autostart(&mut self) -> Vec<Report> {
        let names: Vec<(String, String)> = self
            .plugins
            .values()
            .filter(|p| p.manifest.autostart)
            .map(|p| (p.manifest.kind.clone(), p.manifest.name.clone()))
            .collect();
        names
            .into_iter()
            .filter_map(|(kind, name)| self.start(&kind, &name).ok())
            .collect()
    }

    /// `plugin.start.do`: spawns the plugin.
    pub fn start(&mut self, kind: &str, name: &str) -> Result<Report, String> {
        let settings = self.settings.clone();
        let Some(plugin) = self.plugins.get_mut(&key(kind, name)) else {
            return Err(format!(
                "no plugin '{name}' of type '{kind}' with a command to start it (see its manifest)"
            ));
        };
        if plugin.child.is_some() {
            return Err(format!("{kind}-{name} is already running"));
        }
        plugin.stopping = None;
        plugin.next_restart = None;
        let child = spawn(&settings, &plugin.manifest)?;
        let comment = format!("started by the manager, pid {}", child.id());
        plugin.child = Some(child);
        plugin.started_at = Some(Instant::now());
        Ok(Report {
            kind: kind.to_owned(),
            name: name.to_owned(),
            status: "starting",
            comment,
        })
    }

    /// `plugin.stop.do`: asks the plugin to stop; TERM and KILL follow
    /// from [`Supervisor::tick`] if it does not.
    pub fn stop(&mut self, kind: &str, name: &str, service: &str) -> Result<Report, String> {
        let Some(plugin) = self.plugins.get_mut(&key(kind, name)) else {
            return Err(format!("no plugin '{name}' of type '{kind}' is supervised here"));
        };
        plugin.next_restart = None;
        if plugin.child.is_none() {
            return Err(format!("{kind}-{name} is not running"));
        }
        plugin.stopping = Some(Stopping::Since(Instant::now()));
        // The plugin's own clean stop, off this thread.
        let (broker, service, timeout) = (
            self.settings.broker.clone(),
            service.to_owned(),
            self.settings.stop_grace,
        );
        std::thread::spawn(move || {
            let mut client = Client::new(
                &broker,
                ClientOptions {
                    timeout: timeout.min(Duration::from_secs(2)),
                    ..ClientOptions::default()
                },
            );
            let _ = client.request_message(&service, &Message::new("plugin.stop.do", json!({})));
        });
        Ok(Report {
            kind: kind.to_owned(),
            name: name.to_owned(),
            status: "stop-request",
            comment: "stop requested".into(),
        })
    }

    /// Reaps exited plugins, escalates stops, restarts what should be.
    pub fn tick(&mut self, now: Instant) -> Vec<Report> {
        let mut reports = Vec::new();
        let settings = self.settings.clone();
        for plugin in self.plugins.values_mut() {
            let (kind, name) = (plugin.manifest.kind.clone(), plugin.manifest.name.clone());
            let report = |status: &'static str, comment: String| Report {
                kind: kind.clone(),
                name: name.clone(),
                status,
                comment,
            };
            if let Some(child) = plugin.child.as_mut() {
                let exited = match child.try_wait() {
                    Ok(Some(status)) => Some(describe(status)),
                    Ok(None) => None,
                    Err(e) => Some(format!("could not be waited for: {e}")),
                };
                if let Some(how) = exited {
                    plugin.child = None;
                    if plugin.stopping.take().is_some() {
                        reports.push(report("stopped", format!("stopped on request ({how})")));
                        continue;
                    }
                    if !plugin.manifest.restart {
                        reports.push(report("dead", how));
                        continue;
                    }
                    // A plugin that stayed up a whole window starts afresh.
                    if plugin
                        .started_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= settings.restart_window)
                    {
                        plugin.restarts.clear();
                        plugin.backoff = settings.backoff_min;
                    }
                    while plugin
                        .restarts
                        .front()
                        .is_some_and(|at| now.saturating_duration_since(*at) >= settings.restart_window)
                    {
                        plugin.restarts.pop_front();
                    }
                    if plugin.restarts.len() >= settings.restart_limit {
                        reports.push(report(
                            "dead",
                            format!(
                                "{how}; gave up after {} restarts within {} s",
                                plugin.restarts.len(),
                                settings.restart_window.as_secs()
                            ),
                        ));
                        continue;
                    }
                    plugin.next_restart = Some(now + plugin.backoff);
                    reports.push(report(
                        "dead",
                        format!("{how}; restarting in {:.1} s", plugin.backoff.as_secs_f64()),
                    ));
                    plugin.backoff = (plugin.backoff * 2).min(settings.backoff_max);
                    continue;
                }
                // Still running: escalate a stop that is taking too long.
                match plugin.stopping {
                    Some(Stopping::Since(at)) if now.saturating_duration_since(at) >= settings.stop_grace => {
                        signal(child, libc::SIGTERM);
                        plugin.stopping = Some(Stopping::Terminated(now));
                    }
                    Some(Stopping::Terminated(at)) if now.saturating_duration_since(at) >= settings.kill_grace => {
                        signal(child, libc::SIGKILL);
                        plugin.stopping = Some(Stopping::Killed);
                    }
                    _ => {}
                }
            } else if plugin.next_restart.is_some_and(|at| now >= at) {
                plugin.next_restart = None;
                match spawn(&settings, &plugin.manifest) {
                    Ok(child) => {
                        plugin.restarts.push_back(now);
                        plugin.started_at = Some(now);
                        reports.push(report(
                            "starting",
                            format!(
                                "restarted by the manager, pid {} (restart {})",
                                child.id(),
                                plugin.restarts.len()
                            ),
                        ));
                        plugin.child = Some(child);
                    }
                    Err(why) => reports.push(report("dead", why)),
                }
            }
        }
        reports
    }

    /// Stops every plugin and waits for them (shorter graces than a
    /// stop by request: the whole hub is going down).
    pub fn shutdown(&mut self) {
        let grace = self.settings.stop_grace.min(Duration::from_secs(2));
        let services: Vec<(String, String, String)> = self
            .plugins
            .values()
            .filter(|p| p.child.is_some())
            .map(|p| (p.manifest.kind.clone(), p.manifest.name.clone(), String::new()))
            .collect();
        for (kind, name, _) in &services {
            if let Some(plugin) = self.plugins.get_mut(&key(kind, name)) {
                if let Some(child) = plugin.child.as_mut() {
                    signal(child, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + grace;
        for plugin in self.plugins.values_mut() {
            if let Some(mut child) = plugin.child.take() {
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child not yet reaped, so the pid
    // cannot have been reused.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "exited".to_owned(),
    }
}

fn spawn(settings: &SupervisorSettings, manifest: &Manifest) -> Result<Child, String> {
    let id = format!("{}-{}", manifest.kind, manifest.name);
    std::fs::create_dir_all(&settings.log_dir)
        .map_err(|e| format!("cannot create the log folder {}: {e}", settings.log_dir.display()))?;
    let log_path = settings.log_dir.join(format!("{id}.log"));
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let program = match manifest.command[0].as_str() {
        // Our own plugins: the binary that is running.
        "majordome" => std::env::current_exe().map_err(|e| format!("cannot find majordome's own binary: {e}"))?,
        other => PathBuf::from(other),
    };
    let _ = writeln!(
        log,
        "--- majordome starts {} ({})",
        manifest.command.join(" "),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    let stderr = log
        .try_clone()
        .map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
    let mut command = Command::new(&program);
    command
        .args(&manifest.command[1..])
        .envs(settings.environment.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr);
    // SAFETY: prctl is async-signal-safe; it asks the kernel to send
    // SIGTERM to the plugin when the manager's thread goes away, so a
    // `kill -9` of majordome leaves no orphan.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))
}
