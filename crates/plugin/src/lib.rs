//! The plugin SDK, and the plugins that ship with majordome (`fake`,
//! `onewire`).
//!
//! A plugin lives the life written in `ARCHITECTURE.md` ("Devices and
//! plugins: the contract"): it says `starting`, gets its config from the
//! config service (waiting for it if need be), registers its devices with
//! the device service, serves commands on its own service
//! `<type>-<name>.<host>`, says `alive` every 15 s, publishes values as
//! events, and stops cleanly on `plugin.stop.do`.
//!
//! ```no_run
//! use majordome_plugin::{Device, Endpoints, Outcome, Plugin, PluginSettings};
//! # fn main() -> Result<(), majordome_plugin::PluginError> {
//! let shutdown = majordome_client::Shutdown::on_signals()?;
//! let mut plugin = Plugin::start(PluginSettings::new("lamp", "box"), Endpoints::local())?;
//! let _config = plugin.config(&shutdown)?;
//! let lamp = plugin.register(&Device::new("lamp-1", "switch", "Lamp"), &shutdown)?;
//! let running = plugin.serve(
//!     move |command: &majordome_plugin::Command, values: &majordome_plugin::Values| {
//!         let level = if command.command == "on" { 255 } else { 0 };
//!         values.publish(&command.uuid, "event.device.statechanged", "state", level.into(), "level", None);
//!         Outcome::Done
//!     },
//!     &shutdown,
//! )?;
//! running.values().publish(&lamp, "event.device.statechanged", "state", 0.into(), "level", None);
//! running.wait()?;
//! # Ok(())
//! # }
//! ```

pub mod fake;
pub mod onewire;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use majordome_api::{ClientStatus, PluginStatus};
use majordome_client::{
    domogik_handler, unix_now, Client, ClientError, ClientOptions, Event, Message, Publisher, Shutdown, Subscriber,
    Worker, WorkerOptions,
};
use serde_json::{json, Map, Value};

/// The manifests of the plugins that ship: (name, JSON).
pub fn builtin_manifests() -> &'static [(&'static str, &'static str)] {
    &[
        ("fake", include_str!("../manifests/fake.json")),
        ("onewire", include_str!("../manifests/onewire.json")),
    ]
}

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Talking to the bus failed (an endpoint that is not valid, ZeroMQ).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The system refused a socket pair or a thread.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The stop signal fired while the plugin was still waiting for a
    /// service; it names what it was waiting for. The plugins that ship
    /// take it for a clean stop.
    #[error("stopped before {0}")]
    Stopped(&'static str),
    /// A core service answered `status: false`; its reason says why.
    #[error("the {service} service refused: {reason}")]
    Refused {
        /// `config` or `devices`.
        service: &'static str,
        /// The service's own words.
        reason: String,
    },
    /// A thread of the plugin panicked (a bug in a handler, mostly).
    #[error("a plugin thread panicked; its log says where")]
    Panicked,
}

/// Where the bus is.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The broker (40410).
    pub broker: String,
    /// The forwarder's side publishers connect to (40411).
    pub publish: String,
    /// The forwarder's side subscribers connect to (40412).
    pub subscribe: String,
}

impl Endpoints {
    /// Domogik's default ports on this machine.
    pub fn local() -> Endpoints {
        Endpoints {
            broker: majordome_net::ports::BROKER.into(),
            publish: majordome_net::ports::PUBLISH.into(),
            subscribe: majordome_net::ports::SUBSCRIBE.into(),
        }
    }
}

/// Who the plugin is and how it paces itself.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// Its name, e.g. `fake`: the manifest's and the config's name.
    pub name: String,
    /// Domogik's client type, `plugin`.
    pub kind: String,
    /// The host it runs for, the last part of its client id.
    pub host: String,
    /// How often `alive` is repeated.
    pub status_interval: Duration,
    /// How long one request to a core service may take before it is
    /// asked again.
    pub request_timeout: Duration,
    /// Requests the broker may hand the plugin at once (announced in
    /// READY): they wait at the plugin rather than at the broker, and
    /// reach the handler, one after the other, without a round trip each.
    pub capacity: u32,
}

impl PluginSettings {
    /// A plugin called `name` on `host`, with the defaults.
    pub fn new(name: &str, host: &str) -> PluginSettings {
        PluginSettings {
            name: name.to_owned(),
            kind: "plugin".to_owned(),
            host: host.to_owned(),
            status_interval: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
            capacity: 4,
        }
    }

