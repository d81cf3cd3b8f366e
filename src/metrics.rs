//! Prometheus metrics: one recorder per process, rendered at `/metrics`.
//!
//! Label values are route templates, model and client names and status codes:
//! never a key, a URL or anything a client can make unbounded (model names
//! are only recorded once they resolved to a configured model).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

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
            RECORDING.store(true, Ordering::Release);
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

/// Tells the recorder every metric's help text (and unit), once, when it is
/// installed: before any is recorded, whatever the start-up order.
fn describe() {
    for metric in ALL {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => {
                metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help);
            }
        }
    }
}

/// What a metric is to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// In seconds, with [`LATENCY_BUCKETS`].
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric Iris records: its name, kind, label names and help text. Every
/// one is in [`ALL`]; code records them by these constants' names, and
/// `docs/metrics.md` is checked against the list.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl Metric {
    /// The counter with these label values.
    pub fn counter(&self, labels: &[(&'static str, &str)]) -> metrics::Counter {
        self.check(Kind::Counter, labels);
        match self.handle(labels, || {
            Handle::Counter(metrics::counter!(self.name, label_set(labels)))
        }) {
            Handle::Counter(counter) => counter,
            _ => metrics::Counter::noop(),
        }
    }

    /// The gauge with these label values.
    pub fn gauge(&self, labels: &[(&'static str, &str)]) -> metrics::Gauge {
        self.check(Kind::Gauge, labels);
        match self.handle(labels, || {
            Handle::Gauge(metrics::gauge!(self.name, label_set(labels)))
        }) {
            Handle::Gauge(gauge) => gauge,
            _ => metrics::Gauge::noop(),
        }
    }

    /// The histogram with these label values.
    pub fn histogram(&self, labels: &[(&'static str, &str)]) -> metrics::Histogram {
        self.check(Kind::Histogram, labels);
        match self.handle(labels, || {
            Handle::Histogram(metrics::histogram!(self.name, label_set(labels)))
        }) {
            Handle::Histogram(histogram) => histogram,
            _ => metrics::Histogram::noop(),
        }
    }

    /// The handle for these label values: this thread's, made by `make`
    /// the first time. Making one builds the labels as owned strings and
    /// looks them up in the recorder's registry; every request records the
    /// same few label sets again, so the handle is kept instead. Before the
    /// recorder is installed, handles are made and not kept (they would
    /// record nowhere for good).
    fn handle(&self, labels: &[(&'static str, &str)], make: impl FnOnce() -> Handle) -> Handle {
        if !RECORDING.load(Ordering::Acquire) {
            return make();
        }
        // foldhash, not the standard SipHash: a request records a handful
        // of metrics, and SipHash made their lookups a few thousand
        // instructions a request. The values are configured names and
        // routes, not a client's text, so a flooding attack has no hold.
        let mut hasher = HANDLE_HASH.build_hasher();
        self.name.hash(&mut hasher);
        for (_, value) in labels {
            value.hash(&mut hasher);
        }
        let hash = hasher.finish();
        HANDLES.with_borrow_mut(|handles| {
            let same = |kept: &&Kept| {
                kept.name == self.name
                    && kept.values.len() == labels.len()
                    && kept.values.iter().zip(labels).all(|(v, (_, l))| **v == **l)
            };
            if let Some(kept) = handles.get(&hash).and_then(|kept| kept.iter().find(same)) {
                return kept.handle.clone();
            }
            // Label values are bounded (routes, configured names, status
            // codes), but managed clients come and go: a thread keeps at
            // most this many before it starts over.
            if handles.len() >= MAX_KEPT_HANDLES {
                handles.clear();
            }
            let handle = make();
            handles.entry(hash).or_default().push(Kept {
                name: self.name,
                values: labels.iter().map(|(_, v)| Box::from(*v)).collect(),
                handle: handle.clone(),
            });
            handle
        })
    }

    /// In debug builds (and so in every test that records it), a call site
    /// that records the metric as another kind or with other labels than
    /// the table's fails.
    fn check(&self, kind: Kind, labels: &[(&'static str, &str)]) {
        debug_assert!(
            self.kind == kind
                && labels.len() == self.labels.len()
                && labels.iter().zip(self.labels).all(|((k, _), l)| k == l),
            "{} is a {} with the labels {:?}; recorded as a {} with {:?}",
            self.name,
            self.kind.as_str(),
            self.labels,
            kind.as_str(),
            labels.iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
    }
}

/// Set once the process's recorder is installed.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Handles a thread keeps at most ([`Metric::handle`]).
const MAX_KEPT_HANDLES: usize = 4096;

/// Hashes a metric's name and label values for [`HANDLES`].
const HANDLE_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x1415);

thread_local! {
    /// This thread's handles, by a hash of the metric's name and label values.
    static HANDLES: RefCell<HashMap<u64, Vec<Kept>, foldhash::fast::FixedState>> =
        const { RefCell::new(HashMap::with_hasher(HANDLE_HASH)) };
}

/// A handle kept, with what it was made for.
struct Kept {
    name: &'static str,
    values: Box<[Box<str>]>,
    handle: Handle,
}

#[derive(Clone)]
enum Handle {
    Counter(metrics::Counter),
    Gauge(metrics::Gauge),
    Histogram(metrics::Histogram),
}

fn label_set(labels: &[(&'static str, &str)]) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|(key, value)| metrics::Label::new(*key, (*value).to_owned()))
        .collect()
}

macro_rules! metrics_table {
    ($($constant:ident: $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)+) => {
        $(pub const $constant: Metric = Metric {
            name: $name,
            kind: Kind::$kind,
            labels: &[$($label),*],
            help: $help,
        };)+

        /// Every metric, in the order of `docs/metrics.md`.
        pub const ALL: &[Metric] = &[$($constant),+];
    };
}

metrics_table! {
    REQUESTS: "iris_requests_total", Counter, ["route", "model", "client", "status"],
        "Requests answered, on every route, errors included, by route, model, client and status.";
    REQUEST_DURATION: "iris_request_duration_seconds", Histogram, ["route"],
        "Time from receiving a request to its response head, by route.";
    UPSTREAM_DURATION: "iris_upstream_duration_seconds", Histogram, ["upstream"],
        "Time from sending a request (chat completion or embeddings) upstream to the upstream's response head, by upstream.";
    UPSTREAM_ATTEMPTS: "iris_upstream_attempts_total", Counter, ["upstream", "outcome"],
        "Attempts sent to an upstream, by how they ended: ok, connect, timeout, invalid, or the upstream's error status.";
    UPSTREAM_COOLDOWNS: "iris_upstream_cooldowns_total", Counter, ["upstream", "reason"],
        "Cooldowns started by this instance, by upstream and reason (failures, rate_limited, auth).";
    UPSTREAM_COOLING: "iris_upstream_cooling", Gauge, ["upstream", "model"],
        "1 while the deployment (upstream, and the model's name there) is cooling down as this instance sees it, else 0.";
    UPSTREAM_QUEUE_LENGTH: "iris_upstream_queue_length", Gauge, ["model"],
        "Requests waiting for upstream room, by model.";
    UPSTREAM_QUEUE_WAIT: "iris_upstream_queue_wait_seconds", Histogram, ["model"],
        "How long requests that waited for upstream room waited before they got it, by model.";
    CONFIG_RELOADS: "iris_config_reloads_total", Counter, ["result"],
        "Config reloads (SIGHUP, POST /admin/reload) by result: ok, invalid, restart_required.";
    TOKENS: "iris_tokens_total", Counter, ["client", "model", "kind"],
        "Tokens charged to budgets, by client, model and kind (prompt or completion): the upstream's reported usage, else Iris's estimate.";
    BUDGET_REJECTIONS: "iris_budget_rejections_total", Counter, ["client", "reason"],
        "Requests refused by a budget, by client and reason (the window that refused, or store_unavailable).";
    BUDGET_STORE_FALLBACK: "iris_budget_store_fallback_total", Counter, ["client"],
        "Requests decided by this instance's local count because the budget store did not answer (on_unavailable = \"allow\"), by client.";
    UPSTREAM_PACING_FALLBACK: "iris_upstream_pacing_fallback_total", Counter, ["upstream"],
        "Upstream pacing reservations decided by this instance's local count because the budget store did not answer (on_unavailable = \"allow\"), by upstream.";
    ALERTS: "iris_alerts_total", Counter, ["result"],
        "Budget alerts by outcome: delivered, retried (an attempt failed, another follows), failed (given up), dropped (the queue was full), claimed_elsewhere (another instance or an earlier run sent it).";
    SPEND_LOG_WRITTEN: "iris_spend_log_written_total", Counter, [],
        "Spend-log records written to the database (with PostgreSQL: acknowledged by it, out of the spool).";
    SPEND_LOG_DROPPED: "iris_spend_log_dropped_total", Counter, ["reason"],
        "Spend-log records lost, by reason: queue_full, spool_full, sink_failed, stopped.";
    SPEND_LOG_WRITE_FAILURES: "iris_spend_log_write_failures_total", Counter, [],
        "Attempts to write a spend-log batch that failed.";
    SPEND_SPOOL_RECORDS: "iris_spend_spool_records", Gauge, [],
        "Spend-log records in the local spool, waiting for PostgreSQL.";
    CACHE_HITS: "iris_cache_hits_total", Counter, ["model"],
        "Chat completions of a cache-enabled model answered from the response cache, by model.";
    CACHE_MISSES: "iris_cache_misses_total", Counter, ["model"],
        "Chat completions of a cache-enabled model not answered from the response cache (nothing stored, the backend failed, or Cache-Control skipped the lookup), by model.";
    CACHE_BYTES: "iris_cache_bytes", Gauge, [],
        "Bytes the in-memory response cache holds now: its entries, their keys and their bookkeeping.";
    CACHE_EVICTIONS: "iris_cache_evictions_total", Counter, [],
        "Entries the in-memory response cache dropped to stay within cache.max_bytes.";
    IMAGE_FETCHES: "iris_image_fetches_total", Counter, ["result"],
        "Image URLs fetched, by result: ok, or the error code.";
    IMAGE_FETCHED_BYTES: "iris_image_fetched_bytes_total", Counter, [],
        "Bytes of image bodies fetched successfully.";
    IMAGE_FETCH_DURATION: "iris_image_fetch_duration_seconds", Histogram, [],
        "Time to fetch one image URL, redirects included, whether it succeeded or not.";
    IMAGE_CACHE: "iris_image_cache_total", Counter, ["layer", "outcome"],
        "Image cache lookups, by layer (fetched, rendered) and outcome (hit, miss).";
    IMAGE_DECODES: "iris_image_decodes_total", Counter, ["purpose"],
        "Images decoded, by purpose: check (an image forwarded as it is, its pixel data proven once) or convert (decoded to be converted, which proves it too).";
    IMAGE_CONVERSIONS: "iris_image_conversions_total", Counter, ["from", "to", "reason"],
        "Images re-encoded for an upstream, by source and target format and reason.";
    IMAGE_REFUSALS: "iris_image_refusals_total", Counter, ["code", "reason"],
        "Images that failed a request (the request got a 400), by error code and reason.";
    IMAGE_DECODE_RESERVED: "iris_image_decode_reserved_bytes", Gauge, [],
        "Bytes of images.max_decode_bytes held now by running image decodes, conversions and downscales.";
    IMAGE_DECODE_WAITING: "iris_image_decode_waiting", Gauge, [],
        "Image jobs waiting now for room in images.max_decode_bytes.";
    IMAGE_DECODE_WAITS: "iris_image_decode_waits_total", Counter, [],
        "Image jobs that had to wait for room in images.max_decode_bytes.";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept handles record into their own series: same values under two
    /// metrics, and one value apart under one metric, never share one;
    /// the thread's cache starting over loses nothing.
    #[test]
    fn kept_handles_record_into_their_own_series() {
        let metrics = Metrics::install();
        let labels = |client| [("client", client), ("reason", "kept_test")];
        for _ in 0..3 {
            BUDGET_REJECTIONS.counter(&labels("kept-a")).increment(1);
            BUDGET_REJECTIONS.counter(&labels("kept-b")).increment(10);
            UPSTREAM_COOLDOWNS
                .counter(&[("upstream", "kept-a"), ("reason", "kept_test")])
                .increment(100);
        }
        HANDLES.with_borrow_mut(HashMap::clear);
        BUDGET_REJECTIONS.counter(&labels("kept-a")).increment(1);
        let text = metrics.render();
        for line in [
            r#"iris_budget_rejections_total{client="kept-a",reason="kept_test"} 4"#,
            r#"iris_budget_rejections_total{client="kept-b",reason="kept_test"} 30"#,
            r#"iris_upstream_cooldowns_total{upstream="kept-a",reason="kept_test"} 300"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn every_metric_is_named_once_and_described() {
        let mut seen = std::collections::HashSet::new();
        for metric in ALL {
            assert!(seen.insert(metric.name), "{} twice", metric.name);
            assert!(metric.name.starts_with("iris_"), "{}", metric.name);
            assert!(!metric.help.is_empty(), "{}", metric.name);
            assert_eq!(
                metric.kind == Kind::Histogram,
                metric.name.ends_with("_seconds"),
                "histograms, and only they, are in seconds: {}",
                metric.name
            );
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "{}",
                metric.name
            );
        }
    }
}
