//! The manager's supervisor: runs the plugins of this host as child
//! processes, from their manifest's `command`.
//!
//! One thread owns every child. It must be one long-lived thread because
//! `PR_SET_PDEATHSIG`, which makes a plugin receive SIGTERM when majordome
//! dies (even by `kill -9`), fires when the *thread* that forked the child
//! ends, not the process: a child forked by a short-lived thread would be
//! signalled as soon as that thread returned. The thread takes requests
//! (`plugin.start.do`, `plugin.stop.do`) over a channel, reaps children a
//! few times a second, escalates stops (the plugin's own `plugin.stop.do`,
//! then SIGTERM, then SIGKILL, each after a grace period) and restarts
//! crashed plugins whose manifest says `restart`, with a doubling backoff
//! and a limit per window ([`Restarts`]). Every status change goes out as
//! a [`ProcessEvent`] on a channel; the manager records and publishes them.
//! The supervisor never touches the manager's registry: what it needs to
//! know of a client's status comes with each request.
//!
//! Each child leads its own process group, so a stop reaches whatever the
//! plugin started too (a shell script's children, say), and whatever is
//! left in the group when the plugin exits is killed before the plugin is
//! reaped.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use majordome_api::{ClientId, ClientStatus};
use majordome_client::{AsyncClient, Message, PendingReply, Shutdown};
use nix::errno::Errno;
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, getppid, Pid};
use serde_json::json;

use crate::manifest::Manifest;

/// The supervisor's timers and bounds (the manager's settings give them).
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// The host whose plugins it runs.
    pub host: String,
    /// How long the plugin's own `plugin.stop.do` may take.
    pub stop_request_timeout: Duration,
    /// After `plugin.stop.do`, how long a plugin has to exit before SIGTERM.
    pub stop_grace: Duration,
    /// After SIGTERM, how long before SIGKILL.
    pub kill_grace: Duration,
    /// `stop_grace` and `kill_grace` when the supervisor itself stops.
    pub shutdown_stop_grace: Duration,
    pub shutdown_kill_grace: Duration,
    /// The first delay before a restart, doubling, and the longest.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// Restarts within `restart_window` before it gives up.
    pub restart_limit: u32,
    pub restart_window: Duration,
    /// How often it looks for children that exited.
    pub reap_interval: Duration,
    /// The most a plugin's log may hold; past it, what it holds moves to
    /// `<log>.1` (the one before is dropped) and the log starts again.
    pub max_log_bytes: u64,
}

/// What the supervisor saw happen to a plugin it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessEvent {
    pub id: ClientId,
    /// Its process, while it runs.
    pub pid: Option<u32>,
    pub status: ClientStatus,
    pub comment: String,
}

/// When and how often a crashed plugin is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// The delay before the first restart; it doubles at each further one.
    pub backoff: Duration,
    /// The longest delay.
    pub backoff_max: Duration,
    /// At most this many restarts within `window`; beyond, it gives up.
    pub limit: u32,
    /// The window the limit counts in.
    pub window: Duration,
}

impl RestartPolicy {
    /// The policy of a manager's settings.
    pub fn of(settings: &SupervisorSettings) -> RestartPolicy {
        RestartPolicy {
            backoff: settings.restart_backoff,
            backoff_max: settings.restart_backoff_max,
            limit: settings.restart_limit,
            window: settings.restart_window,
        }
    }
}

/// What to do about a plugin that died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart it after `delay`; this will be restart number `attempt`
    /// within the window.
    After { delay: Duration, attempt: u32 },
    /// It was restarted `restarts` times within the window already.
    GiveUp { restarts: u32 },
}

/// The restarts of one plugin within the current window. Pure: the
/// caller gives the times.
#[derive(Debug, Default, Clone)]
pub struct Restarts {
    /// When each restart was decided, oldest first.
    times: VecDeque<Instant>,
}

impl Restarts {
    /// Decides about a plugin started at `started_at` that died at `now`,
    /// and counts the restart if there is one.
    pub fn after_exit(&mut self, policy: &RestartPolicy, started_at: Instant, now: Instant) -> RestartDecision {
        // A plugin that stayed up for a whole window has shown it can run:
        // its earlier troubles no longer count, and its backoff starts over.
        if now.saturating_duration_since(started_at) >= policy.window {
            self.times.clear();
        }
        while self
            .times
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= policy.window)
        {
            self.times.pop_front();
        }
        let done = u32::try_from(self.times.len()).unwrap_or(u32::MAX);
        if done >= policy.limit {
            return RestartDecision::GiveUp { restarts: done };
        }
        let delay = policy
            .backoff
            .saturating_mul(2u32.saturating_pow(done))
            .min(policy.backoff_max);
        self.times.push_back(now);
        RestartDecision::After {
            delay,
            attempt: done + 1,
        }
    }

    /// Forgets every restart: a plugin started by hand starts afresh.
    pub fn clear(&mut self) {
        self.times.clear();
    }
}

