//! The socket loop around [`Core`]: one ROUTER socket, one thread.

use std::time::{Duration, Instant};

use std::sync::Arc;

use majordome_access::{Policy, Who};
use majordome_mdp::mdp;
use majordome_net::{self as net, zap, Received, Shutdown};
use thiserror::Error;
use tracing::info;

use crate::core::Core;
use crate::outbound::{self, Outbound, Outcome};
use crate::settings::Settings;

/// How long, in milliseconds, shutdown waits for the last messages to leave.
const SHUTDOWN_LINGER_MS: i32 = 1000;

/// What can stop a broker from starting or running.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The endpoint could not be bound.
    #[error(transparent)]
    Bind(#[from] net::BindError),
    /// A ZeroMQ call failed.
    #[error("ZeroMQ error: {0}")]
    Zmq(#[from] zmq::Error),
}

/// A bound broker, ready to [`Broker::run`].
pub struct Broker {
    /// Its own context, so that closing it at shutdown waits for the last
    /// messages (the DISCONNECTs) to leave, which the process-wide context,
    /// never closed, would not do.
    context: zmq::Context,
    socket: zmq::Socket,
    endpoint: String,
    /// The `inproc://` endpoint it also listens on, if any.
    inproc: Option<String>,
    settings: Settings,
    /// Whether its listeners ask for a login: then every message's
    /// `User-Id` is read.
    logins: bool,
    policy: Arc<Policy>,
}

impl Broker {
    /// Binds the broker's ROUTER socket. `tcp://127.0.0.1:0` picks a free
    /// port; [`Broker::endpoint`] tells which.
    pub fn bind(endpoint: &str, settings: Settings) -> Result<Self, BrokerError> {
        Broker::bind_with(endpoint, settings, None)
    }

    /// [`Broker::bind`], with a listener that asks for a PLAIN login
    /// checked by `zap` when it is given.
    pub fn bind_with(endpoint: &str, settings: Settings, zap: Option<&mut zap::Handler>) -> Result<Self, BrokerError> {
        let context = zmq::Context::new();
        let logins = zap.is_some();
        if let Some(handler) = zap {
            handler.attach(&context)?;
        }
        let socket = context.socket(zmq::ROUTER)?;
        socket.set_linger(0)?;
        socket.set_sndhwm(settings.send_high_water_mark)?;
        socket.set_rcvhwm(settings.receive_high_water_mark)?;
        // libzmq closes a connection that sends one frame over this size,
        // before the broker even sees it: the first line of defence against
        // memory exhaustion. Whole messages are bounded in the loop.
        socket.set_maxmsgsize(settings.max_message_bytes as i64)?;
        // A full pipe says EAGAIN instead of dropping in silence: what a
        // slow peer cannot take yet waits in `Outbound`, counted in bytes.
        socket.set_router_mandatory(true)?;
        zap::listener(&socket, logins)?;
        net::bind(&socket, endpoint, net::bind::PATIENCE)?;
        let endpoint = net::bound_endpoint(&socket)?;
        Ok(Broker {
            context,
            socket,
            endpoint,
            inproc: None,
            settings,
            logins,
            policy: Arc::default(),
        })
    }

    /// What named identities may do (with logins).
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// The endpoint it listens on, with the real port.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Also listens on an `inproc://` endpoint, for the workers and clients
    /// of this process: they reach the broker without a TCP connection or
    /// ZeroMQ's I/O threads in between (an idle hub's heartbeats then wake
    /// only the two threads they concern). Returns the endpoint; sockets
    /// made through `majordome_net::context_for` it can connect to it.
    pub fn bind_inproc(&mut self) -> Result<String, BrokerError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let endpoint = format!(
            "inproc://majordome-broker-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        net::bind(&self.socket, &endpoint, Duration::ZERO)?;
        net::share_context(&endpoint, &self.context);
        self.inproc = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Serves until `shutdown` fires, then tells every worker to disconnect.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), BrokerError> {
        let mut core = Core::new(self.settings.clone(), Instant::now());
        core.set_policy(self.policy.clone());
        let mut out = Outbound::new(
            self.settings.max_unread_bytes_per_client,
            self.settings.max_unread_bytes,
        );
        let mut retry_every = outbound::RETRY.0;
        let mut scratch = zmq::Message::new();
        info!(endpoint = %self.endpoint, "broker serving");
        loop {
            let mut wait = core.next_wakeup().saturating_duration_since(Instant::now());
            if out.is_waiting() {
                wait = wait.min(retry_every);
            }
            // Round up so that a wake-up is never early, then spin.
            let timeout_ms = (wait.as_micros().div_ceil(1000)) as i64;
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
            ];
            match zmq::poll(&mut items, timeout_ms) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            if items[1].is_readable() {
                break;
            }
            // Drain what is waiting, a bounded batch at a time so that the
            // clock is read and timers run even under a flood.
            for _ in 0..4096 {
                match net::recv_frames(
                    &self.socket,
                    &mut scratch,
                    self.settings.max_frames,
                    self.settings.max_message_bytes,
                ) {
                    Ok(Some(Received::Message(frames))) => {
                        // A connection over TCP or IPC has a peer address,
                        // an inproc one (this process) has none. Without
                        // logins, only a READY needs to know.
                        let who = if self.logins {
                            Who::of(scratch.gets("Peer-Address").is_none(), scratch.gets("User-Id"))
                        } else if mdp::looks_like_ready(&frames) && scratch.gets("Peer-Address").is_none() {
                            Who::Hub
                        } else {
                            Who::Local
                        };
                        core.handle_message_from(Instant::now(), frames, who)
                    }
                    Ok(Some(Received::TooLarge { .. })) => core.handle_oversized(Instant::now()),
                    Ok(None) => break,
                    Err(zmq::Error::EINTR) => break,
                    Err(e) => return Err(e.into()),
                }
                self.flush(&mut core, &mut out);
            }
            if out.is_waiting() {
                let (sent, gone) = out.retry(&self.socket);
                core.count_unsent(Instant::now(), gone, "peer_gone", out.bytes());
                // Back off while nothing moves, so that a client that never
                // reads costs a wake-up every 64 ms, not a spin.
                retry_every = if sent > 0 || !out.is_waiting() {
                    outbound::RETRY.0
                } else {
                    (retry_every * 2).min(outbound::RETRY.1)
                };
            }
            core.tick(Instant::now());
            self.flush(&mut core, &mut out);
        }
        info!("broker stopping: telling workers to disconnect");
        core.shutdown();
        self.flush(&mut core, &mut out);
        // Give the DISCONNECTs a moment to go out; closing the context waits
        // for them (and no longer than this).
        self.socket.set_linger(SHUTDOWN_LINGER_MS)?;
        if let Some(endpoint) = &self.inproc {
            net::unshare_context(endpoint);
        }
        let Broker { context, socket, .. } = self;
        drop(socket);
        drop(context);
        Ok(())
    }

    fn flush(&self, core: &mut Core, out: &mut Outbound) {
        let (mut not_reading, mut waited) = (0, false);
        for frames in core.drain_outbox() {
            // Never blocks: a full pipe keeps the message in `out`.
            match out.send(&self.socket, frames) {
                Outcome::Sent | Outcome::Gone => {}
                Outcome::Waiting => waited = true,
                Outcome::NotReading => not_reading += 1,
            }
        }
        if waited || not_reading > 0 {
            core.count_unsent(Instant::now(), not_reading, "client_not_reading", out.bytes());
        }
    }
}
