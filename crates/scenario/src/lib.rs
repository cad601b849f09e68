//! The scenario service: automations as data. `model` (the JSON shape and
//! its checks), `schedule` (cron and sun), `engine` (the state machine that
//! runs them), `lua` (sandboxed scripts), `store` (its tables), `service`
//! (the threads on the bus).

pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod lua;
pub mod model;
pub mod schedule;
pub mod service;
mod store;

pub use service::{client_id, run, Endpoints, ScenarioError, ScenarioSettings};
