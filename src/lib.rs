//! Iris: an OpenAI-compatible gateway in front of vision-language model
//! upstreams that disagree on details.
//!
//! A request flows down this map and its response back up; each layer only
//! knows the ones below it (docs/development.md draws it):
//!
//! - the edge: [`server`] accepts, bounds and serves connections, drains on
//!   SIGTERM and reloads on SIGHUP; [`app`] builds the router and its layer
//!   stack (request ids, trace spans, [`access_log`], panics, body limits,
//!   [`body_deadline`]); [`endpoints`] turn HTTP into calls below; [`error`]
//!   renders every failure in OpenAI's shape; [`reload`] checks a new config
//!   file whole and swaps it in (SIGHUP, `POST /admin/reload`)
//! - [`state`]: the services every request uses, built once at startup, and
//!   the config snapshot behind an atomic pointer
//! - [`gateway`]: a chat completion from request to response: the attempts
//!   across deployments, and the body that relays the answer and settles its
//!   budget
//! - [`clients`]: managed clients, created, changed, rotated and deleted at
//!   run time and kept in the configured store beside the config file's
//! - [`config`]: text to typed values, once; the snapshot the app holds
//! - the domain, beside each other: [`catalog`] (clients, models, their
//!   deployments), [`routing`] (which deployment an attempt goes to, which
//!   failures are retried, cooldowns, the fair queue for upstream room),
//!   [`budget`] (estimate, reserve, settle; the stores), [`rewrite`] (an
//!   upstream's image policy applied to a request, using [`images`]: safe
//!   fetching, sniffing, conversion, caching), [`upstream`] (forwarding; the
//!   built-in demo upstream), [`spend`] (the spend log: a record per chat
//!   completion, batched to SQLite or PostgreSQL off the request path),
//!   [`auth_throttle`] (wrong keys throttled per source address),
//!   [`client_addr`] (the client's address, decided once at the edge: the
//!   peer, or behind `server.trusted_proxies` the forwarded one),
//!   [`alerts`] (budget thresholds reached, claimed in the store and posted
//!   to a webhook off the request path), [`cache`] (answers kept per
//!   tenant and model, replayed without calling upstream)
//! - at the bottom: [`openai`] (the wire types Iris looks inside),
//!   [`facts`] (what a request learned, for its headers, log line, metrics
//!   and spend record),
//!   [`error_code`] (every error code Iris emits, with its status, type and
//!   doc line), [`keys`], [`secret`], [`metrics`], [`telemetry`] (logs),
//!   [`traces`] (OpenTelemetry), [`tls`] (Iris's own TLS connections: the
//!   platform's roots and an operator's private CA), [`shared_health`] (deployment cooldowns
//!   shared between instances: what routing asks of a shared store)
//!
//! [`commands`] holds one function per CLI command, [`cli`] their arguments.

pub mod access_log;
pub mod alerts;
pub mod app;
pub mod auth_throttle;
pub mod body_deadline;
pub mod budget;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod client_addr;
pub mod clients;
pub mod commands;
pub mod config;
pub mod edge;
pub mod endpoints;
pub mod error;
pub mod error_code;
pub mod facts;
pub mod gateway;
pub mod ids;
pub mod images;
pub mod keys;
pub mod metrics;
pub mod openai;
pub mod reload;
pub mod rewrite;
pub mod routing;
pub mod secret;
pub mod server;
pub mod shared_health;
pub mod spend;
pub mod stamp;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod upstream;

/// Installs rustls's crypto provider for HTTPS upstreams and image hosts.
/// Safe to call more than once.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
