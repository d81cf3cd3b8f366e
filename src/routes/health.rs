//! Liveness, readiness and the Prometheus scrape endpoint.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::app::SharedState;

/// 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// How long the budget store has to answer a readiness probe.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 once the config is loaded and the budget store answers, else 503
/// saying why (probes read the status; operators read the body).
pub async fn readyz(State(state): State<SharedState>) -> impl IntoResponse {
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.budgets.health()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready".to_owned()),
        Ok(Err(e)) => {
            tracing::warn!("not ready: budget store: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("budget store unavailable: {e}"),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "budget store did not answer".to_owned(),
        ),
    }
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
