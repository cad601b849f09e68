//! The Domogik dialect of MDP/0.1: a body of exactly two frames, `action`
//! and a JSON object, optionally preceded on the client side by a timeout
//! frame (seconds as ASCII) that the broker removes.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::Frames;

/// A Domogik request or reply body: `action | JSON object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The action, e.g. `config.get`, `plugin.start.do`, `config.result`.
    pub action: String,
    /// The JSON object carried with it.
    pub data: Value,
}

/// Why a body is not a Domogik message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DialectError {
    /// The body does not have exactly two frames.
    #[error("a Domogik message has exactly two frames (action, JSON), got {0}")]
    FrameCount(usize),
    /// The action is not valid UTF-8 or is empty.
    #[error("the action frame must be non-empty UTF-8")]
    BadAction,
    /// The data frame is not a JSON object.
    #[error("the data frame is not a JSON object: {0}")]
    BadJson(String),
}

impl Message {
    /// A message with the given action and data.
    pub fn new(action: impl Into<String>, data: Value) -> Self {
        Message {
            action: action.into(),
            data,
        }
    }

    /// The two frames of this message.
    pub fn to_frames(&self) -> Frames {
        vec![Bytes::from(self.action.clone()), Bytes::from(self.data.to_string())]
    }

    /// Reads a two-frame body.
    pub fn from_frames(body: &[Bytes]) -> Result<Self, DialectError> {
        if body.len() != 2 {
            return Err(DialectError::FrameCount(body.len()));
        }
        let action = std::str::from_utf8(&body[0]).map_err(|_| DialectError::BadAction)?;
        if action.is_empty() {
            return Err(DialectError::BadAction);
        }
        let data: Value = serde_json::from_slice(&body[1]).map_err(|e| DialectError::BadJson(e.to_string()))?;
        if !data.is_object() {
            return Err(DialectError::BadJson("not an object".into()));
        }
        Ok(Message {
            action: action.to_owned(),
            data,
        })
    }

    /// The `status: false` reply a broker or service sends when `action`
    /// failed for `reason`.
    pub fn failure(action: &str, reason: impl Into<String>) -> Self {
        let mut data = Map::new();
        data.insert("status".into(), Value::Bool(false));
        data.insert("reason".into(), Value::String(reason.into()));
        Message {
            action: result_action(action),
            data: Value::Object(data),
        }
    }

    /// `Some(false)` when the data says `status: false`, `Some(true)` for
    /// `status: true`, `None` when there is no boolean status.
    pub fn status(&self) -> Option<bool> {
        self.data.get("status").and_then(Value::as_bool)
    }

    /// The `reason` string, if any.
    pub fn reason(&self) -> Option<&str> {
        self.data.get("reason").and_then(Value::as_str)
    }
}

/// The reply action for a request action: `x.get` and `x.do` become
/// `x.result`; any other action gets `.result` appended.
pub fn result_action(action: &str) -> String {
    let stem = action
        .strip_suffix(".get")
        .or_else(|| action.strip_suffix(".do"))
        .unwrap_or(action);
    format!("{stem}.result")
}

/// A client's optional timeout frame, as Domogik's `MQSyncReq` sends it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeoutFrame {
    /// A number of seconds (`"10"`, `"2.5"`).
    Seconds(Duration),
    /// `"None"`: Domogik's client sends `str(None)` when the caller gave no
    /// timeout. Domogik's own broker then passed it on as the action, which
    /// broke the request; we read it as "no timeout given".
    Unset,
}

/// Recognises a timeout frame at the head of a client request body and
/// removes it. It is only recognised when at least one frame follows it, so
/// that a plain MDP client whose single body frame happens to be a number
/// (an echo of `"42"`) keeps its body. Returns what was found.
pub fn take_timeout_frame(body: &mut Frames) -> Option<TimeoutFrame> {
    if body.len() < 2 {
        return None;
    }
    let parsed = parse_timeout(&body[0])?;
    body.remove(0);
    Some(parsed)
}

