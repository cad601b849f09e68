//! The asynchronous client: many requests in flight on one DEALER socket.
//!
//! MDP/0.1 replies carry no request id, so the client puts one in the
//! routing envelope: it sends `id | "" | MDPC01 | service | body…`, and a
//! broker that keeps the whole envelope (majordome does, as ROUTER sockets
//! are meant to) sends the reply back as `id | "" | MDPC01 | service | body…`.
//! A broker that only supports one-frame envelopes will not understand it:
//! use [`crate::Client`] there.
//!
//! One I/O thread owns the DEALER; callers hand it requests through a
//! channel (and a byte on a socket pair that wakes it), never touching a
//! libzmq socket themselves, and get a [`PendingReply`] that is both a
//! `Future` and something to block on: async code may hold one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use majordome_mdp::domogik::Message;
use majordome_mdp::{mdp, Frames};
use majordome_net as net;
use tokio::sync::oneshot;
use tracing::warn;

use crate::error::ClientError;

type Outcome = Result<Frames, ClientError>;

struct Pending {
    service: String,
    timeout: Duration,
    reply_tx: oneshot::Sender<Outcome>,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// What a caller hands the I/O thread.
enum Command {
    Request {
        id: u64,
        timeout: Duration,
        service: Bytes,
        body: Frames,
    },
    Stop,
}

/// A client that keeps many requests in flight. Cheap to share behind an
/// `Arc`; every method takes `&self`.
pub struct AsyncClient {
    commands: Mutex<mpsc::Sender<Command>>,
    /// A byte written here wakes the I/O thread to read `commands`.
    wake: UnixStream,
    pending: PendingMap,
    next_id: AtomicU64,
    io_thread: Option<JoinHandle<()>>,
}

/// A reply that will come: `.await` it, or [`PendingReply::wait`] for it.
/// It always completes: with the reply, or with a timeout error.
pub struct PendingReply {
    reply_rx: oneshot::Receiver<Outcome>,
}

impl PendingReply {
    /// Blocks until the reply or the timeout. Must not be called from
    /// inside an async runtime; `.await` it there.
    pub fn wait(self) -> Outcome {
        self.reply_rx.blocking_recv().unwrap_or(Err(ClientError::Closed))
    }

    /// The outcome if it has come, without waiting: for a thread that
    /// polls its pending replies between other work.
    pub fn try_take(&mut self) -> Option<Outcome> {
        match self.reply_rx.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(ClientError::Closed)),
        }
    }
}

impl Future for PendingReply {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        Pin::new(&mut self.reply_rx)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(ClientError::Closed)))
    }
}

