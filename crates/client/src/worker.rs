//! A worker: registers a service with the broker and answers its requests.
//!
//! The socket thread owns the DEALER and keeps the MDP conversation alive
//! (READY, HEARTBEAT both ways, reconnecting after DISCONNECT or a silent
//! broker); one or more handler threads run the user's handler. Requests go
//! to the handlers over a channel (the first free one takes the next), and
//! replies come back over an in-process PUSH/PULL that the socket thread
//! polls. So a slow handler never stops the heartbeats, and the broker
//! never mistakes a busy worker for a dead one.
//!
//! A worker with a `capacity` above 1 says so in READY (majordome's
//! extension, see `mdp::ready_with_capacity`): majordome's broker then
//! keeps up to that many requests in flight to it, each named by a token,
//! so its handler threads may answer in any order. An RFC 7 broker ignores
//! the announcement and gives it one request at a time.

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
    /// How many requests it may hold at once, announced in READY when
    /// above 1. 1 is RFC 7's plain worker.
    pub capacity: u32,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            heartbeat_interval: Duration::from_millis(1000),
            liveness: 5,
            reconnect_delay: Duration::from_millis(1000),
            finish_grace: Duration::from_secs(2),
            capacity: 1,
        }
    }
}

/// A worker for one service, or for several names of one service (each
/// name is its own DEALER and registration, served by the same socket
/// thread and handler threads).
pub struct Worker {
    endpoint: String,
    services: Vec<String>,
    /// The names, for logs and thread names.
    service: String,
    options: WorkerOptions,
}

/// One registration with the broker: a DEALER for one service name. Its
/// `generation` is unique among the worker's connections and changes at
/// every reconnection, so a reply finds the connection its request came
/// on (or is dropped when that connection is gone).
struct Connection {
    service: String,
    socket: Option<zmq::Socket>,
    generation: u64,
    reconnect_at: Instant,
    liveness: u32,
    next_heartbeat: Instant,
}

const TAG_DONE: &[u8] = b"D";
const TAG_ABANDONED: &[u8] = b"A";
const TAG_PANICKED: &[u8] = b"P";

/// Where the handler threads and their responders send replies to the
/// socket thread. A libzmq socket may move between threads behind a full
/// memory barrier, which the lock gives.
type ReplySink = std::sync::Arc<std::sync::Mutex<zmq::Socket>>;

fn push(sink: &ReplySink, frames: &[Bytes]) {
    let socket = match sink.lock() {
        Ok(socket) => socket,
        Err(poisoned) => poisoned.into_inner(),
    };
    // PUSH to an in-process PULL with no high-water mark never waits; once
    // the worker has stopped there is no PULL, and DONTWAIT drops the
    // reply instead of blocking (a commit's callback, say) for ever.
    let _ = net::send_frames(&socket, frames, zmq::DONTWAIT);
}

/// The way back for one request's reply: send it now, or later from any
/// thread (once a write is durable, say). Dropped unsent, it tells the
/// worker that no reply will come; the broker then expires the request.
pub struct Responder {
    generation: u64,
    client: Bytes,
    sink: ReplySink,
    sent: bool,
}

impl Responder {
    /// Sends the reply body.
    pub fn send(mut self, body: Frames) {
        self.sent = true;
        let generation = Bytes::copy_from_slice(&self.generation.to_be_bytes());
        let mut message = vec![Bytes::from_static(TAG_DONE), generation, self.client.clone()];
        message.extend(body);
        push(&self.sink, &message);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.sent {
            push(&self.sink, &[Bytes::from_static(TAG_ABANDONED)]);
        }
    }
}

