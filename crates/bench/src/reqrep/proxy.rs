//! The baseline: a bare libzmq `zmq_proxy_steerable` between a ROUTER for
//! the clients and a DEALER for the workers.

use std::thread::{self, JoinHandle};

use anyhow::{Context, Result};
use majordome_net as net;

use super::load::Target;

const CONTROL: &str = "inproc://bench-proxy-control";

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
        let frontend_endpoint = net::bound_endpoint(&frontend)?;
        let backend_endpoint = net::bound_endpoint(&backend)?;
        // Each proxy has its own context, so the same inproc name is free.
        let control_inside = context.socket(zmq::PAIR)?;
        control_inside.bind(CONTROL)?;
        let control = context.socket(zmq::PAIR)?;
        control.set_linger(0)?;
        control.connect(CONTROL)?;
        let thread = thread::Builder::new()
            .name("bench-proxy".into())
            .spawn(move || {
                let (mut frontend, mut backend, mut control) = (frontend, backend, control_inside);
                // It returns on TERMINATE; an error could only mean the
                // context is gone, and then there is nothing to relay.
                let _ = zmq::proxy_steerable(&mut frontend, &mut backend, &mut control);
                let _ = control.set_linger(0);
            })
            .context("cannot start the baseline proxy's thread")?;
        Ok(Proxy {
            frontend: frontend_endpoint,
            backend: backend_endpoint,
            control,
            thread: Some(thread),
        })
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
