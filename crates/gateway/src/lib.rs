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

pub mod dashboard;
pub mod events;
pub mod jsonrpc;
pub mod metrics;
pub mod openapi;
pub mod rest;
pub mod rpc;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
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
    /// How long JSON-RPC's `getevent` waits for an event (agorpc: 28 s).
    #[serde(with = "majordome_net::duration_text")]
    pub getevent_timeout: std::time::Duration,
    /// Events a subscriber may fall behind before it is told how many it
    /// lost.
    pub event_queue: usize,
    /// JSON-RPC subscriptions open at once; one not read for
    /// `subscription_idle` is forgotten.
    pub max_subscriptions: usize,
    #[serde(with = "majordome_net::duration_text")]
    pub subscription_idle: std::time::Duration,
    /// Let clients without a token in, as local clients, when the gateway
    /// listens on loopback only (ignored on any other address, and with
    /// `loopback = "authenticated"`: then every request needs a token).
    pub anonymous_loopback: bool,
    /// HTTP connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: DEFAULT_BIND.into(),
            max_body_bytes: 1024 * 1024,
            getevent_timeout: std::time::Duration::from_secs(28),
            event_queue: 1000,
            max_subscriptions: 100,
            subscription_idle: std::time::Duration::from_secs(300),
            anonymous_loopback: true,
            max_connections: 256,
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

/// Who may come in, and what they may do.
pub struct Access {
    /// The data folder's tokens.
    pub tokens: majordome_access::tokens::TokenCheck,
    /// `[permissions]`.
    pub policy: Arc<majordome_access::Policy>,
    /// Whether a request without a token is a local client's.
    pub anonymous: bool,
}

/// Where the gateway finds the bus.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// The broker.
    pub broker: String,
    /// The forwarder's side subscribers connect to.
    pub subscribe: String,
    /// The Clone server's snapshot endpoint, if there is one.
    pub state: Option<String>,
    /// This hub's host name.
    pub host: String,
}

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    listener: std::net::TcpListener,
    address: SocketAddr,
    wiring: Wiring,
    settings: Settings,
    access: Access,
}

impl Gateway {
    /// Listens on `settings.bind`; requests will reach the bus as `wiring`
    /// says.
    pub fn bind(wiring: Wiring, settings: Settings, access: Access) -> Result<Gateway, GatewayError> {
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
            wiring,
            settings,
            access,
        })
    }

    /// Where it listens, with the real port.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` fires.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), GatewayError> {
        let bus = Arc::new(AsyncClient::connect(&self.wiring.broker)?);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stop = shutdown.watcher()?;
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        runtime.block_on(async move {
            let events = events::Events::start(&self.wiring.subscribe, self.settings.event_queue, shutdown)?;
            let context = Arc::new(rpc::Context {
                bus,
                subscriptions: events::Subscriptions::new(
                    events,
                    self.settings.max_subscriptions,
                    self.settings.subscription_idle,
                ),
                getevent_timeout: self.settings.getevent_timeout,
                access: self.access,
                state: self.wiring.state,
                host: self.wiring.host,
                stopping,
            });
            let listener = Limited {
                listener: tokio::net::TcpListener::from_std(self.listener)?,
                permits: Arc::new(tokio::sync::Semaphore::new(self.settings.max_connections.max(1))),
            };
            let app = router(context, &self.settings);
            tracing::info!(address = %self.address, "HTTP gateway serving");
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Readable once the hub is told to stop; an error is as
                    // good as a stop.
                    if let Ok(stop) = tokio::net::UnixStream::from_std(stop) {
                        let _ = stop.readable().await;
                    }
                    // Streams that would never end (the dashboard's events)
                    // end now, so the connections can close.
                    let _ = stopping_tx.send(true);
                })
                .await
        })?;
        Ok(())
    }
}

