//! The dashboard at `/`: pages rendered on the server from the services'
//! answers (`pages.rs`, charts in `chart.rs`), one stylesheet and one
//! small hand-written script served from the binary. Every page works
//! without the script; with it, values and statuses follow the bus live
//! (`/ui/events`, Server-Sent Events) and forms are sent in the
//! background.
//!
//! Who looks is decided as for the API ([`crate::caller`]): a local
//! browser on a loopback gateway comes in as a local client; elsewhere a
//! browser signs in with a token once (`/login`), kept in an `HttpOnly`,
//! `SameSite=Strict` cookie, and any request that changes something must
//! come from a page of this site (`Origin`).
//!
//! Routes: pages `/`, `/devices/{uuid}`, `/plugins`, `/plugins/{id}`,
//! `/scenarios`, `/scenarios/{name}`, `/bus`, `/login`; actions (form
//! posts) under `/ui/`: a device's `command` and `update`, a plugin's
//! `start`, `stop` and `config`, a scenario's `run`, `stop`, `enable`
//! and `disable`;
//! `/ui/events`, `/ui/plugins/{id}/log`, and the assets.

pub mod chart;
pub mod pages;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::Markup;
use serde_json::{json, Map, Value};

use crate::rpc::{self, Caller, Context};
use pages::{Frame, Page};

/// How long a page waits for the bus.
const WAIT: Duration = Duration::from_secs(10);

/// Lines of a plugin's log a page shows.
const LOG_LINES: usize = 200;

pub fn router() -> Router<Arc<Context>> {
    Router::new()
        .route("/", get(home))
        .route("/devices/{uuid}", get(device))
        .route("/plugins", get(plugins))
        .route("/plugins/{id}", get(plugin))
        .route("/scenarios", get(scenarios))
        .route("/scenarios/{name}", get(scenario))
        .route("/bus", get(bus))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/ui/style.css", get(|| asset("text/css", include_str!("style.css"))))
        .route("/ui/app.js", get(|| asset("text/javascript", include_str!("app.js"))))
        .route("/ui/icon.svg", get(|| asset("image/svg+xml", ICON)))
        .route("/ui/events", get(events))
        .route("/ui/devices/{uuid}/command", post(command))
        .route("/ui/devices/{uuid}/update", post(update_device))
        .route("/ui/plugins/{id}/start", post(start))
        .route("/ui/plugins/{id}/stop", post(stop))
        .route("/ui/plugins/{id}/config", post(configure))
        .route("/ui/plugins/{id}/log", get(log))
        .route("/ui/scenarios/{name}/{action}", post(scenario_action))
}

const ICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="8" fill="#2f6fde"/><path d="M7 16.5 16 8l9 8.5V24a1 1 0 0 1-1 1h-5v-6h-6v6H8a1 1 0 0 1-1-1z" fill="#fff"/></svg>"##;

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Whoever looks at a page; without the right to, they are sent to sign in.
pub struct Viewer {
    caller: Caller,
    /// Came in with the session cookie.
    signed_in: bool,
}

impl axum::extract::FromRequestParts<Arc<Context>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        context: &Arc<Context>,
    ) -> Result<Self, Self::Rejection> {
        match crate::caller(&context.access, &parts.method, &parts.headers) {
            Ok(caller) => Ok(Viewer {
                signed_in: parts.headers.get(header::AUTHORIZATION).is_none() && matches!(caller, Caller::Named { .. }),
                caller,
            }),
            Err(_) => Err(Redirect::to("/login").into_response()),
        }
    }
}

/// `?notice=` (what a form sent without the script did) and `?range=`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    notice: Option<String>,
    #[serde(default)]
    range: Option<String>,
}

