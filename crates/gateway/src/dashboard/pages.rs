//! The dashboard's pages as HTML, from what the services answered. Pure:
//! JSON in, markup out (maud escapes every value it writes), so each page
//! can be tested without a server.

use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::{Map, Value};

/// Which page is shown, for the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Home,
    Plugins,
    Scenarios,
    Bus,
    Login,
}

impl Page {
    fn name(self) -> &'static str {
        match self {
            Page::Home => "home",
            Page::Plugins => "plugins",
            Page::Scenarios => "scenarios",
            Page::Bus => "bus",
            Page::Login => "login",
        }
    }
}

/// What every page shares: its title, where it is, and who looks.
pub struct Frame<'a> {
    pub title: &'a str,
    pub page: Page,
    /// This hub's host name.
    pub host: &'a str,
    /// Whether the viewer came in with the session cookie (then a "Sign
    /// out" button is shown).
    pub signed_in: bool,
    /// A message to show on top: what the last action did.
    pub notice: Option<&'a str>,
}

const LOGO: &str = r##"<svg viewBox="0 0 32 32" aria-hidden="true"><rect width="32" height="32" rx="8" fill="#2f6fde"/><path d="M7 16.5 16 8l9 8.5V24a1 1 0 0 1-1 1h-5v-6h-6v6H8a1 1 0 0 1-1-1z" fill="#fff"/></svg>"##;

/// The whole document around a page's body.
pub fn layout(frame: &Frame, body: Markup) -> Markup {
    let nav = [
        (Page::Home, "/", "Home"),
        (Page::Plugins, "/plugins", "Plugins"),
        (Page::Scenarios, "/scenarios", "Scenarios"),
        (Page::Bus, "/bus", "Bus"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (frame.title) " · majordome" }
                link rel="stylesheet" href=(concat!("/ui/style.css?v=", env!("CARGO_PKG_VERSION")));
                link rel="icon" href="/ui/icon.svg";
                script src=(concat!("/ui/app.js?v=", env!("CARGO_PKG_VERSION"))) defer {}
            }
            body data-page=(frame.page.name()) {
                header.topbar {
                    a.brand href="/" { (PreEscaped(LOGO)) span { "majordome" } small.hide-small { (frame.host) } }
                    @if frame.page != Page::Login {
                        nav.pages aria-label="Pages" {
                            @for (page, href, text) in nav {
                                a href=(href) aria-current=[(page == frame.page).then_some("page")] { (text) }
                            }
                        }
                        div.end {
                            span.live data-state="idle" title="Connecting to the bus" { span.hide-small { "Live" } }
                            @if frame.signed_in {
                                form method="post" action="/logout" { button.linkish type="submit" { "Sign out" } }
                            }
                        }
                    }
                }
                main {
                    @if let Some(notice) = frame.notice {
                        div.notice role="status" { (notice) }
                    }
                    (body)
                }
            }
        }
    }
}

