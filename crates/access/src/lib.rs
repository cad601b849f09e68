//! Who may do what on the bus.
//!
//! Every connection to the hub has an identity, which the socket loops
//! read from each message (libzmq's `User-Id` metadata, set by the ZAP
//! handler when the peer logged in with PLAIN) and from where it came
//! (`Peer-Address`: an `inproc://` peer, the hub itself, has none):
//! [`Who`]. [`users`] keeps the secrets of named identities, hashed, in the
//! data folder; [`policy`] reads what each may do from the `[permissions]`
//! of the configuration file and answers the questions the parts ask
//! (may this identity call that action, serve that service, publish that
//! category, read that Clone subtree?).
//!
//! No I/O happens here but reading and writing the users file.

pub mod owners;
pub mod policy;
pub mod tokens;
pub mod users;

pub use owners::Owners;
pub use policy::{Denied, Policy, Rules};
pub use users::{Credentials, Users, UsersError};

/// The identity the hub's own clients log in with when its listeners ask
/// for credentials (a user cannot take this name).
pub const HUB_IDENTITY: &str = "majordome";

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// The hub itself: a peer in this process (`inproc://`), or the hub's
    /// own clients logged in as [`HUB_IDENTITY`].
    Hub,
    /// An anonymous peer on a loopback listener, trusted as a local client
    /// (`[security] loopback = "trusted"`, the default).
    Local,
    /// A peer that logged in: a user made with `majordome user add`, or a
    /// plugin the manager started (its client id, `plugin-<name>.<host>`).
    Named(&'a str),
}

impl<'a> Who<'a> {
    /// The identity of a message, from its metadata: `in_process` when it
    /// has no `Peer-Address`, `user_id` its `User-Id` (if any).
    pub fn of(in_process: bool, user_id: Option<&'a str>) -> Who<'a> {
        // A login says more than the lack of an address (an `ipc://` peer
        // has none either).
        match user_id {
            Some(HUB_IDENTITY) => Who::Hub,
            Some(name) if !name.is_empty() => Who::Named(name),
            _ if in_process => Who::Hub,
            _ => Who::Local,
        }
    }

    /// The name to record as an owner (Titanic) and to show: `""` for the
    /// hub and for local clients.
    pub fn name(&self) -> &'a str {
        match self {
            Who::Named(name) => name,
            Who::Hub | Who::Local => "",
        }
    }
}

/// How anonymous peers on loopback are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loopback {
    /// They are local clients with every permission, as Mosquitto 2 and
    /// D-Bus treat them: today's Domogik, RasPy and ago control clients
    /// work unchanged.
    #[default]
    Trusted,
    /// Every peer logs in (PLAIN), loopback or not; supervised plugins get
    /// their own credentials and may speak only for themselves.
    Authenticated,
}

/// Whether `name` is a plugin's identity: a client id such as
/// `plugin-fake.box` (user names have no `.`, so the two never meet).
pub fn is_plugin_identity(name: &str) -> bool {
    name.contains('.') && name.contains('-')
}
