//! What can go wrong when talking to the broker.

use std::time::Duration;

use thiserror::Error;

/// Errors of clients and workers. Each says what happened and what to check.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error(
        "cannot reach the broker at {endpoint} within {after:?}: nothing is listening there (is `majordome up` \
         running?), or it asks for a login and none or a wrong one was given (MAJORDOME_USER, MAJORDOME_PASSWORD)"
    )]
    NotConnected { endpoint: String, after: Duration },
    /// The broker took the request but no reply came in time.
    #[error("no reply from service '{service}' within {after:?}")]
    Timeout { service: String, after: Duration },
    /// A reply that does not follow the protocol.
    #[error("malformed reply: {0}")]
    Protocol(String),
    /// The endpoint string is not one ZeroMQ understands.
    #[error("invalid broker endpoint '{endpoint}': {source}")]
    Endpoint { endpoint: String, source: zmq::Error },
    /// The client was closed while the request was pending.
    #[error("the client was closed")]
    Closed,
    /// The process is stopping: the wait was given up (see
    /// `Client::stop_on`).
    #[error("stopped while waiting for the broker")]
    Stopped,
    /// A ZeroMQ call failed.
    #[error("ZeroMQ error: {0}")]
    Zmq(#[from] zmq::Error),
}
