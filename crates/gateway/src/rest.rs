//! REST under `/api/`: each route one bus call (or a Clone snapshot),
//! as the same caller the JSON-RPC and WebSocket see; errors as the HTTP
//! status that fits plus `{"error": {"code", "message"}}`. The routes and
//! their bodies are listed once, in [`ROUTES`], from which `openapi.rs`
//! writes `/api/openapi.json`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error;
use crate::jsonrpc::{code, RpcError};
use crate::rpc::{self, Caller, Context};

/// How long a REST call waits for the bus.
const WAIT: Duration = Duration::from_secs(10);

/// `POST /api/devices/{uuid}/command`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct CommandBody {
    /// A command of the device's type (`on`, `off`, `setlevel`, …).
    #[schemars(length(min = 1, max = 256))]
    pub command: String,
    /// Its parameters (`{"level": 40}`).
    #[serde(default)]
    pub data: Map<String, Value>,
}

/// `GET /api/state`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct StateQuery {
    /// A Clone subtree (`/device/`); none: every key.
    #[serde(default)]
    #[schemars(regex(pattern = r"^(/[ -~]*)?$"), length(max = 1024))]
    pub prefix: String,
}

/// `GET /api/history/{uuid}/{quantity}`: the last 100 values, or a period
/// (`from`, `to`: unix seconds) in buckets of `bucket` seconds.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
pub struct HistoryParams {
    #[schemars(range(min = 0.0))]
    pub from: Option<f64>,
    #[schemars(range(min = 0.0))]
    pub to: Option<f64>,
    /// Seconds per bucket, at least one.
    #[schemars(range(min = 1.0))]
    pub bucket: Option<f64>,
    #[schemars(range(min = 1, max = 100_000))]
    pub last: Option<u64>,
}

/// `PUT /api/config/{name}`: the keys to set, at least one.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[schemars(extend("minProperties" = 1))]
pub struct ConfigValues(pub Map<String, Value>);

/// `GET /api/state`'s answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StateSnapshot {
    pub prefix: String,
    /// The state's sequence number the keys are consistent with.
    pub sequence: i64,
    /// Each key's value: JSON when it reads as JSON, else the text.
    pub keys: BTreeMap<String, Value>,
}

/// Every error answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// One route, for the router and the OpenAPI document.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The request body's type, by name in [`schemas`].
    pub body: Option<&'static str>,
    /// The query's type.
    pub query: Option<&'static str>,
    /// The success answer's type (`None`: any JSON).
    pub answer: Option<&'static str>,
}

/// Every REST route.
pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/api/status",
        summary: "What `majordome status` shows",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/clients",
        summary: "The clients (plugins) the manager knows, by id",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/devices",
        summary: "Every device",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/devices/{uuid}",
        summary: "One device",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "post",
        path: "/api/devices/{uuid}/command",
        summary: "Send a command to a device; its result",
        body: Some("CommandBody"),
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/state",
        summary: "Clone keys under a prefix",
        body: None,
        query: Some("StateQuery"),
        answer: Some("StateSnapshot"),
    },
    Route {
        method: "get",
        path: "/api/history/{uuid}/{quantity}",
        summary: "Stored values of a device's quantity",
        body: None,
        query: Some("HistoryParams"),
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/config/{name}",
        summary: "A plugin's configuration (this host's)",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "put",
        path: "/api/config/{name}",
        summary: "Set keys of a plugin's configuration: {key: value, …}",
        body: Some("ConfigValues"),
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/scenarios",
        summary: "The scenarios",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "post",
        path: "/api/scenarios",
        summary: "Make a scenario",
        body: Some("Scenario"),
        query: None,
        answer: None,
    },
    Route {
        method: "get",
        path: "/api/scenarios/{name}",
        summary: "One scenario",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "put",
        path: "/api/scenarios/{name}",
        summary: "Replace a scenario",
        body: Some("Scenario"),
        query: None,
        answer: None,
    },
    Route {
        method: "delete",
        path: "/api/scenarios/{name}",
        summary: "Delete a scenario",
        body: None,
        query: None,
        answer: None,
    },
    Route {
        method: "post",
        path: "/api/scenarios/{name}/run",
        summary: "Run a scenario now",
        body: None,
        query: None,
        answer: None,
    },
];

