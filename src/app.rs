//! The application: shared state and the one place the router and its layer
//! stack are built.

use std::sync::Arc;

use axum::Router;
use axum::routing::{any, get, post};

use crate::budget::Budgets;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::images::Images;
use crate::metrics::Metrics;
use crate::routes;
use crate::upstream::Forwarder;

/// Everything a request handler may need, built once at startup.
pub struct AppState {
    pub config: Config,
    pub catalog: Catalog,
    pub forwarder: Forwarder,
    pub budgets: Budgets,
    pub metrics: Metrics,
    /// Fetching, converting and caching images for every upstream.
    pub images: Images,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Builds the state from a validated config. Async because it opens the
    /// budget store (loading its file, starting its background writer).
    pub async fn new(config: Config) -> Result<Self, String> {
        let catalog = Catalog::new(&config)?;
        let forwarder = Forwarder::new().map_err(|e| format!("HTTP client: {e}"))?;
        // Metrics first, so the image metrics' descriptions reach the recorder.
        let metrics = Metrics::install();
        let budgets = Budgets::open(&config.store).await?;
        let images = Images::new(&config.images)?;
        Ok(Self {
            config,
            catalog,
            forwarder,
            budgets,
            metrics,
            images,
        })
    }
}

/// The router with every route and layer.
pub fn app(state: SharedState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*id}", get(routes::models::retrieve))
        .route("/v1/usage", get(routes::usage::usage))
        .route("/v1/responses", any(routes::responses::reject))
        .route("/v1/responses/{*rest}", any(routes::responses::reject))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Layers wrap from the inside out: the last one added runs first.
        // `observe` is outermost so it sees every response, fallbacks and
        // rejections included, and stamps each with its request id.
        .layer(axum::middleware::from_fn(crate::observe::observe))
        .with_state(state)
}
