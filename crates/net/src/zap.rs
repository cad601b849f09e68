//! ZeroMQ's authentication protocol (ZAP, RFC 27) and the logins of the
//! hub's listeners.
//!
//! A listener is either open (ZMTP's NULL mechanism, no login: the default
//! on loopback) or asks for a login (PLAIN: a user name and a password,
//! which libzmq hands to the ZAP handler of the socket's context, an
//! `inproc://zeromq.zap.01` socket; its answer's user id becomes the
//! `User-Id` of every message of that connection). libzmq takes a
//! listener's options when it binds, so one socket may have listeners of
//! both kinds. PLAIN sends the password in clear: libzmq as the `zmq`
//! crate builds it has no CURVE (see ARCHITECTURE.md).
//!
//! The codec ([`parse`], [`reply`]) does no I/O; [`Handler`] serves the
//! ZAP sockets of several contexts from one thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{Received, Shutdown};

/// Where libzmq looks for the ZAP handler of a context.
pub const ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The ZAP domain of majordome's listeners.
pub const DOMAIN: &str = "majordome";

/// The ZAP domain of the Clone server's updates listener, which only an
/// identity that may read every key may join (see `Policy::may_follow_all`).
pub const UPDATES_DOMAIN: &str = "majordome-updates";

/// How a peer logged in.
#[derive(Debug, PartialEq, Eq)]
pub enum Mechanism<'a> {
    Null,
    Plain {
        user: &'a [u8],
        password: &'a [u8],
    },
    /// CURVE or anything else, by name.
    Other(&'a [u8]),
}

/// A ZAP request, after the ROUTER's routing id and empty delimiter.
#[derive(Debug)]
pub struct Request<'a> {
    pub request_id: &'a Bytes,
    pub domain: &'a [u8],
    /// The peer's IP address, as libzmq saw it.
    pub address: &'a [u8],
    pub mechanism: Mechanism<'a>,
}

/// Reads a ZAP request: `"1.0" | request id | domain | address | identity
/// | mechanism | credentials…`.
pub fn parse(frames: &[Bytes]) -> Result<Request<'_>, &'static str> {
    let [version, request_id, domain, address, _identity, mechanism, credentials @ ..] = frames else {
        return Err("a ZAP request has at least six frames");
    };
    if version.as_ref() != b"1.0" {
        return Err("unknown ZAP version");
    }
    let mechanism = match (mechanism.as_ref(), credentials) {
        (b"NULL", []) => Mechanism::Null,
        (b"PLAIN", [user, password]) => Mechanism::Plain { user, password },
        (b"NULL" | b"PLAIN", _) => return Err("wrong number of credential frames"),
        (other, _) => Mechanism::Other(other),
    };
    Ok(Request {
        request_id,
        domain,
        address,
        mechanism,
    })
}

/// A ZAP reply: `"1.0" | request id | status | text | user id | metadata`
/// (the metadata empty).
pub fn reply(request_id: &Bytes, status: u16, text: &str, user_id: &str) -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"1.0"),
        request_id.clone(),
        Bytes::from(status.to_string()),
        Bytes::copy_from_slice(text.as_bytes()),
        Bytes::copy_from_slice(user_id.as_bytes()),
        Bytes::new(),
    ]
}

/// What decides a PLAIN login: domain, user name, password → accepted,
/// or why not.
pub type Verify = Arc<dyn Fn(&str, &str, &[u8]) -> Result<(), String> + Send + Sync>;

/// The answer to one request: status, text, user id.
pub fn decide(request: &Request<'_>, verify: &Verify) -> (u16, String, String) {
    let domain = String::from_utf8_lossy(request.domain);
    match request.mechanism {
        Mechanism::Plain { user, password } => match std::str::from_utf8(user) {
            Ok(user) if !user.is_empty() => match verify(&domain, user, password) {
                Ok(()) => (200, "OK".into(), user.to_owned()),
                Err(why) => (400, why, String::new()),
            },
            _ => (400, "wrong user name or password".into(), String::new()),
        },
        // Only a listener with a ZAP domain asks about NULL: let it
        // through as anonymous.
        Mechanism::Null => (200, "OK".into(), String::new()),
        Mechanism::Other(_) => (400, "majordome accepts PLAIN logins only".into(), String::new()),
    }
}

/// Sets `socket` up so that the listeners it binds next ask for a PLAIN
/// login (`login`) or none.
pub fn listener(socket: &zmq::Socket, login: bool) -> zmq::Result<()> {
    listener_in(socket, login, DOMAIN)
}

/// [`listener`], in the ZAP domain `domain`.
pub fn listener_in(socket: &zmq::Socket, login: bool, domain: &str) -> zmq::Result<()> {
    socket.set_plain_server(login)?;
    // libzmq refuses an empty domain given as a string (EINVAL): an open
    // listener keeps the default, none, and so asks ZAP nothing.
    if login {
        socket.set_zap_domain(domain)?;
    }
    Ok(())
}

