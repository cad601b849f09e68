//! Scenarios on a real `majordome up` with the fake plugin: a thermostat
//! on the fake cyclic sensor, cron, sunset and a held value under the test
//! clock, the four modes, a restart and a `kill -9`, every bad input
//! refused with its reason, and runaway scripts and scenarios that start
//! each other stopped while the rest keeps running. Everything goes through
//! `majordome call` and `majordome scenario`, as a user would.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// `service action data` through `majordome call`: the reply's data,
/// refusals included.
fn call(broker: &str, service: &str, action: &str, data: &Value) -> Value {
    let out = run(&[
        "call",
        service,
        action,
        &data.to_string(),
        "--broker",
        broker,
        "--timeout",
        "20",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.split_once('\n').map_or("", |(_, rest)| rest);
    serde_json::from_str(json).unwrap_or_else(|_| panic!("no JSON from {service} {action}: {out:?}"))
}

fn scenario(broker: &str, action: &str, data: Value) -> Value {
    call(broker, "scenario", action, &data)
}

/// `up` with `toml` as its configuration; the broker, once the scenario
/// service is there.
fn hub(toml: &str) -> (Process, String, tempfile::TempDir) {
    let (up, broker, _state, data) = hub_with_state(toml);
    (up, broker, data)
}

/// The same, with the Clone server's snapshot endpoint.
fn hub_with_state(toml: &str) -> (Process, String, String, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("majordome.toml"), toml).unwrap();
    let (up, lines) = Process::up(data.path(), &[], 9);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "scenario", "200");
    (up, broker, last_word(&lines[4]), data)
}

/// The same on an existing data folder.
fn hub_again(data: &std::path::Path) -> (Process, String) {
    let (up, lines) = Process::up(data, &[], 9);
    let broker = last_word(&lines[0]);
    wait_for_service(&broker, "scenario", "200");
    (up, broker)
}

