//! A mock OpenAI-compatible upstream: answers chat completions (plain or
//! streamed) and records every request it receives.
//!
//! Shared by the integration tests, the quickstart example and the load
//! benchmark. Tests steer it with request headers, which Iris forwards:
//! - `x-mock-status: N` answers N with an OpenAI-shaped error body;
//! - `x-mock-delay-ms: N` waits before the response head;
//! - `x-mock-chunks: N` streams N content chunks (default 3);
//! - `x-mock-chunk-delay-ms: N` waits between streamed chunks;
//! - `x-mock-no-usage: 1` reports no usage at all;
//! - `x-mock-plain: 1` answers a plain JSON body even to `stream: true`;
//! - `x-mock-echo: 1` answers (not streamed) with the request body it
//!   received as the message content, so a test that only sees responses
//!   (the SDK suite, driving the example) can check what Iris forwarded.
//!
//! `GET /mock/stats` answers `{"chat_requests": N}`, every chat completion
//! request received so far (counted even with bodies not kept), so such a
//! test can tell whether a request reached the upstream.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Clone)]
pub struct MockState {
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Off for long-running use (the example, the benchmark).
    record: Arc<AtomicBool>,
    /// Streams that ended because the reader went away.
    pub cancelled_streams: Arc<Mutex<u32>>,
    /// Chat completion requests received, recorded or not.
    pub chat_requests: Arc<AtomicU64>,
}

impl Default for MockState {
    fn default() -> Self {
        Self {
            received: Arc::default(),
            record: Arc::new(AtomicBool::new(true)),
            cancelled_streams: Arc::default(),
            chat_requests: Arc::default(),
        }
    }
}

impl MockState {
    pub fn keep_bodies(&self, keep: bool) {
        self.record.store(keep, Ordering::Relaxed);
    }
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: MockState,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0` (or `listen`), serving until the runtime stops.
    pub async fn start_on(listen: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = MockState::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/mock/stats", get(stats))
            .with_state(state.clone());
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state })
    }

    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("mock upstream: {e}"))
    }

    /// `http://addr/v1`, for an upstream's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn last(&self) -> Received {
        self.received()
            .pop()
            .unwrap_or_else(|| panic!("the mock upstream received nothing"))
    }

    pub fn cancelled_streams(&self) -> u32 {
        self.state.cancelled_streams.lock().map(|c| *c).unwrap_or(0)
    }
}

fn header_num(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn stats(State(state): State<MockState>) -> Response {
    let body = serde_json::json!({"chat_requests": state.chat_requests.load(Ordering::SeqCst)});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn chat(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    state.chat_requests.fetch_add(1, Ordering::SeqCst);
    let record = state.record.load(Ordering::Relaxed);
    if let (true, Ok(mut received)) = (record, state.received.lock()) {
        received.push(Received {
            headers: headers.clone(),
            body: body.clone(),
        });
    }
    if let Some(ms) = header_num(&headers, "x-mock-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = header_num(&headers, "x-mock-status") {
        let status =
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"error": {"message": "mock upstream error", "type": "upstream_error", "param": null, "code": "mock_error"}});
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt_tokens = (body.len() / 4) as u64;
    let with_usage = headers.get("x-mock-no-usage").is_none();

    let plain = headers.get("x-mock-plain").is_some();
    if plain || request["stream"].as_bool() != Some(true) {
        let content = if headers.get("x-mock-echo").is_some() {
            String::from_utf8_lossy(&body).into_owned()
        } else {
            "Hello from the mock upstream.".to_owned()
        };
        let mut answer = serde_json::json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
        if with_usage {
            answer["usage"] = serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7});
        }
        return (
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response();
    }

    let chunks = header_num(&headers, "x-mock-chunks").unwrap_or(3);
    let delay = Duration::from_millis(header_num(&headers, "x-mock-chunk-delay-ms").unwrap_or(0));
    let include_usage =
        with_usage && request["stream_options"]["include_usage"].as_bool() == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let cancelled = Arc::clone(&state.cancelled_streams);
    tokio::spawn(async move {
        let event = |value: serde_json::Value| Ok(Bytes::from(format!("data: {value}\n\n")));
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut sent = vec![event(chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        ))];
        for i in 0..chunks {
            sent.push(event(chunk(
                serde_json::json!({"content": format!("word{i} ")}),
                None,
            )));
        }
        sent.push(event(chunk(serde_json::json!({}), Some("stop"))));
        if include_usage {
            sent.push(event(serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks}})));
        }
        sent.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        for (i, item) in sent.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(item).await.is_err() {
                if let Ok(mut n) = cancelled.lock() {
                    *n += 1;
                }
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header("x-ratelimit-remaining-tokens", "999")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
