//! OpenTelemetry traces, end to end: `iris serve` runs as a child process
//! (the OTLP variables are process-wide) with its endpoint pointed at a test
//! OTLP/HTTP receiver on port 0 here, which decodes every `POST /v1/traces`
//! protobuf body; the checks read the spans as a tracing backend would:
//! names, kinds, attributes, parents, the client's trace continued and
//! passed upstream, and no key or content anywhere in what was exported.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::json;

use crate::support::image_server::ImageServer;
use crate::support::mock_upstream::Fault;
use crate::support::{KEY_A, MockUpstream, base_config, http, iris_command, write_config};

/// The client's trace: Iris's request span must be its child.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// In the message content: must never reach a span.
const CONTENT: &str = "CONTENT-MARKER-the-secret-plan";
/// In the image URL's query: must never reach a span.
const URL_SECRET: &str = "sig=URL-SECRET-42";

// --- the receiver -------------------------------------------------------------

/// What one export carried.
#[derive(Debug, Clone)]
struct Export {
    headers: HeaderMap,
    request: ExportTraceServiceRequest,
}

/// A test OTLP/HTTP receiver: `POST /v1/traces`, protobuf.
struct Receiver {
    endpoint: String,
    exports: Arc<Mutex<Vec<Export>>>,
}

impl Receiver {
    async fn start() -> Self {
        let exports: Arc<Mutex<Vec<Export>>> = Arc::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(Arc::clone(&exports));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            endpoint: format!("http://{addr}"),
            exports,
        }
    }

    fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    fn spans(&self) -> Vec<Span> {
        self.exports()
            .into_iter()
            .flat_map(|export| export.request.resource_spans)
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans)
            .collect()
    }

    /// Waits until `done` holds for the spans received (the batch goes out
    /// every 50 ms in these tests).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after 15 s; spans so far: {:#?}",
                names(&spans)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(
    State(exports): State<Arc<Mutex<Vec<Export>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    exports.lock().unwrap().push(Export { headers, request });
    ExportTraceServiceResponse::default().encode_to_vec()
}

// --- reading spans --------------------------------------------------------------

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    find(&span.attributes, key)
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{}: {key} is {other:?}, not a string", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{}: {key} is {other:?}, not an integer", span.name),
    }
}

fn the<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {:?}", names(spans));
    found[0]
}

fn children<'a>(spans: &'a [Span], parent: &Span, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent.span_id)
        .collect()
}

// --- the server ---------------------------------------------------------------

