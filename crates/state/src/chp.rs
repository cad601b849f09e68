//! The Clustered Hashmap Protocol (ZeroMQ RFC 12, CHP) on the wire: frames
//! in, typed messages out, and back.
//!
//! **No I/O here.** A frame is a [`Bytes`]; a message is a `Vec<Bytes>`
//! exactly as a ZeroMQ socket carries it (without the identity frame that a
//! ROUTER adds). The server and the mirror call into this module.
//!
//! Every CHP message but ICANHAZ has five frames:
//!
//! ```text
//! key | sequence (8 bytes, big endian, signed) | uuid (16 bytes or empty) | properties | value
//! ```
//!
//! The sequence is a signed 64-bit integer, as in the zguide's `kvmsg`.
//! Properties are `name=value\n` lines, read strictly: each line ends with a
//! newline, has a non-empty name without `=`, and no name appears twice.
//! Their order is kept.

use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

/// One multipart message, frame by frame.
pub type Frames = Vec<Bytes>;

/// First frame of a snapshot request: `"ICANHAZ?" | subtree`.
pub const ICANHAZ: &str = "ICANHAZ?";
/// Key of the message that ends a snapshot.
pub const KTHXBAI: &str = "KTHXBAI";
/// Key of the server's heartbeat on the updates socket.
pub const HUGZ: &str = "HUGZ";
/// Names that can never be keys: they are commands.
pub const RESERVED_KEYS: [&str; 3] = [HUGZ, KTHXBAI, ICANHAZ];
/// The property that makes the server delete a key after this many
/// seconds (decimal, e.g. `30` or `1.5`). `0` means "never", as in the
/// zguide.
pub const TTL: &str = "ttl";
/// Length of a UUID frame when there is one.
pub const UUID_LEN: usize = 16;

/// Why a message is not valid CHP. Each kind is counted apart by the
/// server, so [`ChpError::name`] is a stable identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum ChpError {
    /// Not five frames (two for ICANHAZ).
    #[error("wrong number of frames")]
    WrongFrameCount,
    /// A sequence frame that is not exactly 8 bytes.
    #[error("sequence frame is not 8 bytes")]
    BadSequence,
    /// A UUID frame neither empty nor 16 bytes.
    #[error("uuid frame is neither empty nor 16 bytes")]
    BadUuid,
    /// A key that is not UTF-8.
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    /// An empty key.
    #[error("key is empty")]
    EmptyKey,
    /// A key that is a command name (`HUGZ`, `KTHXBAI`, `ICANHAZ?`).
    #[error("key is a reserved command name")]
    ReservedKey,
    /// A key longer than the server accepts.
    #[error("key is too long")]
    KeyTooLong,
    /// A properties frame that is not `name=value\n` lines.
    #[error("properties are not name=value lines")]
    BadProperties,
    /// A `ttl` property that is not a decimal number of seconds.
    #[error("ttl is not a decimal number of seconds")]
    BadTtl,
    /// A subtree that is neither empty nor a UTF-8 prefix starting with `/`.
    #[error("subtree is neither empty nor a UTF-8 prefix starting with '/'")]
    BadSubtree,
    /// On the snapshot socket, anything but ICANHAZ; from the server, a
    /// message the client did not expect there.
    #[error("unexpected command")]
    UnknownCommand,
    /// A value, properties frame or whole message over its bound.
    #[error("message too large")]
    Oversized,
}

impl ChpError {
    /// Every kind, in a fixed order (see [`ChpError::index`]).
    pub const ALL: [ChpError; 12] = [
        ChpError::WrongFrameCount,
        ChpError::BadSequence,
        ChpError::BadUuid,
        ChpError::KeyNotUtf8,
        ChpError::EmptyKey,
        ChpError::ReservedKey,
        ChpError::KeyTooLong,
        ChpError::BadProperties,
        ChpError::BadTtl,
        ChpError::BadSubtree,
        ChpError::UnknownCommand,
        ChpError::Oversized,
    ];

