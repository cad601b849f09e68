//! Talking to a majordome (or any MDP/0.1) broker: a synchronous client, an
//! asynchronous client that keeps many requests in flight on one socket, and
//! a worker that serves a service. Every majordome service and plugin is
//! built on these, exactly as a third-party plugin would be.

mod async_client;
mod error;
mod events;
mod sync_client;
mod worker;

pub use async_client::{AsyncClient, PendingReply};
pub use error::ClientError;
pub use events::{unix_now, Publisher, Subscriber};
pub use majordome_mdp::domogik::Event;
pub use majordome_mdp::domogik::Message;
pub use majordome_mdp::{Bytes, Frames};
pub use majordome_net::Shutdown;
pub use sync_client::{Client, ClientOptions};
pub use worker::{domogik_handler, Responder, Worker, WorkerOptions};

/// How much longer a client waits than the deadline it gave the broker, so
/// that the broker's own "expired" answer arrives before the client gives up.
pub(crate) fn grace(timeout: std::time::Duration) -> std::time::Duration {
    (timeout / 10).max(std::time::Duration::from_millis(500))
}

/// The timeout frame of the Domogik dialect: whole seconds when it is
/// whole, else seconds with a fraction.
pub(crate) fn timeout_frame(timeout: std::time::Duration) -> Bytes {
    let seconds = timeout.as_secs_f64();
    if seconds.fract() == 0.0 {
        Bytes::from(format!("{}", timeout.as_secs()))
    } else {
        Bytes::from(format!("{seconds:.3}"))
    }
}
