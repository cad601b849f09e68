//! The scenario service.

pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod model;
pub mod schedule;