/// The REST routes, on `context`.
pub fn router() -> Router<Arc<Context>> {
    Router::new()
        .route("/api/clients", get(clients))
        .route("/api/devices", get(devices))
        .route("/api/devices/{uuid}", get(device))
        .route("/api/devices/{uuid}/command", post(command))
        .route("/api/state", get(state))
        .route("/api/history/{uuid}/{quantity}", get(history))
        .route("/api/config/{name}", get(config_get).put(config_set))
        .route("/api/scenarios", get(scenarios).post(scenario_new))
        .route(
            "/api/scenarios/{name}",
            get(scenario_get).put(scenario_update).delete(scenario_delete),
        )
        .route("/api/scenarios/{name}/run", post(scenario_run))
}

/// A bus error as an HTTP answer.
fn rest_error(failure: RpcError) -> Response {
    let status = match (failure.code, failure.identifier.as_deref()) {
        (code::INVALID_PARAMS, _) => StatusCode::BAD_REQUEST,
        (_, Some("error.forbidden")) => StatusCode::FORBIDDEN,
        (_, Some("error.device.invalid" | "error.not.found" | "error.not_found")) => StatusCode::NOT_FOUND,
        (_, Some("error.exists")) => StatusCode::CONFLICT,
        (_, Some("error.no_worker" | "error.evicted")) => StatusCode::SERVICE_UNAVAILABLE,
        (_, Some("error.no.reply" | "error.no_answer")) => StatusCode::GATEWAY_TIMEOUT,
        // The service refused the request (a bad value, a bad name).
        _ => StatusCode::BAD_REQUEST,
    };
    let code = failure
        .identifier
        .as_deref()
        .map(|id| id.trim_start_matches("error.").replace('.', "_"))
        .unwrap_or_else(|| "bad_request".to_owned());
    error(status, &code, &failure.message)
}

fn answer(outcome: Result<Value, RpcError>) -> Response {
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(e) => rest_error(e),
    }
}

/// `service`/`action` with `data`, as `caller`.
async fn bus(context: &Context, caller: &Caller, service: &str, action: &str, data: Value) -> Result<Value, RpcError> {
    rpc::call(&context.bus, caller, service, action, data, WAIT).await
}

async fn clients(State(context): State<Arc<Context>>, caller: Caller) -> Response {
    answer(bus(&context, &caller, "manager", "client.list.get", json!({})).await)
}

async fn devices(State(context): State<Arc<Context>>, caller: Caller) -> Response {
    answer(bus(&context, &caller, "devices", "devices.get", json!({})).await)
}

async fn device(State(context): State<Arc<Context>>, caller: Caller, Path(uuid): Path<String>) -> Response {
    match bus(&context, &caller, "devices", "device.get", json!({"uuid": uuid})).await {
        Ok(found) => match found["devices"].as_array().and_then(|d| d.first()) {
            Some(device) => Json(device.clone()).into_response(),
            None => error(StatusCode::NOT_FOUND, "device_invalid", &format!("no device {uuid}")),
        },
        Err(e) => rest_error(e),
    }
}

async fn command(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(uuid): Path<String>,
    body: Result<Json<CommandBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejected) => return error(StatusCode::BAD_REQUEST, "bad_body", &rejected.body_text()),
    };
    let outcome = rpc::device_command(
        &context.bus,
        &caller,
        &uuid,
        &body.command,
        Value::Object(body.data),
        WAIT,
    )
    .await;
    answer(outcome)
}

