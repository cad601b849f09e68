//! Scenarios as data: the JSON shape of protocols.md ("Scenarios"), read
//! once into these types, and every check made when one is saved. Pure:
//! no socket, no clock, no database; what the checks need to know of the
//! world (devices, other scenarios) comes in a [`Catalog`].
//!
//! A scenario that cannot be read or fails a check is refused with a
//! [`Refusal`] whose `field` is the path of what is wrong
//! (`triggers[0].cron`, `actions[2].device`), as the service's `reason`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most triggers, conditions (nested ones counted) and actions one
/// scenario may hold, and how deep conditions nest.
pub const MAX_TRIGGERS: usize = 32;
pub const MAX_CONDITIONS: usize = 64;
pub const MAX_ACTIONS: usize = 100;
pub const MAX_DEPTH: usize = 8;
/// The longest delay, wait, `for` or sun offset: a day.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The most runs a `queued` or `parallel` scenario may have at once.
pub const MAX_RUNS: u32 = 100;
/// The longest Lua script, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;

/// One scenario, as stored and exchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// `[a-z0-9_-]{1,64}`, unique.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    #[serde(default)]
    pub mode: Mode,
    /// The most runs at once (`queued`: waiting ones included), 1 to 100.
    #[serde(default = "default_max_runs")]
    pub max_runs: u32,
    /// None: it runs only when asked (`scenario.run.do`, the CLI, the
    /// dashboard, another scenario).
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    /// All must hold when a trigger fires, or the run stops there.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// In order.
    #[serde(default)]
    pub actions: Vec<Action>,
}

fn enabled_by_default() -> bool {
    true
}

fn default_max_runs() -> u32 {
    10
}

/// What a trigger does while the scenario runs already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ignored, and counted.
    #[default]
    Single,
    /// The running one is stopped, a new one starts.
    Restart,
    /// It waits its turn (at most `max_runs` in all).
    Queued,
    /// It runs beside (at most `max_runs` at once).
    Parallel,
}

/// What starts a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "trigger", rename_all = "lowercase", deny_unknown_fields)]
pub enum Trigger {
    /// An event whose category starts with `category`, and whose payload
    /// has each of `match`'s fields (dotted paths) equal to its value.
    Event {
        category: String,
        #[serde(default, rename = "match", skip_serializing_if = "Map::is_empty")]
        matches: Map<String, Value>,
    },
    /// A device's value entering a range: above `above` and/or below
    /// `below`, and staying there for `for` seconds.
    Value {
        device: String,
        quantity: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        above: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        below: Option<f64>,
        #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
        hold: Option<f64>,
    },
    /// A Clone key changing, or any key of a subtree (ending in `/`).
    State { key: String },
    /// A cron expression: 5 fields, or 6 with seconds first, in the hub's
    /// time zone.
    Cron { cron: String },
    /// Sunrise or sunset at the configured place, `offset` seconds after
    /// (negative: before).
    Sun {
        event: SunEvent,
        #[serde(default, skip_serializing_if = "is_zero")]
        offset: f64,
    },
    /// When the scenario service starts (with the hub).
    Startup {},
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum SunEvent {
    Sunrise,
    Sunset,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    /// The value is one of a list.
    In,
    /// The value differs from the one before the trigger (`value` unused).
    Changed,
}

/// What must hold for a run to go on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "condition", rename_all = "lowercase", deny_unknown_fields)]
pub enum Condition {
    /// A device's current value.
    Value {
        device: String,
        quantity: String,
        op: Op,
        #[serde(default)]
        value: Value,
    },
    /// A Clone key's current value.
    State {
        key: String,
        op: Op,
        #[serde(default)]
        value: Value,
    },
    /// The hub's local time: from `after` to `before` (`HH:MM` or
    /// `HH:MM:SS`; across midnight when `after` is later), on `weekdays`.
    Time {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weekdays: Option<Vec<Weekday>>,
    },
    /// A field of what fired (a dotted path in the trigger's data).
    Trigger {
        field: String,
        op: Op,
        #[serde(default)]
        value: Value,
    },
    And {
        conditions: Vec<Condition>,
    },
    Or {
        conditions: Vec<Condition>,
    },
    Not {
        conditions: Vec<Condition>,
    },
    /// A Lua expression or chunk that returns true or false.
    Script {
        lua: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// Monday is 1, Sunday 7 (ISO 8601, as jiff counts them).
    pub fn number(self) -> i8 {
        self as i8 + 1
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// A device command through the device service; a failed result fails
    /// the run.
    Command {
        device: String,
        command: String,
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        data: Map<String, Value>,
    },
    /// A Clone key.
    Set {
        key: String,
        value: Value,
    },
    /// An event on the bus.
    Publish {
        category: String,
        #[serde(default)]
        data: Value,
    },
    /// Any service, in the Domogik dialect; `status: false` fails the run.
    Call {
        service: String,
        request: String,
        #[serde(default)]
        data: Value,
    },
    Delay {
        seconds: f64,
    },
    /// Until the condition holds; past `timeout` seconds the run fails.
    Wait {
        until: Box<Condition>,
        timeout: f64,
    },
    /// Another scenario (its conditions skipped, as by hand).
    Run {
        scenario: String,
    },
    Stop {
        scenario: String,
    },
    Log {
        message: String,
    },
    Script {
        lua: String,
    },
}

/// Why a scenario is refused: what is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Refusal {
    /// A path into the scenario: `name`, `triggers[0].cron`, ….
    pub field: String,
    pub reason: String,
}

impl Refusal {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Refusal {
        Refusal {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Reads a scenario from JSON: an unknown kind, a missing or misspelled
/// field is refused with its path.
pub fn read(value: &Value) -> Result<Scenario, Refusal> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "scenario".to_owned() } else { path };
        Refusal::new(field, e.into_inner().to_string())
    })
}

/// What a device is, as far as checks go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFacts {
    pub name: String,
    /// The commands its type takes.
    pub commands: BTreeSet<String>,
    /// The quantities its type declares and the ones it has sent.
    pub quantities: BTreeSet<String>,
}

