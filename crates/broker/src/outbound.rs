//! What the broker sends, bounded in bytes per peer.
//!
//! libzmq bounds each peer's outgoing pipe in *messages* (the high-water
//! mark), whatever their size, and a plain ROUTER silently drops what does
//! not fit. So the broker's ROUTER is in `ZMQ_ROUTER_MANDATORY` mode with a
//! small high-water mark: a peer whose pipe is full makes the send fail
//! with `EAGAIN`, and the message waits here, in order, counted in bytes.
//! A peer that reads again gets its backlog first (retried on a short,
//! backing-off timer while any backlog remains: a mandatory ROUTER reports
//! `POLLOUT` when *any* peer can take a message, so polling for it would
//! spin). A peer that holds more than `max_unread_bytes_per_peer` unread,
//! or all peers together more than `max_unread_bytes`, loses what does not
//! fit (counted: `client_not_reading`); a peer that left (`EHOSTUNREACH`)
//! loses its backlog (`peer_gone`).
//!
//! So a client that never reads its replies costs at most its pipe
//! (`send_high_water_mark` messages) plus its backlog, not everything the
//! broker would otherwise queue for it.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use majordome_mdp::Frames;
use majordome_net as net;

/// What one waiting message counts beyond its frames.
const MESSAGE_OVERHEAD: usize = 64;

/// The retry timer while a backlog waits: from the first value, doubling
/// while nothing moves, up to the second.
pub(crate) const RETRY: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(64));

/// What happened to a message handed to [`Outbound::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Sent,
    Waiting,
    /// Dropped: the peer already holds too much unread.
    NotReading,
    /// Dropped: the peer is gone.
    Gone,
}

#[derive(Default)]
struct Peer {
    queue: VecDeque<Frames>,
    bytes: usize,
}

/// Messages waiting for peers whose pipe is full. See the module
/// documentation.
pub(crate) struct Outbound {
    peers: HashMap<Bytes, Peer>,
    bytes: usize,
    max_per_peer: usize,
    max_total: usize,
}

fn cost(frames: &Frames) -> usize {
    MESSAGE_OVERHEAD + frames.iter().map(Bytes::len).sum::<usize>()
}

impl Outbound {
    pub(crate) fn new(max_per_peer: usize, max_total: usize) -> Self {
        Outbound {
            peers: HashMap::new(),
            bytes: 0,
            max_per_peer,
            max_total,
        }
    }

    /// Whether some message waits.
    pub(crate) fn is_waiting(&self) -> bool {
        !self.peers.is_empty()
    }

    /// Bytes waiting, as counted against the bounds.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Sends `frames` (identity first) now if its peer can take it and has
    /// nothing waiting, else keeps it behind what waits, within the bounds.
    pub(crate) fn send(&mut self, socket: &zmq::Socket, frames: Frames) -> Outcome {
        // The common case costs one emptiness check.
        if !self.peers.is_empty() && self.peers.contains_key(&frames[0]) {
            return self.keep(frames);
        }
        match net::send_frames(socket, &frames, zmq::DONTWAIT) {
            Ok(()) => Outcome::Sent,
            Err(zmq::Error::EAGAIN) => self.keep(frames),
            // EHOSTUNREACH: not connected (any more). Anything else would be
            // a bug in the frames; either way nobody gets it.
            Err(_) => Outcome::Gone,
        }
    }

    fn keep(&mut self, frames: Frames) -> Outcome {
        let cost = cost(&frames);
        let peer = self.peers.entry(frames[0].clone()).or_default();
        if peer.bytes + cost > self.max_per_peer || self.bytes + cost > self.max_total {
            if peer.queue.is_empty() {
                self.peers.remove(&frames[0]);
            }
            return Outcome::NotReading;
        }
        peer.bytes += cost;
        self.bytes += cost;
        peer.queue.push_back(frames);
        Outcome::Waiting
    }

