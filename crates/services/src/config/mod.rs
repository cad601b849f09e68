//! The config service: `config.get`, `config.set`, `config.delete` →
//! `config.result`, with Domogik's keys (`type`, `name`, `host`, `key`),
//! served as `config` and under Domogik's names `dbmgr`, `admin` and
//! `dbmanager` (seed 002).
//!
//! Values are JSON, stored in the `config` table of the one database;
//! writes are durable before the reply. When the plugin has a manifest,
//! keys and values are checked against it (a clear `reason` when wrong) and
//! its defaults fill unset keys. An unknown key is JSON `null` with status
//! true and a reason that says so (Domogik answered the string "None").
//! Every change is published as a `plugin.configuration` event.
//!
//! `configured` is a built-in key for every client, as in Domogik (whose
//! plugins ask for it at start and stop unless it is true): reading it gives
//! whether the client is configured; setting it to false marks a client
//! unconfigured whatever its keys, and setting it to true is accepted once
//! the required keys of its manifest have values.
//!
//! Domogik's plugins also ask `admin` for their devices (`device.get` with
//! `type`, `name`, `host`): that request is passed to the `devices`
//! service over the bus and answered as Domogik's admin did
//! (`device.result` with `status`, `reason`, `type`, `name`, `host`,
//! `devices`).
//!
//! The modules: `model` (configured, required keys, checked values: pure),
//! `store` (the `config` table), and here the requests and the threads.

mod model;
mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use majordome_client::{domogik_handler, Client, ClientOptions, Message, Publisher, Shutdown, Worker, WorkerOptions};
use majordome_store::rusqlite::Connection;
use majordome_store::{Committer, Durability, StoreError};
use serde_json::{json, Map, Value};

use crate::manifest::Manifest;
use majordome_api::config::{ConfigRequest, Target};
use majordome_api::{ApiError, ClientId};

/// The built-in key that says whether a client is configured.
pub use majordome_api::config::CONFIGURED;