/// A whole page.
fn page(context: &Context, viewer: &Viewer, query: &PageQuery, title: &str, which: Page, body: Markup) -> Response {
    let frame = Frame {
        title,
        page: which,
        host: &context.host,
        signed_in: viewer.signed_in,
        notice: query.notice.as_deref().filter(|n| !n.is_empty()),
    };
    let mut response = pages::layout(&frame, body).into_response();
    // Pages show live data: never from a cache.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

/// A page whose data could not be had: its frame, and why, with the status
/// that fits.
fn failed_page(
    context: &Context,
    viewer: &Viewer,
    query: &PageQuery,
    which: Page,
    what: &str,
    failure: rpc_error::Failure,
) -> Response {
    let mut response = page(
        context,
        viewer,
        query,
        what,
        which,
        pages::failure(what, &failure.message),
    );
    *response.status_mut() = failure.status;
    response
}

/// Bus errors as a page says them.
mod rpc_error {
    use axum::http::StatusCode;

    use crate::jsonrpc::RpcError;

    pub struct Failure {
        pub status: StatusCode,
        pub message: String,
    }

    impl From<RpcError> for Failure {
        fn from(error: RpcError) -> Failure {
            let status = match error.identifier.as_deref() {
                Some("error.forbidden") => StatusCode::FORBIDDEN,
                Some("error.device.invalid" | "error.not_found" | "error.not.found") => StatusCode::NOT_FOUND,
                Some("error.no.reply" | "error.no_answer") => StatusCode::GATEWAY_TIMEOUT,
                Some("error.no_worker" | "error.evicted") => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            };
            Failure {
                status,
                message: error.message,
            }
        }
    }
}

async fn home(State(context): State<Arc<Context>>, viewer: Viewer, Query(query): Query<PageQuery>) -> Response {
    match rpc::inventory(&context.bus, &viewer.caller, WAIT).await {
        Ok(inventory) => page(&context, &viewer, &query, "Home", Page::Home, pages::home(&inventory)),
        Err(e) => failed_page(&context, &viewer, &query, Page::Home, "Home", e.into()),
    }
}

async fn device(
    State(context): State<Arc<Context>>,
    viewer: Viewer,
    Path(uuid): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let inventory = match rpc::inventory(&context.bus, &viewer.caller, WAIT).await {
        Ok(inventory) => inventory,
        Err(e) => return failed_page(&context, &viewer, &query, Page::Home, "Device", e.into()),
    };
    let Some(found) = inventory["devices"].get(&uuid) else {
        let failure = rpc_error::Failure {
            status: StatusCode::NOT_FOUND,
            message: format!("There is no device {uuid}."),
        };
        return failed_page(&context, &viewer, &query, Page::Home, "No such device", failure);
    };
    let kind = inventory["schema"]["types"].get(found["type"].as_str().unwrap_or_default());
    let range = query.range.as_deref().unwrap_or("24h");
    let &(range, span, bucket) = pages::RANGES
        .iter()
        .find(|(name, _, _)| *name == range)
        .unwrap_or(&pages::RANGES[1]);
    let to = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64().ceil())
        .unwrap_or_default();
    let from = to - span;
    let zone = jiff::tz::TimeZone::system();
    // A chart per quantity with a numeric value now, or that the type
    // declares with a unit (before a first value: an empty chart), asked
    // all at once.
    let mut numeric: Vec<(String, String)> = Vec::new();
    if let Some(values) = found["values"].as_object() {
        for (quantity, value) in values.iter().filter(|(_, v)| v["level"].is_number()) {
            numeric.push((quantity.clone(), value["unit"].as_str().unwrap_or_default().to_owned()));
        }
    }
    if let Some(declared) = kind.and_then(|k| k["values"].as_object()) {
        for (quantity, spec) in declared {
            if let (Some(unit), false) = (spec["unit"].as_str(), numeric.iter().any(|(q, _)| q == quantity)) {
                numeric.push((quantity.clone(), unit.to_owned()));
            }
        }
    }
    numeric.sort();
    let asked = numeric.iter().map(|(quantity, _)| {
        let data = json!({"uuid": uuid, "quantity": quantity, "from": from, "to": to, "bucket": bucket});
        rpc::call(&context.bus, &viewer.caller, "history", "history.get", data, WAIT)
    });
    let answers = futures_util::future::join_all(asked).await;
    let charts: Vec<(String, Markup)> = numeric
        .iter()
        .zip(answers)
        .map(|((quantity, unit), answer)| {
            let chart = match answer {
                Ok(history) => {
                    let buckets: Vec<chart::Bucket> =
                        serde_json::from_value(history["buckets"].clone()).unwrap_or_default();
                    let draw = |size| chart::render(&buckets, from, to, bucket, pages::unit_text(unit), &zone, size);
                    maud::html! {
                        div.chart-wide { (draw(chart::WIDE)) }
                        div.chart-narrow { (draw(chart::NARROW)) }
                    }
                }
                Err(e) => pages::failure("", &e.message),
            };
            let unit = pages::unit_text(unit);
            let title = if unit.is_empty() {
                quantity.clone()
            } else {
                format!("{quantity} ({unit})")
            };
            (title, chart)
        })
        .collect();
    let title = found["name"].as_str().unwrap_or("Device").to_owned();
    let body = pages::device(found, kind, &charts, range);
    page(&context, &viewer, &query, &title, Page::Home, body)
}