/// How a child ended, in words: "exited with status 3", "killed by signal
/// 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let name = signal_name(signal).map(|n| format!(" ({n})")).unwrap_or_default();
            let core = if status.core_dumped() { ", core dumped" } else { "" };
            format!("killed by signal {signal}{name}{core}")
        }
        None => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Signal::try_from(signal).ok().map(Signal::as_str)
}

/// The program and arguments of a manifest's `command`. The program
/// `majordome` is this very binary, so the plugins that ship run from the
/// same build as the manager whatever the `PATH` says.
pub fn resolve_command(command: &[String]) -> Result<(PathBuf, &[String]), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("its manifest has no command".to_owned());
    };
    if program == "majordome" {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find majordome's own binary: {e}"))?;
        return Ok((exe, args));
    }
    Ok((PathBuf::from(program), args))
}

/// `unix` seconds as `YYYY-MM-DD hh:mm:ss UTC`, for the log files' start
/// lines (a log read on another machine is clearer in UTC anyway).
pub fn utc(unix: f64) -> String {
    let second = unix.max(0.0) as i64;
    match jiff::Timestamp::from_second(second) {
        Ok(time) => time.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Err(_) => format!("{second} s after 1970 (UTC)"),
    }
}

/// Sends `signal` to the process group led by `pid`. The caller has not
/// reaped `pid` yet, so the number cannot belong to anyone else.
fn signal_group(pid: u32, signal: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pid as i32), signal) {
        tracing::debug!(pid, %signal, error = %e, "could not signal a plugin");
    }
}

/// True once `pid` (our child) has ended, without reaping it: while it is a
/// zombie its pid, and so its process group's id, stay ours, and what is
/// left in the group can still be signalled safely.
fn has_exited(pid: u32) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // ECHILD: reaped already, so certainly ended.
        Err(_) => true,
    }
}

/// Where a plugin's output goes.
pub fn log_path(log_dir: &Path, kind: &str, name: &str) -> PathBuf {
    log_dir.join(format!("{kind}-{name}.log"))
}

/// How often the logs of running plugins are measured.
const LOG_CHECK: Duration = Duration::from_secs(5);

