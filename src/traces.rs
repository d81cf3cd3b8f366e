//! OpenTelemetry traces. With `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, Iris's `tracing` spans become
//! OpenTelemetry spans and are exported over OTLP/HTTP (protobuf), batched
//! on the SDK's own thread:
//!
//! - `request` (kind server, named `{method} {route}`): one per request,
//!   continuing the client's W3C `traceparent`, with the HTTP attributes,
//!   `iris.client`, and for chat completions OpenTelemetry's GenAI
//!   attributes (`gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...);
//! - its children `budget.reserve`, `image.fetch` (one per image URL
//!   fetched, naming its host only) and `upstream.attempt` (kind client,
//!   one per attempt), whose context the upstream receives as
//!   `traceparent`, so the upstream's own spans join the trace.
//!
//! What a span carries is chosen here, attribute by attribute: never a key,
//! never message content, never an image's path or query.
//!
//! Without the variable nothing is set up: no exporter, no layer, and the
//! functions below return at once ([`enabled`] is one relaxed atomic load),
//! so the request path pays nothing for them.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

use crate::catalog::Deployment;
use crate::openai::stream::Outcome;
use crate::upstream::Endpoint;

/// Set once the exporter is installed; never unset (shutdown flushes it,
/// and spans after that are dropped by the SDK).
static ON: AtomicBool = AtomicBool::new(false);
/// Kept to flush at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The service name when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` gives one.
const SERVICE_NAME: &str = "iris";

/// Whether spans are exported.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The OTLP endpoint the environment names for traces, if any. Traces are
/// off without one, and off when `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none`, as the specification says.
pub fn configured_endpoint(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
    {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The OpenTelemetry layer for the subscriber, when the environment asks
/// for traces: builds the exporter (it reads the standard variables itself:
/// endpoints, `OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, and the SDK
/// `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES`) and
/// turns [`enabled`] on. `Ok(None)`: traces are off.
pub fn layer<S>() -> Result<Option<impl Layer<S>>, String>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    let env = |name: &str| std::env::var(name).ok();
    let Some(endpoint) = configured_endpoint(&env) else {
        return Ok(None);
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = env(name).filter(|p| p.trim() != "http/protobuf") {
            return Err(format!(
                "{name}={protocol}: Iris exports traces over http/protobuf only (port 4318 on a collector)"
            ));
        }
    }
    // The exporter's HTTP client may speak HTTPS.
    crate::init_tls();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("iris");
    if PROVIDER.set(provider).is_err() {
        return Err("traces are already set up".to_owned());
    }
    ON.store(true, Ordering::Relaxed);
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Busy/idle times would cost two clock reads per poll.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_filter(filter_fn(exported)),
    ))
}

/// What becomes OpenTelemetry data: Iris's own spans, and its warnings and
/// errors as span events. Not its info and debug log lines (the request log
/// line would repeat the span's attributes), nor other crates' spans.
fn exported(metadata: &Metadata<'_>) -> bool {
    let level = if metadata.is_span() {
        Level::INFO
    } else {
        Level::WARN
    };
    metadata.target().starts_with("iris") && *metadata.level() <= level
}

/// The process as the traces' backend shows it: `service.name` from the
/// environment, else `iris`, and Iris's version.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named {
        builder.build()
    } else {
        builder.with_service_name(SERVICE_NAME).build()
    }
}

/// Exports what is still queued, waiting at most `within`. Called once the
/// server has drained; spans ended after it are dropped.
pub async fn shutdown(within: Duration) {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    // The SDK's shutdown blocks until its thread has exported.
    let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
    match tokio::time::timeout(within + Duration::from_millis(100), flush).await {
        Ok(Ok(Ok(()))) => tracing::info!("traces flushed"),
        Ok(Ok(Err(e))) => tracing::warn!("traces not flushed: {e}"),
        Ok(Err(e)) => tracing::warn!("traces not flushed: {e}"),
        Err(_) => tracing::warn!(
            within_ms = within.as_millis() as u64,
            "traces not flushed in time"
        ),
    }
}

/// `make()`'s span when traces are on, else a disabled span (free to enter,
/// record into and drop).
#[inline]
pub fn span(make: impl FnOnce() -> Span) -> Span {
    if enabled() { make() } else { Span::none() }
}

