//! `GET /api/websocket`: Home Assistant's WebSocket shape. The server says
//! `auth_required`; the client answers `{"type": "auth", "access_token"}`
//! (always a token, as Home Assistant asks); then `auth_ok`, or
//! `auth_invalid` and the connection closes. After that, numbered
//! commands: `subscribe_events`, `unsubscribe_events`, `get_states`,
//! `call_service` (a device command), `call` (any service), `ping`.
//!
//! What goes out to one client waits in a bounded queue; a client that
//! does not drain it (it does not read) is closed with a reason that says
//! so, instead of growing the hub. A burst of events waits for room (up
//! to a few seconds, in the gateway's bounded broadcast).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::jsonrpc::RpcError;
use crate::rpc::{self, Caller, Context};

/// Messages that may wait for one client before it is closed.
pub const QUEUE: usize = 256;

/// How long a client has to authenticate, and the longest command.
const AUTH_WAIT: Duration = Duration::from_secs(10);
const COMMAND_WAIT: Duration = Duration::from_secs(10);

/// How often a session's token is checked again while no command comes
/// (each command checks it too): a revoked token ends its sessions.
const RECHECK: Duration = Duration::from_secs(2);

/// How long one message may take to go out before the client is taken
/// for gone (it reads nothing at all).
const SEND_WAIT: Duration = Duration::from_secs(30);

/// How long events may wait for room in a client's queue before the
/// client is taken for too slow. Meanwhile the events wait in the
/// gateway's broadcast (bounded too: beyond it, the client is told how
/// many it lost).
const SLOW_AFTER: Duration = Duration::from_secs(5);

/// WebSocket clients connected now, and those closed for not keeping up
/// (for `/metrics`).
pub static CONNECTED: AtomicU64 = AtomicU64::new(0);
pub static CLOSED_SLOW: AtomicU64 = AtomicU64::new(0);

/// Event subscriptions one client may hold, and commands it may have in
/// flight at once (more wait: the connection is not read meanwhile).
const MAX_SUBSCRIPTIONS: usize = 16;
const COMMANDS_AT_ONCE: usize = 16;

type Subscriptions = Arc<std::sync::Mutex<HashMap<u64, JoinHandle<()>>>>;

/// Raised when a client's queue is full: the connection then closes.
#[derive(Default)]
struct Slow {
    raised: AtomicBool,
    notify: Notify,
}

/// The sending side of one client's queue.
#[derive(Clone)]
struct Out {
    queue: mpsc::Sender<Message>,
    slow: Arc<Slow>,
}

impl Out {
    /// Queues a message (an event, a reply), waiting up to [`SLOW_AFTER`]
    /// for room: a burst is not slowness, a client that does not drain
    /// its queue is. False once it is too slow, or gone.
    async fn send_waiting(&self, message: Message) -> bool {
        match tokio::time::timeout(SLOW_AFTER, self.queue.send(message)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => self.too_slow(),
        }
    }

    fn too_slow(&self) -> bool {
        if !self.slow.raised.swap(true, Ordering::Relaxed) {
            CLOSED_SLOW.fetch_add(1, Ordering::Relaxed);
        }
        self.slow.notify.notify_one();
        false
    }
}

/// The close code for a client that does not keep up (RFC 6455: "policy
/// violation"), and for a failed login.
const CLOSE_POLICY: u16 = 1008;

/// Serves one connection.
pub async fn serve(socket: WebSocket, context: Arc<Context>) {
    CONNECTED.fetch_add(1, Ordering::Relaxed);
    session(socket, context).await;
    CONNECTED.fetch_sub(1, Ordering::Relaxed);
}

