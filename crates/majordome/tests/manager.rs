//! The manager in `majordome up`: a plugin that says it is alive is listed
//! alive, and becomes dead once it falls silent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);

fn client_list(broker: &str) -> Value {
    let out = run(&["call", "manager", "client.list.get", "--broker", broker]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let (action, json) = text.split_once('\n').expect("action, then JSON");
    assert_eq!(action, "client.list.result");
    // Domogik's shape: the clients at the top level of the data.
    serde_json::from_str::<Value>(json).unwrap()
}

/// Polls `client.list.get` until `id` has `status` (bounded).
fn wait_status(broker: &str, id: &str, status: &str) -> Value {
    let start = Instant::now();
    loop {
        let clients = client_list(broker);
        if clients[id]["status"] == status {
            return clients;
        }
        assert!(start.elapsed() < LIMIT, "{id} never became {status}: {clients}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_plugin_is_alive_while_it_speaks_and_dead_after_silence() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let manifest = json!({"name": "fake", "version": "1.0", "device_types": ["switch"]});
    std::fs::write(plugins.path().join("fake.json"), manifest.to_string()).unwrap();
    let (_up, lines) = Process::up(
        data.path(),
        &["--plugins", plugins.path().to_str().unwrap(), "--dead-after", "1"],
        4,
    );
    let (broker, publish_at) = (last_word(&lines[0]), last_word(&lines[2]));
    wait_for_service(&broker, "manager", "200");
    // Listed from its manifest before it ever speaks.
    let clients = client_list(&broker);
    let fake = clients
        .as_object()
        .unwrap()
        .keys()
        .find(|id| id.starts_with("plugin-fake."))
        .cloned();
    assert!(fake.is_some(), "{clients}");

    // What a Domogik plugin publishes on start (seed 001), until listed.
    let status = json!({"type": "plugin", "id": "diskfree", "host": "darkstar", "event": "alive"}).to_string();
    let start = Instant::now();
    loop {
        let out = run(&[
            "pub",
            "plugin.status",
            &status,
            "--endpoint",
            &publish_at,
            "--wait",
            "5",
        ]);
        assert!(out.status.success(), "{out:?}");
        if client_list(&broker)["plugin-diskfree.darkstar"]["status"] == "alive" {
            break;
        }
        assert!(start.elapsed() < LIMIT, "the plugin never became alive");
    }
    // Silent for more than --dead-after: dead, and the history says so.
    wait_status(&broker, "plugin-diskfree.darkstar", "dead");
    let out = run(&[
        "call",
        "manager",
        "client.history.get",
        r#"{"id": "plugin-diskfree.darkstar"}"#,
        "--broker",
        &broker,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let history: Value = serde_json::from_str(text.split_once('\n').unwrap().1).unwrap();
    let statuses: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    // Newest first, as Domogik's manager answers. (On a slow machine it
    // may have died between two of our events.)
    assert!(
        statuses.starts_with(&["dead", "alive"]) && statuses.last() == Some(&"alive"),
        "{statuses:?}"
    );
}
