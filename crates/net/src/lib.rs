//! ZeroMQ plumbing shared by every socket loop in majordome: the process-wide
//! context, reading and writing whole multipart messages as [`Bytes`]
//! frames, and a shutdown signal that socket loops can poll.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub use zmq;

pub mod bind;
pub mod zap;
pub use bind::{bind, BindError};

/// The default endpoints of the hub: the one place that names its ports.
/// Domogik's ports, so that its plugins and tools find majordome where
/// they found Domogik's hub.
pub mod ports {
    /// The broker (MDP/0.1, MMI, the Domogik dialect).
    pub const BROKER: &str = "tcp://127.0.0.1:40410";
    /// The event forwarder's side that publishers connect to (XSUB).
    pub const PUBLISH: &str = "tcp://127.0.0.1:40411";
    /// The event forwarder's side that subscribers connect to (XPUB).
    pub const SUBSCRIBE: &str = "tcp://127.0.0.1:40412";
    /// The Clone server's snapshot socket; its updates are published on the
    /// next port and its collector listens on the one after.
    pub const STATE: &str = "tcp://127.0.0.1:40413";
}

/// The process-wide ZeroMQ context. One context means one libzmq I/O thread
/// for the whole process, however many sockets it opens.
pub fn context() -> &'static zmq::Context {
    static CONTEXT: OnceLock<zmq::Context> = OnceLock::new();
    CONTEXT.get_or_init(zmq::Context::new)
}

/// Durations as people write them in the configuration file and read them
/// in `majordome config show`: jiff's friendly format (`"1s"`, `"250ms"`,
/// `"1h 30m"`; ISO 8601 `"PT1S"` is read too). For serde's `with`.
pub mod duration_text {
    use std::time::Duration;

    use jiff::fmt::serde::unsigned_duration::friendly::compact::required;

    pub fn serialize<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        required::serialize(duration, serializer)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        required::deserialize(deserializer)
    }

    /// `duration` in the friendly format, as written to a file.
    pub fn format(duration: Duration) -> String {
        match jiff::SignedDuration::try_from(duration) {
            Ok(signed) => format!("{signed:#}"),
            Err(_) => format!("{}s", duration.as_secs()),
        }
    }
}

/// Contexts shared by name, for `inproc://` endpoints: an inproc
/// connection only works within one context, and a server (the broker)
/// may keep its own.
fn shared_contexts() -> &'static std::sync::Mutex<std::collections::HashMap<String, zmq::Context>> {
    static SHARED: OnceLock<std::sync::Mutex<std::collections::HashMap<String, zmq::Context>>> = OnceLock::new();
    SHARED.get_or_init(Default::default)
}

/// Makes `endpoint` (an `inproc://` one that `context` binds) reachable
/// from this process's other sockets, through [`context_for`].
pub fn share_context(endpoint: &str, context: &zmq::Context) {
    let mut shared = shared_contexts()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    shared.insert(endpoint.to_owned(), context.clone());
}

/// Forgets what [`share_context`] said of `endpoint`.
pub fn unshare_context(endpoint: &str) {
    let mut shared = shared_contexts()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    shared.remove(endpoint);
}

/// The context a socket connecting to `endpoint` must be made in: the one
/// shared for that `inproc://` endpoint, else the process-wide one.
pub fn context_for(endpoint: &str) -> zmq::Context {
    if endpoint.starts_with("inproc://") {
        let shared = shared_contexts()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(context) = shared.get(endpoint) {
            return context.clone();
        }
    }
    context().clone()
}

/// What [`recv_frames`] got.
#[derive(Debug)]
pub enum Received {
    /// A whole message.
    Message(Vec<Bytes>),
    /// A message with more than the allowed number of frames or bytes; it
    /// was read to its end and thrown away, except its first frames
    /// (at most [`HEAD_FRAMES`], those that came within the bounds), so
    /// that the caller can tell its sender why (a Clone write's uuid).
    TooLarge {
        frames: usize,
        bytes: usize,
        head: Vec<Bytes>,
    },
}

/// How many leading frames of a message too large to read are kept.
pub const HEAD_FRAMES: usize = 3;

/// Reads one whole multipart message without blocking. `Ok(None)` when none
/// is waiting. Frames past `max_frames`, or a message over `max_bytes`, are
/// drained and reported as [`Received::TooLarge`] so that the caller can
/// count them; the socket stays usable.
pub fn recv_frames(
    socket: &zmq::Socket,
    scratch: &mut zmq::Message,
    max_frames: usize,
    max_bytes: usize,
) -> zmq::Result<Option<Received>> {
    match socket.recv(scratch, zmq::DONTWAIT) {
        Ok(()) => {}
        Err(zmq::Error::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    }
    // The frames are copied into one buffer and split off it as they come:
    // they share its allocation (one per message rather than one per frame;
    // most frames of this bus are a few bytes: identities, "", MDPC01). A
    // frame larger than what is left gets an allocation of its own, so a
    // small frame kept long (a service name) never holds a large one.
    let mut buffer = BytesMut::with_capacity(256);
    let mut frames = Vec::with_capacity(8);
    let mut count = 1;
    let mut total = scratch.len();
    buffer.extend_from_slice(scratch);
    frames.push(buffer.split().freeze());
    while scratch.get_more() {
        // The rest of a multipart message is already there: ZeroMQ delivers
        // messages whole, so this never blocks.
        socket.recv(scratch, 0)?;
        count += 1;
        total += scratch.len();
        if count <= max_frames && total <= max_bytes {
            buffer.extend_from_slice(scratch);
            frames.push(buffer.split().freeze());
        }
    }
    if count > max_frames || total > max_bytes {
        frames.truncate(HEAD_FRAMES);
        return Ok(Some(Received::TooLarge {
            frames: count,
            bytes: total,
            head: frames,
        }));
    }
    Ok(Some(Received::Message(frames)))
}

/// Reads one whole multipart message, blocking. For clients and workers,
/// which poll first.
pub fn recv_all(socket: &zmq::Socket) -> zmq::Result<Vec<Bytes>> {
    let mut frames = Vec::with_capacity(8);
    loop {
        let message = socket.recv_msg(0)?;
        frames.push(Bytes::copy_from_slice(&message));
        if !message.get_more() {
            return Ok(frames);
        }
    }
}

/// Sends a multipart message. With `zmq::DONTWAIT` in `flags`, a full pipe
/// gives `EAGAIN` on the first frame and nothing is sent.
pub fn send_frames(socket: &zmq::Socket, frames: &[Bytes], flags: i32) -> zmq::Result<()> {
    let last = frames.len().saturating_sub(1);
    for (index, frame) in frames.iter().enumerate() {
        let more = if index < last { zmq::SNDMORE } else { 0 };
        socket.send(&frame[..], flags | more)?;
    }
    Ok(())
}

/// The endpoint a socket actually bound to (resolves port 0).
pub fn bound_endpoint(socket: &zmq::Socket) -> zmq::Result<String> {
    Ok(socket.get_last_endpoint()?.unwrap_or_default())
}

/// A one-way "stop now" signal for socket loops. It is a socket pair: once
/// triggered, its read end stays readable forever, so any number of loops
/// can include [`Shutdown::fd`] in their `zmq::poll` and all of them wake.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Pair>,
}

