//! The config service in `majordome up`: a value set through the bus, and
//! checked against a plugin manifest, survives a restart of majordome.

mod common;

use common::*;
use serde_json::{json, Value};

fn up(data: &std::path::Path, plugins: &std::path::Path) -> (Process, String) {
    let (process, lines) = Process::up(data, &["--plugins", plugins.to_str().unwrap()], 11);
    assert!(
        lines[10].contains("plugin manifests") && lines[10].contains(" 1 from "),
        "{lines:?}"
    );
    let broker = last_word(&lines[0]);
    (process, broker)
}

fn call(broker: &str, action: &str, data: Value) -> std::process::Output {
    run(&["call", "config", action, &data.to_string(), "--broker", broker])
}

fn reply(out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.split_once('\n').map(|(_, rest)| rest).unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn config_set_through_the_bus_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let manifest = json!({
        "name": "fake", "version": "1.0", "description": "Fake devices",
        "command": ["majordome", "plugin", "fake"],
        "config": [{"key": "interval", "type": "integer", "default": 5, "min": 1}]
    });
    std::fs::write(plugins.path().join("fake.json"), manifest.to_string()).unwrap();
    std::fs::write(plugins.path().join("broken.json"), "{").unwrap();

    let (mut first, broker) = up(data.path(), plugins.path());
    wait_for_service(&broker, "config", "200");
    let out = call(
        &broker,
        "config.set",
        json!({"name": "fake", "host": "box", "key": "interval", "value": 30}),
    );
    assert!(out.status.success(), "{out:?}");
    // A value the manifest refuses: one clear line, exit 1.
    let out = call(
        &broker,
        "config.set",
        json!({"name": "fake", "host": "box", "key": "interval", "value": 0}),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("'interval' must be between 1"),
        "{out:?}"
    );
    first.signal(libc::SIGTERM);
    assert!(first
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("up stops")
        .success());

    let (_second, broker) = up(data.path(), plugins.path());
    wait_for_service(&broker, "dbmgr", "200");
    let out = call(
        &broker,
        "config.get",
        json!({"name": "fake", "host": "box", "key": "interval"}),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(reply(&out)["value"], 30);
}
