//! A worker: registers a service with the broker and answers its requests.
//!
//! Two threads: the socket thread owns the DEALER and keeps the MDP
//! conversation alive (READY, HEARTBEAT both ways, reconnecting after
//! DISCONNECT or a silent broker), and the handler thread runs the user's
//! handler. They talk over an in-process PAIR. So a slow handler never stops
//! the heartbeats, and the broker never mistakes a busy worker for a dead
//! one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_mdp::domogik::Message;
use majordome_mdp::{mdp, Frames};
use majordome_net::{self as net, Shutdown};
use tracing::{debug, error, info, warn};

use crate::error::ClientError;

/// How a [`Worker`] keeps its connection alive.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// How often it heartbeats the broker.
    pub heartbeat_interval: Duration,
    /// Intervals without a word from the broker before it reconnects.
    pub liveness: u32,
    /// How long it waits before reconnecting.
    pub reconnect_delay: Duration,
    /// On shutdown, how long it waits for the requests its handler holds
    /// to be answered before it leaves: a handler that stops its own
    /// service (a plugin answering `plugin.stop.do`) still gets its reply
    /// out.
    pub finish_grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            heartbeat_interval: Duration::from_millis(1000),
            liveness: 5,
            reconnect_delay: Duration::from_millis(1000),
            finish_grace: Duration::from_secs(2),
        }
    }
}

/// A worker for one service.
pub struct Worker {
    endpoint: String,
    service: String,
    options: WorkerOptions,
}