    /// A short, stable name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            ChpError::WrongFrameCount => "wrong_frame_count",
            ChpError::BadSequence => "bad_sequence",
            ChpError::BadUuid => "bad_uuid",
            ChpError::KeyNotUtf8 => "key_not_utf8",
            ChpError::EmptyKey => "empty_key",
            ChpError::ReservedKey => "reserved_key",
            ChpError::KeyTooLong => "key_too_long",
            ChpError::BadProperties => "bad_properties",
            ChpError::BadTtl => "bad_ttl",
            ChpError::BadSubtree => "bad_subtree",
            ChpError::UnknownCommand => "unknown_command",
            ChpError::Oversized => "oversized",
        }
    }

    /// Its position in [`ChpError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Size bounds applied to what clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes in a key (and in a subtree).
    pub max_key_bytes: usize,
    /// Bytes in a value.
    pub max_value_bytes: usize,
    /// Bytes in the properties frame.
    pub max_properties_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 64 * 1024,
            max_properties_bytes: 4 * 1024,
        }
    }
}

/// One CHP key-value message: KVSET, KVPUB, KVSYNC, and the KTHXBAI and
/// HUGZ commands, which share the shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvMsg {
    pub key: String,
    pub sequence: i64,
    /// Empty, or 16 bytes.
    pub uuid: Bytes,
    /// `name=value` pairs in order. [`KvMsg::to_frames`] writes them as
    /// they are: use [`KvMsg::set_property`] to keep them valid.
    pub properties: Vec<(String, String)>,
    /// Empty means "delete the key".
    pub value: Bytes,
}

impl KvMsg {
    /// A message with no sequence, uuid or properties.
    pub fn new(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        KvMsg {
            key: key.into(),
            value: value.into(),
            ..KvMsg::default()
        }
    }

    /// The value of property `name`.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Sets property `name` (replacing it if present, else appending).
    pub fn set_property(&mut self, name: &str, value: &str) -> Result<(), ChpError> {
        if !valid_property_name(name) || value.contains('\n') {
            return Err(ChpError::BadProperties);
        }
        match self.properties.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.properties.push((name.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    /// The `ttl` property as a duration; `None` when absent or zero.
    pub fn ttl(&self) -> Result<Option<Duration>, ChpError> {
        match self.property(TTL) {
            None => Ok(None),
            Some(text) => parse_ttl(text).map(|d| Some(d).filter(|d| !d.is_zero())),
        }
    }

    /// True when the value is empty: the key is to be deleted.
    pub fn is_delete(&self) -> bool {
        self.value.is_empty()
    }

    /// The five frames.
    pub fn to_frames(&self) -> Frames {
        vec![
            Bytes::copy_from_slice(self.key.as_bytes()),
            encode_sequence(self.sequence),
            self.uuid.clone(),
            encode_properties(&self.properties),
            self.value.clone(),
        ]
    }

    /// Reads five frames. Checks the frame count, the sequence and uuid
    /// lengths, that the key is non-empty UTF-8 and the properties'
    /// syntax; not the key rules of KVSET (see [`parse_kvset`]).
    pub fn from_frames(frames: &[Bytes]) -> Result<KvMsg, ChpError> {
        let [key, sequence, uuid, properties, value] = frames else {
            return Err(ChpError::WrongFrameCount);
        };
        let sequence = decode_sequence(sequence)?;
        if !uuid.is_empty() && uuid.len() != UUID_LEN {
            return Err(ChpError::BadUuid);
        }
        let key = std::str::from_utf8(key).map_err(|_| ChpError::KeyNotUtf8)?;
        if key.is_empty() {
            return Err(ChpError::EmptyKey);
        }
        Ok(KvMsg {
            key: key.to_owned(),
            sequence,
            uuid: uuid.clone(),
            properties: parse_properties(properties)?,
            value: value.clone(),
        })
    }
}

/// A sequence number as 8 bytes, big endian, two's complement.
pub fn encode_sequence(sequence: i64) -> Bytes {
    Bytes::copy_from_slice(&sequence.to_be_bytes())
}

/// Reads an 8-byte big-endian signed sequence number.
pub fn decode_sequence(frame: &[u8]) -> Result<i64, ChpError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| ChpError::BadSequence)?;
    Ok(i64::from_be_bytes(bytes))
}

fn valid_property_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\n'])
}