impl AsyncClient {
    /// Starts the I/O thread and connects to the broker at `endpoint`.
    pub fn connect(endpoint: &str) -> Result<Self, ClientError> {
        let dealer = net::context_for(endpoint).socket(zmq::DEALER)?;
        dealer.set_linger(0)?;
        net::zap::login(&dealer, endpoint)?;
        dealer.connect(endpoint).map_err(|source| ClientError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        let (commands, inbox) = mpsc::channel();
        let (wake, woken) = UnixStream::pair().map_err(|_| ClientError::Closed)?;
        // Neither end ever blocks: a caller on an async runtime writes, and
        // the I/O thread drains what it finds.
        wake.set_nonblocking(true).map_err(|_| ClientError::Closed)?;
        woken.set_nonblocking(true).map_err(|_| ClientError::Closed)?;
        let pending: PendingMap = Arc::default();
        let io_pending = pending.clone();
        let io_thread = std::thread::Builder::new()
            .name("majordome-async-client".into())
            .spawn(move || io_loop(dealer, inbox, woken, io_pending))
            .map_err(|_| ClientError::Closed)?;
        Ok(AsyncClient {
            commands: Mutex::new(commands),
            wake,
            pending,
            next_id: AtomicU64::new(1),
            io_thread: Some(io_thread),
        })
    }

    /// Sends a raw MDP request; the reply body comes through the returned
    /// [`PendingReply`], or a timeout error after `timeout`.
    pub fn request(&self, service: &str, body: Frames, timeout: Duration) -> PendingReply {
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("pending map").insert(
            id,
            Pending {
                service: service.to_owned(),
                timeout,
                reply_tx,
            },
        );
        let command = Command::Request {
            id,
            timeout,
            service: Bytes::copy_from_slice(service.as_bytes()),
            body,
        };
        let sent = self.commands.lock().expect("command channel").send(command).is_ok();
        // One byte wakes the I/O thread; a full socket buffer means it has
        // wake-ups waiting already.
        if !sent || matches!((&self.wake).write(&[1]), Err(ref e) if e.kind() != std::io::ErrorKind::WouldBlock) {
            if let Some(pending) = self.pending.lock().expect("pending map").remove(&id) {
                let _ = pending.reply_tx.send(Err(ClientError::Closed));
            }
        }
        PendingReply { reply_rx }
    }

    /// Sends a Domogik-dialect request, with the timeout frame; the broker
    /// answers a `.result` with `status: false` when it expires.
    pub async fn request_message(
        &self,
        service: &str,
        message: &Message,
        timeout: Duration,
    ) -> Result<Message, ClientError> {
        let mut body = vec![crate::timeout_frame(timeout)];
        body.extend(message.to_frames());
        let reply = self.request(service, body, timeout + crate::grace(timeout)).await?;
        Message::from_frames(&reply).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        if let Ok(commands) = self.commands.lock() {
            let _ = commands.send(Command::Stop);
        }
        let _ = (&self.wake).write(&[1]);
        if let Some(thread) = self.io_thread.take() {
            let _ = thread.join();
        }
    }
}

fn io_loop(dealer: zmq::Socket, inbox: mpsc::Receiver<Command>, mut woken: UnixStream, pending: PendingMap) {
    let mut deadlines: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while let Some(Reverse((deadline, id))) = deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            deadlines.pop();
            if let Some(p) = pending.lock().expect("pending map").remove(&id) {
                let _ = p.reply_tx.send(Err(ClientError::Timeout {
                    service: p.service,
                    after: p.timeout,
                }));
            }
        }
        let timeout_ms = deadlines
            .peek()
            .map(|Reverse((deadline, _))| deadline.saturating_duration_since(now).as_millis() as i64 + 1)
            .unwrap_or(-1);
        let mut items = [
            dealer.as_poll_item(zmq::POLLIN),
            zmq::PollItem::from_fd(woken.as_raw_fd(), zmq::POLLIN),
        ];
        if zmq::poll(&mut items, timeout_ms).is_err() {
            continue;
        }
        if items[1].is_readable() {
            let mut drained = [0u8; 256];
            while matches!(woken.read(&mut drained), Ok(n) if n > 0) {}
            loop {
                match inbox.try_recv() {
                    Ok(Command::Request {
                        id,
                        timeout,
                        service,
                        body,
                    }) => {
                        deadlines.push(Reverse((Instant::now() + timeout, id)));
                        let mut message = vec![Bytes::copy_from_slice(&id.to_be_bytes())];
                        message.extend(mdp::client_request(&service, body));
                        if let Err(e) = net::send_frames(&dealer, &message, 0) {
                            warn!(error = %e, "async client could not send");
                        }
                    }
                    Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        // Whoever still waits hears that it is over.
                        for (_, p) in pending.lock().expect("pending map").drain() {
                            let _ = p.reply_tx.send(Err(ClientError::Closed));
                        }
                        return;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
        }
        if items[0].is_readable() {
            while let Ok(frames) = dealer.recv_multipart(zmq::DONTWAIT) {
                let mut frames: Frames = frames.into_iter().map(Bytes::from).collect();
                let Ok(id_bytes) = <[u8; 8]>::try_from(frames.first().map(|f| f.as_ref()).unwrap_or_default()) else {
                    continue;
                };
                let id = u64::from_be_bytes(id_bytes);
                let rest = frames.split_off(1);
                let Some(p) = pending.lock().expect("pending map").remove(&id) else {
                    // Its caller gave up already.
                    continue;
                };
                let outcome = mdp::parse_client_reply(rest)
                    .map(|(_, body)| body)
                    .map_err(|e| ClientError::Protocol(e.to_string()));
                let _ = p.reply_tx.send(outcome);
            }
        }
    }
}