const TAG_REQUEST: &[u8] = b"R";
const TAG_DONE: &[u8] = b"D";
const TAG_PANICKED: &[u8] = b"P";
const TAG_STOP: &[u8] = b"S";

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl Worker {
    /// A worker that will register `service` with the broker at `endpoint`.
    pub fn new(endpoint: &str, service: &str, options: WorkerOptions) -> Self {
        Worker {
            endpoint: endpoint.to_owned(),
            service: service.to_owned(),
            options,
        }
    }

    /// Serves requests with `handler` (request body in, reply body out)
    /// until `shutdown` fires; then says DISCONNECT to the broker.
    pub fn run<H>(self, handler: H, shutdown: &Shutdown) -> Result<(), ClientError>
    where
        H: FnMut(Frames) -> Frames + Send + 'static,
    {
        let context = net::context();
        let address = format!("inproc://majordome-worker-{}", INSTANCE.fetch_add(1, Ordering::Relaxed));
        let to_handler = context.socket(zmq::PAIR)?;
        to_handler.bind(&address)?;
        let handler_side = context.socket(zmq::PAIR)?;
        handler_side.connect(&address)?;
        let service = self.service.clone();
        let handler_thread = std::thread::Builder::new()
            .name(format!("worker-{service}"))
            .spawn(move || handler_loop(handler_side, handler, &service))
            .map_err(|_| ClientError::Closed)?;
        let result = self.socket_loop(&to_handler, shutdown);
        let _ = to_handler.send(TAG_STOP, 0);
        let _ = handler_thread.join();
        result
    }

    fn connect(&self) -> Result<zmq::Socket, ClientError> {
        let socket = net::context().socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        socket.connect(&self.endpoint).map_err(|source| ClientError::Endpoint {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        // Queued until the connection is up, so a worker may start before
        // its broker.
        net::send_frames(&socket, &mdp::ready(self.service.as_bytes()), zmq::DONTWAIT)?;
        debug!(service = %self.service, endpoint = %self.endpoint, "worker connecting");
        Ok(socket)
    }

    /// Sends the replies to the `pending` requests the handler still
    /// holds, waiting up to `finish_grace` for them.
    fn finish(&self, to_handler: &zmq::Socket, dealer: &zmq::Socket, generation: u64, mut pending: usize) {
        let deadline = Instant::now() + self.options.finish_grace;
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match to_handler.poll(zmq::POLLIN, left.as_millis() as i64) {
                Ok(0) if left.is_zero() => break,
                Ok(0) | Err(zmq::Error::EINTR) => continue,
                Err(_) => break,
                Ok(_) => {}
            }
            let Ok(frames) = net::recv_all(to_handler) else { break };
            pending -= 1;
            if frames.first().map(|f| f.as_ref()) == Some(TAG_DONE) {
                send_reply(frames, Some(dealer), generation);
            }
        }
        if pending > 0 {
            warn!(service = %self.service, pending, "stopping with requests still unanswered");
        }
    }

    fn socket_loop(&self, to_handler: &zmq::Socket, shutdown: &Shutdown) -> Result<(), ClientError> {
        let interval = self.options.heartbeat_interval;
        let mut socket = Some(self.connect()?);
        let mut reconnect_at = Instant::now();
        let mut generation: u64 = 0;
        let mut liveness = self.options.liveness;
        let mut next_heartbeat = Instant::now() + interval;
        // Requests given to the handler thread and not answered yet.
        let mut in_handler: usize = 0;
        loop {
            let now = Instant::now();
            let wake = if socket.is_some() { next_heartbeat } else { reconnect_at };
            let timeout_ms = wake.saturating_duration_since(now).as_millis() as i64 + 1;
            let (dealer_ready, handler_ready, stopping) = {
                let mut items = vec![
                    to_handler.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
                ];
                if let Some(dealer) = &socket {
                    items.push(dealer.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, timeout_ms) {
                    Ok(_) | Err(zmq::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                (
                    items.get(2).is_some_and(|i| i.is_readable()),
                    items[0].is_readable(),
                    items[1].is_readable(),
                )
            };
            if stopping {
                if let Some(dealer) = &socket {
                    self.finish(to_handler, dealer, generation, in_handler);
                    let _ = net::send_frames(dealer, &mdp::disconnect(), zmq::DONTWAIT);
                }
                return Ok(());
            }
            if handler_ready {
                in_handler = in_handler.saturating_sub(1);
                let frames = net::recv_all(to_handler)?;
                match frames.first().map(|f| f.as_ref()) {
                    Some(TAG_DONE) => {
                        if send_reply(frames, socket.as_ref(), generation) {
                            next_heartbeat = Instant::now() + interval;
                        }
                    }
                    Some(TAG_PANICKED) => {
                        // The broker believes this worker is busy; starting
                        // over makes it fail what it gave at once.
                        if let Some(dealer) = socket.take() {
                            let _ = net::send_frames(&dealer, &mdp::disconnect(), zmq::DONTWAIT);
                        }
                        reconnect_at = Instant::now();
                    }
                    _ => warn!("unexpected message from the handler thread"),
                }
            }
            // The socket may be gone since the poll: a panicking handler
            // makes the worker start over on a fresh one.
            if let (true, Some(dealer)) = (dealer_ready, socket.as_ref()) {
                let frames = net::recv_all(dealer)?;
                liveness = self.options.liveness;
                match mdp::parse_to_worker(frames) {
                    Ok(mdp::ToWorker::Request { client, body }) => {
                        // A broker that prefetches may send more before the
                        // first is answered: the handler takes them in order.
                        let mut message = vec![
                            Bytes::from_static(TAG_REQUEST),
                            Bytes::copy_from_slice(&generation.to_be_bytes()),
                            client,
                        ];
                        message.extend(body);
                        net::send_frames(to_handler, &message, 0)?;
                        in_handler += 1;
                    }
                    Ok(mdp::ToWorker::Heartbeat) => {}
                    Ok(mdp::ToWorker::Disconnect) => {
                        info!(service = %self.service, "broker said DISCONNECT; reconnecting");
                        socket = None;
                        reconnect_at = Instant::now() + self.options.reconnect_delay;
                    }
                    Err(e) => warn!(error = %e, "malformed message from the broker"),
                }
            }
            let now = Instant::now();
            if socket.is_none() && now >= reconnect_at {
                generation += 1;
                socket = Some(self.connect()?);
                liveness = self.options.liveness;
                next_heartbeat = now + interval;
            } else if socket.is_some() && now >= next_heartbeat {
                liveness = liveness.saturating_sub(1);
                if liveness == 0 {
                    warn!(service = %self.service, endpoint = %self.endpoint, "broker silent; reconnecting");
                    socket = None;
                    reconnect_at = now + self.options.reconnect_delay;
                } else {
                    let dealer = socket.as_ref().expect("checked");
                    let _ = net::send_frames(dealer, &mdp::heartbeat(), zmq::DONTWAIT);
                    next_heartbeat = now + interval;
                }
            }
        }
    }
}

/// Sends a reply the handler finished (`TAG_DONE | generation | client |
/// body…`) on `dealer`, if the request came on this connection
/// (`generation`); true when it was sent.
fn send_reply(frames: Frames, dealer: Option<&zmq::Socket>, generation: u64) -> bool {
    if frames.len() < 3 {
        warn!("unexpected message from the handler thread");
        return false;
    }
    let reply_generation = u64::from_be_bytes(frames[1].as_ref().try_into().unwrap_or_default());
    match dealer {
        // The request came on this connection: answer it.
        Some(dealer) if reply_generation == generation => {
            let client = frames[2].clone();
            let reply = mdp::reply(&client, frames.into_iter().skip(3));
            if let Err(e) = net::send_frames(dealer, &reply, zmq::DONTWAIT) {
                warn!(error = %e, "could not send a reply");
            }
            true
        }
        _ => {
            debug!("dropping a reply for a connection that is gone");
            false
        }
    }
}

fn handler_loop<H>(socket: zmq::Socket, mut handler: H, service: &str)
where
    H: FnMut(Frames) -> Frames,
{
    loop {
        let Ok(mut frames) = net::recv_all(&socket) else { return };
        if frames.first().map(|f| f.as_ref()) != Some(TAG_REQUEST) || frames.len() < 3 {
            return;
        }
        let body = frames.split_off(3);
        let client = frames.pop().expect("three frames");
        let generation = frames.pop().expect("two frames");
        let reply = match catch_unwind(AssertUnwindSafe(|| handler(body))) {
            Ok(reply) => {
                let mut message = vec![Bytes::from_static(TAG_DONE), generation, client];
                message.extend(reply);
                message
            }
            Err(_) => {
                error!(service, "the request handler panicked; the worker starts over");
                vec![Bytes::from_static(TAG_PANICKED)]
            }
        };
        if net::send_frames(&socket, &reply, 0).is_err() {
            return;
        }
    }
}

/// Wraps a Domogik handler (`Message` in, `Message` out) as a raw one. A
/// request that is not `action | JSON object` is answered with `status:
/// false` and the reason, without calling the handler.
pub fn domogik_handler<F>(mut handler: F) -> impl FnMut(Frames) -> Frames + Send + 'static
where
    F: FnMut(Message) -> Message + Send + 'static,
{
    move |body: Frames| match Message::from_frames(&body) {
        Ok(message) => handler(message).to_frames(),
        Err(e) => {
            let action = body
                .first()
                .and_then(|a| std::str::from_utf8(a).ok())
                .filter(|a| !a.is_empty())
                .unwrap_or("request");
            Message::failure(action, format!("malformed request: {e}")).to_frames()
        }
    }
}