/// The properties frame: `name=value\n` for each pair, in order.
pub fn encode_properties(properties: &[(String, String)]) -> Bytes {
    if properties.is_empty() {
        return Bytes::new();
    }
    let mut text = String::new();
    for (name, value) in properties {
        text.push_str(name);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    Bytes::from(text)
}

/// Reads a properties frame strictly (see the module documentation).
pub fn parse_properties(frame: &[u8]) -> Result<Vec<(String, String)>, ChpError> {
    let text = std::str::from_utf8(frame).map_err(|_| ChpError::BadProperties)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let body = text.strip_suffix('\n').ok_or(ChpError::BadProperties)?;
    let mut properties: Vec<(String, String)> = Vec::new();
    for line in body.split('\n') {
        let (name, value) = line.split_once('=').ok_or(ChpError::BadProperties)?;
        if name.is_empty() || properties.iter().any(|(n, _)| n == name) {
            return Err(ChpError::BadProperties);
        }
        properties.push((name.to_owned(), value.to_owned()));
    }
    Ok(properties)
}

/// Reads a `ttl` value: decimal seconds, `digits[.digits]`, at most ten
/// digits before the point and nine after. No sign, exponent or spaces.
pub fn parse_ttl(text: &str) -> Result<Duration, ChpError> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole, 10) || fraction.is_some_and(|f| !digits(f, 9)) {
        return Err(ChpError::BadTtl);
    }
    let seconds: u64 = whole.parse().map_err(|_| ChpError::BadTtl)?;
    let nanos = match fraction {
        Some(f) => format!("{f:0<9}").parse::<u32>().map_err(|_| ChpError::BadTtl)?,
        None => 0,
    };
    Ok(Duration::new(seconds, nanos))
}

/// Writes a ttl as decimal seconds, to the millisecond; a non-zero ttl
/// never becomes `0` (which would mean "never").
pub fn format_ttl(ttl: Duration) -> String {
    let millis = ttl.as_millis();
    if millis == 0 && !ttl.is_zero() {
        return "0.001".to_owned();
    }
    match millis % 1000 {
        0 => format!("{}", millis / 1000),
        rest => format!("{}.{rest:03}", millis / 1000),
    }
}

/// The rules for a key a client may set: non-empty (checked by
/// [`KvMsg::from_frames`]), not a command name, bounded.
pub fn check_key(key: &str, limits: &Limits) -> Result<(), ChpError> {
    if key.is_empty() {
        return Err(ChpError::EmptyKey);
    }
    if RESERVED_KEYS.contains(&key) {
        return Err(ChpError::ReservedKey);
    }
    if key.len() > limits.max_key_bytes {
        return Err(ChpError::KeyTooLong);
    }
    Ok(())
}

/// A subtree: empty (everything) or a UTF-8 prefix starting with `/`,
/// bounded like a key.
pub fn check_subtree(frame: &[u8], limits: &Limits) -> Result<String, ChpError> {
    let subtree = std::str::from_utf8(frame).map_err(|_| ChpError::BadSubtree)?;
    if !subtree.is_empty() && !subtree.starts_with('/') || subtree.len() > limits.max_key_bytes {
        return Err(ChpError::BadSubtree);
    }
    Ok(subtree.to_owned())
}

/// Client → snapshot socket: `"ICANHAZ?" | subtree`.
pub fn icanhaz(subtree: &str) -> Frames {
    vec![
        Bytes::from_static(ICANHAZ.as_bytes()),
        Bytes::copy_from_slice(subtree.as_bytes()),
    ]
}

/// Server → client, after the last KVSYNC: `"KTHXBAI" | seq | "" | "" | subtree`.
pub fn kthxbai(sequence: i64, subtree: &str) -> Frames {
    vec![
        Bytes::from_static(KTHXBAI.as_bytes()),
        encode_sequence(sequence),
        Bytes::new(),
        Bytes::new(),
        Bytes::copy_from_slice(subtree.as_bytes()),
    ]
}