async fn plugins(State(context): State<Arc<Context>>, viewer: Viewer, Query(query): Query<PageQuery>) -> Response {
    let caller = &viewer.caller;
    let (clients, packages) = tokio::join!(
        rpc::call(&context.bus, caller, "manager", "client.list.get", json!({}), WAIT),
        rpc::call(&context.bus, caller, "manager", "package.detail.get", json!({}), WAIT),
    );
    match (clients, packages) {
        (Ok(clients), Ok(packages)) => {
            let body = pages::plugins(&without_reply_fields(clients), &packages["packages"]);
            page(&context, &viewer, &query, "Plugins", Page::Plugins, body)
        }
        (Err(e), _) | (_, Err(e)) => failed_page(&context, &viewer, &query, Page::Plugins, "Plugins", e.into()),
    }
}

/// `client.list.get` answers Domogik's flat shape: the clients by id, beside
/// nothing else but the reply's own words, if any.
fn without_reply_fields(mut clients: Value) -> Value {
    if let Some(map) = clients.as_object_mut() {
        map.retain(|_, entry| entry.is_object());
    }
    clients
}

/// A client id's parts, as the manager and config service take them.
fn target(id: &str) -> Option<Value> {
    let (kind, rest) = id.split_once('-')?;
    let (name, host) = rest.split_once('.')?;
    (!kind.is_empty() && !name.is_empty() && !host.is_empty())
        .then(|| json!({"type": kind, "name": name, "host": host}))
}

