//! Iris's integration tests, linked as one binary (one link instead of one
//! per file: on two cores the links dominated an edit-and-test cycle).
//!
//! Each module is a topic; `support` is the one harness they share: the real
//! server on port 0 or the router in-process, the mock upstream, the image
//! host, Redis, and the skip policy (`support::skip`).
//!
//! Run one topic with `cargo test --test it budget::`, one test by its path.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod support;

mod admin;
mod alerts;
mod budget;
mod cache;
mod cli;
mod connections;
mod docs;
mod durable;
mod embeddings;
mod faults;
mod gateway;
mod hardening;
mod images;
mod leaks;
mod money;
mod policy;
mod quickstart;
mod redis;
mod redis_cluster;
mod reload;
mod reports;
mod routing;
mod secrets;
mod spend;
mod teams;
mod tls;
mod traces;
