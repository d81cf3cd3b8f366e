//! Liveness, readiness and the Prometheus scrape endpoint.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::budget::OnUnavailable;
use crate::state::SharedState;

/// 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// How long the budget store has to answer a readiness probe.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 once the config is loaded and the budget store answers, else 503
/// saying why (probes read the status; operators read the body).
///
/// With `store.on_unavailable = "allow"` an instance serves through a store
/// outage (counting locally), so it stays ready: answering 503 would take
/// every instance out of its load balancer at once, exactly when `allow` was
/// chosen to keep serving. The body still says the store is down.
///
/// With a PostgreSQL spend log, the body also says how many records wait in
/// the local spool (never a reason to be unready: they are safe there).
pub async fn readyz(State(state): State<SharedState>) -> impl IntoResponse {
    let spool = match state.spend.backlog() {
        Some((waiting, false)) => {
            format!("; spend spool: {waiting} records waiting for PostgreSQL")
        }
        Some((waiting, true)) => format!(
            "; spend spool: {waiting} records waiting for PostgreSQL, which refused the last batch"
        ),
        None => String::new(),
    };
    let (status, body) = readiness(&state).await;
    (status, format!("{body}{spool}"))
}

async fn readiness(state: &SharedState) -> (StatusCode, String) {
    let problem =
        match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.gateway.budgets.health()).await {
            Ok(Ok(())) => return (StatusCode::OK, "ready".to_owned()),
            Ok(Err(e)) => format!("budget store unavailable: {e}"),
            Err(_) => "budget store did not answer".to_owned(),
        };
    tracing::warn!("readiness: {problem}");
    if state.config().store.on_unavailable == OnUnavailable::Allow {
        (
            StatusCode::OK,
            format!("ready, counting budgets locally: {problem}"),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problem)
    }
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