struct Pair {
    read: UnixStream,
    write: UnixStream,
}

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> std::io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        Ok(Shutdown {
            inner: Arc::new(Pair { read, write }),
        })
    }

    /// A signal that also fires on SIGINT and SIGTERM.
    pub fn on_signals() -> std::io::Result<Self> {
        let shutdown = Self::new()?;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::low_level::pipe::register(signal, shutdown.inner.write.try_clone()?)?;
        }
        Ok(shutdown)
    }

    /// Fires the signal. Idempotent.
    pub fn trigger(&self) {
        // A full socket buffer means it already fired; nothing to do.
        let _ = (&self.inner.write).write(&[1]);
    }

    /// A second handle on the end to poll, readable once the signal has
    /// fired (for an async runtime to watch: `tokio::net::UnixStream::
    /// from_std`, then `readable()`).
    pub fn watcher(&self) -> std::io::Result<UnixStream> {
        self.inner.read.try_clone()
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.inner.read.as_raw_fd()
    }

    /// True once the signal has fired.
    pub fn is_triggered(&self) -> bool {
        self.readable_within(PollTimeout::ZERO)
    }

    /// Blocks until the signal fires or `timeout` passes; true if it fired.
    /// Loops that work at an interval wait with this, so a stop is seen
    /// at once rather than at the next tick.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let millis = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            if self.readable_within(millis) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Blocks until the signal fires.
    pub fn wait(&self) {
        while !self.readable_within(PollTimeout::NONE) {}
    }

    /// One poll of the read end; an interrupted one says "not yet", and
    /// the callers' loops ask again.
    fn readable_within(&self, timeout: PollTimeout) -> bool {
        let mut fds = [PollFd::new(self.inner.read.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
            && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_wakes_every_poller_and_stays_fired() {
        let shutdown = Shutdown::new().unwrap();
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        shutdown.trigger();
        assert!(shutdown.is_triggered());
        assert!(shutdown.clone().is_triggered());
        shutdown.wait();
    }

    /// Frames come back whole and in order from the one buffer, empty ones
    /// and ones larger than what is left of it included.
    #[test]
    fn every_frame_comes_back_as_sent() {
        let ctx = zmq::Context::new();
        let a = ctx.socket(zmq::PAIR).unwrap();
        let b = ctx.socket(zmq::PAIR).unwrap();
        a.bind("inproc://frames").unwrap();
        b.connect("inproc://frames").unwrap();
        let mut scratch = zmq::Message::new();
        for count in [1usize, 2, 16, 17, 40] {
            let sent: Vec<Bytes> = (0..count).map(|i| Bytes::from(vec![i as u8; i % 5 * 37])).collect();
            send_frames(&b, &sent, 0).unwrap();
            a.poll(zmq::POLLIN, 1000).unwrap();
            match recv_frames(&a, &mut scratch, 64, 1 << 20) {
                Ok(Some(Received::Message(got))) => assert_eq!(got, sent, "{count} frames"),
                other => panic!("{count} frames: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_messages_are_drained_not_delivered() {
        let ctx = zmq::Context::new();
        let a = ctx.socket(zmq::PAIR).unwrap();
        let b = ctx.socket(zmq::PAIR).unwrap();
        a.bind("inproc://oversize").unwrap();
        b.connect("inproc://oversize").unwrap();
        let big: Vec<Bytes> = (0..5).map(|_| Bytes::from_static(b"0123456789")).collect();
        send_frames(&b, &big, 0).unwrap();
        send_frames(&b, &big[..2], 0).unwrap();
        a.poll(zmq::POLLIN, 1000).unwrap();
        let mut scratch = zmq::Message::new();
        match recv_frames(&a, &mut scratch, 4, 1000) {
            Ok(Some(Received::TooLarge {
                frames: 5,
                bytes: 50,
                head,
            })) => assert_eq!(head, big[..3]),
            other => panic!("expected the large message, got {other:?}"),
        }
        match recv_frames(&a, &mut scratch, 4, 1000) {
            Ok(Some(Received::Message(frames))) => assert_eq!(frames.len(), 2),
            other => panic!("expected the small message, got {other:?}"),
        }
        assert!(matches!(recv_frames(&a, &mut scratch, 4, 15), Ok(None)));
    }
}
