//! The engine under a made-up clock: no socket, no database; effects are
//! read from its outbox and their outcomes handed back by hand.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::engine::{Effect, Engine, EngineSettings, TriggerBudget, MAX_CHAIN};
use crate::model::read;

fn engine() -> Engine {
    Engine::new(EngineSettings {
        zone: jiff::tz::TimeZone::UTC,
        place: None,
        condition_script: Arc::new(|lua, _, _| match lua {
            "return true" => Ok(true),
            "return false" => Ok(false),
            other => Err(format!("no stand-in for {other}")),
        }),
        trigger_budget: TriggerBudget::default(),
    })
}

fn add(engine: &mut Engine, scenario: Value, now: f64) {
    engine.upsert(read(&scenario).unwrap(), now);
}

/// The commands in the outbox, as (run, device, command); other effects
/// are dropped.
fn commands(engine: &mut Engine) -> Vec<(u64, String, String)> {
    engine
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Command {
                run, device, command, ..
            } => Some((run, device, command)),
            _ => None,
        })
        .collect()
}

fn records(effects: &[Effect]) -> Vec<Value> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(record) => Some(record.clone()),
            _ => None,
        })
        .collect()
}

/// A value as the Clone server carries it: JSON text.
fn clone_value(value: Value) -> Option<Bytes> {
    Some(Bytes::from(value.to_string()))
}

fn temperature(engine: &mut Engine, level: f64, now: f64) {
    engine.state(
        "/device/thermo/temperature",
        clone_value(json!({"level": level, "unit": "degC"})),
        now,
    );
}

#[test]
fn a_thermostat_turns_the_switch_on_below_and_off_above() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "heat-on", "triggers": [{"trigger": "value", "device": "thermo", "quantity": "temperature", "below": 18}],
               "actions": [{"action": "command", "device": "switch", "command": "on"}]}),
        0.0,
    );
    add(
        &mut engine,
        json!({"name": "heat-off", "triggers": [{"trigger": "value", "device": "thermo", "quantity": "temperature", "above": 22}],
               "actions": [{"action": "command", "device": "switch", "command": "off"}]}),
        0.0,
    );
    engine.take_effects();
    // The first value only says which side it is on.
    temperature(&mut engine, 20.0, 1.0);
    assert!(commands(&mut engine).is_empty());
    temperature(&mut engine, 17.0, 2.0);
    let on = commands(&mut engine);
    assert_eq!(on.len(), 1);
    assert_eq!((on[0].1.as_str(), on[0].2.as_str()), ("switch", "on"));
    // Staying below fires nothing more.
    temperature(&mut engine, 16.0, 3.0);
    assert!(commands(&mut engine).is_empty());
    engine.done(on[0].0, Ok(json!({"identifier": "success"})), 3.0);
    let done = engine.take_effects();
    let record = &records(&done)[0];
    assert_eq!(record["result"], "ok");
    assert_eq!(record["trigger"]["value"], 17.0);
    assert_eq!(record["actions"][0]["result"]["identifier"], "success");
    temperature(&mut engine, 23.0, 4.0);
    let off = commands(&mut engine);
    assert_eq!((off[0].1.as_str(), off[0].2.as_str()), ("switch", "off"));
}

/// A scenario of `mode` that waits 10 s, fired three times at once.
fn fired_three_times(mode: &str, max_runs: u32) -> (Engine, Vec<Effect>) {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "slow", "mode": mode, "max_runs": max_runs,
               "triggers": [{"trigger": "event", "category": "button."}],
               "actions": [{"action": "delay", "seconds": 10}, {"action": "log", "message": "done"}]}),
        0.0,
    );
    engine.take_effects();
    for at in [1.0, 2.0, 3.0] {
        engine.event("button.pressed", &json!({}), at);
    }
    let effects = engine.take_effects();
    (engine, effects)
}

#[test]
fn single_ignores_a_trigger_while_it_runs() {
    let (mut engine, _) = fired_three_times("single", 10);
    assert_eq!(engine.running("slow"), 1);
    assert_eq!(engine.counters().ignored_running, 2);
    assert_eq!(engine.next_wakeup(), Some(11.0));
    engine.tick(11.0);
    let done = records(&engine.take_effects());
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["result"], "ok");
    assert_eq!(done[0]["actions"][1]["result"], "done");
}

#[test]
fn restart_stops_the_running_one_for_the_new_one() {
    let (mut engine, effects) = fired_three_times("restart", 10);
    let stopped = records(&effects);
    assert_eq!(stopped.len(), 2);
    assert!(stopped
        .iter()
        .all(|r| r["result"] == "stopped" && r["error"] == "restarted by a new trigger"));
    assert_eq!(engine.running("slow"), 1);
    engine.tick(13.0);
    assert_eq!(records(&engine.take_effects())[0]["started"], 3.0);
}