/// A running `iris serve`, killed if the test ends first.
struct Served {
    child: Option<Child>,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Served {
    /// `iris serve` with `config` and `env` (the OTLP variables of the
    /// test's own environment removed first).
    fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut command = iris_command();
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("IRIS_LOG_FORMAT", "json")
            .env("IRIS_LOG", "info")
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("spawn iris");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("iris starts");
            let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
            if json["message"] == "iris is serving" {
                break json["listen"].as_str().expect("listen").to_owned();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in rx {});
        Self {
            child: Some(child),
            addr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM, and the exit code.
    async fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
            .code()
    }
}

/// `base_config` whose upstream inlines images, from the image host on
/// 127.0.0.2 only.
fn config(upstream: &MockUpstream) -> tempfile::NamedTempFile {
    let text = base_config(
        &upstream.base_url(),
        "\n[images]\nallowed_networks = [\"127.0.0.2/32\"]\n",
    )
    .replacen(
        "timeout_ms = 2000\n",
        "timeout_ms = 2000\ninline_images = true\n",
        1,
    );
    write_config(&text)
}

fn tiny_png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(4, 4)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --- the tests ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_is_one_trace_continued_from_the_client_and_passed_upstream() {
    let receiver = Receiver::start().await;
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start("127.0.0.2").await;
    host.add("cat.png", "image/png", tiny_png());
    let file = config(&upstream);
    let iris = Served::start(
        file.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=t0ken"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );

    let image_url = host.url(&format!("/files/cat.png?{URL_SECRET}"));
    let body = json!({
        "model": "test-model",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": CONTENT},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}],
    });
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("tracestate", "vendor=opaque")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();

    let spans = receiver
        .wait_for("request span with its usage", |spans| {
            spans.iter().any(|s| {
                s.name == "POST /v1/chat/completions"
                    && attr(s, "gen_ai.usage.input_tokens").is_some()
            })
        })
        .await;

    // The request span: a server span in the client's trace, under its span.
    let request = the(&spans, "POST /v1/chat/completions");
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), PARENT_ID);
    assert_eq!(text(request, "http.request.method"), "POST");
    assert_eq!(text(request, "http.route"), "/v1/chat/completions");
    assert_eq!(int(request, "http.response.status_code"), 200);
    assert_eq!(text(request, "iris.client"), "a");
    assert_eq!(text(request, "iris.upstream"), "mock");
    assert_eq!(int(request, "iris.attempts"), 1);
    assert_eq!(text(request, "gen_ai.operation.name"), "chat");
    assert_eq!(text(request, "gen_ai.request.model"), "test-model");
    assert_eq!(int(request, "gen_ai.request.max_tokens"), 50);
    // The usage is the upstream's, as it reported it.
    assert_eq!(
        int(request, "gen_ai.usage.input_tokens"),
        answer["usage"]["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        int(request, "gen_ai.usage.output_tokens"),
        answer["usage"]["completion_tokens"].as_i64().unwrap()
    );

    // Its children: the budget, the image fetch, the one attempt.
    let budget = children(&spans, request, "budget.reserve");
    assert_eq!(budget.len(), 1, "{:?}", names(&spans));
    assert!(int(budget[0], "iris.estimated_tokens") > 50);
    let fetch = children(&spans, request, "image.fetch");
    assert_eq!(fetch.len(), 1, "{:?}", names(&spans));
    assert_eq!(text(fetch[0], "server.address"), "127.0.0.2");
    let attempts = children(&spans, request, "upstream.attempt");
    assert_eq!(attempts.len(), 1, "{:?}", names(&spans));
    let attempt = attempts[0];
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(text(attempt, "server.address"), "127.0.0.1");
    assert_eq!(int(attempt, "server.port"), i64::from(upstream.addr.port()));
    assert_eq!(text(attempt, "iris.deployment"), "mock/upstream-model");
    assert_eq!(text(attempt, "iris.outcome"), "ok");
    assert_eq!(int(attempt, "http.response.status_code"), 200);
    assert_eq!(text(attempt, "gen_ai.request.model"), "upstream-model");
    for span in [budget[0], fetch[0], attempt] {
        assert_eq!(
            span.trace_id, request.trace_id,
            "{} in the trace",
            span.name
        );
    }

    // The upstream continues the attempt's span, in the client's trace.
    let sent = upstream.last();
    assert_eq!(
        sent.headers["traceparent"],
        format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id)).as_str()
    );
    assert_eq!(sent.headers["tracestate"], "vendor=opaque");

    // The process, as the backend names it; the exporter's headers.
    let exports = receiver.exports();
    let resource = exports[0].request.resource_spans[0]
        .resource
        .as_ref()
        .unwrap();
    assert!(matches!(
        find(&resource.attributes, "service.name"),
        Some(Value::StringValue(name)) if name == "iris"
    ));
    assert!(
        exports
            .iter()
            .all(|e| e.headers["x-collector-token"] == "t0ken")
    );

    // Nothing secret in anything exported: keys, content, the image's path.
    let everything = format!("{exports:?}");
    for secret in [KEY_A, "upstream-secret-key", CONTENT, URL_SECRET, "cat.png"] {
        assert!(
            !everything.contains(secret),
            "{secret:?} was exported: {everything}"
        );
    }
    assert_eq!(iris.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_a_span_and_a_streamed_answer_reports_its_usage() {
    let receiver = Receiver::start().await;
    let upstream = MockUpstream::start().await;
    upstream.fail_next(1, Fault::status(503));
    let file = config(&upstream);
    let iris = Served::start(
        file.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SERVICE_NAME", "iris-test"),
        ],
    );

    // No traceparent: Iris starts the trace.
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("x-mock-chunks", "4")
        .json(&json!({
            "model": "test-model",
            "stream": true,
            "messages": [{"role": "user", "content": CONTENT}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let streamed = response.text().await.unwrap();
    assert!(streamed.contains("[DONE]"));

    let spans = receiver
        .wait_for("a request span with two attempts", |spans| {
            spans.iter().any(|s| {
                s.name == "POST /v1/chat/completions"
                    && attr(s, "gen_ai.usage.output_tokens").is_some()
            })
        })
        .await;
    let request = the(&spans, "POST /v1/chat/completions");
    assert!(request.parent_span_id.is_empty(), "a root span");
    assert_eq!(int(request, "iris.attempts"), 2);
    // The mock streams one token per chunk, and reports the usage last.
    assert_eq!(int(request, "gen_ai.usage.output_tokens"), 4);

    let attempts = children(&spans, request, "upstream.attempt");
    assert_eq!(attempts.len(), 2, "{:?}", names(&spans));
    let (failed, ok): (Vec<&Span>, Vec<&Span>) = attempts
        .iter()
        .partition(|s| text(s, "iris.outcome") != "ok");
    assert_eq!(int(failed[0], "iris.attempt"), 1);
    assert_eq!(text(failed[0], "iris.outcome"), "503");
    assert_eq!(int(failed[0], "http.response.status_code"), 503);
    assert_eq!(text(failed[0], "error.type"), "503");
    assert_eq!(
        failed[0].status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(int(ok[0], "iris.attempt"), 2);
    assert!(failed[0].start_time_unix_nano < ok[0].start_time_unix_nano);

    // Each upstream request carried its own attempt's context.
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    for (sent, attempt) in received.iter().zip([failed[0], ok[0]]) {
        assert_eq!(
            sent.headers["traceparent"],
            format!("00-{}-{}-01", hex(&request.trace_id), hex(&attempt.span_id)).as_str()
        );
    }

    let exports = receiver.exports();
    let resource = exports[0].request.resource_spans[0]
        .resource
        .as_ref()
        .unwrap();
    assert!(matches!(
        find(&resource.attributes, "service.name"),
        Some(Value::StringValue(name)) if name == "iris-test"
    ));
    let everything = format!("{exports:?}");
    for secret in [KEY_A, "upstream-secret-key", CONTENT] {
        assert!(!everything.contains(secret), "{secret:?} was exported");
    }
    assert_eq!(iris.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_exported_at_shutdown() {
    let receiver = Receiver::start().await;
    let upstream = MockUpstream::start().await;
    let file = config(&upstream);
    // A batch delay far longer than the test: only the shutdown flush can
    // deliver these spans.
    let iris = Served::start(
        file.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    );
    let client = http();
    let answered = client
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&crate::support::chat_body("test-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let refused = client
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth("wrong-key-do-not-export")
        .json(&crate::support::chat_body("test-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.spans().is_empty(), "nothing before the flush");

    assert_eq!(iris.stop().await, Some(0));
    let spans = receiver.spans();
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "POST /v1/chat/completions")
        .collect();
    assert_eq!(requests.len(), 2, "{:?}", names(&spans));
    let unauthorized = requests
        .iter()
        .find(|s| int(s, "http.response.status_code") == 401)
        .expect("the refused request's span");
    assert_eq!(text(unauthorized, "error.type"), "invalid_api_key");
    assert!(attr(unauthorized, "iris.client").is_none());
    assert!(!format!("{:?}", receiver.exports()).contains("wrong-key-do-not-export"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traces_off_nothing_is_exported_and_the_clients_traceparent_passes_as_it_came() {
    let receiver = Receiver::start().await;
    let upstream = MockUpstream::start().await;
    let file = config(&upstream);
    // An endpoint, but the standard switch says no.
    let iris = Served::start(
        file.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let response = http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("traceparent", &traceparent)
        .json(&crate::support::chat_body("test-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().headers["traceparent"], traceparent.as_str());
    assert_eq!(iris.stop().await, Some(0));
    assert!(receiver.exports().is_empty());
}
