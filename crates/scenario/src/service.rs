//! The `scenario` service: the engine's thread and the threads around it,
//! each on the bus through the client library like any plugin.
//!
//! ```text
//!  forwarder ── events ──► follower ─┐
//!  Clone ── every key ───► mirror ───┤
//!  requests ─► handlers (2) ─ asks ──┼─► engine thread ─ effects ─► executors (bus calls,
//!  device commands ──────────────────┘        ▲                     Clone writes, publishes,
//!                                             └──── done ─────────── Lua scripts)
//!                                  records, live state ─► outputs (database, Clone, device)
//! ```
//!
//! A change (new, update, delete, enable, import) is checked, stored
//! durably, and only then handed to the engine and answered: an answered
//! change survives a `kill -9`. Every scenario is also a device of type
//! `scenario` owned by this service's own client id (`core-scenario.<host>`),
//! whose `on`/`run` starts it and `off` stops it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use majordome_client::{
    domogik_handler, unix_now, Client, ClientError, ClientOptions, Message, Publisher, Shutdown, Subscriber, Worker,
    WorkerOptions,
};
use majordome_state::{Change, Mirror, MirrorOptions, Writer, WriterOptions};
use majordome_store::{Committer, Durability, StoreError};
use serde_json::{json, Value};

use crate::engine::{Effect, Engine, EngineSettings, RunId, TriggerBudget};
use crate::lua;
use crate::model::{self, Catalog, Refusal, Scenario};
use crate::schedule::Place;
use crate::store;

/// The service's settings (`[scenario]` in `majordome.toml`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScenarioSettings {
    /// Where the hub is, for sun triggers (degrees; north and east are
    /// positive). Both or neither.
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    /// Runs kept per scenario in the history (100).
    pub history_limit: usize,
    /// Threads that carry out actions (bus calls, scripts) at once (4).
    pub executors: usize,
    /// A clock that `scenario.clock.do {now}` can set, for tests (off).
    pub test_clock: bool,
    /// Runs one scenario's triggers may start at once (1,000), and a
    /// second after that (100): one fired faster for long is taken for a
    /// loop, and what fires it is ignored until it slows down.
    pub trigger_burst: f64,
    pub triggers_per_second: f64,
}

impl Default for ScenarioSettings {
    fn default() -> Self {
        ScenarioSettings {
            latitude: None,
            longitude: None,
            history_limit: 100,
            executors: 4,
            test_clock: false,
            trigger_burst: 1000.0,
            triggers_per_second: 100.0,
        }
    }
}

/// Where the service finds the bus.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub broker: String,
    pub publish: String,
    pub subscribe: String,
    /// The Clone server's base endpoint.
    pub state: String,
    /// This hub's host name (the service's client id is
    /// `core-scenario.<host>`).
    pub host: String,
}

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario database: {0}")]
    Store(#[from] StoreError),
    #[error("scenario database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    Bus(#[from] ClientError),
    #[error("cannot start a scenario thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("[scenario] {0}")]
    Settings(String),
    #[error("the scenario {0} thread panicked")]
    Panicked(&'static str),
}

/// The service's client id, under which its scenarios are devices.
pub fn client_id(host: &str) -> String {
    format!("core-scenario.{host}")
}

/// Inputs (events, Clone changes, answers, requests) waiting for the
/// engine, past which their senders wait.
const INPUT_QUEUE: usize = 1024;

/// Clone updates queued unread in the mirror's socket, and kept while a
/// snapshot arrives, past which the mirror resyncs (a snapshot, then the
/// differences): the engine sees every key's latest value, if not every
/// step between. With values of at most 64 KiB, this bounds what a flood
/// of changes can hold here to a few MiB.
const MIRROR_QUEUE: usize = 100;

/// The actions, for the error that lists them.
const ACTIONS: &str = "scenario.list.get, scenario.get, scenario.new.do, scenario.update.do, scenario.delete.do, \
                       scenario.enable.do, scenario.disable.do, scenario.run.do, scenario.stop.do, scenario.test.do, \
                       scenario.history.get, scenario.export.get, scenario.import.do, stats.get";

/// The clock: the real one, moved by `scenario.clock.do` under
/// `test_clock`.
#[derive(Default)]
struct Clock {
    offset: Mutex<f64>,
}

impl Clock {
    fn now(&self) -> f64 {
        unix_now() + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, now: f64) {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner()) = now - unix_now();
    }
}

/// What the engine's thread is told.
enum Input {
    Event {
        category: String,
        data: Value,
    },
    State {
        key: String,
        value: Option<Bytes>,
    },
    Done {
        run: RunId,
        outcome: Result<Value, String>,
    },
    /// A Lua action reads a key.
    Read {
        key: String,
        reply: mpsc::Sender<Option<Value>>,
    },
    Ask {
        ask: Ask,
        reply: mpsc::Sender<Value>,
    },
}