/// Logins refused, since the process started (for `status`).
pub fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Answers the ZAP requests of the contexts it is attached to, on the
/// thread that runs it.
pub struct Handler {
    sockets: Vec<zmq::Socket>,
    verify: Verify,
}

impl Handler {
    pub fn new(verify: Verify) -> Handler {
        Handler {
            sockets: Vec::new(),
            verify,
        }
    }

    /// Becomes the ZAP handler of `context`. Do it before the context's
    /// sockets bind listeners that ask for logins: a login that finds no
    /// handler is refused. Requests wait in the socket until
    /// [`Handler::run`] starts.
    pub fn attach(&mut self, context: &zmq::Context) -> zmq::Result<()> {
        let socket = context.socket(zmq::ROUTER)?;
        socket.set_linger(0)?;
        socket.bind(ENDPOINT)?;
        self.sockets.push(socket);
        Ok(())
    }

    /// Whether any context has it as its handler.
    pub fn is_attached(&self) -> bool {
        !self.sockets.is_empty()
    }

    /// Serves until `shutdown`.
    pub fn run(self, shutdown: &Shutdown) -> zmq::Result<()> {
        let mut scratch = zmq::Message::new();
        let mut last_warning: Option<Instant> = None;
        let mut unreported = 0u64;
        loop {
            let mut items: Vec<zmq::PollItem<'_>> = self.sockets.iter().map(|s| s.as_poll_item(zmq::POLLIN)).collect();
            items.push(zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN));
            match zmq::poll(&mut items, -1) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e),
            }
            if items.last().is_some_and(zmq::PollItem::is_readable) {
                return Ok(());
            }
            let ready: Vec<bool> = items.iter().map(zmq::PollItem::is_readable).collect();
            drop(items);
            for (socket, _) in self.sockets.iter().zip(ready).filter(|(_, r)| *r) {
                while let Some(Received::Message(frames)) = crate::recv_frames(socket, &mut scratch, 16, 64 * 1024)? {
                    let [routing, delimiter, request @ ..] = frames.as_slice() else {
                        continue;
                    };
                    let Ok(request) = parse(request) else { continue };
                    let (status, text, user_id) = decide(&request, &self.verify);
                    if status != 200 {
                        REFUSED.fetch_add(1, Ordering::Relaxed);
                        unreported += 1;
                        // One line per minute at most: a flood of wrong
                        // passwords does not fill the log.
                        if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                            tracing::warn!(
                                address = %String::from_utf8_lossy(request.address),
                                refused = unreported,
                                "refused a login: {text}"
                            );
                            last_warning = Some(Instant::now());
                            unreported = 0;
                        }
                    }
                    let mut out = vec![routing.clone(), delimiter.clone()];
                    out.extend(reply(request.request_id, status, &text, &user_id));
                    crate::send_frames(socket, &out, zmq::DONTWAIT).ok();
                }
            }
        }
    }
}

/// Logins for connecting sockets, by endpoint: what the hub's own clients
/// use to reach its listeners (set with [`share_login`]), else the
/// process's own (`MAJORDOME_USER` and `MAJORDOME_PASSWORD`).
type Logins = HashMap<String, Option<(String, String)>>;

fn shared_logins() -> &'static RwLock<Logins> {
    static SHARED: OnceLock<RwLock<Logins>> = OnceLock::new();
    SHARED.get_or_init(Default::default)
}

/// Sockets of this process connecting to `endpoint` log in as `user`.
pub fn share_login(endpoint: &str, user: &str, password: &str) {
    shared_logins()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(endpoint.to_owned(), Some((user.to_owned(), password.to_owned())));
}

/// Sockets of this process connecting to `endpoint` (an open listener of
/// this process) do not log in, whatever the environment says.
pub fn share_no_login(endpoint: &str) {
    shared_logins()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(endpoint.to_owned(), None);
}

/// Forgets what [`share_login`] or [`share_no_login`] said of `endpoint`.
pub fn unshare_login(endpoint: &str) {
    shared_logins()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(endpoint);
}

/// The environment variables a client's login comes from.
pub const USER_VARIABLE: &str = "MAJORDOME_USER";
pub const PASSWORD_VARIABLE: &str = "MAJORDOME_PASSWORD";

