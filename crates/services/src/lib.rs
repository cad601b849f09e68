//! majordome's core services. Each is a worker on the bus that uses the
//! same library as any plugin and keeps what must last in the one SQLite
//! database. So far: the config service, the manager's client registry,
//! and the plugin manifests both read.

pub mod config;
pub mod manager;
pub mod manifest;

pub use config::{ConfigError, ConfigService, SERVICE_NAMES};
pub use manifest::{load_folder, ConfigKey, Manifest, ValueType};
