//! The device and history services over a real broker, forwarder, Clone
//! server and database, with a plugin played by a worker in the test:
//! registration, commands checked and forwarded with ago control's maps,
//! queued commands and their `ref`, values into the inventory, history
//! and Clone, stale marking, and a restart on the same database.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use majordome_client::{domogik_handler, Client, Message, Publisher, Shutdown, Subscriber, Worker, WorkerOptions};
use majordome_services::{DeviceEndpoints, DeviceService, DeviceSettings, HistoryService, HistorySettings, Schema};
use majordome_store::Durability;
use serde_json::{json, Value};

mod common;

use common::{eventually, Bus, LIMIT};

const PLUGIN: &str = "plugin-test.box";

/// Runs the device and history services on `database`; returns their
/// own stop signal and threads.
fn start_services(bus: &Bus, database: &Path) -> (Shutdown, Vec<JoinHandle<()>>) {
    let settings = DeviceSettings {
        command_timeout: Duration::from_millis(1500),
        stale_check: Duration::from_millis(50),
        ..DeviceSettings::default()
    };
    let endpoints = DeviceEndpoints {
        broker: bus.broker.clone(),
        publish: bus.publish_at.clone(),
        subscribe: bus.subscribe_at.clone(),
        state: bus.state.clone(),
    };
    let history_settings = HistorySettings::default();
    let devices = DeviceService::open(
        database,
        Schema::shipped(),
        Durability::Full,
        settings,
        &history_settings,
        endpoints,
    )
    .unwrap();
    let history = HistoryService::new(database, history_settings, devices.history_counters());
    let stop = Shutdown::new().unwrap();
    let (a, b, broker) = (stop.clone(), stop.clone(), bus.broker.clone());
    let threads = vec![
        thread::spawn(move || devices.run(&a).unwrap()),
        thread::spawn(move || history.run(&broker, &b).unwrap()),
    ];
    (stop, threads)
}

fn call(client: &mut Client, service: &str, action: &str, data: Value) -> Message {
    client.request_message(service, &Message::new(action, data)).unwrap()
}

/// The next event of `subject` that satisfies `accept`.
fn next_event(subscriber: &mut Subscriber, subject: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if let Some(event) = subscriber.recv(Duration::from_millis(100)).unwrap() {
            if event.category == subject && accept(&event.data) {
                return event.data;
            }
        }
    }
    panic!("no {subject} event came");
}

/// The test's plugin: answers commands the way the contract says, and
/// remembers what it was sent.
fn start_plugin(bus: &Bus, stop: &Shutdown) -> (Arc<Mutex<Vec<Value>>>, JoinHandle<()>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    let publisher = Arc::new(Mutex::new(Publisher::connect(&bus.publish_at).unwrap()));
    let handler = domogik_handler(move |message: Message| {
        seen.lock().unwrap().push(message.data.clone());
        let uuid = message.data["uuid"].as_str().unwrap_or_default().to_owned();
        match message.data["command"].as_str() {
            Some("setlevel") => {
                let level = message.data["data"]["level"].clone();
                let publisher = publisher.clone();
                // Carried out later: the event follows the reply.
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(50));
                    let event = json!({"uuid": uuid, "event": "event.device.statechanged",
                                       "data": {"level": level, "unit": "percent"}, "ref": "ref-42"});
                    publisher
                        .lock()
                        .unwrap()
                        .publish("event.device.statechanged", &event)
                        .unwrap();
                });
                Message::new(
                    "device.command.result",
                    json!({"status": true, "reason": "", "result": {"identifier": "success.queued"}, "event-ref": "ref-42"}),
                )
            }
            Some("off") => Message::new(
                "device.command.result",
                json!({"status": false, "reason": "jammed",
                       "error": {"identifier": "error.internal", "message": "jammed", "data": {"description": "jammed"}}}),
            ),
            _ => Message::new(
                "device.command.result",
                json!({"status": true, "reason": "", "result": {"identifier": "success"}}),
            ),
        }
    });
    let worker = Worker::new(&bus.broker, PLUGIN, WorkerOptions::default());
    let stop = stop.clone();
    (received, thread::spawn(move || worker.run(handler, &stop).unwrap()))
}

