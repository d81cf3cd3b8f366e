//! Forwarding to an upstream: its credentials in place of the client's, a
//! shared connection pool, timeouts, and the response streamed straight back.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::catalog::Upstream;
use crate::error::ApiError;

/// Request headers never forwarded: the client's credentials, hop-by-hop
/// headers, and those the forwarding client sets itself.
const DROPPED_REQUEST_HEADERS: &[HeaderName] = &[
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::EXPECT,
    // Iris reads responses to account usage, so it asks for them uncompressed.
    header::ACCEPT_ENCODING,
];

/// Response headers not passed back: hop-by-hop ones, a length that may no
/// longer hold once Iris edits a stream, and the upstream's own rate-limit
/// headers, which describe Iris's upstream account rather than the client.
fn dropped_response_header(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONNECTION
            | header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::TRAILER
            | header::UPGRADE
            | header::PROXY_AUTHENTICATE
    ) || name.as_str() == "keep-alive"
        || name.as_str().starts_with("x-ratelimit-")
}

/// The pooled HTTP client every upstream request goes through.
#[derive(Clone)]
pub struct Forwarder {
    http: reqwest::Client,
}

impl Forwarder {
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Self { http })
    }

    /// Sends a chat completion body upstream and waits for the response head.
    ///
    /// The time to the head is bounded by the upstream's `timeout_ms`; the
    /// body is then bounded by the same time between chunks (see [`Relay`]).
    pub async fn send(
        &self,
        upstream: &Upstream,
        body: bytes::Bytes,
        client_headers: &HeaderMap,
    ) -> Result<reqwest::Response, ApiError> {
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 2);
        for (name, value) in client_headers {
            if !DROPPED_REQUEST_HEADERS.contains(name) && !name.as_str().starts_with("proxy-") {
                headers.append(name, value.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(authorization) = &upstream.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }

        let request = self
            .http
            .post(upstream.chat_url.clone())
            .headers(headers)
            .body(body)
            .send();
        match tokio::time::timeout(upstream.timeout, request).await {
            Err(_) => Err(timeout_error(upstream)),
            Ok(Err(e)) if e.is_timeout() => Err(timeout_error(upstream)),
            Ok(Err(e)) => {
                tracing::warn!(upstream = %upstream.name, error = %error_chain(&e), "upstream request failed");
                Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    format!("The upstream `{}` could not be reached.", upstream.name),
                ))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }
}

fn timeout_error(upstream: &Upstream) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        format!(
            "The upstream `{}` did not answer within {} ms.",
            upstream.name,
            upstream.timeout.as_millis()
        ),
    )
}

/// The error's kind and causes on one line, without the URL: the cause is
/// what an operator needs.
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = String::from(if error.is_connect() {
        "connect error"
    } else if error.is_body() {
        "body error"
    } else {
        "request error"
    });
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The response headers to send the client, from the upstream's.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !dropped_response_header(name) {
            headers.append(name, value.clone());
        }
    }
    headers
}

/// What a relayed response body reports when it ends.
pub trait RelayObserver: Send + 'static {
    /// Each chunk, before it goes to the client; may edit it (e.g. drop a usage-only event).
    fn on_chunk(&mut self, chunk: Bytes) -> Bytes;
    /// Called once: the body finished (`complete`), failed, or the client
    /// went away. Returns bytes still to send, if the body finished.
    fn on_end(&mut self, complete: bool) -> Option<Bytes>;
}

/// An upstream body on its way to the client, chunk by chunk as it arrives:
/// never collected. Dropping it (the client hung up) drops the upstream
/// response, which cancels the upstream request.
pub struct Relay<S, O: RelayObserver> {
    inner: S,
    observer: Option<O>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S, O: RelayObserver> Relay<S, O> {
    /// `idle` bounds the wait for each chunk.
    pub fn new(inner: S, observer: O, idle: Duration) -> Self {
        Self {
            inner,
            observer: Some(observer),
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn finish(&mut self, complete: bool) -> Option<Bytes> {
        self.observer
            .take()
            .and_then(|mut observer| observer.on_end(complete))
    }
}

impl<S, O> Stream for Relay<S, O>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
    O: RelayObserver + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.observer.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let idle = this.idle;
                this.deadline.as_mut().reset(Instant::now() + idle);
                let chunk = match this.observer.as_mut() {
                    Some(observer) => observer.on_chunk(chunk),
                    None => chunk,
                };
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                tracing::warn!(error = %error_chain(&e), "upstream body failed");
                Poll::Ready(Some(Err(std::io::Error::other("upstream body failed"))))
            }
            Poll::Ready(None) => match this.finish(true) {
                Some(unsent) => Poll::Ready(Some(Ok(unsent))),
                None => Poll::Ready(None),
            },
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.finish(false);
                    tracing::warn!("upstream body stalled past the upstream timeout");
                    Poll::Ready(Some(Err(std::io::Error::other("upstream body stalled"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S, O: RelayObserver> Drop for Relay<S, O> {
    fn drop(&mut self) {
        // The client hung up before the end: still account what was relayed.
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_rate_limit_and_hop_headers_are_not_passed_back() {
        let mut upstream = HeaderMap::new();
        upstream.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("5"),
        );
        upstream.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        upstream.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        upstream.insert("openai-processing-ms", HeaderValue::from_static("12"));
        let headers = response_headers(&upstream);
        assert_eq!(headers.len(), 2);
        assert!(headers.contains_key("openai-processing-ms"));
    }
}
