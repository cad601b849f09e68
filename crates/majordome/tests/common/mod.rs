//! Helpers for the integration tests: real `majordome` processes on free
//! ports, and raw ZeroMQ sockets that speak exact frames.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub mod http;

/// The binary under test.
pub fn majordome() -> Command {
    Command::new(env!("CARGO_BIN_EXE_majordome"))
}

/// A child process killed when dropped.
pub struct Process {
    pub child: Child,
    /// The endpoint it printed, for brokers.
    pub endpoint: String,
}

impl Process {
    /// Starts `majordome broker` on a free port with extra arguments and
    /// waits for it to say where it listens.
    pub fn broker(args: &[&str]) -> Process {
        Self::start_listening(&[&["broker", "--bind", "tcp://127.0.0.1:0"], args].concat())
    }

    /// Starts a command that prints `… listening on ENDPOINT` first.
    pub fn start_listening(args: &[&str]) -> Process {
        let (child, mut lines) = spawn_reading(args);
        let endpoint = loop {
            let line = lines
                .next()
                .expect("majordome exited before listening")
                .expect("read stdout");
            if let Some(at) = line.find("listening on ") {
                break line[at + "listening on ".len()..].trim().to_owned();
            }
        };
        drain(lines);
        Process { child, endpoint }
    }

    /// Starts a command and returns it with its first `count` lines of
    /// output (where it says what listens where).
    pub fn start_reading(args: &[&str], count: usize) -> (Process, Vec<String>) {
        let (child, mut lines) = spawn_reading(args);
        let first: Vec<String> = (0..count)
            .map(|_| lines.next().expect("majordome exited early").expect("read stdout"))
            .collect();
        drain(lines);
        (
            Process {
                child,
                endpoint: String::new(),
            },
            first,
        )
    }

    /// Starts `majordome up` with every port free (0) and its data in
    /// `data`, plus `extra` arguments; returns its first `count` lines
    /// (what listens where: broker 0, publishers 2, subscribers 3, state
    /// snapshot 4, updates 5, collector 6, database 7).
    pub fn up(data: &std::path::Path, extra: &[&str], count: usize) -> (Process, Vec<String>) {
        Self::start_reading(&[&up_args(data)[..], extra].concat(), count)
    }

