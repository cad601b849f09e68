//! The follower: values from events into the inventory, Clone and
//! history; stale devices.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use majordome_client::{unix_now, Event, Shutdown, Subscriber};
use majordome_store::Ticket;
use serde_json::{json, Value};

use crate::history::{HistoryWriter, Sample};
use crate::lock;
use crate::schema::valid_name;

use super::model::{device_unit, Device, Reading, Registry, Stats};
use super::{DeviceError, Shared, CLIENT_SENSOR, OWN_SUBJECTS};

/// What a batch of events gave.
#[derive(Default)]
pub(crate) struct Applied {
    /// Values for the history.
    samples: Vec<Sample>,
    /// Clone keys to write.
    mirrored: Vec<(String, Value)>,
    /// `device-stats` to publish once the samples are durable.
    stored: Vec<Value>,
}

/// The follower: events in, values out to the inventory, history, Clone.
pub(crate) fn follow(
    shared: &Shared,
    mut subscriber: Subscriber,
    mut history: HistoryWriter,
    shutdown: &Shutdown,
) -> Result<(), DeviceError> {
    let mut last_check = Instant::now();
    // History commits in flight, oldest first, with the `device-stats`
    // each will let out once durable.
    let mut pending: VecDeque<(Ticket<()>, Vec<Value>)> = VecDeque::new();
    while !shutdown.is_triggered() {
        let mut batch = Vec::new();
        // While commits are in flight, look at them often: their
        // `device-stats` wait for them. Else sleep until the next stale
        // check, an event or the shutdown.
        let wait = if pending.is_empty() {
            shared.settings.stale_check.saturating_sub(last_check.elapsed())
        } else {
            Duration::from_millis(2)
        };
        if let Some(event) = subscriber.recv_or_stop(wait, shutdown)? {
            batch.push(event);
            while batch.len() < shared.settings.batch {
                match subscriber.recv(Duration::ZERO)? {
                    Some(event) => batch.push(event),
                    None => break,
                }
            }
        }
        if !batch.is_empty() {
            let applied = shared.apply_events(&batch);
            if let Some(ticket) = history.append(applied.samples) {
                pending.push_back((ticket, applied.stored));
            }
            shared.mirror(applied.mirrored);
        }
        while let Some(outcome) = pending.front().and_then(|(ticket, _)| ticket.try_get()) {
            let (_, stored) = pending.pop_front().expect("peeked");
            // A failed commit is counted by the history; its values were
            // not stored, so nothing is said of them.
            if outcome.is_ok() {
                shared.publish_stored(stored);
            }
        }
        if last_check.elapsed() >= shared.settings.stale_check {
            last_check = Instant::now();
            shared.mark_stale();
        }
    }
    lock(&shared.stats).malformed_events += subscriber.malformed();
    for (ticket, stored) in pending {
        if ticket.wait().is_ok() {
            shared.publish_stored(stored);
        }
    }
    history.flush()?;
    Ok(())
}

impl Shared {
    pub(crate) fn publish(&self, subject: &str, data: &Value) {
        if let Err(e) = lock(&self.publisher).publish(subject, data) {
            tracing::warn!(error = %e, subject, "could not publish");
        }
    }

    /// Says `device.update` (`{device_id, client_id}`), as Domogik's admin
    /// did after a change: its plugins then read their devices again.
    pub(crate) fn device_changed(&self, device: &Device) {
        self.publish(
            "device.update",
            &json!({"device_id": device.uuid, "client_id": device.client}),
        );
    }

    /// Says `device-stats` for values now stored. The publisher drops what
    /// its subscribers do not take in time; those are counted, not logged
    /// one by one.
    pub(crate) fn publish_stored(&self, stored: Vec<Value>) {
        let mut publisher = lock(&self.publisher);
        if !publisher.is_wanted("device-stats") {
            return;
        }
        let dropped = stored
            .iter()
            .filter(|stat| publisher.publish("device-stats", stat).is_err())
            .count();
        if dropped > 0 {
            lock(&self.stats).device_stats_dropped += dropped as u64;
        }
    }

    /// Writes keys to Clone and waits until the last one is published, so
    /// the writer's update socket is drained and failures are seen.
    pub(crate) fn mirror(&self, entries: Vec<(String, Value)>) {
        let Some(writer) = &self.writer else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let mut writer = lock(writer);
        let mut last = None;
        for (key, value) in entries {
            let body = if value.is_null() {
                Vec::new()
            } else {
                value.to_string().into_bytes()
            };
            match writer.send(&key, body, None) {
                Ok(uuid) => last = Some(uuid),
                Err(e) => {
                    lock(&self.stats).clone_failures += 1;
                    tracing::warn!(error = %e, key, "could not write to Clone");
                }
            }
        }
        if let Some(uuid) = last {
            if let Err(e) = writer.confirm(&uuid, Duration::from_secs(5)) {
                lock(&self.stats).clone_failures += 1;
                tracing::warn!(error = %e, "Clone did not confirm device values");
            }
        }
    }

