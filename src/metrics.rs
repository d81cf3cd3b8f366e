//! Prometheus metrics: one recorder per process, rendered at `/metrics`.
//!
//! Label values are route templates, model and client names and status codes:
//! never a key, a URL or anything a client can make unbounded (model names
//! are only recorded once they resolved to a configured model).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds, from 1 ms to 2 minutes: gateway overhead up to long generations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the process-wide recorder the first time; later calls (tests
    /// starting several servers in one process) share it.
    pub fn install() -> Self {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding
            // program's); then that one receives Iris's metrics.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        });
        Self {
            handle: handle.clone(),
        }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn describe() {
    metrics::describe_counter!(
        "iris_requests_total",
        "Requests answered, by route, model, client and status."
    );
    metrics::describe_histogram!(
        "iris_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request to response head, by route."
    );
    metrics::describe_counter!(
        "iris_tokens_total",
        "Tokens charged to budgets, by client, model and kind (prompt or completion): the upstream's reported usage, else Iris's estimate."
    );
    metrics::describe_counter!(
        "iris_budget_rejections_total",
        "Requests refused by a budget, by client and reason (the window that refused, or store_unavailable)."
    );
    metrics::describe_counter!(
        "iris_budget_store_fallback_total",
        "Requests decided by this instance's local count because the budget store did not answer (on_unavailable = \"allow\"), by client."
    );
    metrics::describe_histogram!(
        "iris_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time from sending upstream to the upstream's response head, by upstream."
    );
}