fn parse_timeout(frame: &[u8]) -> Option<TimeoutFrame> {
    if frame.len() > 32 {
        return None;
    }
    let text = std::str::from_utf8(frame).ok()?.trim();
    if text == "None" {
        return Some(TimeoutFrame::Unset);
    }
    // Only plain decimal numbers: Python's float() also takes "nan" and
    // "inf", which would make no sense as a deadline.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let seconds: f64 = text.parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    // Bounded so that Duration::from_secs_f64 cannot panic and a deadline
    // cannot overflow an Instant.
    Some(TimeoutFrame::Seconds(Duration::from_secs_f64(
        seconds.min(365.0 * 86_400.0),
    )))
}

/// When a body looks like a Domogik message, its action. Used by the broker
/// to decide whether a failure can be told to the client as a `.result`
/// reply: a plain MDP client would not understand one.
pub fn dialect_action(body: &[Bytes]) -> Option<&str> {
    if body.len() != 2 {
        return None;
    }
    let action = std::str::from_utf8(&body[0]).ok()?;
    let well_formed = !action.is_empty() && action.len() <= 256 && action.bytes().all(|b| b.is_ascii_graphic());
    let json = body[1].as_ref();
    let object = json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    (well_formed && object).then_some(action)
}

/// A Domogik event as it travels on pub/sub: `msg_id | JSON`, where
/// `msg_id` is `<category>.<unix time with '.' as '_'>.0_1`, e.g.
/// `plugin.status.1371476851_54.0_1`. Subscriptions are prefix matches on
/// `msg_id`, so subscribing to a category gets its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The category, e.g. `plugin.status`.
    pub category: String,
    /// The whole message id as sent.
    pub id: String,
    /// The JSON payload.
    pub data: Value,
}

/// Why a pub/sub message is not a Domogik event.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    /// Not exactly two frames.
    #[error("a Domogik event has exactly two frames (msg_id, JSON), got {0}")]
    FrameCount(usize),
    /// The id is not UTF-8 or has no category before its time part.
    #[error("the msg_id is not `<category>.<time>.0_1`")]
    BadId,
    /// The payload is not JSON.
    #[error("the payload is not JSON: {0}")]
    BadJson(String),
}

/// The `msg_id` for an event of `category` sent at `unix_seconds`.
pub fn event_id(category: &str, unix_seconds: f64) -> String {
    let time = format!("{unix_seconds:.2}").replace('.', "_");
    format!("{category}.{time}.0_1")
}

impl Event {
    /// The two frames of an event of `category` sent at `unix_seconds`.
    pub fn frames(category: &str, unix_seconds: f64, data: &Value) -> Frames {
        vec![
            Bytes::from(event_id(category, unix_seconds)),
            Bytes::from(data.to_string()),
        ]
    }

