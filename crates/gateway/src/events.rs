//! Events for HTTP clients: one thread subscribes to everything on the
//! forwarder and hands each event to the async side through a bounded
//! broadcast channel; each JSON-RPC subscription (`subscribe`,
//! `getevent`, `unsubscribe`) reads its own position in it. A subscriber
//! that falls more than the channel's capacity behind is told how many it
//! lost (an `event.overflow` event), not silently cut off as agorpc did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use majordome_client::Subscriber;
use majordome_net::Shutdown;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One event as HTTP clients see it: agorpc's shape, the payload with its
/// subject under `event`.
#[derive(Debug, Clone)]
pub struct HttpEvent {
    pub category: String,
    pub content: Value,
}

impl HttpEvent {
    fn new(category: String, data: Value) -> HttpEvent {
        let content = match data {
            Value::Object(mut object) => {
                object.entry("event").or_insert_with(|| category.clone().into());
                Value::Object(object)
            }
            other => json!({"event": category, "data": other}),
        };
        HttpEvent { category, content }
    }

    /// What a subscriber that fell behind gets in place of what it lost.
    pub fn overflow(dropped: u64) -> Value {
        json!({"event": "event.overflow", "dropped": dropped,
               "message": format!("{dropped} events were dropped: this subscriber fell behind")})
    }
}

/// The bus's events, for the async side.
#[derive(Clone)]
pub struct Events {
    sender: broadcast::Sender<Arc<HttpEvent>>,
}

impl Events {
    /// Starts the thread that subscribes to `endpoint` (everything) until
    /// `shutdown`; each receiver may lag `capacity` events.
    pub fn start(endpoint: &str, capacity: usize, shutdown: &Shutdown) -> std::io::Result<Events> {
        let (sender, _) = broadcast::channel(capacity.max(1));
        let (tx, endpoint, stop) = (sender.clone(), endpoint.to_owned(), shutdown.clone());
        std::thread::Builder::new()
            .name("gateway-events".into())
            .spawn(move || {
                let mut subscriber = match Subscriber::connect_with_high_water_mark(&endpoint, &[], 10_000) {
                    Ok(subscriber) => subscriber,
                    Err(e) => {
                        tracing::error!(error = %e, "the gateway cannot subscribe to events");
                        return;
                    }
                };
                while !stop.is_triggered() {
                    match subscriber.recv_or_stop(Duration::from_secs(1), &stop) {
                        // Nobody listening is no error.
                        Ok(Some(event)) => drop(tx.send(Arc::new(HttpEvent::new(event.category, event.data)))),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "the gateway's event subscriber failed");
                            return;
                        }
                    }
                }
            })?;
        Ok(Events { sender })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HttpEvent>> {
        self.sender.subscribe()
    }
}

/// The JSON-RPC subscriptions, by uuid: bounded in number, and forgotten
/// when not read for `idle`.
pub struct Subscriptions {
    events: Events,
    table: Mutex<HashMap<String, Subscription>>,
    max: usize,
    idle: Duration,
}

struct Subscription {
    /// Whose it is (the token's identity, "" for local clients): nobody
    /// else reads or closes it.
    owner: String,
    receiver: Arc<tokio::sync::Mutex<broadcast::Receiver<Arc<HttpEvent>>>>,
    last_used: Instant,
}

/// Why a subscription call failed.
#[derive(Debug, PartialEq, Eq)]
pub enum SubscriptionError {
    Unknown,
    TooMany(usize),
}

impl Subscriptions {
    pub fn new(events: Events, max: usize, idle: Duration) -> Subscriptions {
        Subscriptions {
            events,
            table: Mutex::default(),
            max,
            idle,
        }
    }

