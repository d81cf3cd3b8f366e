//! Fetching an image URL without letting a client reach what Iris can reach:
//! the SSRF-safe HTTP client.
//!
//! The defences, each where it cannot be bypassed:
//! - the URL (and every redirect hop) must be `http`/`https` with no userinfo;
//! - an IP-literal host is checked directly, since reqwest never hands IP
//!   literals to a resolver ([`check_url`], called before the request and by
//!   the redirect policy for every hop);
//! - a host name goes through [`FilteringResolver`], which drops refused
//!   addresses: reqwest connects only to the addresses it returns, so there
//!   is no second lookup that DNS rebinding could answer differently;
//! - proxies from the environment are ignored (`no_proxy`): a proxy would
//!   make the connection for Iris, to an address Iris never checked;
//! - one deadline covers the whole fetch, redirects included; the body is
//!   counted as it streams, whatever `Content-Length` says, and compressed
//!   bodies are refused rather than inflated.

use std::error::Error as _;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{self, HeaderValue};
use reqwest::{Url, redirect};

use super::policy::{AddressPolicy, Refused};
use super::{ErrorKind, ImageError};

/// Why a URL is refused before any connection is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlRefusal {
    NotAUrl,
    Scheme(String),
    UserInfo,
    NoHost,
    Address(Refused),
}

impl UrlRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            UrlRefusal::NotAUrl | UrlRefusal::Scheme(_) => "scheme",
            UrlRefusal::UserInfo => "userinfo",
            UrlRefusal::NoHost => "no_host",
            UrlRefusal::Address(refused) => refused.reason.label(),
        }
    }
}

impl fmt::Display for UrlRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlRefusal::NotAUrl => f.write_str("it is not an absolute http(s) URL"),
            UrlRefusal::Scheme(scheme) => write!(
                f,
                "the scheme {scheme:?} is not fetched (only http and https are)"
            ),
            UrlRefusal::UserInfo => {
                f.write_str("URLs with credentials (user:password@) are refused")
            }
            UrlRefusal::NoHost => f.write_str("the URL has no host"),
            UrlRefusal::Address(refused) => refused.fmt(f),
        }
    }
}

impl std::error::Error for UrlRefusal {}

/// Checks what can be checked from the URL alone: scheme, userinfo, and an
/// IP-literal host (in any notation the URL parser accepts: `0x7f.1`,
/// `2130706433`, `[::ffff:127.0.0.1]` all arrive here as addresses).
pub fn check_url(url: &Url, policy: &AddressPolicy) -> Result<(), UrlRefusal> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefusal::Scheme(url.scheme().chars().take(16).collect()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefusal::UserInfo);
    }
    match literal_ip(url) {
        Some(ip) => policy.check(ip).map_err(UrlRefusal::Address),
        None if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        None => Err(UrlRefusal::NoHost),
    }
}

/// The host as an address when it is an IP literal. The URL parser has
/// already normalised every IPv4 notation to dotted decimal (a host that
/// ends in a number is an address or a parse error, never a name) and put
/// IPv6 in brackets, so parsing the serialised host is exact.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6),
        None => host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// `scheme://host[:port]`: what an error or a log line may say about a URL.
/// Paths and query strings can carry signatures and tokens, so they never
/// leave this module.
pub fn origin(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
        (Some(host), None) => format!("{}://{host}", url.scheme()),
        _ => format!("{}:", url.scheme()),
    }
}

/// How a name becomes addresses: the system resolver in production, a
/// table in tests (so tests can make a name resolve anywhere, safely).
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>>;
}

/// `getaddrinfo` through tokio.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Resolution failures, told apart so a refusal is `image_url_forbidden` and
/// a failure `image_fetch_failed`.
#[derive(Debug)]
enum ResolveError {
    Refused { host: String, refused: Refused },
    NoAddress { host: String },
    Failed { host: String, error: std::io::Error },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Refused { host, refused } => {
                write!(f, "{host} resolves only to refused addresses ({refused})")
            }
            ResolveError::NoAddress { host } => write!(f, "{host} has no address"),
            ResolveError::Failed { host, error } => {
                write!(f, "{host} could not be resolved: {error}")
            }
        }
    }
}