    /// `<type>-<name>.<host>`: its client id and the name of its service.
    pub fn client_id(&self) -> String {
        format!("{}-{}.{}", self.kind, self.name, self.host)
    }
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct Device {
    /// The plugin's own name for it.
    pub id: String,
    /// A type of the schema (`device_types.get`).
    pub kind: String,
    /// The name users see first (they may rename it).
    pub name: String,
    /// The room it is in; empty: none.
    pub room: String,
    /// Seconds of silence before it is stale; `None`: the type's default.
    pub stale_after: Option<f64>,
}

impl Device {
    /// A device in no room, stale after its type's default.
    pub fn new(id: &str, kind: &str, name: &str) -> Device {
        Device {
            id: id.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            room: String::new(),
            stale_after: None,
        }
    }
}

/// A command the device service forwarded.
#[derive(Debug, Clone)]
pub struct Command {
    /// The device's uuid, as [`Plugin::register`] returned it.
    pub uuid: String,
    /// The plugin's own id of the device.
    pub id: String,
    /// The command's name, e.g. `on`, `setlevel`.
    pub command: String,
    /// The parameters, checked against the schema.
    pub data: Value,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Carried out.
    Done,
    /// Will be carried out; the events it causes carry this `ref`.
    Queued(String),
    /// Refused or failed, with ago's identifier (`error.…`).
    Failed {
        /// e.g. `error.command.invalid`, `error.device.unreachable`.
        identifier: String,
        /// What went wrong, for a person.
        message: String,
    },
}

impl Outcome {
    /// A fresh event reference for a command carried out later.
    pub fn new_ref() -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// Publishes values; cheap to clone and shared between threads.
#[derive(Clone)]
pub struct Values {
    publisher: Arc<Mutex<Publisher>>,
}

impl Values {
    /// Publishes one value as an event of `subject`, e.g.
    /// `event.environment.temperaturechanged`; `reference` is the
    /// `event-ref` of the queued command that caused it.
    pub fn publish(
        &self,
        uuid: &str,
        subject: &str,
        quantity: &str,
        level: Value,
        unit: &str,
        reference: Option<&str>,
    ) {
        let mut event = json!({
            "uuid": uuid, "event": subject, "timestamp": unix_now(),
            "data": {"level": level, "unit": unit, "quantity": quantity},
        });
        if let Some(reference) = reference {
            event["ref"] = reference.into();
        }
        self.send(subject, &event);
    }

    /// Says that a queued command failed after all.
    pub fn fail_later(&self, uuid: &str, subject: &str, identifier: &str, message: &str, reference: &str) {
        let event = json!({
            "uuid": uuid, "event": subject, "ref": reference,
            "error": {"identifier": identifier, "message": message, "data": {"description": message}},
        });
        self.send(subject, &event);
    }

    fn send(&self, subject: &str, event: &Value) {
        let mut publisher = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = publisher.publish(subject, event) {
            tracing::warn!(error = %e, subject, "could not publish a value");
        }
    }
}

/// A plugin on its way up: it has said `starting`.
pub struct Plugin {
    settings: PluginSettings,
    endpoints: Endpoints,
    client: Client,
    values: Values,
    subscriber: Subscriber,
}

impl Plugin {
    /// Connects and says `starting`.
    pub fn start(settings: PluginSettings, endpoints: Endpoints) -> Result<Plugin, PluginError> {
        let plugin = Plugin::connect(settings, endpoints)?;
        plugin.status(ClientStatus::Starting, "");
        Ok(plugin)
    }

    /// Another handle on the same plugin that says nothing: for
    /// registering devices that appear after [`Plugin::serve`].
    pub fn start_quiet(other: &Plugin) -> Result<Plugin, PluginError> {
        Plugin::connect(other.settings.clone(), other.endpoints.clone())
    }

    fn connect(settings: PluginSettings, endpoints: Endpoints) -> Result<Plugin, PluginError> {
        let mut publisher = Publisher::connect_flushing(&endpoints.publish)?;
        // The manager may be listening already; a short wait lets the
        // first status reach it, and costs little when nobody is there.
        let _ = publisher.wait_for_subscriber("plugin.status", Duration::from_millis(500));
        let subscriber = Subscriber::connect(&endpoints.subscribe, &["plugin.configuration"])?;
        let client = Client::new(
            &endpoints.broker,
            ClientOptions {
                timeout: settings.request_timeout,
                ..ClientOptions::default()
            },
        );
        let plugin = Plugin {
            settings,
            endpoints,
            client,
            values: Values {
                publisher: Arc::new(Mutex::new(publisher)),
            },
            subscriber,
        };
        Ok(plugin)
    }

