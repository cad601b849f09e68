//! The Majordomo broker: MDP/0.1 (RFC 7) with MMI (RFC 8) and the Domogik
//! dialect.
//!
//! [`core::Core`] is the whole broker as a state machine: typed inputs (a
//! message from a peer, a tick of the clock) in, messages to send out. It
//! owns all broker state, is driven by one thread, and never touches a
//! socket or reads the clock itself. [`server`] is the thin socket loop that
//! feeds it.

pub mod core;
mod outbound;
pub mod server;
pub mod settings;
pub mod stats;

pub use crate::core::Core;
pub use server::{Broker, BrokerError};
pub use settings::Settings;