/// What the checks need to know of the world.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub devices: BTreeMap<String, DeviceFacts>,
    /// Every scenario's name (the one being saved included).
    pub scenarios: BTreeSet<String>,
    /// Whether a place is configured (sun triggers need one).
    pub has_location: bool,
}

impl Catalog {
    /// From the device service's `inventory.get` answer (ago's shape:
    /// devices by uuid, each with its type, commands and values; the schema
    /// with each type's commands and values).
    pub fn from_inventory(inventory: &Value) -> Catalog {
        let mut catalog = Catalog::default();
        let types = &inventory["schema"]["types"];
        let keys = |value: &Value| -> BTreeSet<String> {
            value
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        if let Some(devices) = inventory["devices"].as_object() {
            for (uuid, device) in devices {
                let kind = &types[device["type"].as_str().unwrap_or_default()];
                let mut quantities = keys(&kind["values"]);
                quantities.extend(keys(&device["values"]));
                catalog.devices.insert(
                    uuid.clone(),
                    DeviceFacts {
                        name: device["name"].as_str().unwrap_or_default().to_owned(),
                        commands: keys(&kind["commands"]),
                        quantities,
                    },
                );
            }
        }
        catalog
    }
}

/// The checks a Lua script must pass at save time (it compiles); given by
/// the caller so that this module stays free of the interpreter.
pub type ScriptCheck<'a> = &'a dyn Fn(&str) -> Result<(), String>;

/// Whether a name is `[a-z0-9_-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Every check of a scenario against the world, in the order of its
/// fields; the first failure is the answer.
pub fn check(scenario: &Scenario, catalog: &Catalog, script: ScriptCheck) -> Result<(), Refusal> {
    if !valid_name(&scenario.name) {
        return Err(Refusal::new(
            "name",
            format!(
                "'{}' is not a scenario name: 1 to 64 lower-case letters, digits, '_' or '-'",
                scenario.name
            ),
        ));
    }
    if scenario.description.len() > 4096 {
        return Err(Refusal::new("description", "at most 4,096 bytes"));
    }
    if !(1..=MAX_RUNS).contains(&scenario.max_runs) {
        return Err(Refusal::new(
            "max_runs",
            format!("must be 1 to {MAX_RUNS}, not {}", scenario.max_runs),
        ));
    }
    if scenario.triggers.len() > MAX_TRIGGERS {
        return Err(Refusal::new("triggers", format!("at most {MAX_TRIGGERS}")));
    }
    for (index, trigger) in scenario.triggers.iter().enumerate() {
        check_trigger(trigger, catalog).map_err(|(field, reason)| at(&format!("triggers[{index}]"), field, reason))?;
    }
    let mut count = 0;
    for (index, condition) in scenario.conditions.iter().enumerate() {
        check_condition(condition, catalog, script, 1, &mut count)
            .map_err(|(field, reason)| at(&format!("conditions[{index}]"), field, reason))?;
    }
    if scenario.actions.len() > MAX_ACTIONS {
        return Err(Refusal::new("actions", format!("at most {MAX_ACTIONS}")));
    }
    for (index, action) in scenario.actions.iter().enumerate() {
        check_action(action, catalog, script, &mut count)
            .map_err(|(field, reason)| at(&format!("actions[{index}]"), field, reason))?;
    }
    Ok(())
}

/// A check's failure: the field below the element, and why.
type Failed = (String, String);

/// `field` below `element`: `triggers[0]` and `cron` make `triggers[0].cron`.
fn join(element: &str, field: &str) -> String {
    if field.is_empty() {
        element.to_owned()
    } else {
        format!("{element}.{field}")
    }
}

fn at(element: &str, field: String, reason: String) -> Refusal {
    Refusal::new(join(element, &field), reason)
}

fn fail(field: &str, reason: impl Into<String>) -> Failed {
    (field.to_owned(), reason.into())
}

fn seconds(field: &str, value: f64) -> Result<(), Failed> {
    if !(0.0..=MAX_SECONDS).contains(&value) {
        return Err(fail(field, format!("must be 0 to {MAX_SECONDS} seconds, not {value}")));
    }
    Ok(())
}

fn text(field: &str, value: &str, most: usize) -> Result<(), Failed> {
    if value.is_empty() || value.len() > most {
        return Err(fail(field, format!("must be 1 to {most} bytes")));
    }
    Ok(())
}

/// A Clone key: `/` first, printable, as the state server takes them.
fn clone_key(field: &str, key: &str, subtree: bool) -> Result<(), Failed> {
    if !key.starts_with('/') || key.len() > 255 || key.chars().any(|c| c.is_control()) {
        return Err(fail(
            field,
            format!("'{key}' is not a Clone key: '/' first, at most 255 bytes"),
        ));
    }
    if !subtree && key.ends_with('/') {
        return Err(fail(field, format!("'{key}' is a subtree; set a key")));
    }
    Ok(())
}

fn device<'c>(catalog: &'c Catalog, uuid: &str) -> Result<&'c DeviceFacts, Failed> {
    catalog.devices.get(uuid).ok_or_else(|| {
        fail(
            "device",
            format!("no device {uuid} (majordome call devices devices.get lists them)"),
        )
    })
}