    /// Sends what waits, in order, to each peer that can take it now.
    /// Returns how many were sent and how many dropped because their peer
    /// was gone.
    pub(crate) fn retry(&mut self, socket: &zmq::Socket) -> (usize, usize) {
        let (mut sent, mut gone) = (0, 0);
        let mut freed = 0;
        self.peers.retain(|_, peer| {
            while let Some(frames) = peer.queue.front() {
                match net::send_frames(socket, frames, zmq::DONTWAIT) {
                    Ok(()) => sent += 1,
                    Err(zmq::Error::EAGAIN) => return true,
                    Err(_) => {
                        gone += peer.queue.len();
                        freed += peer.bytes;
                        return false;
                    }
                }
                let frames = peer.queue.pop_front().expect("front");
                let cost = cost(&frames);
                peer.bytes -= cost;
                freed += cost;
            }
            false
        });
        self.bytes -= freed;
        (sent, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn f(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    /// A mandatory ROUTER with a tiny high-water mark, and a DEALER peer
    /// that reads nothing until told to, over TCP as the broker's clients.
    fn pair() -> (zmq::Context, zmq::Socket, zmq::Socket) {
        let context = zmq::Context::new();
        let router = context.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.set_router_mandatory(true).unwrap();
        router.set_sndhwm(2).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = net::bound_endpoint(&router).unwrap();
        let dealer = context.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer.set_identity(b"peer").unwrap();
        dealer.set_rcvhwm(2).unwrap();
        dealer.connect(&endpoint).unwrap();
        // The ROUTER knows the peer once it has heard from it.
        dealer.send("hello", 0).unwrap();
        router.recv_multipart(0).unwrap();
        (context, router, dealer)
    }

    fn recv_all(dealer: &zmq::Socket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Ok(parts) = dealer.recv_multipart(zmq::DONTWAIT) {
            got.push(parts[0].clone());
        }
        got
    }

    #[test]
    fn a_full_pipe_keeps_messages_in_order_within_the_bounds_and_sends_them_when_read() {
        let (_context, router, dealer) = pair();
        let mut out = Outbound::new(4 * (MESSAGE_OVERHEAD + 5), 1 << 20);
        let mut outcomes = Vec::new();
        for n in 0..12u8 {
            outcomes.push(out.send(&router, f(&[b"peer", &[b'0' + n]])));
        }
        let sent = outcomes.iter().filter(|o| **o == Outcome::Sent).count();
        let waiting = outcomes.iter().filter(|o| **o == Outcome::Waiting).count();
        assert!(sent >= 2, "{outcomes:?}");
        assert_eq!(waiting, 4, "{outcomes:?}");
        assert!(
            outcomes[sent + waiting..].iter().all(|o| *o == Outcome::NotReading),
            "{outcomes:?}"
        );
        assert_eq!(out.bytes(), 4 * (MESSAGE_OVERHEAD + 5));
        // The peer reads; what waited follows in order.
        let mut got = Vec::new();
        let started = Instant::now();
        while out.is_waiting() || got.len() < sent + waiting {
            got.extend(recv_all(&dealer));
            out.retry(&router);
            assert!(started.elapsed() < Duration::from_secs(10), "{got:?}");
        }
        got.extend(recv_all(&dealer));
        let expected: Vec<Vec<u8>> = (0..(sent + waiting) as u8).map(|n| vec![b'0' + n]).collect();
        assert_eq!(got, expected);
        assert_eq!(out.bytes(), 0);
    }

    #[test]
    fn a_peer_that_left_loses_its_backlog() {
        let (_context, router, dealer) = pair();
        let mut out = Outbound::new(1 << 20, 1 << 20);
        while out.send(&router, f(&[b"peer", b"x"])) == Outcome::Sent {}
        assert!(out.is_waiting());
        drop(dealer);
        // Until the ROUTER learns that the connection closed, what waits
        // may still go into the pipe; after that, all of it is dropped and
        // nothing more is kept for that peer.
        let started = Instant::now();
        loop {
            out.retry(&router);
            if !out.is_waiting() && out.send(&router, f(&[b"peer", b"x"])) == Outcome::Gone {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        assert_eq!(out.bytes(), 0);
        assert_eq!(out.send(&router, f(&[b"nobody", b"x"])), Outcome::Gone);
    }
}