/// A listener that keeps at most as many connections open as it has
/// permits: the next one is accepted once one closes.
struct Limited {
    listener: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

/// A connection, holding its permit until it closes.
struct Counted {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl axum::serve::Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => {
                    return (
                        Counted {
                            stream,
                            _permit: permit,
                        },
                        address,
                    )
                }
                // Out of descriptors and the like: wait a little, as axum's
                // own listener does.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn router(context: Arc<rpc::Context>, settings: &Settings) -> Router {
    rest::router()
        .merge(dashboard::router())
        .route("/api/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/jsonrpc", post(jsonrpc_handler))
        .route("/metrics", get(metrics_handler))
        .route("/api/status", get(status_handler))
        .route("/api/websocket", get(websocket_handler))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            let message = "this route does not take that method (its Allow header lists those it takes)";
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
        })
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(context)
}

/// An HTTP error in the REST shape.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

/// A request without a valid token where one is needed: 401, and why.
pub struct Unauthorized(&'static str);

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", self.0);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        response
    }
}

/// Handlers take the caller as an argument; without a valid token where
/// one is needed, the request is answered 401 before they run.
impl axum::extract::FromRequestParts<Arc<rpc::Context>> for rpc::Caller {
    type Rejection = Unauthorized;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        context: &Arc<rpc::Context>,
    ) -> Result<Self, Self::Rejection> {
        caller(&context.access, &parts.method, &parts.headers)
    }
}

/// The dashboard's session cookie: the token itself, `HttpOnly` and
/// `SameSite=Strict`, set by its login form.
pub(crate) const SESSION_COOKIE: &str = "majordome_session";

/// The value of `name` among the request's cookies.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Whether `value` (a Host header, or an Origin without its scheme) names
/// a loopback host.
fn is_loopback_host(value: &str) -> bool {
    let host = value.rsplit_once(':').map_or(value, |(host, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            host
        } else {
            value
        }
    });
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// Whether the request says it comes from a page of this very site: its
/// `Origin` is `http://` plus its `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
    match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => origin.strip_prefix("http://") == Some(host),
        _ => false,
    }
}

/// The caller a token stands for, if it is valid.
pub(crate) fn token_caller(access: &Access, token: &str) -> Option<rpc::Caller> {
    let bearer = access.tokens.verify(token)?;
    let policy = match bearer.rules {
        Some(rules) => Arc::new(access.policy.with_table(&bearer.identity, rules)),
        None => access.policy.clone(),
    };
    Some(rpc::Caller::Named {
        identity: bearer.identity,
        policy,
    })
}

/// Who sends a request: a token's identity (`Authorization: Bearer`, or
/// the dashboard's session cookie), or a local client where that is
/// allowed.
pub(crate) fn caller(
    access: &Access,
    method: &axum::http::Method,
    headers: &HeaderMap,
) -> Result<rpc::Caller, Unauthorized> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        // The scheme's name is case-insensitive (RFC 7235).
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .unwrap_or_default();
        return token_caller(access, token).ok_or(Unauthorized("the token is not valid (revoked, or mistyped)"));
    }
    // A browser sends the cookie with whatever a page makes it send: a
    // request that changes something must come from a page of this site
    // (SameSite=Strict already keeps other sites' requests without it).
    if let Some(caller) = cookie(headers, SESSION_COOKIE).and_then(|token| token_caller(access, token)) {
        if !method.is_safe() && !same_origin(headers) {
            return Err(Unauthorized(
                "a request made with the dashboard's session must come from the dashboard's own pages",
            ));
        }
        return Ok(caller);
    }
    if !access.anonymous {
        return Err(Unauthorized(
            "a token is needed: send `Authorization: Bearer <token>` (`majordome token create NAME` makes one)",
        ));
    }
    // A page of another site in a browser on this machine must not act as
    // a local client (cross-site requests, DNS rebinding): an anonymous
    // request names a loopback host and, if it says where it comes from, a
    // loopback origin.
    let text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
    let host_ok = text(header::HOST).is_some_and(is_loopback_host);
    let origin_ok = text(header::ORIGIN).is_none_or(|o| o.strip_prefix("http://").is_some_and(is_loopback_host));
    if !host_ok || !origin_ok {
        return Err(Unauthorized(
            "without a token, only requests for a loopback host from no other site are let in: \
             send `Authorization: Bearer <token>`",
        ));
    }
    Ok(rpc::Caller::Local)
}