/// A request on its way to a handler thread: the connection it came on,
/// the client address (or token), the body.
struct Job {
    generation: u64,
    client: Bytes,
    body: Frames,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl Worker {
    /// A worker that will register `service` with the broker at `endpoint`.
    pub fn new(endpoint: &str, service: &str, options: WorkerOptions) -> Self {
        Self::serving(endpoint, &[service], options)
    }

    /// A worker that registers every name of `services` (aliases of one
    /// service, as Domogik's `dbmgr`, `admin` and `dbmanager`) with one
    /// socket thread and one pool of handler threads. Each name is a
    /// worker of its own for the broker, with `options.capacity`.
    pub fn serving(endpoint: &str, services: &[&str], options: WorkerOptions) -> Self {
        Worker {
            endpoint: endpoint.to_owned(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            service: services.join(","),
            options,
        }
    }

    /// Serves requests with `handler` (request body in, reply body out)
    /// on one handler thread until `shutdown` fires; then says DISCONNECT
    /// to the broker.
    pub fn run<H>(self, handler: H, shutdown: &Shutdown) -> Result<(), ClientError>
    where
        H: FnMut(Frames) -> Frames + Send + 'static,
    {
        let mut handler = Some(handler);
        self.run_pool(1, |_| handler.take().expect("one handler thread"), shutdown)
    }

    /// Serves requests on `threads` handler threads, each with its own
    /// handler from `make_handler(index)` (so each may own its database
    /// connection or bus client), until `shutdown` fires. The first free
    /// thread takes the next request. Announce a `capacity` of at least
    /// `threads` for the broker to keep them all busy.
    pub fn run_pool<H, M>(self, threads: usize, mut make_handler: M, shutdown: &Shutdown) -> Result<(), ClientError>
    where
        H: FnMut(Frames) -> Frames + Send + 'static,
        M: FnMut(usize) -> H,
    {
        self.run_deferred(
            threads,
            |index| {
                let mut handler = make_handler(index);
                move |body: Frames, responder: Responder| responder.send(handler(body))
            },
            shutdown,
        )
    }

    /// Like [`Worker::run_pool`], but each handler gets the request's
    /// [`Responder`] and may reply later, from any thread: a handler that
    /// waits for a database commit hands the responder to the commit's
    /// completion instead of blocking a thread per request. With a
    /// `capacity` above `threads`, the broker keeps that many requests in
    /// flight whatever the number of threads.
    pub fn run_deferred<H, M>(self, threads: usize, mut make_handler: M, shutdown: &Shutdown) -> Result<(), ClientError>
    where
        H: FnMut(Frames, Responder) + Send + 'static,
        M: FnMut(usize) -> H,
    {
        let context = net::context();
        let address = format!("inproc://majordome-worker-{}", INSTANCE.fetch_add(1, Ordering::Relaxed));
        let replies = context.socket(zmq::PULL)?;
        replies.set_rcvhwm(0)?;
        replies.bind(&address)?;
        let reply_tx = context.socket(zmq::PUSH)?;
        reply_tx.set_sndhwm(0)?;
        reply_tx.connect(&address)?;
        let sink: ReplySink = std::sync::Arc::new(std::sync::Mutex::new(reply_tx));
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
        let jobs_rx = std::sync::Arc::new(std::sync::Mutex::new(jobs_rx));
        let mut handler_threads = Vec::new();
        for index in 0..threads.max(1) {
            let (handler, jobs, service, sink) =
                (make_handler(index), jobs_rx.clone(), self.service.clone(), sink.clone());
            let thread = std::thread::Builder::new()
                .name(format!("worker-{service}"))
                .spawn(move || handler_loop(&jobs, &sink, handler, &service))
                .map_err(|_| ClientError::Closed)?;
            handler_threads.push(thread);
        }
        drop(sink);
        let mut dispatch = |job: Job| match jobs_tx.send(job) {
            Ok(()) => Ok(Dispatched::Queued),
            Err(_) => Err(ClientError::Closed),
        };
        let result = self.socket_loop(&mut dispatch, &replies, shutdown);
        // Without a sender, every handler thread's next receive fails.
        drop(jobs_tx);
        for thread in handler_threads {
            let _ = thread.join();
        }
        result
    }

    /// Serves requests with `handler` on the socket thread itself, with no
    /// handler thread: for handlers that answer in microseconds (counters,
    /// an echo), which then cost no thread and no wake-up. A slow handler
    /// here would delay the heartbeats: use [`Worker::run`] for those.
    pub fn run_inline<H>(self, mut handler: H, shutdown: &Shutdown) -> Result<(), ClientError>
    where
        H: FnMut(Frames) -> Frames,
    {
        let address = format!("inproc://majordome-worker-{}", INSTANCE.fetch_add(1, Ordering::Relaxed));
        // Nothing is ever pushed here; the loop polls it all the same.
        let replies = net::context().socket(zmq::PULL)?;
        replies.bind(&address)?;
        let service = self.service.clone();
        let mut dispatch = |job: Job| {
            let body = job.body;
            Ok(match catch_unwind(AssertUnwindSafe(|| handler(body))) {
                Ok(reply) => Dispatched::Answered(reply),
                Err(_) => {
                    error!(service, "the request handler panicked; the worker starts over");
                    Dispatched::Panicked
                }
            })
        };
        self.socket_loop(&mut dispatch, &replies, shutdown)
    }

    fn connect(&self, service: &str) -> Result<zmq::Socket, ClientError> {
        // In the broker's own context when it is in this process and
        // reached through `inproc://`.
        let socket = net::context_for(&self.endpoint).socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        net::zap::login(&socket, &self.endpoint)?;
        socket.connect(&self.endpoint).map_err(|source| ClientError::Endpoint {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        // Queued until the connection is up, so a worker may start before
        // its broker.
        let ready = mdp::ready_with_capacity(service.as_bytes(), self.options.capacity);
        net::send_frames(&socket, &ready, zmq::DONTWAIT)?;
        debug!(service, endpoint = %self.endpoint, "worker connecting");
        Ok(socket)
    }

    /// Sends the replies to the `pending` requests the handler still
    /// holds, waiting up to `finish_grace` for them.
    fn finish(&self, replies: &zmq::Socket, connections: &[Connection], mut pending: usize) {
        let deadline = Instant::now() + self.options.finish_grace;
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.poll(zmq::POLLIN, left.as_millis() as i64) {
                Ok(0) if left.is_zero() => break,
                Ok(0) | Err(zmq::Error::EINTR) => continue,
                Err(_) => break,
                Ok(_) => {}
            }
            let Ok(frames) = net::recv_all(replies) else { break };
            match frames.first().map(|f| f.as_ref()) {
                Some(TAG_DONE) => {
                    pending -= 1;
                    send_done(frames, connections);
                }
                Some(TAG_ABANDONED) => pending -= 1,
                _ => {}
            }
        }
        if pending > 0 {
            warn!(service = %self.service, pending, "stopping with requests still unanswered");
        }
    }

    fn socket_loop(
        &self,
        dispatch: &mut dyn FnMut(Job) -> Result<Dispatched, ClientError>,
        replies: &zmq::Socket,
        shutdown: &Shutdown,
    ) -> Result<(), ClientError> {
        let interval = self.options.heartbeat_interval;
        // Generations are unique across the connections: a reply names
        // the one it must go back on.
        let mut generations = 0..;
        let mut connections = Vec::with_capacity(self.services.len());
        for service in &self.services {
            connections.push(Connection {
                service: service.clone(),
                socket: Some(self.connect(service)?),
                generation: generations.next().expect("unbounded"),
                reconnect_at: Instant::now(),
                liveness: self.options.liveness,
                next_heartbeat: Instant::now() + interval,
            });
        }
        // Requests given to the handler threads and not answered yet.
        let mut in_handler: usize = 0;
        loop {
            let now = Instant::now();
            let wake = connections
                .iter()
                .map(|c| {
                    if c.socket.is_some() {
                        c.next_heartbeat
                    } else {
                        c.reconnect_at
                    }
                })
                .min()
                .unwrap_or(now + interval);
            let timeout_ms = wake.saturating_duration_since(now).as_millis() as i64 + 1;
            let (ready_dealers, handler_ready, stopping) = {
                let mut items = vec![
                    replies.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
                ];
                // Which connection each further item is.
                let mut polled = Vec::with_capacity(connections.len());
                for (index, connection) in connections.iter().enumerate() {
                    if let Some(dealer) = &connection.socket {
                        items.push(dealer.as_poll_item(zmq::POLLIN));
                        polled.push(index);
                    }
                }
                match zmq::poll(&mut items, timeout_ms) {
                    Ok(_) | Err(zmq::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                let ready: Vec<usize> = polled
                    .iter()
                    .zip(&items[2..])
                    .filter(|(_, item)| item.is_readable())
                    .map(|(index, _)| *index)
                    .collect();
                (ready, items[0].is_readable(), items[1].is_readable())
            };
            if stopping {
                self.finish(replies, &connections, in_handler);
                for dealer in connections.iter().filter_map(|c| c.socket.as_ref()) {
                    let _ = net::send_frames(dealer, &mdp::disconnect(), zmq::DONTWAIT);
                }
                return Ok(());
            }
            if handler_ready {
                let frames = net::recv_all(replies)?;
                match frames.first().map(|f| f.as_ref()) {
                    Some(TAG_DONE) => {
                        in_handler = in_handler.saturating_sub(1);
                        if let Some(index) = send_done(frames, &connections) {
                            connections[index].next_heartbeat = Instant::now() + interval;
                        }
                    }
                    Some(TAG_ABANDONED) => {
                        in_handler = in_handler.saturating_sub(1);
                        debug!(service = %self.service, "a handler gave up a request; the broker will expire it");
                    }
                    Some(TAG_PANICKED) => start_over(&mut connections),
                    _ => warn!("unexpected message from the handler thread"),
                }
            }
            for index in ready_dealers {
                let connection = &mut connections[index];
                // The socket may be gone since the poll: a panicking
                // handler makes the worker start over on fresh ones.
                let Some(dealer) = connection.socket.as_ref() else {
                    continue;
                };
                let frames = net::recv_all(dealer)?;
                connection.liveness = self.options.liveness;
                match mdp::parse_to_worker(frames) {
                    Ok(mdp::ToWorker::Request { client, body }) => {
                        // A broker may send more before the first is
                        // answered (up to the capacity, or its prefetch):
                        // the first free handler thread takes each.
                        let generation = connection.generation;
                        let job = Job {
                            generation,
                            client: client.clone(),
                            body,
                        };
                        match dispatch(job)? {
                            Dispatched::Queued => in_handler += 1,
                            Dispatched::Answered(reply) => {
                                if let Some(index) = send_reply(&connections, generation, &client, reply) {
                                    connections[index].next_heartbeat = Instant::now() + interval;
                                }
                            }
                            Dispatched::Panicked => start_over(&mut connections),
                        }
                    }
                    Ok(mdp::ToWorker::Heartbeat) => {}
                    Ok(mdp::ToWorker::Disconnect) => {
                        info!(service = %connection.service, "broker said DISCONNECT; reconnecting");
                        connection.socket = None;
                        connection.reconnect_at = Instant::now() + self.options.reconnect_delay;
                    }
                    Err(e) => warn!(error = %e, "malformed message from the broker"),
                }
            }
            let now = Instant::now();
            for connection in &mut connections {
                if connection.socket.is_none() && now >= connection.reconnect_at {
                    connection.generation = generations.next().expect("unbounded");
                    connection.socket = Some(self.connect(&connection.service)?);
                    connection.liveness = self.options.liveness;
                    connection.next_heartbeat = now + interval;
                } else if connection.socket.is_some() && now >= connection.next_heartbeat {
                    connection.liveness = connection.liveness.saturating_sub(1);
                    if connection.liveness == 0 {
                        warn!(service = %connection.service, endpoint = %self.endpoint, "broker silent; reconnecting");
                        connection.socket = None;
                        connection.reconnect_at = now + self.options.reconnect_delay;
                    } else {
                        let dealer = connection.socket.as_ref().expect("checked");
                        let _ = net::send_frames(dealer, &mdp::heartbeat(), zmq::DONTWAIT);
                        connection.next_heartbeat = now + interval;
                    }
                }
            }
        }
    }
}

/// What became of a request handed on.
enum Dispatched {
    /// A handler thread has it; its reply comes through the reply sink.
    Queued,
    /// Answered on the spot.
    Answered(Frames),
    /// The handler panicked.
    Panicked,
}

/// After a handler panicked: the broker believes these workers busy, and
/// starting over on fresh connections makes it fail what it gave at once.
fn start_over(connections: &mut [Connection]) {
    for connection in connections {
        if let Some(dealer) = connection.socket.take() {
            let _ = net::send_frames(&dealer, &mdp::disconnect(), zmq::DONTWAIT);
        }
        connection.reconnect_at = Instant::now();
    }
}

/// Sends a reply the handler finished (`TAG_DONE | generation | client |
/// body…`) on the connection its request came on, if that connection is
/// still up; returns its index when sent.
fn send_done(mut frames: Frames, connections: &[Connection]) -> Option<usize> {
    if frames.len() < 3 {
        warn!("unexpected message from the handler thread");
        return None;
    }
    let body = frames.split_off(3);
    let generation = u64::from_be_bytes(frames[1].as_ref().try_into().unwrap_or_default());
    send_reply(connections, generation, &frames[2], body)
}

/// Sends `body` to `client` on the connection of `generation`, if it is
/// still up; returns its index when sent.
fn send_reply(connections: &[Connection], generation: u64, client: &Bytes, body: Frames) -> Option<usize> {
    let found = connections
        .iter()
        .position(|c| c.generation == generation && c.socket.is_some());
    let Some(index) = found else {
        debug!("dropping a reply for a connection that is gone");
        return None;
    };
    let dealer = connections[index].socket.as_ref().expect("checked");
    let reply = mdp::reply(client, body);
    if let Err(e) = net::send_frames(dealer, &reply, zmq::DONTWAIT) {
        warn!(error = %e, "could not send a reply");
    }
    Some(index)
}

/// One handler thread: takes the next job and hands it, with its
/// responder, to the handler, until the socket thread drops the jobs'
/// sender.
fn handler_loop<H>(
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    sink: &ReplySink,
    mut handler: H,
    service: &str,
) where
    H: FnMut(Frames, Responder),
{
    loop {
        // The lock is held only while waiting for the next job: the
        // handlers take turns at the queue, not at the work.
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(Job {
            generation,
            client,
            body,
        }) = job
        else {
            return;
        };
        let responder = Responder {
            generation,
            client,
            sink: sink.clone(),
            sent: false,
        };
        // A panic drops the responder (the request is given up), then the
        // worker starts over on a fresh connection.
        if catch_unwind(AssertUnwindSafe(|| handler(body, responder))).is_err() {
            error!(service, "the request handler panicked; the worker starts over");
            push(sink, &[Bytes::from_static(TAG_PANICKED)]);
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