    /// Reads a pub/sub message. The category is the id without its last two
    /// dot-separated parts (the time and the `0_1` suffix).
    pub fn from_frames(frames: &[Bytes]) -> Result<Self, EventError> {
        if frames.len() != 2 {
            return Err(EventError::FrameCount(frames.len()));
        }
        let id = std::str::from_utf8(&frames[0]).map_err(|_| EventError::BadId)?;
        let mut parts = id.rsplitn(3, '.');
        let (_suffix, _time, category) = (parts.next(), parts.next(), parts.next());
        let category = category.filter(|c| !c.is_empty()).ok_or(EventError::BadId)?;
        let data = serde_json::from_slice(&frames[1]).map_err(|e| EventError::BadJson(e.to_string()))?;
        Ok(Event {
            category: category.to_owned(),
            id: id.to_owned(),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(parts: &[&str]) -> Frames {
        parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
    }

    #[test]
    fn timeout_frames_as_real_clients_send_them() {
        // (body as sent, timeout found, body the worker must see)
        let rows: Vec<(Frames, Option<TimeoutFrame>, Frames)> = vec![
            (
                f(&["10", "config.get", "{}"]),
                Some(TimeoutFrame::Seconds(Duration::from_secs(10))),
                f(&["config.get", "{}"]),
            ),
            (
                f(&["2.5", "a.get", "{}"]),
                Some(TimeoutFrame::Seconds(Duration::from_millis(2500))),
                f(&["a.get", "{}"]),
            ),
            (
                f(&["None", "client.list.get", "{}"]),
                Some(TimeoutFrame::Unset),
                f(&["client.list.get", "{}"]),
            ),
            // Domogik's client also sends the timeout frame to MMI.
            (
                f(&["10", "manager"]),
                Some(TimeoutFrame::Seconds(Duration::from_secs(10))),
                f(&["manager"]),
            ),
            (f(&["config.get", "{}"]), None, f(&["config.get", "{}"])),
            (f(&["42"]), None, f(&["42"])),
            (f(&["nan", "a", "b"]), None, f(&["nan", "a", "b"])),
            (f(&["-1", "a", "b"]), None, f(&["-1", "a", "b"])),
            (f(&["1e9", "a", "b"]), None, f(&["1e9", "a", "b"])),
            (f(&["", "a", "b"]), None, f(&["", "a", "b"])),
            (
                f(&["99999999999999999999", "a", "b"]),
                Some(TimeoutFrame::Seconds(Duration::from_secs(365 * 86_400))),
                f(&["a", "b"]),
            ),
        ];
        for (mut body, found, rest) in rows {
            let original = body.clone();
            assert_eq!(take_timeout_frame(&mut body), found, "body {original:?}");
            assert_eq!(body, rest, "body {original:?}");
        }
    }

    #[test]
    fn result_actions_follow_the_naming_rules() {
        assert_eq!(result_action("config.get"), "config.result");
        assert_eq!(result_action("plugin.start.do"), "plugin.start.result");
        assert_eq!(result_action("clients.list.get"), "clients.list.result");
        assert_eq!(result_action("reload"), "reload.result");
    }

    #[test]
    fn messages_round_trip_and_reject_bad_bodies() {
        let msg = Message::new("plugin.start.do", json!({"id": "diskfree"}));
        assert_eq!(Message::from_frames(&msg.to_frames()), Ok(msg));
        assert_eq!(Message::from_frames(&f(&["a"])), Err(DialectError::FrameCount(1)));
        assert_eq!(Message::from_frames(&f(&["", "{}"])), Err(DialectError::BadAction));
        assert!(matches!(
            Message::from_frames(&f(&["a", "[1]"])),
            Err(DialectError::BadJson(_))
        ));
        assert!(matches!(
            Message::from_frames(&f(&["a", "{"])),
            Err(DialectError::BadJson(_))
        ));
        let failure = Message::failure("config.get", "no worker");
        assert_eq!(failure.action, "config.result");
        assert_eq!(failure.status(), Some(false));
        assert_eq!(failure.reason(), Some("no worker"));
    }

    #[test]
    fn events_as_domogik_sends_them() {
        // From Domogik's manager dialogs (seed 001).
        let frames = f(&[
            "clients.list.1371071554_16.0_1",
            r#"{"domogik-diskfree.darkstar": {"status": "unknown", "host": "darkstar", "type": "plugin", "id": "diskfree", "configured": null}}"#,
        ]);
        let event = Event::from_frames(&frames).unwrap();
        assert_eq!(event.category, "clients.list");
        assert_eq!(event.data["domogik-diskfree.darkstar"]["status"], json!("unknown"));
        assert_eq!(
            event_id("plugin.status", 1371476851.54),
            "plugin.status.1371476851_54.0_1"
        );
        let built = Event::frames("plugin.status", 1371476851.54, &json!({"event": "alive"}));
        assert_eq!(Event::from_frames(&built).unwrap().category, "plugin.status");
        assert_eq!(Event::from_frames(&f(&["x"])), Err(EventError::FrameCount(1)));
        assert_eq!(Event::from_frames(&f(&["nodots", "{}"])), Err(EventError::BadId));
        assert_eq!(Event::from_frames(&f(&[".1_2.0_1", "{}"])), Err(EventError::BadId));
        assert!(matches!(
            Event::from_frames(&f(&["a.1_2.0_1", "{"])),
            Err(EventError::BadJson(_))
        ));
    }

    #[test]
    fn recognises_dialect_bodies() {
        assert_eq!(dialect_action(&f(&["config.get", "{\"a\":1}"])), Some("config.get"));
        assert_eq!(dialect_action(&f(&["config.get", " {}"])), Some("config.get"));
        assert_eq!(dialect_action(&f(&["hello"])), None);
        assert_eq!(dialect_action(&f(&["hello world", "{}"])), None);
        assert_eq!(dialect_action(&f(&["a", "b"])), None);
    }
}
