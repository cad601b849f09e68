//! The baseline: a bare libzmq `zmq_proxy_steerable` between a ROUTER for
//! the clients and a DEALER for the workers.

use std::thread::{self, JoinHandle};

use anyhow::{Context, Result};
use majordome_net as net;

use super::load::Target;

const CONTROL: &str = "inproc://bench-proxy-control";

/// The proxy's thread, and so the threads of its context too (they inherit
/// the name of the thread that makes them).
const THREAD_NAME: &str = "bench-proxy";

/// The proxy's sockets, on a context of their own.
struct Sides {
    frontend: zmq::Socket,
    backend: zmq::Socket,
    /// The inside end of the control pair.
    control: zmq::Socket,
    context: zmq::Context,
}

/// Both sides bound on free local ports, and the control socket's inside
/// end, on a new context.
fn bind() -> Result<Sides> {
    let context = zmq::Context::new();
    let frontend = context.socket(zmq::ROUTER)?;
    let backend = context.socket(zmq::DEALER)?;
    for socket in [&frontend, &backend] {
        socket.set_linger(0)?;
        socket.set_sndhwm(100_000)?;
        socket.set_rcvhwm(100_000)?;
        socket
            .bind("tcp://127.0.0.1:0")
            .context("cannot bind the baseline proxy")?;
    }
    // Each proxy has its own context, so the same inproc name is free.
    let control = context.socket(zmq::PAIR)?;
    control.bind(CONTROL)?;
    Ok(Sides {
        frontend,
        backend,
        control,
        context,
    })
}

/// A bare libzmq proxy on its own context (so with its own I/O thread, as
/// a separate process would have), stopped with `TERMINATE` on its control
/// socket when dropped.
pub(super) struct Proxy {
    frontend: String,
    backend: String,
    control: zmq::Socket,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Binds both sides on free local ports and starts relaying.
    pub(super) fn start() -> Result<Proxy> {
        // Everything is made on the proxy's own thread, so that the
        // context's I/O threads inherit its name and
        // [`Proxy::cpu_ns`] can find them.
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                let mut sides = match bind().and_then(|sides| {
                    let endpoints = (
                        net::bound_endpoint(&sides.frontend)?,
                        net::bound_endpoint(&sides.backend)?,
                    );
                    Ok((sides, endpoints))
                }) {
                    Ok((sides, endpoints)) => {
                        let _ = bound_tx.send(Ok((sides.context.clone(), endpoints)));
                        sides
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                // It returns on TERMINATE; an error could only mean the
                // context is gone, and then there is nothing to relay.
                let _ = zmq::proxy_steerable(&mut sides.frontend, &mut sides.backend, &mut sides.control);
                let _ = sides.control.set_linger(0);
            })
            .context("cannot start the baseline proxy's thread")?;
        let (context, (frontend, backend)) = bound_rx
            .recv()
            .context("the baseline proxy's thread stopped before binding")??;
        let control = context.socket(zmq::PAIR)?;
        control.set_linger(0)?;
        control.connect(CONTROL)?;
        Ok(Proxy {
            frontend,
            backend,
            control,
            thread: Some(thread),
        })
    }

    /// On-CPU time so far of the proxy's thread and its context's threads,
    /// in nanoseconds (`None` where `/proc` cannot tell).
    pub(super) fn cpu_ns(&self) -> Option<u64> {
        super::spawn::cpu_ns(std::process::id(), |name| name == THREAD_NAME)
    }

    /// Where clients and workers connect.
    pub(super) fn target(&self) -> Target {
        Target::Proxy {
            frontend: self.frontend.clone(),
            backend: self.backend.clone(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.control.send("TERMINATE", 0).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