/// The names the service answers on.
pub const SERVICE_NAMES: &[&str] = &["config", "dbmgr", "admin", "dbmanager"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config database: {0}")]
    Store(#[from] StoreError),
    #[error("config database: {0}")]
    Sqlite(#[from] majordome_store::rusqlite::Error),
    #[error(transparent)]
    Client(#[from] majordome_client::ClientError),
    #[error("cannot start a config thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// `type`, `name` and `host` of the client, as every reply carries them.
fn target_json(target: &Target) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("type".into(), target.kind.clone().into());
    map.insert("name".into(), target.name.clone().into());
    map.insert("host".into(), target.host.clone().into());
    map
}

/// The config service, shared by its worker threads.
pub struct ConfigService {
    committer: Arc<Committer>,
    database: std::path::PathBuf,
    durability: Durability,
    manifests: HashMap<(String, String), Manifest>,
}

/// A reply: `config.result` with `status`, `reason` and the rest.
fn result(status: bool, reason: impl Into<String>, fields: Map<String, Value>) -> Message {
    Message::new("config.result", Value::Object(with_status(fields, status, reason)))
}

fn fail(reason: impl Into<String>) -> Message {
    result(false, reason, Map::new())
}

impl ConfigService {
    /// Opens the `config` table in the database at `database`.
    pub fn open(
        database: &Path,
        manifests: Vec<Manifest>,
        durability: Durability,
    ) -> Result<ConfigService, ConfigError> {
        let connection = majordome_store::open(database, durability)?;
        connection.execute_batch(store::SCHEMA)?;
        Ok(ConfigService {
            committer: majordome_store::shared_committer(database, durability)?,
            database: database.to_owned(),
            durability,
            manifests: manifests
                .into_iter()
                .map(|m| ((m.kind.clone(), m.name.clone()), m))
                .collect(),
        })
    }

    /// Serves on every name of [`SERVICE_NAMES`] at `broker` until
    /// `shutdown`; publishes `plugin.configuration` to `publish_at` (the
    /// forwarder's publisher side) when given.
    pub fn run(self, broker: &str, publish_at: Option<&str>, shutdown: &Shutdown) -> Result<(), ConfigError> {
        let service = Arc::new(self);
        let publisher = Arc::new(publish_at.map(Publisher::connect).transpose()?.map(Mutex::new));
        // Each handler thread reads through its own connection (WAL).
        let mut readers = Vec::new();
        for _ in 0..HANDLER_THREADS {
            readers.push(majordome_store::open(&service.database, service.durability)?);
        }
        // The four names on one socket thread; two handler threads, so
        // that a `device.get` passed on to `devices` does not hold up a
        // plugin's `config.get`.
        let options = WorkerOptions {
            capacity: HANDLER_THREADS as u32,
            ..WorkerOptions::default()
        };
        let worker = Worker::serving(broker, SERVICE_NAMES, options);
        let handler = |_| {
            let (reader, publisher, service) = (
                readers.pop().expect("one per thread"),
                publisher.clone(),
                service.clone(),
            );
            let options = ClientOptions {
                timeout: DEVICES_TIMEOUT,
                ..ClientOptions::default()
            };
            let mut bus = Client::new(broker, options).stop_on(shutdown);
            domogik_handler(move |message: Message| match ConfigRequest::parse(&message) {
                Ok(ConfigRequest::DeviceGet { client }) => devices_of(&mut bus, client),
                Ok(request) => service.handle(&reader, publisher.as_ref().as_ref(), request),
                Err(e) => refused(&message.action, e),
            })
        };
        Ok(worker.run_pool(HANDLER_THREADS, handler, shutdown)?)
    }

    /// Answers one request (but Domogik's `device.get`, which needs the
    /// bus).
    pub fn handle(&self, reader: &Connection, publisher: Option<&Mutex<Publisher>>, request: ConfigRequest) -> Message {
        let outcome = match request {
            ConfigRequest::Get(get) => self.get(reader, &get.client, get.key.as_deref()),
            ConfigRequest::Set(set) => self.set(reader, &set.client, set.values),
            ConfigRequest::Delete(delete) => self.delete(reader, &delete.client, delete.key),
            ConfigRequest::DeviceGet { .. } => {
                return fail("device.get is answered by asking the devices service, which this handler cannot")
            }
        };
        match outcome {
            Ok((reply, event)) => {
                if let (Some(publisher), Some(event)) = (publisher, event) {
                    let mut publisher = publisher.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if let Err(e) = publisher.publish("plugin.configuration", &event) {
                        tracing::warn!(error = %e, "could not publish plugin.configuration");
                    }
                }
                reply
            }
            Err(e) => {
                tracing::error!(error = %e, "config service");
                fail(format!("the config store failed: {e}"))
            }
        }
    }

    fn manifest(&self, target: &Target) -> Option<&Manifest> {
        self.manifests.get(&(target.kind.clone(), target.name.clone()))
    }

    fn stored(&self, reader: &Connection, target: &Target) -> Result<Map<String, Value>, ConfigError> {
        Ok(store::stored(reader, target)?)
    }

    fn configured(&self, target: &Target, stored: &Map<String, Value>) -> bool {
        model::configured(self.manifest(target), stored)
    }

    fn get(
        &self,
        reader: &Connection,
        target: &Target,
        key: Option<&str>,
    ) -> Result<(Message, Option<Value>), ConfigError> {
        let stored = self.stored(reader, target)?;
        let mut fields = target_json(target);
        fields.insert("configured".into(), self.configured(target, &stored).into());
        let who = format!("{}-{}.{}", target.kind, target.name, target.host);
        match key {
            Some(key) if key == CONFIGURED => {
                fields.insert("key".into(), key.into());
                let configured = fields["configured"].clone();
                fields.insert("value".into(), configured);
                Ok((result(true, "", fields), None))
            }
            Some(key) => {
                fields.insert("key".into(), key.into());
                let default = self
                    .manifest(target)
                    .and_then(|m| m.key(key))
                    .and_then(|k| k.default.clone());
                let (value, reason) = match (stored.get(key), default) {
                    (Some(value), _) => (value.clone(), String::new()),
                    (None, Some(default)) => {
                        fields.insert("default".into(), true.into());
                        (default, String::new())
                    }
                    (None, None) => (Value::Null, format!("no value for '{key}' of {who}")),
                };
                fields.insert("value".into(), value);
                Ok((result(true, reason, fields), None))
            }
            None => {
                let values = model::with_defaults(self.manifest(target), stored);
                fields.insert("data".into(), Value::Object(values));
                Ok((result(true, "", fields), None))
            }
        }
    }

    fn set(
        &self,
        reader: &Connection,
        target: &Target,
        values: Vec<(String, Value)>,
    ) -> Result<(Message, Option<Value>), ConfigError> {
        let values = match model::checked(self.manifest(target), target, values) {
            Ok(values) => values,
            Err(reason) => return Ok((fail(reason), None)),
        };
        // Marking a client configured needs its required keys, set before
        // or in this same request.
        if values.iter().any(|(k, v)| k == CONFIGURED && *v == Value::Bool(true)) {
            let mut after = self.stored(reader, target)?;
            after.extend(values.iter().cloned());
            let missing = model::missing_required(self.manifest(target), &after);
            if !missing.is_empty() {
                return Ok((
                    fail(format!(
                        "{} '{}' cannot be marked configured: its required keys {} have no value",
                        target.kind,
                        target.name,
                        missing.join(", ")
                    )),
                    None,
                ));
            }
        }
        store::save(&self.committer, target, &values)?;
        let stored = self.stored(reader, target)?;
        let configured = self.configured(target, &stored);
        let keys: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
        let mut fields = target_json(target);
        fields.insert("configured".into(), configured.into());
        fields.insert("keys".into(), json!(keys));
        let mut event = target_json(target);
        event.insert("event".into(), "updated".into());
        event.insert("keys".into(), json!(keys));
        event.insert("configured".into(), configured.into());
        Ok((result(true, "", fields), Some(Value::Object(event))))
    }

    fn delete(
        &self,
        reader: &Connection,
        target: &Target,
        key: Option<String>,
    ) -> Result<(Message, Option<Value>), ConfigError> {
        let deleted = store::remove(&self.committer, target, key.clone())?;
        let stored = self.stored(reader, target)?;
        let configured = self.configured(target, &stored);
        let mut fields = target_json(target);
        fields.insert("configured".into(), configured.into());
        fields.insert("deleted".into(), deleted.into());
        if let Some(key) = &key {
            fields.insert("key".into(), key.clone().into());
        }
        let mut event = target_json(target);
        event.insert("event".into(), "deleted".into());
        event.insert("key".into(), key.map_or(Value::Null, Value::String));
        event.insert("configured".into(), configured.into());
        let event = (deleted > 0).then_some(Value::Object(event));
        Ok((result(true, "", fields), event))
    }
}

/// Handler threads of the config service, shared by its four names.
const HANDLER_THREADS: usize = 2;

/// How long the `devices` service has to answer a `device.get` passed on.
const DEVICES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Domogik's `device.get` to `admin`: the devices of one client (`type`,
/// `name`, `host`), or of all when none is given, asked of `devices`.
fn devices_of(bus: &mut Client, client: Option<ClientId>) -> Message {
    let mut fields = Map::new();
    let mut request = json!({});
    if let Some(id) = client {
        request["client"] = id.to_string().into();
        fields.insert("type".into(), id.kind.into());
        fields.insert("name".into(), id.name.into());
        fields.insert("host".into(), id.host.into());
    }
    let (status, reason, devices) = match bus.request_message("devices", &Message::new("device.get", request)) {
        Ok(reply) if reply.status() != Some(false) => (true, String::new(), reply.data["devices"].clone()),
        Ok(reply) => (false, reply.reason().unwrap_or_default().to_owned(), json!([])),
        Err(e) => (false, format!("the devices service did not answer: {e}"), json!([])),
    };
    fields.insert("devices".into(), devices);
    Message::new("device.result", Value::Object(with_status(fields, status, reason)))
}

fn with_status(mut fields: Map<String, Value>, status: bool, reason: impl Into<String>) -> Map<String, Value> {
    fields.insert("status".into(), status.into());
    fields.insert("reason".into(), Value::String(reason.into()));
    fields
}

/// A request the API could not read: `<action>.result` with status false
/// and the reason, for every name of the service.
fn refused(action: &str, error: ApiError) -> Message {
    match (action, error) {
        (_, error @ ApiError::UnknownAction { .. }) => Message::failure(action, error.to_string()),
        ("device.get", error) => {
            let fields = Map::from_iter([("devices".to_owned(), json!([]))]);
            Message::new(
                "device.result",
                Value::Object(with_status(fields, false, error.to_string())),
            )
        }
        (_, error) => fail(error.to_string()),
    }
}
