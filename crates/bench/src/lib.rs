//! Load generators for `majordome bench`.

pub mod reqrep;
