//! Clients of the bus (plugins, core parts): their ids and statuses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A client's id, `<type>-<name>.<host>` (e.g. `plugin-fake.box`): also
/// the name of its service on the broker. The type is what comes before
/// the first `-`, the host what follows the first `.` after it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId {
    pub kind: String,
    pub name: String,
    pub host: String,
}

impl ClientId {
    pub fn new(kind: &str, name: &str, host: &str) -> ClientId {
        ClientId {
            kind: kind.to_owned(),
            name: name.to_owned(),
            host: host.to_owned(),
        }
    }

    /// Domogik's package id, `<type>-<name>`.
    pub fn package(&self) -> String {
        format!("{}-{}", self.kind, self.name)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}.{}", self.kind, self.name, self.host)
    }
}

/// A text that is not `<type>-<name>.<host>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a client id <type>-<name>.<host>, like plugin-fake.box")]
pub struct BadClientId(pub String);

impl FromStr for ClientId {
    type Err = BadClientId;

    fn from_str(id: &str) -> Result<ClientId, BadClientId> {
        let bad = || BadClientId(id.to_owned());
        let (kind, rest) = id.split_once('-').ok_or_else(bad)?;
        let (name, host) = rest.split_once('.').ok_or_else(bad)?;
        if kind.is_empty() || name.is_empty() || host.is_empty() {
            return Err(bad());
        }
        Ok(ClientId::new(kind, name, host))
    }
}

/// Domogik's client statuses, as `plugin.status` events carry them in
/// `event` and the manager lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ClientStatus {
    /// Known (from a manifest) but never heard from.
    Unknown,
    Starting,
    /// Running, waiting for its configuration.
    NotConfigured,
    Alive,
    /// Asked to stop, stopping.
    StopRequest,
    Stopped,
    /// Ended without being asked to, or silent too long.
    Dead,
    Invalid,
}

impl ClientStatus {
    pub const ALL: [ClientStatus; 8] = [
        ClientStatus::Unknown,
        ClientStatus::Starting,
        ClientStatus::NotConfigured,
        ClientStatus::Alive,
        ClientStatus::StopRequest,
        ClientStatus::Stopped,
        ClientStatus::Dead,
        ClientStatus::Invalid,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientStatus::Unknown => "unknown",
            ClientStatus::Starting => "starting",
            ClientStatus::NotConfigured => "not-configured",
            ClientStatus::Alive => "alive",
            ClientStatus::StopRequest => "stop-request",
            ClientStatus::Stopped => "stopped",
            ClientStatus::Dead => "dead",
            ClientStatus::Invalid => "invalid",
        }
    }

    /// A client in this status is expected to keep saying so (every 15 s);
    /// silence makes it dead.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            ClientStatus::Starting | ClientStatus::NotConfigured | ClientStatus::Alive | ClientStatus::StopRequest
        )
    }
}

impl fmt::Display for ClientStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of Domogik's statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a client status (unknown, starting, not-configured, alive, stop-request, stopped, dead, invalid)"
)]
pub struct BadStatus(pub String);

impl FromStr for ClientStatus {
    type Err = BadStatus;

    fn from_str(word: &str) -> Result<ClientStatus, BadStatus> {
        ClientStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == word)
            .ok_or_else(|| BadStatus(word.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_round_trip_and_bad_ones_are_refused() {
        let id: ClientId = "plugin-fake.box".parse().unwrap();
        assert_eq!(id, ClientId::new("plugin", "fake", "box"));
        assert_eq!(id.to_string(), "plugin-fake.box");
        assert_eq!(id.package(), "plugin-fake");
        // The host may hold dots and the name dashes past the first one.
        let id: ClientId = "core-my-rest.box.lan".parse().unwrap();
        assert_eq!(
            (id.kind.as_str(), id.name.as_str(), id.host.as_str()),
            ("core", "my-rest", "box.lan")
        );
        for bad in ["", "plugin", "plugin-fake", "-fake.box", "plugin-.box", "plugin-fake."] {
            assert!(bad.parse::<ClientId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_are_domogik_words() {
        for status in ClientStatus::ALL {
            assert_eq!(status.as_str().parse::<ClientStatus>(), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert!("sleeping".parse::<ClientStatus>().is_err());
        assert!(ClientStatus::Alive.is_running() && !ClientStatus::Dead.is_running());
    }
}