async fn jsonrpc_handler(
    State(context): State<Arc<rpc::Context>>,
    caller: rpc::Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // JSON only: a form or text/plain POST is what another site's page
    // can send without asking.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the JSON-RPC body as application/json",
        );
    }
    let answer = match jsonrpc::parse(&body) {
        Body::Broken(e) => Some(jsonrpc::response(Value::Null, Err(e))),
        Body::Single(call) => answer(&context, &caller, call).await,
        Body::Batch(calls) => {
            let mut tasks = JoinSet::new();
            for (index, call) in calls.into_iter().enumerate() {
                let (context, caller) = (context.clone(), caller.clone());
                tasks.spawn(async move { (index, answer(&context, &caller, call).await) });
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
async fn answer(
    context: &rpc::Context,
    caller: &rpc::Caller,
    call: Result<jsonrpc::Call, (Value, RpcError)>,
) -> Option<Value> {
    match call {
        Err((id, e)) => Some(jsonrpc::response(id, Err(e))),
        // A subscription nobody would ever learn the uuid of is not made.
        Ok(call) if call.id.is_none() && call.method == "subscribe" => None,
        Ok(call) => {
            let outcome = rpc::run(context, caller, &call).await;
            call.id.map(|id| jsonrpc::response(id, outcome))
        }
    }
}

/// The largest message a WebSocket client may send (a command is small).
const WS_MAX_MESSAGE: usize = 256 * 1024;

async fn websocket_handler(State(context): State<Arc<rpc::Context>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .max_message_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| ws::serve(socket, context))
}

/// Behind a token where one is needed, like the rest.
async fn metrics_handler(State(context): State<Arc<rpc::Context>>, caller: rpc::Caller) -> Response {
    let text = metrics::scrape(&context.bus, &caller).await;
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
async fn status_handler(State(context): State<Arc<rpc::Context>>, caller: rpc::Caller) -> Response {
    match status(&context.bus, &caller).await {
        Ok(status) => Json(status).into_response(),
        Err(why) => error(StatusCode::BAD_GATEWAY, "bus_unreachable", &why),
    }
}

/// `/api/status`'s answer, also the dashboard's bus page; an error when
/// the broker does not answer.
pub(crate) async fn status(bus: &AsyncClient, caller: &rpc::Caller) -> Result<Value, String> {
    let wait = std::time::Duration::from_secs(2);
    let broker = match bus.request("mmi.stats", Vec::new(), wait).await {
        Ok(reply) => reply
            .first()
            .and_then(|f| serde_json::from_slice::<Value>(f).ok())
            .unwrap_or(Value::Null),
        Err(e) => return Err(e.to_string()),
    };
    let mut status = json!({"broker": broker});
    for (part, service, action) in [
        ("events", "events", "stats.get"),
        ("state", "state", "stats.get"),
        ("devices", "devices", "stats.get"),
        ("history", "history", "stats.get"),
        ("scenarios", "scenario", "stats.get"),
        ("clients", "manager", "client.list.get"),
    ] {
        // What the caller may not call, it does not see here either.
        if caller.may_call(service, action).is_err() {
            status[part] = Value::Null;
            continue;
        }
        let asked = Message::new(action, json!({}));
        status[part] = match bus.request_message(service, &asked, wait).await {
            Ok(reply) if reply.data.get("status") != Some(&Value::Bool(false)) => reply.data,
            _ => Value::Null,
        };
    }
    Ok(status)
}
