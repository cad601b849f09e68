//! MDP/0.1 (ZeroMQ RFC 7): client and worker messages as seen by a broker's
//! ROUTER socket, and the builders for what a broker, client or worker sends.

use bytes::Bytes;
use thiserror::Error;

use crate::Frames;

/// Protocol header of every client message.
pub const CLIENT_HEADER: &[u8] = b"MDPC01";
/// Protocol header of every worker message.
pub const WORKER_HEADER: &[u8] = b"MDPW01";

/// Worker command bytes (RFC 7, section "Worker Protocol").
pub mod command {
    /// Worker → broker: register for a service.
    pub const READY: u8 = 0x01;
    /// Broker → worker: a request to process.
    pub const REQUEST: u8 = 0x02;
    /// Worker → broker: the answer to a request.
    pub const REPLY: u8 = 0x03;
    /// Either way: "I am alive".
    pub const HEARTBEAT: u8 = 0x04;
    /// Either way: "forget me".
    pub const DISCONNECT: u8 = 0x05;
}

/// Why a message could not be read as MDP/0.1. Each kind is counted apart by
/// the broker, so the names are stable identifiers (see [`Malformed::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum Malformed {
    /// No empty delimiter frame between the routing envelope and the header.
    #[error("no empty delimiter frame after the routing envelope")]
    MissingDelimiter,
    /// Envelope with more address frames than the broker accepts.
    #[error("routing envelope too long")]
    EnvelopeTooLong,
    /// Neither `MDPC01` nor `MDPW01` after the delimiter.
    #[error("unknown protocol header (expected MDPC01 or MDPW01)")]
    UnknownHeader,
    /// A client message with no service frame.
    #[error("client request without a service frame")]
    MissingService,
    /// A worker message with no command frame.
    #[error("worker message without a command frame")]
    MissingCommand,
    /// A command frame that is not one byte from 0x01 to 0x05, or a command a
    /// worker may not send (REQUEST).
    #[error("unknown or unexpected worker command")]
    UnknownCommand,
    /// READY with other than exactly one service frame, or an empty one.
    #[error("READY must carry exactly one non-empty service name")]
    BadReady,
    /// REPLY without `client-address | ""` before the body.
    #[error("REPLY without client address and empty frame")]
    BadReply,
    /// HEARTBEAT or DISCONNECT with extra frames.
    #[error("HEARTBEAT/DISCONNECT carries extra frames")]
    TrailingFrames,
    /// A worker message that came through more than one routing hop.
    #[error("worker message with a multi-frame envelope")]
    WorkerEnvelope,
}

impl Malformed {
    /// A short, stable name for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::MissingDelimiter => "missing_delimiter",
            Malformed::EnvelopeTooLong => "envelope_too_long",
            Malformed::UnknownHeader => "unknown_header",
            Malformed::MissingService => "missing_service",
            Malformed::MissingCommand => "missing_command",
            Malformed::UnknownCommand => "unknown_command",
            Malformed::BadReady => "bad_ready",
            Malformed::BadReply => "bad_reply",
            Malformed::TrailingFrames => "trailing_frames",
            Malformed::WorkerEnvelope => "worker_envelope",
        }
    }
}

/// A worker's message to the broker, after the worker's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    /// `READY | service`, or `READY | service | capacity=N` from a worker
    /// that can hold N requests at once (see [`ready_with_capacity`]).
    Ready { service: Bytes, capacity: Option<u32> },
    /// `REPLY | client | "" | body…`.
    Reply { client: Bytes, body: Frames },
    /// `HEARTBEAT`.
    Heartbeat,
    /// `DISCONNECT`.
    Disconnect,
}

/// A message arriving at the broker's ROUTER socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `address… | "" | MDPC01 | service | body…`. The address is the whole
    /// routing envelope: the peer identity, plus any frames a DEALER client
    /// put before the delimiter (the async client uses one as a request id).
    Client {
        address: Frames,
        service: Bytes,
        body: Frames,
    },
    /// `identity | "" | MDPW01 | command …`.
    Worker { identity: Bytes, message: FromWorker },
}