/// The current span when traces are on (the request's, in a handler), for
/// work that outlives the handler: the response body.
#[inline]
pub fn current() -> Span {
    span(Span::current)
}

// --- the request span -------------------------------------------------------

/// The request's span when traces are on: named and kinded for OpenTelemetry,
/// the child of the client's `traceparent` if it sent one. Attributes go
/// straight to OpenTelemetry, not into `tracing` fields, so the log lines
/// of a request stay as they are.
pub fn request_span<B>(request: &http::Request<B>, route: Option<&str>, request_id: &str) -> Span {
    let method = request.method().as_str();
    // HTTP semantic conventions: `{method} {route}`, the method alone
    // where no route matched (the path would make names unbounded).
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let span = tracing::info_span!(
        "request",
        request_id,
        otel.name = name,
        otel.kind = "server"
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    // Fails only where the layer is absent, and then there is nothing to set.
    let _ = span.set_parent(parent);
    span.set_attribute("http.request.method", method.to_owned());
    if let Some(route) = route {
        span.set_attribute("http.route", route.to_owned());
    }
    span
}

/// What the request's edge learned, on its span: the status (5xx marks the
/// span failed), the error code Iris answered with, the client, and for a
/// chat completion the upstream that answered and how many attempts it took.
pub fn record_response(
    status: u16,
    error_code: Option<&str>,
    client: &str,
    attempts: u32,
    upstream: Option<&str>,
) {
    if !enabled() {
        return;
    }
    let span = Span::current();
    span.set_attribute("http.response.status_code", i64::from(status));
    if let Some(code) = error_code {
        span.set_attribute("error.type", code.to_owned());
    }
    if status >= 500 {
        if error_code.is_none() {
            span.set_attribute("error.type", status.to_string());
        }
        span.set_status(Status::error(""));
    }
    if !client.is_empty() {
        span.set_attribute("iris.client", client.to_owned());
    }
    if attempts > 0 {
        span.set_attribute("iris.attempts", i64::from(attempts));
    }
    if let Some(upstream) = upstream {
        span.set_attribute("iris.upstream", upstream.to_owned());
    }
}

/// A chat completion's request, on the request span: GenAI's operation, the
/// model (Iris's name for it) and the completion cap.
pub fn record_operation(api: crate::openai::Api, model: &str, max_tokens: Option<u64>) {
    if !enabled() {
        return;
    }
    let span = Span::current();
    // The GenAI conventions' operation names are the spend log's endpoints.
    span.set_attribute("gen_ai.operation.name", api.as_str());
    span.set_attribute("gen_ai.request.model", model.to_owned());
    if let Some(max) = max_tokens {
        span.set_attribute("gen_ai.request.max_tokens", clamp(max));
    }
}

/// The usage the upstream reported, on the request span, once the
/// response body has ended.
pub fn record_usage(span: &Span, outcome: &Outcome) {
    if span.is_none() {
        return;
    }
    if let Some(usage) = outcome.usage {
        span.set_attribute("gen_ai.usage.input_tokens", clamp(usage.prompt_tokens));
        span.set_attribute("gen_ai.usage.output_tokens", clamp(usage.completion_tokens));
    }
    if !outcome.complete {
        span.set_attribute("iris.response.complete", false);
    }
}

/// OpenTelemetry's integers are signed; `tracing-opentelemetry` records an
/// unsigned value as text, so every count goes through here.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// --- the children -----------------------------------------------------------

/// The budget reservation's span.
pub fn budget_span(estimated_tokens: u64) -> Span {
    span(|| {
        tracing::info_span!(
            "budget.reserve",
            iris.estimated_tokens = clamp(estimated_tokens)
        )
    })
}

/// An image fetch's span: the host only, never the path or query (they can
/// carry signatures and tokens).
pub fn image_fetch_span(url: &str) -> Span {
    span(|| {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_default();
        tracing::info_span!(
            "image.fetch",
            server.address = host,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        )
    })
}

/// One upstream attempt's span: kind client, the upstream's host (not its
/// URL's path), the deployment, and GenAI's model as sent upstream.
pub fn attempt_span(
    api: crate::openai::Api,
    deployment: &Deployment,
    model: &str,
    attempt: u32,
) -> Span {
    span(|| {
        let upstream = &deployment.upstream;
        let (address, port) = match &upstream.endpoint {
            Endpoint::Http { chat_url, .. } => (
                chat_url.host().unwrap_or_default().to_owned(),
                chat_url
                    .port_u16()
                    .or(match chat_url.scheme_str() {
                        Some("https") => Some(443),
                        Some("http") => Some(80),
                        _ => None,
                    })
                    .map(i64::from),
            ),
            Endpoint::Demo => ("demo".to_owned(), None),
        };
        let model = deployment.upstream_model.as_deref().unwrap_or(model);
        tracing::info_span!(
            "upstream.attempt",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            server.address = address,
            server.port = port,
            iris.upstream = %upstream.name,
            iris.deployment = %deployment.key,
            iris.attempt = i64::from(attempt),
            gen_ai.operation.name = api.as_str(),
            gen_ai.request.model = model,
            iris.outcome = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        )
    })
}

/// How an attempt went: `ok`, or its failure's label (`connect`, `timeout`,
/// `invalid`, or the status).
pub fn record_attempt(span: &Span, outcome: &str, status: Option<u16>) {
    if span.is_none() {
        return;
    }
    span.record("iris.outcome", outcome);
    if let Some(status) = status {
        span.record("http.response.status_code", i64::from(status));
    }
    if outcome != "ok" {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", outcome);
    }
}

/// A failed image fetch, on its span: the reason, not the URL.
pub fn record_image_failure(span: &Span, reason: &str) {
    if span.is_none() {
        return;
    }
    span.record("otel.status_code", "ERROR");
    span.record("error.type", reason);
}

/// The current span's context as `traceparent` (and `tracestate`) in an
/// upstream request's headers, replacing any the client sent: the upstream
/// continues Iris's attempt span. Does nothing when traces are off (the
/// client's own `traceparent`, if any, is forwarded as it came).
pub fn inject(headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    let context = Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn traces_are_on_only_with_an_endpoint() {
        assert_eq!(configured_endpoint(&env(&[])), None);
        assert_eq!(
            configured_endpoint(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            None
        );
        assert_eq!(
            configured_endpoint(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])),
            Some("http://c:4318".to_owned())
        );
        assert_eq!(
            configured_endpoint(&env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://t:4318/v1/traces"
                ),
            ])),
            Some("http://t:4318/v1/traces".to_owned()),
            "the traces endpoint wins"
        );
    }

    #[test]
    fn the_standard_switches_turn_traces_off() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(
            configured_endpoint(&env(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")])),
            None
        );
        assert_eq!(
            configured_endpoint(&env(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")])),
            None
        );
        assert!(configured_endpoint(&env(&[endpoint, ("OTEL_SDK_DISABLED", "false")])).is_some());
    }

    #[test]
    fn only_irises_spans_and_warnings_are_exported() {
        use tracing::callsite::Identifier;
        use tracing::metadata::Kind;
        struct Site;
        static SITE: Site = Site;
        impl tracing::callsite::Callsite for Site {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        let meta = |target: &'static str, level: Level, kind: Kind| {
            Metadata::new(
                "m",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], Identifier(&SITE)),
                kind,
            )
        };
        assert!(exported(&meta("iris::gateway", Level::INFO, Kind::SPAN)));
        assert!(!exported(&meta("iris::gateway", Level::DEBUG, Kind::SPAN)));
        assert!(!exported(&meta(
            "tower_http::trace",
            Level::INFO,
            Kind::SPAN
        )));
        assert!(exported(&meta("iris::gateway", Level::WARN, Kind::EVENT)));
        assert!(!exported(&meta(
            "iris::access_log",
            Level::INFO,
            Kind::EVENT
        )));
        assert!(!exported(&meta("hyper", Level::ERROR, Kind::EVENT)));
    }

    #[test]
    fn without_traces_the_helpers_make_disabled_spans() {
        // No test in this binary installs the exporter.
        assert!(!enabled());
        assert!(span(|| tracing::info_span!("x")).is_none());
        assert!(image_fetch_span("https://h/secret?sig=1").is_none());
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        inject(&mut headers);
        assert_eq!(
            headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "the client's traceparent passes as it came"
        );
    }
}