fn quantity(facts: &DeviceFacts, uuid: &str, quantity: &str) -> Result<(), Failed> {
    if !facts.quantities.contains(quantity) {
        let known: Vec<&str> = facts.quantities.iter().map(String::as_str).collect();
        return Err(fail(
            "quantity",
            format!(
                "device {uuid} ({}) has no quantity '{quantity}' (it has: {})",
                facts.name,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    Ok(())
}

fn check_trigger(trigger: &Trigger, catalog: &Catalog) -> Result<(), Failed> {
    match trigger {
        Trigger::Event { category, matches } => {
            text("category", category, 255)?;
            if matches.keys().any(|k| k.is_empty()) {
                return Err(fail("match", "a field name is empty"));
            }
        }
        Trigger::Value {
            device: uuid,
            quantity: name,
            above,
            below,
            hold,
        } => {
            let facts = device(catalog, uuid)?;
            quantity(facts, uuid, name)?;
            if above.is_none() && below.is_none() {
                return Err(fail("above", "a value trigger needs 'above', 'below' or both"));
            }
            for (field, bound) in [("above", above), ("below", below)] {
                if bound.is_some_and(|b| !b.is_finite()) {
                    return Err(fail(field, "must be a finite number"));
                }
            }
            if let (Some(above), Some(below)) = (above, below) {
                if above >= below {
                    return Err(fail(
                        "below",
                        format!("must be more than 'above' ({above}), or no value is ever in range"),
                    ));
                }
            }
            if let Some(hold) = hold {
                seconds("for", *hold)?;
            }
        }
        Trigger::State { key } => clone_key("key", key, true)?,
        Trigger::Cron { cron } => {
            crate::schedule::parse_cron(cron).map_err(|why| fail("cron", why))?;
        }
        Trigger::Sun { offset, .. } => {
            if !catalog.has_location {
                return Err(fail(
                    "event",
                    "sun triggers need the hub's place: [scenario] latitude and longitude in majordome.toml",
                ));
            }
            if !offset.is_finite() || offset.abs() > MAX_SECONDS {
                return Err(fail(
                    "offset",
                    format!("must be within a day (±{MAX_SECONDS} s), not {offset}"),
                ));
            }
        }
        Trigger::Startup {} => {}
    }
    Ok(())
}

fn check_op(op: Op, value: &Value) -> Result<(), Failed> {
    match op {
        Op::In if !value.is_array() => Err(fail("value", "'in' takes a list of values")),
        Op::Lt | Op::Lte | Op::Gt | Op::Gte if !value.is_number() => Err(fail(
            "value",
            format!("'{op:?}' compares with a number", op = op).to_lowercase(),
        )),
        _ => Ok(()),
    }
}

/// A `HH:MM` or `HH:MM:SS` time of day, in seconds since midnight.
pub fn time_of_day(text: &str) -> Option<u32> {
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let numbers: Option<Vec<u32>> = parts.iter().map(|p| p.parse().ok()).collect();
    let numbers = numbers?;
    let (hour, minute, second) = (numbers[0], numbers[1], numbers.get(2).copied().unwrap_or(0));
    (hour < 24 && minute < 60 && second < 60).then_some(hour * 3600 + minute * 60 + second)
}

fn check_condition(
    condition: &Condition,
    catalog: &Catalog,
    script: ScriptCheck,
    depth: usize,
    count: &mut usize,
) -> Result<(), Failed> {
    *count += 1;
    if *count > MAX_CONDITIONS {
        return Err(fail("", format!("at most {MAX_CONDITIONS} conditions in one scenario")));
    }
    if depth > MAX_DEPTH {
        return Err(fail("", format!("conditions nest at most {MAX_DEPTH} deep")));
    }
    match condition {
        Condition::Value {
            device: uuid,
            quantity: name,
            op,
            value,
        } => {
            let facts = device(catalog, uuid)?;
            quantity(facts, uuid, name)?;
            check_op(*op, value)?;
        }
        Condition::State { key, op, value } => {
            clone_key("key", key, false)?;
            check_op(*op, value)?;
        }
        Condition::Time {
            after,
            before,
            weekdays,
        } => {
            for (field, time) in [("after", after), ("before", before)] {
                if let Some(time) = time {
                    if time_of_day(time).is_none() {
                        return Err(fail(field, format!("'{time}' is not a time of day: HH:MM or HH:MM:SS")));
                    }
                }
            }
            if after.is_none() && before.is_none() && weekdays.as_ref().is_none_or(Vec::is_empty) {
                return Err(fail("after", "a time condition needs 'after', 'before' or 'weekdays'"));
            }
        }
        Condition::Trigger { field, op, value } => {
            text("field", field, 255)?;
            check_op(*op, value)?;
        }
        Condition::And { conditions } | Condition::Or { conditions } | Condition::Not { conditions } => {
            if conditions.is_empty() {
                return Err(fail("conditions", "at least one"));
            }
            for (index, inner) in conditions.iter().enumerate() {
                check_condition(inner, catalog, script, depth + 1, count)
                    .map_err(|(field, reason)| (join(&format!("conditions[{index}]"), &field), reason))?;
            }
        }
        Condition::Script { lua } => check_script(lua, script)?,
    }
    Ok(())
}

fn check_script(lua: &str, script: ScriptCheck) -> Result<(), Failed> {
    if lua.len() > MAX_SCRIPT_BYTES {
        return Err(fail("lua", format!("at most {MAX_SCRIPT_BYTES} bytes")));
    }
    script(lua).map_err(|why| fail("lua", why))
}

fn check_action(action: &Action, catalog: &Catalog, script: ScriptCheck, count: &mut usize) -> Result<(), Failed> {
    match action {
        Action::Command {
            device: uuid, command, ..
        } => {
            let facts = device(catalog, uuid)?;
            if !facts.commands.contains(command) {
                let known: Vec<&str> = facts.commands.iter().map(String::as_str).collect();
                return Err(fail(
                    "command",
                    format!(
                        "device {uuid} ({}) takes no command '{command}' (it takes: {})",
                        facts.name,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        Action::Set { key, .. } => clone_key("key", key, false)?,
        Action::Publish { category, .. } => text("category", category, 255)?,
        Action::Call { service, request, .. } => {
            text("service", service, 255)?;
            text("request", request, 255)?;
        }
        Action::Delay { seconds: value } => seconds("seconds", *value)?,
        Action::Wait { until, timeout } => {
            seconds("timeout", *timeout)?;
            check_condition(until, catalog, script, 1, count)
                .map_err(|(field, reason)| (join("until", &field), reason))?;
        }
        Action::Run { scenario } | Action::Stop { scenario } => {
            if !catalog.scenarios.contains(scenario) {
                return Err(fail("scenario", format!("no scenario '{scenario}'")));
            }
        }
        Action::Log { message } => text("message", message, 4096)?,
        Action::Script { lua } => check_script(lua, script)?,
    }
    Ok(())
}

/// The value at a dotted path (`data.level`, `uuid`) in `value`.
pub fn at_path<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |value, part| match value {
        Value::Object(map) => map.get(part),
        Value::Array(list) => part.parse::<usize>().ok().and_then(|i| list.get(i)),
        _ => None,
    })
}

/// `left op right`, as conditions compare: numbers as numbers (a numeric
/// string counts), anything else by equality.
pub fn compare(left: Option<&Value>, op: Op, right: &Value, before: Option<&Value>) -> bool {
    let number = |value: &Value| match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    };
    let equal = |a: &Value, b: &Value| match (number(a), number(b)) {
        (Some(x), Some(y)) if !a.is_string() || !b.is_string() => x == y,
        _ => a == b,
    };
    let Some(left) = left else {
        return matches!(op, Op::Neq) || (op == Op::Changed && before.is_some());
    };
    match op {
        Op::Eq => equal(left, right),
        Op::Neq => !equal(left, right),
        Op::In => right.as_array().is_some_and(|list| list.iter().any(|v| equal(left, v))),
        Op::Changed => before.is_none_or(|before| !equal(left, before)),
        Op::Lt | Op::Lte | Op::Gt | Op::Gte => match (number(left), number(right)) {
            (Some(x), Some(y)) => match op {
                Op::Lt => x < y,
                Op::Lte => x <= y,
                Op::Gt => x > y,
                _ => x >= y,
            },
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn catalog() -> Catalog {
        let inventory = json!({
            "devices": {
                "lamp": {"type": "switch", "name": "Lamp", "values": {"state": {"level": 0}}},
                "thermo": {"type": "temperaturesensor", "name": "Thermo", "values": {}},
            },
            "schema": {"types": {
                "switch": {"commands": {"on": {}, "off": {}}, "values": {"state": {}}},
                "temperaturesensor": {"commands": {}, "values": {"temperature": {}}},
            }}
        });
        let mut catalog = Catalog::from_inventory(&inventory);
        catalog.scenarios.insert("other".into());
        catalog
    }

    fn no_script(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn refused(scenario: Value) -> Refusal {
        let mut scenario = scenario;
        scenario["name"] = scenario.get("name").cloned().unwrap_or(json!("test"));
        match read(&scenario) {
            Err(refusal) => refusal,
            Ok(scenario) => check(&scenario, &catalog(), &no_script).expect_err("refused"),
        }
    }

    #[test]
    fn the_example_of_protocols_md_reads_and_passes() {
        let scenario = read(&json!({
            "name": "heating", "description": "…", "enabled": true, "mode": "single", "max_runs": 10,
            "triggers": [{"trigger": "value", "device": "thermo", "quantity": "temperature", "below": 19}],
            "conditions": [{"condition": "time", "after": "06:00", "before": "23:00"}],
            "actions": [{"action": "command", "device": "lamp", "command": "on"}]
        }))
        .unwrap();
        check(&scenario, &catalog(), &no_script).unwrap();
        // Written back, it reads the same.
        assert_eq!(read(&serde_json::to_value(&scenario).unwrap()).unwrap(), scenario);
    }

    #[test]
    fn every_bad_input_is_refused_naming_its_field() {
        let cases = [
            (json!({"name": "Bad Name"}), "name"),
            (json!({"max_runs": 0}), "max_runs"),
            (json!({"mode": "sometimes"}), "mode"),
            (json!({"triggers": [{"trigger": "moon"}]}), "triggers[0].trigger"),
            (
                json!({"triggers": [{"trigger": "cron", "cron": "61 * * * *"}]}),
                "triggers[0].cron",
            ),
            (
                json!({"triggers": [{"trigger": "cron", "cron": "* * *"}]}),
                "triggers[0].cron",
            ),
            (
                json!({"triggers": [{"trigger": "value", "device": "nope", "quantity": "x", "below": 1}]}),
                "triggers[0].device",
            ),
            (
                json!({"triggers": [{"trigger": "value", "device": "thermo", "quantity": "humidity", "below": 1}]}),
                "triggers[0].quantity",
            ),
            (
                json!({"triggers": [{"trigger": "value", "device": "thermo", "quantity": "temperature"}]}),
                "triggers[0].above",
            ),
            (
                json!({"triggers": [{"trigger": "sun", "event": "sunset"}]}),
                "triggers[0].event",
            ),
            (
                json!({"triggers": [{"trigger": "state", "key": "device"}]}),
                "triggers[0].key",
            ),
            (
                json!({"triggers": [{"trigger": "event", "category": "x", "colour": 1}]}),
                "triggers[0]",
            ),
            (
                json!({"conditions": [{"condition": "time", "after": "25:00"}]}),
                "conditions[0].after",
            ),
            (
                json!({"conditions": [{"condition": "or", "conditions": [{"condition": "state", "key": "/a", "op": "gt", "value": "x"}]}]}),
                "conditions[0].conditions[0].value",
            ),
            (
                json!({"actions": [{"action": "command", "device": "lamp", "command": "fly"}]}),
                "actions[0].command",
            ),
            (
                json!({"actions": [{"action": "command", "device": "nope", "command": "on"}]}),
                "actions[0].device",
            ),
            (
                json!({"actions": [{"action": "run", "scenario": "missing"}]}),
                "actions[0].scenario",
            ),
            (
                json!({"actions": [{"action": "delay", "seconds": -1}]}),
                "actions[0].seconds",
            ),
            (
                json!({"actions": [{"action": "wait", "timeout": 5, "until": {"condition": "value", "device": "lamp", "quantity": "volume", "op": "eq", "value": 1}}]}),
                "actions[0].until.quantity",
            ),
            (
                json!({"actions": [{"action": "set", "key": "/a/", "value": 1}]}),
                "actions[0].key",
            ),
        ];
        for (scenario, field) in cases {
            let refusal = refused(scenario.clone());
            assert_eq!(refusal.field, field, "{scenario}: {refusal}");
            assert!(!refusal.reason.is_empty());
        }
        // A script that does not compile, through the check given.
        let scenario = read(&json!({"name": "s", "actions": [{"action": "script", "lua": "x ="}]})).unwrap();
        let refusal = check(&scenario, &catalog(), &|_| Err("syntax error near <eof>".into())).unwrap_err();
        assert_eq!(refusal.field, "actions[0].lua");
    }

    #[test]
    fn comparisons_take_numbers_as_numbers() {
        assert!(compare(Some(&json!(18.5)), Op::Lt, &json!(19), None));
        assert!(compare(Some(&json!("18.5")), Op::Lt, &json!(19), None));
        assert!(compare(Some(&json!(255)), Op::Eq, &json!(255.0), None));
        assert!(compare(Some(&json!("on")), Op::In, &json!(["on", "heat"]), None));
        assert!(!compare(Some(&json!("on")), Op::Gt, &json!(1), None));
        assert!(compare(Some(&json!(1)), Op::Changed, &Value::Null, Some(&json!(0))));
        assert!(!compare(Some(&json!(1)), Op::Changed, &Value::Null, Some(&json!(1.0))));
        assert!(compare(None, Op::Neq, &json!(1), None));
        assert_eq!(at_path(&json!({"data": {"level": 3}}), "data.level"), Some(&json!(3)));
        assert_eq!(time_of_day("06:30"), Some(6 * 3600 + 1800));
        assert_eq!(time_of_day("6:30"), None);
    }
}
