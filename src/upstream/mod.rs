//! Forwarding to an upstream: its credentials in place of the client's, a
//! shared connection pool, timeouts, and the response streamed straight back.
//!
//! - [`demo`]: the built-in demo upstream, answered in-process

pub mod demo;

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::budget::Limits;
use crate::images::ImagePolicy;

/// An upstream, resolved from the config: everything a request to it needs.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub endpoint: Endpoint,
    /// To the response head, and the longest pause between streamed chunks.
    pub timeout: Duration,
    /// What it accepts of images.
    pub images: ImagePolicy,
    /// Ask for `stream_options.include_usage` so streams settle exactly.
    pub stream_usage: bool,
    /// The provider's fair-usage limits on Iris's key (requests and tokens
    /// per minute, concurrency): Iris reserves and settles against them like
    /// a client's budget, so it paces itself instead of collecting 429s.
    pub pacing: Limits,
}

/// Where an upstream's answers come from.
#[derive(Debug)]
pub enum Endpoint {
    /// An OpenAI-compatible server.
    Http {
        /// `{base_url}/chat/completions`.
        chat_url: http::Uri,
        /// `Bearer {api_key}`, marked sensitive so it never shows in debug output.
        authorization: Option<HeaderValue>,
    },
    /// Iris's built-in demo model, answered in-process (`kind = "demo"`),
    /// so Iris can be tried end to end with no upstream account.
    Demo,
}

/// Why no response came back from an upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("The upstream `{upstream}` could not be reached.")]
    Unreachable { upstream: String },
    #[error("The upstream `{upstream}` did not answer within {} ms.", after.as_millis())]
    Timeout { upstream: String, after: Duration },
    #[error("The upstream `{upstream}` answered with something that is not a chat completion.")]
    Invalid { upstream: String },
}

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

/// An upstream's answer: its head, then its body chunk by chunk.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Chunks,
}

/// A response body as it arrives.
pub type Chunks = BoxStream<'static, Result<Bytes, BodyError>>;
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Reply {
    /// A reply whose body is `body`'s data frames.
    fn from_hyper(response: http::Response<hyper::body::Incoming>) -> Self {
        let (head, body) = response.into_parts();
        Self {
            status: head.status,
            headers: head.headers,
            body: body.into_data_stream().map_err(BodyError::from).boxed(),
        }
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The pooled HTTP client every upstream request goes through: hyper's,
/// HTTP/1.1 or HTTP/2 (ALPN) over rustls with the platform's roots, no
/// redirects, no proxy, TCP_NODELAY.
#[derive(Clone)]
pub struct Forwarder {
    http: HttpsClient,
}

impl Forwarder {
    pub fn new() -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| format!("TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https);
        Ok(Self { http })
    }

    /// Sends a chat completion body upstream and waits for the response
    /// head, at most `timeout` (the upstream's `timeout_ms`, or what is
    /// left of it for a retry). The body is then bounded by the upstream's
    /// timeout between chunks (see [`crate::gateway::relay`]). `trace`: the
    /// attempt's trace context, sent in place of the client's.
    pub async fn send(
        &self,
        upstream: &Upstream,
        body: Bytes,
        client_headers: &HeaderMap,
        trace: HeaderMap,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError> {
        let (chat_url, authorization) = match &upstream.endpoint {
            Endpoint::Http {
                chat_url,
                authorization,
            } => (chat_url, authorization),
            Endpoint::Demo => return Ok(demo::answer(&body)),
        };
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = chat_url.clone();
        let headers = request.headers_mut();
        headers.reserve(client_headers.len() + 3);
        for (name, value) in client_headers {
            if !DROPPED_REQUEST_HEADERS.contains(name) && !name.as_str().starts_with("proxy-") {
                headers.append(name, value.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(authorization) = authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        for (name, value) in trace {
            if let Some(name) = name {
                headers.insert(name, value);
            }
        }

        match tokio::time::timeout(timeout, self.http.request(request)).await {
            Err(_) => Err(timeout_error(upstream, timeout)),
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    "connect error"
                } else {
                    "request error"
                };
                tracing::warn!(upstream = %upstream.name, error = %error_chain(kind, &e), "upstream request failed");
                Err(UpstreamError::Unreachable {
                    upstream: upstream.name.clone(),
                })
            }
            Ok(Ok(response)) => Ok(Reply::from_hyper(response)),
        }
    }
}

fn timeout_error(upstream: &Upstream, after: Duration) -> UpstreamError {
    UpstreamError::Timeout {
        upstream: upstream.name.clone(),
        after,
    }
}

/// `kind`, then the error and its causes on one line, without the URL: the
/// cause is what an operator needs.
pub fn error_chain(kind: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::from(kind);
    let mut source = Some(error);
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
