//! Load generators for `majordome bench`.

pub mod devices;
pub mod events;
pub mod http;
pub mod reqrep;
pub mod scenario;
pub mod state;
pub mod titanic;

/// The folder a bench keeps its database in: `data` if given, else a new
/// temporary one (removed when the returned guard is dropped).
pub(crate) fn data_folder(
    data: Option<&std::path::PathBuf>,
    prefix: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, std::path::PathBuf)> {
    use anyhow::Context;
    Ok(match data {
        Some(path) => (None, path.clone()),
        None => {
            let folder = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("cannot create a temporary folder")?;
            let path = folder.path().to_owned();
            (Some(folder), path)
        }
    })
}

/// The threads of a bench's in-process stack (broker, services, workers):
/// each stopped by one signal and joined when this is dropped. A thread
/// that fails says so on stderr.
pub(crate) struct Background {
    shutdown: majordome_net::Shutdown,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The hub's parts the bench started, stopped with the rest.
    hub: Option<majordome_hub::Hub>,
}

impl Background {
    pub(crate) fn new() -> std::io::Result<Background> {
        Ok(Background {
            shutdown: majordome_net::Shutdown::new()?,
            threads: Vec::new(),
            hub: None,
        })
    }

    /// Runs `run` on a thread named `name` until the stack is dropped.
    pub(crate) fn spawn<F, E>(&mut self, name: &'static str, run: F) -> std::io::Result<()>
    where
        F: FnOnce(&majordome_net::Shutdown) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        let stop = self.shutdown.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            if let Err(e) = run(&stop) {
                eprintln!("{name}: {e}");
            }
        })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Starts the hub of `config` in this process, stopped with the rest;
    /// its endpoints.
    pub(crate) fn start_hub(
        config: &majordome_hub::HubConfig,
    ) -> anyhow::Result<(Background, majordome_hub::Endpoints)> {
        let mut background = Background::new()?;
        let hub = majordome_hub::Hub::start(config, &background.shutdown)?;
        let endpoints = hub.endpoints().clone();
        background.hub = Some(hub);
        Ok((background, endpoints))
    }

    /// The hub it started.
    pub(crate) fn hub(&self) -> Option<&majordome_hub::Hub> {
        self.hub.as_ref()
    }

    /// A plugin ([`PLUGIN`]) as quick as a plugin can be: it answers every
    /// command at once with success, and calls `arrived` as each comes.
    pub(crate) fn spawn_plugin(&mut self, broker: &str, arrived: impl Fn() + Send + 'static) -> std::io::Result<()> {
        use majordome_client::{domogik_handler, Message, Worker, WorkerOptions};
        let broker = broker.to_owned();
        self.spawn("bench-plugin", move |stop| {
            let handler = domogik_handler(move |_message: Message| {
                arrived();
                Message::new(
                    "device.command.result",
                    serde_json::json!({"status": true, "reason": "", "result": {"identifier": "success"}}),
                )
            });
            Worker::new(&broker, PLUGIN, WorkerOptions::default()).run(handler, stop)
        })
    }
}

/// The plugin client id the benches' answering plugin serves.
pub(crate) const PLUGIN: &str = "plugin-bench.local";

impl Drop for Background {
    fn drop(&mut self) {
        self.shutdown.trigger();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some(hub) = self.hub.take() {
            if let Err(e) = hub.stop() {
                eprintln!("{e}");
            }
        }
    }
}

/// A client with a timeout long enough for any bench's slowest reply.
pub(crate) fn client(broker: &str) -> majordome_client::Client {
    majordome_client::Client::new(
        broker,
        majordome_client::ClientOptions {
            timeout: std::time::Duration::from_secs(30),
            ..majordome_client::ClientOptions::default()
        },
    )
}