async fn plugin(
    State(context): State<Arc<Context>>,
    viewer: Viewer,
    Path(id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let Some(target) = target(&id) else {
        let failure = rpc_error::Failure {
            status: StatusCode::NOT_FOUND,
            message: format!("'{id}' is not a client id (type-name.host, e.g. plugin-fake.box)"),
        };
        return failed_page(&context, &viewer, &query, Page::Plugins, "No such plugin", failure);
    };
    let (bus, caller) = (&context.bus, &viewer.caller);
    let mut log_request = target.clone();
    log_request["lines"] = LOG_LINES.into();
    let (clients, packages, config, history, log) = tokio::join!(
        rpc::call(bus, caller, "manager", "client.list.get", json!({}), WAIT),
        rpc::call(bus, caller, "manager", "package.detail.get", json!({}), WAIT),
        rpc::call(bus, caller, "config", "config.get", target.clone(), WAIT),
        rpc::call(bus, caller, "manager", "client.history.get", json!({"id": id}), WAIT),
        rpc::call(bus, caller, "manager", "plugin.log.get", log_request, WAIT),
    );
    let clients = match clients {
        Ok(clients) => clients,
        Err(e) => return failed_page(&context, &viewer, &query, Page::Plugins, "Plugin", e.into()),
    };
    let package = format!(
        "{}-{}",
        target["type"].as_str().unwrap_or_default(),
        target["name"].as_str().unwrap_or_default()
    );
    let packages = packages.unwrap_or_default();
    let manifest = packages["packages"].get(&package);
    let client = clients.get(&id).filter(|c| c.is_object());
    if client.is_none() && manifest.is_none() {
        let failure = rpc_error::Failure {
            status: StatusCode::NOT_FOUND,
            message: format!("The manager knows no client {id}."),
        };
        return failed_page(&context, &viewer, &query, Page::Plugins, "No such plugin", failure);
    }
    let history = history
        .ok()
        .and_then(|h| h["history"].as_array().cloned())
        .unwrap_or_default();
    let log = match log {
        Ok(answer) => Ok(answer["lines"]
            .as_array()
            .map(|lines| lines.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()),
        Err(e) => Err(e.message),
    };
    let config = config.ok();
    let view = pages::PluginView {
        id: &id,
        client,
        manifest,
        config: config.as_ref(),
        history: &history,
        log,
    };
    let title = client.and_then(|c| c["name"].as_str()).unwrap_or(&id).to_owned();
    page(&context, &viewer, &query, &title, Page::Plugins, pages::plugin(&view))
}

async fn scenarios(State(context): State<Arc<Context>>, viewer: Viewer, Query(query): Query<PageQuery>) -> Response {
    match rpc::call(
        &context.bus,
        &viewer.caller,
        "scenario",
        "scenario.list.get",
        json!({}),
        WAIT,
    )
    .await
    {
        Ok(list) => {
            let body = pages::scenarios(&list["scenarios"]);
            page(&context, &viewer, &query, "Scenarios", Page::Scenarios, body)
        }
        Err(e) => failed_page(&context, &viewer, &query, Page::Scenarios, "Scenarios", e.into()),
    }
}

async fn scenario(
    State(context): State<Arc<Context>>,
    viewer: Viewer,
    Path(name): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let (bus, caller) = (&context.bus, &viewer.caller);
    let (found, history) = tokio::join!(
        rpc::call(bus, caller, "scenario", "scenario.get", json!({"name": name}), WAIT),
        rpc::call(
            bus,
            caller,
            "scenario",
            "scenario.history.get",
            json!({"name": name, "last": 20}),
            WAIT
        ),
    );
    match found {
        Ok(found) => {
            let runs = history
                .ok()
                .and_then(|h| h["runs"].as_array().cloned())
                .unwrap_or_default();
            let body = pages::scenario(&found["scenario"], &runs);
            page(&context, &viewer, &query, &name, Page::Scenarios, body)
        }
        Err(e) => failed_page(&context, &viewer, &query, Page::Scenarios, "No such scenario", e.into()),
    }
}

/// A scenario's run, stop, enable or disable, from its buttons.
async fn scenario_action(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (request, said_done) = match action.as_str() {
        "run" => ("scenario.run.do", format!("Started {name}")),
        "stop" => ("scenario.stop.do", format!("Stopped {name}")),
        "enable" => ("scenario.enable.do", format!("Enabled {name}")),
        "disable" => ("scenario.disable.do", format!("Disabled {name}")),
        other => {
            let outcome = Err((StatusCode::NOT_FOUND, format!("a scenario has no action '{other}'")));
            return said(&headers, outcome, &back(&headers, "/scenarios"));
        }
    };
    let outcome = ask(
        &context,
        &caller,
        ("scenario", request),
        json!({"name": name}),
        said_done,
    )
    .await;
    said(&headers, outcome, &back(&headers, "/scenarios"))
}

async fn bus(State(context): State<Arc<Context>>, viewer: Viewer, Query(query): Query<PageQuery>) -> Response {
    match crate::status(&context.bus, &viewer.caller).await {
        Ok(status) => page(&context, &viewer, &query, "Bus", Page::Bus, pages::bus(&status)),
        Err(why) => {
            let failure = rpc_error::Failure {
                status: StatusCode::BAD_GATEWAY,
                message: why,
            };
            failed_page(&context, &viewer, &query, Page::Bus, "Bus", failure)
        }
    }
}

async fn login_page(State(context): State<Arc<Context>>) -> Response {
    login_answer(&context, None, StatusCode::OK)
}

fn login_answer(context: &Context, error: Option<&str>, status: StatusCode) -> Response {
    let frame = Frame {
        title: "Sign in",
        page: Page::Login,
        host: &context.host,
        signed_in: false,
        notice: None,
    };
    (status, pages::layout(&frame, pages::login(error))).into_response()
}

/// The sign-in form: a valid token becomes the session cookie.
async fn login(State(context): State<Arc<Context>>, body: Bytes) -> Response {
    let fields = form_fields(&body);
    let token = fields
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim())
        .unwrap_or_default();
    if crate::token_caller(&context.access, token).is_none() {
        return login_answer(
            &context,
            Some("That token is not valid: it was revoked, or mistyped."),
            StatusCode::UNAUTHORIZED,
        );
    }
    // A token is letters, digits, '.', '-' and '_': safe in a cookie as it is.
    let cookie = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000",
        crate::SESSION_COOKIE
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout() -> Response {
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        crate::SESSION_COOKIE
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// The bus's events for the script: device values, staleness, device
/// changes and the manager's client list, as Server-Sent Events, until the
/// page closes or the gateway stops.
async fn events(State(context): State<Arc<Context>>, caller: Caller) -> Response {
    if let Err(denied) = caller.may_follow_events() {
        return crate::error(StatusCode::FORBIDDEN, "forbidden", &denied.message);
    }
    let receiver = context.subscriptions.events().subscribe();
    let stopping = context.stopping.clone();
    let stream = futures_util::stream::unfold((receiver, stopping), |(mut receiver, mut stopping)| async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let received = tokio::select! {
                received = receiver.recv() => received,
                _ = stopping.wait_for(|stop| *stop) => return None,
            };
            let event = match received {
                Ok(event) if wanted(&event.category) => {
                    Event::default().data(json!({"category": event.category, "data": event.content}).to_string())
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(dropped)) => Event::default().event("overflow").data(dropped.to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok::<_, Infallible>(event), (receiver, stopping)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// What the pages use: values, staleness, device changes, client statuses.
fn wanted(category: &str) -> bool {
    category.starts_with("event.") || category == "client.list" || category == "device.update"
}

/// A form body's fields, in order (unreadable pairs skipped).
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

/// How an action went: JSON `{ok, message}` for the script, or back to the
/// page for a browser without it.
fn said(headers: &HeaderMap, outcome: Result<String, (StatusCode, String)>, back: &str) -> Response {
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let (status, ok, message) = match outcome {
        Ok(message) => (StatusCode::OK, true, message),
        Err((status, message)) => (status, false, message),
    };
    if wants_json {
        return (status, Json(json!({"ok": ok, "message": message}))).into_response();
    }
    let notice = serde_urlencoded::to_string([("notice", message.as_str())]).unwrap_or_default();
    Redirect::to(&format!("{back}?{notice}")).into_response()
}

/// What a form asks of a service, as its sender: `done` when it is done,
/// or why not.
async fn ask(
    context: &Context,
    caller: &Caller,
    (service, action): (&str, &str),
    request: Value,
    done: String,
) -> Result<String, (StatusCode, String)> {
    rpc::call(&context.bus, caller, service, action, request, WAIT)
        .await
        .map(|_| done)
        .map_err(refusal)
}

fn refusal(error: crate::jsonrpc::RpcError) -> (StatusCode, String) {
    let failure: rpc_error::Failure = error.into();
    let status = if failure.status == StatusCode::BAD_GATEWAY {
        // The service refused what was asked.
        StatusCode::BAD_REQUEST
    } else {
        failure.status
    };
    (status, failure.message)
}

/// Where a form without the script goes back to: the page it came from,
/// when that is a page of this site.
fn back(headers: &HeaderMap, default: &str) -> String {
    headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|referer| {
            let host = headers.get(header::HOST)?.to_str().ok()?;
            let path = referer.strip_prefix("http://")?.strip_prefix(host)?;
            let path = path.split('?').next().unwrap_or("/");
            path.starts_with('/').then(|| path.to_owned())
        })
        .unwrap_or_else(|| default.to_owned())
}

/// A device command from a form: `command` and its parameters (as text:
/// the devices service reads them by the type's schema, and checks them).
async fn command(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut command = String::new();
    let mut data = Map::new();
    for (key, value) in form_fields(&body) {
        if key == "command" {
            command = value;
        } else if !value.is_empty() {
            data.insert(key, Value::String(value));
        }
    }
    let outcome = if command.is_empty() {
        Err((StatusCode::BAD_REQUEST, "the form sent no command".to_owned()))
    } else {
        rpc::device_command(&context.bus, &caller, &uuid, &command, Value::Object(data), WAIT)
            .await
            .map(|result| {
                result["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("Sent: {command}"))
            })
            .map_err(refusal)
    };
    said(&headers, outcome, &back(&headers, "/"))
}

/// A device's new name and room.
async fn update_device(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut request = json!({"uuid": uuid});
    for (key, value) in form_fields(&body) {
        if key == "name" || key == "room" {
            request[key] = Value::String(value.trim().to_owned());
        }
    }
    let outcome = ask(
        &context,
        &caller,
        ("devices", "device.update.do"),
        request,
        "Saved".into(),
    )
    .await;
    said(&headers, outcome, &back(&headers, &format!("/devices/{uuid}")))
}

async fn start(state: State<Arc<Context>>, caller: Caller, id: Path<String>, headers: HeaderMap) -> Response {
    supervise(state, caller, id, headers, "plugin.start.do").await
}

async fn stop(state: State<Arc<Context>>, caller: Caller, id: Path<String>, headers: HeaderMap) -> Response {
    supervise(state, caller, id, headers, "plugin.stop.do").await
}

async fn supervise(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    action: &str,
) -> Response {
    let outcome = match target(&id) {
        None => Err((StatusCode::NOT_FOUND, format!("'{id}' is not a client id"))),
        Some(target) => {
            let doing = if action == "plugin.start.do" {
                "Starting"
            } else {
                "Stopping"
            };
            ask(&context, &caller, ("manager", action), target, format!("{doing} {id}")).await
        }
    };
    said(&headers, outcome, &back(&headers, "/plugins"))
}

/// A plugin's settings from its form; the config service checks each
/// against the manifest (type, bounds, choices) and stores all or none.
async fn configure(
    State(context): State<Arc<Context>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = match target(&id) {
        None => Err((StatusCode::NOT_FOUND, format!("'{id}' is not a client id"))),
        Some(mut request) => {
            let values: Map<String, Value> = form_fields(&body)
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(key, value)| (key, Value::String(value)))
                .collect();
            if values.is_empty() {
                Err((StatusCode::BAD_REQUEST, "the form sent no value".to_owned()))
            } else {
                request["data"] = Value::Object(values);
                let done = "Saved: the plugin is told at once".to_owned();
                ask(&context, &caller, ("config", "config.set"), request, done).await
            }
        }
    };
    said(&headers, outcome, &back(&headers, &format!("/plugins/{id}")))
}

/// The end of a plugin's log, for the page to refresh.
async fn log(State(context): State<Arc<Context>>, caller: Caller, Path(id): Path<String>) -> Response {
    let Some(mut request) = target(&id) else {
        return crate::error(StatusCode::NOT_FOUND, "not_found", "not a client id");
    };
    request["lines"] = LOG_LINES.into();
    match rpc::call(&context.bus, &caller, "manager", "plugin.log.get", request, WAIT).await {
        Ok(answer) => Json(json!({"lines": answer["lines"]})).into_response(),
        Err(e) => {
            let (status, message) = refusal(e);
            crate::error(status, "failed", &message)
        }
    }
}
