//! The answers of the `devices` service.

use std::collections::BTreeMap;
use std::time::Instant;

use majordome_api::devices::{DeviceCommand, DeviceCreate, DeviceQuery, DeviceRequest, DeviceUpdate};
use majordome_client::{unix_now, Client, Message};
use majordome_store::StoreError;
use serde_json::{json, Map, Value};

use crate::lock;
use crate::schema::error_map;

use super::model::{percentile, Device, LATENCY_WINDOW};
use super::{store, Shared, ACTIONS};

/// A `.do` reply with Domogik's `status`/`reason` and ago's maps.
pub(crate) fn outcome_reply(action: &str, mut data: Map<String, Value>) -> Message {
    let error = data.get("error").filter(|e| e.is_object()).cloned();
    data.insert("status".into(), error.is_none().into());
    let reason = error
        .as_ref()
        .and_then(|e| e.get("message").and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned();
    data.insert("reason".into(), reason.into());
    Message::new(majordome_mdp::domogik::result_action(action), Value::Object(data))
}

/// The failure for an unknown device: `status: false`, the reason, and
/// `error: "not_found"` for machines (the gateway answers 404).
fn no_device(action: &str, uuid: &str) -> Message {
    let mut message = Message::failure(action, format!("no device '{uuid}'"));
    message.data["error"] = "not_found".into();
    message
}

pub(crate) fn command_error(action: &str, identifier: &str, message: impl Into<String>) -> Message {
    let mut data = Map::new();
    data.insert("error".into(), error_map(identifier, message));
    outcome_reply(action, data)
}

impl Shared {
    pub(crate) fn handle(&self, client: &mut Client, message: &Message) -> Message {
        let action = message.action.as_str();
        // Counted by action, but any action a client makes up counts as
        // "unknown": the map must not grow with bad input.
        let counted = if ACTIONS.contains(&action) { action } else { "unknown" };
        *lock(&self.stats).requests.entry(counted.to_owned()).or_default() += 1;
        match DeviceRequest::parse(message) {
            Ok(DeviceRequest::Create(create)) => self.create(action, &create),
            Ok(DeviceRequest::Get(query)) => self.get(action, &query),
            Ok(DeviceRequest::Update(update)) => self.update(action, &update),
            Ok(DeviceRequest::Delete { uuid }) => self.delete(action, &uuid),
            Ok(DeviceRequest::Command(command)) => self.command(client, action, &command),
            Ok(DeviceRequest::Inventory) if action == "device.command.do" => self.inventory("inventory.get"),
            Ok(DeviceRequest::Inventory) => self.inventory(action),
            Ok(DeviceRequest::DeviceTypes) => Message::new("device_types.result", json!({"schema": self.schema})),
            Ok(DeviceRequest::Stats) => Message::new("stats.result", self.stats()),
            Err(e) if action == "device.command.do" => {
                let identifier = DeviceCommand::error_identifier(&e);
                lock(&self.stats).outcome(None, identifier);
                command_error(action, identifier, e.to_string())
            }
            Err(e) => Message::failure(action, e.to_string()),
        }
    }

    pub(crate) fn store(&self, device: &Device) -> Result<(), StoreError> {
        store::save(&self.committer, device)
    }

    pub(crate) fn create(&self, action: &str, request: &DeviceCreate) -> Message {
        let (client, id) = (request.client.as_str(), request.id.as_str());
        let kind = request.kind.as_str();
        let Some(kind) = self.schema.resolve(kind) else {
            let known: Vec<&str> = self.schema.types.keys().map(String::as_str).collect();
            return Message::failure(
                action,
                format!("unknown device type '{kind}'; known types: {}", known.join(", ")),
            );
        };
        let stale_after = request
            .stale_after
            .or_else(|| self.schema.get(kind).and_then(|t| t.stale_after));
        let mut registry = lock(&self.registry);
        let existing = registry.by_key.get(&(client.to_owned(), id.to_owned())).cloned();
        let (mut device, changed, created) = match existing.and_then(|uuid| registry.devices.get(&uuid).cloned()) {
            // Registering again keeps what a user renamed or moved.
            Some(mut device) => {
                let before = (device.kind.clone(), device.stale_after);
                device.kind = kind.to_owned();
                if request.stale_after.is_some() {
                    device.stale_after = stale_after;
                }
                let changed = before != (device.kind.clone(), device.stale_after);
                (device, changed, false)
            }
            None => {
                if registry.devices.len() >= self.settings.max_devices {
                    return Message::failure(
                        action,
                        format!("the registry is full ({} devices)", self.settings.max_devices),
                    );
                }
                let device = Device {
                    uuid: uuid::Uuid::new_v4().to_string(),
                    client: client.to_owned(),
                    id: id.to_owned(),
                    kind: kind.to_owned(),
                    name: request.name.clone().unwrap_or_else(|| id.to_owned()),
                    room: request.room.clone().unwrap_or_default(),
                    stale_after,
                    created: unix_now(),
                    values: BTreeMap::new(),
                    sensors: BTreeMap::new(),
                    last_seen: None,
                    heard_at: Instant::now(),
                    stale: false,
                };
                (device, true, true)
            }
        };
        device.add_type_sensors(&self.schema);
        if let Err(e) = self.store(&device) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let info = device.info();
        registry.insert(device.clone());
        drop(registry);
        if created {
            self.publish(
                "event.device.announce",
                &json!({"uuid": device.uuid, "event": "event.device.announce", "data": info}),
            );
        }
        if changed {
            self.device_changed(&device);
        }
        self.mirror(vec![(format!("/device/{}/info", device.uuid), info.clone())]);
        outcome_reply(
            action,
            json!({"uuid": device.uuid, "created": created, "device": info})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
    }

    pub(crate) fn get(&self, action: &str, query: &DeviceQuery) -> Message {
        let registry = lock(&self.registry);
        let result = majordome_mdp::domogik::result_action(action);
        if let Some(uuid) = query.uuid.as_deref() {
            return match registry.find(uuid) {
                Some(device) => Message::new(result, json!({"devices": [device.inventory_entry(&self.schema)]})),
                None => no_device(action, uuid),
            };
        }
        let mut devices: Vec<&Device> = registry
            .devices
            .values()
            .filter(|d| query.client.as_ref().is_none_or(|c| *c == d.client))
            .filter(|d| query.room.as_ref().is_none_or(|r| *r == d.room))
            .collect();
        devices.sort_by(|a, b| (&a.client, &a.id).cmp(&(&b.client, &b.id)));
        let devices: Vec<Value> = devices.iter().map(|d| d.inventory_entry(&self.schema)).collect();
        Message::new(result, json!({"devices": devices}))
    }

    pub(crate) fn update(&self, action: &str, update: &DeviceUpdate) -> Message {
        let uuid = update.uuid.as_str();
        let mut registry = lock(&self.registry);
        let Some(mut device) = registry.find(uuid).cloned() else {
            return no_device(action, uuid);
        };
        if let Some(name) = &update.name {
            device.name = name.clone();
        }
        if let Some(room) = &update.room {
            device.room = room.clone();
        }
        if let Some(stale_after) = update.stale_after {
            device.stale_after = stale_after;
        }
        if let Err(e) = self.store(&device) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let info = device.info();
        registry.remove(&device.uuid);
        registry.insert(device.clone());
        drop(registry);
        self.device_changed(&device);
        self.mirror(vec![(format!("/device/{}/info", device.uuid), info.clone())]);
        outcome_reply(action, json!({"device": info}).as_object().cloned().unwrap_or_default())
    }

    pub(crate) fn delete(&self, action: &str, uuid: &str) -> Message {
        let mut registry = lock(&self.registry);
        let Some(uuid) = registry.find(uuid).map(|d| d.uuid.clone()) else {
            return no_device(action, uuid);
        };
        if let Err(e) = store::remove(&self.committer, &uuid) {
            return Message::failure(action, format!("the device store failed: {e}"));
        }
        let device = registry.remove(&uuid).expect("found above");
        drop(registry);
        self.device_changed(&device);
        self.publish(
            "event.device.remove",
            &json!({"uuid": uuid, "event": "event.device.remove", "data": {}}),
        );
        let mut keys: Vec<(String, Value)> = device
            .values
            .keys()
            .map(|q| (format!("/device/{uuid}/{q}"), Value::Null))
            .collect();
        keys.push((format!("/device/{uuid}/info"), Value::Null));
        self.mirror(keys);
        outcome_reply(action, json!({"uuid": uuid}).as_object().cloned().unwrap_or_default())
    }

    pub(crate) fn command(&self, client: &mut Client, action: &str, request: &DeviceCommand) -> Message {
        let (uuid, command, parameters) = (request.uuid.as_str(), request.command.as_str(), &request.data);
        let Some(device) = lock(&self.registry).find(uuid).cloned() else {
            lock(&self.stats).outcome(None, "error.device.invalid");
            return command_error(action, "error.device.invalid", format!("no device '{uuid}'"));
        };
        let checked = match self.schema.check_command(&device.kind, command, parameters) {
            Ok(checked) => checked,
            Err(error) => {
                let identifier = error["identifier"].as_str().unwrap_or("error.internal").to_owned();
                lock(&self.stats).outcome(Some(&device.client), &identifier);
                let mut reply = Map::new();
                reply.insert("error".into(), error);
                return outcome_reply(action, reply);
            }
        };
        let forwarded = Message::new(
            "device.command.do",
            json!({"uuid": device.uuid, "id": device.id, "command": command, "data": checked}),
        );
        let started = Instant::now();
        let reply = client.request_message(&device.client, &forwarded);
        let elapsed = started.elapsed().as_secs_f64();
        let mut answer = match reply {
            Ok(reply) => {
                let mut answer = reply.data.as_object().cloned().unwrap_or_default();
                let has_result = answer.get("result").is_some_and(Value::is_object);
                let has_error = answer.get("error").is_some_and(Value::is_object);
                if !has_result && !has_error {
                    if reply.status() == Some(false) {
                        // The broker's own failure (no worker, expired) or
                        // a plugin that answered the Domogik way.
                        let why = reply.reason().unwrap_or("no reason given").to_owned();
                        answer.remove("error");
                        answer.insert(
                            "error".into(),
                            error_map(
                                "error.no.reply",
                                format!("{} did not carry it out: {why}", device.client),
                            ),
                        );
                    } else {
                        answer.insert("result".into(), json!({"identifier": "success"}));
                    }
                }
                answer
            }
            Err(e) => {
                let mut answer = Map::new();
                answer.insert(
                    "error".into(),
                    error_map("error.no.reply", format!("no answer from {}: {e}", device.client)),
                );
                answer
            }
        };
        answer.remove("status");
        answer.remove("reason");
        let identifier = answer
            .get("result")
            .or_else(|| answer.get("error"))
            .and_then(|m| m.get("identifier"))
            .and_then(Value::as_str)
            .unwrap_or("success")
            .to_owned();
        {
            let mut stats = lock(&self.stats);
            stats.outcome(Some(&device.client), &identifier);
            if stats.latencies.len() == LATENCY_WINDOW {
                stats.latencies.pop_front();
            }
            stats.latencies.push_back(elapsed);
        }
        outcome_reply(action, answer)
    }

    pub(crate) fn inventory(&self, action: &str) -> Message {
        let registry = lock(&self.registry);
        let mut rooms: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let devices: Map<String, Value> = registry
            .devices
            .values()
            .map(|d| {
                if !d.room.is_empty() {
                    rooms.entry(d.room.clone()).or_default().push(d.uuid.clone());
                }
                (d.uuid.clone(), d.inventory_entry(&self.schema))
            })
            .collect();
        let rooms: Map<String, Value> = rooms
            .into_iter()
            .map(|(name, mut devices)| {
                devices.sort();
                (name.clone(), json!({"name": name, "devices": devices}))
            })
            .collect();
        Message::new(
            majordome_mdp::domogik::result_action(action),
            json!({"devices": devices, "rooms": rooms, "schema": self.schema}),
        )
    }

    pub(crate) fn stats(&self) -> Value {
        let (devices, stale) = {
            let registry = lock(&self.registry);
            (
                registry.devices.len(),
                registry.devices.values().filter(|d| d.stale).count(),
            )
        };
        let stats = lock(&self.stats);
        let mut sorted: Vec<f64> = stats.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let micros = |p: f64| percentile(&sorted, p).map(|s| (s * 1e6).round());
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        json!({
            "devices": devices,
            "stale": stale,
            "requests": stats.requests,
            "commands": stats.outcomes,
            "command_latency_us": {"p50": micros(0.5), "p99": micros(0.99), "samples": sorted.len()},
            "events": stats.events,
            "values": stats.values,
            "values_stored": load(&self.history.stored),
            "values_failed": load(&self.history.failed),
            "unknown_device": stats.unknown_device,
            "unknown_sensor": stats.unknown_sensor,
            "too_many_quantities": stats.too_many_quantities,
            "device_stats_dropped": stats.device_stats_dropped,
            "malformed_events": stats.malformed_events,
            "failed_later": stats.failed_later,
            "stale_marked": stats.stale_marked,
            "clone_failures": stats.clone_failures,
            "clients": stats.clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_status_and_reason_from_the_maps() {
        let ok = outcome_reply(
            "device.command.do",
            json!({"result": {"identifier": "success"}})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(ok.action, "device.command.result");
        assert_eq!(ok.status(), Some(true));
        assert_eq!(ok.reason(), Some(""));
        let error = command_error("device.command.do", "error.device.invalid", "no device 'x'");
        assert_eq!(error.status(), Some(false));
        assert_eq!(error.reason(), Some("no device 'x'"));
        assert_eq!(error.data["error"]["identifier"], "error.device.invalid");
    }
}
