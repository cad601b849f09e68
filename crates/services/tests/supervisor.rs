//! The manager's supervisor with real child processes, a real broker and
//! forwarder on port 0, and a real database: starting a plugin with its
//! environment and log, a crash seen at once and restarted, the restart
//! limit, a stop that must end in SIGKILL, autostart, children reaped at
//! shutdown, status history across a restart of the manager, and
//! `configured` from the config service.
//!
//! The plugins are shell one-liners: they never speak on the bus, which is
//! fine because the manager's silence rule is set far beyond each test.

use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use majordome_client::{Client, Message, Shutdown};
use majordome_services::manager::{self, ManagerEndpoints, ManagerSettings, Registry};
use majordome_services::{ConfigService, Manifest};
use majordome_store::Durability;
use serde_json::{json, Value};

mod common;

use common::{eventually, Bus};

const HOST: &str = "box";

fn manager_endpoints(bus: &Bus) -> ManagerEndpoints {
    ManagerEndpoints {
        broker: bus.broker.clone(),
        publish: bus.publish_at.clone(),
        subscribe: bus.subscribe_at.clone(),
        local_broker: None,
        logins: None,
    }
}

/// Settings for tests: short graces and backoffs, silence far away.
fn settings() -> ManagerSettings {
    ManagerSettings {
        host: HOST.into(),
        dead_after: Duration::from_secs(600),
        stop_request_timeout: Duration::from_millis(300),
        stop_grace: Duration::from_millis(300),
        kill_grace: Duration::from_millis(300),
        shutdown_stop_grace: Duration::from_millis(300),
        shutdown_kill_grace: Duration::from_millis(300),
        restart_backoff: Duration::from_millis(50),
        restart_backoff_max: Duration::from_millis(200),
        config_timeout: Duration::from_millis(500),
        plugin_environment: vec![("MAJORDOME_TEST_EXTRA".into(), "extra".into())],
        ..ManagerSettings::default()
    }
}

fn plugin(name: &str, script: &str, restart: bool, autostart: bool) -> Manifest {
    Manifest::parse(
        &json!({
            "name": name, "version": "1",
            "command": ["sh", "-c", script],
            "restart": restart, "autostart": autostart,
            "config": [{"key": "unit", "type": "string", "required": true}],
        })
        .to_string(),
    )
    .unwrap()
}

/// A manager running in a thread, on its own data folder.
struct Manager {
    shutdown: Shutdown,
    thread: JoinHandle<()>,
}

impl Manager {
    fn start(bus: &Bus, data: &Path, manifests: Vec<Manifest>, settings: ManagerSettings) -> Manager {
        let database = majordome_store::database_path(data);
        let registry = Registry::open(manifests, settings, &database, Durability::Process).unwrap();
        let shutdown = Shutdown::new().unwrap();
        let (own, endpoints, logs) = (shutdown.clone(), manager_endpoints(bus), log_dir(data));
        let thread = thread::spawn(move || manager::run(registry, &endpoints, &logs, &own).unwrap());
        Manager { shutdown, thread }
    }

    /// Stops the manager; returns once `run` has returned.
    fn stop(self) {
        self.shutdown.trigger();
        self.thread.join().unwrap();
    }
}

fn log_dir(data: &Path) -> PathBuf {
    data.join("logs")
}

fn log_of(data: &Path, name: &str) -> String {
    std::fs::read_to_string(log_dir(data).join(format!("plugin-{name}.log"))).unwrap_or_default()
}

fn ask(client: &mut Client, action: &str, data: Value) -> Message {
    client.request_message("manager", &Message::new(action, data)).unwrap()
}

fn detail(client: &mut Client, name: &str) -> Value {
    let id = format!("plugin-{name}.{HOST}");
    let reply = ask(client, "client.detail.get", json!({"id": id}));
    reply.data[&id].clone()
}

fn history(client: &mut Client, name: &str) -> Vec<Value> {
    let reply = ask(
        client,
        "client.history.get",
        json!({"id": format!("plugin-{name}.{HOST}")}),
    );
    // Newest first on the wire; oldest first reads better here.
    let mut entries = reply.data["history"].as_array().cloned().unwrap_or_default();
    entries.reverse();
    entries
}

