//! Logins and permissions, on real `majordome up` processes: ZAP refuses a
//! wrong password, a bind beyond loopback needs a user, and with
//! `loopback = "authenticated"` every identity does only what it may.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

/// How long a test waits for something that must happen (a bound that
/// stops a broken test, not a timing claim).
const LIMIT: Duration = Duration::from_secs(30);

/// A login for raw sockets.
#[derive(Clone)]
struct Login {
    user: String,
    password: String,
}

/// Makes the user `name` in `data` and returns its login.
fn add_user(data: &Path, name: &str) -> Login {
    let out = run(&["user", "add", name, "--data", data.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let password = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(password.len(), 48, "the secret is printed alone on stdout");
    Login {
        user: name.to_owned(),
        password,
    }
}

/// Writes `text` as the configuration file and returns its path.
fn config(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("majordome.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// A raw socket that logs in as `login` (or not at all).
fn socket_as(kind: zmq::SocketType, endpoint: &str, login: Option<&Login>) -> zmq::Socket {
    let socket = majordome_net::context().socket(kind).unwrap();
    socket.set_linger(0).unwrap();
    if let Some(login) = login {
        socket.set_plain_username(Some(&login.user)).unwrap();
        socket.set_plain_password(Some(&login.password)).unwrap();
    }
    socket.connect(endpoint).unwrap();
    socket
}

/// A Domogik-dialect request as `login`; the reply's action and data, or
/// `None` if nothing came within `wait`.
fn call_as(
    broker: &str,
    login: Option<&Login>,
    service: &str,
    action: &str,
    data: &Value,
    wait: Duration,
) -> Option<(String, Value)> {
    let dealer = socket_as(zmq::DEALER, broker, login);
    send(&dealer, &strings(&["", "MDPC01", service, action, &data.to_string()]));
    let reply = try_recv(&dealer, wait)?;
    let action = String::from_utf8_lossy(&reply[3]).into_owned();
    Some((action, serde_json::from_slice(&reply[4]).unwrap()))
}

/// A plain MDP request as `login`: the reply body, or `None`.
fn mdp_as(broker: &str, login: Option<&Login>, service: &str, body: &[&str], wait: Duration) -> Option<Vec<Bytes>> {
    let dealer = socket_as(zmq::DEALER, broker, login);
    let mut message = strings(&["", "MDPC01", service]);
    message.extend(strings(body));
    send(&dealer, &message);
    try_recv(&dealer, wait).map(|reply| reply[3..].to_vec())
}

fn broker_stats(broker: &str, login: &Login) -> Value {
    let reply = mdp_as(broker, Some(login), "mmi.stats", &[], LIMIT).expect("mmi.stats answers");
    serde_json::from_slice(&reply[0]).unwrap()
}

/// Polls until `check` holds, at most `LIMIT`.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < LIMIT, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A hub with `loopback = "authenticated"`, its data folder, the
/// configuration `extra` and the users `users`; `plugins` is the manifest
/// folder.
struct Hub {
    _up: Process,
    broker: String,
    subscribe: String,
    state: String,
    updates: String,
    _dir: tempfile::TempDir,
    data: PathBuf,
    users: Vec<Login>,
}

impl Hub {
    fn start(extra: &str, users: &[&str], plugins: Option<&Path>) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let users: Vec<Login> = users.iter().map(|name| add_user(&data, name)).collect();
        let file = config(
            dir.path(),
            &format!("[security]\nloopback = \"authenticated\"\n{extra}"),
        );
        let mut args = vec!["--config", file.to_str().unwrap()];
        if let Some(plugins) = plugins {
            args.extend(["--plugins", plugins.to_str().unwrap()]);
        }
        let (up, lines) = Process::up(&data, &args, 6);
        Hub {
            _up: up,
            broker: last_word(&lines[0]),
            subscribe: last_word(&lines[3]),
            state: last_word(&lines[4]),
            updates: last_word(&lines[5]),
            _dir: dir,
            data,
            users,
        }
    }

    fn user(&self, name: &str) -> &Login {
        self.users.iter().find(|l| l.user == name).unwrap()
    }

    /// Waits until `service` has a worker, asking as `login`.
    fn wait_for(&self, login: &Login, service: &str) {
        eventually(&format!("{service} is served"), || {
            mdp_as(&self.broker, Some(login), "mmi.service", &[service], LIMIT) == Some(strings(&["200"]))
        });
    }

    fn clients(&self, login: &Login) -> Value {
        let (_, data) = call_as(
            &self.broker,
            Some(login),
            "manager",
            "client.list.get",
            &json!({}),
            LIMIT,
        )
        .expect("manager");
        data
    }
}

#[test]
fn zap_lets_a_right_password_in_and_refuses_a_wrong_one_or_none() {
    let hub = Hub::start("", &["alice"], None);
    let alice = hub.user("alice").clone();
    hub.wait_for(&alice, "echo");
    let answer = call_as(&hub.broker, Some(&alice), "echo", "ping.get", &json!({"n": 1}), LIMIT);
    assert_eq!(answer, Some(("ping.result".to_owned(), json!({"n": 1}))));

    let wrong = Login {
        user: "alice".into(),
        password: "not-the-secret".into(),
    };
    let mallory = socket_as(zmq::DEALER, &hub.broker, Some(&wrong));
    send(&mallory, &strings(&["", "MDPC01", "mmi.service", "echo"]));
    let anonymous = socket_as(zmq::DEALER, &hub.broker, None);
    send(&anonymous, &strings(&["", "MDPC01", "mmi.service", "echo"]));
    // The handler said no (counted); the connection never carries a
    // message, so nothing comes back, ever.
    eventually("the wrong password is refused", || {
        broker_stats(&hub.broker, &alice)["logins_refused"].as_u64() >= Some(1)
    });
    assert_eq!(try_recv(&mallory, Duration::from_millis(300)), None);
    assert_eq!(try_recv(&anonymous, Duration::from_millis(300)), None);
    // The CLI says how to log in, and gets in once told.
    let out = majordome()
        .args([
            "call",
            "echo",
            "ping.get",
            "{}",
            "--broker",
            &hub.broker,
            "--timeout",
            "2",
        ])
        .env_remove("MAJORDOME_USER")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("MAJORDOME_USER"), "{said}");
    let out = majordome()
        .args(["call", "echo", "ping.get", "{}", "--broker", &hub.broker])
        .env("MAJORDOME_USER", "alice")
        .env("MAJORDOME_PASSWORD", &alice.password)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A user made while the hub runs can log in at once.
    let bob = add_user(&hub.data, "bob");
    assert!(call_as(&hub.broker, Some(&bob), "echo", "ping.get", &json!({}), LIMIT).is_some());
}

#[test]
fn a_bind_beyond_loopback_needs_a_user_and_then_asks_for_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = config(dir.path(), &format!("data = {:?}\n", data.to_str().unwrap()));
    let args = [
        "broker",
        "--bind",
        "tcp://0.0.0.0:0",
        "--config",
        file.to_str().unwrap(),
    ];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("refusing to listen on tcp://0.0.0.0:0") && error.contains("majordome user add NAME"),
        "{error}"
    );
    let alice = add_user(&data, "alice");
    let broker = Process::start_listening(&args);
    let port = broker.endpoint.rsplit(':').next().unwrap().to_owned();
    let local = format!("tcp://127.0.0.1:{port}");
    // Loopback reaches the same listener: it asks for a login too.
    assert_eq!(
        mdp_as(&local, None, "mmi.service", &["echo"], Duration::from_millis(500)),
        None
    );
    assert_eq!(
        mdp_as(&local, Some(&alice), "mmi.service", &["echo"], LIMIT),
        Some(strings(&["404"]))
    );
}