/// Server → updates socket: `"HUGZ" | seq | "" | "" | ""`, seq being the
/// last sequence number published.
/// Server → updates socket, majordome's extension to RFC 12: a HUGZ that
/// also tells the writer of `uuid` that its KVSET was refused, and why:
/// `"HUGZ" | seq | uuid | "refused=<reason>" | ""`. RFC 12 clients take it
/// for a HUGZ (which carries nothing they read).
pub fn refusal(sequence: i64, uuid: Bytes, reason: &str) -> Frames {
    let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    vec![
        Bytes::from_static(HUGZ.as_bytes()),
        encode_sequence(sequence),
        uuid,
        encode_properties(&[("refused".to_owned(), reason)]),
        Bytes::new(),
    ]
}

pub fn hugz(sequence: i64) -> Frames {
    vec![
        Bytes::from_static(HUGZ.as_bytes()),
        encode_sequence(sequence),
        Bytes::new(),
        Bytes::new(),
        Bytes::new(),
    ]
}

/// Reads a message on the snapshot socket (after the identity frame):
/// ICANHAZ, giving its subtree.
pub fn parse_icanhaz(frames: &[Bytes], limits: &Limits) -> Result<String, ChpError> {
    match frames {
        [command, subtree] if command.as_ref() == ICANHAZ.as_bytes() => check_subtree(subtree, limits),
        [command, ..] if command.as_ref() == ICANHAZ.as_bytes() => Err(ChpError::WrongFrameCount),
        [] => Err(ChpError::WrongFrameCount),
        _ => Err(ChpError::UnknownCommand),
    }
}

/// Reads a KVSET from the collector, with every rule the server applies:
/// sizes, the key rules and a valid `ttl`.
pub fn parse_kvset(frames: &[Bytes], limits: &Limits) -> Result<KvMsg, ChpError> {
    if frames.len() != 5 {
        return Err(ChpError::WrongFrameCount);
    }
    if frames[0].len() > limits.max_key_bytes {
        return Err(ChpError::KeyTooLong);
    }
    if frames[3].len() > limits.max_properties_bytes || frames[4].len() > limits.max_value_bytes {
        return Err(ChpError::Oversized);
    }
    let message = KvMsg::from_frames(frames)?;
    check_key(&message.key, limits)?;
    message.ttl()?;
    Ok(message)
}

/// What a client reads on the updates socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// KVPUB: a set, or a delete when the value is empty.
    Publish(KvMsg),
    /// HUGZ, with the server's last sequence number.
    Hugz { sequence: i64 },
    /// A HUGZ that says the KVSET with this uuid was refused ([`refusal`]).
    Refused { uuid: Bytes, reason: String },
}

/// Reads a message from the updates socket.
pub fn parse_update(frames: &[Bytes]) -> Result<Update, ChpError> {
    let message = KvMsg::from_frames(frames)?;
    match message.key.as_str() {
        HUGZ => match message.properties.iter().find(|(name, _)| name == "refused") {
            Some((_, reason)) if !message.uuid.is_empty() => Ok(Update::Refused {
                uuid: message.uuid,
                reason: reason.clone(),
            }),
            _ => Ok(Update::Hugz {
                sequence: message.sequence,
            }),
        },
        KTHXBAI | ICANHAZ => Err(ChpError::UnknownCommand),
        _ => Ok(Update::Publish(message)),
    }
}

/// What a client reads on the snapshot socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReply {
    /// KVSYNC: one key and its state.
    Entry(KvMsg),
    /// KTHXBAI: the snapshot is complete as of `sequence`.
    End { sequence: i64, subtree: String },
}

