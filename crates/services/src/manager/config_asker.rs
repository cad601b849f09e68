//! Asking the config service, at start, whether each plugin is
//! configured.

use std::time::{Duration, Instant};

use majordome_api::ClientId;
use majordome_client::{AsyncClient, Message, PendingReply};
use serde_json::{json, Value};

use super::Registry;

/// Asks the config service whether each manifest plugin of this host is
/// configured, until each is answered or `config_wait` passes. The config
/// service may come up after the manager, so what is unanswered is asked
/// again a second later. A state machine stepped by the manager's event
/// thread ([`ConfigAsker::step`], with the time as an input); its bus
/// client (and that client's I/O thread) lives only while it asks.
pub(super) struct ConfigAsker {
    broker: String,
    /// Not answered yet.
    pending: Vec<ClientId>,
    in_flight: Vec<(ClientId, PendingReply)>,
    next_round: Instant,
    deadline: Instant,
    timeout: Duration,
    bus: Option<AsyncClient>,
}

impl ConfigAsker {
    pub(super) fn new(registry: &Registry, broker: &str, now: Instant) -> ConfigAsker {
        let host = registry.host();
        let settings = registry.settings();
        ConfigAsker {
            broker: broker.to_owned(),
            pending: registry
                .manifests()
                .iter()
                .map(|m| ClientId::new(&m.kind, &m.name, host))
                .collect(),
            in_flight: Vec::new(),
            next_round: now,
            deadline: now + settings.config_wait,
            timeout: settings.config_timeout,
            bus: None,
        }
    }

    /// Takes the answers that came and sends what is due.
    pub(super) fn step(&mut self, registry: &mut Registry, now: Instant) {
        let mut answered = Vec::new();
        self.in_flight.retain_mut(|(id, reply)| {
            let Some(outcome) = reply.try_take() else { return true };
            let configured = outcome
                .ok()
                .and_then(|body| Message::from_frames(&body).ok())
                .and_then(|reply| reply.data.get("configured").and_then(Value::as_bool));
            match configured {
                Some(configured) => {
                    registry.set_configured(&id.to_string(), configured);
                    answered.push(id.clone());
                }
                None => tracing::debug!(client = %id, "config.get not answered yet"),
            }
            false
        });
        self.pending.retain(|id| !answered.contains(id));
        if self.pending.is_empty() {
            self.bus = None;
            return;
        }
        if !self.in_flight.is_empty() || now < self.next_round {
            return;
        }
        if now >= self.deadline {
            for id in self.pending.drain(..) {
                tracing::warn!(
                    client = %id,
                    "the config service did not say whether it is configured; waiting for plugin.configuration events"
                );
            }
            self.bus = None;
            return;
        }
        if self.bus.is_none() {
            match AsyncClient::connect(&self.broker) {
                Ok(bus) => self.bus = Some(bus),
                Err(e) => tracing::debug!(error = %e, "cannot reach the broker to ask the config service"),
            }
        }
        if let Some(bus) = &self.bus {
            for id in &self.pending {
                let ask = json!({"type": id.kind, "name": id.name, "host": id.host});
                let body = Message::new("config.get", ask).to_frames();
                self.in_flight
                    .push((id.clone(), bus.request("config", body, self.timeout)));
            }
        }
        self.next_round = now + Duration::from_secs(1);
    }
}
