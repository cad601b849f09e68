//! The HTTP gateway: a client of the bus like any other. It keeps no state
//! of its own and reaches the services only through the bus, with one
//! [`AsyncClient`] (whose I/O thread owns the libzmq socket: the async code
//! here sees only its futures). One thread runs a single-threaded tokio
//! runtime with axum on it.
//!
//! Routes so far: `POST /jsonrpc` (agorpc's JSON-RPC 2.0: [`jsonrpc`],
//! [`rpc`]), `GET /metrics` (Prometheus: [`metrics`]) and `GET
//! /api/status`. Any other path answers 404 with `{"error": {"code",
//! "message"}}`.

pub mod jsonrpc;
pub mod metrics;
pub mod rpc;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use majordome_client::{AsyncClient, ClientError};
use majordome_mdp::domogik::Message;
use majordome_net::Shutdown;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use jsonrpc::{Body, RpcError};

/// The default address: loopback, port 40406.
pub const DEFAULT_BIND: &str = "127.0.0.1:40406";

/// The gateway's settings (`[http]` in `majordome.toml`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where it listens, `HOST:PORT` (port 0: a free one).
    pub bind: String,
    /// The largest request body; a larger one gets 413.
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: DEFAULT_BIND.into(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] ClientError),
}

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    listener: std::net::TcpListener,
    address: SocketAddr,
    broker: String,
    settings: Settings,
}

impl Gateway {
    /// Listens on `settings.bind`; requests will reach the bus through the
    /// broker at `broker`.
    pub fn bind(broker: &str, settings: Settings) -> Result<Gateway, GatewayError> {
        let bind_error = |source| GatewayError::Bind {
            address: settings.bind.clone(),
            source,
        };
        let listener = std::net::TcpListener::bind(&settings.bind).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        Ok(Gateway {
            listener,
            address,
            broker: broker.to_owned(),
            settings,
        })
    }

    /// Where it listens, with the real port.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` fires.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), GatewayError> {
        let bus = Arc::new(AsyncClient::connect(&self.broker)?);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stop = shutdown.watcher()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(self.listener)?;
            let app = router(bus, &self.settings);
            tracing::info!(address = %self.address, "HTTP gateway serving");
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Readable once the hub is told to stop; an error is as
                    // good as a stop.
                    if let Ok(stop) = tokio::net::UnixStream::from_std(stop) {
                        let _ = stop.readable().await;
                    }
                })
                .await
        })?;
        Ok(())
    }
}

fn router(bus: Arc<AsyncClient>, settings: &Settings) -> Router {
    Router::new()
        .route("/jsonrpc", post(jsonrpc_handler))
        .route("/metrics", get(metrics_handler))
        .route("/api/status", get(status_handler))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(bus)
}

/// An HTTP error in the REST shape.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn jsonrpc_handler(State(bus): State<Arc<AsyncClient>>, body: Bytes) -> Response {
    let answer = match jsonrpc::parse(&body) {
        Body::Broken(e) => Some(jsonrpc::response(Value::Null, Err(e))),
        Body::Single(call) => answer(&bus, call).await,
        Body::Batch(calls) => {
            let mut tasks = JoinSet::new();
            for (index, call) in calls.into_iter().enumerate() {
                let bus = bus.clone();
                tasks.spawn(async move { (index, answer(&bus, call).await) });
            }
            let mut answers: Vec<(usize, Value)> = Vec::new();
            while let Some(done) = tasks.join_next().await {
                if let Ok((index, Some(value))) = done {
                    answers.push((index, value));
                }
            }
            answers.sort_by_key(|(index, _)| *index);
            // A batch of notifications only is answered with nothing.
            (!answers.is_empty()).then(|| Value::Array(answers.into_iter().map(|(_, v)| v).collect()))
        }
    };
    match answer {
        Some(value) => Json(value).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// The response to one entry of a body; `None` for a notification.
async fn answer(bus: &Arc<AsyncClient>, call: Result<jsonrpc::Call, (Value, RpcError)>) -> Option<Value> {
    match call {
        Err((id, e)) => Some(jsonrpc::response(id, Err(e))),
        Ok(call) => {
            let outcome = rpc::run(bus, &call).await;
            call.id.map(|id| jsonrpc::response(id, outcome))
        }
    }
}

async fn metrics_handler(State(bus): State<Arc<AsyncClient>>) -> Response {
    let text = metrics::scrape(&bus).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// What `majordome status` shows, as JSON: the broker's statistics, each
/// part's `stats.get`, and the manager's clients; `null` for a part that
/// did not answer.
async fn status_handler(State(bus): State<Arc<AsyncClient>>) -> Response {
    let wait = std::time::Duration::from_secs(2);
    let broker = match bus.request("mmi.stats", Vec::new(), wait).await {
        Ok(reply) => reply
            .first()
            .and_then(|f| serde_json::from_slice::<Value>(f).ok())
            .unwrap_or(Value::Null),
        Err(e) => return error(StatusCode::BAD_GATEWAY, "bus_unreachable", &e.to_string()),
    };
    let mut status = json!({"broker": broker});
    for (part, service, action) in [
        ("events", "events", "stats.get"),
        ("state", "state", "stats.get"),
        ("devices", "devices", "stats.get"),
        ("history", "history", "stats.get"),
        ("clients", "manager", "client.list.get"),
    ] {
        let asked = Message::new(action, json!({}));
        status[part] = match bus.request_message(service, &asked, wait).await {
            Ok(reply) if reply.data.get("status") != Some(&Value::Bool(false)) => reply.data,
            _ => Value::Null,
        };
    }
    Json(status).into_response()
}
