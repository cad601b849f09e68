//! Binding a listening socket without depending on luck.
//!
//! The hub's default ports (40410–40415, Domogik's) lie inside Linux's
//! ephemeral range (32768–60999): any outgoing connection may take one as
//! its source port, and then holds it as long as it lives. A listener
//! that finds its port taken asks who holds it: if something accepts a
//! connection there, a listener does, and waiting would not help; if not,
//! a connection does, and the bind is retried until it closes (for a
//! bounded time, saying so once).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tracing::warn;

/// How long a bind waits for a port that a connection (not a listener)
/// holds.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How often it tries again meanwhile.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Who holds a port that could not be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A program listens on it.
    Listener,
    /// A connection uses it as its local port; it was waited for this long.
    Connection { waited: Duration },
    /// The bind failed for another reason, or the endpoint is not TCP.
    Unknown,
}

/// A bind that failed, with what was found out about why.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {endpoint}: {}", explain(*holder, *source, endpoint))]
pub struct BindError {
    /// The endpoint asked for.
    pub endpoint: String,
    /// What libzmq said.
    pub source: zmq::Error,
    /// Who holds the port, when it was taken.
    pub holder: Holder,
}

fn explain(holder: Holder, source: zmq::Error, endpoint: &str) -> String {
    let port = tcp_host_port(endpoint).map(|(_, port)| port).unwrap_or_default();
    match holder {
        Holder::Listener => format!(
            "another program listens on port {port} (another majordome?); stop it, or choose other \
             ports (--bind and the other --*-bind flags, or [listen] in majordome.toml)"
        ),
        Holder::Connection { waited } => format!(
            "port {port} is still used by a connection (not a listener) after {:.0} s; reserve \
             majordome's ports so that outgoing connections never take them: \
             sysctl -w net.ipv4.ip_local_reserved_ports=40406,40410-40415 (see the README)",
            waited.as_secs_f64()
        ),
        Holder::Unknown => source.to_string(),
    }
}

/// Binds `socket` to `endpoint`, waiting up to `patience` for a TCP port
/// that a connection holds (see the module documentation).
pub fn bind(socket: &zmq::Socket, endpoint: &str, patience: Duration) -> Result<(), BindError> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let source = match socket.bind(endpoint) {
            Ok(()) => return Ok(()),
            Err(source) => source,
        };
        let fail = |holder| BindError {
            endpoint: endpoint.to_owned(),
            source,
            holder,
        };
        if source != zmq::Error::EADDRINUSE {
            return Err(fail(Holder::Unknown));
        }
        let Some(address) = tcp_host_port(endpoint).and_then(|(host, port)| probe_address(&host, port)) else {
            return Err(fail(Holder::Unknown));
        };
        if listening(address) {
            return Err(fail(Holder::Listener));
        }
        let waited = started.elapsed();
        if waited >= patience {
            return Err(fail(Holder::Connection { waited }));
        }
        if !said {
            said = true;
            warn!(
                endpoint,
                "port {} is used by a connection, not a listener (an outgoing connection took it as its source \
                 port); waiting up to {:.0} s for it to close. Reserving the ports prevents this: see the README",
                address.port(),
                patience.as_secs_f64()
            );
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

/// `tcp://HOST:PORT` split (brackets of an IPv6 host removed); `None` for
/// other transports or a port that is not a number.
pub fn tcp_host_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
}

/// Where to knock to learn whether something listens on `port` of `host`:
/// the loopback address for a wildcard bind.
fn probe_address(host: &str, port: u16) -> Option<SocketAddr> {
    let host = match host {
        "*" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        other => other,
    };
    (host, port).to_socket_addrs().ok()?.next()
}

/// Whether something accepts connections at `address`.
fn listening(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn router() -> zmq::Socket {
        let socket = zmq::Context::new().socket(zmq::ROUTER).unwrap();
        socket.set_linger(0).unwrap();
        socket
    }

    #[test]
    fn splits_tcp_endpoints_only() {
        assert_eq!(
            tcp_host_port("tcp://127.0.0.1:40410"),
            Some(("127.0.0.1".into(), 40410))
        );
        assert_eq!(tcp_host_port("tcp://*:5555"), Some(("*".into(), 5555)));
        assert_eq!(tcp_host_port("tcp://[::1]:5555"), Some(("::1".into(), 5555)));
        assert_eq!(tcp_host_port("inproc://x"), None);
        assert_eq!(tcp_host_port("tcp://host:port"), None);
    }

    #[test]
    fn a_port_a_program_listens_on_fails_at_once_and_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let started = Instant::now();
        let error = bind(&router(), &endpoint, PATIENCE).unwrap_err();
        assert!(started.elapsed() < PATIENCE, "it did not wait");
        assert_eq!(error.holder, Holder::Listener);
        let text = error.to_string();
        assert!(
            text.contains(&format!("another program listens on port {port}")),
            "{text}"
        );
    }

    /// A port held by an outgoing connection (bound to it as its source
    /// port, as the kernel does with an ephemeral one) is waited for, and
    /// bound once the connection closes.
    #[test]
    fn a_port_a_connection_holds_is_waited_for() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let source = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = source.local_addr().unwrap().port();
        drop(source);
        let mut connection = connect_from(port, server.local_addr().unwrap());
        let (accepted, _) = server.accept().unwrap();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        // Without patience it gives up at once, saying who holds the port.
        let error = bind(&router(), &endpoint, Duration::ZERO).unwrap_err();
        assert!(matches!(error.holder, Holder::Connection { .. }), "{error}");
        assert!(error.to_string().contains("ip_local_reserved_ports"), "{error}");
        // With patience, it binds once the connection is gone. The server
        // closes first and the client only after it has read the end, so
        // the client's side leaves no TIME_WAIT on the port. Whether the
        // bind below starts before or after that, it must succeed.
        let closer = std::thread::spawn(move || {
            drop(accepted);
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut connection, &mut rest).unwrap();
        });
        let socket = router();
        bind(&socket, &endpoint, PATIENCE).unwrap();
        closer.join().unwrap();
    }

    /// A TCP connection to `to` whose local port is `port`.
    fn connect_from(port: u16, to: SocketAddr) -> std::net::TcpStream {
        use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).unwrap();
        let SocketAddr::V4(to) = to else {
            unreachable!("bound on IPv4")
        };
        connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
        std::net::TcpStream::from(fd)
    }

    use std::os::fd::AsRawFd;
}