#[test]
fn queued_runs_in_turn_up_to_max_runs() {
    let (mut engine, _) = fired_three_times("queued", 2);
    assert_eq!(engine.running("slow"), 1);
    assert_eq!(engine.status("slow").unwrap()["queued"], 1);
    assert_eq!(engine.counters().dropped_max_runs, 1);
    engine.tick(11.0);
    let first = records(&engine.take_effects());
    assert_eq!(first[0]["started"], 1.0);
    // The queued one starts as the first ends, from then.
    assert_eq!(engine.running("slow"), 1);
    assert_eq!(engine.next_wakeup(), Some(21.0));
    engine.tick(21.0);
    assert_eq!(records(&engine.take_effects())[0]["started"], 11.0);
    assert_eq!(engine.running("slow"), 0);
}

#[test]
fn parallel_runs_side_by_side_up_to_max_runs() {
    let (mut engine, _) = fired_three_times("parallel", 2);
    assert_eq!(engine.running("slow"), 2);
    assert_eq!(engine.counters().dropped_max_runs, 1);
    engine.tick(12.0);
    assert_eq!(records(&engine.take_effects()).len(), 2);
}

#[test]
fn cron_fires_on_weekday_mornings_under_the_test_clock() {
    let mut engine = engine();
    let at = |text: &str| text.parse::<jiff::Timestamp>().unwrap().as_second() as f64;
    // Friday 2026-12-04, 06:59:50 UTC.
    let friday = at("2026-12-04T06:59:50Z");
    add(
        &mut engine,
        json!({"name": "morning", "triggers": [{"trigger": "cron", "cron": "0 7 * * 1-5"}],
               "actions": [{"action": "command", "device": "blinds", "command": "on"}]}),
        friday,
    );
    engine.take_effects();
    assert_eq!(engine.next_wakeup(), Some(at("2026-12-04T07:00:00Z")));
    engine.tick(at("2026-12-04T06:59:59Z"));
    assert!(commands(&mut engine).is_empty());
    engine.tick(at("2026-12-04T07:00:00Z"));
    let fired = commands(&mut engine);
    assert_eq!(fired.len(), 1);
    // Not on Saturday or Sunday: next on Monday.
    assert_eq!(engine.status("morning").unwrap()["next"], at("2026-12-07T07:00:00Z"));
    engine.done(fired[0].0, Ok(json!({})), at("2026-12-04T07:00:01Z"));
    assert_eq!(engine.next_wakeup(), Some(at("2026-12-07T07:00:00Z")));
}

#[test]
fn conditions_are_recorded_with_their_values_and_a_failing_one_skips_the_run() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "night-light",
               "triggers": [{"trigger": "event", "category": "event.device.statechanged", "match": {"uuid": "motion"}}],
               "conditions": [
                   {"condition": "time", "after": "22:00", "before": "06:00"},
                   {"condition": "trigger", "field": "data.data.level", "op": "eq", "value": 255},
                   {"condition": "script", "lua": "return true"}],
               "actions": [{"action": "command", "device": "lamp", "command": "on"}]}),
        0.0,
    );
    engine.take_effects();
    let motion = json!({"uuid": "motion", "data": {"level": 255}});
    // 23:30 UTC: night; the other device's event does not match.
    let night = 23.0 * 3600.0 + 1800.0;
    engine.event(
        "event.device.statechanged",
        &json!({"uuid": "door", "data": {"level": 255}}),
        night,
    );
    assert!(engine.take_effects().is_empty());
    engine.event("event.device.statechanged", &motion, night);
    assert_eq!(commands(&mut engine).len(), 1);
    // Noon: the time condition fails; the run is recorded as skipped.
    engine.stop("night-light", night + 1.0);
    engine.take_effects();
    engine.event("event.device.statechanged", &motion, 12.0 * 3600.0);
    let effects = engine.take_effects();
    let record = &records(&effects)[0];
    assert_eq!(record["result"], "skipped");
    assert_eq!(record["conditions"][0]["passed"], false);
    assert_eq!(record["conditions"][0]["value"], "Thu 12:00:00");
    assert_eq!(engine.counters().runs_skipped, 1);
}

#[test]
fn a_failed_command_fails_the_run_and_a_late_answer_is_ignored() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "two", "actions": [
            {"action": "command", "device": "a", "command": "on"},
            {"action": "command", "device": "b", "command": "on"}]}),
        0.0,
    );
    engine.take_effects();
    engine.run_by_hand("two", 1.0).unwrap();
    let first = commands(&mut engine);
    engine.done(first[0].0, Err("error.device.invalid: gone".into()), 2.0);
    let effects = engine.take_effects();
    assert!(commands(&mut engine).is_empty(), "the second command is never sent");
    let record = &records(&effects)[0];
    assert_eq!(record["result"], "failed");
    assert_eq!(record["error"], "action 0 failed: error.device.invalid: gone");
    assert_eq!(
        engine.status("two").unwrap()["last_result"],
        "failed: action 0 failed: error.device.invalid: gone"
    );
    engine.done(first[0].0, Ok(json!({})), 3.0);
    assert!(engine.take_effects().is_empty());
}

