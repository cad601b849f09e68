//! One measured run: the echo workers, the clients, and the clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use majordome_mdp::mdp;
use majordome_net as net;

use super::{figures_of, Figures, ReqRepOptions, STALL};

/// Where the load goes, and how it is framed.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// An MDP/0.1 broker: clients and workers both connect to it; the
    /// workers announce `capacity` (1: nothing, plain RFC 7).
    Broker {
        endpoint: String,
        service: Bytes,
        capacity: u32,
    },
    /// A bare proxy: clients connect to its ROUTER, workers to its DEALER.
    Proxy { frontend: String, backend: String },
}

impl Target {
    fn client_endpoint(&self) -> &str {
        match self {
            Target::Broker { endpoint, .. } => endpoint,
            Target::Proxy { frontend, .. } => frontend,
        }
    }

    fn worker_endpoint(&self) -> &str {
        match self {
            Target::Broker { endpoint, .. } => endpoint,
            Target::Proxy { backend, .. } => backend,
        }
    }

    /// The request as a client's DEALER sends it.
    fn request(&self, body: Bytes) -> Vec<Bytes> {
        match self {
            Target::Broker { service, .. } => mdp::client_request(service, [body]),
            Target::Proxy { .. } => vec![Bytes::new(), body],
        }
    }

    /// The echoed body of a reply as a client's DEALER receives it.
    fn reply_body(&self, frames: Vec<Bytes>) -> Result<Bytes> {
        let body = match self {
            Target::Broker { .. } => {
                let (_, mut body) =
                    mdp::parse_client_reply(frames).map_err(|e| anyhow!("a reply that is not MDP/0.1: {e}"))?;
                if body.len() != 1 {
                    bail!("a reply with {} body frames, not the 1 sent", body.len());
                }
                body.swap_remove(0)
            }
            Target::Proxy { .. } => match <[Bytes; 2]>::try_from(frames) {
                Ok([empty, body]) if empty.is_empty() => body,
                Ok(frames) => bail!("a reply from the proxy without its empty frame: {frames:?}"),
                Err(frames) => bail!("a reply from the proxy with {} frames, not 2", frames.len()),
            },
        };
        Ok(body)
    }

    /// What to say when no reply comes.
    fn no_reply(&self, got: usize, expected: usize) -> anyhow::Error {
        let progress = format!("{got} of {expected} replies in");
        match self {
            Target::Broker { endpoint, service, .. } => anyhow!(
                "no reply from the broker at {endpoint} within {} s ({progress}): is a broker running there, \
                 and does it have echo workers for service {:?}?",
                STALL.as_secs(),
                String::from_utf8_lossy(service)
            ),
            Target::Proxy { frontend, .. } => anyhow!(
                "no reply through the baseline proxy at {frontend} within {} s ({progress})",
                STALL.as_secs()
            ),
        }
    }
}

/// What one client measured: its latencies (µs) and when it got its last
/// reply.
struct ClientRun {
    latencies: Vec<u32>,
    finished: Instant,
}

/// Runs one measured load against `target` with workers of its own, and
/// returns its figures. [`EchoWorkers::start`] then [`measure`].
#[cfg(test)]
pub(super) fn run_load(target: &Target, options: &ReqRepOptions) -> Result<Figures> {
    let mut workers = EchoWorkers::start(target, options.workers)?;
    let figures = measure(target, options, &mut workers);
    let stopped = workers.stop();
    let figures = figures?;
    stopped?;
    Ok(figures)
}