/// True while `pid` is a live (not zombie) process.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// True once `pid` no longer exists at all (ended and reaped).
fn gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) != 0 }
}

fn pid_in(entry: &Value) -> Option<u32> {
    entry["pid"].as_u64().map(|p| p as u32)
}

#[test]
fn a_plugin_starts_with_its_log_dies_restarts_and_its_history_survives_the_manager() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let script = r#"echo started; echo "broker=$MAJORDOME_BROKER"; echo "publish=$MAJORDOME_PUBLISH";
        echo "subscribe=$MAJORDOME_SUBSCRIBE"; echo "host=$MAJORDOME_HOST"; echo "extra=$MAJORDOME_TEST_EXTRA";
        exec sleep 1000"#;
    let manifests = vec![plugin("sleeper", script, true, false)];
    let manager = Manager::start(&bus, data.path(), manifests.clone(), settings());
    let mut c = bus.client(Duration::from_secs(10));

    let started = ask(&mut c, "plugin.start.do", json!({"name": "sleeper"}));
    assert_eq!(started.action, "plugin.start.result");
    assert_eq!(started.status(), Some(true), "{:?}", started.data);
    assert_eq!(started.data["reason"], "");
    let pid = started.data["pid"].as_u64().expect("the pid") as u32;
    assert!(running(pid));
    let entry = detail(&mut c, "sleeper");
    assert_eq!(entry["status"], "starting");
    assert_eq!(pid_in(&entry), Some(pid));
    assert!(
        entry["comment"].as_str().unwrap().contains(&format!("pid {pid}")),
        "{entry}"
    );

    // Its output lands in its log, after a line marking the start, and it
    // was given the bus's endpoints, the host and the extras.
    let log = eventually("the log to hold the environment", || {
        // A whole line: the marker line quotes the script, "extra=" and all.
        let log = log_of(data.path(), "sleeper");
        log.lines().any(|l| l == "extra=extra").then_some(log)
    });
    assert!(log.starts_with("--- "), "{log}");
    assert!(log.lines().any(|l| l == "started"), "{log}");
    for line in [
        format!("broker={}", bus.broker),
        format!("publish={}", bus.publish_at),
        format!("subscribe={}", bus.subscribe_at),
        format!("host={HOST}"),
        "extra=extra".to_owned(),
    ] {
        assert!(log.lines().any(|l| l == line), "{line} in {log}");
    }

    // Never twice.
    let again = ask(
        &mut c,
        "plugin.start.do",
        json!({"name": "sleeper", "type": "plugin", "host": HOST}),
    );
    assert_eq!(again.status(), Some(false));
    assert!(again.reason().unwrap().contains("already running"), "{:?}", again.data);

    // kill -9: dead at once with the signal in the comment, then running
    // again under a new pid.
    // SAFETY: a signal to the child this test's manager started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let new_pid = eventually("a restart under a new pid", || {
        pid_in(&detail(&mut c, "sleeper")).filter(|p| *p != pid)
    });
    assert!(running(new_pid));
    assert!(gone(pid), "the killed child was reaped");
    let entries = history(&mut c, "sleeper");
    let dead = entries
        .iter()
        .find(|h| h["status"] == "dead")
        .unwrap_or_else(|| panic!("no dead in {entries:?}"));
    let comment = dead["comment"].as_str().unwrap();
    assert!(comment.contains("killed by signal 9"), "{comment}");
    assert!(comment.contains("restarting in"), "{comment}");
    let restarted = entries.last().unwrap();
    assert_eq!(restarted["status"], "starting");
    assert!(
        restarted["comment"]
            .as_str()
            .unwrap()
            .contains(&format!("restarted by the manager, pid {new_pid}")),
        "{restarted}"
    );
    eventually("the restart's start line in the log", || {
        (log_of(data.path(), "sleeper")
            .lines()
            .filter(|l| *l == "started")
            .count()
            == 2)
            .then_some(())
    });

    // Stopping the manager stops and reaps its children before run returns.
    manager.stop();
    assert!(gone(new_pid), "pid {new_pid} outlived the manager");

    // A new manager on the same database has the whole history, and the
    // last status.
    let manager = Manager::start(&bus, data.path(), manifests, settings());
    let entry = detail(&mut c, "sleeper");
    assert_eq!(entry["status"], "stopped", "{entry}");
    assert!(
        entry["comment"].as_str().unwrap().contains("stopped with the manager"),
        "{entry}"
    );
    assert_eq!(entry["pid"], Value::Null);
    let statuses: Vec<String> = history(&mut c, "sleeper")
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        statuses,
        ["starting", "dead", "starting", "stop-request", "stopped"],
        "{statuses:?}"
    );
    manager.stop();
    bus.stop();
}