/// Whether a message as received on a broker's ROUTER socket (identity
/// first) looks like a worker's READY, without parsing it: for a socket
/// loop that must learn something about the connection (libzmq's message
/// metadata) for READY only. [`parse_inbound`] still decides.
pub fn looks_like_ready(frames: &[Bytes]) -> bool {
    frames.len() > 4 && frames[1].is_empty() && frames[2] == WORKER_HEADER && frames[3] == [command::READY][..]
}

/// Reads one message as received on a broker's ROUTER socket (the first
/// frame is the peer identity that ROUTER prepends). `max_envelope` bounds
/// the number of address frames.
pub fn parse_inbound(mut frames: Frames, max_envelope: usize) -> Result<Inbound, Malformed> {
    let delimiter = frames
        .iter()
        .position(|frame| frame.is_empty())
        .ok_or(Malformed::MissingDelimiter)?;
    if delimiter == 0 {
        // ROUTER always prepends a non-empty identity; an empty first frame
        // can only come from a test harness feeding frames by hand.
        return Err(Malformed::MissingDelimiter);
    }
    if delimiter > max_envelope {
        return Err(Malformed::EnvelopeTooLong);
    }
    let header = frames.get(delimiter + 1).ok_or(Malformed::UnknownHeader)?;
    if header.as_ref() == CLIENT_HEADER {
        let mut rest = frames.split_off(delimiter);
        // rest = "" | MDPC01 | service | body…
        if rest.len() < 3 {
            return Err(Malformed::MissingService);
        }
        let body = rest.split_off(3);
        let service = rest.pop().expect("three frames checked above");
        Ok(Inbound::Client {
            address: frames,
            service,
            body,
        })
    } else if header.as_ref() == WORKER_HEADER {
        if delimiter != 1 {
            return Err(Malformed::WorkerEnvelope);
        }
        let mut rest = frames.split_off(2);
        let identity = frames.swap_remove(0);
        // rest = MDPW01 | command | …
        if rest.len() < 2 {
            return Err(Malformed::MissingCommand);
        }
        let mut tail = rest.split_off(2);
        let command = &rest[1];
        if command.len() != 1 {
            return Err(Malformed::UnknownCommand);
        }
        let message = match command[0] {
            command::READY => {
                let capacity = match tail.len() {
                    1 => None,
                    2 => Some(parse_capacity(&tail[1]).ok_or(Malformed::BadReady)?),
                    _ => return Err(Malformed::BadReady),
                };
                if tail[0].is_empty() {
                    return Err(Malformed::BadReady);
                }
                FromWorker::Ready {
                    service: tail.swap_remove(0),
                    capacity,
                }
            }
            command::REPLY => {
                if tail.len() < 2 || !tail[1].is_empty() {
                    return Err(Malformed::BadReply);
                }
                let body = tail.split_off(2);
                let client = tail.swap_remove(0);
                FromWorker::Reply { client, body }
            }
            command::HEARTBEAT | command::DISCONNECT => {
                if !tail.is_empty() {
                    return Err(Malformed::TrailingFrames);
                }
                if command[0] == command::HEARTBEAT {
                    FromWorker::Heartbeat
                } else {
                    FromWorker::Disconnect
                }
            }
            _ => return Err(Malformed::UnknownCommand),
        };
        Ok(Inbound::Worker { identity, message })
    } else {
        Err(Malformed::UnknownHeader)
    }
}

fn empty() -> Bytes {
    Bytes::new()
}

fn command_frame(command: u8) -> Bytes {
    Bytes::copy_from_slice(&[command])
}

/// Broker → client: `address… | "" | MDPC01 | service | body…`.
pub fn client_reply(address: &[Bytes], service: &Bytes, body: impl IntoIterator<Item = Bytes>) -> Frames {
    let mut frames = Vec::with_capacity(address.len() + 4);
    frames.extend(address.iter().cloned());
    frames.push(empty());
    frames.push(Bytes::from_static(CLIENT_HEADER));
    frames.push(service.clone());
    frames.extend(body);
    frames
}