impl std::error::Error for ResolveError {}

/// A resolver that returns only addresses the policy allows. reqwest
/// connects to what it returns and looks nothing up again.
pub struct FilteringResolver {
    policy: Arc<AddressPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let lookup = self.lookup.lookup(name.as_str().to_owned());
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = lookup.await.map_err(|error| ResolveError::Failed {
                host: host.clone(),
                error,
            })?;
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|ip| match policy.check(*ip) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                // Port 0: reqwest puts the URL's port in.
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(match first_refusal {
                    Some(refused) => ResolveError::Refused { host, refused },
                    None => ResolveError::NoAddress { host },
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why the redirect policy stopped a chain.
#[derive(Debug)]
enum HopError {
    TooMany(usize),
    Refused(UrlRefusal),
}

impl fmt::Display for HopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopError::TooMany(max) => write!(f, "more than {max} redirects"),
            HopError::Refused(refusal) => refusal.fmt(f),
        }
    }
}

impl std::error::Error for HopError {}

/// The limits of one fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
}

/// The SSRF-safe fetcher: one pooled client, its resolver and redirect
/// policy bound to one address policy.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    limits: FetchLimits,
}

impl Fetcher {
    pub fn new(policy: Arc<AddressPolicy>, limits: FetchLimits) -> Result<Self, String> {
        Self::with_lookup(policy, limits, Arc::new(SystemLookup))
    }

    pub fn with_lookup(
        policy: Arc<AddressPolicy>,
        limits: FetchLimits,
        lookup: Arc<dyn Lookup>,
    ) -> Result<Self, String> {
        let hop_policy = Arc::clone(&policy);
        let max_redirects = limits.max_redirects;
        // A custom policy replaces reqwest's built-in hop limit, so the count
        // is kept here. `previous` holds the original URL and every hop so far.
        let redirects = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(HopError::TooMany(max_redirects));
            }
            match check_url(attempt.url(), &hop_policy) {
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(HopError::Refused(refusal)),
            }
        });
        let mut headers = header::HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("image/*"));
        // Iris counts the bytes it receives against max_bytes; a compressed
        // body would count small and inflate large, so none is asked for.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        // reqwest panics building a client with no TLS provider installed.
        crate::init_tls();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(FilteringResolver {
                policy: Arc::clone(&policy),
                lookup,
            }))
            .redirect(redirects)
            // The next hop must not learn the previous URL (which may be signed).
            .referer(false)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .default_headers(headers)
            .user_agent(concat!("iris-image-fetcher/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("image fetch client: {e}"))?;
        Ok(Self {
            client,
            policy,
            limits,
        })
    }

    pub fn limits(&self) -> FetchLimits {
        self.limits
    }

    /// Fetches `url` under every limit, returning the body exactly as sent.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, ImageError> {
        let url = Url::parse(url).map_err(|_| forbidden(&UrlRefusal::NotAUrl, None))?;
        check_url(&url, &self.policy).map_err(|r| forbidden(&r, Some(&url)))?;
        let started = Instant::now();
        let result = match tokio::time::timeout(self.limits.timeout, self.fetch_checked(&url)).await
        {
            Ok(result) => result,
            Err(_) => Err(ImageError::new(
                ErrorKind::FetchFailed,
                "timeout",
                format!(
                    "Fetching the image from {} took longer than {} ms.",
                    origin(&url),
                    self.limits.timeout.as_millis()
                ),
            )),
        };
        metrics::histogram!("iris_image_fetch_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(bytes) => {
                metrics::counter!("iris_image_fetches_total", "result" => "ok").increment(1);
                metrics::counter!("iris_image_fetched_bytes_total").increment(bytes.len() as u64);
            }
            Err(e) => {
                metrics::counter!("iris_image_fetches_total", "result" => e.kind.code())
                    .increment(1);
            }
        }
        result
    }

    async fn fetch_checked(&self, url: &Url) -> Result<Bytes, ImageError> {
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| send_error(&e, url))?;
        let at = origin(response.url());

        // Belt and braces: the peer must be an address the policy allows.
        if let Some(peer) = response.remote_addr()
            && let Err(refused) = self.policy.check(peer.ip())
        {
            return Err(forbidden(
                &UrlRefusal::Address(refused),
                Some(response.url()),
            ));
        }
        let status = response.status();
        if !status.is_success() {
            return Err(ImageError::new(
                ErrorKind::FetchFailed,
                "status",
                format!(
                    "The image server at {at} answered HTTP {}.",
                    status.as_u16()
                ),
            ));
        }
        if let Some(encoding) = response.headers().get(header::CONTENT_ENCODING)
            && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(ImageError::new(
                ErrorKind::FetchFailed,
                "content_encoding",
                format!(
                    "The image server at {at} sent a compressed body ({}) although Iris asked for none.",
                    String::from_utf8_lossy(encoding.as_bytes())
                        .chars()
                        .take(32)
                        .collect::<String>()
                ),
            ));
        }
        let max = self.limits.max_bytes;
        let too_large = || {
            ImageError::new(
                ErrorKind::TooLarge,
                "bytes",
                format!("The image at {at} is larger than {max} bytes."),
            )
        };
        // A declared length over the cap fails now; a smaller one is only a
        // hint for the buffer, since the count below is what is enforced.
        let declared = response.content_length();
        if declared.is_some_and(|len| len > max as u64) {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(declared.map_or(64 * 1024, |len| len as usize));
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            ImageError::new(
                ErrorKind::FetchFailed,
                "body",
                format!(
                    "Reading the image from {at} failed: {}.",
                    describe(&e.without_url())
                ),
            )
        })? {
            if body.len() + chunk.len() > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }
}

