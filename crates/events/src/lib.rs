//! The event forwarder. Publishers' PUB sockets connect to its XSUB
//! (Domogik's port 40411), subscribers' SUB sockets to its XPUB (40412), and
//! it passes every message through unchanged, so Domogik's publishers and
//! subscribers work with it as they did with Domogik's own forwarder.
//! Subscriptions travel the other way, so a publisher only sends what
//! somebody wants.
//!
//! **Bounds.** Each subscriber has its own queue at the XPUB, bounded by the
//! high-water mark: a subscriber that does not keep up loses the messages
//! past it, and the others are not slowed. libzmq does not tell which
//! subscriber dropped what, so those drops are not counted here; what the
//! forwarder itself refuses (oversized messages) is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use majordome_access::{is_plugin_identity, Owners, Policy, Who};
use majordome_mdp::domogik::Event;
use majordome_net::{self as net, zap, Received, Shutdown};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

/// The forwarder's bounds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Messages queued per subscriber (and from publishers) before drops.
    /// With `max_message_bytes`, it bounds what a subscriber that does not
    /// read can hold: at most their product (events are shared between
    /// the subscribers' queues, not copied).
    pub high_water_mark: i32,
    /// Frames in one event; more is dropped and counted.
    pub max_frames: usize,
    /// Bytes in one event; more is dropped and counted (a frame over it
    /// closes the publisher's connection).
    pub max_message_bytes: usize,
    /// Bytes in one subscription (a category prefix); a longer one closes
    /// the subscriber's connection before it reaches any publisher.
    pub max_subscription_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            high_water_mark: 500,
            max_frames: 16,
            max_message_bytes: 128 * 1024,
            max_subscription_bytes: 256,
        }
    }
}

/// Counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
    not_domogik: AtomicU64,
    oversized: AtomicU64,
    subscriptions: AtomicU64,
    forbidden: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Events forwarded.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of those, messages not in Domogik's `msg_id | JSON` shape (forwarded
    /// all the same).
    pub not_domogik: u64,
    /// Events dropped for being too large.
    pub oversized: u64,
    /// Distinct subscription prefixes with at least one subscriber.
    pub subscriptions: u64,
    /// Events dropped because their publisher may not publish them (a
    /// category its permissions do not list; a plugin speaking for
    /// another).
    #[serde(default)]
    pub forbidden: u64,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> Stats {
        Stats {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            not_domogik: self.not_domogik.load(Ordering::Relaxed),
            oversized: self.oversized.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            forbidden: self.forbidden.load(Ordering::Relaxed),
        }
    }
}