/// W echo workers on one target, connected (and, on a broker, registered)
/// for as long as this lives: all the runs of that target share them, so
/// that no run starts while the broker still holds workers of the previous
/// one. Stopped (each sending DISCONNECT to a broker) when dropped.
pub(super) struct EchoWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl EchoWorkers {
    /// Starts `count` workers and returns once each is connected and has
    /// sent READY (to a broker), or with the first one's error.
    pub(super) fn start(target: &Target, count: usize) -> Result<EchoWorkers> {
        let mut workers = EchoWorkers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(count),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for index in 0..count {
            let target = target.clone();
            let stop = workers.stop.clone();
            let ready = ready_tx.clone();
            let thread = thread::Builder::new()
                .name(format!("bench-worker-{index}"))
                .spawn(move || echo_worker(&target, &stop, ready))
                .context("cannot start an echo worker thread")?;
            workers.threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..count {
            // Each worker reports once it is connected, or why it could not
            // be; the connection wait is itself bounded by STALL.
            match ready_rx.recv_timeout(STALL + Duration::from_secs(1)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("the echo workers did not start within {} s", STALL.as_secs()),
            }
        }
        Ok(workers)
    }

    /// The error of a worker that stopped on its own, if any did.
    fn failure(&mut self) -> Option<anyhow::Error> {
        let index = self.threads.iter().position(JoinHandle::is_finished)?;
        match self.threads.swap_remove(index).join() {
            Ok(Err(e)) => Some(e.context("an echo worker failed")),
            Ok(Ok(())) => Some(anyhow!("an echo worker stopped")),
            Err(_) => Some(anyhow!("an echo worker panicked")),
        }
    }

    /// Stops the workers (each sends DISCONNECT to a broker) and returns the
    /// first error any of them had.
    pub(super) fn stop(mut self) -> Result<()> {
        self.stop_and_join().map_or(Ok(()), Err)
    }

    fn stop_and_join(&mut self) -> Option<anyhow::Error> {
        self.stop.store(true, Ordering::SeqCst);
        let mut first = None;
        for thread in self.threads.drain(..) {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(anyhow!("an echo worker panicked")));
            if let Err(e) = outcome {
                first = first.or(Some(e));
            }
        }
        first
    }
}

impl Drop for EchoWorkers {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// One measured run of C clients against `target`, whose `workers` are
/// running. The clients connect and warm up; the clock starts when every
/// client has warmed up and stops at the last reply of the last client.
pub(super) fn measure(target: &Target, options: &ReqRepOptions, workers: &mut EchoWorkers) -> Result<Figures> {
    let epoch = Instant::now();
    let barrier = Arc::new(Barrier::new(options.clients + 1));
    let mut clients: Vec<JoinHandle<Result<ClientRun>>> = Vec::with_capacity(options.clients);
    for index in 0..options.clients {
        let share = options.requests / options.clients + usize::from(index < options.requests % options.clients);
        let target = target.clone();
        let barrier = barrier.clone();
        let (size, window) = (options.size, options.window);
        // The clients already started would wait at the barrier for a
        // missing one for ever: if a thread cannot start, panic (as
        // `thread::spawn` does) rather than hang.
        let handle = thread::Builder::new()
            .name(format!("bench-client-{index}"))
            .spawn(move || client(&target, share, size, window, epoch, &barrier))
            .expect("cannot start a client thread");
        clients.push(handle);
    }
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(options.requests);
    let mut end = start;
    let mut failure = None;
    for client in clients {
        match client.join() {
            Ok(Ok(run)) => {
                latencies.extend_from_slice(&run.latencies);
                end = end.max(run.finished);
            }
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some(anyhow!("a client thread panicked"))),
        }
    }
    if let Some(failure) = failure {
        // A worker that died is why the clients got no reply: say so first.
        return Err(match workers.failure() {
            Some(worker) => worker.context(format!("{failure:#}")),
            None => failure,
        });
    }
    Ok(figures_of(latencies, options.requests, end.duration_since(start)))
}

/// A DEALER on the process-wide context, with the options every bench
/// socket shares: LINGER 0 so that closing never waits for a peer that is
/// gone, high-water marks above any window (a dropped or blocked request
/// would skew the figures), and a send timeout so that even a send cannot
/// block for ever.
pub(super) fn bench_socket(endpoint: &str, immediate: bool) -> Result<zmq::Socket> {
    let socket = net::context().socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_sndhwm(100_000)?;
    socket.set_rcvhwm(100_000)?;
    socket.set_sndtimeo(STALL.as_millis() as i32)?;
    socket.set_immediate(immediate)?;
    net::zap::login(&socket, endpoint)?;
    socket
        .connect(endpoint)
        .with_context(|| format!("cannot connect to {endpoint}"))?;
    Ok(socket)
}

