//! The config service over a real broker and forwarder, with a real
//! database: Domogik's config.get/set/delete, manifest checks, events, and
//! values that survive a restart.

use std::thread::{self, JoinHandle};
use std::time::Duration;

use majordome_client::{Client, Message, Shutdown, Subscriber};
use majordome_services::{ConfigService, Manifest};
use majordome_store::Durability;
use serde_json::{json, Value};

mod common;

use common::{Bus, LIMIT};

/// Runs a config service on `database`; returns its own stop signal.
fn start_config(bus: &Bus, database: &std::path::Path) -> (Shutdown, JoinHandle<()>) {
    let manifest = Manifest::parse(
        &json!({
            "name": "fake", "version": "1.0",
            "config": [
                {"key": "interval", "type": "integer", "default": 5, "min": 1, "max": 3600},
                {"key": "unit", "type": "string", "choices": ["C", "F"], "required": true},
                {"key": "enabled", "type": "boolean", "default": true}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let service = ConfigService::open(database, vec![manifest], Durability::Full).unwrap();
    let stop = Shutdown::new().unwrap();
    let (own, broker, publish_at) = (stop.clone(), bus.broker.clone(), bus.publish_at.clone());
    let thread = thread::spawn(move || service.run(&broker, Some(&publish_at), &own).unwrap());
    (stop, thread)
}

fn call(client: &mut Client, service: &str, action: &str, data: Value) -> Value {
    let reply = client.request_message(service, &Message::new(action, data)).unwrap();
    assert_eq!(reply.action, "config.result", "{reply:?}");
    reply.data
}

fn client(bus: &Bus) -> Client {
    bus.client(LIMIT)
}

#[test]
fn get_set_delete_with_manifest_checks_events_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let database = majordome_store::database_path(dir.path());
    let bus = Bus::start();
    let (stop, config) = start_config(&bus, &database);
    let mut c = client(&bus);
    let fake = json!({"type": "plugin", "name": "fake", "host": "box"});
    let with = |extra: Value| {
        let mut data = fake.clone();
        data.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        data
    };

    // Nothing set: defaults from the manifest; not configured (unit is required).
    let all = call(&mut c, "config", "config.get", fake.clone());
    assert_eq!(all["status"], true);
    assert_eq!(all["data"], json!({"interval": 5, "enabled": true}));
    assert_eq!(all["configured"], false);
    let one = call(&mut c, "dbmgr", "config.get", with(json!({"key": "interval"})));
    assert_eq!((one["value"].clone(), one["default"].clone()), (json!(5), json!(true)));
    // Unknown key: null, status true, and a reason that says so.
    let unknown = call(&mut c, "config", "config.get", with(json!({"key": "colour"})));
    assert_eq!(
        (unknown["status"].clone(), unknown["value"].clone()),
        (json!(true), Value::Null)
    );
    assert!(unknown["reason"].as_str().unwrap().contains("no value for 'colour'"));

    // Set, seen by a subscriber as plugin.configuration.
    let mut events = Subscriber::connect(&bus.subscribe_at, &["plugin.configuration"]).unwrap();
    let set = loop {
        // The subscription must reach the config service's publisher first.
        let set = call(
            &mut c,
            "admin",
            "config.set",
            with(json!({"key": "unit", "value": "C"})),
        );
        assert_eq!(set["status"], true, "{set}");
        if let Some(event) = events.recv(Duration::from_millis(200)).unwrap() {
            assert_eq!(event.data["event"], "updated");
            assert_eq!(event.data["keys"], json!(["unit"]));
            break set;
        }
    };
    assert_eq!(set["configured"], true);
    // Several at once; strings converted to the manifest's types.
    let set = call(
        &mut c,
        "config",
        "config.set",
        with(json!({"data": {"interval": "30", "enabled": "no"}})),
    );
    assert_eq!(set["status"], true, "{set}");
    let all = call(&mut c, "dbmanager", "config.get", fake.clone());
    assert_eq!(all["data"], json!({"interval": 30, "enabled": false, "unit": "C"}));

    // Wrong values and keys: status false, a reason, nothing stored.
    for (data, reason) in [
        (json!({"key": "interval", "value": 0}), "between 1 and 3600"),
        (json!({"key": "interval", "value": "soon"}), "must be an integer"),
        (json!({"key": "unit", "value": "K"}), "one of \"C\", \"F\""),
        (json!({"key": "colour", "value": "red"}), "has no config key 'colour'"),
        (json!({"key": "unit", "value": null}), "use config.delete"),
        (json!({"key": "unit"}), "needs 'key' and 'value'"),
    ] {
        let reply = call(&mut c, "config", "config.set", with(data.clone()));
        assert_eq!(reply["status"], false, "{data}");
        assert!(reply["reason"].as_str().unwrap().contains(reason), "{data}: {reply}");
    }
    let reply = call(&mut c, "config", "config.get", json!({"name": "fake"}));
    assert!(reply["reason"]
        .as_str()
        .unwrap()
        .contains("needs 'name' (or 'id') and 'host'"));
    let reply = c
        .request_message("config", &Message::new("config.frobnicate", fake.clone()))
        .unwrap();
    assert_eq!(reply.status(), Some(false));
    assert!(reply.reason().unwrap().contains("unknown action"), "{reply:?}");
    // A plugin with no manifest takes any JSON value.
    let other = json!({"name": "diskfree", "id": "ignored", "host": "box", "key": "paths", "value": ["/", "/home"]});
    assert_eq!(call(&mut c, "config", "config.set", other)["status"], true);

    // Restart the service on the same database: everything is still there.
    stop.trigger();
    config.join().unwrap();
    let (stop, config) = start_config(&bus, &database);
    let all = call(&mut c, "config", "config.get", fake.clone());
    assert_eq!(all["data"], json!({"interval": 30, "enabled": false, "unit": "C"}));
    let paths = call(
        &mut c,
        "config",
        "config.get",
        json!({"id": "diskfree", "host": "box", "key": "paths"}),
    );
    assert_eq!(paths["value"], json!(["/", "/home"]));

    // Delete one key, then all.
    let deleted = call(&mut c, "config", "config.delete", with(json!({"key": "unit"})));
    assert_eq!(
        (deleted["deleted"].clone(), deleted["configured"].clone()),
        (json!(1), json!(false))
    );
    let deleted = call(&mut c, "config", "config.delete", fake.clone());
    assert_eq!(deleted["deleted"], 2);
    let all = call(&mut c, "config", "config.get", fake.clone());
    assert_eq!(all["data"], json!({"interval": 5, "enabled": true}));
    stop.trigger();
    config.join().unwrap();
    bus.stop();
}

/// A Domogik plugin asks `admin` for the key `configured` at start and
/// stops unless it is true (`Plugin.check_configured`). For a plugin with a
/// manifest, `configured` was answered `null` and could not be set.
#[test]
fn regression_configured_is_a_built_in_key_for_every_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let database = majordome_store::database_path(dir.path());
    let bus = Bus::start();
    let (stop, config) = start_config(&bus, &database);
    let mut c = client(&bus);
    let ask = |c: &mut Client, name: &str| {
        let data = json!({"type": "plugin", "name": name, "host": "box", "key": "configured"});
        let reply = call(c, "admin", "config.get", data);
        assert_eq!(
            (reply["status"].clone(), reply["reason"].clone()),
            (json!(true), json!(""))
        );
        reply["value"].clone()
    };
    let set = |c: &mut Client, name: &str, value: Value| {
        let data = json!({"type": "plugin", "name": name, "host": "box", "key": "configured", "value": value});
        call(c, "admin", "config.set", data)
    };
    // With a manifest whose required key `unit` has no value: false, and
    // it cannot be marked configured yet.
    assert_eq!(ask(&mut c, "fake"), false);
    let refused = set(&mut c, "fake", json!(true));
    assert_eq!(refused["status"], false);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("required keys unit have no value"),
        "{refused}"
    );
    // Domogik's admin sets the keys and `configured` in one request.
    let both = json!({"type": "plugin", "name": "fake", "host": "box", "data": {"unit": "F", "configured": true}});
    assert_eq!(call(&mut c, "admin", "config.set", both)["status"], true);
    assert_eq!(ask(&mut c, "fake"), true);
    // Set to false (Domogik's "1"/"0" strings too), it says false whatever
    // the keys; deleting it brings back what the keys say.
    assert_eq!(set(&mut c, "fake", json!("0"))["status"], true);
    assert_eq!(ask(&mut c, "fake"), false);
    let all = call(&mut c, "config", "config.get", json!({"name": "fake", "host": "box"}));
    assert_eq!(all["configured"], false);
    let deleted = call(
        &mut c,
        "config",
        "config.delete",
        json!({"name": "fake", "host": "box", "key": "configured"}),
    );
    assert_eq!(deleted["configured"], true);
    assert_eq!(set(&mut c, "fake", json!("maybe"))["status"], false);
    // Without a manifest: not configured until something is set, and
    // `configured` itself is enough, as Domogik's admin does it.
    assert_eq!(ask(&mut c, "diskfree"), false);
    assert_eq!(set(&mut c, "diskfree", json!("1"))["status"], true);
    assert_eq!(ask(&mut c, "diskfree"), true);
    stop.trigger();
    config.join().unwrap();
    bus.stop();
}
