//! Calling Titanic from a program: what `majordome titanic …` uses.

use bytes::Bytes;
use majordome_client::{Client, Frames};

use crate::{ListEntry, TitanicError};

/// What `titanic.reply` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyStatus {
    /// `200`: the service's reply.
    Done(Frames),
    /// `300`: not answered yet; ask again later.
    Pending,
    /// `400`: no such request (never made, or closed).
    Unknown,
}

fn status_of(reply: &[Bytes]) -> Result<&str, TitanicError> {
    let first = reply
        .first()
        .ok_or_else(|| TitanicError::Protocol("an empty reply".into()))?;
    std::str::from_utf8(first).map_err(|_| TitanicError::Protocol("a status that is not text".into()))
}

/// Stores a request for `service`; returns its uuid once it is durable.
pub fn request(client: &mut Client, service: &str, body: Frames) -> Result<String, TitanicError> {
    let mut frames = vec![Bytes::copy_from_slice(service.as_bytes())];
    frames.extend(body);
    let reply = client.request("titanic.request", frames)?;
    match (status_of(&reply)?, reply.get(1)) {
        ("200", Some(uuid)) => Ok(String::from_utf8_lossy(uuid).into_owned()),
        ("200", None) => Err(TitanicError::Protocol("200 without a uuid".into())),
        (status, _) => Err(TitanicError::Status(status.to_owned())),
    }
}

/// The reply to the request `uuid`, if there is one yet.
pub fn reply(client: &mut Client, uuid: &str) -> Result<ReplyStatus, TitanicError> {
    let reply = client.request("titanic.reply", vec![Bytes::copy_from_slice(uuid.as_bytes())])?;
    match status_of(&reply)? {
        "200" => Ok(ReplyStatus::Done(reply[1..].to_vec())),
        "300" => Ok(ReplyStatus::Pending),
        "400" => Ok(ReplyStatus::Unknown),
        other => Err(TitanicError::Status(other.to_owned())),
    }
}

/// Forgets the request `uuid` and its reply (fine if unknown).
pub fn close(client: &mut Client, uuid: &str) -> Result<(), TitanicError> {
    let reply = client.request("titanic.close", vec![Bytes::copy_from_slice(uuid.as_bytes())])?;
    match status_of(&reply)? {
        "200" => Ok(()),
        other => Err(TitanicError::Status(other.to_owned())),
    }
}

/// Pending requests, then the latest done ones.
pub fn list(client: &mut Client) -> Result<Vec<ListEntry>, TitanicError> {
    let reply = client.request("titanic.list", Vec::new())?;
    match (status_of(&reply)?, reply.get(1)) {
        ("200", Some(json)) => serde_json::from_slice(json).map_err(|e| TitanicError::Protocol(e.to_string())),
        (status, _) => Err(TitanicError::Status(status.to_owned())),
    }
}
