//! The engine: every scenario, its triggers' state and its runs, as a state
//! machine that one thread owns. It takes typed inputs with the time as an
//! argument (`now`, unix seconds, from the real clock or a test's) and
//! leaves [`Effect`]s in an outbox for the thread around it to carry out;
//! what an effect did comes back as [`Engine::done`]. It touches no socket,
//! no database and no clock, so its tests drive it with made-up events and
//! time.
//!
//! A run goes through its actions in order. An action that needs the bus
//! (a command, a call, a Clone write, a publish, a script) is an effect the
//! run waits for; a delay or a wait is a timer here; `run`, `stop` and
//! `log` are done at once. A run ends `ok`, `failed` (an action's error, a
//! wait's timeout), `stopped` (by hand, by its mode, by a change of its
//! scenario, at shutdown) or `skipped` (a condition did not hold). Every
//! run is recorded ([`Effect::Record`]) with what fired it, each condition
//! and its value, and each action with its result.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::model::{self, Action, Condition, Mode, Scenario, Trigger};
use crate::schedule::{self, Place};
use majordome_state::json_value;

/// How many scenarios may start one another (`run` actions) with no time
/// passing, before the next `run` fails.
pub const MAX_CHAIN: u64 = 16;

/// Triggers one scenario may take at once (`burst`), and a second after
/// that (`per_second`): a scenario fired faster for long is taken for a
/// loop (its own publish or set that fires it again, through the bus) and
/// what fires it is ignored until it slows down. Runs by hand are not
/// counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TriggerBudget {
    pub burst: f64,
    pub per_second: f64,
}

impl Default for TriggerBudget {
    fn default() -> Self {
        TriggerBudget {
            burst: 1000.0,
            per_second: 100.0,
        }
    }
}

/// A run's number, unique while the engine lives.
pub type RunId = u64;

/// Reads a Clone key's current value, for a condition's script.
pub type Read<'a> = &'a dyn Fn(&str) -> Option<Value>;

/// Evaluates a Lua condition with its context and what it may read: true,
/// false or why not.
pub type ConditionScript = std::sync::Arc<dyn Fn(&str, &Value, Read) -> Result<bool, String> + Send + Sync>;

/// What the engine needs to know of its world, fixed for its life.
#[derive(Clone)]
pub struct EngineSettings {
    /// The hub's time zone: cron and time conditions are in local time.
    pub zone: jiff::tz::TimeZone,
    /// Where the hub is, for sun triggers.
    pub place: Option<Place>,
    /// Evaluates a Lua condition (`script`): true, false or why not. Given
    /// by the service (with its limits), or a stand-in by tests.
    pub condition_script: ConditionScript,
    /// How fast one scenario's triggers may start runs.
    pub trigger_budget: TriggerBudget,
}

/// Something the engine needs done outside.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `device.command.do` through the device service; the run waits.
    Command {
        run: RunId,
        device: String,
        command: String,
        data: Map<String, Value>,
    },
    /// Any service; the run waits.
    Call {
        run: RunId,
        service: String,
        action: String,
        data: Value,
    },
    /// A Clone write; the run waits for its acknowledgement.
    Set { run: RunId, key: String, value: Value },
    /// An event; the run waits until it is sent.
    Publish { run: RunId, category: String, data: Value },
    /// A Lua action, with what it may read; the run waits.
    Script { run: RunId, lua: String, context: Value },
    /// The scenario's live state: `/scenario/<name>/<field>`.
    Live {
        name: String,
        field: &'static str,
        value: Value,
    },
    /// The scenario's device state (running: 255, idle: 0).
    Running { name: String, running: bool },
    /// A finished run, for the history.
    Record(Value),
}

/// The engine's counters (`scenario` / `stats.get`, `majordome status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub events: u64,
    pub state_changes: u64,
    pub triggers_fired: u64,
    pub runs_started: u64,
    pub runs_ok: u64,
    pub runs_failed: u64,
    pub runs_stopped: u64,
    pub runs_skipped: u64,
    /// Triggers ignored because the scenario ran (`single`).
    pub ignored_running: u64,
    /// Triggers dropped because `max_runs` were running or waiting.
    pub dropped_max_runs: u64,
    /// Triggers ignored because their scenario fired too fast (a loop?).
    pub throttled: u64,
}

/// A scenario as the engine keeps it: what it is, and its triggers' state.
struct Loaded {
    scenario: Scenario,
    /// Per trigger: when a time trigger fires next, a value trigger's
    /// last side of its range and when a held one fires.
    triggers: Vec<TriggerState>,
    /// Runs in progress, oldest first.
    active: Vec<RunId>,
    /// `queued`: what fired while it ran, to run in turn.
    queue: VecDeque<Value>,
    last_run: Option<f64>,
    last_result: Option<String>,
    /// What its triggers may still start (the [`TriggerBudget`]'s burst at
    /// most), as of `budget_at`; and whether they are being ignored.
    budget: f64,
    budget_at: f64,
    throttled: bool,
}

#[derive(Default)]
struct TriggerState {
    next: Option<f64>,
    in_range: Option<bool>,
    hold_until: Option<f64>,
    cron: Option<croner::Cron>,
}