/// Was: a plugin's log grew for as long as the plugin wrote, on the box's
/// one disk. Now past `max_log_bytes` it moves to `.log.1` and starts
/// again, the plugin writing on.
#[test]
fn a_plugin_log_past_its_bound_moves_aside_and_starts_again() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    // 200,000 bytes at once, then a line every 50 ms for as long as it runs.
    let script = r#"head -c 200000 /dev/zero | tr '\0' x; echo; n=0;
        while :; do n=$((n+1)); echo "tick $n"; sleep 0.05; done"#;
    let manifests = vec![plugin("chatty", script, false, false)];
    let limit = 64 * 1024;
    let manager = Manager::start(
        &bus,
        data.path(),
        manifests,
        ManagerSettings {
            max_log_bytes: limit,
            ..settings()
        },
    );
    let mut c = bus.client(Duration::from_secs(10));
    let started = ask(&mut c, "plugin.start.do", json!({"name": "chatty"}));
    assert_eq!(started.status(), Some(true), "{:?}", started.data);
    let older = log_dir(data.path()).join("plugin-chatty.log.1");
    let moved = eventually("the log to move aside", || std::fs::read_to_string(&older).ok());
    assert!(moved.len() > 200_000, "{} bytes moved", moved.len());
    assert!(moved.starts_with("--- "), "the older log starts with the start's line");
    // The log starts again with a line that says where the rest went, and
    // the plugin's next lines come after it.
    let log = eventually("the plugin to write on", || {
        let log = log_of(data.path(), "chatty");
        (log.lines().filter(|l| l.starts_with("tick ")).count() >= 3).then_some(log)
    });
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("--- ")
            && first.contains(&format!("went over {limit} bytes"))
            && first.ends_with("plugin-chatty.log.1"),
        "{first}"
    );
    assert!((log.len() as u64) < limit, "{} bytes", log.len());
    assert!(!log.contains("xxxx"), "the old content is gone from the log");
    drop(manager);
}

#[test]
fn a_plugin_that_keeps_dying_is_given_up_on() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let manifests = vec![plugin("crasher", "echo started; exit 3", true, false)];
    let manager = Manager::start(
        &bus,
        data.path(),
        manifests,
        ManagerSettings {
            restart_limit: 2,
            ..settings()
        },
    );
    let mut c = bus.client(Duration::from_secs(10));
    let started = ask(&mut c, "plugin.start.do", json!({"id": "crasher"}));
    assert_eq!(started.status(), Some(true), "{:?}", started.data);
    let entry = eventually("the supervisor to give up", || {
        let entry = detail(&mut c, "crasher");
        entry["comment"].as_str()?.contains("gave up").then_some(entry)
    });
    assert_eq!(entry["status"], "dead");
    let comment = entry["comment"].as_str().unwrap();
    assert!(comment.contains("exited with status 3"), "{comment}");
    assert!(comment.contains("gave up after 2 restarts"), "{comment}");
    let entries = history(&mut c, "crasher");
    let starts = entries.iter().filter(|h| h["status"] == "starting").count();
    assert_eq!(starts, 3, "one start and two restarts: {entries:?}");
    assert_eq!(
        log_of(data.path(), "crasher")
            .lines()
            .filter(|l| *l == "started")
            .count(),
        3
    );
    // A start by hand is a fresh start, with the full allowance again.
    let again = ask(&mut c, "plugin.start.do", json!({"name": "crasher"}));
    assert_eq!(again.status(), Some(true), "{:?}", again.data);
    eventually("a second give-up", || {
        let entries = history(&mut c, "crasher");
        (entries
            .iter()
            .filter(|h| h["comment"].as_str().unwrap_or_default().contains("gave up"))
            .count()
            == 2)
            .then_some(())
    });
    assert_eq!(
        history(&mut c, "crasher")
            .iter()
            .filter(|h| h["status"] == "starting")
            .count(),
        6
    );
    manager.stop();
    bus.stop();
}