async fn state(
    State(context): State<Arc<Context>>,
    caller: Caller,
    query: Result<Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "`prefix` is a Clone subtree, e.g. /device/",
        );
    };
    if let Err(denied) = caller.may_read_prefix(&query.prefix) {
        return error(StatusCode::FORBIDDEN, "forbidden", &denied.message);
    }
    let Some(endpoint) = context.state.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_state",
            "this gateway knows no Clone server",
        );
    };
    // The Clone client is blocking and owns a libzmq socket: on a thread
    // of its own, not on the runtime's.
    let prefix = query.prefix.clone();
    let fetched =
        tokio::task::spawn_blocking(move || majordome_state::snapshot(endpoint.as_str(), &prefix, WAIT)).await;
    match fetched {
        Ok(Ok((entries, sequence))) => {
            let keys = entries
                .into_iter()
                .map(|kv| {
                    let value = majordome_state::json_value(&kv.value);
                    (kv.key, value)
                })
                .collect();
            Json(StateSnapshot {
                prefix: query.prefix,
                sequence,
                keys,
            })
            .into_response()
        }
        Ok(Err(majordome_state::StateError::InvalidKey { reason, .. })) => error(
            StatusCode::BAD_REQUEST,
            "bad_prefix",
            &format!("the prefix is not a subtree: {reason}"),
        ),
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, "state_unreachable", &e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the snapshot failed"),
    }
}

async fn history(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path((uuid, quantity)): Path<(String, String)>,
    query: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "from, to and bucket are numbers; last an integer",
        );
    };
    let mut data = json!({"uuid": uuid, "quantity": quantity});
    for (key, value) in [("from", params.from), ("to", params.to), ("bucket", params.bucket)] {
        if let Some(value) = value {
            data[key] = value.into();
        }
    }
    if let Some(last) = params.last {
        data["last"] = last.into();
    }
    answer(bus(&context, &caller, "history", "history.get", data).await)
}

async fn config_get(State(context): State<Arc<Context>>, caller: Caller, Path(name): Path<String>) -> Response {
    let target = json!({"type": "plugin", "name": name, "host": context.host});
    answer(bus(&context, &caller, "config", "config.get", target).await)
}

async fn config_set(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Json<ConfigValues>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(ConfigValues(values))) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the body is a JSON object: {key: value, …}",
        );
    };
    if values.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_body", "no key to set");
    }
    let request = json!({"type": "plugin", "name": name, "host": context.host, "data": values});
    answer(bus(&context, &caller, "config", "config.set", request).await)
}

/// A call to the scenario service; 503 at once when it does not run.
async fn scenario(context: &Context, caller: &Caller, action: &str, data: Value) -> Response {
    let present = context
        .bus
        .request("mmi.service", vec![bytes::Bytes::from_static(b"scenario")], WAIT)
        .await;
    if !matches!(present.as_deref(), Ok([status]) if status.as_ref() == b"200") {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_worker",
            "the scenario service does not run on this hub",
        );
    }
    answer(bus(context, caller, "scenario", action, data).await)
}

async fn scenarios(State(context): State<Arc<Context>>, caller: Caller) -> Response {
    scenario(&context, &caller, "scenario.list.get", json!({})).await
}

/// A JSON object body, or why it is not one (answered 400).
fn object_body(body: Result<Json<Value>, JsonRejection>) -> Result<Value, String> {
    match body {
        Ok(Json(value @ Value::Object(_))) => Ok(value),
        Ok(_) => Err("the body is a JSON object".to_owned()),
        Err(rejected) => Err(rejected.body_text()),
    }
}

async fn scenario_new(
    State(context): State<Arc<Context>>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    match object_body(body) {
        Ok(body) => scenario(&context, &caller, "scenario.new.do", json!({"scenario": body})).await,
        Err(why) => error(StatusCode::BAD_REQUEST, "bad_body", &why),
    }
}

async fn scenario_get(State(context): State<Arc<Context>>, caller: Caller, Path(name): Path<String>) -> Response {
    scenario(&context, &caller, "scenario.get", json!({"name": name})).await
}

async fn scenario_update(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let mut body = match object_body(body) {
        Ok(body) => body,
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad_body", &why),
    };
    body["name"] = name.into();
    scenario(&context, &caller, "scenario.update.do", json!({"scenario": body})).await
}

async fn scenario_delete(State(context): State<Arc<Context>>, caller: Caller, Path(name): Path<String>) -> Response {
    scenario(&context, &caller, "scenario.delete.do", json!({"name": name})).await
}

async fn scenario_run(State(context): State<Arc<Context>>, caller: Caller, Path(name): Path<String>) -> Response {
    scenario(&context, &caller, "scenario.run.do", json!({"name": name})).await
}
