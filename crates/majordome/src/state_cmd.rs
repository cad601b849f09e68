//! `majordome state …`: read, write and watch the Clone server's map, or
//! run the server alone.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use majordome_net::Shutdown;
use majordome_state::{Change, KvMsg, Mirror, MirrorOptions};
use serde_json::{json, Value};

use crate::cli::{ConfigArgs, DataArgs, StateAction, StateArgs, StateCommand};

pub fn run(command: StateCommand) -> Result<ExitCode> {
    match command.action {
        None => show(
            &command.endpoint,
            command.subtree.as_deref().unwrap_or(""),
            command.json,
        ),
        Some(StateAction::Set {
            key,
            value,
            ttl,
            endpoint,
            timeout,
        }) => {
            if value.is_empty() {
                bail!("an empty value deletes the key: use `majordome state delete {key}`");
            }
            let ttl = ttl.map(|seconds| seconds_arg("--ttl", seconds)).transpose()?;
            write(&endpoint, &key, value.into_bytes(), ttl, timeout)
        }
        Some(StateAction::Delete { key, endpoint, timeout }) => write(&endpoint, &key, Vec::new(), None, timeout),
        Some(StateAction::Watch {
            subtree,
            endpoint,
            json,
            count,
        }) => watch(&endpoint, subtree.as_deref().unwrap_or(""), json, count),
        Some(StateAction::Serve { config, state, data }) => serve(&config, &state, &data),
    }
}

fn seconds_arg(name: &str, seconds: f64) -> Result<Duration> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("{name} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(seconds.min(10.0 * 365.0 * 86_400.0)))
}

/// The Clone server alone.
pub fn serve(config: &ConfigArgs, state: &StateArgs, data: &DataArgs) -> Result<ExitCode> {
    let mut overrides = Vec::new();
    state.overrides(&mut overrides);
    data.overrides(&mut overrides)?;
    let loaded = crate::commands::load_config(config, &overrides)?;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    let parts = majordome_hub::Parts {
        state: true,
        ..majordome_hub::Parts::none()
    };
    let hub = crate::commands::start_hub(loaded.config, parts, &shutdown)?;
    let endpoints = &hub.endpoints().state;
    println!("majordome state listening on {}", endpoints.snapshot);
    print_endpoints(endpoints);
    println!(
        "  database                                       {}",
        hub.endpoints().database.display()
    );
    std::io::stdout().flush()?;
    crate::commands::wait_for(hub)
}

/// The three lines `up` and `state serve` print (tests read them).
pub fn print_endpoints(endpoints: &majordome_state::Endpoints) {
    println!(
        "  state: snapshots (ICANHAZ?)                    {}",
        endpoints.snapshot
    );
    println!("  state: updates (KVPUB, HUGZ)                   {}", endpoints.updates);
    println!(
        "  state: collector (KVSET)                       {}",
        endpoints.collector
    );
}

fn show(endpoint: &str, subtree: &str, as_json: bool) -> Result<ExitCode> {
    let (messages, sequence) = majordome_state::snapshot(endpoint, subtree, Duration::from_secs(5))?;
    if as_json {
        let keys: serde_json::Map<String, Value> = messages.iter().map(|m| (m.key.clone(), entry_json(m))).collect();
        println!("{}", json!({"sequence": sequence, "keys": keys}));
    } else {
        for message in &messages {
            println!("{}", line(&message.key, &message.value, &message.properties));
        }
        let what = if subtree.is_empty() {
            "in all".to_owned()
        } else {
            format!("under {subtree}")
        };
        eprintln!("{} keys {what}, at sequence {sequence}", messages.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn entry_json(message: &KvMsg) -> Value {
    let properties: serde_json::Map<String, Value> = message
        .properties
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    json!({
        "value": String::from_utf8_lossy(&message.value),
        "sequence": message.sequence,
        "properties": properties,
    })
}

/// `KEY VALUE [name=value …]`, the value as text.
fn line(key: &str, value: &[u8], properties: &[(String, String)]) -> String {
    let mut line = format!("{key} {}", String::from_utf8_lossy(value));
    if !properties.is_empty() {
        let shown: Vec<String> = properties.iter().map(|(n, v)| format!("{n}={v}")).collect();
        line.push_str(&format!("  [{}]", shown.join(" ")));
    }
    line
}

fn write(endpoint: &str, key: &str, value: Vec<u8>, ttl: Option<Duration>, timeout: f64) -> Result<ExitCode> {
    let timeout = seconds_arg("--timeout", timeout)?;
    let deleting = value.is_empty();
    let sequence = majordome_state::set_and_confirm(endpoint, key, value, ttl, timeout)?;
    let done = if deleting { "deleted" } else { "stored" };
    println!("{key} {done} at sequence {sequence}");
    Ok(ExitCode::SUCCESS)
}

fn watch(endpoint: &str, subtree: &str, as_json: bool, count: Option<u64>) -> Result<ExitCode> {
    let mut mirror = Mirror::connect(endpoint, subtree, MirrorOptions::default())?;
    let mut out = std::io::stdout().lock();
    for (key, entry) in mirror.entries() {
        if as_json {
            writeln!(
                out,
                "{}",
                json!({"key": key, "value": String::from_utf8_lossy(&entry.value), "sequence": entry.sequence, "snapshot": true})
            )?;
        } else {
            writeln!(out, "{}", line(key, &entry.value, &entry.properties))?;
        }
    }
    eprintln!(
        "{} keys, at sequence {}; watching for changes",
        mirror.len(),
        mirror.sequence()
    );
    out.flush()?;
    let mut seen = 0u64;
    let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
    while count.is_none_or(|count| seen < count) && !shutdown.is_triggered() {
        let Some(change) = mirror.next(Duration::from_millis(200))? else {
            continue;
        };
        let text = match &change {
            Change::Set {
                key,
                value,
                sequence,
                properties,
            } => {
                seen += 1;
                if as_json {
                    json!({"key": key, "value": String::from_utf8_lossy(value), "sequence": sequence}).to_string()
                } else {
                    line(key, value, properties)
                }
            }
            Change::Deleted { key, sequence } => {
                seen += 1;
                if as_json {
                    json!({"key": key, "deleted": true, "sequence": sequence}).to_string()
                } else {
                    format!("{key} (deleted)")
                }
            }
            Change::Resynced { sequence, keys } => {
                eprintln!("resynced: {keys} keys at sequence {sequence}");
                continue;
            }
            Change::Lost { reason } => {
                eprintln!("lost the state server: {reason}; retrying");
                continue;
            }
        };
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}