/// The fake plugin's devices by type, once all five are there.
fn fake_devices(broker: &str) -> std::collections::HashMap<String, String> {
    let start = Instant::now();
    loop {
        let found = call(broker, "devices", "devices.get", &json!({}));
        let devices: std::collections::HashMap<String, String> = found["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["client"].as_str().is_some_and(|c| c.starts_with("plugin-fake.")))
            .map(|d| {
                (
                    d["type"].as_str().unwrap().to_owned(),
                    d["uuid"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        if devices.len() >= 5 {
            return devices;
        }
        assert!(start.elapsed() < LIMIT, "the fake devices never came: {found}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Adds a scenario, which must be accepted.
fn add(broker: &str, definition: Value) {
    let new = scenario(broker, "scenario.new.do", json!({"scenario": definition}));
    assert_eq!(new["status"], true, "{new}");
}

/// Waits until `check` holds of the scenario's history, and returns it.
fn history_until(broker: &str, name: &str, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let history = scenario(broker, "scenario.history.get", json!({"name": name, "last": 100}));
        let runs = history["runs"].as_array().cloned().unwrap_or_default();
        if check(&runs) {
            return runs;
        }
        assert!(start.elapsed() < LIMIT, "{name}: {what} never came: {history}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thermostat_switches_on_below_and_off_above_following_the_fake_sensor() {
    let (_up, broker, state, _data) = hub_with_state("");
    let devices = fake_devices(&broker);
    let (thermometer, switch) = (&devices["temperaturesensor"], &devices["switch"]);
    // The fake thermometer sweeps 15 to 25 °C and back every 4 s, read
    // every 0.2 s.
    let fast = json!({"type": "plugin", "name": "fake", "host": local_host(&broker),
                      "data": {"interval": 0.2, "cycle_length": 4}});
    assert_eq!(call(&broker, "config", "config.set", &fast)["status"], true);
    let imported = scenario(
        &broker,
        "scenario.import.do",
        json!({"scenarios": [
            {"name": "heat-on",
             "triggers": [{"trigger": "value", "device": thermometer, "quantity": "temperature", "below": 17}],
             "actions": [{"action": "command", "device": switch, "command": "on"}]},
            {"name": "heat-off",
             "triggers": [{"trigger": "value", "device": thermometer, "quantity": "temperature", "above": 23}],
             "actions": [{"action": "command", "device": switch, "command": "off"}]}]}),
    );
    assert_eq!(imported["imported"], json!(["heat-on", "heat-off"]), "{imported}");
    // Each fires when the temperature crosses its bound, and its command
    // succeeds.
    let on = history_until(&broker, "heat-on", "a run", |runs| !runs.is_empty());
    assert_eq!(on[0]["result"], "ok", "{}", on[0]);
    assert!(on[0]["trigger"]["value"].as_f64().unwrap() < 17.0);
    assert_eq!(on[0]["actions"][0]["result"]["identifier"], "success");
    let off = history_until(&broker, "heat-off", "a run", |runs| !runs.is_empty());
    assert!(off[0]["trigger"]["value"].as_f64().unwrap() > 23.0);
    // The switch follows: on after heat-on, off after heat-off, as it says.
    let start = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let state = call(&broker, "devices", "device.get", &json!({"uuid": switch}));
        seen.insert(state["devices"][0]["values"]["state"]["level"].as_i64().unwrap_or(-1));
        seen.remove(&-1);
        assert!(start.elapsed() < LIMIT, "the switch never went both ways: {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [0, 255]);
    // Live state in Clone, and the scenario as a device.
    let live = run(&["state", "/scenario/heat-on/", "--endpoint", &state]);
    let said = String::from_utf8_lossy(&live.stdout);
    assert!(said.contains("/scenario/heat-on/last_result \"ok\""), "{said}");
}

/// The hub's host, as the manager knows it (the fake's config is per host).
fn local_host(broker: &str) -> String {
    let clients = call(broker, "manager", "client.list.get", &json!({}));
    clients
        .as_object()
        .unwrap()
        .values()
        .find_map(|c| (c["name"] == "fake").then(|| c["host"].as_str().unwrap().to_owned()))
        .expect("the fake plugin is listed")
}

/// Unix seconds of a local wall time on this machine (the hub's zone).
fn local(text: &str) -> f64 {
    let civil: jiff::civil::DateTime = text.parse().unwrap();
    civil
        .to_zoned(jiff::tz::TimeZone::system())
        .unwrap()
        .timestamp()
        .as_second() as f64
}

#[test]
fn cron_fires_on_schedule_under_the_test_clock() {
    let (_up, broker, _data) = hub("[scenario]\ntest_clock = true\n");
    add(
        &broker,
        json!({"name": "morning", "triggers": [{"trigger": "cron", "cron": "0 7 * * 1-5"}],
               "actions": [{"action": "log", "message": "good morning"}]}),
    );
    // Friday 4 December 2026, two seconds before seven.
    scenario(
        &broker,
        "scenario.clock.do",
        json!({"now": local("2026-12-04T06:59:58")}),
    );
    let runs = history_until(&broker, "morning", "the 07:00 run", |runs| !runs.is_empty());
    assert_eq!(runs[0]["trigger"]["scheduled"], local("2026-12-04T07:00:00"));
    assert_eq!(runs[0]["result"], "ok");
    // The next is Monday's: not Saturday, not Sunday.
    let status = scenario(&broker, "scenario.get", json!({"name": "morning"}));
    assert_eq!(
        status["scenario"]["status"]["next"],
        local("2026-12-07T07:00:00"),
        "{status}"
    );
    // Without the test clock, the clock is not for setting.
    let (_plain, plain_broker, _plain_data) = hub("");
    let refused = scenario(&plain_broker, "scenario.clock.do", json!({"now": 0}));
    assert_eq!(refused["status"], false);
}

/// Sets a Clone key as a user does.
fn state_set(state: &str, key: &str, value: &str) {
    let out = run(&["state", "set", key, value, "--endpoint", state]);
    assert!(out.status.success(), "{out:?}");
}

/// Waits until the scenario's live status says `what`.
fn status_until(broker: &str, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let status = scenario(broker, "scenario.get", json!({"name": name}))["scenario"]["status"].clone();
        if check(&status) {
            return status;
        }
        assert!(start.elapsed() < LIMIT, "{name}: never {what}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn modes_single_restart_queued_and_parallel_behave_as_documented() {
    let (_up, broker, state, _data) = hub_with_state("");
    // Each run waits for a gate in Clone, so that runs overlap for as long
    // as the test needs, however slow the machine.
    let gated = |name: &str, mode: &str| {
        json!({"name": name, "mode": mode, "max_runs": 2,
               "actions": [{"action": "wait", "timeout": 120,
                            "until": {"condition": "state", "key": "/test/gate", "op": "eq", "value": "open"}},
                           {"action": "log", "message": "through"}]})
    };
    let names = ["one-at-a-time", "latest", "in-turn", "side-by-side"];
    let imported = scenario(
        &broker,
        "scenario.import.do",
        json!({"scenarios": [gated(names[0], "single"), gated(names[1], "restart"),
                             gated(names[2], "queued"), gated(names[3], "parallel")]}),
    );
    assert_eq!(imported["status"], true, "{imported}");
    for name in names {
        for _ in 0..3 {
            let ran = scenario(&broker, "scenario.run.do", json!({"name": name}));
            assert_eq!(ran["status"], true, "{ran}");
        }
    }
    // single: the first runs, the two others are ignored.
    status_until(&broker, names[0], "one running", |s| s["running"] == 1);
    // restart: each new trigger stops the run before it.
    status_until(&broker, names[1], "one running", |s| s["running"] == 1);
    // queued, at most 2: one runs, one waits its turn, the third is dropped.
    status_until(&broker, names[2], "one running, one queued", |s| {
        s["running"] == 1 && s["queued"] == 1
    });
    // parallel, at most 2: two run at once, the third is dropped.
    status_until(&broker, names[3], "two running", |s| s["running"] == 2);
    let stats = scenario(&broker, "stats.get", json!({}));
    assert_eq!(stats["ignored_running"], 2, "{stats}");
    assert_eq!(stats["dropped_max_runs"], 2, "{stats}");

    state_set(&state, "/test/gate", "open");
    let single = history_until(&broker, names[0], "its run", |runs| !runs.is_empty());
    let restarted = history_until(&broker, names[1], "three runs", |runs| runs.len() >= 3);
    let queued = history_until(&broker, names[2], "two runs", |runs| runs.len() >= 2);
    let parallel = history_until(&broker, names[3], "two runs", |runs| runs.len() >= 2);
    // Newest first.
    let results = |runs: &[Value]| {
        runs.iter()
            .map(|r| r["result"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(results(&single), ["ok"]);
    assert_eq!(results(&restarted), ["ok", "stopped", "stopped"]);
    assert!(restarted[1].to_string().contains("restarted"), "{}", restarted[1]);
    assert_eq!(results(&queued), ["ok", "ok"]);
    let (first, second) = (&queued[1], &queued[0]);
    assert!(
        second["started"].as_f64() >= first["finished"].as_f64(),
        "queued runs one after the other: {first} then {second}"
    );
    assert_eq!(results(&parallel), ["ok", "ok"]);
    let (first, second) = (&parallel[1], &parallel[0]);
    assert!(
        second["started"].as_f64() < first["finished"].as_f64(),
        "parallel runs overlap: {first} and {second}"
    );
}

#[test]
fn a_sunset_trigger_fires_at_the_published_time_under_the_test_clock() {
    // Paris; a news story on the 2025 winter solstice gave 16:56 CET
    // (15:56 UTC) for the sunset of 21 December.
    let (_up, broker, _data) = hub("[scenario]\nlatitude = 48.8566\nlongitude = 2.3522\ntest_clock = true\n");
    add(
        &broker,
        json!({"name": "dusk", "triggers": [{"trigger": "sun", "event": "sunset"}],
               "actions": [{"action": "log", "message": "lights on"}]}),
    );
    let published = 1_766_332_560.0; // 2025-12-21T15:56:00Z
    scenario(&broker, "scenario.clock.do", json!({"now": published - 300.0}));
    let status = status_until(&broker, "dusk", "armed for the sunset", |s| {
        s["next"].as_f64().is_some_and(|n| n < published + 3600.0)
    });
    let next = status["next"].as_f64().unwrap();
    assert!(
        (next - published).abs() <= 60.0,
        "sunset at {next}, published {published}"
    );
    // A second before it (a jump past it would set the next day's).
    scenario(&broker, "scenario.clock.do", json!({"now": next - 1.0}));
    let runs = history_until(&broker, "dusk", "the sunset run", |runs| !runs.is_empty());
    assert_eq!(runs[0]["trigger"]["trigger"], "sun");
    assert_eq!(runs[0]["trigger"]["scheduled"], next);
    assert_eq!(runs[0]["result"], "ok");
}

#[test]
fn a_value_trigger_with_for_fires_once_the_value_has_held_that_long() {
    let (_up, broker, state, _data) = hub_with_state("[scenario]\ntest_clock = true\n");
    let created = call(
        &broker,
        "devices",
        "device.create.do",
        &json!({"client": "plugin-test.local", "id": "attic", "type": "temperaturesensor"}),
    );
    let uuid = created["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    add(
        &broker,
        json!({"name": "attic-fan",
               "triggers": [{"trigger": "value", "device": uuid, "quantity": "temperature",
                             "above": 25, "for": 600}],
               "actions": [{"action": "log", "message": "too warm for ten minutes"}]}),
    );
    let key = format!("/device/{uuid}/temperature");
    // The engine has seen `level` when a dry run reports it.
    let seen = |level: f64| {
        let start = Instant::now();
        loop {
            let test = scenario(&broker, "scenario.test.do", json!({"name": "attic-fan"}));
            if test["test"]["triggers"][0]["value"] == level {
                return;
            }
            assert!(start.elapsed() < LIMIT, "the engine never saw {level}: {test}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let t0 = 1_900_000_000.0;
    scenario(&broker, "scenario.clock.do", json!({"now": t0}));
    state_set(&state, &key, r#"{"level": 20, "unit": "degC"}"#);
    seen(20.0);
    // Into the range at t0; out of it at t0 + 300, before the 600 s.
    state_set(&state, &key, r#"{"level": 30, "unit": "degC"}"#);
    seen(30.0);
    scenario(&broker, "scenario.clock.do", json!({"now": t0 + 300.0}));
    state_set(&state, &key, r#"{"level": 22, "unit": "degC"}"#);
    seen(22.0);
    // In again at t0 + 300: due at t0 + 900, not at t0 + 600.
    state_set(&state, &key, r#"{"level": 28, "unit": "degC"}"#);
    seen(28.0);
    scenario(&broker, "scenario.clock.do", json!({"now": t0 + 700.0}));
    scenario(&broker, "scenario.clock.do", json!({"now": t0 + 1000.0}));
    let runs = history_until(&broker, "attic-fan", "the held run", |runs| !runs.is_empty());
    assert_eq!(runs.len(), 1, "{runs:?}");
    let due = runs[0]["trigger"]["scheduled"].as_f64().unwrap();
    // Due 600 s after it went in again (the clock runs on between the
    // steps: a few seconds at most), not 600 s after it first went in.
    assert!(
        (t0 + 900.0..t0 + 960.0).contains(&due),
        "due {due}, in again at {}",
        t0 + 300.0
    );
    assert_eq!(runs[0]["trigger"]["for"], 600.0);
}

#[test]
fn scenarios_and_their_enabled_state_survive_a_restart_and_a_kill_9() {
    let (mut up, broker, data) = hub("");
    let make = |name: &str| json!({"name": name, "actions": [{"action": "log", "message": name}]});
    scenario(
        &broker,
        "scenario.import.do",
        json!({"scenarios": [make("kept"), make("off")]}),
    );
    assert_eq!(
        scenario(&broker, "scenario.disable.do", json!({"name": "off"}))["status"],
        true
    );
    assert_eq!(
        scenario(&broker, "scenario.run.do", json!({"name": "kept"}))["status"],
        true
    );
    history_until(&broker, "kept", "its run", |runs| !runs.is_empty());
    let listed = |broker: &str| {
        let list = scenario(broker, "scenario.list.get", json!({}));
        list["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_owned(), s["enabled"].as_bool().unwrap()))
            .collect::<Vec<_>>()
    };
    let before = listed(&broker);
    assert_eq!(before, [("kept".to_owned(), true), ("off".to_owned(), false)]);
    // A clean stop and start.
    up.signal(libc::SIGTERM);
    assert!(up.wait_exit(LIMIT).is_some_and(|s| s.success()));
    let (mut again, broker) = hub_again(data.path());
    assert_eq!(listed(&broker), before);
    assert_eq!(
        history_until(&broker, "kept", "its run", |runs| !runs.is_empty()).len(),
        1
    );
    // An acknowledged change, then kill -9: still there.
    assert_eq!(
        scenario(&broker, "scenario.enable.do", json!({"name": "off"}))["status"],
        true
    );
    again.signal(libc::SIGKILL);
    again.wait_exit(LIMIT);
    let (_third, broker) = hub_again(data.path());
    assert_eq!(listed(&broker), [("kept".to_owned(), true), ("off".to_owned(), true)]);
}

#[test]
fn every_bad_input_is_refused_with_a_reason_that_names_the_field() {
    let (_up, broker, _data) = hub("");
    let devices = fake_devices(&broker);
    let (switch, thermometer) = (&devices["switch"], &devices["temperaturesensor"]);
    let cases = [
        (json!({"name": "Bad Name!"}), "name"),
        (
            json!({"name": "x", "triggers": [{"trigger": "moon"}]}),
            "triggers[0].trigger",
        ),
        (
            json!({"name": "x", "triggers": [{"trigger": "cron", "cron": "99 * * * *"}]}),
            "triggers[0].cron",
        ),
        (
            json!({"name": "x", "triggers": [{"trigger": "sun", "event": "sunset"}]}),
            "triggers[0].event",
        ),
        (
            json!({"name": "x", "triggers": [{"trigger": "value", "device": "no-such-device", "quantity": "t", "below": 1}]}),
            "triggers[0].device",
        ),
        (
            json!({"name": "x", "triggers": [{"trigger": "value", "device": thermometer, "quantity": "humidity", "below": 1}]}),
            "triggers[0].quantity",
        ),
        (
            json!({"name": "x", "actions": [{"action": "command", "device": switch, "command": "fly"}]}),
            "actions[0].command",
        ),
        (
            json!({"name": "x", "actions": [{"action": "run", "scenario": "nowhere"}]}),
            "actions[0].scenario",
        ),
        (
            json!({"name": "x", "actions": [{"action": "script", "lua": "if then"}]}),
            "actions[0].lua",
        ),
        (
            json!({"name": "x", "conditions": [{"condition": "script", "lua": "return ("}]}),
            "conditions[0].lua",
        ),
    ];
    for (body, field) in cases {
        let refused = scenario(&broker, "scenario.new.do", json!({"scenario": body}));
        assert_eq!(refused["status"], false, "{body}");
        let reason = refused["reason"].as_str().unwrap();
        assert!(reason.starts_with(&format!("{field}: ")), "{body}: {reason}");
    }
    // A name taken, an update of nothing, an import with one bad scenario
    // (none is stored).
    let ok = json!({"name": "fine", "actions": [{"action": "log", "message": "hi"}]});
    assert_eq!(
        scenario(&broker, "scenario.new.do", json!({"scenario": ok}))["status"],
        true
    );
    assert!(scenario(&broker, "scenario.new.do", json!({"scenario": ok}))["reason"]
        .as_str()
        .unwrap()
        .contains("exists"));
    let missing = json!({"name": "ghost", "actions": []});
    assert_eq!(
        scenario(&broker, "scenario.update.do", json!({"scenario": missing}))["status"],
        false
    );
    let import = scenario(
        &broker,
        "scenario.import.do",
        json!({"scenarios": [{"name": "good"}, {"name": "bad", "mode": "sometimes"}]}),
    );
    assert!(
        import["reason"].as_str().unwrap().starts_with("scenarios[1].mode"),
        "{import}"
    );
    let names = scenario(&broker, "scenario.list.get", json!({}));
    assert_eq!(names["scenarios"].as_array().unwrap().len(), 1, "{names}");
    assert!(scenario(&broker, "scenario.frobnicate", json!({}))["reason"]
        .as_str()
        .unwrap()
        .contains("unknown action"));
}

#[test]
fn runaway_scripts_and_scenarios_that_start_each_other_are_stopped_while_others_run() {
    let (_up, broker, state, _data) = hub_with_state("");
    let imported = scenario(
        &broker,
        "scenario.import.do",
        json!({"scenarios": [
            {"name": "spin", "actions": [{"action": "script", "lua": "while true do end"}]},
            {"name": "hog", "actions": [{"action": "script", "lua": "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 4096) .. i end"}]},
            {"name": "tick", "actions": [{"action": "script", "lua": "majordome.set('/test/tick', 1 + 1) return 'ticked'"}]},
            // Was: the engine thread overflowed its stack and took `up`
            // down with it.
            {"name": "ping", "mode": "parallel", "max_runs": 100, "actions": [{"action": "run", "scenario": "pong"}]},
            {"name": "pong", "mode": "restart", "actions": [{"action": "run", "scenario": "ping"}]},
            // Fired by its own publish, through the bus, for ever.
            {"name": "echo", "mode": "parallel", "max_runs": 100,
             "triggers": [{"trigger": "event", "category": "test.echo"}],
             "actions": [{"action": "publish", "category": "test.echo", "data": {}}]}]}),
    );
    assert_eq!(imported["status"], true, "{imported}");
    for name in ["ping", "echo", "spin", "hog", "tick"] {
        scenario(&broker, "scenario.run.do", json!({"name": name}));
    }
    let tick = history_until(&broker, "tick", "its run", |runs| !runs.is_empty());
    assert_eq!(tick[0]["result"], "ok", "{}", tick[0]);
    assert_eq!(tick[0]["actions"][0]["result"], "ticked");
    let spin = history_until(&broker, "spin", "its end", |runs| !runs.is_empty());
    assert_eq!(spin[0]["result"], "failed");
    assert!(
        spin[0]["error"].as_str().unwrap().contains("instructions"),
        "{}",
        spin[0]
    );
    let cut = |runs: &[Value]| runs.iter().any(|r| r.to_string().contains("started each other"));
    let ping = history_until(&broker, "ping", "the chain cut", |runs| runs.len() >= 8);
    let pong = history_until(&broker, "pong", "its runs", |runs| !runs.is_empty());
    assert!(cut(&ping) || cut(&pong), "{ping:?} {pong:?}");
    let echo = history_until(&broker, "echo", "the loop cut", |runs| {
        runs.iter()
            .any(|r| r["result"] == "skipped" && r["error"].as_str().is_some_and(|e| e.contains("a loop")))
    });
    assert!(echo.len() > 1, "it ran before it was cut");
    let throttled = scenario(&broker, "stats.get", json!({}))["throttled"].clone();
    assert!(throttled.as_u64() >= Some(1), "{throttled}");
    let hog = history_until(&broker, "hog", "its end", |runs| !runs.is_empty());
    assert!(hog[0]["error"].as_str().unwrap().contains("memory"), "{}", hog[0]);
    // The engine still serves, and the script's write is in Clone.
    assert_eq!(
        scenario(&broker, "scenario.run.do", json!({"name": "tick"}))["status"],
        true
    );
    history_until(&broker, "tick", "a second run", |runs| runs.len() >= 2);
    let written = run(&["state", "/test/", "--endpoint", &state]);
    assert!(
        String::from_utf8_lossy(&written.stdout).contains("/test/tick 2"),
        "{written:?}"
    );
}

#[test]
fn a_scenario_is_a_device_whose_on_runs_it_and_the_cli_shows_it() {
    let (_up, broker, data) = hub("");
    let body = json!({"name": "lights-out", "description": "Everything off",
                      "actions": [{"action": "delay", "seconds": 30}]});
    assert_eq!(
        scenario(&broker, "scenario.new.do", json!({"scenario": body}))["status"],
        true
    );
    // Its device, through the device service like any other.
    let start = Instant::now();
    let uuid = loop {
        let devices = call(&broker, "devices", "devices.get", &json!({}));
        let found = devices["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["type"] == "scenario" && d["name"] == "lights-out")
            .map(|d| d["uuid"].as_str().unwrap().to_owned());
        if let Some(uuid) = found {
            break uuid;
        }
        assert!(start.elapsed() < LIMIT, "no device for the scenario: {devices}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let on = call(
        &broker,
        "devices",
        "device.command.do",
        &json!({"uuid": uuid, "command": "on"}),
    );
    assert_eq!(on["result"]["identifier"], "success", "{on}");
    let get = scenario(&broker, "scenario.get", json!({"name": "lights-out"}));
    assert_eq!(get["scenario"]["status"]["running"], 1, "{get}");
    let off = call(
        &broker,
        "devices",
        "device.command.do",
        &json!({"uuid": uuid, "command": "off"}),
    );
    assert_eq!(off["result"]["identifier"], "success", "{off}");
    let runs = history_until(&broker, "lights-out", "the stopped run", |runs| !runs.is_empty());
    assert_eq!(runs[0]["result"], "stopped");
    // The CLI: list, test, history, export then import elsewhere.
    let list = run(&["scenario", "list", "--broker", &broker]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.contains("lights-out") && listed.contains("stopped"), "{listed}");
    let test = run(&["scenario", "test", "lights-out", "--broker", &broker]);
    assert!(
        String::from_utf8_lossy(&test.stdout).starts_with("would run: yes"),
        "{test:?}"
    );
    let export = run(&["scenario", "export", "--broker", &broker]);
    let file = data.path().join("exported.json");
    std::fs::write(&file, &export.stdout).unwrap();
    let (_other, other_broker, _other_data) = hub("");
    let import = run(&["scenario", "import", file.to_str().unwrap(), "--broker", &other_broker]);
    assert!(import.status.success(), "{import:?}");
    let shown = run(&["scenario", "show", "lights-out", "--broker", &other_broker]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("Everything off"));
    let missing = run(&["scenario", "run", "nothing", "--broker", &other_broker]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no scenario 'nothing'"));
}