    /// Applies a batch of events (ago's `event.*` and Domogik's
    /// `client.sensor`).
    pub(crate) fn apply_events(&self, events: &[Event]) -> Applied {
        let mut applied = Applied::default();
        let mut stats = lock(&self.stats);
        let mut registry = lock(&self.registry);
        let now = unix_now();
        // A plugin's clock is trusted unless it is far off.
        let plausible = |time: Option<f64>| {
            time.filter(|t| (now - 86_400.0..=now + 60.0).contains(t))
                .unwrap_or(now)
        };
        for event in events {
            stats.events += 1;
            if OWN_SUBJECTS.contains(&event.category.as_str()) {
                continue;
            }
            let data = &event.data;
            if event.category == CLIENT_SENSOR {
                let Some(values) = data.as_object() else {
                    stats.malformed_events += 1;
                    continue;
                };
                // Domogik sends its `atTimestamp` as a string or a number.
                let time = values.get("atTimestamp").and_then(|t| match t {
                    Value::String(text) => text.trim().parse().ok(),
                    other => other.as_f64(),
                });
                let time = plausible(time);
                for (key, level) in values.iter().filter(|(key, _)| *key != "atTimestamp") {
                    // The sensor's number, or majordome's `<uuid>/<quantity>`.
                    let target = match key.parse::<i64>() {
                        Ok(id) => registry.sensors.get(&id).cloned(),
                        Err(_) => key
                            .split_once('/')
                            .filter(|(uuid, quantity)| registry.devices.contains_key(*uuid) && valid_name(quantity))
                            .map(|(uuid, quantity)| (uuid.to_owned(), quantity.to_owned())),
                    };
                    let Some((uuid, quantity)) = target.filter(|_| !level.is_null()) else {
                        stats.unknown_sensor += 1;
                        continue;
                    };
                    self.take_value(
                        &mut registry,
                        &mut stats,
                        &mut applied,
                        &uuid,
                        &quantity,
                        level,
                        None,
                        time,
                    );
                }
                continue;
            }
            let Some(uuid) = data.get("uuid").and_then(Value::as_str) else {
                stats.malformed_events += 1;
                continue;
            };
            let Some(device) = registry.devices.get(uuid) else {
                stats.unknown_device += 1;
                continue;
            };
            if data.get("error").is_some() {
                stats.failed_later += 1;
                continue;
            }
            let values = data.get("data").unwrap_or(&Value::Null);
            let Some(level) = values.get("level").filter(|l| !l.is_null()) else {
                stats.malformed_events += 1;
                continue;
            };
            let quantity = self.schema.quantity_of(&device.kind, &event.category, values);
            let unit = values.get("unit").filter(|u| u.is_string()).cloned();
            let time = plausible(data.get("timestamp").and_then(Value::as_f64));
            self.take_value(
                &mut registry,
                &mut stats,
                &mut applied,
                uuid,
                &quantity,
                level,
                unit,
                time,
            );
        }
        applied
    }

    /// One value of a known device: into the inventory, and on its way to
    /// Clone and history.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take_value(
        &self,
        registry: &mut Registry,
        stats: &mut Stats,
        applied: &mut Applied,
        uuid: &str,
        quantity: &str,
        level: &Value,
        unit: Option<Value>,
        time: f64,
    ) {
        let Some(sensor) = registry.sensor(uuid, quantity) else {
            stats.too_many_quantities += 1;
            return;
        };
        let device = registry.devices.get_mut(uuid).expect("sensor() found it");
        let unit = unit.unwrap_or_else(|| device_unit(&self.schema, &device.kind, quantity));
        applied.mirrored.push((
            format!("/device/{uuid}/{quantity}"),
            json!({"level": level, "unit": unit, "timestamp": time}),
        ));
        applied.samples.push(Sample {
            uuid: uuid.to_owned(),
            quantity: quantity.to_owned(),
            time,
            raw: level.clone(),
        });
        applied.stored.push(json!({
            "timestamp": time, "device_id": uuid, "sensor_id": sensor, "stored_value": level,
            "quantity": quantity,
        }));
        device.values.insert(
            quantity.to_owned(),
            Reading {
                level: level.clone(),
                unit,
                time,
            },
        );
        device.last_seen = Some(time);
        device.heard_at = Instant::now();
        if device.stale {
            device.stale = false;
            applied.mirrored.push((format!("/device/{uuid}/info"), device.info()));
        }
        stats.values += 1;
        stats.clients.entry(device.client.clone()).or_default().values += 1;
    }

    pub(crate) fn mark_stale(&self) {
        let mut newly = Vec::new();
        {
            let mut registry = lock(&self.registry);
            for device in registry.devices.values_mut() {
                let Some(after) = device.stale_after.filter(|a| *a > 0.0) else {
                    continue;
                };
                if !device.stale && device.heard_at.elapsed().as_secs_f64() >= after {
                    device.stale = true;
                    newly.push((device.uuid.clone(), device.info()));
                }
            }
        }
        if newly.is_empty() {
            return;
        }
        lock(&self.stats).stale_marked += newly.len() as u64;
        let mut mirrored = Vec::new();
        for (uuid, info) in newly {
            self.publish(
                "event.device.stale",
                &json!({"uuid": uuid, "event": "event.device.stale", "data": {"stale": true, "lastseen": info["lastseen"]}}),
            );
            mirrored.push((format!("/device/{uuid}/info"), info));
        }
        self.mirror(mirrored);
    }
}