/// A value as people read it: `On`/`Off` for a level, numbers rounded to
/// two decimals (the script says it the same way).
pub fn format_value(level: &Value, unit: &str) -> String {
    match level {
        Value::Number(n) if unit == "level" => {
            if n.as_f64().unwrap_or(0.0) > 0.0 {
                "On".into()
            } else {
                "Off".into()
            }
        }
        Value::Number(n) => {
            let rounded = (n.as_f64().unwrap_or(0.0) * 100.0).round() / 100.0;
            let text = format!("{rounded}");
            if text == "-0" {
                "0".into()
            } else {
                text
            }
        }
        Value::Null => "–".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A unit as people write it.
pub fn unit_text(unit: &str) -> &str {
    match unit {
        "degC" => "°C",
        "degF" => "°F",
        "percent" => "%",
        "level" => "",
        other => other,
    }
}

fn text<'v>(value: &'v Value, key: &str) -> &'v str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Devices by room, rooms by name (devices without a room last).
fn by_room(devices: &Map<String, Value>) -> Vec<(String, Vec<&Value>)> {
    let mut rooms: std::collections::BTreeMap<(bool, String), Vec<&Value>> = Default::default();
    for device in devices.values() {
        let room = text(device, "room").trim();
        rooms
            .entry((
                room.is_empty(),
                if room.is_empty() { "No room".into() } else { room.into() },
            ))
            .or_default()
            .push(device);
    }
    rooms
        .into_iter()
        .map(|((_, room), mut list)| {
            list.sort_by_key(|d| text(d, "name").to_lowercase());
            (room, list)
        })
        .collect()
}

/// The home page: every device, by room, with its values and controls.
/// `inventory` is the devices service's `inventory.get` answer.
pub fn home(inventory: &Value) -> Markup {
    let empty = Map::new();
    let devices = inventory["devices"].as_object().unwrap_or(&empty);
    let types = &inventory["schema"]["types"];
    html! {
        h1 { "Home" }
        p.lede { (devices.len()) " devices, live as the bus says. Commands go through the devices service to each device's plugin." }
        @if devices.is_empty() {
            p.empty { "No device yet. Plugins register theirs when they start: see " a href="/plugins" { "Plugins" } "." }
        }
        @for (room, list) in by_room(devices) {
            section.room {
                h2 { (room) }
                div.grid {
                    @for device in list {
                        (device_card(device, types.get(text(device, "type"))))
                    }
                }
            }
        }
    }
}

/// One device's card: name, type, stale mark, values, controls.
fn device_card(device: &Value, kind: Option<&Value>) -> Markup {
    let uuid = text(device, "uuid");
    let stale = device["stale"].as_bool().unwrap_or(false);
    html! {
        article.card.device data-device=(uuid) data-stale=(stale) {
            header {
                a.name href=(format!("/devices/{uuid}")) { (text(device, "name")) }
                span.badge.stale hidden[!stale] title="Not heard from for longer than it should" { "stale" }
                span.kind { (text(device, "type")) }
            }
            (values(device, kind))
            (controls(device, kind))
        }
    }
}

/// The quantities a device has: the ones it sent, plus the ones its type
/// declares (shown as "–" until a first value).
fn quantities(device: &Value, kind: Option<&Value>) -> Vec<(String, Value, String, String, Option<f64>)> {
    let empty = Map::new();
    let sent = device["values"].as_object().unwrap_or(&empty);
    let declared = kind.and_then(|k| k["values"].as_object()).unwrap_or(&empty);
    let mut names: Vec<&String> = sent.keys().chain(declared.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let value = sent.get(name);
            let unit = value
                .and_then(|v| v["unit"].as_str())
                .or_else(|| declared.get(name).and_then(|d| d["unit"].as_str()))
                .unwrap_or_default()
                .to_owned();
            let subject = declared
                .get(name)
                .and_then(|d| d["event"].as_str())
                .unwrap_or_default()
                .to_owned();
            let level = value.map(|v| v["level"].clone()).unwrap_or(Value::Null);
            let time = value.and_then(|v| v["timestamp"].as_f64());
            (name.clone(), level, unit, subject, time)
        })
        .collect()
}

fn values(device: &Value, kind: Option<&Value>) -> Markup {
    let uuid = text(device, "uuid");
    html! {
        dl.values {
            @for (quantity, level, unit, subject, time) in quantities(device, kind) {
                dt { (quantity) }
                dd title=[time.map(|t| format!("{t:.0}"))] {
                    span data-value=(format!("{uuid}/{quantity}")) data-event=(subject) data-unit=(unit) {
                        (format_value(&level, &unit))
                    }
                    span.unit { (unit_text(&unit)) }
                }
            }
        }
    }
}

/// The controls for a device's commands, from its type's schema: a switch
/// for on/off, a slider for a percent level, a small form for any other
/// command with parameters, a button for one without.
fn controls(device: &Value, kind: Option<&Value>) -> Markup {
    let uuid = text(device, "uuid");
    let empty = Map::new();
    let commands = kind.and_then(|k| k["commands"].as_object()).unwrap_or(&empty);
    if commands.is_empty() {
        return html! {};
    }
    let action = format!("/ui/devices/{uuid}/command");
    let state = device["values"]["state"]["level"].as_f64();
    let switch = commands.contains_key("on") && commands.contains_key("off");
    let on = state.is_some_and(|s| s > 0.0);
    html! {
        div.controls {
            @if switch {
                form.switch-row method="post" action=(action) data-async {
                    input type="hidden" name="command" value=(if on { "off" } else { "on" });
                    span { "Power" }
                    button.switch type="submit" role="switch" aria-checked=(on)
                        aria-label=(format!("{} on or off", text(device, "name")))
                        data-toggle=(format!("{uuid}/state")) {}
                }
            }
            @for (command, spec) in commands {
                @if !(switch && (command == "on" || command == "off")) {
                    (command_form(&action, uuid, command, spec, state))
                }
            }
        }
    }
}

fn command_form(action: &str, uuid: &str, command: &str, spec: &Value, state: Option<f64>) -> Markup {
    let no_parameters = Vec::new();
    let parameters = spec["parameters"].as_array().unwrap_or(&no_parameters);
    let description = text(spec, "description");
    // A level in percent: a slider, sent when let go.
    if let [only] = parameters.as_slice() {
        let (min, max) = (only["min"].as_f64(), only["max"].as_f64());
        if only["type"] == "integer" && min == Some(0.0) && max == Some(100.0) {
            let current = state.unwrap_or(0.0).clamp(0.0, 100.0);
            return html! {
                form method="post" action=(action) data-async data-autosubmit {
                    input type="hidden" name="command" value=(command);
                    label {
                        span { (text(only, "key")) }
                        input type="range" name=(text(only, "key")) min="0" max="100" step="1" value=(current)
                            aria-label=(description) data-level=(format!("{uuid}/state"));
                        output { (current) }
                    }
                    noscript { button type="submit" { "Set" } }
                }
            };
        }
    }
    html! {
        form method="post" action=(action) data-async {
            input type="hidden" name="command" value=(command);
            @for parameter in parameters {
                (parameter_input(parameter))
            }
            button type="submit" title=(description) { (command_label(command, parameters.is_empty())) }
        }
    }
}