/// The shell command of a plugin that is not what it says: it publishes
/// (as itself, with the login the manager gave it) the status of the fake
/// plugin and a value of the fake plugin's lamp, whose uuid it reads from
/// `uuid_file`, then its own status, then waits.
fn rogue_command(uuid_file: &Path) -> Vec<String> {
    let bin = env!("CARGO_BIN_EXE_majordome");
    let script = format!(
        r#"uuid=$(cat {uuid})
pub() {{ "{bin}" pub "$1" "$2" --endpoint "$MAJORDOME_PUBLISH" --wait 5; }}
pub plugin.status '{{"type": "plugin", "name": "fake", "host": "'"$MAJORDOME_HOST"'", "event": "stopped"}}'
pub event.device.statechanged '{{"uuid": "'"$uuid"'", "event": "event.device.statechanged", "data": {{"level": 77, "unit": "", "quantity": "state"}}}}'
pub plugin.status '{{"type": "plugin", "name": "rogue", "host": "'"$MAJORDOME_HOST"'", "event": "alive"}}'
exec sleep 600"#,
        uuid = uuid_file.display()
    );
    vec!["sh".into(), "-c".into(), script]
}

#[test]
fn with_logins_a_plugin_speaks_only_for_itself() {
    let plugins = tempfile::tempdir().unwrap();
    let uuid_file = plugins.path().join("lamp-uuid");
    let manifest = json!({"name": "rogue", "version": "1.0", "autostart": false, "command": rogue_command(&uuid_file)});
    std::fs::write(plugins.path().join("rogue.json"), manifest.to_string()).unwrap();
    let hub = Hub::start("", &["admin"], Some(plugins.path()));
    let admin = hub.user("admin").clone();
    hub.wait_for(&admin, "devices");
    // The fake plugin (started with its own login) is alive and has made
    // its devices.
    let fake = eventually_find(&hub, &admin);
    let lamp = eventually_lamp(&hub, &admin, &fake);
    std::fs::write(&uuid_file, &lamp).unwrap();

    let watcher = socket_as(zmq::SUB, &hub.subscribe, Some(&admin));
    watcher.set_subscribe(b"plugin.status").unwrap();
    watcher.set_subscribe(b"event.device").unwrap();
    let host = fake.rsplit('.').next().unwrap().to_owned();
    let (_, started) = call_as(
        &hub.broker,
        Some(&admin),
        "manager",
        "plugin.start.do",
        &json!({"type": "plugin", "name": "rogue", "host": host}),
        LIMIT,
    )
    .unwrap();
    assert_eq!(started["status"], true, "{started}");
    // Its own status comes through; what it said of the other plugin and
    // of the other plugin's lamp did not, before or after.
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        assert!(
            start.elapsed() < LIMIT,
            "the rogue plugin's own status never came: {seen:?}"
        );
        let Some(message) = try_recv(&watcher, Duration::from_millis(200)) else {
            continue;
        };
        let data: Value = serde_json::from_slice(&message[1]).unwrap();
        seen.push(data.clone());
        if data["name"] == "rogue" {
            break;
        }
    }
    let forged: Vec<&Value> = seen
        .iter()
        .filter(|d| d["event"] == "stopped" || d["data"]["level"] == 77)
        .collect();
    assert!(forged.is_empty(), "forged events went through: {forged:?}");
    let (_, events) =
        call_as(&hub.broker, Some(&admin), "events", "stats.get", &json!({}), LIMIT).expect("events stats");
    assert_eq!(events["forbidden"], 2, "{events}");
    assert_eq!(hub.clients(&admin)[&fake]["status"], "alive");
}