/// Waits until `socket` has a message to read, for at most [`STALL`];
/// `false` if none came.
pub(super) fn readable_within_stall(socket: &zmq::Socket) -> Result<bool> {
    Ok(socket.poll(zmq::POLLIN, STALL.as_millis() as i64)? > 0)
}

/// Reads one whole message without blocking; `None` when none is waiting.
fn try_recv(socket: &zmq::Socket, scratch: &mut zmq::Message) -> Result<Option<Vec<Bytes>>> {
    match net::recv_frames(socket, scratch, usize::MAX, usize::MAX)? {
        None => Ok(None),
        Some(net::Received::Message(frames)) => Ok(Some(frames)),
        Some(net::Received::TooLarge { .. }) => unreachable!("no bound was set"),
    }
}

/// Nanoseconds since `epoch`, as carried in the first 8 bytes of a body.
fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Passes a barrier exactly once: when asked to, or else when dropped, so
/// that a client that fails or panics early never leaves the others (and
/// the thread that starts the clock) waiting for it for ever.
struct BarrierPass<'a> {
    barrier: &'a Barrier,
    passed: bool,
}

impl BarrierPass<'_> {
    fn pass(&mut self) {
        if !self.passed {
            self.passed = true;
            self.barrier.wait();
        }
    }
}

impl Drop for BarrierPass<'_> {
    fn drop(&mut self) {
        self.pass();
    }
}

/// One client: a warm-up of `window` sequential round trips (at least 4),
/// so that its connection and the workers' registrations are in place,
/// then the barrier, then `count` requests keeping `window` in flight.
/// Latency comes from the send time carried in the echoed body, so replies
/// may come in any order.
fn client(
    target: &Target,
    count: usize,
    size: usize,
    window: usize,
    epoch: Instant,
    barrier: &Barrier,
) -> Result<ClientRun> {
    let mut barrier = BarrierPass { barrier, passed: false };
    // Requests queue until the connection is up: the warm-up's first
    // round trip waits for it, within the usual bound.
    let socket = bench_socket(target.client_endpoint(), false)?;
    let filler = vec![b'x'; size - 8];
    let send = || -> Result<()> {
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(&nanos_since(epoch).to_le_bytes());
        body.extend_from_slice(&filler);
        net::send_frames(&socket, &target.request(Bytes::from(body)), 0)
            .with_context(|| format!("cannot send to {}", target.client_endpoint()))?;
        Ok(())
    };
    let mut scratch = zmq::Message::new();
    // Reads the replies that are waiting (after waiting up to STALL for the
    // first) and records their latencies.
    let mut receive = |latencies: &mut Vec<u32>, expected: usize| -> Result<()> {
        if !readable_within_stall(&socket)? {
            return Err(target.no_reply(latencies.len(), expected));
        }
        while let Some(frames) = try_recv(&socket, &mut scratch)? {
            let now = nanos_since(epoch);
            let body = target.reply_body(frames)?;
            if body.len() != size {
                bail!("a reply whose body has {} bytes, not the {size} sent", body.len());
            }
            let sent_at = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            let micros = now.saturating_sub(sent_at) / 1000;
            latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
        }
        Ok(())
    };

    let warm_up = window.max(4);
    let mut warm_latencies = Vec::with_capacity(warm_up);
    while warm_latencies.len() < warm_up {
        send()?;
        let before = warm_latencies.len();
        while warm_latencies.len() == before {
            receive(&mut warm_latencies, warm_up)?;
        }
    }
    barrier.pass();

    let mut latencies = Vec::with_capacity(count);
    let mut sent = 0;
    while latencies.len() < count {
        while sent < count && sent - latencies.len() < window {
            send()?;
            sent += 1;
        }
        receive(&mut latencies, count)?;
    }
    if latencies.len() > count {
        bail!("{} replies to {count} requests", latencies.len());
    }
    Ok(ClientRun {
        latencies,
        finished: Instant::now(),
    })
}

/// How long a worker may send nothing before it sends a HEARTBEAT. RFC 7
/// brokers expire a worker after a few missed heartbeats; the zguide's
/// expects one every 2.5 s, majordome's every second by default.
const WORKER_HEARTBEAT: Duration = Duration::from_secs(1);