/// "Set temperature" for `settemperature` with parameters, the command's
/// name as it is otherwise.
fn command_label(command: &str, bare: bool) -> String {
    match command.strip_prefix("set") {
        Some(rest) if !bare && !rest.is_empty() => format!("Set {rest}"),
        _ => {
            let mut chars = command.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default()
        }
    }
}

/// One input for a parameter or a config key (they share a shape: key,
/// type, min, max, choices, required, description, default), with the
/// bounds the browser checks before sending; the service checks them
/// again.
fn parameter_input(spec: &Value) -> Markup {
    field_input(spec, None, false)
}

fn field_input(spec: &Value, current: Option<&Value>, with_id: bool) -> Markup {
    let key = text(spec, "key");
    let required = spec["required"].as_bool().unwrap_or(false);
    let id = with_id.then(|| format!("field-{key}"));
    let current = current.or(spec.get("default")).filter(|v| !v.is_null());
    let shown = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let title = text(spec, "description");
    if let Some(choices) = spec["choices"].as_array() {
        return html! {
            select name=(key) id=[id] required[required] aria-label=(key) title=(title) {
                @if !required { option value="" { "–" } }
                @for choice in choices {
                    option value=(shown(choice)) selected[current == Some(choice)] { (shown(choice)) }
                }
            }
        };
    }
    match text(spec, "type") {
        "integer" | "number" => {
            let step = if text(spec, "type") == "integer" { "1" } else { "any" };
            html! {
                input type="number" name=(key) id=[id] step=(step) required[required] aria-label=(key) title=(title)
                    min=[spec["min"].as_f64()] max=[spec["max"].as_f64()]
                    value=[current.map(shown)] placeholder=(key);
            }
        }
        "boolean" => html! {
            select name=(key) id=[id] required[required] aria-label=(key) title=(title) {
                @for choice in ["true", "false"] {
                    option value=(choice) selected[current.map(shown).as_deref() == Some(choice)] { (choice) }
                }
            }
        },
        _ => html! {
            input type="text" name=(key) id=[id] required[required] aria-label=(key) title=(title)
                value=[current.map(shown)] placeholder=(key);
        },
    }
}

/// A range of history to chart: its name, its length, the bucket width.
pub const RANGES: &[(&str, f64, f64)] = &[
    ("1h", 3600.0, 30.0),
    ("24h", 86_400.0, 600.0),
    ("7d", 604_800.0, 3600.0),
    ("30d", 2_592_000.0, 14_400.0),
];

/// A device's own page: what its card shows, with a chart per numeric
/// quantity, and a form to rename it or move it to another room.
pub fn device(device: &Value, kind: Option<&Value>, charts: &[(String, Markup)], range: &str) -> Markup {
    let uuid = text(device, "uuid");
    let client = text(device, "client");
    html! {
        p { a href="/" { "← Home" } }
        div data-device=(uuid) data-stale=(device["stale"].as_bool().unwrap_or(false)) {
            div.row {
                h1 { (text(device, "name")) }
                span.badge.stale hidden[!device["stale"].as_bool().unwrap_or(false)] { "stale" }
            }
            p.lede {
                (text(device, "type")) " in " (if text(device, "room").is_empty() { "no room" } else { text(device, "room") })
                ", from " a href=(format!("/plugins/{client}")) { (client) }
                @if let Some(seen) = device["lastseen"].as_f64() {
                    ", heard from " time data-time=(format!("{seen:.0}")) { "at " (format!("{seen:.0}")) }
                }
            }
            div.split {
                section.card {
                    h3 { "Now" }
                    (values(device, kind))
                    (controls(device, kind))
                }
                section.card {
                    h3 { "Name and room" }
                    form.controls method="post" action=(format!("/ui/devices/{uuid}/update")) data-async data-after="reload" {
                        label { span { "Name" } input type="text" name="name" value=(text(device, "name")) maxlength="128" required; }
                        label { span { "Room" } input type="text" name="room" value=(text(device, "room")) maxlength="128"; }
                        div.row { span.spacer {} button.primary type="submit" { "Save" } }
                    }
                    dl.kv.ids {
                        dt { "uuid" } dd.mono { (uuid) }
                        dt { "id at its plugin" } dd.mono { (text(device, "id")) }
                    }
                }
            }
        }
        div.row {
            h2 { "History" }
            span.spacer {}
            nav.ranges aria-label="Period" {
                @for (name, _, _) in RANGES {
                    a href=(format!("?range={name}")) aria-current=[(*name == range).then_some("true")] { (name) }
                }
            }
        }
        @if charts.is_empty() {
            p.empty { "This device has no numeric values to chart." }
        }
        @for (quantity, chart) in charts {
            section.card {
                h3 { (quantity) }
                (chart)
            }
        }
    }
}