#[test]
fn a_stop_ends_in_sigkill_for_a_plugin_that_ignores_sigterm_and_is_never_restarted() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    // The trap is set before "started" is written, so once the log holds
    // it, SIGTERM is ignored (and exec keeps it ignored in sleep).
    let script = "trap '' TERM; echo started; exec sleep 1000";
    let manager = Manager::start(
        &bus,
        data.path(),
        vec![plugin("stubborn", script, true, false)],
        settings(),
    );
    let mut c = bus.client(Duration::from_secs(10));
    let started = ask(&mut c, "plugin.start.do", json!({"name": "stubborn"}));
    assert_eq!(started.status(), Some(true), "{:?}", started.data);
    let pid = started.data["pid"].as_u64().unwrap() as u32;
    eventually("the trap to be set", || {
        log_of(data.path(), "stubborn")
            .lines()
            .any(|l| l == "started")
            .then_some(())
    });

    // The reply comes at once, while the stop goes on in the background.
    let asked = Instant::now();
    let stop = ask(&mut c, "plugin.stop.do", json!({"name": "stubborn"}));
    assert_eq!(stop.action, "plugin.stop.result");
    assert_eq!(
        (stop.status(), stop.reason()),
        (Some(true), Some("")),
        "{:?}",
        stop.data
    );
    assert_eq!(detail(&mut c, "stubborn")["status"], "stop-request");
    let entry = eventually("the stop to end", || {
        let entry = detail(&mut c, "stubborn");
        (entry["status"] == "stopped").then_some(entry)
    });
    let comment = entry["comment"].as_str().unwrap();
    assert!(comment.contains("killed by signal 9"), "{comment}");
    assert!(comment.contains("after ignoring SIGTERM"), "{comment}");
    assert!(!comment.contains("restarting"), "{comment}");
    assert_eq!(entry["pid"], Value::Null);
    assert!(gone(pid));
    // plugin.stop.do went to the plugin's own service first; nothing
    // serves it here, so once the broker said so SIGTERM went, and SIGKILL
    // only after the kill grace.
    assert!(asked.elapsed() >= Duration::from_millis(300), "{:?}", asked.elapsed());

    // Nothing more to stop.
    let again = ask(&mut c, "plugin.stop.do", json!({"name": "stubborn"}));
    assert_eq!(again.status(), Some(false));
    assert!(
        again.reason().unwrap().contains("is not running (status stopped)"),
        "{:?}",
        again.data
    );
    let statuses: Vec<String> = history(&mut c, "stubborn")
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["starting", "stop-request", "stopped"]);
    assert_eq!(
        log_of(data.path(), "stubborn")
            .lines()
            .filter(|l| *l == "started")
            .count(),
        1
    );
    manager.stop();
    bus.stop();
}

#[test]
fn autostarted_plugins_are_reaped_at_shutdown_even_when_they_ignore_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let manifests = vec![
        plugin("first", "echo started; exec sleep 1000", true, true),
        plugin("second", "trap '' TERM; echo started; exec sleep 1000", false, true),
        plugin("manual", "exec sleep 1000", false, false),
    ];
    let manager = Manager::start(&bus, data.path(), manifests, settings());
    let mut c = bus.client(Duration::from_secs(10));
    let pids: Vec<u32> = ["first", "second"]
        .iter()
        .map(|name| eventually("an autostart", || pid_in(&detail(&mut c, name))))
        .collect();
    eventually("both to have started", || {
        ["first", "second"]
            .iter()
            .all(|name| log_of(data.path(), name).lines().any(|l| l == "started"))
            .then_some(())
    });
    assert_eq!(detail(&mut c, "manual")["status"], "unknown");
    manager.stop();
    for pid in pids {
        assert!(gone(pid), "pid {pid} outlived the manager");
    }
    bus.stop();
}