#[test]
fn devices_commands_values_history_clone_and_stale() {
    let data = tempfile::tempdir().unwrap();
    let database = data.path().join("majordome.db");
    let bus = Bus::with_state(data.path());
    let (services_stop, services) = start_services(&bus, &database);
    let plugin_stop = Shutdown::new().unwrap();
    let (received, plugin) = start_plugin(&bus, &plugin_stop);
    let mut client = bus.client(Duration::from_secs(5));
    let mut events = Subscriber::connect(&bus.subscribe_at, &["event."]).unwrap();

    // Registration: idempotent per (client, id), with RasPy's oids.
    let create = |client: &mut Client, id: &str, kind: &str, extra: Value| {
        let mut data = json!({"client": PLUGIN, "id": id, "type": kind, "name": id, "room": "Kitchen"});
        for (k, v) in extra.as_object().unwrap() {
            data[k] = v.clone();
        }
        call(client, "devices", "device.create.do", data)
    };
    let dimmer = create(&mut client, "dimmer-1", "dimmer", json!({}));
    assert_eq!(dimmer.action, "device.create.result");
    assert_eq!(dimmer.status(), Some(true), "{:?}", dimmer.data);
    assert_eq!(dimmer.data["created"], true);
    let dimmer_uuid = dimmer.data["uuid"].as_str().unwrap().to_owned();
    let renamed = call(
        &mut client,
        "devices",
        "device.update.do",
        json!({"uuid": dimmer_uuid, "name": "Kitchen light"}),
    );
    assert_eq!(renamed.status(), Some(true), "{:?}", renamed.data);
    let again = create(&mut client, "dimmer-1", "dimmer", json!({}));
    assert_eq!(again.data["uuid"], dimmer_uuid.as_str());
    assert_eq!(again.data["created"], false);
    assert_eq!(again.data["device"]["name"], "Kitchen light", "a user's rename is kept");
    let sensor = create(&mut client, "temp-1", "sensor.temperature", json!({"stale_after": 0.5}));
    let sensor_uuid = sensor.data["uuid"].as_str().unwrap().to_owned();
    assert_eq!(sensor.data["device"]["type"], "temperaturesensor");
    assert_eq!(sensor.data["device"]["raspy_name"], "box.test.temp-1");
    for (bad, why) in [
        (json!({"id": "x", "type": "switch"}), "needs 'client'"),
        (
            json!({"client": PLUGIN, "id": "x", "type": "toaster"}),
            "unknown device type 'toaster'",
        ),
        (
            json!({"client": PLUGIN, "id": "x", "type": "switch", "stale_after": -1}),
            "stale_after",
        ),
        (json!({"client": PLUGIN, "id": "a/b", "type": "switch"}), "no '/'"),
    ] {
        let reply = call(&mut client, "devices", "device.create.do", bad.clone());
        assert_eq!(reply.status(), Some(false), "{bad}");
        assert!(reply.reason().unwrap().contains(why), "{bad}: {:?}", reply.reason());
    }

    // Commands: checked, converted, forwarded; a queued one's event
    // carries the ref.
    let command = |client: &mut Client, data: Value| call(client, "devices", "device.command.do", data);
    let queued = command(
        &mut client,
        json!({"uuid": dimmer_uuid, "command": "setlevel", "data": {"level": "40"}}),
    );
    assert_eq!(queued.action, "device.command.result");
    assert_eq!(queued.status(), Some(true), "{:?}", queued.data);
    assert_eq!(queued.data["result"]["identifier"], "success.queued");
    assert_eq!(queued.data["event-ref"], "ref-42");
    let forwarded = received.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        forwarded,
        json!({"uuid": dimmer_uuid, "id": "dimmer-1", "command": "setlevel", "data": {"level": 40}})
    );
    let changed = next_event(&mut events, "event.device.statechanged", |e| {
        e["uuid"] == dimmer_uuid.as_str()
    });
    assert_eq!(changed["ref"], "ref-42");
    assert_eq!(changed["data"]["level"], 40);
    // ago's older form: parameters at the top level.
    let older = command(
        &mut client,
        json!({"uuid": dimmer_uuid, "command": "setlevel", "level": 10}),
    );
    assert_eq!(older.data["result"]["identifier"], "success.queued");
    let failed = command(&mut client, json!({"uuid": dimmer_uuid, "command": "off"}));
    assert_eq!(failed.status(), Some(false));
    assert_eq!(failed.data["error"]["identifier"], "error.internal");
    assert_eq!(failed.reason(), Some("jammed"));
    let sent_before = received.lock().unwrap().len();
    for (bad, identifier) in [
        (json!({"uuid": "nope", "command": "on"}), "error.device.invalid"),
        (json!({"command": "on"}), "error.parameter.missing"),
        (json!({"uuid": dimmer_uuid}), "error.command.missing"),
        (
            json!({"uuid": dimmer_uuid, "command": "dance"}),
            "error.command.invalid",
        ),
        (
            json!({"uuid": dimmer_uuid, "command": "setlevel"}),
            "error.parameter.missing",
        ),
        (
            json!({"uuid": dimmer_uuid, "command": "setlevel", "data": {"level": 500}}),
            "error.parameter.invalid",
        ),
        (
            json!({"uuid": dimmer_uuid, "command": "setlevel", "data": [1]}),
            "error.parameter.invalid",
        ),
        (json!({"uuid": sensor_uuid, "command": "on"}), "error.command.invalid"),
    ] {
        let reply = command(&mut client, bad.clone());
        assert_eq!(reply.status(), Some(false), "{bad}");
        assert_eq!(reply.data["error"]["identifier"], identifier, "{bad}: {:?}", reply.data);
        assert!(!reply.reason().unwrap().is_empty());
        assert_eq!(reply.data["error"]["data"]["description"], reply.reason().unwrap());
    }
    assert_eq!(
        received.lock().unwrap().len(),
        sent_before,
        "rejected commands never reach the plugin"
    );

    // Values: into the inventory, the history and Clone.
    let mut publisher = Publisher::connect(&bus.publish_at).unwrap();
    assert!(publisher.wait_for_subscriber("event.environment", LIMIT).unwrap());
    for temperature in [20.5, 21.0, 21.5] {
        let event = json!({"uuid": sensor_uuid, "event": "event.environment.temperaturechanged",
                           "data": {"level": temperature, "unit": "degC"}});
        publisher
            .publish("event.environment.temperaturechanged", &event)
            .unwrap();
    }
    let inventory = eventually("the last temperature in the inventory", || {
        let inventory = call(&mut client, "devices", "inventory.get", json!({}));
        let devices = &inventory.data["devices"];
        // The dimmer's last statechanged (level 10) comes from the plugin's
        // own publisher, in no fixed order with the temperatures.
        (devices[&sensor_uuid]["values"]["temperature"]["level"] == 21.5 && devices[&dimmer_uuid]["state"] == 10)
            .then_some(inventory)
    });
    let entry = &inventory.data["devices"][&sensor_uuid];
    assert_eq!(entry["values"]["temperature"]["unit"], "degC");
    assert_eq!(entry["room"], "Kitchen");
    assert_eq!(
        inventory.data["rooms"]["Kitchen"]["devices"].as_array().unwrap().len(),
        2
    );
    assert!(inventory.data["schema"]["types"]["dimmer"].is_object());
    let history = eventually("three values in history", || {
        let reply = call(
            &mut client,
            "history",
            "history.get",
            json!({"uuid": sensor_uuid, "last": 10}),
        );
        (reply.data["values"].as_array().map(Vec::len) == Some(3)).then_some(reply)
    });
    let values: Vec<f64> = history.data["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [20.5, 21.0, 21.5]);
    let key = format!("/device/{sensor_uuid}/temperature");
    let (entries, _) = majordome_state::snapshot(bus.state.as_deref().unwrap(), "/device/", LIMIT).unwrap();
    let mirrored = entries.iter().find(|e| e.key == key).expect("the value is in Clone");
    let mirrored: Value = serde_json::from_slice(&mirrored.value).unwrap();
    assert_eq!(mirrored["level"], 21.5);
    assert_eq!(mirrored["unit"], "degC");
    assert!(entries.iter().any(|e| e.key == format!("/device/{dimmer_uuid}/info")));

    // Silence makes the sensor stale (0.5 s); the dimmer has no timeout.
    let stale = next_event(&mut events, "event.device.stale", |e| e["uuid"] == sensor_uuid.as_str());
    assert_eq!(stale["data"]["stale"], true);
    let inventory = call(&mut client, "devices", "inventory.get", json!({}));
    assert_eq!(inventory.data["devices"][&sensor_uuid]["stale"], true);
    assert_eq!(inventory.data["devices"][&dimmer_uuid]["stale"], false);

    // A plugin that is not there: error.no.reply once the broker gives up.
    plugin_stop.trigger();
    plugin.join().unwrap();
    let absent = command(&mut client, json!({"uuid": dimmer_uuid, "command": "on"}));
    assert_eq!(
        absent.data["error"]["identifier"], "error.no.reply",
        "{:?}",
        absent.data
    );
    assert!(absent.reason().unwrap().contains(PLUGIN));

    let stats = call(&mut client, "devices", "stats.get", json!({}));
    assert_eq!(stats.data["devices"], 2);
    assert!(stats.data["values"].as_u64().unwrap() >= 5);
    assert_eq!(stats.data["commands"]["error.parameter.missing"], 2);
    assert!(stats.data["clients"][PLUGIN]["values"].as_u64().unwrap() >= 5);

    // A restart on the same database: devices, names and last values.
    services_stop.trigger();
    for thread in services {
        thread.join().unwrap();
    }
    let (services_stop, services) = start_services(&bus, &database);
    let device = call(&mut client, "devices", "device.get", json!({"uuid": dimmer_uuid}));
    assert_eq!(device.data["devices"][0]["name"], "Kitchen light");
    let inventory = call(&mut client, "devices", "inventory.get", json!({}));
    assert_eq!(
        inventory.data["devices"][&sensor_uuid]["values"]["temperature"]["level"],
        21.5
    );
    let deleted = call(&mut client, "devices", "device.delete.do", json!({"uuid": sensor_uuid}));
    assert_eq!(deleted.status(), Some(true));
    let gone = call(&mut client, "devices", "device.get", json!({"uuid": sensor_uuid}));
    assert_eq!(gone.status(), Some(false));
    let unknown = call(&mut client, "devices", "device.frob.do", json!({}));
    assert!(unknown.reason().unwrap().contains("unknown action"));
    services_stop.trigger();
    for thread in services {
        thread.join().unwrap();
    }
    bus.stop();
}