/// What a request asks of the engine.
enum Ask {
    List,
    Get(String),
    Names,
    Upsert(Vec<Scenario>),
    Delete(String),
    Enable(String, bool),
    Run(String),
    Stop(String),
    Test(Box<Scenario>),
    Stats,
    /// The clock moved: time triggers from the new time.
    Rearm,
}

/// The engine's thread, and a way to ask it.
#[derive(Clone)]
struct EngineHandle {
    inputs: mpsc::SyncSender<Input>,
}

impl EngineHandle {
    fn ask(&self, ask: Ask) -> Value {
        let (reply, answer) = mpsc::channel();
        if self.inputs.send(Input::Ask { ask, reply }).is_err() {
            return json!({"status": false, "reason": "the scenario engine stopped"});
        }
        answer
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| json!({"status": false, "reason": "the scenario engine did not answer"}))
    }
}

/// Runs the service until `shutdown`: opens its tables, loads the stored
/// scenarios, starts the threads, serves `scenario` (and its device
/// commands) at the broker.
pub fn run(
    settings: ScenarioSettings,
    database: &Path,
    durability: Durability,
    endpoints: Endpoints,
    shutdown: &Shutdown,
) -> Result<(), ScenarioError> {
    let place = match (settings.latitude, settings.longitude) {
        (Some(latitude), Some(longitude)) => {
            if !(-90.0..=90.0).contains(&latitude) || !(-180.0..=180.0).contains(&longitude) {
                return Err(ScenarioError::Settings(format!(
                    "latitude {latitude} and longitude {longitude}: -90 to 90 and -180 to 180 degrees"
                )));
            }
            Some(Place { latitude, longitude })
        }
        (None, None) => None,
        _ => return Err(ScenarioError::Settings("latitude and longitude go together".into())),
    };
    if !(settings.trigger_burst >= 1.0 && settings.triggers_per_second > 0.0) {
        return Err(ScenarioError::Settings(format!(
            "trigger_burst {} and triggers_per_second {}: at least 1, and above 0",
            settings.trigger_burst, settings.triggers_per_second
        )));
    }
    let connection = majordome_store::open(database, durability)?;
    connection.execute_batch(store::SCHEMA)?;
    let stored = store::load(&connection)?;
    let committer = majordome_store::shared_committer(database, durability)?;
    let clock = Arc::new(Clock::default());
    // Bounded: a flood of events or Clone changes waits in the sockets
    // (whose own bounds drop and count, or make the mirror resync), not in
    // this process's memory.
    let (inputs, received) = mpsc::sync_channel(INPUT_QUEUE);
    let engine = EngineHandle { inputs: inputs.clone() };
    let stops: Arc<Mutex<HashMap<RunId, Arc<AtomicBool>>>> = Arc::default();

    // Effects: executors for what the runs wait on, one thread for the rest.
    let (work, jobs) = mpsc::channel::<Effect>();
    let jobs = Arc::new(Mutex::new(jobs));
    let (outputs, to_output) = mpsc::channel::<Effect>();
    let mut threads = Vec::new();
    for index in 0..settings.executors.max(1) {
        let (jobs, inputs, endpoints, stops, stop) = (
            jobs.clone(),
            inputs.clone(),
            endpoints.clone(),
            stops.clone(),
            shutdown.clone(),
        );
        threads.push(
            thread::Builder::new()
                .name(format!("scenario-exec-{index}"))
                .spawn(move || execute(jobs, inputs, endpoints, stops, stop))?,
        );
    }
    {
        let (endpoints, committer, stop) = (endpoints.clone(), committer.clone(), shutdown.clone());
        let keep = settings.history_limit.max(1);
        threads.push(
            thread::Builder::new()
                .name("scenario-out".into())
                .spawn(move || output(to_output, endpoints, committer, keep, stop))?,
        );
    }
    // What comes in: events and every Clone key.
    {
        let (inputs, endpoint, stop) = (inputs.clone(), endpoints.subscribe.clone(), shutdown.clone());
        threads.push(
            thread::Builder::new()
                .name("scenario-events".into())
                .spawn(move || follow_events(&endpoint, inputs, &stop))?,
        );
    }
    {
        let (inputs, endpoint, stop) = (inputs.clone(), endpoints.state.clone(), shutdown.clone());
        threads.push(
            thread::Builder::new()
                .name("scenario-state".into())
                .spawn(move || follow_state(&endpoint, inputs, &stop))?,
        );
    }
    // The engine.
    let engine_thread = {
        let (clock, stop, stops) = (clock.clone(), shutdown.clone(), stops.clone());
        let settings = EngineSettings {
            zone: jiff::tz::TimeZone::system(),
            place,
            condition_script: Arc::new(|source, context, read| lua::condition(source, context, read)),
            trigger_budget: TriggerBudget {
                burst: settings.trigger_burst,
                per_second: settings.triggers_per_second,
            },
        };
        thread::Builder::new().name("scenario-engine".into()).spawn(move || {
            drive(
                Engine::new(settings),
                stored,
                received,
                work,
                outputs,
                stops,
                &clock,
                &stop,
            )
        })?
    };

    // The service: two handler threads, each with its own database reader
    // and bus client.
    let service = Arc::new(Service {
        engine,
        committer,
        broker: endpoints.broker.clone(),
        clock,
        test_clock: settings.test_clock,
        has_location: place.is_some(),
    });
    let names = ["scenario".to_owned(), client_id(&endpoints.host)];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = WorkerOptions {
        capacity: 4,
        ..WorkerOptions::default()
    };
    let mut readers = Vec::new();
    for _ in 0..2 {
        readers.push(majordome_store::open(database, durability)?);
    }
    let served = Worker::serving(&endpoints.broker, &names, options).run_pool(
        2,
        |_| {
            let (service, reader) = (service.clone(), readers.pop().expect("one per thread"));
            let mut bus = Client::new(&service.broker, ClientOptions::default()).stop_on(shutdown);
            domogik_handler(move |message: Message| service.handle(&reader, &mut bus, &message))
        },
        shutdown,
    );
    drop(service);
    drop(inputs);
    engine_thread.join().map_err(|_| ScenarioError::Panicked("engine"))?;
    for thread in threads {
        thread.join().map_err(|_| ScenarioError::Panicked("helper"))?;
    }
    served?;
    Ok(())
}