/// How often an idle worker looks at the stop flag.
const WORKER_POLL: Duration = Duration::from_millis(100);

/// An echo worker: MDP/0.1 for a broker (READY, then REPLY to each REQUEST,
/// a HEARTBEAT whenever it has been quiet for a second, READY again after a
/// DISCONNECT, and a DISCONNECT when stopped), or a plain envelope echo
/// behind the proxy. Reports on `ready` once connected (and registered).
fn echo_worker(target: &Target, stop: &AtomicBool, ready: mpsc::Sender<Result<()>>) -> Result<()> {
    let (service, capacity) = match target {
        Target::Broker { service, capacity, .. } => (Some(service), *capacity),
        Target::Proxy { .. } => (None, 1),
    };
    // Connected, and registered with a broker; `None` if stopped meanwhile.
    let setup = || -> Result<Option<zmq::Socket>> {
        let Some(socket) = connect_worker(target, stop)? else {
            return Ok(None);
        };
        if let Some(service) = service {
            net::send_frames(&socket, &mdp::ready_with_capacity(service, capacity), 0)
                .with_context(|| format!("cannot send READY to {}", target.worker_endpoint()))?;
        }
        Ok(Some(socket))
    };
    let socket = match setup() {
        Ok(Some(socket)) => socket,
        Ok(None) => return Ok(()),
        Err(e) => {
            // The run reports this error; the copy returned is for the join.
            let _ = ready.send(Err(anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let mut last_sent = Instant::now();
    let _ = ready.send(Ok(()));
    drop(ready);

    let mut scratch = zmq::Message::new();
    while !stop.load(Ordering::Relaxed) {
        if service.is_some() && last_sent.elapsed() >= WORKER_HEARTBEAT {
            net::send_frames(&socket, &mdp::heartbeat(), 0)?;
            last_sent = Instant::now();
        }
        if socket.poll(zmq::POLLIN, WORKER_POLL.as_millis() as i64)? == 0 {
            continue;
        }
        while let Some(frames) = try_recv(&socket, &mut scratch)? {
            let Some(service) = service else {
                // Behind the proxy: `client-identity | "" | body`, sent back
                // as it came so that the proxy routes it to the client.
                net::send_frames(&socket, &frames, 0)?;
                continue;
            };
            match mdp::parse_to_worker(frames) {
                Ok(mdp::ToWorker::Request { client, body }) => {
                    net::send_frames(&socket, &mdp::reply(&client, body), 0)?;
                    last_sent = Instant::now();
                }
                Ok(mdp::ToWorker::Disconnect) => {
                    net::send_frames(&socket, &mdp::ready_with_capacity(service, capacity), 0)?;
                    last_sent = Instant::now();
                }
                // Heartbeats need no answer: the worker's own go out on a
                // timer. Anything unreadable is not ours to fix.
                Ok(mdp::ToWorker::Heartbeat) | Err(_) => {}
            }
        }
    }
    if service.is_some() {
        // Without it the broker would keep the worker until its heartbeats
        // run out, and give it requests (of another bench, say) meanwhile.
        // LINGER 0
        // does not lose it: the send wakes the I/O thread before the close
        // does, and that thread writes waiting messages before it handles
        // the close.
        net::send_frames(&socket, &mdp::disconnect(), 0)?;
    }
    Ok(())
}

/// Connects a worker's DEALER and waits (up to [`STALL`]) until the
/// connection is up, so that READY reaches the broker, or the proxy knows
/// the worker, before any client starts. `None` if stopped meanwhile.
fn connect_worker(target: &Target, stop: &AtomicBool) -> Result<Option<zmq::Socket>> {
    let endpoint = target.worker_endpoint();
    // With IMMEDIATE a DEALER has no pipe, so is not writable, until its
    // connection is established: writability means "connected".
    let socket = bench_socket(endpoint, true)?;
    let started = Instant::now();
    while socket.poll(zmq::POLLOUT, WORKER_POLL.as_millis() as i64)? == 0 {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if started.elapsed() >= STALL {
            let what = match target {
                Target::Broker { .. } => format!("the broker at {endpoint}: is a broker running there?"),
                Target::Proxy { .. } => format!("the baseline proxy's backend at {endpoint}"),
            };
            bail!(
                "the echo workers could not connect within {} s to {what}",
                STALL.as_secs()
            );
        }
    }
    Ok(Some(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> (zmq::Socket, String) {
        let router = net::context().socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = net::bound_endpoint(&router).unwrap();
        (router, endpoint)
    }

    fn recv(router: &zmq::Socket, within: Duration) -> Vec<Bytes> {
        assert!(
            router.poll(zmq::POLLIN, within.as_millis() as i64).unwrap() > 0,
            "nothing within {within:?}"
        );
        net::recv_all(router).unwrap()
    }

    fn f(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    /// The echo worker's exact frames, seen from a broker's ROUTER.
    #[test]
    fn the_echo_worker_speaks_rfc_7() {
        let (router, endpoint) = router();
        let target = Target::Broker {
            endpoint,
            service: Bytes::from("echo"),
            capacity: 1,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = {
            let stop = stop.clone();
            thread::spawn(move || echo_worker(&target, &stop, ready_tx))
        };
        let ready = recv(&router, STALL);
        let identity = ready[0].clone();
        assert_eq!(ready[1..], f(&[b"", b"MDPW01", b"\x01", b"echo"]));
        ready_rx.recv_timeout(STALL).unwrap().unwrap();

        let mut request = f(&[b"", b"MDPW01", b"\x02", b"client-7", b"", b"body-1", b"body-2"]);
        request.insert(0, identity.clone());
        net::send_frames(&router, &request, 0).unwrap();
        let reply = recv(&router, STALL);
        assert_eq!(
            reply,
            [identity.clone()]
                .into_iter()
                .chain(f(&[b"", b"MDPW01", b"\x03", b"client-7", b"", b"body-1", b"body-2"]))
                .collect::<Vec<_>>()
        );

        // A broker heartbeat needs no answer; quiet for a second, the
        // worker sends its own.
        net::send_frames(&router, &mdp::worker_heartbeat(&identity), 0).unwrap();
        let heartbeat = recv(&router, Duration::from_secs(3));
        assert_eq!(heartbeat[1..], f(&[b"", b"MDPW01", b"\x04"]));

        net::send_frames(&router, &mdp::worker_disconnect(&identity), 0).unwrap();
        let again = recv(&router, STALL);
        assert_eq!(again[1..], f(&[b"", b"MDPW01", b"\x01", b"echo"]));

        stop.store(true, Ordering::SeqCst);
        worker.join().unwrap().unwrap();
        let goodbye = recv(&router, STALL);
        assert_eq!(goodbye[1..], f(&[b"", b"MDPW01", b"\x05"]));
    }

    #[test]
    fn an_absent_broker_is_a_clear_error_not_a_hang() {
        // Nothing listens on port 1.
        let target = Target::Broker {
            endpoint: "tcp://127.0.0.1:1".into(),
            service: Bytes::from("echo"),
            capacity: 1,
        };
        let options = ReqRepOptions {
            clients: 1,
            workers: 1,
            ..crate::reqrep::tests::options()
        };
        let error = run_load(&target, &options).unwrap_err().to_string();
        assert!(
            error.contains("tcp://127.0.0.1:1: is a broker running there?"),
            "{error}"
        );
    }

    /// A broker that takes workers but never answers: the client gives up
    /// after the stall bound with the progress it made.
    #[test]
    fn a_broker_that_never_answers_is_a_clear_error_not_a_hang() {
        let (router, endpoint) = router();
        let target = Target::Broker {
            endpoint: endpoint.clone(),
            service: Bytes::from("echo"),
            capacity: 1,
        };
        let options = ReqRepOptions {
            clients: 1,
            workers: 1,
            ..crate::reqrep::tests::options()
        };
        let error = run_load(&target, &options).unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "no reply from the broker at {endpoint} within 10 s (0 of 4 replies in)"
            )),
            "{error}"
        );
        drop(router);
    }
}