/// Reads a message from the snapshot socket.
pub fn parse_snapshot_reply(frames: &[Bytes]) -> Result<SnapshotReply, ChpError> {
    let message = KvMsg::from_frames(frames)?;
    match message.key.as_str() {
        KTHXBAI => Ok(SnapshotReply::End {
            sequence: message.sequence,
            subtree: String::from_utf8(message.value.to_vec()).map_err(|_| ChpError::BadSubtree)?,
        }),
        HUGZ | ICANHAZ => Err(ChpError::UnknownCommand),
        _ => Ok(SnapshotReply::Entry(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(frames: &[&[u8]]) -> Frames {
        frames.iter().map(|frame| Bytes::copy_from_slice(frame)).collect()
    }

    const SEQ_42: &[u8] = &[0, 0, 0, 0, 0, 0, 0, 42];
    const UUID: &[u8] = &[7; 16];

    #[test]
    fn sequences_are_8_bytes_big_endian_signed() {
        assert_eq!(encode_sequence(1).as_ref(), &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            encode_sequence(0x0102_0304_0506_0708).as_ref(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(encode_sequence(-1).as_ref(), &[0xff; 8]);
        for n in [0, 1, -1, i64::MAX, i64::MIN, 1 << 40] {
            assert_eq!(decode_sequence(&encode_sequence(n)), Ok(n));
        }
        assert_eq!(decode_sequence(&[0; 7]), Err(ChpError::BadSequence));
        assert_eq!(decode_sequence(&[0; 9]), Err(ChpError::BadSequence));
    }

    #[test]
    fn good_frames_decode_and_encode_back() {
        let table: Vec<(Frames, KvMsg)> = vec![
            (
                f(&[b"/lamp/1", SEQ_42, UUID, b"ttl=5\nunit=lux\n", b"on"]),
                KvMsg {
                    key: "/lamp/1".into(),
                    sequence: 42,
                    uuid: Bytes::from_static(UUID),
                    properties: vec![("ttl".into(), "5".into()), ("unit".into(), "lux".into())],
                    value: Bytes::from_static(b"on"),
                },
            ),
            (
                f(&[b"k", &[0xff; 8], b"", b"", b""]),
                KvMsg {
                    key: "k".into(),
                    sequence: -1,
                    ..KvMsg::default()
                },
            ),
            (
                // A value may hold anything, a property value may hold '='.
                f(&[b"/caf\xc3\xa9", SEQ_42, b"", b"expr=a=b\nempty=\n", b"\x00\xff"]),
                KvMsg {
                    key: "/café".into(),
                    sequence: 42,
                    uuid: Bytes::new(),
                    properties: vec![("expr".into(), "a=b".into()), ("empty".into(), "".into())],
                    value: Bytes::from_static(b"\x00\xff"),
                },
            ),
        ];
        for (frames, expected) in table {
            let message = KvMsg::from_frames(&frames).unwrap();
            assert_eq!(message, expected);
            assert_eq!(message.to_frames(), frames, "round trip of {expected:?}");
        }
    }

    #[test]
    fn bad_frames_are_named() {
        let limits = Limits {
            max_key_bytes: 16,
            max_value_bytes: 8,
            max_properties_bytes: 32,
        };
        let table: Vec<(&str, Frames, ChpError)> = vec![
            ("four frames", f(&[b"k", SEQ_42, b"", b""]), ChpError::WrongFrameCount),
            (
                "six frames",
                f(&[b"k", SEQ_42, b"", b"", b"v", b"x"]),
                ChpError::WrongFrameCount,
            ),
            ("no frames", f(&[]), ChpError::WrongFrameCount),
            (
                "7-byte sequence",
                f(&[b"k", &[0; 7], b"", b"", b"v"]),
                ChpError::BadSequence,
            ),
            ("empty sequence", f(&[b"k", b"", b"", b"", b"v"]), ChpError::BadSequence),
            (
                "5-byte uuid",
                f(&[b"k", SEQ_42, b"12345", b"", b"v"]),
                ChpError::BadUuid,
            ),
            (
                "17-byte uuid",
                f(&[b"k", SEQ_42, &[1; 17], b"", b"v"]),
                ChpError::BadUuid,
            ),
            (
                "key not UTF-8",
                f(&[b"\xff\xfe", SEQ_42, b"", b"", b"v"]),
                ChpError::KeyNotUtf8,
            ),
            ("empty key", f(&[b"", SEQ_42, b"", b"", b"v"]), ChpError::EmptyKey),
            ("key HUGZ", f(&[b"HUGZ", SEQ_42, b"", b"", b"v"]), ChpError::ReservedKey),
            (
                "key KTHXBAI",
                f(&[b"KTHXBAI", SEQ_42, b"", b"", b"v"]),
                ChpError::ReservedKey,
            ),
            (
                "key ICANHAZ?",
                f(&[b"ICANHAZ?", SEQ_42, b"", b"", b"v"]),
                ChpError::ReservedKey,
            ),
            (
                "key too long",
                f(&[&[b'a'; 17], SEQ_42, b"", b"", b"v"]),
                ChpError::KeyTooLong,
            ),
            (
                "no final newline",
                f(&[b"k", SEQ_42, b"", b"ttl=5", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "no '='",
                f(&[b"k", SEQ_42, b"", b"ttl\n", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "empty name",
                f(&[b"k", SEQ_42, b"", b"=5\n", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "empty line",
                f(&[b"k", SEQ_42, b"", b"a=1\n\n", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "duplicate",
                f(&[b"k", SEQ_42, b"", b"a=1\na=2\n", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "not UTF-8",
                f(&[b"k", SEQ_42, b"", b"a=\xff\n", b"v"]),
                ChpError::BadProperties,
            ),
            (
                "ttl letters",
                f(&[b"k", SEQ_42, b"", b"ttl=abc\n", b"v"]),
                ChpError::BadTtl,
            ),
            (
                "ttl negative",
                f(&[b"k", SEQ_42, b"", b"ttl=-1\n", b"v"]),
                ChpError::BadTtl,
            ),
            ("ttl empty", f(&[b"k", SEQ_42, b"", b"ttl=\n", b"v"]), ChpError::BadTtl),
            (
                "ttl exponent",
                f(&[b"k", SEQ_42, b"", b"ttl=1e3\n", b"v"]),
                ChpError::BadTtl,
            ),
            (
                "ttl trailing dot",
                f(&[b"k", SEQ_42, b"", b"ttl=1.\n", b"v"]),
                ChpError::BadTtl,
            ),
            (
                "ttl huge",
                f(&[b"k", SEQ_42, b"", b"ttl=99999999999\n", b"v"]),
                ChpError::BadTtl,
            ),
            (
                "value too large",
                f(&[b"k", SEQ_42, b"", b"", b"123456789"]),
                ChpError::Oversized,
            ),
            (
                "properties too large",
                f(&[b"k", SEQ_42, b"", &[b'a'; 33], b"v"]),
                ChpError::Oversized,
            ),
        ];
        for (what, frames, expected) in table {
            assert_eq!(parse_kvset(&frames, &limits), Err(expected), "{what}");
        }
        // At the limits, all is well.
        let good = f(&[&[b'a'; 16], SEQ_42, UUID, b"ttl=0.25\n", b"12345678"]);
        let message = parse_kvset(&good, &limits).unwrap();
        assert_eq!(message.ttl(), Ok(Some(Duration::from_millis(250))));
    }

    #[test]
    fn names_are_distinct_and_indexed() {
        let mut names: Vec<_> = ChpError::ALL.iter().map(|e| e.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ChpError::ALL.len());
        for (i, e) in ChpError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
    }

    #[test]
    fn ttl_reads_decimal_seconds() {
        let table = [
            ("5", Some(Duration::from_secs(5))),
            ("0", None),
            ("0.0", None),
            ("1.5", Some(Duration::from_millis(1500))),
            ("0.000000001", Some(Duration::from_nanos(1))),
            ("9999999999", Some(Duration::from_secs(9_999_999_999))),
        ];
        for (text, expected) in table {
            let mut message = KvMsg::new("k", "v");
            message.set_property(TTL, text).unwrap();
            assert_eq!(message.ttl(), Ok(expected), "{text}");
        }
        for (ttl, text) in [
            (Duration::from_secs(30), "30"),
            (Duration::from_millis(1500), "1.500"),
            (Duration::from_micros(10), "0.001"),
            (Duration::ZERO, "0"),
        ] {
            assert_eq!(format_ttl(ttl), text);
            assert!(parse_ttl(text).is_ok());
        }
    }

    #[test]
    fn commands_have_their_exact_frames() {
        assert_eq!(icanhaz("/lamp/"), f(&[b"ICANHAZ?", b"/lamp/"]));
        assert_eq!(kthxbai(42, "/lamp/"), f(&[b"KTHXBAI", SEQ_42, b"", b"", b"/lamp/"]));
        assert_eq!(hugz(42), f(&[b"HUGZ", SEQ_42, b"", b"", b""]));
        assert_eq!(parse_update(&hugz(42)), Ok(Update::Hugz { sequence: 42 }));
        let uuid = Bytes::from_static(&[7; 16]);
        assert_eq!(
            parse_update(&refusal(42, uuid.clone(), "too\nbig")),
            Ok(Update::Refused {
                uuid,
                reason: "too big".into()
            })
        );
        assert_eq!(
            parse_snapshot_reply(&kthxbai(42, "/lamp/")),
            Ok(SnapshotReply::End {
                sequence: 42,
                subtree: "/lamp/".into()
            })
        );
        assert_eq!(parse_update(&kthxbai(1, "")), Err(ChpError::UnknownCommand));
        assert_eq!(parse_snapshot_reply(&hugz(1)), Err(ChpError::UnknownCommand));
        let kvpub = f(&[b"/a", SEQ_42, UUID, b"", b"1"]);
        assert!(matches!(parse_update(&kvpub), Ok(Update::Publish(m)) if m.key == "/a"));
        assert!(matches!(parse_snapshot_reply(&kvpub), Ok(SnapshotReply::Entry(m)) if m.sequence == 42));
    }

    #[test]
    fn icanhaz_table() {
        let limits = Limits::default();
        let table: Vec<(Frames, Result<String, ChpError>)> = vec![
            (f(&[b"ICANHAZ?", b""]), Ok(String::new())),
            (f(&[b"ICANHAZ?", b"/lamp/"]), Ok("/lamp/".into())),
            (f(&[b"ICANHAZ?", b"/la"]), Ok("/la".into())),
            (f(&[b"ICANHAZ?", b"lamp/"]), Err(ChpError::BadSubtree)),
            (f(&[b"ICANHAZ?", b"/\xff/"]), Err(ChpError::BadSubtree)),
            (f(&[b"ICANHAZ?", &[b'/'; 1025]]), Err(ChpError::BadSubtree)),
            (f(&[b"ICANHAZ?"]), Err(ChpError::WrongFrameCount)),
            (f(&[b"ICANHAZ?", b"", b""]), Err(ChpError::WrongFrameCount)),
            (f(&[b"ICANHAZ", b""]), Err(ChpError::UnknownCommand)),
            (f(&[b"HELLO"]), Err(ChpError::UnknownCommand)),
            (f(&[]), Err(ChpError::WrongFrameCount)),
        ];
        for (frames, expected) in table {
            assert_eq!(parse_icanhaz(&frames, &limits), expected, "{frames:?}");
        }
    }

    #[test]
    fn set_property_keeps_order_and_refuses_what_cannot_be_encoded() {
        let mut message = KvMsg::new("k", "v");
        message.set_property("b", "1").unwrap();
        message.set_property("a", "2").unwrap();
        message.set_property("b", "3").unwrap();
        assert_eq!(encode_properties(&message.properties).as_ref(), b"b=3\na=2\n");
        assert_eq!(message.set_property("x=y", "1"), Err(ChpError::BadProperties));
        assert_eq!(message.set_property("", "1"), Err(ChpError::BadProperties));
        assert_eq!(message.set_property("x", "1\n2"), Err(ChpError::BadProperties));
    }
}