/// Broker → worker: `identity | "" | MDPW01 | REQUEST | client | "" | body…`.
pub fn worker_request(identity: &Bytes, client: &Bytes, body: impl IntoIterator<Item = Bytes>) -> Frames {
    let mut frames = Vec::with_capacity(8);
    frames.push(identity.clone());
    frames.push(empty());
    frames.push(Bytes::from_static(WORKER_HEADER));
    frames.push(command_frame(command::REQUEST));
    frames.push(client.clone());
    frames.push(empty());
    frames.extend(body);
    frames
}

/// Broker → worker: `identity | "" | MDPW01 | HEARTBEAT`.
pub fn worker_heartbeat(identity: &Bytes) -> Frames {
    vec![
        identity.clone(),
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::HEARTBEAT),
    ]
}

/// Broker → worker: `identity | "" | MDPW01 | DISCONNECT`.
pub fn worker_disconnect(identity: &Bytes) -> Frames {
    vec![
        identity.clone(),
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::DISCONNECT),
    ]
}

/// Client → broker over a DEALER: `"" | MDPC01 | service | body…`.
pub fn client_request(service: &[u8], body: impl IntoIterator<Item = Bytes>) -> Frames {
    let mut frames = vec![
        empty(),
        Bytes::from_static(CLIENT_HEADER),
        Bytes::copy_from_slice(service),
    ];
    frames.extend(body);
    frames
}

/// A reply as a DEALER client receives it: `"" | MDPC01 | service | body…`.
/// Returns the service and the body.
pub fn parse_client_reply(mut frames: Frames) -> Result<(Bytes, Frames), Malformed> {
    if frames.len() < 3 || !frames[0].is_empty() {
        return Err(Malformed::MissingDelimiter);
    }
    if frames[1].as_ref() != CLIENT_HEADER {
        return Err(Malformed::UnknownHeader);
    }
    let body = frames.split_off(3);
    let service = frames.pop().expect("three frames checked above");
    Ok((service, body))
}

/// Worker → broker over a DEALER: `"" | MDPW01 | READY | service`.
pub fn ready(service: &[u8]) -> Frames {
    vec![
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::READY),
        Bytes::copy_from_slice(service),
    ]
}

/// The prefix of the capacity frame a worker may add to READY.
const CAPACITY_PREFIX: &[u8] = b"capacity=";

/// The largest capacity a worker may announce.
pub const MAX_CAPACITY: u32 = 1024;

/// Worker → broker: READY with a fifth frame `capacity=N` (1 ≤ N ≤
/// [`MAX_CAPACITY`]), a majordome extension: the worker may be given up to
/// N requests at once, and its REQUESTs then carry a request token in
/// place of the client address, so that it may answer them in any order.
/// RFC 7 brokers read only the service frame of READY (the zguide's C and
/// Python example brokers and Domogik's were checked), so such a worker
/// still works there, one request at a time.
pub fn ready_with_capacity(service: &[u8], capacity: u32) -> Frames {
    let mut frames = ready(service);
    if capacity > 1 {
        frames.push(Bytes::from(format!("capacity={capacity}")));
    }
    frames
}

fn parse_capacity(frame: &[u8]) -> Option<u32> {
    let digits = frame.strip_prefix(CAPACITY_PREFIX)?;
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let capacity: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (1..=MAX_CAPACITY).contains(&capacity).then_some(capacity)
}

/// Worker → broker over a DEALER: `"" | MDPW01 | HEARTBEAT`.
pub fn heartbeat() -> Frames {
    vec![
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::HEARTBEAT),
    ]
}

/// Worker → broker over a DEALER: `"" | MDPW01 | DISCONNECT`.
pub fn disconnect() -> Frames {
    vec![
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::DISCONNECT),
    ]
}

/// Worker → broker over a DEALER: `"" | MDPW01 | REPLY | client | "" | body…`.
pub fn reply(client: &Bytes, body: impl IntoIterator<Item = Bytes>) -> Frames {
    let mut frames = vec![
        empty(),
        Bytes::from_static(WORKER_HEADER),
        command_frame(command::REPLY),
        client.clone(),
        empty(),
    ];
    frames.extend(body);
    frames
}

/// What a worker's DEALER receives from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// `REQUEST | client | "" | body…`.
    Request { client: Bytes, body: Frames },
    /// `HEARTBEAT`.
    Heartbeat,
    /// `DISCONNECT`.
    Disconnect,
}

