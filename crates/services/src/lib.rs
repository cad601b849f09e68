//! majordome's core services. Each is a worker on the bus that uses the
//! same library as any plugin and keeps what must last in the one SQLite
//! database: the config service, the manager, the device service, the
//! history, and the plugin manifests and device schema they read.

pub mod config;
pub mod devices;
pub mod history;
pub mod manager;
pub mod manifest;
pub mod schema;
pub mod supervisor;

pub use config::{ConfigError, ConfigService, SERVICE_NAMES};
pub use devices::{DeviceEndpoints, DeviceError, DeviceService, DeviceSettings};
pub use history::{HistoryService, HistorySettings};
pub use manifest::{load_folder, ConfigKey, Manifest, ValueType};
pub use schema::Schema;

/// Locks what a service's threads share. Every update to such data is a
/// whole step, so a thread that panicked while holding the lock leaves it
/// consistent: the others take it over rather than fail.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