/// The fake plugin's client id, once the manager says it is alive.
fn eventually_find(hub: &Hub, login: &Login) -> String {
    let mut found = None;
    eventually("the fake plugin is alive", || {
        let clients = hub.clients(login);
        found = clients.as_object().unwrap().iter().find_map(|(id, client)| {
            (id.starts_with("plugin-fake.") && client["status"] == "alive").then(|| id.clone())
        });
        found.is_some()
    });
    found.unwrap()
}

/// The uuid of one of `client`'s devices.
fn eventually_lamp(hub: &Hub, login: &Login, client: &str) -> String {
    let mut found = None;
    eventually("the fake plugin has devices", || {
        let (_, inventory) = call_as(&hub.broker, Some(login), "devices", "devices.get", &json!({}), LIMIT).unwrap();
        found = inventory["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|d| (d["client"] == client).then(|| d["uuid"].as_str().unwrap().to_owned()));
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn an_identity_without_the_permission_cannot_stop_a_plugin() {
    let hub = Hub::start(
        "[permissions.panel]\ncall = [\"manager/client.list.get\", \"echo\"]\n",
        &["admin", "panel"],
        None,
    );
    let (admin, panel) = (hub.user("admin").clone(), hub.user("panel").clone());
    hub.wait_for(&admin, "manager");
    let fake = eventually_find(&hub, &admin);
    let host = fake.rsplit('.').next().unwrap();
    let stop = json!({"type": "plugin", "name": "fake", "host": host});
    let (action, refused) =
        call_as(&hub.broker, Some(&panel), "manager", "plugin.stop.do", &stop, LIMIT).expect("an answer");
    assert_eq!(action, "plugin.stop.result");
    assert_eq!(refused["status"], false);
    assert_eq!(refused["error"], "forbidden");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("'panel' may not call manager/plugin.stop.do"),
        "{refused}"
    );
    // What it may do, it does; a plain MDP request (no action to check) to
    // a service it may not call whole gets no answer, as RFC 7 has none.
    assert!(call_as(
        &hub.broker,
        Some(&panel),
        "manager",
        "client.list.get",
        &json!({}),
        LIMIT
    )
    .is_some());
    assert_eq!(
        mdp_as(&hub.broker, Some(&panel), "manager", &["x"], Duration::from_millis(500)),
        None
    );
    let stats = broker_stats(&hub.broker, &admin);
    assert_eq!(stats["dropped"]["forbidden"], 2, "{stats}");
    assert_eq!(hub.clients(&admin)[&fake]["status"], "alive");
    // Someone without a table may.
    let (_, stopped) = call_as(&hub.broker, Some(&admin), "manager", "plugin.stop.do", &stop, LIMIT).unwrap();
    assert_eq!(stopped["status"], true, "{stopped}");
}

#[test]
fn a_titanic_request_is_its_owners_alone() {
    let hub = Hub::start(
        "[permissions.limited]\ncall = [\"titanic.*\"]\n",
        &["alice", "bob"],
        None,
    );
    let (alice, bob) = (hub.user("alice").clone(), hub.user("bob").clone());
    hub.wait_for(&alice, "titanic.request");
    hub.wait_for(&alice, "echo");
    let made = mdp_as(&hub.broker, Some(&alice), "titanic.request", &["echo", "hello"], LIMIT).unwrap();
    assert_eq!(made[0], "200", "{made:?}");
    let uuid = String::from_utf8(made[1].to_vec()).unwrap();
    let reply = |login: &Login| mdp_as(&hub.broker, Some(login), "titanic.reply", &[&uuid], LIMIT).unwrap();
    eventually("alice's request is done", || reply(&alice)[0] == "200");
    assert_eq!(reply(&alice), strings(&["200", "hello"]));
    // Bob cannot see it, list it or close it.
    assert_eq!(reply(&bob), strings(&["400"]));
    let list = |login: &Login| {
        let listed = mdp_as(&hub.broker, Some(login), "titanic.list", &[], LIMIT).unwrap();
        String::from_utf8(listed[1].to_vec()).unwrap()
    };
    assert!(list(&alice).contains(&uuid));
    assert!(!list(&bob).contains(&uuid), "{}", list(&bob));
    assert_eq!(
        mdp_as(&hub.broker, Some(&bob), "titanic.close", &[&uuid], LIMIT),
        Some(strings(&["200"]))
    );
    assert_eq!(reply(&alice), strings(&["200", "hello"]), "bob's close changed nothing");
    assert_eq!(
        mdp_as(&hub.broker, Some(&alice), "titanic.close", &[&uuid], LIMIT),
        Some(strings(&["200"]))
    );
    assert_eq!(reply(&alice), strings(&["400"]));
    // Titanic sends later as the hub: what the caller may not call, it
    // does not store.
    let limited = add_user(&hub.data, "limited");
    let refused = mdp_as(
        &hub.broker,
        Some(&limited),
        "titanic.request",
        &["echo", "hello"],
        LIMIT,
    )
    .unwrap();
    let status = String::from_utf8_lossy(&refused[0]).into_owned();
    assert!(
        status.starts_with("400 permission denied: 'limited' may not call echo"),
        "{status}"
    );
}

#[test]
fn clone_reads_and_writes_follow_the_permissions() {
    let hub = Hub::start(
        "[permissions.panel]\nread = [\"/device/\"]\ncall = [\"*\"]\n\
         [permissions.writer]\nread = [\"*\"]\nwrite = [\"/panel/\"]\n",
        &["panel", "writer"],
        None,
    );
    let (panel, writer) = (hub.user("panel").clone(), hub.user("writer").clone());
    let as_user = |login: &Login, args: &[&str]| {
        majordome()
            .args(args)
            .env("MAJORDOME_USER", &login.user)
            .env("MAJORDOME_PASSWORD", &login.password)
            .env("MAJORDOME_LOG", "error")
            .output()
            .unwrap()
    };
    let out = as_user(
        &writer,
        &["state", "set", "/panel/mode", "away", "--endpoint", &hub.state],
    );
    assert!(out.status.success(), "{out:?}");
    let out = as_user(
        &writer,
        &["state", "set", "/device/x/level", "1", "--endpoint", &hub.state],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("forbidden"), "{said}");

    // A snapshot of a subtree it may not read is never served.
    let snapshot = socket_as(zmq::DEALER, &hub.state, Some(&panel));
    send(&snapshot, &strings(&["ICANHAZ?", "/panel/"]));
    send(&snapshot, &strings(&["ICANHAZ?", "/device/"]));
    // Answered in order: the first thing back is the /device/ snapshot.
    let first = recv(&snapshot, LIMIT);
    assert!(first[0] == "KTHXBAI" || first[0].starts_with(b"/device/"), "{first:?}");
    let (_, stats) = call_as(&hub.broker, Some(&panel), "state", "stats.get", &json!({}), LIMIT).unwrap();
    assert_eq!(stats["dropped"]["forbidden"], 2, "one write, one snapshot: {stats}");

    // The updates go to every subscriber alike: only an identity that may
    // read every key may follow them; the others are refused at login.
    let refused_before = broker_stats(&hub.broker, &panel)["logins_refused"].as_u64().unwrap();
    let follower = socket_as(zmq::SUB, &hub.updates, Some(&panel));
    follower.set_subscribe(b"").unwrap();
    eventually("the panel's login to the updates is refused", || {
        broker_stats(&hub.broker, &panel)["logins_refused"].as_u64().unwrap() > refused_before
    });
    let allowed = socket_as(zmq::SUB, &hub.updates, Some(&writer));
    allowed.set_subscribe(b"HUGZ").unwrap();
    eventually("the writer hears the HUGZ", || {
        try_recv(&allowed, Duration::from_millis(200)).is_some_and(|m| m[0] == "HUGZ")
    });
}

/// `bench reqrep --logins` measures a broker that asks every client and
/// worker to log in: its requests get through only logged in.
#[test]
fn the_bench_measures_a_broker_with_logins() {
    let out = run(&[
        "bench",
        "reqrep",
        "--requests",
        "400",
        "--runs",
        "1",
        "--window",
        "4",
        "--logins",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("every client and worker logged in"), "{said}");
    assert!(said.contains("median of 1 runs"), "{said}");
}
