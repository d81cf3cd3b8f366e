//! Iris: an OpenAI-compatible gateway in front of vision-language model
//! upstreams that disagree on details.
//!
//! A request flows down this map and its response back up; each layer only
//! knows the ones below it:
//!
//! - the edge: [`app`] builds the router and its layer stack (request ids,
//!   trace spans, [`access_log`], panics, body limits, [`body_deadline`]);
//!   [`routes`] turn HTTP into calls below; [`error`] renders every failure
//!   in OpenAI's shape; [`server`] accepts, bounds and serves connections,
//!   and drains
//! - [`gateway`]: a chat completion from request to response, and the body
//!   that relays the answer and settles its budget
//! - [`config`]: text to typed values, once; the snapshot the app holds
//! - the domain, beside each other: [`catalog`] (clients, models, their
//!   upstream), [`budget`] (estimate, reserve, settle; the stores),
//!   [`rewrite`] (an upstream's image policy applied to a request, using
//!   [`images`]: safe fetching, sniffing, conversion, caching), [`upstream`]
//!   (forwarding), [`spend`] (the spend log: a record per chat completion,
//!   batched to SQLite or PostgreSQL off the request path)
//! - at the bottom: [`openai`] (the wire types Iris looks inside), [`facts`]
//!   (what a request learned, for its headers, log line and spend record), [`keys`],
//!   [`secret`], [`metrics`], [`telemetry`] (logs), [`traces`] (OpenTelemetry)
//!
//! [`commands`] holds one function per CLI command, [`cli`] their arguments.

pub mod access_log;
pub mod app;
pub mod auth_throttle;
pub mod body_deadline;
pub mod budget;
pub mod catalog;
pub mod cli;
pub mod clients;
pub mod commands;
pub mod config;
pub mod error;
pub mod error_code;
pub mod facts;
pub mod gateway;
pub mod images;
pub mod keys;
pub mod metrics;
pub mod openai;
pub mod reload;
pub mod rewrite;
pub mod routes;
pub mod routing;
pub mod secret;
pub mod server;
pub mod spend;
pub mod state;
pub mod telemetry;
pub mod traces;
pub mod upstream;

/// Installs rustls's crypto provider for HTTPS upstreams and image hosts.
/// Safe to call more than once.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
