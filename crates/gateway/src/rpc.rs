//! What each JSON-RPC method does, through the bus: agorpc's `message`
//! (a device command, or the inventory), `subscribe`, `getevent`,
//! `unsubscribe`, and `call` for any service.

use std::sync::Arc;
use std::time::Duration;

use majordome_client::{AsyncClient, ClientError};
use majordome_mdp::domogik::Message;
use serde_json::{json, Map, Value};

use majordome_access::{Policy, Who};

use crate::events::{SubscriptionError, Subscriptions};
use crate::jsonrpc::{code, named, Call, RpcError};

/// How long a call waits for the bus unless it says otherwise, and the
/// most it may ask for.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Who calls over HTTP.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A client on this machine without a token, where that is allowed
    /// (`[http] anonymous_loopback`): a local client, like the bus's.
    Local,
    /// A token's identity, and the policy it is held to.
    Named { identity: String, policy: Arc<Policy> },
}

impl Caller {
    /// The name subscriptions are kept under ("" for local clients).
    pub fn name(&self) -> &str {
        match self {
            Caller::Local => "",
            Caller::Named { identity, .. } => identity,
        }
    }

    /// May it read every Clone key under `prefix` (a snapshot)?
    pub fn may_read_prefix(&self, prefix: &str) -> Result<(), RpcError> {
        let Caller::Named { identity, policy } = self else {
            return Ok(());
        };
        policy.may_read_prefix(Who::Named(identity), prefix).map_err(forbidden)
    }

    /// May it follow the bus's events? They carry every device's values,
    /// so only a caller that may read every Clone key (as for the Clone
    /// updates).
    pub fn may_follow_events(&self) -> Result<(), RpcError> {
        let Caller::Named { identity, policy } = self else {
            return Ok(());
        };
        policy.may_follow_all(Who::Named(identity)).map_err(|denied| {
            forbidden(format!(
                "{denied}: events carry every device's values, so they are for identities that may read every key"
            ))
        })
    }

    /// May it call `service` with `action`? Refused as the bus refuses:
    /// -31999, `error.forbidden`.
    pub fn may_call(&self, service: &str, action: &str) -> Result<(), RpcError> {
        let Caller::Named { identity, policy } = self else {
            return Ok(());
        };
        policy
            .may_call(Who::Named(identity), service, Some(action))
            .map_err(forbidden)
    }
}

/// A refusal, as the bus refuses: -31999, `error.forbidden`.
fn forbidden(why: impl std::fmt::Display) -> RpcError {
    let mut error = RpcError::new(code::BUS_ERROR, why.to_string());
    error.identifier = Some("error.forbidden".into());
    error
}

/// What the methods work with.
pub struct Context {
    pub bus: Arc<AsyncClient>,
    pub subscriptions: Subscriptions,
    /// How long `getevent` waits for an event (agorpc: about 28 s).
    pub getevent_timeout: Duration,
    /// Who may come in.
    pub access: crate::Access,
    /// The Clone server's snapshot endpoint, when there is one.
    pub state: Option<String>,
    /// This hub's host name (the plugins' `config` is per host).
    pub host: String,
    /// Becomes true when the gateway stops: what never ends by itself
    /// (the dashboard's event streams) ends then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Carries out one call for `caller`.
pub async fn run(context: &Context, caller: &Caller, call: &Call) -> Result<Value, RpcError> {
    let params = named(&call.params)?;
    let bus = &context.bus;
    match call.method.as_str() {
        "message" => message(bus, caller, &params).await,
        "call" => call_service(bus, caller, &params).await,
        "subscribe" => {
            caller.may_follow_events()?;
            context
                .subscriptions
                .open(caller.name())
                .map(Value::from)
                .map_err(subscription_error)
        }
        "getevent" => {
            let uuid = subscription(&params)?;
            match context
                .subscriptions
                .next(uuid, caller.name(), context.getevent_timeout)
                .await
            {
                Ok(Some(event)) => Ok(event),
                Ok(None) => Err(RpcError::new(
                    code::NO_EVENT,
                    format!("no event within {} s", context.getevent_timeout.as_secs_f64()),
                )),
                Err(e) => Err(subscription_error(e)),
            }
        }
        "unsubscribe" => {
            let uuid = subscription(&params)?;
            context
                .subscriptions
                .close(uuid, caller.name())
                .map(|()| Value::from("success"))
                .map_err(subscription_error)
        }
        other => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("no method '{other}': the methods are message, subscribe, getevent, unsubscribe and call"),
        )),
    }
}

fn subscription(params: &Map<String, Value>) -> Result<&str, RpcError> {
    params
        .get("uuid")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("`uuid` is the string `subscribe` returned"))
}

fn subscription_error(error: SubscriptionError) -> RpcError {
    match error {
        SubscriptionError::Unknown => RpcError::invalid_params(
            "no such subscription (unsubscribed, or not read for long and forgotten): subscribe again",
        ),
        SubscriptionError::TooMany(max) => RpcError::new(
            code::INTERNAL_ERROR,
            format!("{max} subscriptions are open already; unsubscribe one first"),
        ),
    }
}

/// A timeout in seconds from `params[key]`, bounded.
fn timeout(params: &Map<String, Value>, key: &str) -> Result<Duration, RpcError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(DEFAULT_TIMEOUT),
        Some(value) => value
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT.as_secs_f64())
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "`{key}` is a number of seconds above 0, at most {}",
                    MAX_TIMEOUT.as_secs()
                ))
            }),
    }
}

