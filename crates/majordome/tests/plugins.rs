//! End to end: `majordome up` starts the fake plugin as its own process
//! (supervised), which becomes alive, registers its devices, reports
//! values into history and Clone, and carries out commands; a `kill -9` of
//! the plugin is seen at once and the plugin comes back; config set
//! through the bus survives a restart of majordome.

mod common;

use std::time::{Duration, Instant};

use common::*;
use majordome_client::{Client, ClientOptions, Message, Subscriber};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

fn ask(broker: &str, service: &str, action: &str, data: Value) -> Message {
    let mut client = Client::new(
        broker,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    );
    client.request_message(service, &Message::new(action, data)).unwrap()
}

/// Polls until `check` gives something (bounded).
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fake plugin's client id and its entry in `client.detail.get`, once
/// its status is `status`.
fn fake_client(broker: &str, status: &str) -> (String, Value) {
    eventually(&format!("the fake plugin to be {status}"), || {
        let detail = ask(broker, "manager", "client.detail.get", json!({}));
        let clients = detail.data.as_object()?.clone();
        clients
            .into_iter()
            .find(|(id, c)| id.starts_with("plugin-fake.") && c["status"] == status)
    })
}

fn pid_in(comment: &str) -> Option<i32> {
    comment
        .rsplit("pid ")
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_fake_plugin_end_to_end() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let args = ["--plugins", plugins.path().to_str().unwrap(), "--dead-after", "3"];
    let (mut up, lines) = Process::up(data.path(), &args, 5);
    let (broker, subscribe_at, state) = (last_word(&lines[0]), last_word(&lines[3]), last_word(&lines[4]));

    // The supervisor started it; it says alive.
    let (id, _) = fake_client(&broker, "alive");
    let host = id.rsplit_once('.').unwrap().1.to_owned();
    let set = ask(
        &broker,
        "config",
        "config.set",
        json!({"type": "plugin", "name": "fake", "host": host, "key": "interval", "value": "0.2"}),
    );
    assert_eq!(set.status(), Some(true), "{:?}", set.data);

    // Its five devices are in the inventory.
    let inventory = eventually("five fake devices", || {
        let inventory = ask(&broker, "devices", "inventory.get", json!({}));
        let devices: Vec<Value> = inventory.data["devices"]
            .as_object()?
            .values()
            .filter(|d| d["client"] == id.as_str())
            .cloned()
            .collect();
        (devices.len() == 5).then_some(devices)
    });
    let uuid_of = |device_id: &str| {
        inventory
            .iter()
            .find(|d| d["id"] == device_id)
            .and_then(|d| d["uuid"].as_str())
            .unwrap()
            .to_owned()
    };
    let (dimmer, thermometer) = (uuid_of("fake-dimmer"), uuid_of("fake-cyclic"));

    // Values reach history and Clone (at the new interval of 0.2 s).
    let history = eventually("five temperatures in history", || {
        let reply = ask(
            &broker,
            "history",
            "history.get",
            json!({"uuid": thermometer, "last": 5}),
        );
        (reply.data["values"].as_array()?.len() == 5).then_some(reply)
    });
    assert_eq!(history.data["quantity"], "temperature");
    let (entries, _) = majordome_state::snapshot(state.as_str(), &format!("/device/{thermometer}/"), LIMIT).unwrap();
    let value = entries
        .iter()
        .find(|e| e.key.ends_with("/temperature"))
        .expect("the temperature is in Clone");
    let value: Value = serde_json::from_slice(&value.value).unwrap();
    assert_eq!(value["unit"], "degC");
    assert!(
        value["level"].as_f64().is_some_and(|t| (15.0..=25.0).contains(&t)),
        "{value}"
    );

    // setlevel: queued with an event-ref, then statechanged with that ref.
    let mut events = Subscriber::connect(&subscribe_at, &["event.device.statechanged"]).unwrap();
    let probe = eventually("the event subscription to be live", || {
        events.recv(Duration::from_millis(500)).unwrap()
    });
    assert_eq!(probe.category, "event.device.statechanged");
    let queued = ask(
        &broker,
        "devices",
        "device.command.do",
        json!({"uuid": dimmer, "command": "setlevel", "data": {"level": 42}}),
    );
    assert_eq!(queued.status(), Some(true), "{:?}", queued.data);
    assert_eq!(queued.data["result"]["identifier"], "success.queued");
    let reference = queued.data["event-ref"].as_str().expect("an event-ref").to_owned();
    let followed = eventually("the statechanged with the ref", || {
        let event = events.recv(Duration::from_millis(200)).unwrap()?;
        (event.data["ref"] == reference.as_str()).then_some(event.data)
    });
    assert_eq!(followed["uuid"], dimmer.as_str());
    assert_eq!(followed["data"]["level"], 42);
    for (command, identifier) in [
        (
            json!({"uuid": dimmer, "command": "setlevel", "data": {"level": 500}}),
            "error.parameter.invalid",
        ),
        (json!({"uuid": dimmer, "command": "fly"}), "error.command.invalid"),
        (
            json!({"uuid": "no-such-device", "command": "on"}),
            "error.device.invalid",
        ),
        (
            json!({"uuid": dimmer, "command": "setlevel"}),
            "error.parameter.missing",
        ),
    ] {
        let reply = ask(&broker, "devices", "device.command.do", command.clone());
        assert_eq!(reply.status(), Some(false), "{command}");
        assert_eq!(
            reply.data["error"]["identifier"], identifier,
            "{command}: {:?}",
            reply.data
        );
    }

    // kill -9: dead at once, then restarted by the supervisor.
    let (_, detail) = fake_client(&broker, "alive");
    let history = ask(&broker, "manager", "client.history.get", json!({"id": id}));
    let pid = history.data["history"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|h| pid_in(h["comment"].as_str()?))
        .unwrap_or_else(|| panic!("no pid in {detail}"));
    // SAFETY: a signal to the plugin's pid, read from the manager.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (_, dead) = fake_client(&broker, "dead");
    assert!(
        dead["comment"].as_str().unwrap().contains("killed by signal 9"),
        "{dead}"
    );
    let (_, back) = fake_client(&broker, "alive");
    let history = ask(&broker, "manager", "client.history.get", json!({"id": id}));
    let new_pid = history.data["history"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|h| pid_in(h["comment"].as_str()?))
        .unwrap();
    assert_ne!(new_pid, pid, "{back}");

    // `majordome status` shows the services' latencies, the clients, and
    // the device and history counters.
    let out = run(&["status", "--broker", &broker]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let devices_row = text.lines().find(|l| l.starts_with("devices ")).expect("a devices row");
    assert!(
        !devices_row.trim_end().ends_with('-'),
        "devices has replied, so a latency: {text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with(&id) && l.contains("alive")),
        "{text}"
    );
    assert!(text.contains("success.queued=1"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("history: ")), "{text}");

    // Stopped through the manager: the plugin's own clean stop, no restart.
    let stop = ask(&broker, "manager", "plugin.stop.do", json!({"name": "fake"}));
    assert_eq!(stop.status(), Some(true), "{:?}", stop.data);
    let (_, stopped) = fake_client(&broker, "stopped");
    assert!(
        !stopped["comment"].as_str().unwrap_or_default().contains("signal"),
        "{stopped}"
    );

    // Config and devices survive a restart of majordome.
    up.signal(libc::SIGTERM);
    assert!(up.wait_exit(LIMIT).is_some_and(|s| s.success()));
    let (mut up, lines) = Process::up(data.path(), &args, 1);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "config", "200");
    let interval = ask(
        &broker,
        "config",
        "config.get",
        json!({"type": "plugin", "name": "fake", "host": host, "key": "interval"}),
    );
    assert_eq!(interval.data["value"], 0.2);
    wait_for_service(&broker, "devices", "200");
    let device = ask(&broker, "devices", "device.get", json!({"uuid": dimmer}));
    assert_eq!(device.data["devices"][0]["id"], "fake-dimmer");
    up.signal(libc::SIGTERM);
    assert!(up.wait_exit(LIMIT).is_some_and(|s| s.success()));
}

/// The table of services once filled up for five minutes after a client
/// named 100,000 of them: a plugin the manager then started said `alive`
/// while the broker had refused its READY. Now the READY evicts a service
/// that only requests named, and when the manager says `alive`, the
/// plugin's service is on the broker.
#[test]
fn a_plugin_said_alive_is_on_the_broker_even_after_a_flood_of_names() {
    let data = tempfile::tempdir().unwrap();
    let (_up, lines) = Process::up(data.path(), &["--no-autostart"], 1);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "manager", "200");
    flood_service_names(&broker, 20_000);
    let started = ask(&broker, "manager", "plugin.start.do", json!({"name": "fake"}));
    assert_ne!(started.status(), Some(false), "{:?}", started.data);
    let (id, _) = fake_client(&broker, "alive");
    assert_eq!(
        mdp_request(&broker, "mmi.service", &[&id]),
        strings(&["200"]),
        "{id} is alive but not on the broker"
    );
}
