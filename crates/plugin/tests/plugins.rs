//! The plugin SDK and the shipped plugins against a real broker, forwarder
//! and config service (on a temporary database), with a small `devices`
//! worker written here: the real device service is tested on its own, and
//! these tests are about what a plugin says and does, in the contract's
//! order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use majordome_client::{
    domogik_handler, Client, ClientOptions, Event, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions,
};
use majordome_hub::{Hub, HubConfig, Parts};
use majordome_plugin::{
    builtin_manifests, fake, onewire, Command, Device, Endpoints, Outcome, Plugin, PluginError, PluginSettings, Values,
};
use majordome_services::{ConfigService, Manifest};
use majordome_store::Durability;
use serde_json::{json, Value};

/// How long anything may take before a test gives up. Generous, because
/// two cores build and run everything at once.
const LIMIT: Duration = Duration::from_secs(30);
const HOST: &str = "testhost";

/// A broker and a forwarder in this process, on free ports: the hub's own
/// start with those parts only.
struct Bus {
    hub: Hub,
    broker: String,
    publish_at: String,
    subscribe_at: String,
}

impl Bus {
    fn start() -> Bus {
        // Neither part writes to the data folder.
        let config = HubConfig::on_free_ports(&std::env::temp_dir(), Parts::bus());
        let hub = Hub::start(&config, &Shutdown::new().unwrap()).unwrap();
        let endpoints = hub.endpoints().clone();
        Bus {
            hub,
            broker: endpoints.broker,
            publish_at: endpoints.publish,
            subscribe_at: endpoints.subscribe,
        }
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints {
            broker: self.broker.clone(),
            publish: self.publish_at.clone(),
            subscribe: self.subscribe_at.clone(),
        }
    }

    /// Runs a config service on a database in `folder`, knowing
    /// `manifests`.
    fn config(&self, folder: &Path, manifests: Vec<Manifest>) -> Service {
        let database = majordome_store::database_path(folder);
        let service = ConfigService::open(&database, manifests, Durability::Process).unwrap();
        let stop = Shutdown::new().unwrap();
        let (own, broker, publish_at) = (stop.clone(), self.broker.clone(), self.publish_at.clone());
        let thread = thread::spawn(move || service.run(&broker, Some(&publish_at), &own).unwrap());
        Service { stop, thread }
    }

    /// What the broker's `mmi.stats` says about `service` (null when it
    /// has never heard of it).
    fn service_stats(&self, service: &str) -> Value {
        let mut client = Client::new(&self.broker, options());
        let reply = client.request("mmi.stats", vec![]).unwrap();
        let stats: Value = serde_json::from_slice(&reply[0]).unwrap();
        stats["services"][service].clone()
    }

    fn stop(self) {
        self.hub.stop().unwrap();
    }
}

/// A service thread with its own stop signal.
struct Service {
    stop: Shutdown,
    thread: JoinHandle<()>,
}

