//! Iris: an OpenAI-compatible gateway in front of vision-language model
//! upstreams that disagree on details.
//!
//! A request flows down this map and its response back up:
//!
//! - [`observe`]: request ids, the request log line, metrics (outermost layer)
//! - [`routes`]: one module per endpoint group, on top of:
//!   - [`catalog`]: clients by key, models by name, each model's upstream
//!   - [`openai`]: the wire types Iris looks inside (requests kept mostly raw)
//!   - [`budget`]: per-client budgets: estimate, reserve, settle; the stores
//!   - [`rewrite`]: each upstream's image policy applied to a request, using
//!     [`images`]: safe fetching, sniffing, conversion, resizing, caching
//!   - [`upstream`]: forwarding and streaming responses back
//! - [`app`]: the state and the router; [`server`]: serving and draining
//! - at the bottom: [`config`], [`keys`], [`error`], [`metrics`], [`telemetry`]

pub mod app;
pub mod budget;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod images;
pub mod keys;
pub mod metrics;
pub mod observe;
pub mod openai;
pub mod rewrite;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod upstream;

/// Installs rustls's crypto provider for HTTPS upstreams and image hosts.
/// Safe to call more than once.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
