//! `majordome scenario …`: each subcommand one request to the `scenario`
//! service, its answer printed for people (or as JSON where it is data).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use majordome_client::{Client, ClientOptions, Message};
use serde_json::{json, Value};

use crate::cli::ScenarioAction;

pub fn run(action: ScenarioAction, broker: &str) -> Result<ExitCode> {
    let mut client = Client::new(broker, ClientOptions::default());
    let mut ask = |action: &str, data: Value| -> Result<Value> {
        let reply = client
            .request_message("scenario", &Message::new(action, data))
            .with_context(|| format!("the scenario service at {broker} did not answer"))?;
        if reply.status() == Some(false) {
            bail!("{}", reply.reason().unwrap_or("the scenario service refused"));
        }
        Ok(reply.data)
    };
    match action {
        ScenarioAction::List => print!("{}", render_list(&ask("scenario.list.get", json!({}))?["scenarios"])),
        ScenarioAction::Show { name } => {
            let found = ask("scenario.get", json!({"name": name}))?;
            println!("{}", serde_json::to_string_pretty(&found["scenario"])?);
        }
        ScenarioAction::Run { name } => {
            ask("scenario.run.do", json!({"name": name}))?;
            println!("{name}: started (`majordome scenario history {name}` says how it went)");
        }
        ScenarioAction::Stop { name } => {
            let stopped = ask("scenario.stop.do", json!({"name": name}))?;
            println!("{name}: {} run(s) stopped", stopped["stopped"]);
        }
        ScenarioAction::Enable { name } => {
            ask("scenario.enable.do", json!({"name": name}))?;
            println!("{name}: enabled");
        }
        ScenarioAction::Disable { name } => {
            ask("scenario.disable.do", json!({"name": name}))?;
            println!("{name}: disabled");
        }
        ScenarioAction::Delete { name } => {
            ask("scenario.delete.do", json!({"name": name}))?;
            println!("{name}: deleted");
        }
        ScenarioAction::Test { name, file } => {
            let request = match (name, file) {
                (_, Some(file)) => json!({"scenario": read_json(&file)?}),
                (Some(name), None) => json!({"name": name}),
                (None, None) => bail!("give a scenario's NAME, or --file FILE with its JSON"),
            };
            print!("{}", render_test(&ask("scenario.test.do", request)?["test"]));
        }
        ScenarioAction::History { name, last, json } => {
            let history = ask("scenario.history.get", json!({"name": name, "last": last}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&history["runs"])?);
            } else {
                print!("{}", render_history(&history["runs"]));
            }
        }
        ScenarioAction::Import { file } => {
            let scenarios = match read_json(&file)? {
                Value::Object(mut object) if object.contains_key("scenarios") => object.remove("scenarios").unwrap(),
                list @ Value::Array(_) => list,
                one => json!([one]),
            };
            let imported = ask("scenario.import.do", json!({"scenarios": scenarios}))?;
            println!("imported: {}", joined(&imported["imported"]));
        }
        ScenarioAction::Export { name } => {
            let request = name.map_or(json!({}), |name| json!({"name": name}));
            let exported = ask("scenario.export.get", request)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"scenarios": exported["scenarios"]}))?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_json(file: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

fn joined(list: &Value) -> String {
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    names.join(", ")
}

/// A unix time as the hub's clock shows it.
fn clock(time: &Value) -> String {
    time.as_f64()
        .and_then(|t| jiff::Timestamp::from_second(t as i64).ok())
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

fn render_list(scenarios: &Value) -> String {
    let list = scenarios.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no scenario yet: `majordome scenario import FILE` adds some\n".into();
    }
    let width = list
        .iter()
        .filter_map(|s| s["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:width$}  ENABLED  MODE      TRIGGERS  RUNNING  LAST RUN             RESULT\n",
        "NAME"
    );
    for s in &list {
        let kinds: Vec<&str> = s["triggers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["trigger"].as_str())
            .collect();
        out += &format!(
            "{:width$}  {:<7}  {:<8}  {:<8}  {:<7}  {:<19}  {}\n",
            s["name"].as_str().unwrap_or("?"),
            if s["enabled"] == true { "yes" } else { "no" },
            s["mode"].as_str().unwrap_or("?"),
            if kinds.is_empty() {
                "by hand".to_owned()
            } else {
                kinds.join(",")
            },
            s["status"]["running"],
            clock(&s["status"]["last_run"]),
            s["status"]["last_result"].as_str().unwrap_or("-"),
        );
    }
    out
}

fn render_test(test: &Value) -> String {
    let mut out = format!(
        "would run: {} ({})\n",
        if test["would_run"] == true { "yes" } else { "no" },
        test["because"].as_str().unwrap_or("")
    );
    if test["enabled"] == false {
        out += "it is disabled: no trigger starts it\n";
    }
    for trigger in test["triggers"].as_array().into_iter().flatten() {
        out += &format!("trigger {}", trigger["trigger"]);
        if !trigger["next"].is_null() {
            out += &format!(", next at {}", clock(&trigger["next"]));
        }
        if !trigger["value"].is_null() {
            out += &format!(", value now {} (in range: {})", trigger["value"], trigger["in_range"]);
        }
        out += "\n";
    }
    for condition in test["conditions"].as_array().into_iter().flatten() {
        out += &format!(
            "condition {}: {} (value {})\n",
            condition["condition"],
            if condition["passed"] == true {
                "holds"
            } else {
                "does not hold"
            },
            condition["value"]
        );
    }
    for (index, action) in test["actions"].as_array().into_iter().flatten().enumerate() {
        out += &format!("action {index}: {action}\n");
    }
    out
}

fn render_history(runs: &Value) -> String {
    let runs = runs.as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        return "no run yet\n".into();
    }
    let mut out = String::new();
    for run in runs {
        let trigger = run["trigger"]["trigger"].as_str().unwrap_or("?");
        out += &format!(
            "{}  {:<8} {:>7.3} s  by {}{}\n",
            clock(&run["started"]),
            run["result"].as_str().unwrap_or("?"),
            run["duration"].as_f64().unwrap_or(0.0),
            trigger,
            run["error"].as_str().map(|e| format!("  ({e})")).unwrap_or_default(),
        );
        for action in run["actions"].as_array().into_iter().flatten() {
            let outcome = match action.get("error") {
                Some(error) => format!("error: {}", error.as_str().unwrap_or("?")),
                None => format!("{}", action["result"]),
            };
            out += &format!(
                "    {} {}: {outcome}\n",
                action["index"],
                action["action"].as_str().unwrap_or("?")
            );
        }
    }
    out
}