#[test]
fn a_wait_goes_on_when_its_condition_holds_and_fails_at_its_timeout() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "door", "actions": [
            {"action": "wait", "timeout": 30, "until": {"condition": "state", "key": "/door", "op": "eq", "value": "closed"}},
            {"action": "log", "message": "closed"}]}),
        0.0,
    );
    engine.run_by_hand("door", 0.0).unwrap();
    engine.state("/door", clone_value(json!("open")), 5.0);
    assert_eq!(engine.running("door"), 1);
    engine.state("/door", clone_value(json!("closed")), 6.0);
    assert_eq!(records(&engine.take_effects())[0]["result"], "ok");
    engine.state("/door", clone_value(json!("open")), 7.0);
    engine.run_by_hand("door", 10.0).unwrap();
    assert_eq!(engine.next_wakeup(), Some(40.0));
    engine.tick(40.0);
    let record = &records(&engine.take_effects())[0];
    assert_eq!(record["result"], "failed");
    assert_eq!(record["error"], "action 0 failed: the wait timed out");
}

#[test]
fn a_value_held_for_a_while_fires_once_and_leaving_the_range_cancels_it() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "cold", "triggers": [{"trigger": "value", "device": "thermo", "quantity": "temperature", "below": 18, "for": 60}],
               "actions": [{"action": "command", "device": "heater", "command": "on"}]}),
        0.0,
    );
    temperature(&mut engine, 20.0, 0.0);
    temperature(&mut engine, 17.0, 10.0);
    temperature(&mut engine, 19.0, 40.0);
    engine.tick(70.0);
    assert!(commands(&mut engine).is_empty(), "it left the range before a minute");
    temperature(&mut engine, 17.0, 100.0);
    assert_eq!(engine.next_wakeup(), Some(160.0));
    engine.tick(160.0);
    assert_eq!(commands(&mut engine).len(), 1);
}

#[test]
fn stop_run_and_changes_stop_runs_and_say_so_in_the_live_state() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "long", "actions": [{"action": "delay", "seconds": 100}]}),
        0.0,
    );
    add(
        &mut engine,
        json!({"name": "boss", "actions": [{"action": "run", "scenario": "long"}, {"action": "stop", "scenario": "long"}]}),
        0.0,
    );
    engine.take_effects();
    engine.run_by_hand("boss", 1.0).unwrap();
    let effects = engine.take_effects();
    let ended = records(&effects);
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(ended[0]["scenario"], "long");
    assert_eq!(ended[0]["error"], "stopped by another scenario");
    assert_eq!(ended[1]["scenario"], "boss");
    assert!(effects.contains(&Effect::Live {
        name: "long".into(),
        field: "last_result",
        value: json!("stopped: stopped by another scenario"),
    }));
    engine.run_by_hand("long", 2.0).unwrap();
    engine.set_enabled("long", false, 3.0);
    assert_eq!(engine.running("long"), 0);
    assert_eq!(engine.counters().runs_stopped, 2);
    assert!(engine.run_by_hand("missing", 4.0).is_err());
}

#[test]
fn a_changed_condition_compares_with_the_value_before_the_last_change() {
    let mut engine = engine();
    // Known before the scenario exists: nothing has changed yet for it.
    engine.state("/mode", clone_value(json!("home")), 0.0);
    add(
        &mut engine,
        json!({"name": "moved", "triggers": [{"trigger": "event", "category": "go"}],
               "conditions": [{"condition": "state", "key": "/mode", "op": "changed", "value": null}],
               "actions": [{"action": "log", "message": "it moved"}]}),
        0.0,
    );
    engine.event("go", &json!({}), 1.0);
    assert_eq!(records(&engine.take_effects())[0]["result"], "skipped");
    engine.state("/mode", clone_value(json!("away")), 2.0);
    engine.event("go", &json!({}), 3.0);
    assert_eq!(records(&engine.take_effects())[0]["result"], "ok");
    // The same value again: the last change is no change.
    engine.state("/mode", clone_value(json!("away")), 4.0);
    engine.event("go", &json!({}), 5.0);
    assert_eq!(records(&engine.take_effects())[0]["result"], "skipped");
}

#[test]
fn a_value_that_is_not_json_reads_as_a_string() {
    let mut engine = engine();
    engine.state("/note", Some(Bytes::from_static(b"plain words")), 0.0);
    assert_eq!(engine.value("/note"), Some(json!("plain words")));
    engine.state("/note", None, 1.0);
    assert_eq!(engine.value("/note"), None);
}