/// Reads a broker → worker message as a DEALER receives it.
pub fn parse_to_worker(mut frames: Frames) -> Result<ToWorker, Malformed> {
    if frames.len() < 3 || !frames[0].is_empty() {
        return Err(Malformed::MissingDelimiter);
    }
    if frames[1].as_ref() != WORKER_HEADER {
        return Err(Malformed::UnknownHeader);
    }
    if frames[2].len() != 1 {
        return Err(Malformed::UnknownCommand);
    }
    match frames[2][0] {
        command::REQUEST => {
            if frames.len() < 5 || !frames[4].is_empty() {
                return Err(Malformed::BadReply);
            }
            let body = frames.split_off(5);
            let client = frames.swap_remove(3);
            Ok(ToWorker::Request { client, body })
        }
        command::HEARTBEAT => Ok(ToWorker::Heartbeat),
        command::DISCONNECT => Ok(ToWorker::Disconnect),
        _ => Err(Malformed::UnknownCommand),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[test]
    fn looks_like_ready_agrees_with_the_parser_on_ready_only() {
        let ready = f(&[b"w", b"", b"MDPW01", b"\x01", b"echo"]);
        assert!(looks_like_ready(&ready));
        assert!(matches!(
            parse_inbound(ready, 4),
            Ok(Inbound::Worker {
                message: FromWorker::Ready { .. },
                ..
            })
        ));
        for other in [
            f(&[b"w", b"", b"MDPW01", b"\x04"]),
            f(&[b"w", b"", b"MDPC01", b"\x01", b"echo"]),
            f(&[b"w", b"x", b"MDPW01", b"\x01", b"echo"]),
            f(&[b"w", b"", b"MDPW01", b"\x01"]),
        ] {
            assert!(!looks_like_ready(&other), "{other:?}");
        }
    }

    #[test]
    fn reads_real_frames() {
        // Each row: frames as a ROUTER sees them, then what they must decode to.
        let rows: Vec<(Frames, Result<Inbound, Malformed>)> = vec![
            (
                f(&[b"\x00k\x8bEg", b"", b"MDPC01", b"echo", b"hello"]),
                Ok(Inbound::Client {
                    address: f(&[b"\x00k\x8bEg"]),
                    service: "echo".into(),
                    body: f(&[b"hello"]),
                }),
            ),
            (
                // The async client's extra envelope frame (a request id).
                f(&[b"id", b"\x00\x00\x00\x07", b"", b"MDPC01", b"echo", b"a", b"b"]),
                Ok(Inbound::Client {
                    address: f(&[b"id", b"\x00\x00\x00\x07"]),
                    service: "echo".into(),
                    body: f(&[b"a", b"b"]),
                }),
            ),
            (
                // Domogik seed 002: a plugin asks dbmgr for its config.
                f(&[
                    b"id",
                    b"",
                    b"MDPC01",
                    b"dbmgr",
                    b"10",
                    b"config.get",
                    br#"{"host":"igor","plugin":"velbus","key":"protocol"}"#,
                ]),
                Ok(Inbound::Client {
                    address: f(&[b"id"]),
                    service: "dbmgr".into(),
                    body: f(&[
                        b"10",
                        b"config.get",
                        br#"{"host":"igor","plugin":"velbus","key":"protocol"}"#,
                    ]),
                }),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"echo"]),
                Ok(Inbound::Worker {
                    identity: "w".into(),
                    message: FromWorker::Ready {
                        service: "echo".into(),
                        capacity: None,
                    },
                }),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"echo", b"capacity=16"]),
                Ok(Inbound::Worker {
                    identity: "w".into(),
                    message: FromWorker::Ready {
                        service: "echo".into(),
                        capacity: Some(16),
                    },
                }),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"echo", b"capacity=0"]),
                Err(Malformed::BadReady),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"echo", b"capacity=99999"]),
                Err(Malformed::BadReady),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"echo", b"16"]),
                Err(Malformed::BadReady),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x03", b"c", b"", b"config.result", b"{}"]),
                Ok(Inbound::Worker {
                    identity: "w".into(),
                    message: FromWorker::Reply {
                        client: "c".into(),
                        body: f(&[b"config.result", b"{}"]),
                    },
                }),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x04"]),
                Ok(Inbound::Worker {
                    identity: "w".into(),
                    message: FromWorker::Heartbeat,
                }),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x05"]),
                Ok(Inbound::Worker {
                    identity: "w".into(),
                    message: FromWorker::Disconnect,
                }),
            ),
            (f(&[b"w", b"MDPC01", b"echo", b"x"]), Err(Malformed::MissingDelimiter)),
            (f(&[b"w", b""]), Err(Malformed::UnknownHeader)),
            (f(&[b"w", b"", b"MDPX01", b"echo"]), Err(Malformed::UnknownHeader)),
            (f(&[b"w", b"", b"MDPC01"]), Err(Malformed::MissingService)),
            (f(&[b"w", b"", b"MDPW01"]), Err(Malformed::MissingCommand)),
            (f(&[b"w", b"", b"MDPW01", b"\x09"]), Err(Malformed::UnknownCommand)),
            (f(&[b"w", b"", b"MDPW01", b"\x01\x01"]), Err(Malformed::UnknownCommand)),
            (
                f(&[b"w", b"", b"MDPW01", b"\x02", b"c", b"", b"x"]),
                Err(Malformed::UnknownCommand),
            ),
            (f(&[b"w", b"", b"MDPW01", b"\x01"]), Err(Malformed::BadReady)),
            (f(&[b"w", b"", b"MDPW01", b"\x01", b""]), Err(Malformed::BadReady)),
            (
                f(&[b"w", b"", b"MDPW01", b"\x01", b"a", b"b"]),
                Err(Malformed::BadReady),
            ),
            (f(&[b"w", b"", b"MDPW01", b"\x03", b"c"]), Err(Malformed::BadReply)),
            (
                f(&[b"w", b"", b"MDPW01", b"\x03", b"c", b"x", b"y"]),
                Err(Malformed::BadReply),
            ),
            (
                f(&[b"w", b"", b"MDPW01", b"\x04", b"x"]),
                Err(Malformed::TrailingFrames),
            ),
            (
                f(&[b"w", b"x", b"", b"MDPW01", b"\x04"]),
                Err(Malformed::WorkerEnvelope),
            ),
        ];
        for (frames, expected) in rows {
            assert_eq!(parse_inbound(frames.clone(), 4), expected, "frames {frames:?}");
        }
    }

    #[test]
    fn bounds_the_envelope() {
        let frames = f(&[b"a", b"b", b"c", b"", b"MDPC01", b"echo"]);
        assert_eq!(parse_inbound(frames.clone(), 2), Err(Malformed::EnvelopeTooLong));
        assert!(parse_inbound(frames, 3).is_ok());
    }

    #[test]
    fn builders_round_trip_through_the_parsers() {
        let to_worker = worker_request(&"w".into(), &"c".into(), f(&[b"x"]));
        assert_eq!(
            parse_to_worker(to_worker[1..].to_vec()),
            Ok(ToWorker::Request {
                client: "c".into(),
                body: f(&[b"x"])
            })
        );
        let reply_frames = client_reply(&f(&[b"c"]), &"echo".into(), f(&[b"x"]));
        assert_eq!(
            parse_client_reply(reply_frames[1..].to_vec()),
            Ok(("echo".into(), f(&[b"x"])))
        );
        let mut worker_reply = reply(&"c".into(), f(&[b"y"]));
        worker_reply.insert(0, "w".into());
        assert_eq!(
            parse_inbound(worker_reply, 4),
            Ok(Inbound::Worker {
                identity: "w".into(),
                message: FromWorker::Reply {
                    client: "c".into(),
                    body: f(&[b"y"])
                }
            })
        );
        assert_eq!(
            parse_to_worker(worker_heartbeat(&"w".into())[1..].to_vec()),
            Ok(ToWorker::Heartbeat)
        );
        assert_eq!(
            parse_to_worker(worker_disconnect(&"w".into())[1..].to_vec()),
            Ok(ToWorker::Disconnect)
        );
    }
}
