//! `majordome titanic …`: durable requests (RFC 9) from the command line,
//! or the Titanic service alone.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use majordome_client::{Bytes, Client, ClientOptions, Frames, Message};
use majordome_net::Shutdown;
use majordome_titanic::{client, ReplyStatus};

use crate::cli::TitanicAction;

pub fn run(action: TitanicAction) -> Result<ExitCode> {
    match action {
        TitanicAction::Request {
            service,
            args,
            raw,
            broker,
        } => {
            let body = request_body(&args, raw)?;
            let uuid = client::request(&mut connect(&broker)?, &service, body)?;
            println!("{uuid}");
            Ok(ExitCode::SUCCESS)
        }
        TitanicAction::Reply {
            uuid,
            wait,
            raw,
            broker,
        } => reply(&broker, &uuid, wait, raw),
        TitanicAction::Close { uuid, broker } => {
            client::close(&mut connect(&broker)?, &uuid)?;
            eprintln!("closed {uuid}");
            Ok(ExitCode::SUCCESS)
        }
        TitanicAction::List { json, broker } => list(&broker, json),
        TitanicAction::Serve { broker, config, data } => {
            let mut overrides = vec![majordome_hub::Override::new("listen.broker", "--broker", broker)];
            data.overrides(&mut overrides)?;
            let loaded = crate::commands::load_config(&config, &overrides)?;
            let shutdown = Shutdown::on_signals().context("cannot install signal handlers")?;
            let parts = majordome_hub::Parts {
                titanic: true,
                ..majordome_hub::Parts::none()
            };
            let hub = crate::commands::start_hub(loaded.config, parts, &shutdown)?;
            println!("majordome titanic serving on {}", hub.endpoints().broker);
            println!(
                "  database                                       {}",
                hub.endpoints().database.display()
            );
            std::io::stdout().flush()?;
            crate::commands::wait_for(hub)
        }
    }
}

fn connect(broker: &str) -> Result<Client> {
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Ok(Client::new(broker, options))
}

/// `ACTION [JSON]` as a Domogik message, or the raw frames.
fn request_body(args: &[String], raw: bool) -> Result<Frames> {
    if raw {
        return Ok(args.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect());
    }
    let (action, json) = match args {
        [action] => (action, "{}"),
        [action, json] => (action, json.as_str()),
        [] => bail!("missing ACTION: usage is `majordome titanic request SERVICE ACTION [JSON]` (or --raw FRAME...)"),
        _ => bail!("too many arguments: usage is `majordome titanic request SERVICE ACTION [JSON]`; quote the JSON"),
    };
    let data: serde_json::Value =
        serde_json::from_str(json).map_err(|e| anyhow::anyhow!("the JSON argument is not valid JSON: {e}"))?;
    if !data.is_object() {
        bail!("the JSON argument must be an object, like {{\"key\": \"value\"}}");
    }
    Ok(Message::new(action, data).to_frames())
}

fn reply(broker: &str, uuid: &str, wait: f64, raw: bool) -> Result<ExitCode> {
    if !(wait.is_finite() && wait >= 0.0) {
        bail!("--wait must be a number of seconds, 0 or more");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(wait.min(86_400.0));
    let mut client = connect(broker)?;
    loop {
        match client::reply(&mut client, uuid)? {
            ReplyStatus::Done(frames) => {
                print_reply(&frames, raw);
                return Ok(ExitCode::SUCCESS);
            }
            ReplyStatus::Unknown => bail!("no request {uuid} (never made, or closed)"),
            ReplyStatus::Pending if Instant::now() >= deadline => {
                eprintln!("pending: {uuid} has no reply yet");
                return Ok(ExitCode::from(2));
            }
            ReplyStatus::Pending => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn print_reply(frames: &[Bytes], raw: bool) {
    if !raw {
        if let Ok(message) = Message::from_frames(frames) {
            println!("{} {}", message.action, message.data);
            return;
        }
    }
    for frame in frames {
        println!("{}", String::from_utf8_lossy(frame));
    }
}

fn list(broker: &str, json: bool) -> Result<ExitCode> {
    let entries = client::list(&mut connect(broker)?)?;
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    for entry in &entries {
        let next = match entry.next_attempt {
            Some(at) if entry.state == "pending" && at > now => format!("  next attempt in {:.0} s", at - now),
            _ => String::new(),
        };
        let error = entry
            .last_error
            .as_deref()
            .map(|e| format!("  last error: {e}"))
            .unwrap_or_default();
        println!(
            "{} {:<7} {:<20} attempts {}{next}{error}",
            entry.uuid, entry.state, entry.service, entry.attempts
        );
    }
    let pending = entries.iter().filter(|e| e.state == "pending").count();
    eprintln!("{pending} pending, {} done", entries.len() - pending);
    Ok(ExitCode::SUCCESS)
}