#[test]
fn wrong_requests_get_clear_reasons() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let manifests = vec![
        plugin("sleeper", "exec sleep 1000", false, false),
        Manifest::parse(r#"{"name": "remote", "version": "1"}"#).unwrap(),
        Manifest::parse(r#"{"name": "missing", "version": "1", "command": ["/nonexistent/majordome-plugin"]}"#)
            .unwrap(),
    ];
    let manager = Manager::start(&bus, data.path(), manifests, settings());
    let mut c = bus.client(Duration::from_secs(10));
    for (action, data, reason) in [
        (
            "plugin.start.do",
            json!({"name": "nope"}),
            "no manifest for plugin 'nope'",
        ),
        ("plugin.start.do", json!({"name": "remote"}), "has no command"),
        (
            "plugin.start.do",
            json!({"name": "sleeper", "host": "elsewhere"}),
            "not of 'elsewhere'",
        ),
        ("plugin.start.do", json!({"host": HOST}), "needs 'name' (or 'id')"),
        (
            "plugin.start.do",
            json!({"name": "missing"}),
            "No such file or directory",
        ),
        ("plugin.stop.do", json!({"name": "sleeper"}), "is not running"),
        (
            "plugin.stop.do",
            json!({"name": "nope"}),
            "no manifest for plugin 'nope'",
        ),
    ] {
        let reply = ask(&mut c, action, data.clone());
        assert_eq!(reply.action, action.replace(".do", ".result"));
        assert_eq!(reply.status(), Some(false), "{data}");
        assert!(reply.reason().unwrap().contains(reason), "{data}: {:?}", reply.data);
    }
    // The failed start is on record too.
    let entry = detail(&mut c, "missing");
    assert_eq!(entry["status"], "dead");
    assert!(
        entry["comment"].as_str().unwrap().contains("could not start"),
        "{entry}"
    );
    manager.stop();
    bus.stop();
}

#[test]
fn configured_follows_the_config_service() {
    let data = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let manifests = vec![plugin("sleeper", "exec sleep 1000", false, false)];
    // The manager first: the config service comes up later, as it may in
    // `majordome up`.
    let manager = Manager::start(&bus, data.path(), manifests.clone(), settings());
    let mut c = bus.client(Duration::from_secs(10));
    assert_eq!(detail(&mut c, "sleeper")["configured"], Value::Null);
    let database = majordome_store::database_path(data.path());
    let config = ConfigService::open(&database, manifests, Durability::Process).unwrap();
    let config_stop = Shutdown::new().unwrap();
    let (own, broker, publish) = (config_stop.clone(), bus.broker.clone(), bus.publish_at.clone());
    let config_thread = thread::spawn(move || config.run(&broker, Some(&publish), &own).unwrap());
    // "unit" is required and has no default.
    eventually("configured false from config.get", || {
        (detail(&mut c, "sleeper")["configured"] == false).then_some(())
    });
    let target = json!({"type": "plugin", "name": "sleeper", "host": HOST, "key": "unit", "value": "C"});
    let list = eventually("configured true from the event", || {
        // Set again until it shows: an event published before the config
        // service's publisher has the manager's subscription is lost, as
        // with any ZeroMQ publisher.
        let set = c
            .request_message("config", &Message::new("config.set", target.clone()))
            .unwrap();
        assert_eq!(set.status(), Some(true), "{:?}", set.data);
        let list = ask(&mut c, "client.list.get", json!({})).data;
        (list[format!("plugin-sleeper.{HOST}")]["configured"] == true).then_some(list)
    });
    assert_eq!(list[format!("plugin-sleeper.{HOST}")]["status"], "unknown");
    config_stop.trigger();
    config_thread.join().unwrap();
    manager.stop();
    bus.stop();
}
