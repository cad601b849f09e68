//! Idle services: many registered workers that get no requests, to show
//! what they cost the broker (memory, heartbeats) while it is loaded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use majordome_mdp::{mdp, mmi};
use majordome_net as net;

use super::load::{bench_socket, readable_within_stall};
use super::STALL;

/// A libzmq context opens at most 1023 sockets (`ZMQ_MAX_SOCKETS`, which
/// the `zmq` crate cannot raise), so the fleet takes a new context for each
/// this many.
const SOCKETS_PER_CONTEXT: usize = 1000;

/// How long the fleet may take to open its sockets.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// The name of the `index`th idle service.
pub(super) fn service_name(index: usize) -> String {
    format!("bench-idle-{index}")
}

/// M idle workers, each on its own service `bench-idle-<i>`, all served by
/// one thread on contexts of their own (so that they neither eat into the
/// process-wide context's socket budget nor share its I/O thread with the
/// clients being measured). Stopped, with a DISCONNECT each, when dropped.
pub(super) struct IdleFleet {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    count: usize,
}

impl IdleFleet {
    /// Opens `count` workers on `endpoint`, each sending READY, and returns
    /// once they are all open (not yet registered: see
    /// [`IdleFleet::wait_registered`]). Each heartbeats every `heartbeat`.
    pub(super) fn start(endpoint: &str, count: usize, heartbeat: Duration) -> Result<IdleFleet> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let endpoint = endpoint.to_owned();
            thread::Builder::new()
                .name("bench-idle".into())
                .spawn(move || serve(&endpoint, count, heartbeat, &stop, ready_tx))
                .context("cannot start the idle workers' thread")?
        };
        let mut fleet = IdleFleet {
            stop,
            thread: Some(thread),
            count,
        };
        match ready_rx.recv_timeout(OPEN_DEADLINE) {
            Ok(()) => Ok(fleet),
            // The thread gave up: its error says why.
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(fleet.join_error()),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "the {count} idle workers did not open their sockets within {} s",
                OPEN_DEADLINE.as_secs()
            ),
        }
    }

    /// Waits until the broker at `endpoint` answers `200` to `mmi.service`
    /// (RFC 8) for every idle service, for at most `deadline` in all.
    pub(super) fn wait_registered(&mut self, endpoint: &str, deadline: Duration) -> Result<()> {
        let client = bench_socket(endpoint, false)?;
        let started = Instant::now();
        for index in 0..self.count {
            let name = service_name(index);
            loop {
                if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                    return Err(self.join_error());
                }
                let request = mdp::client_request(mmi::SERVICE, [Bytes::from(name.clone())]);
                net::send_frames(&client, &request, 0).with_context(|| format!("cannot send to {endpoint}"))?;
                if !readable_within_stall(&client)? {
                    bail!(
                        "no answer to mmi.service from the broker at {endpoint} within {} s: \
                         is a broker running there, and does it implement MMI (RFC 8)?",
                        STALL.as_secs()
                    );
                }
                let reply = net::recv_all(&client)?;
                let (_, body) = mdp::parse_client_reply(reply)
                    .map_err(|e| anyhow!("an mmi.service reply that is not MDP/0.1: {e}"))?;
                let code = body.first().cloned().unwrap_or_default();
                if code.as_ref() == mmi::OK {
                    break;
                }
                if code.as_ref() == mmi::NOT_IMPLEMENTED {
                    bail!("the broker at {endpoint} does not implement mmi.service (RFC 8), so the bench cannot tell when the idle services are registered");
                }
                if started.elapsed() >= deadline {
                    bail!(
                        "only {index} of {} idle services registered within {} s: the broker at {endpoint} \
                         still answers {:?} to mmi.service {name:?}",
                        self.count,
                        deadline.as_secs(),
                        String::from_utf8_lossy(&code)
                    );
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Stops the thread and returns its error (or says it stopped without one).
    fn join_error(&mut self) -> anyhow::Error {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => anyhow!("the idle workers' thread panicked"),
            Some(Ok(Ok(()))) | None => anyhow!("the idle workers' thread stopped"),
        }
    }
}

impl Drop for IdleFleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One idle worker.
struct Idle {
    socket: zmq::Socket,
    service: Bytes,
}

/// The fleet's thread: opens the sockets, reports on `ready`, then
/// heartbeats until `stop`.
fn serve(endpoint: &str, count: usize, heartbeat: Duration, stop: &AtomicBool, ready: mpsc::Sender<()>) -> Result<()> {
    let mut contexts: Vec<zmq::Context> = Vec::new();
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        if index % SOCKETS_PER_CONTEXT == 0 {
            contexts.push(zmq::Context::new());
        }
        let socket = open(contexts.last().expect("pushed above"), endpoint).with_context(|| {
            format!(
                "cannot open idle worker {} of {count} (out of file descriptors?)",
                index + 1
            )
        })?;
        let service = Bytes::from(service_name(index));
        net::send_frames(&socket, &mdp::ready(&service), zmq::DONTWAIT)?;
        workers.push(Idle { socket, service });
    }
    let _ = ready.send(());
    drop(ready);

    // One pass per heartbeat interval over all sockets, never a poll over
    // them: woken by each of the broker's heartbeats, an O(M) poll per
    // message would cost the bench O(M²) a second and steal CPU from the
    // clients it measures. Nothing here needs a quicker answer: a
    // DISCONNECT is answered with READY within one interval.
    let mut scratch = zmq::Message::new();
    let mut next_pass = Instant::now() + heartbeat;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next_pass {
            thread::sleep((next_pass - now).min(Duration::from_millis(50)));
            continue;
        }
        for worker in &workers {
            while let Some(received) = net::recv_frames(&worker.socket, &mut scratch, 16, 64 * 1024)? {
                if let net::Received::Message(frames) = received {
                    if mdp::parse_to_worker(frames) == Ok(mdp::ToWorker::Disconnect) {
                        send_or_skip(&worker.socket, &mdp::ready(&worker.service))?;
                    }
                }
            }
            send_or_skip(&worker.socket, &mdp::heartbeat())?;
        }
        // Late passes do not pile up into a burst of catch-up passes.
        next_pass = (next_pass + heartbeat).max(Instant::now());
    }
    for worker in &workers {
        send_or_skip(&worker.socket, &mdp::disconnect())?;
    }
    Ok(())
}