fn forbidden(refusal: &UrlRefusal, url: Option<&Url>) -> ImageError {
    let message = match url {
        Some(url) => format!("The image URL {} is refused: {refusal}.", origin(url)),
        None => format!("The image URL is refused: {refusal}."),
    };
    ImageError::new(ErrorKind::Forbidden, refusal.reason(), message)
}

/// Classifies a failed send by the error Iris's own resolver or redirect
/// policy put in its source chain; anything else is a fetch failure.
fn send_error(error: &reqwest::Error, url: &Url) -> ImageError {
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(hop) = e.downcast_ref::<HopError>() {
            return match hop {
                HopError::TooMany(max) => ImageError::new(
                    ErrorKind::FetchFailed,
                    "redirects",
                    format!(
                        "Fetching the image from {} followed more than {max} redirects.",
                        origin(url)
                    ),
                ),
                HopError::Refused(refusal) => {
                    let next = error.url().map(origin).unwrap_or_default();
                    ImageError::new(
                        ErrorKind::Forbidden,
                        refusal.reason(),
                        format!(
                            "The image at {} redirects to {next}, which is refused: {refusal}.",
                            origin(url)
                        ),
                    )
                }
            };
        }
        if let Some(resolve) = e.downcast_ref::<ResolveError>() {
            return match resolve {
                ResolveError::Refused { refused, .. } => ImageError::new(
                    ErrorKind::Forbidden,
                    refused.reason.label(),
                    format!("The image URL is refused: {resolve}."),
                ),
                _ => ImageError::new(
                    ErrorKind::FetchFailed,
                    "dns",
                    format!("The image could not be fetched: {resolve}."),
                ),
            };
        }
        source = e.source();
    }
    let (reason, what) = if error.is_connect() {
        ("connect", "could not connect")
    } else if error.is_timeout() {
        ("timeout", "timed out")
    } else {
        ("request", "the request failed")
    };
    ImageError::new(
        ErrorKind::FetchFailed,
        reason,
        format!(
            "Fetching the image from {} failed: {what}.",
            error.url().map_or_else(|| origin(url), origin)
        ),
    )
}

/// The innermost cause of a reqwest error, with no URL in it.
fn describe(error: &reqwest::Error) -> String {
    let mut last = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last.chars().take(200).collect()
}
