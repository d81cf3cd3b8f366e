//! The wire types Iris looks inside: chat completion requests, kept mostly raw,
//! and the usage a response reports.

pub mod chat;
pub mod raw;
pub mod stream;
