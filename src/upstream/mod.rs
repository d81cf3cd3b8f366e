//! Forwarding to an upstream: its credentials in place of the client's, a
//! shared connection pool (one more per private CA, `upstreams[].ca_file`),
//! timeouts, and the response streamed straight back.
//!
//! - [`demo`]: the built-in demo upstream, answered in-process

mod connector;
pub mod demo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::budget::Limits;
use crate::images::ImagePolicy;
use crate::openai::Api;
use crate::openai::spliced::SplicedBody;
use crate::secret::KeyMask;
use crate::tls::PrivateCa;
use connector::Connector;

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
#[expect(
    clippy::large_enum_variant,
    reason = "one per upstream, built once per config: boxing would only add a pointer hop"
)]
pub enum Endpoint {
    /// An OpenAI-compatible server.
    Http {
        /// `{base_url}/chat/completions`.
        chat_url: http::Uri,
        /// `{base_url}/embeddings`.
        embeddings_url: http::Uri,
        /// `Host` for both: the URLs' authority (the host, and the port
        /// when it is not the scheme's own), as the HTTP client would write
        /// it for each request with `format!`.
        host: HeaderValue,
        /// `Bearer {api_key}`, marked sensitive so it never shows in debug output.
        authorization: Option<HeaderValue>,
        /// `ca_file`: a private CA trusted beside the platform's roots.
        ca: Option<PrivateCa>,
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
    /// It answered 401 or 403: Iris's own credentials for it were refused,
    /// which the client can do nothing about.
    #[error(
        "The upstream `{upstream}` refused the gateway's credentials (HTTP {status}). \
         The gateway's operator must check that upstream's `api_key`."
    )]
    CredentialsRefused { upstream: String, status: u16 },
}

/// Whether an upstream's `status` says it refused Iris's credentials.
pub fn refuses_credentials(status: StatusCode) -> bool {
    matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
}

impl Upstream {
    /// The key Iris sends this upstream, to be masked wherever the upstream
    /// echoes it.
    pub fn api_key(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Http {
                authorization: Some(value),
                ..
            } => value.to_str().ok()?.strip_prefix("Bearer "),
            _ => None,
        }
    }
}

/// Whether a request header is never forwarded, by its name: the client's
/// credentials (for Iris, or for another provider), addresses as the
/// client claims them, instructions to rewrite the request's path or
/// method, hop-by-hop headers, and those the forwarding client sets itself.
/// (A `match` on the name: one length switch, not a scan of a list.)
fn dropped_by_name(name: &str) -> bool {
    matches!(
        name,
        // Credentials: the client's key is for Iris (SDKs and proxies put
        // keys in the next ones; some upstreams read them), and keys for
        // other providers' APIs are not this upstream's to see.
        "authorization"
            | "cookie"
            | "x-api-key"
            | "api-key"
            | "authentication"
            | "x-auth-token"
            | "x-goog-api-key"
            | "ocp-apim-subscription-key"
            | "x-amz-security-token"
            // Iris does not tell upstreams its clients' addresses, and a
            // client's own claims about them are not Iris's to pass on.
            | "forwarded"
            | "x-real-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "true-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "via"
            // The path and method are Iris's: frameworks that honour these
            // would serve another route than the one Iris called.
            | "x-original-url"
            | "x-rewrite-url"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            // Iris sends the body it read, never encoded.
            | "content-encoding"
            // Iris reads responses to account usage, so it asks for them
            // uncompressed.
            | "accept-encoding"
    ) || name.starts_with("proxy-")
        || name.starts_with("x-forwarded-")
}

/// A key shorter than this (the client's presented one, or an upstream's
/// placeholder such as `x` for a server that takes none) is not searched
/// for in headers or bodies: its bytes would turn up in ordinary ones.
pub const MIN_SEARCHED_KEY: usize = 8;

/// Whether the client's request header `name: value` stays with Iris.
/// `hop`: the headers the client's `Connection` names; `key`: the Iris key
/// it presented, dropped from wherever else the client put it (a custom
/// header Iris does not know of).
fn dropped_request_header(
    name: &HeaderName,
    value: &HeaderValue,
    hop: &[HeaderName],
    key: Option<&[u8]>,
) -> bool {
    dropped_by_name(name.as_str())
        || hop.contains(name)
        // A value shorter than the key cannot hold it, and with keys as Iris
        // makes them (69 characters) most are: no search is set up for them.
        || key.is_some_and(|key| {
            value.len() >= key.len() && memchr::memmem::find(value.as_bytes(), key).is_some()
        })
}

/// Response headers not passed back: hop-by-hop ones (those the upstream's
/// `Connection` names too), a length that may no longer hold once Iris
/// edits a stream, the upstream's own rate-limit headers, which describe
/// Iris's upstream account rather than the client, and what belongs to the
/// upstream's own site: its cookies, its server's name, its other
/// protocols' addresses.
fn dropped_response_header(name: &HeaderName, hop: &[HeaderName]) -> bool {
    matches!(
        *name,
        header::CONNECTION
            | header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::TRAILER
            | header::UPGRADE
            | header::PROXY_AUTHENTICATE
            | header::SET_COOKIE
            | header::SERVER
            | header::ALT_SVC
    ) || matches!(name.as_str(), "keep-alive" | "set-cookie2")
        || name.as_str().starts_with("x-ratelimit-")
        || hop.contains(name)
}

