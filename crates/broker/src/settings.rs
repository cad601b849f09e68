//! Every bound and timer of the broker, each a named setting with a default.

use std::time::Duration;

/// What one queued request is counted as beyond its frames: its entry in
/// the request table, its queue and its deadline, and the frames' own
/// headers. Without it, a flood of empty requests would look free.
pub const QUEUED_REQUEST_OVERHEAD: usize = 256;

/// The broker's tunables. `Settings::default()` is what `majordome broker`
/// runs with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How often the broker sends HEARTBEAT to each worker. Domogik's workers
    /// reconnect after about 3 s of silence, so this stays well under that.
    #[serde(with = "majordome_net::duration_text")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals a worker may miss before it is declared dead.
    pub liveness: u32,
    /// How long a request whose client sent no timeout frame may go
    /// without progress: waiting while its service answers nobody, or held
    /// by a worker that does not answer. Time spent queued behind other
    /// requests that are being answered does not count, so a plain RFC 7
    /// client may pipeline a long burst (RFC 7 has no way to tell it that a
    /// request expired).
    #[serde(with = "majordome_net::duration_text")]
    pub request_timeout: Duration,
    /// Bytes of the requests waiting for a worker, per service: their frames
    /// plus [`QUEUED_REQUEST_OVERHEAD`] each. Beyond it new requests are
    /// rejected.
    pub max_queue_bytes_per_service: usize,
    /// The same, for all services together.
    pub max_queued_bytes: usize,
    /// Services known at once (with a worker, a queue, or recent activity);
    /// bounds memory against clients asking for random names. A worker's
    /// READY for a new service always finds room while any service has no
    /// worker: the one without a worker for longest is evicted.
    pub max_services: usize,
    /// Of those, services that have no worker (only requests named them).
    /// A request for one more evicts the oldest; its waiting requests fail
    /// with a reason that says so.
    pub max_workerless_services: usize,
    /// Bytes of requests one client (one connection) may have waiting for
    /// a worker, counted as for `max_queue_bytes_per_service`. Beyond it
    /// its new requests are rejected; other clients are not affected.
    pub max_queued_bytes_per_client: usize,
    /// The longest deadline a request may have. A Domogik timeout frame
    /// beyond it is clipped, and a failure reply says so.
    #[serde(with = "majordome_net::duration_text")]
    pub max_request_timeout: Duration,
    /// Frames in one message; larger messages are dropped and counted.
    pub max_frames: usize,
    /// Bytes in one message (all frames); larger messages are dropped.
    pub max_message_bytes: usize,
    /// Bytes of messages that may wait in the broker for one peer whose
    /// pipe is full (a client that does not read its replies); beyond it
    /// they are dropped and counted (`client_not_reading`). The peer's
    /// pipe holds at most `send_high_water_mark` messages besides.
    pub max_unread_bytes_per_client: usize,
    /// The same for all peers together.
    pub max_unread_bytes: usize,
    /// Address frames a client may put before the delimiter.
    pub max_envelope: usize,
    /// ZeroMQ high-water marks (messages) of the broker's socket, each way.
    /// On the way out it bounds each peer's pipe; what does not fit waits
    /// in the broker, counted in bytes (`max_unread_bytes_per_client`).
    pub send_high_water_mark: i32,
    /// On the way in it bounds what libzmq reads off each connection
    /// before the broker takes it: beyond it, that peer is held back (TCP
    /// back-pressure, nothing lost). Each connection can so hold at most
    /// this many messages (of at most `max_message_bytes`) that the loop
    /// has not read yet, when the broker is slower than a client.
    pub receive_high_water_mark: i32,
    /// How long a service with no worker and no queue is kept (with its
    /// statistics) after its last activity.
    #[serde(with = "majordome_net::duration_text")]
    pub idle_service_retention: Duration,
    /// Requests a worker may be given before it has answered the first.
    /// 1 is RFC 7's one-at-a-time, and the default: a request never waits
    /// behind another on a slow worker. Above 1, requests still go to idle
    /// workers first, and only when none is idle are they queued at busy
    /// workers (which all read their socket in order, the zguide's and
    /// Domogik's included); this saves thread wake-ups under load.
    pub worker_prefetch: usize,
    /// Recognise Domogik's timeout frame at the head of request bodies.
    pub domogik_timeout_frame: bool,
    /// Service names that only workers of this process may serve: the
    /// hub's own parts (set by the hub, not by the configuration file). A
    /// READY for one from a TCP connection gets DISCONNECT and is counted
    /// (`reserved_service`). "In this process" is read as "libzmq gives no
    /// peer address": an IPC peer, if the broker listened on `ipc://`,
    /// would pass too.
    #[serde(skip)]
    pub in_process_only: Vec<String>,
    /// Services whose requests get one more frame before their body: the
    /// caller's identity (empty for the hub and anonymous local clients).
    /// Set by the hub for its own Titanic, which keeps each request for
    /// its owner; only names of `in_process_only` belong here, so that no
    /// other peer ever sees the frame.
    #[serde(skip)]
    pub caller_frame_for: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval: Duration::from_millis(1000),
            liveness: 5,
            request_timeout: Duration::from_secs(10),
            max_queue_bytes_per_service: 64 * 1024 * 1024,
            max_queued_bytes: 256 * 1024 * 1024,
            max_services: 10_000,
            max_workerless_services: 1_000,
            max_queued_bytes_per_client: 64 * 1024 * 1024,
            max_request_timeout: Duration::from_secs(300),
            max_frames: 64,
            max_message_bytes: 4 * 1024 * 1024,
            max_envelope: 4,
            max_unread_bytes_per_client: 16 * 1024 * 1024,
            max_unread_bytes: 128 * 1024 * 1024,
            send_high_water_mark: 256,
            receive_high_water_mark: 1_000,
            idle_service_retention: Duration::from_secs(300),
            worker_prefetch: 1,
            domogik_timeout_frame: true,
            in_process_only: Vec::new(),
            caller_frame_for: Vec::new(),
        }
    }
}

impl Settings {
    /// How long a worker may stay silent before it is declared dead.
    pub fn worker_expiry(&self) -> Duration {
        self.heartbeat_interval * self.liveness.max(1)
    }
}