/// agorpc's `message`: `content` is a device command (`uuid`, `command`,
/// `data` or, in the older form, parameters beside them) or
/// `{"command": "inventory"}`. The reply's `result` is passed through; its
/// `error` becomes code -31999 with the identifier.
async fn message(bus: &Arc<AsyncClient>, caller: &Caller, params: &Map<String, Value>) -> Result<Value, RpcError> {
    let wait = timeout(params, "replytimeout")?;
    let Some(Value::Object(content)) = params.get("content") else {
        return Err(RpcError::invalid_params(
            "`content` is an object: {uuid, command, data?}",
        ));
    };
    let Some(command) = content.get("command").and_then(Value::as_str) else {
        return Err(RpcError::invalid_params("`content.command` is a string"));
    };
    match content.get("uuid") {
        None if command == "inventory" => inventory(bus, caller, wait).await,
        None => Err(RpcError::invalid_params(
            "`content` needs a `uuid` (a device command), unless its command is `inventory`",
        )),
        Some(Value::String(uuid)) => {
            // Parameters beside the command (agorpc's older form) count as
            // its data.
            let data = content.get("data").cloned().unwrap_or_else(|| {
                Value::Object(
                    content
                        .iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "uuid" | "command"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            });
            device_command(bus, caller, uuid, command, data, wait).await
        }
        Some(_) => Err(RpcError::invalid_params("`content.uuid` is a string")),
    }
}

/// The devices service's inventory (ago's shape: devices by uuid, rooms,
/// schema).
pub async fn inventory(bus: &Arc<AsyncClient>, caller: &Caller, wait: Duration) -> Result<Value, RpcError> {
    caller.may_call("devices", "inventory.get")?;
    let reply = ask(bus, "devices", "inventory.get", json!({}), wait).await?;
    failed(&reply).map_or(Ok(reply.data), Err)
}

/// A device command through the devices service: its `result`.
pub async fn device_command(
    bus: &Arc<AsyncClient>,
    caller: &Caller,
    uuid: &str,
    command: &str,
    data: Value,
    wait: Duration,
) -> Result<Value, RpcError> {
    caller.may_call("devices", "device.command.do")?;
    let request = json!({"uuid": uuid, "command": command, "data": data});
    let reply = ask(bus, "devices", "device.command.do", request, wait).await?;
    if let Some(error) = failed(&reply) {
        return Err(error);
    }
    Ok(reply.data.get("result").cloned().unwrap_or(reply.data))
}

/// `call`: any service in the Domogik dialect; the reply's data is the
/// result, or the error when it says `status: false`.
async fn call_service(bus: &Arc<AsyncClient>, caller: &Caller, params: &Map<String, Value>) -> Result<Value, RpcError> {
    let text = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 255)
            .ok_or_else(|| RpcError::invalid_params(format!("`{key}` is a string of 1 to 255 bytes")))
    };
    let (service, action) = (text("service")?, text("action")?);
    let data = match params.get("data") {
        None | Some(Value::Null) => json!({}),
        Some(data @ Value::Object(_)) => data.clone(),
        Some(_) => return Err(RpcError::invalid_params("`data` is an object")),
    };
    call(bus, caller, service, action, data, timeout(params, "timeout")?).await
}

/// Any service, as `caller`.
pub async fn call(
    bus: &Arc<AsyncClient>,
    caller: &Caller,
    service: &str,
    action: &str,
    data: Value,
    wait: Duration,
) -> Result<Value, RpcError> {
    caller.may_call(service, action)?;
    let reply = ask(bus, service, action, data, wait).await?;
    failed(&reply).map_or(Ok(reply.data), Err)
}

/// One Domogik-dialect request; a bus failure is agorpc's
/// `error.no.reply`.
async fn ask(
    bus: &Arc<AsyncClient>,
    service: &str,
    action: &str,
    data: Value,
    wait: Duration,
) -> Result<Message, RpcError> {
    bus.request_message(service, &Message::new(action, data), wait)
        .await
        .map_err(|e| bus_error(&e))
}

fn bus_error(error: &ClientError) -> RpcError {
    let mut rpc = RpcError::new(code::BUS_ERROR, error.to_string());
    rpc.identifier = Some("error.no.reply".into());
    rpc
}

/// The error a reply carries: ago's `error` object, or the Domogik
/// dialect's `status: false` (its `error` word, else `error.internal`).
fn failed(reply: &Message) -> Option<RpcError> {
    if let Some(error) = reply.data.get("error").filter(|e| e.is_object()) {
        let mut rpc = RpcError::new(
            code::BUS_ERROR,
            error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the service answered with an error"),
        );
        rpc.identifier = error.get("identifier").and_then(Value::as_str).map(str::to_owned);
        rpc.data = error.get("data").cloned();
        return Some(rpc);
    }
    if reply.data.get("status") == Some(&Value::Bool(false)) {
        let reason = reply.data.get("reason").and_then(Value::as_str).unwrap_or("failed");
        let mut rpc = RpcError::new(code::BUS_ERROR, reason);
        rpc.identifier = Some(
            reply
                .data
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| "error.internal".to_owned(), |word| format!("error.{word}")),
        );
        rpc.data = Some(reply.data.clone());
        return Some(rpc);
    }
    None
}