/// Sets the login of `socket` for connecting to `endpoint`, if it has one:
/// call before `connect`. `inproc://` needs none.
pub fn login(socket: &zmq::Socket, endpoint: &str) -> zmq::Result<()> {
    if endpoint.starts_with("inproc://") {
        return Ok(());
    }
    let shared = shared_logins()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(endpoint)
        .cloned();
    let login = match shared {
        Some(shared) => shared,
        None => std::env::var(USER_VARIABLE)
            .ok()
            .filter(|u| !u.is_empty())
            .map(|user| (user, std::env::var(PASSWORD_VARIABLE).unwrap_or_default())),
    };
    if let Some((user, password)) = login {
        socket.set_plain_username(Some(&user))?;
        socket.set_plain_password(Some(&password))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[test]
    fn requests_are_read_and_answered_as_rfc_27_says() {
        let verify: Verify = Arc::new(|domain, user, password| {
            if user == "alice" && password == b"s3cret" {
                if domain == UPDATES_DOMAIN {
                    return Err("alice may not follow the updates".into());
                }
                Ok(())
            } else {
                Err("wrong user name or password".into())
            }
        });
        let good = frames(&[
            b"1.0",
            b"7",
            b"majordome",
            b"127.0.0.1",
            b"",
            b"PLAIN",
            b"alice",
            b"s3cret",
        ]);
        let request = parse(&good).unwrap();
        assert_eq!(request.address, b"127.0.0.1");
        assert_eq!(decide(&request, &verify), (200, "OK".to_owned(), "alice".to_owned()));
        let updates = frames(&[
            b"1.0",
            b"8",
            b"majordome-updates",
            b"127.0.0.1",
            b"",
            b"PLAIN",
            b"alice",
            b"s3cret",
        ]);
        assert_eq!(
            decide(&parse(&updates).unwrap(), &verify),
            (400, "alice may not follow the updates".to_owned(), String::new())
        );
        assert_eq!(
            reply(request.request_id, 200, "OK", "alice"),
            frames(&[b"1.0", b"7", b"200", b"OK", b"alice", b""])
        );
        let bad = frames(&[
            b"1.0",
            b"8",
            b"majordome",
            b"10.0.0.9",
            b"",
            b"PLAIN",
            b"alice",
            b"guess",
        ]);
        assert_eq!(decide(&parse(&bad).unwrap(), &verify).0, 400);
        let curve = frames(&[b"1.0", b"9", b"majordome", b"10.0.0.9", b"", b"CURVE", &[0u8; 32]]);
        assert_eq!(decide(&parse(&curve).unwrap(), &verify).0, 400);
        assert!(parse(&frames(&[b"2.0", b"1", b"", b"", b"", b"NULL"])).is_err());
        assert!(parse(&frames(&[b"1.0", b"1", b"", b"", b"", b"PLAIN", b"only-user"])).is_err());
        assert!(parse(&frames(&[b"1.0"])).is_err());
    }

    /// The real thing: libzmq asks the handler, a right password gets in
    /// with its name as `User-Id`, a wrong one never reaches the socket,
    /// and an open listener of the same socket still takes anonymous
    /// peers.
    #[test]
    fn libzmq_asks_the_handler_and_sets_the_user_id() {
        let context = zmq::Context::new();
        let verify: Verify = Arc::new(|_, user, password| {
            (user == "alice" && password == b"s3cret")
                .then_some(())
                .ok_or_else(|| "wrong user name or password".to_owned())
        });
        let mut handler = Handler::new(verify);
        handler.attach(&context).unwrap();
        let shutdown = Shutdown::new().unwrap();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || handler.run(&stop));
        let server = context.socket(zmq::ROUTER).unwrap();
        server.bind("tcp://127.0.0.1:*").unwrap();
        let open = crate::bound_endpoint(&server).unwrap();
        listener(&server, true).unwrap();
        server.bind("tcp://127.0.0.1:*").unwrap();
        let guarded = crate::bound_endpoint(&server).unwrap();
        let client = |endpoint: &str, login: Option<(&str, &str)>| {
            let socket = zmq::Context::new().socket(zmq::DEALER).unwrap();
            socket.set_linger(0).unwrap();
            if let Some((user, password)) = login {
                socket.set_plain_username(Some(user)).unwrap();
                socket.set_plain_password(Some(password)).unwrap();
            }
            socket.connect(endpoint).unwrap();
            socket.send("hello", 0).unwrap();
            socket
        };
        let heard = |wait_ms: i64| -> Option<Option<String>> {
            if server.poll(zmq::POLLIN, wait_ms).unwrap() == 0 {
                return None;
            }
            let _routing = server.recv_msg(0).unwrap();
            let mut body = server.recv_msg(0).unwrap();
            Some(body.gets("User-Id").map(str::to_owned))
        };
        let _alice = client(&guarded, Some(("alice", "s3cret")));
        assert_eq!(heard(5000), Some(Some("alice".to_owned())));
        let _anonymous = client(&open, None);
        assert_eq!(heard(5000), Some(None));
        let before = refused();
        let _mallory = client(&guarded, Some(("alice", "guess")));
        // Refused: the handler said so; nothing ever arrives.
        let deadline = Instant::now() + Duration::from_secs(5);
        while refused() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(refused() > before);
        assert_eq!(heard(200), None);
        shutdown.trigger();
        thread.join().unwrap().unwrap();
    }
}