/// What a run waits for.
#[derive(Debug, Clone, PartialEq)]
enum Waiting {
    Nothing,
    /// The effect of the current action.
    Effect,
    /// A delay's end.
    Until(f64),
    /// A wait's condition, or its deadline.
    Condition(Box<Condition>, f64),
}

struct Run {
    name: String,
    trigger: Value,
    by_hand: bool,
    started: f64,
    /// The action being done.
    step: usize,
    step_started: f64,
    waiting: Waiting,
    conditions: Vec<Value>,
    actions: Vec<Value>,
}

impl Run {
    fn new(name: &str, trigger: Value, by_hand: bool, now: f64) -> Run {
        Run {
            name: name.to_owned(),
            trigger,
            by_hand,
            started: now,
            step: 0,
            step_started: now,
            waiting: Waiting::Nothing,
            conditions: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// What the history keeps of it, ended at `now`.
    fn record(&self, id: RunId, ending: Ending, error: Option<String>, now: f64) -> Value {
        json!({
            "run": id, "scenario": self.name, "trigger": self.trigger, "by_hand": self.by_hand,
            "started": self.started, "finished": now, "duration": (now - self.started).max(0.0),
            "result": ending.word(), "error": error, "conditions": self.conditions, "actions": self.actions,
        })
    }
}

/// The engine. See the module's documentation.
pub struct Engine {
    settings: EngineSettings,
    scenarios: BTreeMap<String, Loaded>,
    runs: BTreeMap<RunId, Run>,
    next_run: RunId,
    /// Every Clone key's value as it came (its bytes are shared with the
    /// service's mirror, so this map costs keys and pointers, not a copy),
    /// decoded when a trigger or a condition looks at it.
    values: BTreeMap<String, Bytes>,
    /// The value before the last change, only for the keys that a
    /// `changed` comparison names ([`Engine::watch_changes`]): keeping it
    /// for every key would hold a second copy of the whole state.
    previous: BTreeMap<String, Bytes>,
    changed_keys: BTreeSet<String>,
    outbox: Vec<Effect>,
    counters: Counters,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Ok,
    Failed,
    Stopped,
    Skipped,
}

impl Ending {
    fn word(self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::Failed => "failed",
            Ending::Stopped => "stopped",
            Ending::Skipped => "skipped",
        }
    }
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Engine {
        Engine {
            settings,
            scenarios: BTreeMap::new(),
            runs: BTreeMap::new(),
            next_run: 1,
            values: BTreeMap::new(),
            previous: BTreeMap::new(),
            changed_keys: BTreeSet::new(),
            outbox: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// The effects to carry out, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.outbox)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every scenario, by name.
    pub fn scenarios(&self) -> impl Iterator<Item = &Scenario> {
        self.scenarios.values().map(|l| &l.scenario)
    }

    pub fn get(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.get(name).map(|l| &l.scenario)
    }

    /// A scenario's live state: enabled, running, last run and result.
    pub fn status(&self, name: &str) -> Option<Value> {
        let loaded = self.scenarios.get(name)?;
        Some(json!({
            "enabled": loaded.scenario.enabled,
            "running": loaded.active.len(),
            "queued": loaded.queue.len(),
            "last_run": loaded.last_run,
            "last_result": loaded.last_result,
            "next": loaded.triggers.iter().filter_map(|t| t.next).reduce(f64::min),
        }))
    }

    /// The runs of `name` in progress.
    pub fn running(&self, name: &str) -> usize {
        self.scenarios.get(name).map_or(0, |l| l.active.len())
    }

    /// Adds or replaces a scenario (checked already). A replaced one's
    /// runs are stopped.
    pub fn upsert(&mut self, scenario: Scenario, now: f64) {
        let name = scenario.name.clone();
        let (last_run, last_result) = match self.scenarios.get(&name) {
            Some(old) => (old.last_run, old.last_result.clone()),
            None => (None, None),
        };
        self.stop_all(&name, now, "the scenario was changed");
        let triggers = scenario.triggers.iter().map(|_| TriggerState::default()).collect();
        let enabled = scenario.enabled;
        self.scenarios.insert(
            name.clone(),
            Loaded {
                scenario,
                triggers,
                active: Vec::new(),
                queue: VecDeque::new(),
                last_run,
                last_result,
                budget: self.settings.trigger_budget.burst,
                budget_at: now,
                throttled: false,
            },
        );
        self.watch_changes();
        self.arm(&name, now);
        self.live(&name, "enabled", Value::Bool(enabled));
        self.live(&name, "running", json!(0));
    }

    /// Removes a scenario, stopping its runs. Whether it was there.
    pub fn remove(&mut self, name: &str, now: f64) -> bool {
        self.stop_all(name, now, "the scenario was deleted");
        let removed = self.scenarios.remove(name).is_some();
        self.watch_changes();
        removed
    }

    /// Recomputes the keys whose previous value is kept: those a `changed`
    /// comparison names, anywhere in a scenario. A key newly watched starts
    /// with its current value as its previous one (nothing changed yet).
    fn watch_changes(&mut self) {
        let mut keys = BTreeSet::new();
        for loaded in self.scenarios.values() {
            let scenario = &loaded.scenario;
            let waits = scenario.actions.iter().filter_map(|action| match action {
                Action::Wait { until, .. } => Some(until.as_ref()),
                _ => None,
            });
            for condition in scenario.conditions.iter().chain(waits) {
                changed_keys_of(condition, &mut keys);
            }
        }
        self.previous.retain(|key, _| keys.contains(key));
        for key in &keys {
            if !self.previous.contains_key(key) {
                if let Some(value) = self.values.get(key) {
                    self.previous.insert(key.clone(), value.clone());
                }
            }
        }
        self.changed_keys = keys;
    }

    /// Enables or disables a scenario; disabling stops its runs.
    pub fn set_enabled(&mut self, name: &str, enabled: bool, now: f64) -> bool {
        let Some(loaded) = self.scenarios.get_mut(name) else {
            return false;
        };
        loaded.scenario.enabled = enabled;
        if !enabled {
            self.stop_all(name, now, "the scenario was disabled");
        }
        self.arm(name, now);
        self.live(name, "enabled", Value::Bool(enabled));
        true
    }

    /// Sets every cron and sun trigger again from `now`: after the clock
    /// moved (the test clock), the times it jumped over are not taken as
    /// missed. A value held for `for` seconds keeps its time: a jump past
    /// it fires it, as if the time had passed.
    pub fn rearm(&mut self, now: f64) {
        let (zone, place) = (self.settings.zone.clone(), self.settings.place);
        for loaded in self.scenarios.values_mut().filter(|l| l.scenario.enabled) {
            for (trigger, state) in loaded.scenario.triggers.iter().zip(loaded.triggers.iter_mut()) {
                schedule_next(trigger, state, now, &zone, place);
            }
        }
    }

    /// Fires every enabled scenario's `startup` triggers.
    pub fn start(&mut self, now: f64) {
        let starting: Vec<String> = self
            .scenarios
            .values()
            .filter(|l| l.scenario.enabled && l.scenario.triggers.iter().any(|t| matches!(t, Trigger::Startup {})))
            .map(|l| l.scenario.name.clone())
            .collect();
        for name in starting {
            self.fire(&name, json!({"trigger": "startup"}), now);
        }
    }

    /// Sets each trigger's timers and starting state.
    fn arm(&mut self, name: &str, now: f64) {
        let zone = self.settings.zone.clone();
        let place = self.settings.place;
        let values = &self.values;
        let Some(loaded) = self.scenarios.get_mut(name) else {
            return;
        };
        let enabled = loaded.scenario.enabled;
        for (trigger, state) in loaded.scenario.triggers.iter().zip(loaded.triggers.iter_mut()) {
            *state = TriggerState::default();
            if !enabled {
                continue;
            }
            schedule_next(trigger, state, now, &zone, place);
            if let Trigger::Value {
                device,
                quantity,
                above,
                below,
                ..
            } = trigger
            {
                // Known now: only a crossing into the range fires.
                let current = values.get(&value_key(device, quantity)).map(|v| json_value(v));
                state.in_range = level(current.as_ref()).map(|l| in_range(l, *above, *below));
            }
        }
    }

    /// An event from the bus.
    pub fn event(&mut self, category: &str, data: &Value, now: f64) {
        self.counters.events += 1;
        let mut fired = Vec::new();
        for loaded in self.scenarios.values().filter(|l| l.scenario.enabled) {
            for trigger in &loaded.scenario.triggers {
                if let Trigger::Event {
                    category: prefix,
                    matches,
                } = trigger
                {
                    let matched = category.starts_with(prefix.as_str())
                        && matches
                            .iter()
                            .all(|(path, want)| model::compare(model::at_path(data, path), model::Op::Eq, want, None));
                    if matched {
                        fired.push((
                            loaded.scenario.name.clone(),
                            json!({"trigger": "event", "category": category, "data": data}),
                        ));
                        break;
                    }
                }
            }
        }
        for (name, trigger) in fired {
            self.fire(&name, trigger, now);
        }
    }

    /// A Clone key changed (`None`: deleted), its value as it came.
    pub fn state(&mut self, key: &str, value: Option<Bytes>, now: f64) {
        self.counters.state_changes += 1;
        let before = match &value {
            Some(value) => self.values.insert(key.to_owned(), value.clone()),
            None => self.values.remove(key),
        };
        if self.changed_keys.contains(key) {
            match &before {
                Some(before) => {
                    self.previous.insert(key.to_owned(), before.clone());
                }
                None => {
                    self.previous.remove(key);
                }
            }
        }
        if before == value {
            return;
        }
        // Decoded once, and only if a trigger looks at this key.
        let decoded_pair = std::cell::OnceCell::new();
        let decode_one = |v: Option<&Bytes>| v.map(|v| json_value(v));
        let pair = || decoded_pair.get_or_init(|| (decode_one(value.as_ref()), decode_one(before.as_ref())));
        let mut fired = Vec::new();
        for loaded in self.scenarios.values_mut().filter(|l| l.scenario.enabled) {
            let name = loaded.scenario.name.clone();
            for (trigger, state) in loaded.scenario.triggers.iter().zip(loaded.triggers.iter_mut()) {
                match trigger {
                    Trigger::State { key: watched } => {
                        let hit = if watched.ends_with('/') {
                            key.starts_with(watched.as_str())
                        } else {
                            key == watched
                        };
                        if hit {
                            let (value, before) = pair();
                            fired.push((
                                name.clone(),
                                json!({"trigger": "state", "key": key, "value": value, "previous": before}),
                            ));
                        }
                    }
                    Trigger::Value {
                        device,
                        quantity,
                        above,
                        below,
                        hold,
                    } if is_value_key(key, device, quantity) => {
                        let (value, before) = pair();
                        let Some(level) = level(value.as_ref()) else { continue };
                        let inside = in_range(level, *above, *below);
                        let was = state.in_range.replace(inside);
                        if !inside {
                            state.hold_until = None;
                        } else if was == Some(false) {
                            let data = json!({"trigger": "value", "device": device, "quantity": quantity,
                                              "value": level, "previous": level_of(before.as_ref())});
                            match hold.filter(|h| *h > 0.0) {
                                Some(hold) => {
                                    state.hold_until = Some(now + hold);
                                    state.next = None;
                                }
                                None => fired.push((name.clone(), data)),
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        for (name, trigger) in fired {
            self.fire(&name, trigger, now);
        }
        self.recheck_waits(now, |condition| reads_key(condition, key));
    }

    /// The earliest time something is due: a delay, a wait's deadline, a
    /// held value, a cron or sun trigger.
    pub fn next_wakeup(&self) -> Option<f64> {
        let runs = self.runs.values().filter_map(|run| match &run.waiting {
            Waiting::Until(at) | Waiting::Condition(_, at) => Some(*at),
            _ => None,
        });
        let triggers = self
            .scenarios
            .values()
            .flat_map(|l| l.triggers.iter())
            .flat_map(|t| [t.next, t.hold_until])
            .flatten();
        runs.chain(triggers).reduce(f64::min)
    }

    /// Does what is due at `now`.
    pub fn tick(&mut self, now: f64) {
        // Time triggers and held values.
        let zone = self.settings.zone.clone();
        let place = self.settings.place;
        let mut fired = Vec::new();
        for loaded in self.scenarios.values_mut().filter(|l| l.scenario.enabled) {
            let name = loaded.scenario.name.clone();
            for (trigger, state) in loaded.scenario.triggers.iter().zip(loaded.triggers.iter_mut()) {
                if let Some(due) = state.hold_until.filter(|at| *at <= now) {
                    state.hold_until = None;
                    if let Trigger::Value {
                        device, quantity, hold, ..
                    } = trigger
                    {
                        fired.push((
                            name.clone(),
                            json!({"trigger": "value", "device": device, "quantity": quantity, "for": hold,
                                   "scheduled": due}),
                        ));
                    }
                }
                let Some(due) = state.next.filter(|at| *at <= now) else {
                    continue;
                };
                match trigger {
                    Trigger::Cron { cron } => {
                        fired.push((name.clone(), json!({"trigger": "cron", "cron": cron, "scheduled": due})));
                        state.next = state
                            .cron
                            .as_ref()
                            .and_then(|c| schedule::next_cron(c, now.max(due), &zone));
                    }
                    Trigger::Sun { event, offset } => {
                        fired.push((
                            name.clone(),
                            json!({"trigger": "sun", "event": event, "offset": offset, "scheduled": due}),
                        ));
                        state.next = place.and_then(|p| schedule::next_sun(p, *event, *offset, now.max(due)));
                    }
                    _ => state.next = None,
                }
            }
        }
        for (name, trigger) in fired {
            self.fire(&name, trigger, now);
        }
        // Waits for a time of day: the time moved.
        self.recheck_waits(now, reads_the_time);
        // Delays and waits that are over.
        let due: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, run)| matches!(run.waiting, Waiting::Until(at) | Waiting::Condition(_, at) if at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(run) = self.runs.get_mut(&id) else { continue };
            match std::mem::replace(&mut run.waiting, Waiting::Nothing) {
                Waiting::Until(_) => {
                    self.step_done(id, Ok(Value::Null), now);
                }
                Waiting::Condition(_, _) => {
                    self.step_done(id, Err("the wait timed out".into()), now);
                }
                other => run.waiting = other,
            }
        }
    }

    /// Runs `name` now, as asked (its conditions skipped, its mode kept).
    pub fn run_by_hand(&mut self, name: &str, now: f64) -> Result<(), String> {
        if !self.scenarios.contains_key(name) {
            return Err(format!("no scenario '{name}'"));
        }
        self.start_or_queue(name, json!({"trigger": "manual"}), true, now);
        Ok(())
    }

    /// Stops every run of `name` (and what waits in its queue); how many.
    pub fn stop(&mut self, name: &str, now: f64) -> usize {
        self.stop_all(name, now, "stopped by request")
    }

    /// Stops everything, at shutdown.
    pub fn shutdown(&mut self, now: f64) {
        let names: Vec<String> = self.scenarios.keys().cloned().collect();
        for name in names {
            self.stop_all(&name, now, "the scenario service stopped");
        }
    }

    /// What an effect did. A late answer, for a run that is gone, is
    /// ignored.
    pub fn done(&mut self, run: RunId, outcome: Result<Value, String>, now: f64) {
        if self.runs.get(&run).is_some_and(|r| r.waiting == Waiting::Effect) {
            self.step_done(run, outcome, now);
        }
    }

    /// A trigger fired: a run, if the scenario's mode lets it.
    fn fire(&mut self, name: &str, trigger: Value, now: f64) {
        self.counters.triggers_fired += 1;
        let Some(loaded) = self.scenarios.get_mut(name) else {
            return;
        };
        // A token bucket: `burst` at once, `per_second` after that.
        let TriggerBudget { burst, per_second } = self.settings.trigger_budget;
        let refill = (now - loaded.budget_at).max(0.0) * per_second;
        loaded.budget = (loaded.budget + refill).min(burst);
        loaded.budget_at = now;
        if loaded.budget < 1.0 {
            self.counters.throttled += 1;
            if !std::mem::replace(&mut loaded.throttled, true) {
                let why = format!(
                    "fired more than {burst} times, {per_second} a second or faster: a loop (its own \
                     publish or set firing it again)? What fires it is ignored until it slows down \
                     ([scenario] trigger_burst, triggers_per_second)"
                );
                tracing::warn!(scenario = %name, "{why}");
                let id = self.next_run;
                self.next_run += 1;
                let record = Run::new(name, trigger, false, now).record(id, Ending::Skipped, Some(why), now);
                self.outbox.push(Effect::Record(record));
            }
            return;
        }
        loaded.budget -= 1.0;
        loaded.throttled = false;
        self.start_or_queue(name, trigger, false, now);
    }

    fn start_or_queue(&mut self, name: &str, trigger: Value, by_hand: bool, now: f64) {
        let Some(loaded) = self.scenarios.get_mut(name) else {
            return;
        };
        let (mode, max) = (loaded.scenario.mode, loaded.scenario.max_runs as usize);
        let running = loaded.active.len();
        match mode {
            Mode::Single if running > 0 => {
                self.counters.ignored_running += 1;
                return;
            }
            Mode::Restart if running > 0 => {
                self.stop_all(name, now, "restarted by a new trigger");
            }
            Mode::Queued if running > 0 => {
                if running + loaded.queue.len() >= max {
                    self.counters.dropped_max_runs += 1;
                } else {
                    let mut trigger = trigger;
                    trigger["by_hand"] = Value::Bool(by_hand);
                    loaded.queue.push_back(trigger);
                }
                return;
            }
            Mode::Parallel if running >= max => {
                self.counters.dropped_max_runs += 1;
                return;
            }
            _ => {}
        }
        self.begin(name, trigger, by_hand, now);
    }

    /// A new run: its conditions (unless by hand), then its first action.
    fn begin(&mut self, name: &str, trigger: Value, by_hand: bool, now: f64) {
        let Some(loaded) = self.scenarios.get(name) else {
            return;
        };
        let id = self.next_run;
        self.next_run += 1;
        self.counters.runs_started += 1;
        let mut run = Run::new(name, trigger, by_hand, now);
        let mut passed = true;
        if !by_hand {
            for condition in &loaded.scenario.conditions {
                let (holds, value) = self.evaluate(condition, &run.trigger, now);
                run.conditions.push(json!({
                    "condition": condition, "passed": holds, "value": value,
                }));
                if !holds {
                    passed = false;
                    break;
                }
            }
        }
        self.runs.insert(id, run);
        if !passed {
            self.finish(id, Ending::Skipped, Some("a condition did not hold".into()), now);
            return;
        }
        if let Some(loaded) = self.scenarios.get_mut(name) {
            loaded.active.push(id);
            let running = loaded.active.len();
            self.live(name, "running", json!(running));
            if running == 1 {
                self.outbox.push(Effect::Running {
                    name: name.to_owned(),
                    running: true,
                });
            }
        }
        self.advance(id, now);
    }

    /// Does the run's actions from its current one until one must wait.
    fn advance(&mut self, id: RunId, now: f64) {
        loop {
            let Some(run) = self.runs.get_mut(&id) else { return };
            let Some(loaded) = self.scenarios.get(&run.name) else {
                return;
            };
            let Some(action) = loaded.scenario.actions.get(run.step).cloned() else {
                self.finish(id, Ending::Ok, None, now);
                return;
            };
            run.step_started = now;
            let effect = match &action {
                Action::Command { device, command, data } => Some(Effect::Command {
                    run: id,
                    device: device.clone(),
                    command: command.clone(),
                    data: data.clone(),
                }),
                Action::Call { service, request, data } => Some(Effect::Call {
                    run: id,
                    service: service.clone(),
                    action: request.clone(),
                    data: if data.is_null() { json!({}) } else { data.clone() },
                }),
                Action::Set { key, value } => Some(Effect::Set {
                    run: id,
                    key: key.clone(),
                    value: value.clone(),
                }),
                Action::Publish { category, data } => Some(Effect::Publish {
                    run: id,
                    category: category.clone(),
                    data: data.clone(),
                }),
                Action::Script { lua } => Some(Effect::Script {
                    run: id,
                    lua: lua.clone(),
                    context: json!({"trigger": run.trigger, "scenario": run.name}),
                }),
                _ => None,
            };
            if let Some(effect) = effect {
                run.waiting = Waiting::Effect;
                self.outbox.push(effect);
                return;
            }
            match action {
                Action::Delay { seconds } => {
                    run.waiting = Waiting::Until(now + seconds);
                    return;
                }
                Action::Wait { until, timeout } => {
                    let trigger = run.trigger.clone();
                    let (holds, _) = self.evaluate(&until, &trigger, now);
                    if !holds {
                        if let Some(run) = self.runs.get_mut(&id) {
                            run.waiting = Waiting::Condition(until, now + timeout);
                        }
                        return;
                    }
                    self.record_step(id, Ok(json!("the condition held")), now);
                }
                Action::Log { message } => {
                    tracing::info!(scenario = %run.name, "{message}");
                    self.record_step(id, Ok(json!(message)), now);
                }
                Action::Run { scenario } => {
                    // Scenarios that start each other with no time passing
                    // (a scenario that runs itself, two that run each
                    // other) would go on for ever, deeper and deeper: the
                    // chain is counted, and cut.
                    let depth = self.runs.get(&id).map_or(1, |run| {
                        let parent = run.trigger["depth"].as_u64().unwrap_or(0);
                        if run.started == now {
                            parent + 1
                        } else {
                            1
                        }
                    });
                    let outcome = if !self.scenarios.contains_key(&scenario) {
                        Err(format!("no scenario '{scenario}'"))
                    } else if depth > MAX_CHAIN {
                        Err(format!(
                            "{MAX_CHAIN} scenarios started each other with no time passing: \
                             {scenario} is not started again (a delay between them lets a loop go on)"
                        ))
                    } else {
                        let trigger = json!({"trigger": "scenario", "by": id, "depth": depth});
                        self.start_or_queue(&scenario, trigger, true, now);
                        if !self.runs.contains_key(&id) {
                            // It restarted itself: this run is over.
                            return;
                        }
                        Ok(json!(format!("ran {scenario}")))
                    };
                    let failed = outcome.is_err();
                    self.record_step(id, outcome, now);
                    if failed {
                        self.finish(
                            id,
                            Ending::Failed,
                            Some(format!("action {} failed", self.step_of(id))),
                            now,
                        );
                        return;
                    }
                }
                Action::Stop { scenario } => {
                    let stopped = self.stop_all(&scenario, now, "stopped by another scenario");
                    if !self.runs.contains_key(&id) {
                        // It stopped itself.
                        return;
                    }
                    self.record_step(id, Ok(json!(format!("stopped {stopped} run(s) of {scenario}"))), now);
                }
                _ => unreachable!("effects are handled above"),
            }
        }
    }

    fn step_of(&self, id: RunId) -> usize {
        self.runs.get(&id).map_or(0, |r| r.step.saturating_sub(1))
    }

    /// Notes the current action's outcome and moves to the next.
    fn record_step(&mut self, id: RunId, outcome: Result<Value, String>, now: f64) {
        let Some(run) = self.runs.get_mut(&id) else { return };
        let kind = self
            .scenarios
            .get(&run.name)
            .and_then(|l| l.scenario.actions.get(run.step))
            .map(action_kind)
            .unwrap_or("?");
        let mut entry = json!({
            "index": run.step, "action": kind, "started": run.step_started,
            "duration": (now - run.step_started).max(0.0),
        });
        match outcome {
            Ok(result) => entry["result"] = result,
            Err(error) => entry["error"] = Value::String(error),
        }
        run.actions.push(entry);
        run.step += 1;
        run.waiting = Waiting::Nothing;
    }

    /// The current action is over: on to the next, or the run fails.
    fn step_done(&mut self, id: RunId, outcome: Result<Value, String>, now: f64) {
        let failed = outcome.as_ref().err().cloned();
        self.record_step(id, outcome, now);
        match failed {
            Some(why) => {
                let step = self.step_of(id);
                self.finish(id, Ending::Failed, Some(format!("action {step} failed: {why}")), now);
            }
            None => self.advance(id, now),
        }
    }

    /// Waits whose condition now holds go on; only those whose condition
    /// `may_have_changed` are looked at again.
    fn recheck_waits(&mut self, now: f64, may_have_changed: impl Fn(&Condition) -> bool) {
        let waiting: Vec<(RunId, Condition, Value)> = self
            .runs
            .iter()
            .filter_map(|(id, run)| match &run.waiting {
                Waiting::Condition(condition, _) if may_have_changed(condition) => {
                    Some((*id, (**condition).clone(), run.trigger.clone()))
                }
                _ => None,
            })
            .collect();
        for (id, condition, trigger) in waiting {
            if self.evaluate(&condition, &trigger, now).0 {
                self.step_done(id, Ok(json!("the condition held")), now);
            }
        }
    }

    /// Stops every run of `name` and empties its queue; how many runs.
    fn stop_all(&mut self, name: &str, now: f64, why: &str) -> usize {
        let Some(loaded) = self.scenarios.get_mut(name) else {
            return 0;
        };
        loaded.queue.clear();
        let active = loaded.active.clone();
        for id in &active {
            self.finish(*id, Ending::Stopped, Some(why.to_owned()), now);
        }
        active.len()
    }

    /// Ends a run: recorded, counted, its scenario's live state updated;
    /// the next queued run starts.
    fn finish(&mut self, id: RunId, ending: Ending, error: Option<String>, now: f64) {
        let Some(run) = self.runs.remove(&id) else { return };
        match ending {
            Ending::Ok => self.counters.runs_ok += 1,
            Ending::Failed => self.counters.runs_failed += 1,
            Ending::Stopped => self.counters.runs_stopped += 1,
            Ending::Skipped => self.counters.runs_skipped += 1,
        }
        let result = match &error {
            Some(why) => format!("{}: {why}", ending.word()),
            None => ending.word().to_owned(),
        };
        self.outbox.push(Effect::Record(run.record(id, ending, error, now)));
        let name = run.name;
        let Some(loaded) = self.scenarios.get_mut(&name) else {
            return;
        };
        if ending == Ending::Skipped {
            return;
        }
        loaded.active.retain(|other| *other != id);
        loaded.last_run = Some(run.started);
        loaded.last_result = Some(result.clone());
        let running = loaded.active.len();
        let next = if running == 0 { loaded.queue.pop_front() } else { None };
        self.live(&name, "last_run", json!(run.started));
        self.live(&name, "last_result", json!(result));
        self.live(&name, "running", json!(running));
        if running == 0 && next.is_none() {
            self.outbox.push(Effect::Running {
                name: name.clone(),
                running: false,
            });
        }
        if let Some(mut trigger) = next {
            let by_hand = trigger["by_hand"].as_bool().unwrap_or(false);
            if let Some(map) = trigger.as_object_mut() {
                map.remove("by_hand");
            }
            self.begin(&name, trigger, by_hand, now);
        }
    }

    fn live(&mut self, name: &str, field: &'static str, value: Value) {
        self.outbox.push(Effect::Live {
            name: name.to_owned(),
            field,
            value,
        });
    }

    /// Whether a condition holds, and the value it looked at.
    fn evaluate(&self, condition: &Condition, trigger: &Value, now: f64) -> (bool, Value) {
        match condition {
            Condition::Value {
                device,
                quantity,
                op,
                value,
            } => {
                let level_or_all = |v: Value| v.get("level").cloned().unwrap_or(v);
                let (current, before) = self.observed(&value_key(device, quantity), *op);
                let (current, before) = (current.map(level_or_all), before.map(level_or_all));
                let holds = model::compare(current.as_ref(), *op, value, before.as_ref());
                (holds, current.unwrap_or(Value::Null))
            }
            Condition::State { key, op, value } => {
                let (current, before) = self.observed(key, *op);
                let holds = model::compare(current.as_ref(), *op, value, before.as_ref());
                (holds, current.unwrap_or(Value::Null))
            }
            Condition::Time {
                after,
                before,
                weekdays,
            } => {
                let Ok(stamp) = jiff::Timestamp::from_microsecond((now * 1e6) as i64) else {
                    return (false, Value::Null);
                };
                let local = stamp.to_zoned(self.settings.zone.clone());
                let seconds = local.hour() as u32 * 3600 + local.minute() as u32 * 60 + local.second() as u32;
                let after = after.as_deref().and_then(model::time_of_day);
                let before = before.as_deref().and_then(model::time_of_day);
                let in_time = match (after, before) {
                    (Some(a), Some(b)) if a <= b => seconds >= a && seconds < b,
                    // Across midnight.
                    (Some(a), Some(b)) => seconds >= a || seconds < b,
                    (Some(a), None) => seconds >= a,
                    (None, Some(b)) => seconds < b,
                    (None, None) => true,
                };
                let weekday = local.weekday().to_monday_one_offset();
                let on_day = weekdays
                    .as_ref()
                    .is_none_or(|days| days.is_empty() || days.iter().any(|d| d.number() == weekday));
                (in_time && on_day, json!(local.strftime("%a %H:%M:%S").to_string()))
            }
            Condition::Trigger { field, op, value } => {
                let current = model::at_path(trigger, field);
                (
                    model::compare(current, *op, value, None),
                    current.cloned().unwrap_or(Value::Null),
                )
            }
            Condition::And { conditions } => {
                let all = conditions.iter().all(|c| self.evaluate(c, trigger, now).0);
                (all, Value::Null)
            }
            Condition::Or { conditions } => {
                let any = conditions.iter().any(|c| self.evaluate(c, trigger, now).0);
                (any, Value::Null)
            }
            Condition::Not { conditions } => {
                let none = !conditions.iter().any(|c| self.evaluate(c, trigger, now).0);
                (none, Value::Null)
            }
            Condition::Script { lua } => {
                let context = json!({"trigger": trigger, "now": now});
                let read = |key: &str| self.value(key);
                match (self.settings.condition_script)(lua, &context, &read) {
                    Ok(holds) => (holds, Value::Bool(holds)),
                    Err(why) => (false, json!({"error": why})),
                }
            }
        }
    }

    /// A Clone key's current value, for scripts.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.values.get(key).map(|v| json_value(v))
    }

    /// A key's value, and the one before it where `op` compares with it
    /// (`changed`; only then is it decoded).
    fn observed(&self, key: &str, op: model::Op) -> (Option<Value>, Option<Value>) {
        let before = match op {
            model::Op::Changed => self.previous.get(key).map(|v| json_value(v)),
            _ => None,
        };
        (self.value(key), before)
    }

    /// What `scenario` would do now, and why, without doing it: each
    /// trigger's state, each condition with its value, the actions.
    pub fn dry_run(&self, scenario: &Scenario, now: f64) -> Value {
        let trigger = json!({"trigger": "test"});
        let mut conditions = Vec::new();
        let mut all = true;
        for condition in &scenario.conditions {
            let (holds, value) = self.evaluate(condition, &trigger, now);
            all &= holds;
            conditions.push(json!({"condition": condition, "passed": holds, "value": value}));
        }
        let triggers: Vec<Value> = scenario
            .triggers
            .iter()
            .map(|trigger| match trigger {
                Trigger::Cron { cron } => {
                    let next = schedule::parse_cron(cron)
                        .ok()
                        .and_then(|c| schedule::next_cron(&c, now, &self.settings.zone));
                    json!({"trigger": trigger, "next": next})
                }
                Trigger::Sun { event, offset } => {
                    let next = self
                        .settings
                        .place
                        .and_then(|p| schedule::next_sun(p, *event, *offset, now));
                    json!({"trigger": trigger, "next": next})
                }
                Trigger::Value {
                    device,
                    quantity,
                    above,
                    below,
                    ..
                } => {
                    let current = level(self.value(&value_key(device, quantity)).as_ref());
                    json!({"trigger": trigger, "value": current,
                           "in_range": current.map(|l| in_range(l, *above, *below))})
                }
                _ => json!({"trigger": trigger}),
            })
            .collect();
        let running = self.running(&scenario.name);
        let mode_says = match scenario.mode {
            Mode::Single if running > 0 => Some("it runs already: a trigger now would be ignored (mode single)"),
            Mode::Queued if running > 0 => Some("it runs already: a trigger now would wait its turn (mode queued)"),
            Mode::Restart if running > 0 => Some("it runs already: a trigger now would restart it (mode restart)"),
            _ => None,
        };
        json!({
            "would_run": all && mode_says.is_none_or(|_| scenario.mode != Mode::Single),
            "because": if !all { "a condition does not hold now" } else { mode_says.unwrap_or("every condition holds now") },
            "triggers": triggers,
            "conditions": conditions,
            "actions": scenario.actions,
            "enabled": scenario.enabled,
        })
    }
}

/// An action's kind, as its JSON names it.
fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Command { .. } => "command",
        Action::Set { .. } => "set",
        Action::Publish { .. } => "publish",
        Action::Call { .. } => "call",
        Action::Delay { .. } => "delay",
        Action::Wait { .. } => "wait",
        Action::Run { .. } => "run",
        Action::Stop { .. } => "stop",
        Action::Log { .. } => "log",
        Action::Script { .. } => "script",
    }
}

/// When a cron or sun trigger is next due after `now`.
fn schedule_next(
    trigger: &Trigger,
    state: &mut TriggerState,
    now: f64,
    zone: &jiff::tz::TimeZone,
    place: Option<Place>,
) {
    match trigger {
        Trigger::Cron { cron } => {
            if state.cron.is_none() {
                state.cron = schedule::parse_cron(cron).ok();
            }
            state.next = state.cron.as_ref().and_then(|c| schedule::next_cron(c, now, zone));
        }
        Trigger::Sun { event, offset } => {
            state.next = place.and_then(|p| schedule::next_sun(p, *event, *offset, now));
        }
        _ => {}
    }
}

/// A device value's Clone key.
fn value_key(device: &str, quantity: &str) -> String {
    format!("/device/{device}/{quantity}")
}

/// Whether `key` is [`value_key`]`(device, quantity)`, without building it
/// for every key that is not.
fn is_value_key(key: &str, device: &str, quantity: &str) -> bool {
    key.len() == "/device/".len() + device.len() + 1 + quantity.len() && key == value_key(device, quantity)
}

/// Calls `visit` on each condition in `condition` that is not `and`, `or`
/// or `not`.
fn visit_leaves(condition: &Condition, visit: &mut impl FnMut(&Condition)) {
    match condition {
        Condition::And { conditions } | Condition::Or { conditions } | Condition::Not { conditions } => {
            for condition in conditions {
                visit_leaves(condition, visit);
            }
        }
        leaf => visit(leaf),
    }
}

/// Whether `condition` may hold differently once `key` changed. A script
/// may read any key.
fn reads_key(condition: &Condition, key: &str) -> bool {
    let mut reads = false;
    visit_leaves(condition, &mut |leaf| {
        reads |= match leaf {
            Condition::State { key: read, .. } => read == key,
            Condition::Value { device, quantity, .. } => is_value_key(key, device, quantity),
            Condition::Script { .. } => true,
            _ => false,
        }
    });
    reads
}

/// Whether `condition` looks at the time of day.
fn reads_the_time(condition: &Condition) -> bool {
    let mut reads = false;
    visit_leaves(condition, &mut |leaf| reads |= matches!(leaf, Condition::Time { .. }));
    reads
}

/// Adds to `keys` the Clone keys a `changed` comparison in `condition`
/// looks at.
fn changed_keys_of(condition: &Condition, keys: &mut BTreeSet<String>) {
    visit_leaves(condition, &mut |leaf| match leaf {
        Condition::Value {
            device, quantity, op, ..
        } if *op == model::Op::Changed => {
            keys.insert(value_key(device, quantity));
        }
        Condition::State { key, op, .. } if *op == model::Op::Changed => {
            keys.insert(key.clone());
        }
        _ => {}
    });
}

/// A device value's level: the `level` of Clone's `{"level", "unit",
/// "timestamp"}`, or a bare number.
fn level(value: Option<&Value>) -> Option<f64> {
    let value = value?;
    let level = value.get("level").unwrap_or(value);
    match level {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn level_of(value: Option<&Value>) -> Value {
    level(value).map_or(Value::Null, Value::from)
}

fn in_range(level: f64, above: Option<f64>, below: Option<f64>) -> bool {
    above.is_none_or(|a| level > a) && below.is_none_or(|b| level < b)
}