    /// Starts a command that needs no handshake (a worker).
    pub fn start(args: &[&str]) -> Process {
        let child = majordome()
            .args(args)
            .env("MAJORDOME_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start majordome");
        Process {
            child,
            endpoint: String::new(),
        }
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts `majordome ARGS…` with its output readable line by line.
/// The child logs errors only; `TEST_LOG=info` (any `MAJORDOME_LOG`
/// filter) shows more while a test is being looked into.
fn spawn_reading(args: &[&str]) -> (Child, Lines) {
    let mut child = majordome()
        .args(args)
        .env("MAJORDOME_LOG", std::env::var("TEST_LOG").unwrap_or("error".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start majordome");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// Keeps reading in the background so that the child never blocks on a
/// full pipe.
fn drain(lines: Lines) {
    std::thread::spawn(move || for _ in lines {});
}

/// `up` with every port free (0) and its data in `data`.
pub fn up_args(data: &std::path::Path) -> [&str; 13] {
    [
        "up",
        "--http-bind",
        "127.0.0.1:0",
        "--bind",
        "tcp://127.0.0.1:0",
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
        "--state-bind",
        "tcp://127.0.0.1:0",
        "--data",
        data.to_str().expect("a UTF-8 path"),
    ]
}

/// Sends `count` plain MDP requests, each to a service nobody serves
/// (`nobody-N`), from one DEALER, and returns once the broker has handled
/// them all (messages of one connection are handled in order, so the
/// answer to a last `mmi.service` says so).
pub fn flood_service_names(broker: &str, count: usize) {
    let flooder = socket(zmq::DEALER, broker);
    flooder.set_sndhwm(0).unwrap();
    for n in 0..count {
        send(&flooder, &strings(&["", "MDPC01", &format!("nobody-{n}"), "x"]));
    }
    send(&flooder, &strings(&["", "MDPC01", "mmi.service", "nobody-0"]));
    let answer = recv(&flooder, Duration::from_secs(60));
    assert_eq!(answer[3], "404", "nobody-0 was evicted long ago");
}

/// Runs `majordome ARGS…` to completion.
pub fn run(args: &[&str]) -> Output {
    majordome()
        .args(args)
        .env("MAJORDOME_LOG", "error")
        .output()
        .expect("run majordome")
}

pub fn frames(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

/// The last word of a line: where `up` says something listens.
pub fn last_word(line: &str) -> String {
    line.split_whitespace().last().unwrap_or_default().to_owned()
}

pub fn strings(parts: &[&str]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
}

/// A raw socket of `kind` connected to `endpoint`.
pub fn socket(kind: zmq::SocketType, endpoint: &str) -> zmq::Socket {
    let socket = majordome_net::context().socket(kind).expect("socket");
    socket.set_linger(0).unwrap();
    socket.connect(endpoint).expect("connect");
    socket
}

pub fn send(socket: &zmq::Socket, parts: &[Bytes]) {
    majordome_net::send_frames(socket, parts, 0).expect("send");
}

/// Receives one message, or panics after `limit` (a test bound, not a
/// timing claim: it only stops a broken test from hanging).
pub fn recv(socket: &zmq::Socket, limit: Duration) -> Vec<Bytes> {
    try_recv(socket, limit).unwrap_or_else(|| panic!("nothing received within {limit:?}"))
}

pub fn try_recv(socket: &zmq::Socket, limit: Duration) -> Option<Vec<Bytes>> {
    if socket.poll(zmq::POLLIN, limit.as_millis() as i64).expect("poll") == 0 {
        return None;
    }
    Some(majordome_net::recv_all(socket).expect("recv"))
}

/// One raw MDP request over a fresh DEALER; returns the reply body.
pub fn mdp_request(endpoint: &str, service: &str, body: &[&str]) -> Vec<Bytes> {
    let dealer = socket(zmq::DEALER, endpoint);
    let mut message = strings(&["", "MDPC01", service]);
    message.extend(strings(body));
    send(&dealer, &message);
    let reply = recv(&dealer, Duration::from_secs(20));
    assert_eq!(&reply[..3], &strings(&["", "MDPC01", service])[..], "reply envelope");
    reply[3..].to_vec()
}

/// Polls `mmi.service` until it answers `want` (bounded).
pub fn wait_for_service(endpoint: &str, service: &str, want: &str) {
    let start = Instant::now();
    loop {
        if mdp_request(endpoint, "mmi.service", &[service]) == strings(&[want]) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mmi.service {service} never said {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The broker's statistics.
pub fn stats(endpoint: &str) -> serde_json::Value {
    let reply = mdp_request(endpoint, "mmi.stats", &[]);
    serde_json::from_slice(&reply[0]).expect("stats JSON")
}

/// A raw RFC 7 worker on a DEALER that has sent READY and been registered.
pub fn raw_worker(endpoint: &str, service: &str) -> zmq::Socket {
    let dealer = socket(zmq::DEALER, endpoint);
    send(&dealer, &frames(&[b"", b"MDPW01", b"\x01", service.as_bytes()]));
    wait_for_service(endpoint, service, "200");
    dealer
}

/// Receives the next REQUEST on a raw worker, skipping heartbeats; returns
/// (client address, body).
pub fn next_request(worker: &zmq::Socket, limit: Duration) -> (Bytes, Vec<Bytes>) {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        let message = recv(worker, left);
        assert_eq!(&message[..2], &strings(&["", "MDPW01"])[..]);
        match message[2].as_ref() {
            b"\x04" => continue,
            b"\x02" => {
                assert!(message[4].is_empty(), "empty frame after the client address");
                return (message[3].clone(), message[5..].to_vec());
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
}

/// Sends a REPLY from a raw worker.
pub fn send_reply(worker: &zmq::Socket, client: &Bytes, body: &[&str]) {
    let mut message = frames(&[b"", b"MDPW01", b"\x03"]);
    message.push(client.clone());
    message.push(Bytes::new());
    message.extend(strings(body));
    send(worker, &message);
}