fn open(context: &zmq::Context, endpoint: &str) -> Result<zmq::Socket> {
    let socket = context.socket(zmq::DEALER)?;
    // LINGER 0 so that dropping the contexts never waits for a broker that
    // is gone.
    socket.set_linger(0)?;
    net::zap::login(&socket, endpoint)?;
    socket.connect(endpoint)?;
    Ok(socket)
}

/// Sends without blocking; a full pipe (a broker that does not read) skips
/// this message rather than stall every other worker's heartbeat.
fn send_or_skip(socket: &zmq::Socket, frames: &[Bytes]) -> Result<()> {
    match net::send_frames(socket, frames, zmq::DONTWAIT) {
        Ok(()) | Err(zmq::Error::EAGAIN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More idle workers than one context can hold, seen from a ROUTER:
    /// each sends READY for its own service, then heartbeats, and answers
    /// a DISCONNECT with READY.
    #[test]
    fn the_fleet_outgrows_one_context_and_speaks_rfc_7() {
        super::super::spawn::raise_fd_limit();
        let router = net::context().socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.set_rcvhwm(0).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = net::bound_endpoint(&router).unwrap();
        let count = SOCKETS_PER_CONTEXT + 30;
        let fleet = IdleFleet::start(&endpoint, count, Duration::from_millis(100)).unwrap();
        let mut services = std::collections::HashSet::new();
        let mut identity_of_0 = None;
        while services.len() < count {
            assert!(
                router.poll(zmq::POLLIN, 10_000).unwrap() > 0,
                "{} READY",
                services.len()
            );
            let frames = net::recv_all(&router).unwrap();
            if frames[3].as_ref() == [mdp::command::READY] {
                assert_eq!(frames[1..3], [Bytes::new(), Bytes::from_static(b"MDPW01")]);
                if frames[4].as_ref() == b"bench-idle-0" {
                    identity_of_0 = Some(frames[0].clone());
                }
                services.insert(frames[4].clone());
            }
        }
        assert!(services.contains(&Bytes::from(service_name(count - 1))));
        let identity = identity_of_0.unwrap();
        net::send_frames(&router, &mdp::worker_disconnect(&identity), 0).unwrap();
        let (mut heartbeats, mut ready_again) = (0, false);
        let started = Instant::now();
        while !ready_again || heartbeats == 0 {
            assert!(
                started.elapsed() < STALL,
                "heartbeats {heartbeats}, READY again {ready_again}"
            );
            if router.poll(zmq::POLLIN, 1000).unwrap() == 0 {
                continue;
            }
            let frames = net::recv_all(&router).unwrap();
            if frames[0] == identity {
                match frames[3].as_ref() {
                    [mdp::command::HEARTBEAT] => heartbeats += 1,
                    [mdp::command::READY] => ready_again = true,
                    other => panic!("unexpected command {other:?}"),
                }
            }
        }
        drop(fleet);
    }
}
