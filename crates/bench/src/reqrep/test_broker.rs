//! A minimal RFC 7 broker for the tests: one ROUTER, idle workers in FIFOs
//! per service, `mmi.service`, and no heartbeat expiry at all (a worker
//! that left without a DISCONNECT would keep getting requests).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use bytes::Bytes;
use majordome_mdp::{mdp, mmi};
use majordome_net as net;

/// What the test broker saw.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// READY for a `bench-idle-*` service.
    pub idle_ready: usize,
    /// READY for any other service.
    pub echo_ready: usize,
    /// DISCONNECT from a worker of any other service.
    pub echo_disconnects: usize,
}

/// The broker's thread; [`TestBroker::stop`] returns what it saw.
pub(super) struct TestBroker {
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Stats>>,
}

impl TestBroker {
    pub fn start() -> TestBroker {
        let router = net::context().socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.set_sndhwm(0).unwrap();
        router.set_rcvhwm(0).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = net::bound_endpoint(&router).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || serve(&router, &flag));
        TestBroker {
            endpoint,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops once the broker has been quiet for a moment (so that the last
    /// DISCONNECTs are in) and returns what it saw.
    pub fn stop(mut self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Default)]
struct State {
    /// Worker identity → its service.
    workers: HashMap<Bytes, Bytes>,
    idle: HashMap<Bytes, VecDeque<Bytes>>,
    /// Service → waiting requests (client identity, body).
    queued: HashMap<Bytes, VecDeque<(Bytes, Vec<Bytes>)>>,
    stats: Stats,
}

fn serve(router: &zmq::Socket, stop: &AtomicBool) -> Stats {
    let mut state = State::default();
    loop {
        // After the stop flag, keep going until quiet for 300 ms.
        let timeout = if stop.load(Ordering::SeqCst) { 300 } else { 50 };
        if router.poll(zmq::POLLIN, timeout).unwrap() == 0 {
            if stop.load(Ordering::SeqCst) {
                return state.stats;
            }
            continue;
        }
        let frames = net::recv_all(router).unwrap();
        handle(router, &mut state, frames);
    }
}

fn handle(router: &zmq::Socket, state: &mut State, frames: Vec<Bytes>) {
    let sender = frames[0].clone();
    assert!(frames[1].is_empty(), "{frames:?}");
    match frames[2].as_ref() {
        mdp::CLIENT_HEADER => {
            let service = frames[3].clone();
            let body = frames[4..].to_vec();
            if service.as_ref() == mmi::SERVICE {
                let known = state.workers.values().any(|s| *s == body[0]);
                let code = if known { mmi::OK } else { mmi::NOT_FOUND };
                let reply = mdp::client_reply(&[sender], &service, [Bytes::from_static(code)]);
                net::send_frames(router, &reply, 0).unwrap();
            } else {
                state
                    .queued
                    .entry(service.clone())
                    .or_default()
                    .push_back((sender, body));
                dispatch(router, state, &service);
            }
        }
        mdp::WORKER_HEADER => match frames[3].as_ref() {
            [mdp::command::READY] => {
                let service = frames[4].clone();
                if service.starts_with(b"bench-idle-") {
                    state.stats.idle_ready += 1;
                } else {
                    state.stats.echo_ready += 1;
                }
                state.workers.insert(sender.clone(), service.clone());
                state.idle.entry(service.clone()).or_default().push_back(sender);
                dispatch(router, state, &service);
            }
            [mdp::command::REPLY] => {
                let service = state.workers[&sender].clone();
                assert!(frames[5].is_empty(), "{frames:?}");
                let reply = mdp::client_reply(&frames[4..5], &service, frames[6..].iter().cloned());
                net::send_frames(router, &reply, 0).unwrap();
                state.idle.entry(service.clone()).or_default().push_back(sender);
                dispatch(router, state, &service);
            }
            [mdp::command::HEARTBEAT] => {}
            [mdp::command::DISCONNECT] => {
                if let Some(service) = state.workers.remove(&sender) {
                    if !service.starts_with(b"bench-idle-") {
                        state.stats.echo_disconnects += 1;
                    }
                    if let Some(idle) = state.idle.get_mut(&service) {
                        idle.retain(|w| *w != sender);
                    }
                }
            }
            other => panic!("unexpected worker command {other:?}"),
        },
        other => panic!("unexpected header {other:?}"),
    }
}

fn dispatch(router: &zmq::Socket, state: &mut State, service: &Bytes) {
    let (Some(idle), Some(queued)) = (state.idle.get_mut(service), state.queued.get_mut(service)) else {
        return;
    };
    while !idle.is_empty() && !queued.is_empty() {
        let worker = idle.pop_front().unwrap();
        let (client, body) = queued.pop_front().unwrap();
        net::send_frames(router, &mdp::worker_request(&worker, &client, body), 0).unwrap();
    }
}