/// Domogik never saw a sensor value: its plugins publish `client.sensor`
/// (`{"<sensor id>": value, "atTimestamp"?}`, `pub_client_sensor.py`),
/// which nobody took, and its subscribers wait for `device-stats` after a
/// value is stored (`xplgw.py`), which nobody said. Both now work, beside
/// ago's events, and a change to a device says `device.update`.
#[test]
fn regression_domogik_sensor_values_are_taken_and_said_once_stored() {
    let data = tempfile::tempdir().unwrap();
    let database = data.path().join("majordome.db");
    let bus = Bus::with_state(data.path());
    let (services_stop, services) = start_services(&bus, &database);
    let mut client = bus.client(Duration::from_secs(5));
    let mut said = Subscriber::connect(&bus.subscribe_at, &["device-stats", "device.update"]).unwrap();
    // A subscription takes a moment to reach the device service's
    // publisher: change a probe device until its device.update comes.
    let probe = call(
        &mut client,
        "devices",
        "device.create.do",
        json!({"client": "plugin-probe.box", "id": "probe", "type": "switch"}),
    );
    let probe = probe.data["uuid"].as_str().unwrap().to_owned();
    eventually("the subscription to reach the device service", || {
        call(
            &mut client,
            "devices",
            "device.update.do",
            json!({"uuid": probe, "room": "x"}),
        );
        let event = said.recv(Duration::from_millis(100)).unwrap()?;
        (event.category == "device.update").then_some(())
    });
    let domogik_plugin = "plugin-diskfree.darkstar";
    let created = call(
        &mut client,
        "devices",
        "device.create.do",
        json!({"client": domogik_plugin, "id": "disk", "type": "temperaturesensor"}),
    );
    let uuid = created.data["uuid"].as_str().unwrap().to_owned();
    let update = next_event(&mut said, "device.update", |e| e["device_id"] == uuid.as_str());
    assert_eq!(update["client_id"], domogik_plugin);
    // What a Domogik plugin reads from its device list to learn its
    // sensor ids (`Plugin.get_sensors`).
    let listed = call(&mut client, "devices", "device.get", json!({"client": domogik_plugin}));
    let device = &listed.data["devices"][0];
    assert_eq!(device["device_type_id"], "temperaturesensor");
    assert_eq!(device["client_id"], domogik_plugin);
    assert!(device["xpl_stats"].is_object() && device["parameters"].is_object());
    let sensor = device["sensors"]["temperature"]["id"].as_i64().expect("a sensor id");

    // Published exactly as Domogik's MQPub does: `client.sensor`, the
    // sensor id as a string key, the value and atTimestamp as strings.
    let mut publisher = Publisher::connect(&bus.publish_at).unwrap();
    assert!(publisher.wait_for_subscriber("client.sensor", LIMIT).unwrap());
    let at = majordome_client::unix_now().floor() - 10.0;
    // Also majordome's `<uuid>/<quantity>` keys; a made-up sensor id and a
    // quantity that could not be a Clone key segment are counted.
    let values = json!({
        sensor.to_string(): "19.5", "atTimestamp": format!("{at}"), "12345": 1,
        format!("{uuid}/humidity"): 55, format!("{uuid}/no/good"): 1,
    });
    publisher.publish("client.sensor", &values).unwrap();
    let stored = next_event(&mut said, "device-stats", |e| e["sensor_id"] == sensor);
    assert_eq!(
        (&stored["device_id"], &stored["stored_value"], &stored["timestamp"]),
        (&json!(uuid), &json!("19.5"), &json!(at))
    );
    // Stored before it was said.
    let history = call(
        &mut client,
        "history",
        "history.get",
        json!({"uuid": uuid, "quantity": "temperature", "last": 5}),
    );
    assert_eq!(
        history.data["values"][0]["value"], "19.5",
        "as sent: {:?}",
        history.data
    );
    let inventory = call(&mut client, "devices", "inventory.get", json!({}));
    let value = &inventory.data["devices"][&uuid]["values"]["temperature"];
    assert_eq!((&value["level"], &value["unit"]), (&json!("19.5"), &json!("degC")));
    let humidity = &inventory.data["devices"][&uuid]["sensors"]["humidity"];
    assert_eq!(humidity["last_value"], 55, "a new quantity is a new sensor");
    let key = format!("/device/{uuid}/temperature");
    eventually("the value in Clone", || {
        let (entries, _) = majordome_state::snapshot(bus.state.as_deref().unwrap(), "/device/", LIMIT).unwrap();
        entries.iter().any(|e| e.key == key).then_some(())
    });

    // ago's events are said as device-stats too.
    let event = json!({"uuid": uuid, "event": "event.environment.temperaturechanged",
                       "data": {"level": 22.0, "unit": "degC"}});
    publisher
        .publish("event.environment.temperaturechanged", &event)
        .unwrap();
    let stored = next_event(&mut said, "device-stats", |e| e["stored_value"] == 22.0);
    assert_eq!(stored["sensor_id"], sensor);

    // A user's change says device.update; the sensor id made up above
    // was counted, not stored.
    call(
        &mut client,
        "devices",
        "device.update.do",
        json!({"uuid": uuid, "room": "Cellar"}),
    );
    next_event(&mut said, "device.update", |e| e["device_id"] == uuid.as_str());
    let stats = call(&mut client, "devices", "stats.get", json!({}));
    assert_eq!(stats.data["unknown_sensor"], 2, "{:?}", stats.data);
    services_stop.trigger();
    for thread in services {
        thread.join().unwrap();
    }
    bus.stop();
}