/// Whether a client runs (the start button is off): by its status, or
/// while its process has not exited (a plugin says "stopped" just before).
fn running(client: Option<&Value>) -> bool {
    client.is_some_and(|c| {
        matches!(
            text(c, "status"),
            "alive" | "starting" | "not-configured" | "stop-request"
        ) || c["pid"].is_u64()
    })
}

/// The start and stop buttons of a plugin this manager runs.
fn start_stop(id: &str, client: Option<&Value>) -> Markup {
    html! {
        div.buttons {
            form method="post" action=(format!("/ui/plugins/{id}/start")) data-async {
                button type="submit" data-when="stopped" disabled[running(client)] { "Start" }
            }
            form method="post" action=(format!("/ui/plugins/{id}/stop")) data-async {
                button.danger type="submit" data-when="running" disabled[!running(client)] { "Stop" }
            }
        }
    }
}

/// The plugins page: every client the manager knows, with its status, and
/// start/stop for those this hub runs. `clients` is `client.list.get`'s
/// answer, `packages` `package.detail.get`'s.
pub fn plugins(clients: &Value, packages: &Value) -> Markup {
    let empty = Map::new();
    let clients = clients.as_object().unwrap_or(&empty);
    let mut list: Vec<(&String, &Value)> = clients.iter().collect();
    list.sort_by_key(|(id, _)| id.to_lowercase());
    html! {
        h1 { "Plugins and clients" }
        p.lede { "Every client the manager has heard of. Plugins with a manifest here can be started and stopped." }
        @if list.is_empty() {
            p.empty { "No client yet." }
        }
        div.table-wrap {
            table {
                thead { tr {
                    th { "Client" } th { "Status" } th.hide-small { "Type" } th.hide-small { "Host" }
                    th.num.hide-small { "pid" } th.hide-small { "Last heard" } th { }
                } }
                tbody {
                    @for (id, client) in list {
                        @let status = text(client, "status");
                        @let supervised = packages.get(text(client, "package_id")).is_some_and(|p| p["command"].as_array().is_some_and(|c| !c.is_empty()));
                        tr data-client=(id) data-pid=(pid_text(client)) {
                            td { a href=(format!("/plugins/{id}")) { (text(client, "name")) } br; small.mono { (id) } }
                            td { span.badge.status data-status=(status) { (status) } }
                            td.hide-small { (text(client, "type")) }
                            td.hide-small { (text(client, "host")) }
                            td.num.hide-small data-field="pid" { (client["pid"].as_u64().map(|p| p.to_string()).unwrap_or("–".into())) }
                            td.hide-small {
                                @if let Some(seen) = client["last_seen"].as_f64() {
                                    time data-time=(format!("{seen:.0}")) { (format!("{seen:.0}")) }
                                } @else { "never" }
                            }
                            td { @if supervised { (start_stop(id, Some(client))) } }
                        }
                    }
                }
            }
        }
    }
}

/// A client's process id as text; empty when it has none.
fn pid_text(client: &Value) -> String {
    client["pid"].as_u64().map(|p| p.to_string()).unwrap_or_default()
}

/// What the plugin page shows, gathered from four services.
pub struct PluginView<'a> {
    pub id: &'a str,
    /// Its `client.list.get` entry, if the manager knows it.
    pub client: Option<&'a Value>,
    /// Its manifest, if this hub has one.
    pub manifest: Option<&'a Value>,
    /// `config.get`'s answer (values with defaults), if asked.
    pub config: Option<&'a Value>,
    /// `client.history.get`'s entries, newest first.
    pub history: &'a [Value],
    /// The end of its log, or why it could not be read.
    pub log: Result<Vec<String>, String>,
}

