//! Load generators for `majordome bench`.

pub mod events;
pub mod reqrep;
pub mod state;
pub mod titanic;