async fn session(mut socket: WebSocket, context: Arc<Context>) {
    let hello = json!({"type": "auth_required", "majordome_version": env!("CARGO_PKG_VERSION")});
    if socket.send(text_message(&hello)).await.is_err() {
        return;
    }
    let Some((caller, token)) = authenticate(&mut socket, &context).await else {
        return;
    };
    let revoked = || context.access.tokens.verify(&token).is_none();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (queue, mut queued) = mpsc::channel::<Message>(QUEUE);
    let out = Out {
        queue,
        slow: Arc::default(),
    };
    let subscriptions: Subscriptions = Arc::default();
    // Each command runs as a task of its own, so that a slow one does not
    // hold up the events going out meanwhile.
    let permits = Arc::new(tokio::sync::Semaphore::new(COMMANDS_AT_ONCE));
    loop {
        if out.slow.raised.load(Ordering::Relaxed) {
            let reason = format!("too slow: {QUEUE} messages waited for this client");
            tracing::info!("closed a WebSocket client that did not keep up");
            let close = Message::Close(Some(CloseFrame {
                code: CLOSE_POLICY,
                reason: Utf8Bytes::from(reason),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
            break;
        }
        tokio::select! {
            () = out.slow.notify.notified() => {}
            _ = recheck.tick() => {
                if revoked() {
                    end_revoked(&mut socket).await;
                    break;
                }
            }
            outgoing = queued.recv() => {
                let Some(message) = outgoing else { break };
                match tokio::time::timeout(SEND_WAIT, socket.send(message)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            incoming = socket.recv() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_))) => continue,
                    _ => break,
                };
                if revoked() {
                    end_revoked(&mut socket).await;
                    break;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let (caller, context, out, subscriptions) =
                    (caller.clone(), context.clone(), out.clone(), subscriptions.clone());
                tokio::spawn(async move {
                    let reply = match serde_json::from_str::<Value>(&text) {
                        Ok(command) => handle(&command, &caller, &context, &out, &subscriptions).await,
                        Err(e) => Some(result(Value::Null, Err(("invalid_format", format!("not JSON: {e}"))))),
                    };
                    if let Some(reply) = reply {
                        out.send_waiting(text_message(&reply)).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    for (_, task) in subscriptions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain()
    {
        task.abort();
    }
}

/// Tells a client its token was revoked, and closes.
async fn end_revoked(socket: &mut WebSocket) {
    tracing::info!("closed a WebSocket session whose token was revoked");
    refuse(socket, "the token was revoked", "the token was revoked").await;
}

/// `auth_invalid` with `why`, then the close (`reason` in its frame): at
/// login, or once the token is revoked.
async fn refuse(socket: &mut WebSocket, why: &str, reason: &'static str) {
    let said = json!({"type": "auth_invalid", "message": why});
    let close = Message::Close(Some(CloseFrame {
        code: CLOSE_POLICY,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        socket.send(text_message(&said)).await?;
        socket.send(close).await
    })
    .await;
}

/// The auth phase: the caller a token stands for, and the token (checked
/// again while the session lasts); or `auth_invalid` and the end.
async fn authenticate(socket: &mut WebSocket, context: &Context) -> Option<(Caller, String)> {
    let message = match tokio::time::timeout(AUTH_WAIT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Value>(&text).ok(),
        _ => None,
    };
    let token = message
        .as_ref()
        .filter(|m| m["type"] == "auth")
        .and_then(|m| m["access_token"].as_str());
    // The WebSocket always needs a token: never a local caller.
    let caller = token.and_then(|token| crate::token_caller(&context.access, token));
    match caller {
        Some(caller) => {
            let ok = json!({"type": "auth_ok", "majordome_version": env!("CARGO_PKG_VERSION")});
            socket.send(text_message(&ok)).await.ok()?;
            Some((caller, token?.to_owned()))
        }
        None => {
            let why = if token.is_some() {
                "the token is not valid"
            } else {
                "send {\"type\": \"auth\", \"access_token\": <a token from `majordome token create`>} first"
            };
            refuse(socket, why, "authentication failed").await;
            None
        }
    }
}

/// One command; the reply, if it has one now.
async fn handle(
    command: &Value,
    caller: &Caller,
    context: &Arc<Context>,
    out: &Out,
    subscriptions: &Subscriptions,
) -> Option<Value> {
    let id = command.get("id").cloned().unwrap_or(Value::Null);
    let Some(number) = id.as_u64() else {
        return Some(result(id, Err(("invalid_format", "`id` is a positive integer".into()))));
    };
    let kind = command.get("type").and_then(Value::as_str).unwrap_or_default();
    let bus = &context.bus;
    let outcome: Result<Value, (&str, String)> = match kind {
        "ping" => return Some(json!({"id": number, "type": "pong"})),
        "subscribe_events" => {
            let prefix = command
                .get("event_type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let mut table = subscriptions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = caller.may_follow_events() {
                Err(bus_error(e))
            } else if table.len() >= MAX_SUBSCRIPTIONS && !table.contains_key(&number) {
                Err((
                    "too_many_subscriptions",
                    format!("{MAX_SUBSCRIPTIONS} subscriptions are open on this connection; unsubscribe one first"),
                ))
            } else {
                let task = forward_events(number, prefix, context, out.clone());
                if let Some(old) = table.insert(number, task) {
                    old.abort();
                }
                Ok(Value::Null)
            }
        }
        "unsubscribe_events" => match command.get("subscription").and_then(Value::as_u64) {
            Some(subscription) => {
                let removed = subscriptions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&subscription);
                match removed {
                    Some(task) => {
                        task.abort();
                        Ok(Value::Null)
                    }
                    None => Err(("not_found", format!("no subscription {subscription}"))),
                }
            }
            None => Err((
                "invalid_format",
                "`subscription` is the id of a subscribe_events".into(),
            )),
        },
        "get_states" => rpc::inventory(bus, caller, COMMAND_WAIT)
            .await
            .map(states)
            .map_err(bus_error),
        "call_service" => {
            let target = command["target"]["entity_id"].as_str();
            let service = command.get("service").and_then(Value::as_str);
            match (command["domain"].as_str(), service, target) {
                (Some("device"), Some(service), Some(uuid)) => {
                    let data = command.get("service_data").cloned().unwrap_or_else(|| json!({}));
                    rpc::device_command(bus, caller, uuid, service, data, COMMAND_WAIT)
                        .await
                        .map_err(bus_error)
                }
                _ => Err((
                    "invalid_format",
                    "call_service takes {domain: \"device\", service: <command>, service_data?, \
                     target: {entity_id: <uuid>}}"
                        .into(),
                )),
            }
        }
        "call" => {
            let field = |key: &str| command.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
            match (field("service"), field("action")) {
                (Some(service), Some(action)) => {
                    let data = command.get("data").cloned().unwrap_or_else(|| json!({}));
                    rpc::call(bus, caller, service, action, data, COMMAND_WAIT)
                        .await
                        .map_err(bus_error)
                }
                _ => Err(("invalid_format", "call takes {service, action, data?}".into())),
            }
        }
        other => Err(("unknown_command", format!("unknown command type '{other}'"))),
    };
    Some(result(json!(number), outcome))
}

/// A bus error as Home Assistant's `{code, message}`: the identifier
/// (`error.forbidden`, `error.device.invalid`) is the code.
fn bus_error(error: RpcError) -> (&'static str, String) {
    let code = match error.identifier.as_deref() {
        Some("error.forbidden") => "unauthorized",
        Some("error.device.invalid" | "error.not.found") => "not_found",
        Some("error.no.reply") => "timeout",
        _ => "home_assistant_error",
    };
    (code, error.message)
}

fn result(id: Value, outcome: Result<Value, (&str, String)>) -> Value {
    match outcome {
        Ok(value) => json!({"id": id, "type": "result", "success": true, "result": value}),
        Err((code, message)) => json!({"id": id, "type": "result", "success": false,
                                       "error": {"code": code, "message": message}}),
    }
}

/// `get_states`: one entry per device of the inventory.
fn states(inventory: Value) -> Value {
    let devices = inventory["devices"].as_object().cloned().unwrap_or_default();
    let entries: Vec<Value> = devices
        .into_iter()
        .map(|(uuid, device)| {
            json!({
                "entity_id": uuid,
                "state": device["state"],
                "attributes": {"name": device["name"], "room": device["room"], "type": device["type"],
                               "values": device["values"]},
                // When it was last heard of; a device never heard of yet,
                // since it was made.
                "last_changed": device["lastseen"].as_f64().or(device["created"].as_f64()).map(iso).unwrap_or_default(),
            })
        })
        .collect();
    Value::Array(entries)
}

/// Unix seconds as RFC 3339.
fn iso(seconds: f64) -> String {
    jiff::Timestamp::from_microsecond((seconds * 1e6) as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Sends the bus's events of `prefix` to the client as Home Assistant's
/// `event` messages, until aborted or the client falls behind.
fn forward_events(id: u64, prefix: String, context: &Context, out: Out) -> JoinHandle<()> {
    let mut events = context.subscriptions.events().subscribe();
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(event) if event.category.starts_with(&prefix) => event,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(dropped)) => {
                    let overflow = crate::events::HttpEvent::overflow(dropped);
                    let message = json!({"id": id, "type": "event", "event": {
                        "event_type": "event.overflow", "data": overflow, "time_fired": now()}});
                    if !out.send_waiting(text_message(&message)).await {
                        return;
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let message = json!({"id": id, "type": "event", "event": {
                "event_type": event.category, "data": event.content, "time_fired": now()}});
            if !out.send_waiting(text_message(&message)).await {
                return;
            }
        }
    })
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn text_message(value: &Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}