/// The engine's loop: inputs in, effects out, timers kept, until shutdown.
#[allow(clippy::too_many_arguments)]
fn drive(
    mut engine: Engine,
    stored: Vec<Scenario>,
    received: mpsc::Receiver<Input>,
    work: mpsc::Sender<Effect>,
    outputs: mpsc::Sender<Effect>,
    stops: Arc<Mutex<HashMap<RunId, Arc<AtomicBool>>>>,
    clock: &Clock,
    shutdown: &Shutdown,
) {
    let now = clock.now();
    for scenario in stored {
        engine.upsert(scenario, now);
    }
    engine.start(now);
    let dispatch = |engine: &mut Engine| {
        for effect in engine.take_effects() {
            match effect {
                Effect::Live { .. } | Effect::Running { .. } => drop(outputs.send(effect)),
                Effect::Record(record) => {
                    // A stopped run's script is told to stop.
                    if record["result"] == "stopped" {
                        if let Some(stop) = record["run"].as_u64().and_then(|id| lock(&stops).remove(&id)) {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    drop(outputs.send(Effect::Record(record)));
                }
                other => drop(work.send(other)),
            }
        }
    };
    dispatch(&mut engine);
    loop {
        if shutdown.is_triggered() {
            engine.shutdown(clock.now());
            dispatch(&mut engine);
            return;
        }
        let now = clock.now();
        let wait = engine.next_wakeup().map_or(0.25, |at| (at - now).clamp(0.0, 0.25));
        match received.recv_timeout(Duration::from_secs_f64(wait)) {
            Ok(input) => handle(&mut engine, input, clock.now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Whatever else waits, without sleeping in between.
        while let Ok(input) = received.try_recv() {
            handle(&mut engine, input, clock.now());
        }
        engine.tick(clock.now());
        dispatch(&mut engine);
    }
}

fn handle(engine: &mut Engine, input: Input, now: f64) {
    match input {
        Input::Event { category, data } => engine.event(&category, &data, now),
        Input::State { key, value } => engine.state(&key, value, now),
        Input::Done { run, outcome } => engine.done(run, outcome, now),
        Input::Read { key, reply } => drop(reply.send(engine.value(&key))),
        Input::Ask { ask, reply } => drop(reply.send(answer(engine, ask, now))),
    }
}

/// One scenario as lists show it: its definition and its live state.
fn summary(engine: &Engine, scenario: &Scenario) -> Value {
    let mut entry = serde_json::to_value(scenario).unwrap_or(Value::Null);
    entry["status"] = engine.status(&scenario.name).unwrap_or(Value::Null);
    entry
}

fn answer(engine: &mut Engine, ask: Ask, now: f64) -> Value {
    let done = |reason: Option<String>| match reason {
        None => json!({"status": true, "reason": ""}),
        Some(reason) => json!({"status": false, "reason": reason}),
    };
    match ask {
        Ask::List => Value::Array(engine.scenarios().map(|s| summary(engine, s)).collect()),
        Ask::Get(name) => engine.get(&name).map_or(Value::Null, |s| summary(engine, s)),
        Ask::Names => Value::Array(engine.scenarios().map(|s| s.name.clone().into()).collect()),
        Ask::Upsert(scenarios) => {
            for scenario in scenarios {
                engine.upsert(scenario, now);
            }
            done(None)
        }
        Ask::Delete(name) => done((!engine.remove(&name, now)).then(|| format!("no scenario '{name}'"))),
        Ask::Enable(name, enabled) => {
            done((!engine.set_enabled(&name, enabled, now)).then(|| format!("no scenario '{name}'")))
        }
        Ask::Run(name) => done(engine.run_by_hand(&name, now).err()),
        Ask::Stop(name) => {
            if engine.get(&name).is_none() {
                return done(Some(format!("no scenario '{name}'")));
            }
            let stopped = engine.stop(&name, now);
            json!({"status": true, "reason": "", "stopped": stopped})
        }
        Ask::Test(scenario) => engine.dry_run(&scenario, now),
        Ask::Rearm => {
            engine.rearm(now);
            done(None)
        }
        Ask::Stats => {
            let mut stats = serde_json::to_value(engine.counters()).unwrap_or(Value::Null);
            stats["scenarios"] = engine.scenarios().count().into();
            stats["enabled"] = engine.scenarios().filter(|s| s.enabled).count().into();
            stats
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The service's request handling, shared by its handler threads.
struct Service {
    engine: EngineHandle,
    committer: Arc<Committer>,
    broker: String,
    clock: Arc<Clock>,
    test_clock: bool,
    has_location: bool,
}

/// A reply to `action`: `<action>.result` with `status`, `reason` and the
/// fields given.
fn reply(action: &str, mut data: Value) -> Message {
    if let Some(map) = data.as_object_mut() {
        map.entry("status").or_insert(Value::Bool(true));
        map.entry("reason").or_insert(Value::String(String::new()));
    }
    Message::new(majordome_mdp::domogik::result_action(action), data)
}

/// A refusal; an unknown scenario is said `error: "not_found"` and a
/// taken name `error: "exists"`, as the gateway maps them to 404 and 409.
fn refuse(action: &str, reason: impl Into<String>) -> Message {
    let reason = reason.into();
    let word = if reason.starts_with("no scenario '") {
        Some("not_found")
    } else if reason.starts_with("name: a scenario '") {
        Some("exists")
    } else {
        None
    };
    let mut message = Message::failure(action, reason);
    if let (Some(word), Some(data)) = (word, message.data.as_object_mut()) {
        data.insert("error".into(), word.into());
    }
    message
}

impl Service {
    fn handle(&self, reader: &majordome_store::rusqlite::Connection, bus: &mut Client, message: &Message) -> Message {
        let action = message.action.as_str();
        let data = &message.data;
        let name = || {
            data["name"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{action} needs 'name', e.g. {{\"name\": \"heating\"}}"))
        };
        let outcome: Result<Message, String> = (|| match action {
            "scenario.list.get" => Ok(reply(action, json!({"scenarios": self.engine.ask(Ask::List)}))),
            "scenario.get" => {
                let name = name()?;
                match self.engine.ask(Ask::Get(name.clone())) {
                    Value::Null => Err(format!("no scenario '{name}'")),
                    scenario => Ok(reply(action, json!({"scenario": scenario}))),
                }
            }
            "scenario.new.do" | "scenario.update.do" => self.save(bus, action, &data["scenario"]),
            "scenario.delete.do" => {
                let name = name()?;
                if !store::delete(&self.committer, &name).map_err(|e| e.to_string())? {
                    return Err(format!("no scenario '{name}'"));
                }
                Ok(reply(action, self.engine.ask(Ask::Delete(name))))
            }
            "scenario.enable.do" | "scenario.disable.do" => {
                let name = name()?;
                let enabled = action == "scenario.enable.do";
                let Value::Object(_) = self.engine.ask(Ask::Get(name.clone())) else {
                    return Err(format!("no scenario '{name}'"));
                };
                let mut scenario = self.stored_scenario(&name)?;
                scenario.enabled = enabled;
                store::set_enabled(&self.committer, &scenario, unix_now()).map_err(|e| e.to_string())?;
                Ok(reply(action, self.engine.ask(Ask::Enable(name, enabled))))
            }
            "scenario.run.do" => Ok(reply(action, self.engine.ask(Ask::Run(name()?)))),
            "scenario.stop.do" => Ok(reply(action, self.engine.ask(Ask::Stop(name()?)))),
            "scenario.test.do" => {
                let scenario = if data.get("scenario").is_some() {
                    let scenario = model::read(&data["scenario"]).map_err(|e| e.to_string())?;
                    self.check(bus, &scenario, &[]).map_err(|e| e.to_string())?;
                    scenario
                } else {
                    let name = name().map_err(|_| "scenario.test.do needs 'name' or 'scenario'".to_owned())?;
                    self.stored_scenario(&name)?
                };
                Ok(reply(
                    action,
                    json!({"test": self.engine.ask(Ask::Test(Box::new(scenario)))}),
                ))
            }
            "scenario.history.get" => {
                let name = name()?;
                let last = data["last"].as_u64().unwrap_or(20).clamp(1, 1000) as usize;
                let runs = store::history(reader, &name, last).map_err(|e| e.to_string())?;
                Ok(reply(action, json!({"name": name, "runs": runs})))
            }
            "scenario.export.get" => {
                let all = self.engine.ask(Ask::List);
                let wanted = data["name"].as_str();
                let mut scenarios: Vec<Value> = all
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| wanted.is_none_or(|w| s["name"] == w))
                    .cloned()
                    .collect();
                if let Some(wanted) = wanted.filter(|_| scenarios.is_empty()) {
                    return Err(format!("no scenario '{wanted}'"));
                }
                for scenario in &mut scenarios {
                    if let Some(map) = scenario.as_object_mut() {
                        map.remove("status");
                    }
                }
                Ok(reply(action, json!({"scenarios": scenarios})))
            }
            "scenario.import.do" => self.import(bus, action, &data["scenarios"]),
            "scenario.clock.do" => {
                if !self.test_clock {
                    return Err("the clock is set only with [scenario] test_clock = true".into());
                }
                let now = data["now"]
                    .as_f64()
                    .ok_or("scenario.clock.do needs 'now' (unix seconds)")?;
                self.clock.set(now);
                self.engine.ask(Ask::Rearm);
                Ok(reply(action, json!({"now": now})))
            }
            "stats.get" => Ok(reply(action, self.engine.ask(Ask::Stats))),
            "device.command.do" => Ok(self.device_command(data)),
            other => Err(format!(
                "unknown action '{other}': the scenario service answers {ACTIONS}"
            )),
        })();
        match outcome {
            // The engine's own refusals come back as `status: false`.
            Ok(message) if message.data["status"] == false => {
                refuse(action, message.data["reason"].as_str().unwrap_or("refused").to_owned())
            }
            Ok(message) => message,
            Err(reason) => refuse(action, reason),
        }
    }

    fn stored_scenario(&self, name: &str) -> Result<Scenario, String> {
        match self.engine.ask(Ask::Get(name.to_owned())) {
            Value::Null => Err(format!("no scenario '{name}'")),
            mut value => {
                if let Some(map) = value.as_object_mut() {
                    map.remove("status");
                }
                model::read(&value).map_err(|e| e.to_string())
            }
        }
    }

    /// The world as checks need it: devices from the device service,
    /// scenario names from the engine plus `also`.
    fn catalog(&self, bus: &mut Client, also: &[String]) -> Result<Catalog, String> {
        let inventory = bus
            .request_message("devices", &Message::new("inventory.get", json!({})))
            .map_err(|e| format!("the device service did not answer, so devices cannot be checked: {e}"))?;
        let mut catalog = Catalog::from_inventory(&inventory.data);
        catalog.has_location = self.has_location;
        if let Value::Array(names) = self.engine.ask(Ask::Names) {
            catalog
                .scenarios
                .extend(names.into_iter().filter_map(|n| n.as_str().map(str::to_owned)));
        }
        catalog.scenarios.extend(also.iter().cloned());
        Ok(catalog)
    }

    fn check(&self, bus: &mut Client, scenario: &Scenario, also: &[String]) -> Result<(), Refusal> {
        let mut catalog = self.catalog(bus, also).map_err(|why| Refusal::new("devices", why))?;
        catalog.scenarios.insert(scenario.name.clone());
        model::check(scenario, &catalog, &lua::compile)
    }

    /// `new.do` (the name must be free) or `update.do` (it must exist).
    fn save(&self, bus: &mut Client, action: &str, body: &Value) -> Result<Message, String> {
        if !body.is_object() {
            return Err(format!(
                "{action} needs 'scenario', an object (see `majordome scenario` for the shape)"
            ));
        }
        let scenario = model::read(body).map_err(|e| e.to_string())?;
        let exists = self.engine.ask(Ask::Get(scenario.name.clone())).is_object();
        match (action, exists) {
            ("scenario.new.do", true) => {
                return Err(format!(
                    "name: a scenario '{}' exists; update it instead",
                    scenario.name
                ))
            }
            ("scenario.update.do", false) => return Err(format!("name: no scenario '{}' to update", scenario.name)),
            _ => {}
        }
        self.check(bus, &scenario, &[]).map_err(|e| e.to_string())?;
        let name = scenario.name.clone();
        store::save(&self.committer, vec![scenario.clone()], unix_now()).map_err(|e| e.to_string())?;
        self.engine.ask(Ask::Upsert(vec![scenario]));
        Ok(reply(action, json!({"name": name})))
    }

    /// Every scenario of `scenarios` checked first; all stored (replacing
    /// those of the same name) or none.
    fn import(&self, bus: &mut Client, action: &str, scenarios: &Value) -> Result<Message, String> {
        let Some(list) = scenarios.as_array() else {
            return Err("scenario.import.do needs 'scenarios', a list (as scenario.export.get gives)".into());
        };
        let mut read = Vec::new();
        for (index, body) in list.iter().enumerate() {
            let scenario = model::read(body).map_err(|e| format!("scenarios[{index}].{e}"))?;
            read.push(scenario);
        }
        let names: Vec<String> = read.iter().map(|s| s.name.clone()).collect();
        // One look at the devices for the whole import.
        let catalog = self.catalog(bus, &names).map_err(|why| format!("devices: {why}"))?;
        for (index, scenario) in read.iter().enumerate() {
            model::check(scenario, &catalog, &lua::compile).map_err(|e| format!("scenarios[{index}].{e}"))?;
        }
        store::save(&self.committer, read.clone(), unix_now()).map_err(|e| e.to_string())?;
        self.engine.ask(Ask::Upsert(read));
        Ok(reply(action, json!({"imported": names})))
    }

    /// A command to a scenario's device: `on`/`run` start it, `off` stops
    /// it; ago's result map.
    fn device_command(&self, data: &Value) -> Message {
        let action = "device.command.do";
        let name = data["id"].as_str().unwrap_or_default().to_owned();
        let answer = match data["command"].as_str().unwrap_or_default() {
            "on" | "run" => self.engine.ask(Ask::Run(name)),
            "off" => self.engine.ask(Ask::Stop(name)),
            other => json!({"status": false, "reason": format!("a scenario takes on, run or off, not '{other}'")}),
        };
        if answer["status"] == false {
            let reason = answer["reason"].as_str().unwrap_or("failed").to_owned();
            return reply(
                action,
                json!({"status": false, "reason": reason,
                       "error": {"identifier": "error.command.failed", "message": reason, "data": {"description": reason}}}),
            );
        }
        reply(action, json!({"result": {"identifier": "success"}}))
    }
}

/// An executor: takes effects the runs wait on and reports what they did.
fn execute(
    jobs: Arc<Mutex<mpsc::Receiver<Effect>>>,
    inputs: mpsc::SyncSender<Input>,
    endpoints: Endpoints,
    stops: Arc<Mutex<HashMap<RunId, Arc<AtomicBool>>>>,
    shutdown: Shutdown,
) {
    let mut bus = Client::new(&endpoints.broker, ClientOptions::default()).stop_on(&shutdown);
    let mut publisher: Option<Publisher> = None;
    let mut writer: Option<Writer> = None;
    loop {
        let job = {
            let jobs = lock(&jobs);
            jobs.recv_timeout(Duration::from_millis(250))
        };
        let effect = match job {
            Ok(effect) => effect,
            Err(mpsc::RecvTimeoutError::Timeout) if !shutdown.is_triggered() => continue,
            Err(_) => return,
        };
        let mut tools = Tools {
            bus: &mut bus,
            publisher: &mut publisher,
            writer: &mut writer,
            endpoints: &endpoints,
            inputs: &inputs,
        };
        let (run, outcome) = match effect {
            Effect::Command {
                run,
                device,
                command,
                data,
            } => (
                run,
                lua::Api::command(&mut tools, &device, &command, Value::Object(data)),
            ),
            Effect::Call {
                run,
                service,
                action,
                data,
            } => (run, lua::Api::call(&mut tools, &service, &action, data)),
            Effect::Set { run, key, value } => (run, lua::Api::set(&mut tools, &key, value).map(|()| Value::Null)),
            Effect::Publish { run, category, data } => (
                run,
                lua::Api::publish(&mut tools, &category, data).map(|()| Value::Null),
            ),
            Effect::Script { run, lua, context } => {
                let stop = Arc::new(AtomicBool::new(false));
                lock(&stops).insert(run, stop.clone());
                let outcome = lua::action(&lua, &context, &mut tools, stop);
                lock(&stops).remove(&run);
                (run, outcome)
            }
            _ => continue,
        };
        if inputs.send(Input::Done { run, outcome }).is_err() {
            return;
        }
    }
}

/// What an executor acts with; also what a Lua action may use.
struct Tools<'a> {
    bus: &'a mut Client,
    publisher: &'a mut Option<Publisher>,
    writer: &'a mut Option<Writer>,
    endpoints: &'a Endpoints,
    inputs: &'a mpsc::SyncSender<Input>,
}

/// A reply's error, as a run records it: ago's `error` map, or the
/// Domogik dialect's `status: false`.
fn failure_of(reply: &Message) -> Option<String> {
    if let Some(error) = reply.data.get("error").filter(|e| e.is_object()) {
        return Some(format!(
            "{}: {}",
            error["identifier"].as_str().unwrap_or("error"),
            error["message"].as_str().unwrap_or("failed")
        ));
    }
    (reply.data.get("status") == Some(&Value::Bool(false)))
        .then(|| reply.data["reason"].as_str().unwrap_or("failed").to_owned())
}

impl lua::Api for Tools<'_> {
    fn state(&mut self, key: &str) -> Option<Value> {
        let (reply, answer) = mpsc::channel();
        self.inputs
            .send(Input::Read {
                key: key.to_owned(),
                reply,
            })
            .ok()?;
        answer.recv_timeout(Duration::from_secs(5)).ok().flatten()
    }

    fn command(&mut self, device: &str, command: &str, data: Value) -> Result<Value, String> {
        let request = Message::new(
            "device.command.do",
            json!({"uuid": device, "command": command, "data": data}),
        );
        let reply = self
            .bus
            .request_message("devices", &request)
            .map_err(|e| e.to_string())?;
        match failure_of(&reply) {
            Some(why) => Err(why),
            None => Ok(reply.data.get("result").cloned().unwrap_or(reply.data)),
        }
    }

    fn set(&mut self, key: &str, value: Value) -> Result<(), String> {
        if self.writer.is_none() {
            let options = WriterOptions::default();
            *self.writer = Some(Writer::connect(self.endpoints.state.as_str(), options).map_err(|e| e.to_string())?);
        }
        let writer = self.writer.as_mut().expect("connected above");
        let outcome = writer.set(key, value.to_string(), None, Duration::from_secs(5));
        if outcome.is_err() {
            // A fresh connection next time.
            *self.writer = None;
        }
        outcome.map(|_| ()).map_err(|e| e.to_string())
    }

    fn publish(&mut self, category: &str, data: Value) -> Result<(), String> {
        if self.publisher.is_none() {
            *self.publisher = Some(connect_publisher(&self.endpoints.publish, category).map_err(|e| e.to_string())?);
        }
        let publisher = self.publisher.as_mut().expect("connected above");
        publisher.publish(category, &data).map_err(|e| e.to_string())
    }

    fn call(&mut self, service: &str, action: &str, data: Value) -> Result<Value, String> {
        let reply = self
            .bus
            .request_message(service, &Message::new(action, data))
            .map_err(|e| e.to_string())?;
        match failure_of(&reply) {
            Some(why) => Err(why),
            None => Ok(reply.data),
        }
    }

    fn log(&mut self, message: &str) {
        tracing::info!(target: "majordome_scenario::script", "{message}");
    }
}

/// The outputs no run waits on: records to the database, live state to
/// Clone, each scenario's device (registered, its state published).
fn output(
    effects: mpsc::Receiver<Effect>,
    endpoints: Endpoints,
    committer: Arc<Committer>,
    keep: usize,
    shutdown: Shutdown,
) {
    let mut bus = Client::new(&endpoints.broker, ClientOptions::default()).stop_on(&shutdown);
    let mut publisher: Option<Publisher> = None;
    let mut writer: Option<Writer> = None;
    // Each scenario's device uuid, once registered.
    let mut devices: HashMap<String, String> = HashMap::new();
    let client = client_id(&endpoints.host);
    loop {
        let effect = match effects.recv_timeout(Duration::from_millis(250)) {
            Ok(effect) => effect,
            Err(mpsc::RecvTimeoutError::Timeout) if !shutdown.is_triggered() => continue,
            Err(_) => return,
        };
        // At a stop the Clone server and the device service may be gone
        // already: the live state is of no use then, the records are.
        if shutdown.is_triggered() {
            if let Effect::Record(record) = effect {
                store::record(&committer, record, keep);
            }
            continue;
        }
        match effect {
            Effect::Record(record) => store::record(&committer, record, keep),
            Effect::Live { name, field, value } => {
                if field == "enabled" && !devices.contains_key(&name) {
                    // A scenario seen for the first time: its device.
                    let request = Message::new(
                        "device.create.do",
                        json!({"client": client, "id": name, "type": "scenario", "name": name, "room": "Scenarios"}),
                    );
                    match bus.request_message("devices", &request) {
                        Ok(reply) => match reply.data["uuid"].as_str() {
                            Some(uuid) => {
                                devices.insert(name.clone(), uuid.to_owned());
                            }
                            None => tracing::warn!(scenario = %name, "its device was refused: {}", reply.data),
                        },
                        Err(e) => tracing::warn!(scenario = %name, error = %e, "could not register its device"),
                    }
                }
                let key = format!("/scenario/{name}/{field}");
                if writer.is_none() {
                    let options = WriterOptions {
                        subtree: "/scenario/".into(),
                        ..WriterOptions::default()
                    };
                    writer = Writer::connect(endpoints.state.as_str(), options)
                        .map_err(|e| tracing::warn!(error = %e, "no Clone for live state"))
                        .ok();
                }
                if let Some(w) = writer.as_mut() {
                    if let Err(e) = w.set(&key, value.to_string(), None, Duration::from_secs(5)) {
                        tracing::warn!(error = %e, key, "could not write live state");
                        writer = None;
                    }
                }
            }
            Effect::Running { name, running } => {
                let Some(uuid) = devices.get(&name) else { continue };
                if publisher.is_none() {
                    publisher = connect_publisher(&endpoints.publish, "event.device.statechanged").ok();
                }
                if let Some(p) = publisher.as_mut() {
                    let event = json!({"uuid": uuid, "event": "event.device.statechanged",
                                       "data": {"level": if running { 255 } else { 0 }, "quantity": "state", "unit": "level"}});
                    let _ = p.publish("event.device.statechanged", &event);
                }
            }
            _ => {}
        }
    }
}

/// A publisher to the forwarder, once the forwarder has told it what is
/// wanted: until then ZeroMQ drops what it publishes, and a scenario's
/// first `publish` was lost. The service's own event follower wants
/// everything, so this is quick; with no subscriber at all it gives up
/// after two seconds (what it publishes then is wanted by nobody).
fn connect_publisher(endpoint: &str, category: &str) -> Result<Publisher, ClientError> {
    let mut publisher = Publisher::connect(endpoint)?;
    publisher.wait_for_subscriber(category, Duration::from_secs(2))?;
    Ok(publisher)
}

/// Every event on the bus, to the engine.
fn follow_events(endpoint: &str, inputs: mpsc::SyncSender<Input>, shutdown: &Shutdown) {
    let mut subscriber = match Subscriber::connect_with_high_water_mark(endpoint, &[], 10_000) {
        Ok(subscriber) => subscriber,
        Err(e) => {
            tracing::error!(error = %e, "the scenario service cannot follow events");
            return;
        }
    };
    while !shutdown.is_triggered() {
        match subscriber.recv_or_stop(Duration::from_secs(1), shutdown) {
            Ok(Some(event)) => {
                let input = Input::Event {
                    category: event.category,
                    data: event.data,
                };
                if inputs.send(input).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the scenario service's event subscriber failed");
                return;
            }
        }
    }
}

/// Every Clone key, to the engine: the snapshot first, then each change.
/// The values go as the mirror holds them (shared bytes, not copies).
fn follow_state(endpoint: &str, inputs: mpsc::SyncSender<Input>, shutdown: &Shutdown) {
    let options = MirrorOptions {
        receive_high_water_mark: MIRROR_QUEUE as i32,
        max_buffered_updates: MIRROR_QUEUE,
        ..MirrorOptions::default()
    };
    let mut mirror = loop {
        match Mirror::connect(endpoint, "", options.clone()) {
            Ok(mirror) => break mirror,
            Err(e) if !shutdown.is_triggered() => {
                tracing::warn!(error = %e, "the scenario service waits for Clone");
                thread::sleep(Duration::from_secs(1));
            }
            Err(_) => return,
        }
    };
    for (key, entry) in mirror.entries() {
        let input = Input::State {
            key: key.to_owned(),
            value: Some(entry.value.clone()),
        };
        if inputs.send(input).is_err() {
            return;
        }
    }
    while !shutdown.is_triggered() {
        let changes = match mirror.poll(Duration::from_millis(250)) {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "the scenario service's Clone mirror failed");
                return;
            }
        };
        for change in changes {
            let input = match change {
                Change::Set { key, value, .. } => Input::State {
                    key,
                    value: Some(value),
                },
                Change::Deleted { key, .. } => Input::State { key, value: None },
                _ => continue,
            };
            if inputs.send(input).is_err() {
                return;
            }
        }
    }
}