/// A plugin's page: status and buttons, its config form (from the
/// manifest, with its bounds), its status history and its log.
pub fn plugin(view: &PluginView) -> Markup {
    let id = view.id;
    let status = view.client.map(|c| text(c, "status")).unwrap_or("unknown");
    let name = view.client.map(|c| text(c, "name")).unwrap_or(id);
    let supervised = view
        .manifest
        .is_some_and(|m| m["command"].as_array().is_some_and(|c| !c.is_empty()));
    let no_keys = Vec::new();
    let keys = view.manifest.and_then(|m| m["config"].as_array()).unwrap_or(&no_keys);
    let values = view.config.map(|c| &c["data"]);
    html! {
        p { a href="/plugins" { "← Plugins" } }
        div data-client=(id) data-pid=(view.client.map(pid_text).unwrap_or_default()) {
            div.row {
                h1 { (name) }
                span.badge.status data-status=(status) { (status) }
                span.spacer {}
                @if supervised { (start_stop(id, view.client)) }
            }
            p.lede {
                span.mono { (id) }
                @if let Some(manifest) = view.manifest {
                    " · version " (text(manifest, "version")) " · " (text(manifest, "description"))
                }
                @if let Some(pid) = view.client.and_then(|c| c["pid"].as_u64()) {
                    " · pid " span data-field="pid" { (pid) }
                }
            }
        }
        div.split {
            section.card {
                h3 { "Configuration" }
                @if keys.is_empty() {
                    p.lede { "Its manifest declares no setting." }
                } @else {
                    @if view.config.is_some_and(|c| c["configured"] == false) {
                        p.notice.error { "Not configured: it waits for the required settings." }
                    }
                    form.config method="post" action=(format!("/ui/plugins/{id}/config")) data-async {
                        @for key in keys {
                            div.field {
                                label for=(format!("field-{}", text(key, "key"))) { (text(key, "key")) }
                                (field_input(key, values.and_then(|v| v.get(text(key, "key"))), true))
                                span.hint { (bounds_hint(key)) }
                            }
                        }
                        div.actions { button.primary type="submit" { "Save" } }
                    }
                }
            }
            section.card {
                h3 { "Status history" }
                @if view.history.is_empty() {
                    p.lede { "Nothing yet." }
                } @else {
                    div.table-wrap {
                        table {
                            tbody {
                                @for entry in view.history.iter().take(12) {
                                    tr {
                                        td { span.badge.status data-status=(text(entry, "status")) { (text(entry, "status")) } }
                                        td { @if let Some(time) = entry["time"].as_f64() { time data-time=(format!("{time:.0}")) { (format!("{time:.0}")) } } }
                                        td.hide-small { (text(entry, "comment")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Log" }
        @match &view.log {
            Ok(lines) => pre.log data-log=(format!("/ui/plugins/{id}/log")) {
                @if lines.is_empty() { "(nothing yet)" } @else { (lines.join("\n")) }
            },
            Err(why) => p.lede { (why) },
        }
    }
}

/// "1 to 60 · default 5 · what it does".
fn bounds_hint(key: &Value) -> String {
    let mut parts = Vec::new();
    match (key["min"].as_f64(), key["max"].as_f64()) {
        (Some(min), Some(max)) => parts.push(format!("{min} to {max}")),
        (Some(min), None) => parts.push(format!("at least {min}")),
        (None, Some(max)) => parts.push(format!("at most {max}")),
        _ => {}
    }
    if key["required"] == true {
        parts.push("required".into());
    }
    if let Some(default) = key.get("default").filter(|d| !d.is_null() && d.as_str() != Some("")) {
        parts.push(format!("default {}", format_value(default, "")));
    }
    let description = text(key, "description");
    if !description.is_empty() {
        parts.push(description.to_owned());
    }
    parts.join(" · ")
}

/// Microseconds as people read them.
fn micros(value: &Value) -> String {
    match value.as_f64() {
        None => "–".into(),
        Some(us) if us < 1000.0 => format!("{us:.0} µs"),
        Some(us) if us < 10_000.0 => format!("{:.2} ms", us / 1000.0),
        Some(us) if us < 1e6 => format!("{:.1} ms", us / 1000.0),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

/// The bus page: the broker's services with their workers, queues,
/// counts, rates (the script fills them in) and latencies, then every
/// part's counters. `status` is `/api/status`'s answer.
pub fn bus(status: &Value) -> Markup {
    let broker = &status["broker"];
    let empty = Map::new();
    let services = broker["services"].as_object().unwrap_or(&empty);
    // (field, title, shown on a phone too)
    let columns = [
        ("workers", "Workers", true),
        ("idle_workers", "Idle", false),
        ("queued", "Queued", true),
        ("requests", "Requests", true),
        ("replies", "Replies", false),
        ("expired", "Expired", false),
        ("rejected", "Rejected", false),
    ];
    html! {
        h1 { "Bus" }
        p.lede { "The broker's services as it counts them, refreshed every two seconds." }
        div.table-wrap {
            table {
                thead { tr {
                    th { "Service" }
                    @for (_, title, small) in columns { th.num.hide-small[!small] { (title) } }
                    th.num { "Req/s" } th.num.hide-small { "p50" } th.num { "p99" }
                } }
                tbody {
                    @for (name, service) in services {
                        tr {
                            td.mono { (name) }
                            @for (field, _, small) in columns {
                                td.num.hide-small[!small] data-stat=(format!("{name}/{field}")) { (service[field]) }
                            }
                            td.num data-rate=(name) { "–" }
                            td.num.hide-small data-stat=(format!("{name}/latency_p50_us")) { (micros(&service["latency_p50_us"])) }
                            td.num data-stat=(format!("{name}/latency_p99_us")) { (micros(&service["latency_p99_us"])) }
                        }
                    }
                }
            }
        }
        h2 { "Counters" }
        div.grid.top {
            section.card {
                h3 { "Broker" }
                dl.kv {
                    dt { "messages in" } dd data-total="broker.messages.in" { (broker["messages"]["in"]) }
                    dt { "messages out" } dd data-total="broker.messages.out" { (broker["messages"]["out"]) }
                    dt { "requests in flight" } dd data-total="broker.requests_in_flight" { (broker["requests_in_flight"]) }
                    dt { "queued bytes" } dd data-total="broker.queued_bytes" { (broker["queued_bytes"]) }
                    dt { "logins refused" } dd data-total="broker.logins_refused" { (broker["logins_refused"]) }
                    (nested("dropped", &broker["dropped"], "broker.dropped"))
                }
            }
            (counters("Events", &status["events"], "events"))
            (counters("Devices", &status["devices"], "devices"))
            (counters("History", &status["history"], "history"))
            (counters("State (Clone)", &status["state"], "state"))
        }
    }
}

/// A map of counters (drops by reason, requests by action): the ones that
/// are not zero, or "none".
fn nested(name: &str, counts: &Value, path: &str) -> Markup {
    let empty = Map::new();
    let counted: Vec<(&String, &Value)> = counts
        .as_object()
        .unwrap_or(&empty)
        .iter()
        .filter(|(_, v)| v.as_f64().is_some_and(|n| n != 0.0))
        .collect();
    html! {
        @if counted.is_empty() {
            dt { (name.replace('_', " ")) } dd { "none" }
        }
        @for (key, value) in counted {
            dt { (name.replace('_', " ")) " " (key.replace('_', " ")) } dd data-total=(format!("{path}.{name}.{key}")) { (value) }
        }
    }
}

/// A part's numeric counters as a list (maps of counters flattened, their
/// zeros left out); nothing when the part did not answer.
fn counters(title: &str, part: &Value, path: &str) -> Markup {
    let Some(fields) = part.as_object() else {
        return html! {};
    };
    html! {
        section.card {
            h3 { (title) }
            dl.kv {
                @for (key, value) in fields {
                    @if value.is_number() {
                        dt { (key.replace('_', " ")) } dd data-total=(format!("{path}.{key}")) { (value) }
                    } @else if value.as_object().is_some_and(|inner| inner.values().all(Value::is_number)) {
                        (nested(key, value, path))
                    }
                }
            }
        }
    }
}

/// A unix time as the hub's clock shows it, or a dash.
fn when(time: &Value) -> Markup {
    match time.as_f64() {
        Some(time) => html! { time data-time=(format!("{time:.0}")) { (format!("{time:.0}")) } },
        None => html! { "never" },
    }
}

/// A run's result as a badge: ok, failed, stopped, skipped.
fn result_badge(result: &str) -> Markup {
    let word = result.split(':').next().unwrap_or(result);
    html! { span.badge.result data-result=(word) title=(result) { (word) } }
}

/// What starts a scenario, in a few words.
fn triggers_text(scenario: &Value) -> String {
    let kinds: Vec<String> = scenario["triggers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| match t["trigger"].as_str().unwrap_or("?") {
            "cron" => format!("cron {}", t["cron"].as_str().unwrap_or("")),
            "sun" => t["event"].as_str().unwrap_or("sun").to_owned(),
            "event" => format!("event {}", t["category"].as_str().unwrap_or("")),
            "state" => format!("state {}", t["key"].as_str().unwrap_or("")),
            other => other.to_owned(),
        })
        .collect();
    if kinds.is_empty() {
        "by hand".into()
    } else {
        kinds.join(", ")
    }
}

/// The run, stop and enable/disable buttons of a scenario.
fn scenario_buttons(name: &str, enabled: bool) -> Markup {
    html! {
        div.buttons.wrapping {
            form method="post" action=(format!("/ui/scenarios/{name}/run")) data-async {
                button.primary type="submit" { "Run" }
            }
            form method="post" action=(format!("/ui/scenarios/{name}/stop")) data-async {
                button type="submit" { "Stop" }
            }
            form.switch-form method="post" action=(format!("/ui/scenarios/{name}/{}", if enabled { "disable" } else { "enable" }))
                data-async data-after="reload" {
                button.switch type="submit" role="switch" aria-checked=(enabled)
                    aria-label=(format!("{name} enabled")) title=(if enabled { "Enabled: disable it" } else { "Disabled: enable it" }) {}
                span.switch-state { (if enabled { "enabled" } else { "disabled" }) }
            }
        }
    }
}

/// The scenarios page: each with what starts it, whether it runs, its last
/// result, and its buttons. `scenarios` is `scenario.list.get`'s list.
pub fn scenarios(scenarios: &Value) -> Markup {
    let list = scenarios.as_array().cloned().unwrap_or_default();
    html! {
        h1 { "Scenarios" }
        p.lede { "Automations of the scenario service: what starts them, how their last run went. Make them with "
            code { "majordome scenario import" } " or " code { "POST /api/scenarios" } "." }
        @if list.is_empty() {
            p.empty { "No scenario yet." }
        }
        div.grid {
            @for scenario in &list {
                @let name = text(scenario, "name");
                @let status = &scenario["status"];
                article.card data-scenario=(name) {
                    header {
                        a.name href=(format!("/scenarios/{name}")) { (name) }
                        span.badge.running hidden[status["running"].as_u64().unwrap_or(0) == 0] { "running" }
                        span.kind { (triggers_text(scenario)) " · " (text(scenario, "mode")) }
                    }
                    @if !text(scenario, "description").is_empty() {
                        p.lede { (text(scenario, "description")) }
                    }
                    dl.kv {
                        dt { "last run" } dd data-field="last_run" { (when(&status["last_run"])) }
                        dt { "result" } dd data-field="last_result" {
                            @match status["last_result"].as_str() {
                                Some(result) => (result_badge(result)),
                                None => "–",
                            }
                        }
                        @if let Some(next) = status["next"].as_f64() {
                            dt { "next" } dd { (when(&Value::from(next))) }
                        }
                    }
                    (scenario_buttons(name, scenario["enabled"].as_bool().unwrap_or(false)))
                }
            }
        }
    }
}

/// One scenario's page: its buttons, its definition, and its last runs
/// with each condition and action.
pub fn scenario(scenario: &Value, runs: &[Value]) -> Markup {
    let name = text(scenario, "name");
    html! {
        p { a href="/scenarios" { "← Scenarios" } }
        div.row data-scenario=(name) {
            h1 { (name) }
            span.spacer {}
            (scenario_buttons(name, scenario["enabled"].as_bool().unwrap_or(false)))
        }
        @if !text(scenario, "description").is_empty() {
            p.lede { (text(scenario, "description")) }
        }
        p.kind { "Starts " (triggers_text(scenario)) " · mode " (text(scenario, "mode")) }
        h2 { "Last runs" }
        @if runs.is_empty() {
            p.empty { "No run yet." }
        } @else {
            div.table-wrap {
                table {
                    thead { tr { th { "Started" } th { "Result" } th { "By" } th.num { "Seconds" } th { "What happened" } } }
                    tbody {
                        @for run in runs {
                            tr {
                                td { (when(&run["started"])) }
                                td { (result_badge(text(run, "result"))) }
                                td { (run["trigger"]["trigger"].as_str().unwrap_or("?")) }
                                td.num { (format!("{:.3}", run["duration"].as_f64().unwrap_or(0.0))) }
                                td.steps {
                                    @if let Some(error) = run["error"].as_str() { div.error { (error) } }
                                    @for condition in run["conditions"].as_array().into_iter().flatten() {
                                        div { "condition " (condition["condition"]["condition"].as_str().unwrap_or("?"))
                                            ": " (if condition["passed"] == true { "held" } else { "did not hold" }) }
                                    }
                                    @for action in run["actions"].as_array().into_iter().flatten() {
                                        div { (action["index"]) ". " (text(action, "action")) ": "
                                            @match action.get("error") {
                                                Some(error) => span.error { (error.as_str().unwrap_or("?")) },
                                                None => (compact(&action["result"])),
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Definition" }
        pre.log { (serde_json::to_string_pretty(&without_status(scenario)).unwrap_or_default()) }
    }
}

/// A value in one short line.
fn compact(value: &Value) -> String {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Null => "done".into(),
        other => other.to_string(),
    };
    if text.chars().count() > 120 {
        format!("{}…", text.chars().take(120).collect::<String>())
    } else {
        text
    }
}

fn without_status(scenario: &Value) -> Value {
    let mut scenario = scenario.clone();
    if let Some(map) = scenario.as_object_mut() {
        map.remove("status");
    }
    scenario
}

/// The sign-in page, for a gateway that needs tokens.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        section.card.login {
            h1 { "Sign in" }
            p.lede { "This hub asks for a token. Make one on the hub with " code { "majordome token create NAME" } "." }
            @if let Some(error) = error {
                p.notice.error role="alert" { (error) }
            }
            form method="post" action="/login" {
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button.primary type="submit" { "Sign in" }
            }
        }
    }
}

/// A page that could not be drawn: what failed, in words.
pub fn failure(what: &str, why: &str) -> Markup {
    html! {
        h1 { (what) }
        p.notice.error role="alert" { (why) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn inventory() -> Value {
        json!({
            "devices": {
                "u1": {"uuid": "u1", "name": "Lamp <b>", "type": "switch", "room": "Kitchen", "stale": false,
                       "values": {"state": {"level": 255, "unit": "level", "timestamp": 1.0}}},
                "u2": {"uuid": "u2", "name": "Dimmer", "type": "dimmer", "room": "", "stale": true,
                       "values": {"state": {"level": 40, "unit": "percent"}}},
                "u3": {"uuid": "u3", "name": "Heating", "type": "thermostat", "room": "Kitchen", "values": {}},
            },
            "schema": {"types": {
                "switch": {"commands": {"on": {"parameters": []}, "off": {"parameters": []}},
                           "values": {"state": {"event": "event.device.statechanged", "unit": "level"}}},
                "dimmer": {"commands": {"on": {"parameters": []}, "off": {"parameters": []},
                           "setlevel": {"parameters": [{"key": "level", "type": "integer", "min": 0.0, "max": 100.0, "required": true}]}},
                           "values": {"state": {"event": "event.device.statechanged", "unit": "percent"}}},
                "thermostat": {"commands": {
                    "settemperature": {"parameters": [{"key": "temperature", "type": "number", "min": 5.0, "max": 35.0, "required": true}]},
                    "setthermostatmode": {"parameters": [{"key": "mode", "type": "string", "choices": ["off", "heat"], "required": true}]}},
                    "values": {"setpoint": {"event": "event.environment.setpointchanged", "unit": "degC"}}}
            }}
        })
    }

    #[test]
    fn the_home_page_groups_by_room_escapes_names_and_draws_controls_from_the_schema() {
        let page = home(&inventory()).into_string();
        // Kitchen before "No room"; the name escaped.
        let kitchen = page.find("<h2>Kitchen</h2>").unwrap();
        assert!(page.find("<h2>No room</h2>").unwrap() > kitchen);
        assert!(page.contains("Lamp &lt;b&gt;") && !page.contains("Lamp <b>"));
        // The lamp is on: its switch says so and would send "off".
        assert!(page.contains(r#"name="command" value="off""#), "{page}");
        assert!(page.contains(r#"aria-checked="true" aria-label="Lamp &lt;b&gt; on or off" data-toggle="u1/state""#));
        // The dimmer: a slider at 40, and stale.
        assert!(
            page.contains(r#"type="range" name="level" min="0" max="100" step="1" value="40""#),
            "{page}"
        );
        assert!(page.contains(r#"data-device="u2" data-stale="true""#));
        // The thermostat: bounds from the schema, choices as a select, a
        // value not sent yet shown as a dash.
        assert!(page.contains(r#"min="5" max="35""#), "{page}");
        assert!(page.contains(r#"<option value="heat">heat</option>"#));
        assert!(page
            .contains(r#"data-value="u3/setpoint" data-event="event.environment.setpointchanged" data-unit="degC">–"#));
    }

    #[test]
    fn values_read_as_people_write_them() {
        assert_eq!(format_value(&json!(255), "level"), "On");
        assert_eq!(format_value(&json!(0), "level"), "Off");
        assert_eq!(format_value(&json!(18.3456), "degC"), "18.35");
        assert_eq!(format_value(&json!(-0.001), "degC"), "0");
        assert_eq!(format_value(&json!("heat"), ""), "heat");
        assert_eq!(unit_text("degC"), "°C");
        assert_eq!(command_label("settemperature", false), "Set temperature");
        assert_eq!(command_label("open", true), "Open");
    }

    #[test]
    fn a_plugin_page_has_its_config_form_with_the_manifest_s_bounds() {
        let client = json!({"name": "fake", "status": "alive", "pid": 42});
        let manifest = json!({"command": ["majordome"], "version": "1", "description": "d", "config": [
            {"key": "interval", "type": "number", "min": 0.05, "max": 3600.0, "default": 5, "required": false},
            {"key": "unit", "type": "string", "choices": ["degC", "degF"], "default": "degC"}]});
        let config = json!({"configured": true, "data": {"interval": 2, "unit": "degF"}});
        let page = plugin(&PluginView {
            id: "plugin-fake.box",
            client: Some(&client),
            manifest: Some(&manifest),
            config: Some(&config),
            history: &[json!({"status": "alive", "time": 1.0, "comment": ""})],
            log: Ok(vec!["started <now>".into()]),
        })
        .into_string();
        assert!(
            page.contains(r#"name="interval" id="field-interval" step="any""#),
            "{page}"
        );
        assert!(page.contains(r#"min="0.05" max="3600" value="2""#), "{page}");
        assert!(page.contains(r#"<option value="degF" selected>degF</option>"#));
        assert!(page.contains("0.05 to 3600 · default 5"));
        assert!(page.contains("started &lt;now&gt;"));
        // Running: Start is off, Stop is on.
        assert!(page.contains(r#"data-when="stopped" disabled"#), "{page}");
        assert!(!page.contains(r#"data-when="running" disabled"#));
    }
}