/// The header names listed in `headers`' `Connection` values (RFC 9110
/// 7.6.1: hop-by-hop for this connection only).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// An upstream's answer: its head, then its body chunk by chunk.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Chunks,
    /// The body's length, when the upstream declared it (`Content-Length`).
    pub length: Option<u64>,
}

/// A response body as it arrives.
pub type Chunks = BoxStream<'static, Result<Bytes, BodyError>>;
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Reply {
    /// The first `limit` bytes of the body at most, read for at most
    /// `wait`; and whether there may be more (the read stopped at the limit
    /// or the wait, not at the body's end or a failure).
    pub async fn body_start(mut self, limit: usize, wait: Duration) -> (Vec<u8>, bool) {
        let mut start = Vec::new();
        let read = tokio::time::timeout(wait, async {
            while start.len() < limit {
                match self.body.next().await {
                    Some(Ok(chunk)) => {
                        let room = limit - start.len();
                        start.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    Some(Err(_)) | None => return true,
                }
            }
            false
        })
        .await;
        let ended = read.unwrap_or(false);
        (start, !ended)
    }

    /// A reply whose body is `body`'s data frames.
    fn from_hyper(response: http::Response<hyper::body::Incoming>) -> Self {
        let (head, body) = response.into_parts();
        Self {
            status: head.status,
            headers: head.headers,
            length: http_body::Body::size_hint(&body).exact(),
            body: body.into_data_stream().map_err(BodyError::from).boxed(),
        }
    }
}

type HttpsClient = Client<Connector, SplicedBody>;

/// The pooled HTTP client every upstream request goes through: hyper's,
/// HTTP/1.1 or HTTP/2 (ALPN) over rustls with the platform's roots, no
/// redirects, no proxy, TCP_NODELAY. An upstream with a private CA goes
/// through a client of its CA set's own (a pool cannot mix trust roots).
#[derive(Clone)]
pub struct Forwarder {
    http: HttpsClient,
    /// One client per distinct CA set ([`PrivateCa::id`]), made on first
    /// use and kept, so its pool outlives a reload that keeps the CA.
    private: Arc<Mutex<HashMap<[u8; 32], HttpsClient>>>,
}

impl Forwarder {
    pub fn new() -> Result<Self, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(Self {
            http: pooled(https),
            private: Arc::default(),
        })
    }

    /// The client for an upstream trusting `ca` too, made if it is the
    /// first request to trust it.
    fn client_for(&self, ca: &PrivateCa) -> Result<HttpsClient, String> {
        let mut clients = self.private.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&ca.id()) {
            return Ok(client.clone());
        }
        let tls = crate::tls::verified(Some(ca))?;
        let client = pooled(hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls));
        clients.insert(ca.id(), client.clone());
        Ok(client)
    }

    /// Sends a request body of `api` upstream and waits for the response
    /// head, at most `timeout` (the upstream's `timeout_ms`, or what is
    /// left of it for a retry). The body is then bounded by the upstream's
    /// timeout between chunks (see [`crate::gateway::relay`]). `trace`: the
    /// attempt's trace context, sent in place of the client's.
    pub async fn send(
        &self,
        upstream: &Upstream,
        api: Api,
        body: SplicedBody,
        client_headers: &HeaderMap,
        trace: HeaderMap,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError> {
        let (url, host, authorization, ca) = match &upstream.endpoint {
            Endpoint::Http {
                chat_url,
                embeddings_url,
                host,
                authorization,
                ca,
            } => match api {
                Api::Chat => (chat_url, host, authorization, ca),
                Api::Embeddings => (embeddings_url, host, authorization, ca),
            },
            Endpoint::Demo => return Ok(demo::answer(api, &body.to_bytes())),
        };
        let private;
        let http = match ca {
            None => &self.http,
            Some(ca) => match self.client_for(ca) {
                Ok(client) => {
                    private = client;
                    &private
                }
                Err(e) => {
                    tracing::warn!(upstream = %upstream.name, error = %e, "upstream TLS client could not be made");
                    return Err(UpstreamError::Unreachable {
                        upstream: upstream.name.clone(),
                    });
                }
            },
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = url.clone();
        let headers = request.headers_mut();
        headers.reserve(client_headers.len() + 4);
        let hop = connection_named(client_headers);
        // Found only after authentication: the client's own, valid key.
        let key = crate::keys::bearer_key(client_headers)
            .map(str::as_bytes)
            .filter(|key| key.len() >= MIN_SEARCHED_KEY);
        for (name, value) in client_headers {
            if !dropped_request_header(name, value, &hop, key) {
                headers.append(name, value.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // Over HTTP/2 it repeats `:authority`, as RFC 9113 allows.
        headers.insert(header::HOST, host.clone());
        if let Some(authorization) = authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        for (name, value) in trace {
            if let Some(name) = name {
                headers.insert(name, value);
            }
        }

        match tokio::time::timeout(timeout, http.request(request)).await {
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

/// A pooled client over `https` (HTTP/1.1 and HTTP/2 by ALPN; plain HTTP
/// too), connecting with TCP_NODELAY.
fn pooled(
    https: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> HttpsClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let https = https
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(Connector(https))
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

/// Headers Iris adds to an answer on its way out: the rate-limit headers,
/// the request id, `nosniff` and the `x-iris-*` ones. The map is made with
/// room for them, rather than grown (and its entries moved) twice.
const HEADERS_ADDED: usize = 12;

/// The response headers to send the client, from the upstream's: none
/// that holds `key`, the key Iris sent it (an upstream that echoes it; a
/// key shorter than [`MIN_SEARCHED_KEY`] is not searched for).
pub fn response_headers(upstream: &HeaderMap, key: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(upstream.len() + HEADERS_ADDED);
    let hop = connection_named(upstream);
    let key = key.filter(|key| key.len() >= MIN_SEARCHED_KEY);
    // Searched only in values as long as the key: with keys as providers
    // make them, few are, and most responses set up no search at all.
    let echoes = |value: &HeaderValue| {
        key.is_some_and(|key| {
            value.len() >= key.len()
                && memchr::memmem::find(value.as_bytes(), key.as_bytes()).is_some()
        })
    };
    for (name, value) in upstream {
        if !dropped_response_header(name, &hop) && !echoes(value) {
            headers.append(name, value.clone());
        }
    }
    headers
}

/// `first` (a chunk already read), then `body`, through `mask`.
pub fn masked(first: Option<Bytes>, body: Chunks, mask: KeyMask) -> Chunks {
    let chunks = futures_util::stream::iter(first.map(Ok)).chain(body);
    Box::pin(futures_util::stream::unfold(
        (chunks, Some(mask)),
        |(mut chunks, mut mask)| async move {
            let open = mask.as_mut()?;
            loop {
                match chunks.next().await {
                    Some(Ok(chunk)) => {
                        let out = open.chunk(&chunk);
                        if !out.is_empty() {
                            return Some((Ok(out), (chunks, mask)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (chunks, mask))),
                    None => {
                        let rest = open.finish();
                        return (!rest.is_empty()).then_some((Ok(rest), (chunks, None)));
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_with_the_same_certificates_share_one_client() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        let load = |pem: &str| {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), pem).unwrap();
            PrivateCa::load(file.path()).unwrap()
        };
        let (one, copy) = (load(&pem), load(&pem));
        let forwarder = Forwarder::new().unwrap();
        forwarder.client_for(&one).unwrap();
        forwarder.client_for(&copy).unwrap();
        assert_eq!(forwarder.private.lock().unwrap().len(), 1);
    }

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
        for (name, value) in [
            ("set-cookie", "session=abc"),
            ("set-cookie2", "old=style"),
            ("server", "upstream/1.2"),
            ("alt-svc", "h3=\":443\""),
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
        ] {
            upstream.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let headers = response_headers(&upstream, None);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert!(headers.contains_key("openai-processing-ms"));
    }

    #[test]
    fn a_response_header_holding_the_upstream_key_is_dropped_unless_the_key_is_a_placeholder() {
        let mut upstream = HeaderMap::new();
        upstream.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        upstream.insert(
            "x-debug-auth",
            HeaderValue::from_static("Bearer sk-upstream-key-1"),
        );
        let names = |key| {
            let headers = response_headers(&upstream, key);
            let mut names: Vec<_> = headers
                .keys()
                .map(HeaderName::as_str)
                .map(str::to_owned)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(Some("sk-upstream-key-1")), ["content-type"]);
        assert_eq!(names(None), ["content-type", "x-debug-auth"]);
        // `x` for a server that takes no key: not searched for, or every
        // `text/event-stream` would go.
        assert_eq!(names(Some("x")), ["content-type", "x-debug-auth"]);
    }

    #[test]
    fn client_credentials_addresses_and_its_key_anywhere_are_not_forwarded() {
        let key = Some(&b"iris-client-key"[..]);
        let hop = [HeaderName::from_static("x-hop")];
        for (name, value, dropped) in [
            ("x-api-key", "whatever", true),
            ("api-key", "whatever", true),
            ("x-forwarded-for", "10.0.0.1", true),
            ("forwarded", "for=10.0.0.1", true),
            ("x-real-ip", "10.0.0.1", true),
            ("x-forwarded-anything", "x", true),
            ("true-client-ip", "10.0.0.1", true),
            ("x-goog-api-key", "AIza", true),
            ("x-original-url", "/admin", true),
            ("content-encoding", "gzip", true),
            ("proxy-authorization", "Basic x", true),
            ("proxy-anything", "x", true),
            ("x-hop", "1", true),
            ("x-custom-auth", "key=iris-client-key;", true),
            ("openai-organization", "org-1", false),
            ("x-stainless-lang", "python", false),
        ] {
            let name = HeaderName::from_static(name);
            let value = HeaderValue::from_static(value);
            assert_eq!(
                dropped_request_header(&name, &value, &hop, key),
                dropped,
                "{name}"
            );
        }
    }
}