    /// Its client id, `<type>-<name>.<host>`.
    pub fn client_id(&self) -> String {
        self.settings.client_id()
    }

    /// The value publisher.
    pub fn values(&self) -> Values {
        self.values.clone()
    }

    fn status(&self, event: ClientStatus, comment: &str) {
        publish_status(&self.values, &self.settings, event, comment);
    }

    /// Says `stopped` and gives the error that tells the caller why it
    /// returns before the plugin is up.
    fn stopped(&self, what: &'static str) -> PluginError {
        self.status(ClientStatus::Stopped, &format!("stopped before {what}"));
        PluginError::Stopped(what)
    }

    /// Asks `service` until it answers (it may not be up yet: the broker
    /// holds the request until its deadline, then the plugin asks again).
    fn ask(&mut self, service: &'static str, message: &Message, shutdown: &Shutdown) -> Result<Message, PluginError> {
        let mut pause = Duration::from_millis(100);
        loop {
            if shutdown.is_triggered() {
                return Err(self.stopped(service));
            }
            match self.client.request_message(service, message) {
                // The broker's own failure (no worker yet) carries an
                // `error` string: wait for the service.
                Ok(reply) if reply.data.get("error").is_some_and(Value::is_string) => {}
                Ok(reply) => return Ok(reply),
                // A signal (SIGINT, SIGTERM) interrupts the wait with EINTR:
                // the stop check above decides.
                Err(
                    ClientError::Timeout { .. }
                    | ClientError::NotConnected { .. }
                    | ClientError::Zmq(zmq::Error::EINTR),
                ) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(service, "waiting for the {service} service");
            if shutdown.wait_timeout(pause) {
                return Err(self.stopped(service));
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn fetch_config(&mut self, shutdown: &Shutdown) -> Result<(bool, Map<String, Value>), PluginError> {
        let request = Message::new(
            "config.get",
            json!({"type": self.settings.kind, "name": self.settings.name, "host": self.settings.host}),
        );
        let reply = self.ask("config", &request, shutdown)?;
        if reply.status() == Some(false) {
            return Err(PluginError::Refused {
                service: "config",
                reason: reply.reason().unwrap_or_default().to_owned(),
            });
        }
        Ok((
            reply.data["configured"].as_bool().unwrap_or(true),
            config_values(&reply.data),
        ))
    }

    /// Its config, once it is configured (until then it says
    /// `not-configured` and waits for a change).
    pub fn config(&mut self, shutdown: &Shutdown) -> Result<Map<String, Value>, PluginError> {
        loop {
            let (configured, values) = self.fetch_config(shutdown)?;
            if configured {
                return Ok(values);
            }
            self.status(ClientStatus::NotConfigured, "set its required keys with config.set");
            // It asks again at the status interval even without an event:
            // saying `not-configured` again keeps the manager from taking
            // the silence for death, and an event lost on the way (pub/sub
            // does not replay) cannot leave it waiting for good.
            let ask_again = Instant::now() + self.settings.status_interval;
            while Instant::now() < ask_again {
                if shutdown.is_triggered() {
                    return Err(self.stopped("being configured"));
                }
                if let Some(event) = next_event(&mut self.subscriber, Duration::from_millis(500))? {
                    if is_about(&event.data, &self.settings) {
                        break;
                    }
                }
            }
        }
    }

    /// Registers a device; returns its uuid.
    pub fn register(&mut self, device: &Device, shutdown: &Shutdown) -> Result<String, PluginError> {
        let mut data = json!({
            "client": self.client_id(), "id": device.id, "type": device.kind,
            "name": device.name, "room": device.room,
        });
        if let Some(stale_after) = device.stale_after {
            data["stale_after"] = stale_after.into();
        }
        let reply = self.ask("devices", &Message::new("device.create.do", data), shutdown)?;
        match (reply.status(), reply.data["uuid"].as_str()) {
            (Some(true), Some(uuid)) => Ok(uuid.to_owned()),
            _ => Err(PluginError::Refused {
                service: "devices",
                reason: reply.reason().unwrap_or("no uuid in the reply").to_owned(),
            }),
        }
    }

    /// Serves commands and extra actions with `handler`, says `alive` now
    /// and every `status_interval`, and follows config changes. Returns at
    /// once; [`Running::wait`] returns once stopped (`plugin.stop.do` or
    /// `shutdown`).
    pub fn serve<H>(self, handler: H, shutdown: &Shutdown) -> Result<Running, PluginError>
    where
        H: Handler,
    {
        let Plugin {
            settings,
            endpoints,
            values,
            mut subscriber,
            ..
        } = self;
        // One signal for both ways to stop: `plugin.stop.do` and the
        // outside shutdown. The worker still sends the reply to
        // `plugin.stop.do` before it leaves (it finishes what its handler
        // holds).
        let stop = Shutdown::new()?;
        let (config_tx, config_rx) = mpsc::channel();
        let mut threads = Vec::new();
        {
            let (stopper, values, mut handler) = (stop.clone(), values.clone(), handler);
            let serve = domogik_handler(move |message: Message| match message.action.as_str() {
                "device.command.do" => command_reply(&mut handler, &message, &values),
                "plugin.stop.do" => {
                    stopper.trigger();
                    Message::new("plugin.stop.result", json!({"status": true, "reason": ""}))
                }
                action => handler.action(&message).unwrap_or_else(|| {
                    Message::failure(
                        action,
                        format!(
                            "unknown action '{action}': a plugin answers device.command.do, plugin.stop.do \
                             and the actions of its own that it documents"
                        ),
                    )
                }),
            });
            let options = WorkerOptions {
                capacity: settings.capacity,
                ..WorkerOptions::default()
            };
            let worker = Worker::new(&endpoints.broker, &settings.client_id(), options);
            let stop = stop.clone();
            threads.push(
                thread::Builder::new()
                    .name("plugin-worker".into())
                    .spawn(move || worker.run(serve, &stop).map_err(PluginError::from))?,
            );
        }
        {
            let (stop, values, settings, endpoints) =
                (stop.clone(), values.clone(), settings.clone(), endpoints.clone());
            threads.push(thread::Builder::new().name("plugin-status".into()).spawn(move || {
                let mut client = Client::new(
                    &endpoints.broker,
                    ClientOptions {
                        timeout: settings.request_timeout,
                        ..ClientOptions::default()
                    },
                );
                // Whoever hears `alive` may call the plugin at once (the
                // manager says so to everyone): say it only once the broker
                // has the plugin's worker, which registers on its own
                // connection and may still be on its way.
                wait_until_registered(&mut client, &settings, &stop);
                publish_status(&values, &settings, ClientStatus::Alive, "");
                let mut next = Instant::now() + settings.status_interval;
                while !stop.is_triggered() {
                    if let Some(event) = next_event(&mut subscriber, Duration::from_millis(200))? {
                        if is_about(&event.data, &settings) {
                            let request = Message::new(
                                "config.get",
                                json!({"type": settings.kind, "name": settings.name, "host": settings.host}),
                            );
                            match client.request_message("config", &request) {
                                Ok(reply) if reply.status() != Some(false) => {
                                    let _ = config_tx.send(config_values(&reply.data));
                                }
                                other => tracing::warn!(?other, "could not read the new config"),
                            }
                        }
                    }
                    if Instant::now() >= next {
                        publish_status(&values, &settings, ClientStatus::Alive, "");
                        next = Instant::now() + settings.status_interval;
                    }
                }
                publish_status(&values, &settings, ClientStatus::Stopped, "");
                Ok(())
            })?);
        }
        // The outside shutdown (SIGINT, SIGTERM) stops it too.
        {
            let (outside, stop) = (shutdown.clone(), stop.clone());
            threads.push(thread::Builder::new().name("plugin-stop".into()).spawn(move || {
                let mut items = [
                    zmq::PollItem::from_fd(outside.fd(), zmq::POLLIN),
                    zmq::PollItem::from_fd(stop.fd(), zmq::POLLIN),
                ];
                loop {
                    match zmq::poll(&mut items, -1) {
                        Ok(_) if items.iter().any(zmq::PollItem::is_readable) => break,
                        Ok(_) | Err(zmq::Error::EINTR) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot wait for a stop; stopping");
                            break;
                        }
                    }
                }
                stop.trigger();
                Ok(())
            })?);
        }
        Ok(Running {
            stop,
            values,
            config_rx,
            threads,
        })
    }
}

/// Asks `mmi.service` until the broker has this plugin's service, for at
/// most `request_timeout` (then goes on, with a warning: a broker without
/// MMI would never say yes).
fn wait_until_registered(client: &mut Client, settings: &PluginSettings, stop: &Shutdown) {
    let id = settings.client_id();
    let deadline = Instant::now() + settings.request_timeout;
    loop {
        let frames = vec![majordome_client::Bytes::from(id.clone())];
        if let Ok(reply) = client.request("mmi.service", frames) {
            if reply.first().is_some_and(|answer| answer.as_ref() == b"200") {
                return;
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!(service = %id, "the broker does not list this plugin's service yet; saying alive anyway");
            return;
        }
        if stop.wait_timeout(Duration::from_millis(20)) {
            return;
        }
    }
}

fn publish_status(values: &Values, settings: &PluginSettings, event: ClientStatus, comment: &str) {
    let status = PluginStatus {
        kind: settings.kind.clone(),
        name: settings.name.clone(),
        host: settings.host.clone(),
        event,
        comment: comment.to_owned(),
    };
    values.send(PluginStatus::CATEGORY, &status.to_data());
}

/// The next event, or `None` after `timeout`. A signal (SIGINT, SIGTERM)
/// that interrupts the wait counts as a timeout: the loops around this
/// check their stop signal next, and a stop asked for is not an error.
fn next_event(subscriber: &mut Subscriber, timeout: Duration) -> Result<Option<Event>, ClientError> {
    match subscriber.recv(timeout) {
        Err(ClientError::Zmq(zmq::Error::EINTR)) => Ok(None),
        other => other,
    }
}

/// Whether a `plugin.configuration` event is about this plugin.
fn is_about(data: &Value, settings: &PluginSettings) -> bool {
    let name = data
        .get("name")
        .or_else(|| data.get("id"))
        .or_else(|| data.get("plugin"))
        .and_then(Value::as_str);
    name == Some(settings.name.as_str())
        && data
            .get("host")
            .and_then(Value::as_str)
            .is_none_or(|h| h == settings.host)
}

/// The key → value map of a `config.result` (defaults filled in by the
/// config service).
fn config_values(data: &Value) -> Map<String, Value> {
    data.get("data").and_then(Value::as_object).cloned().unwrap_or_default()
}

fn command_reply<H: Handler>(handler: &mut H, message: &Message, values: &Values) -> Message {
    let text = |field: &str| {
        message
            .data
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let command = Command {
        uuid: text("uuid"),
        id: text("id"),
        command: text("command"),
        data: message.data.get("data").cloned().unwrap_or_else(|| json!({})),
    };
    let reply = match handler.command(&command, values) {
        Outcome::Done => json!({"status": true, "reason": "", "result": {"identifier": "success"}}),
        Outcome::Queued(reference) => json!({
            "status": true, "reason": "", "result": {"identifier": "success.queued"}, "event-ref": reference,
        }),
        Outcome::Failed { identifier, message } => json!({
            "status": false, "reason": message,
            "error": {"identifier": identifier, "message": message, "data": {"description": message}},
        }),
    };
    Message::new("device.command.result", reply)
}

/// What a plugin does with requests.
pub trait Handler: Send + 'static {
    /// Carries out a device command (already checked against the schema).
    fn command(&mut self, command: &Command, values: &Values) -> Outcome;
    /// Answers another action (e.g. `stats.get`); `None`: unknown.
    fn action(&mut self, _message: &Message) -> Option<Message> {
        None
    }
}

impl<F> Handler for F
where
    F: FnMut(&Command, &Values) -> Outcome + Send + 'static,
{
    fn command(&mut self, command: &Command, values: &Values) -> Outcome {
        self(command, values)
    }
}

/// A serving plugin.
pub struct Running {
    stop: Shutdown,
    values: Values,
    config_rx: mpsc::Receiver<Map<String, Value>>,
    threads: Vec<JoinHandle<Result<(), PluginError>>>,
}

impl Running {
    /// The value publisher.
    pub fn values(&self) -> Values {
        self.values.clone()
    }

    /// The signal that fires when the plugin is to stop.
    pub fn stop_signal(&self) -> &Shutdown {
        &self.stop
    }

    /// A new config, if one came since the last call.
    pub fn new_config(&self) -> Option<Map<String, Value>> {
        self.config_rx.try_iter().last()
    }

    /// Waits until stopped; says `stopped`.
    pub fn wait(self) -> Result<(), PluginError> {
        self.stop.wait();
        let mut outcome = Ok(());
        for thread in self.threads {
            let result = thread.join().unwrap_or(Err(PluginError::Panicked));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}
