//! The synchronous client: one request at a time, with a timeout and
//! retries on a fresh socket, as RFC 7's reliable client does.

use std::time::{Duration, Instant};

use majordome_mdp::domogik::Message;
use majordome_mdp::{mdp, Frames};
use majordome_net as net;

use crate::error::ClientError;

/// How a [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long to wait for a reply (and, in the Domogik dialect, the
    /// deadline given to the broker).
    pub timeout: Duration,
    /// How many times a raw request is sent again, each on a fresh socket,
    /// after a timeout. Domogik-dialect requests are never retried: a `.do`
    /// may not be safe to run twice.
    pub retries: u32,
    /// How long to wait for the connection to the broker.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            retries: 0,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A synchronous MDP/0.1 client.
pub struct Client {
    endpoint: String,
    options: ClientOptions,
    socket: Option<zmq::Socket>,
    /// When it fires, a request waiting for its reply (or a connection)
    /// gives up at once with [`ClientError::Stopped`].
    shutdown: Option<net::Shutdown>,
}

impl Client {
    /// A client for the broker at `endpoint`. It connects on first use.
    pub fn new(endpoint: &str, options: ClientOptions) -> Self {
        Client {
            endpoint: endpoint.to_owned(),
            options,
            socket: None,
            shutdown: None,
        }
    }

    /// Gives up any wait as soon as `shutdown` fires: a service calling
    /// the bus stops with the rest of the process instead of waiting out
    /// its timeout.
    pub fn stop_on(mut self, shutdown: &net::Shutdown) -> Self {
        self.shutdown = Some(shutdown.clone());
        self
    }

    /// Waits up to `timeout` for `events` on `socket`, or for the shutdown:
    /// true when the socket is ready.
    fn wait_for(
        shutdown: Option<&net::Shutdown>,
        socket: &zmq::Socket,
        events: zmq::PollEvents,
        timeout: Duration,
    ) -> Result<bool, ClientError> {
        let timeout_ms = timeout.as_millis() as i64;
        let Some(shutdown) = shutdown else {
            return Ok(socket.poll(events, timeout_ms)? > 0);
        };
        let mut items = [
            socket.as_poll_item(events),
            zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
        ];
        zmq::poll(&mut items, timeout_ms)?;
        if items[1].is_readable() {
            return Err(ClientError::Stopped);
        }
        Ok(items[0].get_revents().contains(events))
    }

    /// Its options.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Sends a raw MDP request and returns the reply body. Retries on a
    /// fresh socket as configured.
    pub fn request(&mut self, service: &str, body: Frames) -> Result<Frames, ClientError> {
        let mut attempt = 0;
        loop {
            match self.exchange(service, body.clone(), self.options.timeout) {
                Err(ClientError::Timeout { .. }) if attempt < self.options.retries => attempt += 1,
                other => return other,
            }
        }
    }

    /// Sends a Domogik-dialect request: `[timeout] | action | JSON`. The
    /// broker expires it at the timeout and then answers with a `.result`
    /// carrying `status: false` and a reason, which is returned as is.
    pub fn request_message(&mut self, service: &str, message: &Message) -> Result<Message, ClientError> {
        let timeout = self.options.timeout;
        let mut body = vec![crate::timeout_frame(timeout)];
        body.extend(message.to_frames());
        let reply = self.exchange(service, body, timeout + crate::grace(timeout))?;
        Message::from_frames(&reply).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn exchange(&mut self, service: &str, body: Frames, timeout: Duration) -> Result<Frames, ClientError> {
        let shutdown = self.shutdown.clone();
        let socket = self.connected_socket()?;
        net::send_frames(socket, &mdp::client_request(service.as_bytes(), body), 0)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = match Self::wait_for(shutdown.as_ref(), socket, zmq::POLLIN, left) {
                Ok(ready) => ready,
                Err(e) => {
                    self.socket = None;
                    return Err(e);
                }
            };
            if !ready {
                // Whatever comes later belongs to this request: drop the
                // socket so that it cannot be read as the next one's reply.
                self.socket = None;
                return Err(ClientError::Timeout {
                    service: service.to_owned(),
                    after: timeout,
                });
            }
            let frames = net::recv_all(socket)?;
            let (from, body) = mdp::parse_client_reply(frames).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if from.as_ref() == service.as_bytes() {
                return Ok(body);
            }
            // A reply for another service can only be a leftover; skip it.
        }
    }

    fn connected_socket(&mut self) -> Result<&zmq::Socket, ClientError> {
        if self.socket.is_none() {
            let socket = net::context_for(&self.endpoint).socket(zmq::DEALER)?;
            socket.set_linger(0)?;
            // With IMMEDIATE, the socket is writable only once a connection
            // is up: that is how "nothing listening" is told apart from
            // "no reply".
            socket.set_immediate(true)?;
            net::zap::login(&socket, &self.endpoint)?;
            socket.connect(&self.endpoint).map_err(|source| ClientError::Endpoint {
                endpoint: self.endpoint.clone(),
                source,
            })?;
            if !Self::wait_for(
                self.shutdown.as_ref(),
                &socket,
                zmq::POLLOUT,
                self.options.connect_timeout,
            )? {
                return Err(ClientError::NotConnected {
                    endpoint: self.endpoint.clone(),
                    after: self.options.connect_timeout,
                });
            }
            self.socket = Some(socket);
        }
        Ok(self.socket.as_ref().expect("set above"))
    }
}