    /// The bus's events.
    pub fn events(&self) -> &Events {
        &self.events
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new subscription of `owner`'s; its uuid.
    pub fn open(&self, owner: &str) -> Result<String, SubscriptionError> {
        let mut table = self.table();
        let idle = self.idle;
        table.retain(|_, s| s.last_used.elapsed() < idle);
        if table.len() >= self.max {
            return Err(SubscriptionError::TooMany(self.max));
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        table.insert(
            uuid.clone(),
            Subscription {
                owner: owner.to_owned(),
                receiver: Arc::new(tokio::sync::Mutex::new(self.events.subscribe())),
                last_used: Instant::now(),
            },
        );
        Ok(uuid)
    }

    /// Closes `owner`'s subscription `uuid` (another's is unknown to it).
    pub fn close(&self, uuid: &str, owner: &str) -> Result<(), SubscriptionError> {
        let mut table = self.table();
        match table.get(uuid) {
            Some(subscription) if subscription.owner == owner => {
                table.remove(uuid);
                Ok(())
            }
            _ => Err(SubscriptionError::Unknown),
        }
    }

    /// The next event of `owner`'s `uuid` within `wait`: `Ok(None)` at the
    /// timeout.
    pub async fn next(&self, uuid: &str, owner: &str, wait: Duration) -> Result<Option<Value>, SubscriptionError> {
        let receiver = {
            let mut table = self.table();
            let subscription = table
                .get_mut(uuid)
                .filter(|s| s.owner == owner)
                .ok_or(SubscriptionError::Unknown)?;
            subscription.last_used = Instant::now();
            subscription.receiver.clone()
        };
        // One getevent at a time per subscription: a second waits its
        // turn, within its own deadline.
        let outcome = tokio::time::timeout(wait, async {
            let mut receiver = receiver.lock().await;
            receiver.recv().await
        })
        .await;
        let outcome = match outcome {
            Err(_) => Ok(None),
            Ok(Ok(event)) => Ok(Some(event.content.clone())),
            Ok(Err(broadcast::error::RecvError::Lagged(dropped))) => Ok(Some(HttpEvent::overflow(dropped))),
            Ok(Err(broadcast::error::RecvError::Closed)) => Ok(None),
        };
        if let Some(subscription) = self.table().get_mut(uuid) {
            subscription.last_used = Instant::now();
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_subject_and_a_lagging_reader_hears_how_many_it_lost() {
        let event = HttpEvent::new("plugin.status".into(), json!({"name": "fake"}));
        assert_eq!(event.content, json!({"name": "fake", "event": "plugin.status"}));
        let ago = HttpEvent::new("event.device.statechanged".into(), json!({"event": "x", "uuid": "u"}));
        assert_eq!(ago.content["event"], "x", "an ago event keeps its own subject");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (sender, _) = broadcast::channel(4);
            let events = Events { sender: sender.clone() };
            let subscriptions = Subscriptions::new(events, 2, Duration::from_secs(60));
            let uuid = subscriptions.open("").unwrap();
            for n in 0..10 {
                sender
                    .send(Arc::new(HttpEvent::new("x".into(), json!({"n": n}))))
                    .unwrap();
            }
            assert_eq!(
                subscriptions.next(&uuid, "somebody", Duration::ZERO).await,
                Err(SubscriptionError::Unknown),
                "another's subscription is unknown to it"
            );
            let first = subscriptions
                .next(&uuid, "", Duration::from_secs(1))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (first["event"].as_str(), first["dropped"].as_u64()),
                (Some("event.overflow"), Some(6))
            );
            let next = subscriptions
                .next(&uuid, "", Duration::from_secs(1))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(next["n"], 6);
            assert_eq!(
                subscriptions.next("nope", "", Duration::ZERO).await,
                Err(SubscriptionError::Unknown)
            );
            subscriptions.open("").unwrap();
            assert_eq!(subscriptions.open(""), Err(SubscriptionError::TooMany(2)));
            assert_eq!(subscriptions.close(&uuid, "somebody"), Err(SubscriptionError::Unknown));
            subscriptions.close(&uuid, "").unwrap();
            assert_eq!(subscriptions.close(&uuid, ""), Err(SubscriptionError::Unknown));
        });
    }
}
