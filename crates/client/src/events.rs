//! Publishing and subscribing to events through the forwarder, in
//! Domogik's `msg_id | JSON` format.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use majordome_mdp::domogik::Event;
use majordome_net as net;
use majordome_net::Shutdown;
use serde_json::Value;

use crate::error::ClientError;

/// The current Unix time in seconds, as events are stamped with (0 if the
/// clock is before 1970).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Publishes events; connects to the forwarder's publisher side (40411).
///
/// Like any ZeroMQ publisher, it sends only what somebody subscribed to,
/// and events published before the subscriptions reach it are lost:
/// [`Publisher::wait_for_subscriber`] waits until one covers a category.
pub struct Publisher {
    // Field order matters: the socket closes before its context ends.
    socket: zmq::Socket,
    topics: Vec<Vec<u8>>,
    /// A context of its own, for [`Publisher::connect_flushing`]: dropping
    /// the publisher then waits (up to the linger) for what it published to
    /// leave. The process-wide context is never closed, so a short-lived
    /// publisher such as `majordome pub` could exit with its event still
    /// queued; a long-lived service shares it (a context costs two
    /// threads).
    _context: Option<zmq::Context>,
}

impl Publisher {
    /// Connects to the forwarder at `endpoint`, on the process-wide
    /// context: for publishers that live as long as their process.
    pub fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_on(endpoint, net::context().clone(), false)
    }

    /// Connects on a context of its own, so that dropping the publisher
    /// waits until what it published has left: for a process that
    /// publishes and exits.
    pub fn connect_flushing(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_on(endpoint, zmq::Context::new(), true)
    }

    fn connect_on(endpoint: &str, context: zmq::Context, own: bool) -> Result<Self, ClientError> {
        // An XPUB rather than a PUB: it behaves the same for the forwarder,
        // and it lets this side see which subscriptions have arrived.
        let socket = context.socket(zmq::XPUB)?;
        socket.set_linger(1000)?;
        // As deep as the forwarder's own queues: a burst (a plugin that
        // reports all its devices at once) waits here instead of being
        // dropped while the forwarder's thread is not running.
        socket.set_sndhwm(10_000)?;
        net::zap::login(&socket, endpoint)?;
        socket.connect(endpoint).map_err(|source| ClientError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        Ok(Publisher {
            socket,
            topics: Vec::new(),
            _context: own.then_some(context),
        })
    }

    /// Publishes `data` under `category`, stamped with the current time.
    pub fn publish(&mut self, category: &str, data: &Value) -> Result<(), ClientError> {
        self.absorb_subscriptions();
        net::send_frames(&self.socket, &Event::frames(category, unix_now(), data), zmq::DONTWAIT)?;
        Ok(())
    }

    /// Whether some subscriber wants `category` now: a publisher of many
    /// events that few want can skip building them. (ZeroMQ would drop
    /// them unsent anyway.)
    pub fn is_wanted(&mut self, category: &str) -> bool {
        self.absorb_subscriptions();
        self.topics.iter().any(|topic| category.as_bytes().starts_with(topic))
    }

    /// Waits up to `timeout` until some subscriber wants `category`. True
    /// when one does.
    pub fn wait_for_subscriber(&mut self, category: &str, timeout: Duration) -> Result<bool, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.absorb_subscriptions();
            if self.topics.iter().any(|topic| category.as_bytes().starts_with(topic)) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            match self.socket.poll(zmq::POLLIN, left.as_millis() as i64) {
                Ok(0) | Err(zmq::Error::EINTR) => return Ok(false),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn absorb_subscriptions(&mut self) {
        while let Ok(message) = self.socket.recv_bytes(zmq::DONTWAIT) {
            match message.split_first() {
                Some((1, topic)) => self.topics.push(topic.to_vec()),
                Some((0, topic)) => self.topics.retain(|t| t != topic),
                _ => {}
            }
        }
    }
}

/// Receives events; connects to the forwarder's subscriber side (40412).
pub struct Subscriber {
    socket: zmq::Socket,
    malformed: u64,
}

impl Subscriber {
    /// Connects to `endpoint` and subscribes to each prefix of `msg_id`
    /// (a category, or the start of one); no prefix means everything.
    pub fn connect(endpoint: &str, prefixes: &[&str]) -> Result<Self, ClientError> {
        Self::connect_with_high_water_mark(endpoint, prefixes, 1000)
    }

    /// As [`Subscriber::connect`], holding up to `high_water_mark` events
    /// not yet read (beyond that, ZeroMQ drops them): a subscriber that
    /// must not lose bursts, like the device service, takes more.
    pub fn connect_with_high_water_mark(
        endpoint: &str,
        prefixes: &[&str],
        high_water_mark: i32,
    ) -> Result<Self, ClientError> {
        let socket = net::context().socket(zmq::SUB)?;
        socket.set_linger(0)?;
        socket.set_rcvhwm(high_water_mark)?;
        net::zap::login(&socket, endpoint)?;
        socket.connect(endpoint).map_err(|source| ClientError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        if prefixes.is_empty() {
            socket.set_subscribe(b"")?;
        }
        for prefix in prefixes {
            socket.set_subscribe(prefix.as_bytes())?;
        }
        Ok(Subscriber { socket, malformed: 0 })
    }

    /// The next well-formed event, or `None` after `timeout`. Messages that
    /// are not Domogik events are skipped and counted.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        self.wait_for_event(timeout, None)
    }

    /// Like [`Subscriber::recv`], but also returns (with no event) as soon
    /// as `shutdown` fires: a loop that waits for events and a timer need
    /// not wake up just to look at its stop signal.
    pub fn recv_or_stop(&mut self, timeout: Duration, shutdown: &Shutdown) -> Result<Option<Event>, ClientError> {
        self.wait_for_event(timeout, Some(shutdown))
    }

    /// The next well-formed event within `timeout`, skipping (and counting)
    /// malformed ones; `None` at the timeout, on a signal (SIGINT, SIGTERM:
    /// the caller looks at its shutdown next) or once `shutdown` fires.
    fn wait_for_event(&mut self, timeout: Duration, shutdown: Option<&Shutdown>) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // The shutdown's descriptor is polled only when there is one.
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(shutdown.map_or(-1, Shutdown::fd), zmq::POLLIN),
            ];
            let polled = &mut items[..if shutdown.is_some() { 2 } else { 1 }];
            match zmq::poll(polled, left.as_millis() as i64) {
                Ok(0) | Err(zmq::Error::EINTR) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            if !polled[0].is_readable() {
                return Ok(None);
            }
            let frames: Vec<Bytes> = net::recv_all(&self.socket)?;
            match Event::from_frames(&frames) {
                Ok(event) => return Ok(Some(event)),
                Err(e) => {
                    self.malformed += 1;
                    tracing::debug!(error = %e, "skipped a malformed event");
                }
            }
        }
    }

    /// How many malformed messages were skipped.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}