/// What can stop the forwarder.
#[derive(Debug, Error)]
pub enum ForwarderError {
    /// An endpoint could not be bound.
    #[error(transparent)]
    Bind(#[from] net::BindError),
    /// A ZeroMQ call failed.
    #[error("ZeroMQ error: {0}")]
    Zmq(#[from] zmq::Error),
}

/// A bound forwarder, ready to [`Forwarder::run`].
pub struct Forwarder {
    context: zmq::Context,
    publishers: zmq::Socket,
    subscribers: zmq::Socket,
    publisher_endpoint: String,
    subscriber_endpoint: String,
    settings: Settings,
    counters: Arc<Counters>,
    /// Whether its listeners ask for a login: then each event's publisher
    /// is checked.
    logins: bool,
    policy: Arc<Policy>,
    owners: Arc<Owners>,
}

impl Forwarder {
    /// Binds the XSUB (publishers connect) and XPUB (subscribers connect).
    pub fn bind(
        publisher_endpoint: &str,
        subscriber_endpoint: &str,
        settings: Settings,
    ) -> Result<Self, ForwarderError> {
        Forwarder::bind_with(publisher_endpoint, subscriber_endpoint, settings, None)
    }

    /// [`Forwarder::bind`], with listeners that ask for a PLAIN login
    /// checked by `zap` when it is given.
    pub fn bind_with(
        publisher_endpoint: &str,
        subscriber_endpoint: &str,
        settings: Settings,
        zap: Option<&mut zap::Handler>,
    ) -> Result<Self, ForwarderError> {
        let context = zmq::Context::new();
        let logins = zap.is_some();
        if let Some(handler) = zap {
            handler.attach(&context)?;
        }
        let publishers = context.socket(zmq::XSUB)?;
        let subscribers = context.socket(zmq::XPUB)?;
        // What subscribers send is only subscriptions: one byte (subscribe
        // or not) and a prefix. libzmq keeps each in a trie, a node per
        // byte, before the forwarder sees it; the bound keeps a subscriber
        // from sending a 256 KiB one (which every publisher would store).
        let subscription_limit = settings.max_subscription_bytes + 1;
        for (socket, endpoint, max) in [
            (&publishers, publisher_endpoint, settings.max_message_bytes),
            (&subscribers, subscriber_endpoint, subscription_limit),
        ] {
            socket.set_linger(0)?;
            socket.set_sndhwm(settings.high_water_mark)?;
            socket.set_rcvhwm(settings.high_water_mark)?;
            socket.set_maxmsgsize(max as i64)?;
            zap::listener(socket, logins)?;
            net::bind(socket, endpoint, net::bind::PATIENCE)?;
        }
        let publisher_endpoint = net::bound_endpoint(&publishers)?;
        let subscriber_endpoint = net::bound_endpoint(&subscribers)?;
        Ok(Forwarder {
            context,
            publishers,
            subscribers,
            publisher_endpoint,
            subscriber_endpoint,
            settings,
            counters: Arc::default(),
            logins,
            policy: Arc::default(),
            owners: Arc::default(),
        })
    }

    /// What named publishers may publish, and which plugin owns which
    /// device (checked with logins only).
    pub fn set_access(&mut self, policy: Arc<Policy>, owners: Arc<Owners>) {
        self.policy = policy;
        self.owners = owners;
    }

    /// Why a named publisher may not publish `frames`, if it may not.
    fn refusal(&self, who: Who<'_>, frames: &[bytes::Bytes]) -> Option<String> {
        let Who::Named(name) = who else { return None };
        let event = Event::from_frames(frames);
        let category = match &event {
            Ok(event) => event.category.clone(),
            Err(_) => String::from_utf8_lossy(frames.first().map_or(&[][..], |f| f.as_ref())).into_owned(),
        };
        if let Err(denied) = self.policy.may_publish(who, &category) {
            return Some(denied.to_string());
        }
        if is_plugin_identity(name) {
            let event = match event {
                Ok(event) => event,
                Err(e) => return Some(format!("'{name}' published something that is not an event: {e}")),
            };
            return self.owners.speaks_for_itself(name, &category, &event.data).err();
        }
        None
    }

    /// Where publishers connect, with the real port.
    pub fn publisher_endpoint(&self) -> &str {
        &self.publisher_endpoint
    }

    /// Where subscribers connect, with the real port.
    pub fn subscriber_endpoint(&self) -> &str {
        &self.subscriber_endpoint
    }

    /// The counters, to read while it runs.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Forwards until `shutdown` fires.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), ForwarderError> {
        let mut scratch = zmq::Message::new();
        let mut topics: std::collections::HashSet<Vec<u8>> = Default::default();
        info!(publishers = %self.publisher_endpoint, subscribers = %self.subscriber_endpoint, "event forwarder serving");
        loop {
            let mut items = [
                self.publishers.as_poll_item(zmq::POLLIN),
                self.subscribers.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
            ];
            match zmq::poll(&mut items, -1) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            if items[2].is_readable() {
                break;
            }
            // Events downstream, a bounded batch at a time so that
            // subscriptions are never starved by a flood.
            for _ in 0..1024 {
                let max = (self.settings.max_frames, self.settings.max_message_bytes);
                match net::recv_frames(&self.publishers, &mut scratch, max.0, max.1)? {
                    None => break,
                    Some(Received::TooLarge { .. }) => {
                        self.counters.oversized.fetch_add(1, Ordering::Relaxed);
                        warn!("dropped an oversized event");
                    }
                    Some(Received::Message(frames)) => {
                        if self.logins {
                            let who = Who::of(scratch.gets("Peer-Address").is_none(), scratch.gets("User-Id"));
                            if let Some(why) = self.refusal(who, &frames) {
                                self.counters.forbidden.fetch_add(1, Ordering::Relaxed);
                                debug!("dropped an event: {why}");
                                continue;
                            }
                        }
                        let bytes: usize = frames.iter().map(|f| f.len()).sum();
                        self.counters.messages.fetch_add(1, Ordering::Relaxed);
                        self.counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        if frames.len() != 2 {
                            self.counters.not_domogik.fetch_add(1, Ordering::Relaxed);
                        }
                        // XPUB never blocks: a full subscriber queue drops.
                        if let Err(e) = net::send_frames(&self.subscribers, &frames, zmq::DONTWAIT) {
                            warn!(error = %e, "could not forward an event");
                        }
                    }
                }
            }
            // Subscriptions upstream: `\x01prefix` to subscribe, `\x00prefix`
            // to unsubscribe (XPUB passes the first and the last of each).
            while let Ok(message) = self.subscribers.recv_bytes(zmq::DONTWAIT) {
                match message.split_first() {
                    Some((1, topic)) => {
                        topics.insert(topic.to_vec());
                    }
                    Some((0, topic)) => {
                        topics.remove(topic);
                    }
                    _ => continue,
                }
                self.counters
                    .subscriptions
                    .store(topics.len() as u64, Ordering::Relaxed);
                if let Err(e) = self.publishers.send(message, zmq::DONTWAIT) {
                    warn!(error = %e, "could not forward a subscription");
                }
            }
        }
        info!("event forwarder stopping");
        let Forwarder {
            context,
            publishers,
            subscribers,
            ..
        } = self;
        drop((publishers, subscribers));
        drop(context);
        Ok(())
    }
}
