//! Wire codecs for the Majordomo protocol family: pure functions from frames
//! to typed messages and back.
//!
//! **Invariant:** nothing in this crate does I/O. A frame is a [`Bytes`]; a
//! message is a `Vec<Bytes>` exactly as a ZeroMQ socket would carry it. The
//! socket loops in `majordome-broker` and `majordome-client` call into here.

pub mod domogik;
pub mod mdp;
pub mod mmi;

pub use bytes::Bytes;

/// One multipart ZeroMQ message: its frames in order.
pub type Frames = Vec<Bytes>;