#[test]
fn a_scenario_that_runs_itself_does_not_loop_for_ever() {
    for mode in ["single", "restart", "queued", "parallel"] {
        let mut engine = engine();
        add(
            &mut engine,
            json!({"name": "again", "mode": mode, "max_runs": 10,
                   "actions": [{"action": "run", "scenario": "again"}, {"action": "log", "message": "after"}]}),
            0.0,
        );
        engine.run_by_hand("again", 0.0).unwrap();
        for step in 1..200 {
            engine.tick(step as f64);
        }
        let effects = engine.take_effects();
        assert!(
            records(&effects).len() < 1000,
            "{mode}: {} runs",
            records(&effects).len()
        );
    }
    // The chain is cut with a reason that says what to do.
    let mut chain = engine();
    add(
        &mut chain,
        json!({"name": "again", "mode": "queued", "max_runs": 100,
               "actions": [{"action": "run", "scenario": "again"}]}),
        0.0,
    );
    chain.run_by_hand("again", 0.0).unwrap();
    let runs = records(&chain.take_effects());
    assert_eq!(runs.len() as u64, MAX_CHAIN + 1, "{runs:?}");
    let last = runs.last().unwrap();
    assert_eq!(last["result"], "failed");
    assert!(
        last.to_string().contains("started each other with no time passing"),
        "{last}"
    );
    // With time between them, a scenario may run itself for as long as it
    // is left to.
    let mut blinking = engine();
    add(
        &mut blinking,
        json!({"name": "blink", "mode": "restart",
               "actions": [{"action": "delay", "seconds": 1}, {"action": "run", "scenario": "blink"}]}),
        0.0,
    );
    blinking.run_by_hand("blink", 0.0).unwrap();
    for second in 1..=40 {
        blinking.tick(second as f64);
    }
    let runs = records(&blinking.take_effects());
    assert!(runs.len() >= 39, "{} runs", runs.len());
    assert!(runs.iter().all(|r| r["result"] == "stopped"), "{runs:?}");
    assert_eq!(blinking.running("blink"), 1);
}

#[test]
fn a_scenario_fired_by_its_own_publish_is_throttled_not_run_for_ever() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "echo", "mode": "parallel", "max_runs": 100,
               "triggers": [{"trigger": "event", "category": "echo.again"}],
               "actions": [{"action": "publish", "category": "echo.again", "data": {}}]}),
        0.0,
    );
    // The bus brings each publish back as an event, 1 ms later.
    let mut now = 0.0;
    let mut published = 0;
    engine.event("echo.again", &json!({}), now);
    for _ in 0..5000 {
        let effects = engine.take_effects();
        let mut publishes = 0;
        for effect in &effects {
            if let Effect::Publish { run, .. } = effect {
                publishes += 1;
                engine.done(*run, Ok(Value::Null), now);
            }
        }
        if publishes == 0 {
            break;
        }
        published += publishes;
        now += 0.001;
        for _ in 0..publishes {
            engine.event("echo.again", &json!({}), now);
        }
    }
    // 1,000 at once, and 100 a second on top (about 0.1 per step of 1 ms):
    // then the loop is cut.
    assert!((1000..1200).contains(&published), "{published} publishes");
    assert!(engine.counters().throttled >= 1);
    // It fires again once it has slowed down.
    engine.take_effects();
    engine.event("echo.again", &json!({}), now + 60.0);
    assert!(engine
        .take_effects()
        .iter()
        .any(|e| matches!(e, Effect::Publish { .. })));
}

#[test]
fn a_wait_for_a_time_of_day_goes_on_at_that_time_with_nothing_else_happening() {
    let mut engine = engine();
    add(
        &mut engine,
        json!({"name": "morning", "actions": [
            {"action": "wait", "timeout": 86400, "until": {"condition": "time", "after": "07:00"}},
            {"action": "log", "message": "it is seven"}]}),
        0.0,
    );
    // 1970-01-01 06:59:00 UTC (the engine's zone in these tests).
    let start = 6.0 * 3600.0 + 59.0 * 60.0;
    engine.run_by_hand("morning", start).unwrap();
    engine.take_effects();
    assert_eq!(engine.running("morning"), 1);
    // Nothing changes in Clone; the engine is only woken by its timers.
    let mut now = start;
    while now < start + 120.0 {
        now = engine.next_wakeup().unwrap_or(now + 1.0).min(now + 1.0).max(now + 0.25);
        engine.tick(now);
    }
    let runs = records(&engine.take_effects());
    assert_eq!(runs.len(), 1, "the wait went on at seven: {runs:?}");
    assert_eq!(runs[0]["result"], "ok");
}