/// Keeps the log at `path` within `max` bytes: past it, its content moves
/// to `<path>.1` (replacing the one before) and the log is emptied, with a
/// line saying so. A running plugin writes on: its output was opened to
/// append, so it goes on at the new end. (A line it writes between the
/// copy and the emptying is lost: the price of not stopping it.) Whether
/// it was over.
pub fn keep_log_within(path: &Path, max: u64) -> std::io::Result<bool> {
    let length = match std::fs::metadata(path) {
        Ok(metadata) => metadata.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if length <= max {
        return Ok(false);
    }
    let mut older = path.as_os_str().to_owned();
    older.push(".1");
    std::fs::copy(path, &older)?;
    let mut log = OpenOptions::new().append(true).open(path)?;
    log.set_len(0)?;
    let now = majordome_client::unix_now();
    writeln!(
        log,
        "--- {} the log went over {max} bytes: what it held is in {}",
        utc(now),
        Path::new(&older)
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    )?;
    Ok(true)
}

/// The most of a log's end `log_tail` reads, whatever the lines asked.
const LOG_TAIL_BYTES: u64 = 256 * 1024;

/// The last `lines` lines of the log at `path` (at most its last 256 KiB,
/// so a huge log costs no more than a small one), oldest first; none when
/// the plugin never ran here.
pub fn log_tail(path: &Path, lines: usize) -> Result<Vec<String>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read the log {}: {e}", path.display())),
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = length.saturating_sub(LOG_TAIL_BYTES);
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.take(LOG_TAIL_BYTES).read_to_end(&mut tail))
        .map_err(|e| format!("cannot read the log {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&tail);
    let mut all: Vec<&str> = text.lines().collect();
    // A read that starts mid-file starts mid-line: that piece is dropped.
    if start > 0 && !all.is_empty() {
        all.remove(0);
    }
    let keep = all.len().saturating_sub(lines);
    Ok(all[keep..].iter().map(|line| (*line).to_owned()).collect())
}

/// Starts `manifest`'s command with `environment`, its output appended to
/// `<log_dir>/<type>-<name>.log` after a line marking the start.
fn spawn(
    manifest: &Manifest,
    environment: &[(String, String)],
    log_dir: &Path,
    max_log_bytes: u64,
) -> Result<Child, String> {
    let (program, args) = resolve_command(&manifest.command)?;
    std::fs::create_dir_all(log_dir).map_err(|e| format!("cannot create the log folder {}: {e}", log_dir.display()))?;
    let log_path = log_path(log_dir, &manifest.kind, &manifest.name);
    keep_log_within(&log_path, max_log_bytes)
        .map_err(|e| format!("cannot keep the log {} within bounds: {e}", log_path.display()))?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open the log {}: {e}", log_path.display()))?;
    let now = majordome_client::unix_now();
    writeln!(
        log,
        "--- {} majordome runs {}: {:?}",
        utc(now),
        program.display(),
        manifest.command
    )
    .map_err(|e| format!("cannot write the log {}: {e}", log_path.display()))?;
    let errors = log
        .try_clone()
        .map_err(|e| format!("cannot share the log {}: {e}", log_path.display()))?;
    let mut command = Command::new(&program);
    command
        .args(args)
        // A login of the hub's own environment is not the plugin's: it gets
        // its own, when the hub asks for logins, in `environment`.
        .env_remove(majordome_net::zap::USER_VARIABLE)
        .env_remove(majordome_net::zap::PASSWORD_VARIABLE)
        .envs(environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(errors)
        .process_group(0);
    let manager = getpid();
    // SAFETY: `pre_exec` is unsafe because its closure runs in the child
    // between fork and exec, where only async-signal-safe calls are sound.
    // This one makes two system calls (prctl, getppid) and builds its error
    // from a number, without allocating. std offers no safe way to set the
    // parent-death signal of a child, so this is the one `unsafe` left.
    unsafe {
        command.pre_exec(move || {
            set_pdeathsig(Signal::SIGTERM)?;
            // The manager may have died between fork and prctl; then the
            // signal will never come, so do not start an orphan at all.
            if getppid() != manager {
                return Err(std::io::Error::from_raw_os_error(Errno::ESRCH as i32));
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))
}

/// Why a plugin is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    Request,
    Shutdown,
}

#[derive(Debug, Clone, Copy)]
struct Stopping {
    cause: StopCause,
    /// When SIGTERM is due, if it has not gone yet.
    term_at: Instant,
    /// When SIGKILL is due, once SIGTERM has gone.
    kill_at: Option<Instant>,
    /// Set once SIGKILL has gone: (when, how long SIGTERM was ignored).
    killed: Option<(Instant, Duration)>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Not running, nothing planned.
    Idle,
    Running,
    Stopping(Stopping),
    /// Dead, to be restarted at `at`; that will be restart number `attempt`.
    RestartAt {
        at: Instant,
        attempt: u32,
    },
}

/// One plugin this host can run.
struct Plugin {
    id: ClientId,
    manifest: Manifest,
    process: Option<Child>,
    started_at: Instant,
    phase: Phase,
    restarts: Restarts,
    /// It said `stopped` itself since it was started (someone sent
    /// `plugin.stop.do` to its own service): its exit is no crash.
    said_stopped: bool,
    /// Its answer to the `plugin.stop.do` the supervisor sent, to come.
    asking: Option<PendingReply>,
}

/// Who asked for a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    User,
    Autostart,
    Restart { attempt: u32 },
}

/// A request to the supervisor thread.
enum Request {
    Start {
        kind: String,
        name: String,
        /// The status of the client when someone else runs it.
        elsewhere: Option<ClientStatus>,
        reply: mpsc::Sender<Result<u32, String>>,
    },
    Stop {
        kind: String,
        name: String,
        /// The client's status as the manager knows it, for the answer.
        known: Option<ClientStatus>,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// A plugin said this status itself (its `plugin.status` event).
    Said { id: ClientId, status: ClientStatus },
}

/// The way to the supervisor thread, for the manager's request handler.
#[derive(Clone)]
pub(crate) struct SupervisorHandle {
    requests: mpsc::Sender<Request>,
}

/// How long a request waits for the supervisor thread, which answers at
/// once unless it is stopping everything.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl SupervisorHandle {
    /// Starts a plugin; its pid, or why not. `elsewhere`: the client is
    /// running already, started by someone else, in that status.
    pub(crate) fn start(&self, kind: &str, name: &str, elsewhere: Option<ClientStatus>) -> Result<u32, String> {
        let (reply, answer) = mpsc::channel();
        self.ask(
            Request::Start {
                kind: kind.to_owned(),
                name: name.to_owned(),
                elsewhere,
                reply,
            },
            answer,
        )
    }

    /// Begins stopping a plugin; returns once the stop is under way.
    /// `known`: its status as the manager knows it.
    pub(crate) fn stop(&self, kind: &str, name: &str, known: Option<ClientStatus>) -> Result<(), String> {
        let (reply, answer) = mpsc::channel();
        self.ask(
            Request::Stop {
                kind: kind.to_owned(),
                name: name.to_owned(),
                known,
                reply,
            },
            answer,
        )
    }

    /// Tells the supervisor what a client said of itself.
    pub(crate) fn said(&self, id: ClientId, status: ClientStatus) {
        // Gone only when the manager stops.
        let _ = self.requests.send(Request::Said { id, status });
    }

    fn ask<T>(&self, request: Request, answer: mpsc::Receiver<Result<T, String>>) -> Result<T, String> {
        let gone = || "the manager's supervisor has stopped (is majordome shutting down?)".to_owned();
        self.requests.send(request).map_err(|_| gone())?;
        match answer.recv_timeout(ANSWER_WITHIN) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the manager's supervisor did not answer within {} s",
                ANSWER_WITHIN.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// Where the supervisor reaches the bus, and what it gives plugins.
pub(crate) struct Wiring {
    /// The broker, for the `plugin.stop.do` sent to a plugin.
    pub broker: String,
    /// Every plugin's environment: the bus's endpoints, the host, extras.
    pub environment: Vec<(String, String)>,
    pub log_dir: PathBuf,
    /// Makes each plugin's login, when the hub asks for logins.
    pub logins: Option<std::sync::Arc<majordome_access::Credentials>>,
}

/// Starts the supervisor thread for the manifests with a command; it
/// autostarts those that say so, and on `shutdown` stops every child and
/// reaps it before the thread ends.
pub(crate) fn start(
    manifests: &[Manifest],
    settings: SupervisorSettings,
    wiring: Wiring,
    events: mpsc::Sender<ProcessEvent>,
    shutdown: &Shutdown,
) -> std::io::Result<(SupervisorHandle, JoinHandle<()>)> {
    let now = Instant::now();
    let plugins = manifests
        .iter()
        .filter(|m| !m.command.is_empty())
        .map(|m| {
            let id = ClientId::new(&m.kind, &m.name, &settings.host);
            let plugin = Plugin {
                id: id.clone(),
                manifest: m.clone(),
                process: None,
                started_at: now,
                phase: Phase::Idle,
                restarts: Restarts::default(),
                said_stopped: false,
                asking: None,
            };
            (id.to_string(), plugin)
        })
        .collect();
    let (requests, inbox) = mpsc::channel();
    let mut supervisor = Supervisor {
        events,
        policy: RestartPolicy::of(&settings),
        settings,
        wiring,
        plugins,
        bus: None,
        logs_checked: now,
    };
    let shutdown = shutdown.clone();
    let thread = thread::Builder::new()
        .name("manager-supervisor".into())
        .spawn(move || supervisor.run(&inbox, &shutdown))?;
    Ok((SupervisorHandle { requests }, thread))
}

struct Supervisor {
    /// Where what it does goes (to the manager's registry).
    events: mpsc::Sender<ProcessEvent>,
    settings: SupervisorSettings,
    policy: RestartPolicy,
    wiring: Wiring,
    /// By client id; only plugins with a command.
    plugins: BTreeMap<String, Plugin>,
    /// The bus, while a `plugin.stop.do` it sent is unanswered: many stops
    /// in flight share it, and it goes (with its I/O thread) once none is.
    bus: Option<AsyncClient>,
    /// When the running plugins' logs were last measured.
    logs_checked: Instant,
}

impl Supervisor {
    fn run(&mut self, inbox: &mpsc::Receiver<Request>, shutdown: &Shutdown) {
        let autostart: Vec<String> = self
            .plugins
            .iter()
            .filter(|(_, p)| p.manifest.autostart)
            .map(|(id, _)| id.clone())
            .collect();
        for id in autostart {
            if let Err(reason) = self.start(&id, Origin::Autostart, Instant::now()) {
                tracing::warn!(plugin = %id, "autostart failed: {reason}");
            }
        }
        while !shutdown.is_triggered() {
            // A timeout just means it is time to poll. (The channel cannot
            // disconnect: this thread holds a sender itself.)
            if let Ok(request) = inbox.recv_timeout(self.next_wake(Instant::now())) {
                self.answer(request);
            }
            self.poll(Instant::now());
        }
        self.stop_everything(inbox);
    }

    /// How long the thread may wait for a request: until the next timer,
    /// and never longer than the reaping interval, which is also how
    /// quickly a shutdown is seen.
    fn next_wake(&self, now: Instant) -> Duration {
        let timers = self.plugins.values().filter_map(|p| match p.phase {
            Phase::RestartAt { at, .. } => Some(at),
            // Once SIGKILL has gone there is nothing left to time.
            Phase::Stopping(s) if s.killed.is_some() => None,
            Phase::Stopping(s) => Some(s.kill_at.unwrap_or(s.term_at)),
            Phase::Idle | Phase::Running => None,
        });
        let interval = self.settings.reap_interval.max(Duration::from_millis(1));
        timers
            .map(|at| at.saturating_duration_since(now))
            .fold(interval, Duration::min)
    }

    fn answer(&mut self, request: Request) {
        match request {
            Request::Start {
                kind,
                name,
                elsewhere,
                reply,
            } => {
                let id = ClientId::new(&kind, &name, &self.settings.host).to_string();
                let result = match elsewhere {
                    Some(status) => Err(format!(
                        "{id} is already running (status {status}) but was not started by this manager; stop it first"
                    )),
                    None => self.start(&id, Origin::User, Instant::now()),
                };
                let _ = reply.send(result);
            }
            Request::Stop {
                kind,
                name,
                known,
                reply,
            } => {
                let id = ClientId::new(&kind, &name, &self.settings.host).to_string();
                let result = self.stop(&id, StopCause::Request, known, Instant::now());
                let _ = reply.send(result);
            }
            Request::Said { id, status } => self.said(&id, status),
        }
    }

    /// What a plugin said of itself: one that says `stopped` meant to end.
    fn said(&mut self, id: &ClientId, status: ClientStatus) {
        if let Some(plugin) = self.plugins.get_mut(&id.to_string()) {
            plugin.said_stopped = status == ClientStatus::Stopped;
        }
    }

    /// The plugin will not stop by itself (nothing serves its service, the
    /// broker is gone, it refused): SIGTERM now rather than after the
    /// grace, which matters most when the whole hub stops, since the
    /// broker then goes down at the same moment as the manager.
    fn no_clean_stop(&mut self, id: &str, now: Instant) {
        if let Some(Plugin {
            phase: Phase::Stopping(stopping),
            ..
        }) = self.plugins.get_mut(id)
        {
            if stopping.kill_at.is_none() {
                stopping.term_at = stopping.term_at.min(now);
            }
        }
    }

    fn report(&self, id: &str, pid: Option<u32>, status: ClientStatus, comment: &str) {
        let Some(plugin) = self.plugins.get(id) else { return };
        let event = ProcessEvent {
            id: plugin.id.clone(),
            pid,
            status,
            comment: comment.to_owned(),
        };
        // Gone only when the manager stops, and then nobody needs to know.
        let _ = self.events.send(event);
    }

    fn start(&mut self, id: &str, origin: Origin, now: Instant) -> Result<u32, String> {
        let Some(plugin) = self.plugins.get_mut(id) else {
            return Err(format!(
                "{id} has no manifest with a command, so this manager cannot start it"
            ));
        };
        match (plugin.phase, plugin.process.as_ref()) {
            (Phase::Running, Some(child)) => return Err(format!("{id} is already running (pid {})", child.id())),
            (Phase::Stopping(_), _) => return Err(format!("{id} is stopping; start it again once it has stopped")),
            _ => {}
        }
        plugin.said_stopped = false;
        if origin == Origin::User {
            // A start by hand is a fresh start: earlier crashes no longer
            // count towards the restart limit.
            plugin.restarts.clear();
        }
        let mut environment = self.wiring.environment.clone();
        if let Some(logins) = &self.wiring.logins {
            // A new secret at every start, forgotten when it exits.
            environment.push((majordome_net::zap::USER_VARIABLE.to_owned(), id.to_owned()));
            environment.push((majordome_net::zap::PASSWORD_VARIABLE.to_owned(), logins.issue(id)));
        }
        match spawn(
            &plugin.manifest,
            &environment,
            &self.wiring.log_dir,
            self.settings.max_log_bytes,
        ) {
            Ok(child) => {
                let pid = child.id();
                plugin.process = Some(child);
                plugin.started_at = now;
                plugin.phase = Phase::Running;
                let comment = match origin {
                    Origin::User | Origin::Autostart => format!("started by the manager, pid {pid}"),
                    Origin::Restart { attempt } => format!(
                        "restarted by the manager, pid {pid} (restart {attempt} of at most {} within {} s)",
                        self.policy.limit,
                        self.policy.window.as_secs()
                    ),
                };
                tracing::info!(plugin = %id, pid, "{comment}");
                self.report(id, Some(pid), ClientStatus::Starting, &comment);
                Ok(pid)
            }
            Err(reason) => {
                tracing::warn!(plugin = %id, "could not start: {reason}");
                if let Origin::Restart { .. } = origin {
                    // A failed restart is one more death: the policy
                    // decides again, so a broken binary ends in a give-up
                    // instead of a tight loop.
                    let decision = plugin.restarts.after_exit(&self.policy, now, now);
                    let how = format!("could not be restarted: {reason}");
                    let (phase, comment) = self.after_death(&how, decision, now);
                    if let Some(plugin) = self.plugins.get_mut(id) {
                        plugin.phase = phase;
                    }
                    self.report(id, None, ClientStatus::Dead, &comment);
                } else {
                    plugin.phase = Phase::Idle;
                    self.report(id, None, ClientStatus::Dead, &format!("could not start: {reason}"));
                }
                Err(format!("cannot start {id}: {reason}"))
            }
        }
    }

    /// The phase and comment after a death, per the policy's decision.
    fn after_death(&self, how: &str, decision: RestartDecision, now: Instant) -> (Phase, String) {
        match decision {
            RestartDecision::After { delay, attempt } => (
                Phase::RestartAt {
                    at: now + delay,
                    attempt,
                },
                format!("{how}; restarting in {} s", delay.as_secs_f64()),
            ),
            RestartDecision::GiveUp { restarts } => (
                Phase::Idle,
                format!(
                    "{how}; gave up after {restarts} restarts within {} s (start it again with plugin.start.do)",
                    self.policy.window.as_secs()
                ),
            ),
        }
    }

    fn stop(&mut self, id: &str, cause: StopCause, known: Option<ClientStatus>, now: Instant) -> Result<(), String> {
        // SIGKILL's own grace is chosen in `poll`, once SIGTERM has gone.
        let stop_grace = match cause {
            StopCause::Request => self.settings.stop_grace,
            StopCause::Shutdown => self.settings.shutdown_stop_grace,
        };
        let Some(plugin) = self.plugins.get_mut(id) else {
            return Err(match known {
                Some(status) => format!(
                    "{id} was not started by this manager (status {status}); send plugin.stop.do to its own service {id}"
                ),
                None => format!("no client '{id}'"),
            });
        };
        match plugin.phase {
            Phase::Running => {
                // When the whole hub stops, its broker goes down at the
                // same moment: the plugin could not hear a `plugin.stop.do`,
                // so SIGTERM (which majordome's plugins take as a clean
                // stop) goes at once.
                let term_at = match cause {
                    StopCause::Request => now + stop_grace,
                    StopCause::Shutdown => now,
                };
                plugin.phase = Phase::Stopping(Stopping {
                    cause,
                    term_at,
                    kill_at: None,
                    killed: None,
                });
                let (kind, name) = (plugin.manifest.kind.clone(), plugin.manifest.name.clone());
                let pid = plugin.process.as_ref().map(Child::id);
                if cause == StopCause::Request {
                    // Asking costs a round trip; no use waiting past the grace.
                    self.ask_to_stop(id, &kind, &name, self.settings.stop_request_timeout.min(stop_grace));
                }
                let comment = match cause {
                    StopCause::Request => "stop requested".to_owned(),
                    StopCause::Shutdown => "stopping because the manager stops".to_owned(),
                };
                self.report(id, pid, ClientStatus::StopRequest, &comment);
                Ok(())
            }
            // Already on its way: a second request changes nothing.
            Phase::Stopping(_) => Ok(()),
            Phase::RestartAt { .. } => {
                plugin.phase = Phase::Idle;
                self.report(
                    id,
                    None,
                    ClientStatus::Stopped,
                    "stopped on request while waiting to be restarted",
                );
                Ok(())
            }
            Phase::Idle => {
                let status = known.unwrap_or(ClientStatus::Unknown);
                Err(format!("{id} is not running (status {status})"))
            }
        }
    }

    /// Sends the plugin its own `plugin.stop.do`; [`Supervisor::poll`]
    /// looks for the answer, so reaping and other requests go on meanwhile.
    fn ask_to_stop(&mut self, id: &str, kind: &str, name: &str, timeout: Duration) {
        if self.bus.is_none() {
            match AsyncClient::connect(&self.wiring.broker) {
                Ok(bus) => self.bus = Some(bus),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot reach the broker to ask a plugin to stop");
                    self.no_clean_stop(id, Instant::now());
                    return;
                }
            }
        }
        let (Some(bus), Some(plugin)) = (self.bus.as_ref(), self.plugins.get_mut(id)) else {
            return;
        };
        let data = json!({"type": kind, "name": name, "id": name, "host": self.settings.host});
        let body = Message::new("plugin.stop.do", data).to_frames();
        plugin.asking = Some(bus.request(id, body, timeout));
    }

    /// Takes the answers to `plugin.stop.do` that have come: a plugin that
    /// cannot be asked, or refuses, gets SIGTERM at once.
    fn take_stop_answers(&mut self, now: Instant) {
        let mut refused = Vec::new();
        for (id, plugin) in &mut self.plugins {
            let Some(outcome) = plugin.asking.as_mut().and_then(PendingReply::try_take) else {
                continue;
            };
            plugin.asking = None;
            match outcome.map(|body| Message::from_frames(&body)) {
                Ok(Ok(reply)) if reply.status() != Some(false) => {
                    tracing::debug!(plugin = %id, "the plugin agreed to stop");
                }
                Ok(Ok(reply)) => {
                    tracing::debug!(plugin = %id, reason = reply.reason().unwrap_or_default(), "no clean stop");
                    refused.push(id.clone());
                }
                Ok(Err(e)) => {
                    tracing::debug!(plugin = %id, error = %e, "no clean stop: its answer is not Domogik's");
                    refused.push(id.clone());
                }
                Err(e) => {
                    tracing::debug!(plugin = %id, error = %e, "no clean stop");
                    refused.push(id.clone());
                }
            }
        }
        for id in refused {
            self.no_clean_stop(&id, now);
        }
        if self.plugins.values().all(|p| p.asking.is_none()) {
            self.bus = None;
        }
    }

    /// Reaps what exited, escalates stops, restarts what is due, keeps the
    /// logs within bounds.
    fn poll(&mut self, now: Instant) {
        self.take_stop_answers(now);
        if now.saturating_duration_since(self.logs_checked) >= LOG_CHECK {
            self.logs_checked = now;
            for plugin in self.plugins.values().filter(|p| p.process.is_some()) {
                let path = log_path(&self.wiring.log_dir, &plugin.manifest.kind, &plugin.manifest.name);
                match keep_log_within(&path, self.settings.max_log_bytes) {
                    Ok(true) => tracing::info!(plugin = %plugin.id, "its log went over its bound; it starts again"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(plugin = %plugin.id, error = %e, "could not keep its log within bounds"),
                }
            }
        }
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let Some(plugin) = self.plugins.get_mut(&id) else {
                continue;
            };
            if let Some(child) = plugin.process.as_mut() {
                let pid = child.id();
                if has_exited(pid) {
                    // Whatever the plugin left in its group goes with it,
                    // while the group's id is still safely ours.
                    signal_group(pid, Signal::SIGKILL);
                    let how = match child.wait() {
                        Ok(status) => describe_exit(status),
                        Err(e) => format!("ended (its status could not be read: {e})"),
                    };
                    plugin.process = None;
                    if let Some(logins) = &self.wiring.logins {
                        logins.revoke(&id);
                    }
                    self.on_exit(&id, &how, now);
                    continue;
                }
                if let Phase::Stopping(mut stopping) = plugin.phase {
                    if stopping.kill_at.is_none() && now >= stopping.term_at {
                        signal_group(pid, Signal::SIGTERM);
                        let kill_grace = match stopping.cause {
                            StopCause::Request => self.settings.kill_grace,
                            StopCause::Shutdown => self.settings.shutdown_kill_grace,
                        };
                        stopping.kill_at = Some(now + kill_grace);
                    } else if let (Some(kill_at), None) = (stopping.kill_at, stopping.killed) {
                        if now >= kill_at {
                            signal_group(pid, Signal::SIGKILL);
                            stopping.killed = Some((now, now.saturating_duration_since(stopping.term_at)));
                        }
                    }
                    plugin.phase = Phase::Stopping(stopping);
                }
            } else if let Phase::RestartAt { at, attempt } = plugin.phase {
                if now >= at {
                    // Failures are reported by `start` itself.
                    let _ = self.start(&id, Origin::Restart { attempt }, now);
                }
            }
        }
    }

    fn on_exit(&mut self, id: &str, how: &str, now: Instant) {
        let Some(plugin) = self.plugins.get_mut(id) else { return };
        let said_stopped = plugin.said_stopped;
        // Its answer to a stop, if any, no longer matters.
        plugin.asking = None;
        tracing::info!(plugin = %id, "{how}");
        match plugin.phase {
            Phase::Stopping(stopping) => {
                plugin.phase = Phase::Idle;
                let forced = stopping
                    .killed
                    .map(|(_, ignored)| format!(" after ignoring SIGTERM for {:.1} s", ignored.as_secs_f64()))
                    .unwrap_or_default();
                let comment = match stopping.cause {
                    StopCause::Request => format!("stopped on request ({how}{forced})"),
                    StopCause::Shutdown => format!("stopped with the manager ({how}{forced})"),
                };
                self.report(id, None, ClientStatus::Stopped, &comment);
            }
            // A plugin that said it stopped (someone sent plugin.stop.do to
            // its own service) meant to end: it is not restarted.
            _ if said_stopped => {
                plugin.phase = Phase::Idle;
                self.report(id, None, ClientStatus::Stopped, &format!("stopped by itself ({how})"));
            }
            _ if !plugin.manifest.restart => {
                plugin.phase = Phase::Idle;
                self.report(id, None, ClientStatus::Dead, how);
            }
            _ => {
                let decision = plugin.restarts.after_exit(&self.policy, plugin.started_at, now);
                let (phase, comment) = self.after_death(how, decision, now);
                if let Some(plugin) = self.plugins.get_mut(id) {
                    plugin.phase = phase;
                }
                self.report(id, None, ClientStatus::Dead, &comment);
            }
        }
    }

    /// Stops every child (shorter graces than a stop on request) and
    /// reaps them all, so the manager leaves no orphan.
    fn stop_everything(&mut self, inbox: &mpsc::Receiver<Request>) {
        let now = Instant::now();
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in &ids {
            let Some(plugin) = self.plugins.get_mut(id) else {
                continue;
            };
            match plugin.phase {
                Phase::Running => {
                    let _ = self.stop(id, StopCause::Shutdown, None, now);
                }
                Phase::RestartAt { .. } => {
                    plugin.phase = Phase::Idle;
                    self.report(id, None, ClientStatus::Dead, "not restarted: the manager stopped");
                }
                Phase::Stopping(_) | Phase::Idle => {}
            }
        }
        // A stop by request already under way keeps its own (longer)
        // graces; past them, and once SIGKILL had time to work, the thread
        // gives up waiting rather than hang the manager's exit on a process
        // the kernel cannot kill (stuck in an uninterruptible wait).
        let longest = self.settings.stop_grace.max(self.settings.shutdown_stop_grace)
            + 2 * self.settings.kill_grace.max(self.settings.shutdown_kill_grace);
        let give_up_at = now + longest;
        loop {
            self.poll(Instant::now());
            let left: Vec<(&String, u32)> = self
                .plugins
                .iter()
                .filter_map(|(id, p)| Some((id, p.process.as_ref()?.id())))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= give_up_at {
                for (id, pid) in left {
                    tracing::error!(plugin = %id, pid, "still running after SIGKILL; majordome leaves it behind");
                }
                break;
            }
            // Requests still arriving are refused; the wait doubles as the
            // pause between two polls.
            match inbox.recv_timeout(self.next_wake(Instant::now())) {
                Ok(Request::Start { reply, .. }) => {
                    let _ = reply.send(Err("the manager is stopping".to_owned()));
                }
                Ok(Request::Stop { reply, .. }) => {
                    let _ = reply.send(Err("the manager is stopping".to_owned()));
                }
                Ok(Request::Said { id, status }) => self.said(&id, status),
                // Time to poll again.
                Err(_) => {}
            }
        }
        self.bus = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_reads_only_the_end_and_drops_the_cut_line() {
        let folder = tempfile::tempdir().unwrap();
        let path = log_path(folder.path(), "plugin", "fake");
        assert_eq!(log_tail(&path, 10).unwrap(), Vec::<String>::new());
        // 40,000 lines of 10 bytes: more than the 256 KiB read.
        let text: String = (0..40_000).map(|i| format!("line {i:04}\n")).collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 2).unwrap(), ["line 39998", "line 39999"]);
        let all = log_tail(&path, 1_000_000).unwrap();
        assert_eq!(all.len(), (LOG_TAIL_BYTES / 11) as usize);
        assert!(all[0].starts_with("line "), "{}", all[0]);
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            limit: 5,
            window: Duration::from_secs(600),
        }
    }

    #[test]
    fn restarts_back_off_doubling_and_give_up_past_the_limit() {
        let policy = policy();
        let mut restarts = Restarts::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut delays = Vec::new();
        for attempt in 1..=5 {
            match restarts.after_exit(&policy, now, now + Duration::from_secs(1)) {
                RestartDecision::After { delay, attempt: a } => {
                    assert_eq!(a, attempt);
                    delays.push(delay.as_secs());
                    now += Duration::from_secs(1) + delay;
                }
                other => panic!("restart {attempt}: {other:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 8, 16]);
        assert_eq!(
            restarts.after_exit(&policy, now, now + Duration::from_secs(1)),
            RestartDecision::GiveUp { restarts: 5 }
        );
        // Once the oldest restarts leave the window, there is room again.
        let later = t0 + Duration::from_secs(602);
        assert!(matches!(
            restarts.after_exit(&policy, later - Duration::from_secs(1), later),
            RestartDecision::After { attempt: 5, .. }
        ));
    }

    #[test]
    fn a_plugin_up_for_a_whole_window_starts_afresh_and_the_backoff_is_capped() {
        let policy = RestartPolicy {
            backoff_max: Duration::from_secs(5),
            limit: 10,
            ..policy()
        };
        let mut restarts = Restarts::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            restarts.after_exit(&policy, t0, t0);
        }
        assert_eq!(
            restarts.after_exit(&policy, t0, t0),
            RestartDecision::After {
                delay: Duration::from_secs(5),
                attempt: 5
            }
        );
        let much_later = t0 + Duration::from_secs(700);
        assert_eq!(
            restarts.after_exit(&policy, t0 + Duration::from_secs(50), much_later),
            RestartDecision::After {
                delay: Duration::from_secs(1),
                attempt: 1
            }
        );
        let none = RestartPolicy { limit: 0, ..policy };
        assert_eq!(
            Restarts::default().after_exit(&none, t0, t0),
            RestartDecision::GiveUp { restarts: 0 }
        );
    }

    #[test]
    fn exits_are_described_in_words() {
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by signal 9 (SIGKILL)");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(11 | 0x80)),
            "killed by signal 11 (SIGSEGV), core dumped"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(40)), "killed by signal 40");
    }

    #[test]
    fn majordome_in_a_command_is_this_binary() {
        let command: Vec<String> = ["majordome", "plugin", "fake"].map(String::from).to_vec();
        let (program, args) = resolve_command(&command).unwrap();
        assert_eq!(program, std::env::current_exe().unwrap());
        assert_eq!(args, ["plugin", "fake"]);
        let other: Vec<String> = vec!["/usr/bin/env".into()];
        assert_eq!(resolve_command(&other).unwrap().0, PathBuf::from("/usr/bin/env"));
        assert!(resolve_command(&[]).unwrap_err().contains("no command"));
    }

    #[test]
    fn start_lines_carry_utc_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000.5), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(4_107_542_399.0), "2100-02-28 23:59:59 UTC");
    }
}