impl Service {
    fn stop(self) {
        self.stop.trigger();
        self.thread.join().unwrap();
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn call(bus: &Bus, service: &str, action: &str, data: Value) -> Message {
    Client::new(&bus.broker, options())
        .request_message(service, &Message::new(action, data))
        .unwrap()
}

fn set_config(bus: &Bus, name: &str, values: Value) {
    let reply = call(
        bus,
        "config",
        "config.set",
        json!({"type": "plugin", "name": name, "host": HOST, "data": values}),
    );
    assert_eq!(reply.status(), Some(true), "{reply:?}");
}

/// Polls `check` until it gives something; fails after [`LIMIT`].
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// What the test's `devices` worker was asked: every `device.create.do`,
/// and the uuid it gave each (client, id), the same every time.
#[derive(Default)]
struct Registrations {
    requests: Vec<Value>,
    uuids: HashMap<(String, String), String>,
}

impl Registrations {
    /// The uuid given to the device `id`, and the last request about it.
    fn device(&self, id: &str) -> Option<(String, Value)> {
        let request = self.requests.iter().rev().find(|r| r["id"] == id)?.clone();
        let client = request["client"].as_str()?.to_owned();
        Some((self.uuids.get(&(client, id.to_owned()))?.clone(), request))
    }
}

/// Stands in for the devices service: answers `device.create.do` as the
/// contract says, and nothing else.
fn devices_worker(bus: &Bus) -> (Service, Arc<Mutex<Registrations>>) {
    let registrations = Arc::new(Mutex::new(Registrations::default()));
    let seen = registrations.clone();
    let handler = domogik_handler(move |message: Message| {
        if message.action != "device.create.do" {
            return Message::failure(&message.action, "the test's devices worker only registers devices");
        }
        let text = |field: &str| message.data[field].as_str().unwrap_or_default().to_owned();
        let key = (text("client"), text("id"));
        let mut seen = seen.lock().unwrap();
        seen.requests.push(message.data.clone());
        let created = !seen.uuids.contains_key(&key);
        let uuid = seen
            .uuids
            .entry(key)
            .or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        Message::new(
            "device.create.result",
            json!({"status": true, "reason": "", "uuid": uuid, "created": created}),
        )
    });
    let stop = Shutdown::new().unwrap();
    let (own, worker) = (
        stop.clone(),
        Worker::new(&bus.broker, "devices", WorkerOptions::default()),
    );
    let thread = thread::spawn(move || worker.run(handler, &own).unwrap());
    (Service { stop, thread }, registrations)
}

/// A subscriber that keeps every event it received, in order.
struct Events {
    subscriber: Subscriber,
    seen: Vec<Event>,
}

impl Events {
    /// Subscribes to `prefixes` and returns once the forwarder has the
    /// subscriptions, so that nothing a plugin says first is lost.
    fn connect(bus: &Bus, prefixes: &[&str]) -> Events {
        let subscriber = Subscriber::connect(&bus.subscribe_at, prefixes).unwrap();
        // A new publisher gets every subscription the forwarder holds: once
        // this one sees ours, any later publisher will too.
        let mut probe = Publisher::connect(&bus.publish_at).unwrap();
        for prefix in prefixes {
            assert!(
                probe.wait_for_subscriber(prefix, LIMIT).unwrap(),
                "the subscription to {prefix} never reached the forwarder"
            );
        }
        Events {
            subscriber,
            seen: Vec::new(),
        }
    }

    /// Receives until `done` holds for everything received so far.
    fn until_seen(&mut self, what: &str, mut done: impl FnMut(&[Event]) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            if let Some(event) = self.subscriber.recv(left).unwrap() {
                self.seen.push(event);
            }
        }
    }

    /// The next event (from now on) that `matches`.
    fn next(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
        let from = self.seen.len();
        self.until_seen(what, |seen| seen[from..].iter().any(&matches));
        self.seen[from..].iter().find(|e| matches(e)).unwrap().clone()
    }

    /// The first event received, then or since, that `matches`.
    fn first(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
        self.until_seen(what, |seen| seen.iter().any(&matches));
        self.seen.iter().find(|e| matches(e)).unwrap().clone()
    }

    /// The `plugin.status` events of the plugin `name` so far, in order.
    fn statuses(&self, name: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e.category == "plugin.status" && e.data["name"] == name)
            .map(|e| e.data["event"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

fn is_status(event: &Event, name: &str, status: &str) -> bool {
    event.category == "plugin.status" && event.data["name"] == name && event.data["event"] == status
}

fn of_device(event: &Event, uuid: &str) -> bool {
    event.category.starts_with("event.") && event.data["uuid"] == uuid
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Checks the shape of a value event: the category is the subject, and
/// `data` has the level, unit and quantity.
fn assert_value(event: &Event, subject: &str, unit: &str, quantity: &str) {
    assert_eq!(event.category, subject, "{event:?}");
    assert_eq!(event.data["event"], subject, "{event:?}");
    assert_eq!(event.data["data"]["unit"], unit, "{event:?}");
    assert_eq!(event.data["data"]["quantity"], quantity, "{event:?}");
    assert!(event.data["data"]["level"].is_number(), "{event:?}");
    let timestamp = event.data["timestamp"].as_f64().expect("a timestamp");
    assert!((timestamp - unix_now()).abs() < LIMIT.as_secs_f64(), "{event:?}");
}

fn builtin(name: &str) -> Manifest {
    let (_, text) = builtin_manifests().iter().find(|(n, _)| *n == name).unwrap();
    Manifest::parse(text).unwrap()
}

#[test]
fn the_shipped_manifests_parse_and_describe_their_plugins() {
    for (name, text) in builtin_manifests() {
        let manifest =
            Manifest::parse(text).unwrap_or_else(|e| panic!("the shipped manifest of {name} does not parse: {e}"));
        assert_eq!(manifest.name, *name);
        assert_eq!(manifest.kind, "plugin");
        assert_eq!(manifest.command, ["majordome", "plugin", *name]);
        assert!(manifest.restart, "{name}");
        for key in &manifest.config {
            assert!(!key.description.is_empty(), "{name}: '{}' has no description", key.key);
            assert!(key.default.is_some(), "{name}: '{}' has no default", key.key);
        }
    }
    let fake = builtin("fake");
    assert!(fake.autostart);
    let mut types = fake.device_types.clone();
    types.sort();
    assert_eq!(
        types,
        ["binarysensor", "dimmer", "energymeter", "switch", "temperaturesensor"]
    );
    let default = |manifest: &Manifest, key: &str| manifest.key(key).and_then(|k| k.default.clone());
    for (key, value) in [
        ("interval", json!(5.0)),
        ("cycle_length", json!(60.0)),
        ("cyclic_min", json!(15.0)),
        ("cyclic_max", json!(25.0)),
        ("linear_start", json!(0.0)),
        ("linear_step", json!(1.0)),
        ("dimmer_ramp", json!(0.2)),
        ("binary_period", json!(30.0)),
    ] {
        assert_eq!(
            default(&fake, key).and_then(|v| v.as_f64()),
            value.as_f64(),
            "fake: {key}"
        );
    }
    assert_eq!(default(&fake, "cyclic_unit"), Some(json!("degC")));
    assert_eq!(default(&fake, "room"), Some(json!("Living room")));
    assert_eq!(fake.key("interval").and_then(|k| k.min), Some(0.05));
    let onewire = builtin("onewire");
    assert!(!onewire.autostart);
    assert_eq!(onewire.device_types, ["temperaturesensor"]);
    assert_eq!(default(&onewire, "sysfs_root"), Some(json!("/sys/bus/w1/devices")));
    assert_eq!(default(&onewire, "interval").and_then(|v| v.as_f64()), Some(30.0));
}

#[test]
fn the_fake_plugin_waits_for_its_services_then_registers_reports_and_obeys() {
    let folder = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let mut events = Events::connect(&bus, &["plugin.status", "event."]);
    let settings = PluginSettings {
        status_interval: Duration::from_millis(300),
        ..PluginSettings::new("fake", HOST)
    };
    let service = settings.client_id();
    assert_eq!(service, "plugin-fake.testhost");
    let (stop, endpoints) = (Shutdown::new().unwrap(), bus.endpoints());
    let plugin = {
        let stop = stop.clone();
        thread::spawn(move || fake::run(settings, endpoints, &stop))
    };

    // Neither config nor devices is up: it says `starting`, and its
    // config.get waits at the broker.
    let starting = events.next("starting", |e| e.category == "plugin.status");
    for (field, value) in [
        ("type", "plugin"),
        ("name", "fake"),
        ("id", "fake"),
        ("host", HOST),
        ("event", "starting"),
    ] {
        assert_eq!(starting.data[field], value, "{starting:?}");
    }
    eventually("the plugin's config.get at the broker", || {
        (bus.service_stats("config")["requests"].as_u64()? >= 1).then_some(())
    });
    let config = bus.config(folder.path(), vec![builtin("fake")]);
    eventually("the plugin's device.create.do at the broker", || {
        (bus.service_stats("devices")["requests"].as_u64()? >= 1).then_some(())
    });
    let (devices, registrations) = devices_worker(&bus);

    // It comes up, and says `alive` again at its status interval.
    events.until_seen("alive twice", |seen| {
        seen.iter().filter(|e| is_status(e, "fake", "alive")).count() >= 2
    });

    // Five devices, in the configured room, under its client id.
    let expected = [
        (
            "fake-cyclic",
            "temperaturesensor",
            "event.environment.temperaturechanged",
            "degC",
            "temperature",
        ),
        (
            "fake-linear",
            "energymeter",
            "event.environment.energychanged",
            "kWh",
            "energy",
        ),
        ("fake-switch", "switch", "event.device.statechanged", "level", "state"),
        ("fake-dimmer", "dimmer", "event.device.statechanged", "percent", "state"),
        (
            "fake-binary",
            "binarysensor",
            "event.device.statechanged",
            "level",
            "state",
        ),
    ];
    let uuids: HashMap<&str, String> = {
        let registrations = registrations.lock().unwrap();
        assert_eq!(registrations.uuids.len(), 5, "{:?}", registrations.requests);
        expected
            .iter()
            .map(|(id, kind, ..)| {
                let (uuid, request) = registrations
                    .device(id)
                    .unwrap_or_else(|| panic!("{id} not registered"));
                assert_eq!(request["client"], service, "{request}");
                assert_eq!(request["type"], *kind, "{request}");
                assert_eq!(request["room"], "Living room", "{request}");
                assert!(request["name"].as_str().is_some_and(|n| !n.is_empty()), "{request}");
                (*id, uuid)
            })
            .collect()
    };

    // A value from every device, with the subject, unit and quantity of
    // its type.
    events.until_seen("a value from each device", |seen| {
        uuids.values().all(|uuid| seen.iter().any(|e| of_device(e, uuid)))
    });
    for (id, _, subject, unit, quantity) in expected {
        let value = events.seen.iter().find(|e| of_device(e, &uuids[id])).unwrap();
        assert_value(value, subject, unit, quantity);
    }
    let first = |id: &str| {
        let event = events.seen.iter().find(|e| of_device(e, &uuids[id])).unwrap();
        event.data["data"]["level"].as_f64().unwrap()
    };
    assert!((15.0..=25.0).contains(&first("fake-cyclic")));
    assert_eq!(first("fake-linear"), 0.0, "linear_start");
    assert_eq!(first("fake-switch"), 0.0);

    // The switch: carried out at once, then its new state.
    let command = |uuid: &str, id: &str, command: &str, data: Value| {
        let reply = call(
            &bus,
            &service,
            "device.command.do",
            json!({"uuid": uuid, "id": id, "command": command, "data": data}),
        );
        assert_eq!(reply.action, "device.command.result", "{reply:?}");
        reply.data
    };
    let switch = &uuids["fake-switch"];
    for (order, level) in [("on", 255), ("off", 0)] {
        let reply = command(switch, "fake-switch", order, json!({}));
        assert_eq!(
            reply,
            json!({"status": true, "reason": "", "result": {"identifier": "success"}}),
            "{order}"
        );
        let changed = events.next(&format!("the switch {order}"), |e| {
            of_device(e, switch) && e.data["data"]["level"] == level
        });
        assert_value(&changed, "event.device.statechanged", "level", "state");
    }

    // The dimmer: queued, then the new level carrying the reference.
    let dimmer = &uuids["fake-dimmer"];
    for (order, data, level) in [
        ("setlevel", json!({"level": 42}), 42),
        ("on", json!({}), 100),
        ("off", json!({}), 0),
    ] {
        let reply = command(dimmer, "fake-dimmer", order, data);
        assert_eq!(
            (&reply["status"], &reply["result"]["identifier"]),
            (&json!(true), &json!("success.queued")),
            "{reply}"
        );
        assert!(reply.get("error").is_none(), "{reply}");
        let reference = reply["event-ref"].as_str().expect("an event-ref").to_owned();
        let parsed = uuid::Uuid::parse_str(&reference).expect("the event-ref is a uuid");
        assert_eq!(parsed.get_version_num(), 4);
        let changed = events.next(&format!("the dimmer's {order}"), |e| e.data["ref"] == reference);
        assert_eq!(changed.data["uuid"], *dimmer);
        assert_eq!(changed.data["data"]["level"], level, "{changed:?}");
        assert_value(&changed, "event.device.statechanged", "percent", "state");
    }

    // A command it does not know: ago's error map, and no result.
    let reply = command(switch, "fake-switch", "frobnicate", json!({}));
    assert_eq!(reply["status"], false, "{reply}");
    assert!(reply.get("result").is_none(), "{reply}");
    let error = &reply["error"];
    assert!(error["identifier"].as_str().unwrap().starts_with("error."), "{reply}");
    assert!(error["message"].as_str().unwrap().contains("frobnicate"), "{reply}");
    assert!(error["data"]["description"].is_string(), "{reply}");

    // Other actions: its counters; an unknown one is refused, saying why.
    let stats = call(&bus, &service, "stats.get", json!({}));
    assert_eq!(stats.data["commands"], 6, "{stats:?}");
    assert!(stats.data["values_published"].as_u64().unwrap() >= 5, "{stats:?}");
    let unknown = call(&bus, &service, "frobnicate.do", json!({}));
    assert_eq!(unknown.action, "frobnicate.result");
    assert_eq!(unknown.status(), Some(false));
    assert!(unknown.reason().unwrap().contains("unknown action"), "{unknown:?}");

    // A new interval applies at once. At the old one (5 s), twenty readings
    // of the meter would take over 90 s; within LIMIT they show the change.
    set_config(&bus, "fake", json!({"interval": 0.1, "binary_period": 0.2}));
    let from = events.seen.len();
    let linear = uuids["fake-linear"].clone();
    events.until_seen("twenty readings of the meter at the new interval", |seen| {
        seen[from..].iter().filter(|e| of_device(e, &linear)).count() >= 20
    });
    let readings: Vec<f64> = events.seen[from..]
        .iter()
        .filter(|e| of_device(e, &linear))
        .map(|e| e.data["data"]["level"].as_f64().unwrap())
        .collect();
    assert!(
        readings.windows(2).all(|w| w[1] - w[0] == 1.0),
        "the meter grows by linear_step: {readings:?}"
    );
    // And the binary sensor flips at its new period.
    let binary = uuids["fake-binary"].clone();
    events.until_seen("the binary sensor at 0 and at 255", |seen| {
        let levels: Vec<&Value> = seen[from..]
            .iter()
            .filter(|e| of_device(e, &binary))
            .map(|e| &e.data["data"]["level"])
            .collect();
        levels.contains(&&json!(0)) && levels.contains(&&json!(255))
    });

    // plugin.stop.do: answered, then `stopped`, and `run` returns.
    let stopped = call(&bus, &service, "plugin.stop.do", json!({}));
    assert_eq!(
        (stopped.action.as_str(), &stopped.data),
        ("plugin.stop.result", &json!({"status": true, "reason": ""}))
    );
    events.next("stopped", |e| is_status(e, "fake", "stopped"));
    eventually("fake::run to return", || plugin.is_finished().then_some(()));
    plugin.join().unwrap().unwrap();
    eventually("its worker to leave the broker", || {
        (bus.service_stats(&service)["workers"] == 0).then_some(())
    });
    let statuses = events.statuses("fake");
    assert_eq!(statuses.first().map(String::as_str), Some("starting"));
    assert_eq!(statuses.last().map(String::as_str), Some("stopped"));
    assert!(
        statuses[1..statuses.len() - 1].iter().all(|s| s == "alive"),
        "{statuses:?}"
    );
    assert!(!stop.is_triggered(), "plugin.stop.do alone stopped it");

    devices.stop();
    config.stop();
    bus.stop();
}

#[test]
fn a_plugin_that_is_not_configured_says_so_and_waits_for_its_config() {
    let folder = tempfile::tempdir().unwrap();
    let bus = Bus::start();
    let manifest = Manifest::parse(
        &json!({
            "name": "lamp", "version": "1",
            "config": [
                {"key": "address", "type": "string", "required": true, "description": "Where the lamp is"},
                {"key": "interval", "type": "number", "default": 2, "description": "Seconds between readings"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let config = bus.config(folder.path(), vec![manifest]);
    let (devices, registrations) = devices_worker(&bus);
    let mut events = Events::connect(&bus, &["plugin.status", "event."]);

    // A whole plugin, written with the SDK as anyone would.
    let (stop, endpoints) = (Shutdown::new().unwrap(), bus.endpoints());
    let (configured, got_config) = mpsc::channel();
    let plugin = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<(), PluginError> {
            let mut plugin = Plugin::start(PluginSettings::new("lamp", HOST), endpoints)?;
            configured.send(plugin.config(&stop)?).unwrap();
            let lamp = plugin.register(&Device::new("lamp-1", "switch", "Lamp"), &stop)?;
            let running = plugin.serve(
                |command: &Command, values: &Values| match command.command.as_str() {
                    "on" => {
                        values.publish(
                            &command.uuid,
                            "event.device.statechanged",
                            "state",
                            json!(255),
                            "level",
                            None,
                        );
                        Outcome::Done
                    }
                    // Accepted, then found to fail: the event says so.
                    _ => {
                        let reference = Outcome::new_ref();
                        values.fail_later(
                            &command.uuid,
                            "event.device.statechanged",
                            "error.device.unreachable",
                            "the lamp did not answer",
                            &reference,
                        );
                        Outcome::Queued(reference)
                    }
                },
                &stop,
            )?;
            running
                .values()
                .publish(&lamp, "event.device.statechanged", "state", json!(0), "level", None);
            running.wait()
        })
    };

    let waiting = events.next("not-configured", |e| is_status(e, "lamp", "not-configured"));
    assert!(waiting.data["comment"].as_str().unwrap().contains("config.set"));
    assert_eq!(events.statuses("lamp"), ["starting", "not-configured"]);
    assert!(got_config.try_recv().is_err(), "config() returned while not configured");

    set_config(&bus, "lamp", json!({"address": "10.0.0.7"}));
    let values = got_config
        .recv_timeout(LIMIT)
        .expect("config() to return once configured");
    assert_eq!(values.get("address"), Some(&json!("10.0.0.7")));
    assert_eq!(values.get("interval"), Some(&json!(2)), "defaults are filled in");
    events.next("alive", |e| is_status(e, "lamp", "alive"));
    let (uuid, request) = registrations
        .lock()
        .unwrap()
        .device("lamp-1")
        .expect("lamp-1 registered");
    assert_eq!(request["client"], "plugin-lamp.testhost");
    let first = events.first("the lamp's first value", |e| of_device(e, &uuid));
    assert_eq!(first.data["data"]["level"], 0);

    let service = "plugin-lamp.testhost";
    let reply = call(
        &bus,
        service,
        "device.command.do",
        json!({"uuid": uuid, "id": "lamp-1", "command": "off", "data": {}}),
    );
    assert_eq!(reply.data["result"]["identifier"], "success.queued", "{reply:?}");
    let reference = reply.data["event-ref"].as_str().unwrap().to_owned();
    let failed = events.next("the failure later", |e| e.data["ref"] == reference);
    assert_eq!(failed.category, "event.device.statechanged");
    assert_eq!(failed.data["uuid"], uuid);
    assert!(failed.data.get("data").is_none(), "{failed:?}");
    assert_eq!(
        failed.data["error"],
        json!({"identifier": "error.device.unreachable", "message": "the lamp did not answer",
               "data": {"description": "the lamp did not answer"}})
    );
    // A handler that answers no other action: refused, saying what it knows.
    let stats = call(&bus, service, "stats.get", json!({}));
    assert_eq!((stats.action.as_str(), stats.status()), ("stats.result", Some(false)));
    assert!(stats.reason().unwrap().contains("device.command.do"), "{stats:?}");

    // The outside stop signal (SIGINT, SIGTERM) stops it cleanly too.
    stop.trigger();
    events.next("stopped", |e| is_status(e, "lamp", "stopped"));
    eventually("the plugin to return", || plugin.is_finished().then_some(()));
    plugin.join().unwrap().unwrap();

    devices.stop();
    config.stop();
    bus.stop();
}

/// Writes a sensor folder as the kernel shows it. The folder is filled
/// under another name and then renamed, so the plugin never sees it half
/// written.
fn sensor(root: &Path, name: &str, text: &str) {
    let building = root.join(format!("building-{name}"));
    std::fs::create_dir(&building).unwrap();
    std::fs::write(building.join("w1_slave"), text).unwrap();
    std::fs::rename(&building, root.join(name)).unwrap();
}

fn w1_slave(crc: &str, milli: i64) -> String {
    format!("72 01 4b 46 7f ff 0e 10 57 : crc=57 {crc}\n72 01 4b 46 7f ff 0e 10 57 t={milli}\n")
}

#[test]
fn the_onewire_plugin_reads_a_sysfs_tree_as_it_changes() {
    let folder = tempfile::tempdir().unwrap();
    let sysfs = tempfile::tempdir().unwrap();
    let root = sysfs.path();
    sensor(root, "28-00000aaaaaaa", &w1_slave("YES", 23125));
    sensor(root, "28-00000bbbbbbb", &w1_slave("NO", 85000));
    std::fs::create_dir(root.join("w1_bus_master1")).unwrap();
    let bus = Bus::start();
    let config = bus.config(folder.path(), vec![builtin("onewire")]);
    set_config(
        &bus,
        "onewire",
        json!({"sysfs_root": root.to_str().unwrap(), "interval": 0.1}),
    );
    let (devices, registrations) = devices_worker(&bus);
    let mut events = Events::connect(&bus, &["event."]);
    let (stop, endpoints) = (Shutdown::new().unwrap(), bus.endpoints());
    let plugin = {
        let stop = stop.clone();
        thread::spawn(move || onewire::run(PluginSettings::new("onewire", HOST), endpoints, &stop))
    };
    let service = "plugin-onewire.testhost";
    let stats = || call(&bus, service, "stats.get", json!({})).data;
    let registered = |id: &str| registrations.lock().unwrap().device(id);

    // Both thermometers are registered, stale after three intervals.
    let (good, request) = eventually("28-00000aaaaaaa registered", || registered("28-00000aaaaaaa"));
    assert_eq!(request["type"], "temperaturesensor");
    assert_eq!(request["client"], service);
    assert!(
        (request["stale_after"].as_f64().unwrap() - 0.3).abs() < 1e-9,
        "{request}"
    );
    let (bad, _) = eventually("28-00000bbbbbbb registered", || registered("28-00000bbbbbbb"));
    assert_eq!(registrations.lock().unwrap().uuids.len(), 2, "only 28-* folders");

    // A good reading is published; one with a bad CRC is skipped and
    // counted.
    let reading = events.next("a reading of the good sensor", |e| of_device(e, &good));
    assert_value(&reading, "event.environment.temperaturechanged", "degC", "temperature");
    assert_eq!(reading.data["data"]["level"], 23.125);
    eventually("bad CRCs counted", || {
        (stats()["crc_errors"].as_u64()? >= 2).then_some(())
    });

    // A file that does not parse is skipped and counted too.
    sensor(root, "28-00000ddddddd", "garbage\n");
    eventually("unreadable files counted", || {
        (stats()["unreadable"].as_u64()? >= 1).then_some(())
    });

    // A sensor that appears later is registered and read.
    sensor(root, "28-00000ccccccc", &w1_slave("YES", -500));
    let (late, _) = eventually("the new sensor registered", || registered("28-00000ccccccc"));
    let reading = events.next("a reading of the new sensor", |e| of_device(e, &late));
    assert_eq!(reading.data["data"]["level"], -0.5);

    // A sensor that is removed is no longer published: while it is there,
    // each round reports it before the new one, so five readings of the
    // new one in a row mean it has stopped.
    std::fs::remove_dir_all(root.join("28-00000aaaaaaa")).unwrap();
    events.until_seen("the removed sensor to stop", |seen| {
        let after = seen.iter().rposition(|e| of_device(e, &good)).map_or(0, |i| i + 1);
        seen[after..].iter().filter(|e| of_device(e, &late)).count() >= 5
    });
    let counters = stats();
    assert_eq!(counters["vanished"], 1, "counted once: {counters}");
    assert!(counters["reads"].as_u64().unwrap() >= 2, "{counters}");
    let (skipped, _) = registered("28-00000ddddddd").expect("registered even though unreadable");
    for uuid in [&bad, &skipped] {
        assert!(
            !events.seen.iter().any(|e| of_device(e, uuid)),
            "a skipped reading was published"
        );
    }

    let reply = call(&bus, service, "plugin.stop.do", json!({}));
    assert_eq!(reply.status(), Some(true));
    eventually("onewire::run to return", || plugin.is_finished().then_some(()));
    plugin.join().unwrap().unwrap();
    devices.stop();
    config.stop();
    bus.stop();
}

#[test]
fn a_plugin_stopped_while_it_waits_for_its_config_says_stopped_and_returns_cleanly() {
    let bus = Bus::start();
    let mut events = Events::connect(&bus, &["plugin.status"]);
    let (stop, endpoints) = (Shutdown::new().unwrap(), bus.endpoints());
    let plugin = {
        let stop = stop.clone();
        thread::spawn(move || fake::run(PluginSettings::new("fake", HOST), endpoints, &stop))
    };
    events.next("starting", |e| is_status(e, "fake", "starting"));
    eventually("the plugin's config.get at the broker", || {
        (bus.service_stats("config")["requests"].as_u64()? >= 1).then_some(())
    });
    // No config service will come: SIGINT or SIGTERM now is a clean stop.
    stop.trigger();
    let stopped = events.next("stopped", |e| is_status(e, "fake", "stopped"));
    assert!(
        stopped.data["comment"].as_str().unwrap().contains("config"),
        "{stopped:?}"
    );
    eventually("fake::run to return", || plugin.is_finished().then_some(()));
    plugin.join().unwrap().expect("a stop before it is up is not an error");
    bus.stop();
}
