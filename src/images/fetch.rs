//! Fetching an image URL without letting a client reach what Iris can reach:
//! the SSRF-safe HTTP client.
//!
//! The defences, each where it cannot be bypassed:
//! - the URL (and every redirect hop) must be `http`/`https` with no userinfo;
//! - an IP-literal host is checked directly, since reqwest never hands IP
//!   literals to a resolver, and the names of metadata endpoints are refused
//!   before any lookup ([`check_url`], called before the request and by the
//!   redirect policy for every hop);
//! - a redirect that reqwest hands back unfollowed (its `Location` is not a
//!   URL, or has a scheme the HTTP stack cannot hold, like `file:`) is
//!   refused too, named by its target, not by the hop that sent it;
//! - a host name goes through [`FilteringResolver`], which drops refused
//!   addresses: reqwest connects only to the addresses it returns, so there
//!   is no second lookup that DNS rebinding could answer differently;
//! - proxies from the environment are ignored (`no_proxy`): a proxy would
//!   make the connection for Iris, to an address Iris never checked;
//! - one deadline covers the whole fetch, redirects included; the body is
//!   counted as it streams, whatever `Content-Length` says, and compressed
//!   bodies are refused rather than inflated.

use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{self, HeaderValue};
use reqwest::{Url, redirect};

use super::address_policy::{AddressPolicy, Refused, RefusedName, refused_name};
use super::{ErrorKind, ImageError};

/// Why a URL is refused before any connection is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error("it is not an absolute http(s) URL")]
    NotAUrl,
    #[error("the scheme {0:?} is not fetched (only http and https are)")]
    Scheme(String),
    #[error("URLs with credentials (user:password@) are refused")]
    UserInfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("{0}")]
    Address(Refused),
    #[error("{0}")]
    Name(RefusedName),
    /// A redirect's `Location` that is not a URL Iris can request.
    #[error("it cannot be parsed as a URL")]
    Location,
}

impl UrlRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            UrlRefusal::NotAUrl | UrlRefusal::Scheme(_) => "scheme",
            UrlRefusal::UserInfo => "userinfo",
            UrlRefusal::NoHost => "no_host",
            UrlRefusal::Address(refused) => refused.reason.label(),
            UrlRefusal::Name(refused) => refused.reason.label(),
            UrlRefusal::Location => "location",
        }
    }
}

/// Checks what can be checked from the URL alone: scheme, userinfo, an
/// IP-literal host (in any notation the URL parser accepts: `0x7f.1`,
/// `2130706433`, `[::ffff:127.0.0.1]` all arrive here as addresses) and the
/// names of metadata endpoints (`metadata.google.internal.` and its
/// upper-case, percent-encoded and Unicode spellings arrive here as one
/// lower-case name, which [`refused_name`] compares without the dot).
pub fn check_url(url: &Url, policy: &AddressPolicy) -> Result<(), UrlRefusal> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefusal::Scheme(url.scheme().chars().take(16).collect()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefusal::UserInfo);
    }
    match (literal_ip(url), url.host_str()) {
        (Some(ip), _) => policy.check(ip).map_err(UrlRefusal::Address),
        (None, Some(name)) if !name.is_empty() => match refused_name(name) {
            Some(refused) => Err(UrlRefusal::Name(refused)),
            None => Ok(()),
        },
        (None, _) => Err(UrlRefusal::NoHost),
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

/// `scheme://host[:port]`, or `scheme:` for a URL with no host (`file:`,
/// `data:`): what an error or a log line may say about a URL. Paths and
/// query strings can carry signatures and tokens, so they never leave this
/// module; an over-long scheme or host is cut.
pub fn origin(url: &Url) -> String {
    let scheme: String = url.scheme().chars().take(32).collect();
    match url.host_str().filter(|host| !host.is_empty()) {
        Some(host) => {
            let host: String = host.chars().take(253).collect();
            match url.port() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            }
        }
        None => format!("{scheme}:"),
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
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("{0}")]
    RefusedName(RefusedName),
    #[error("{host} resolves only to refused addresses ({refused})")]
    Refused { host: String, refused: Refused },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("{host} could not be resolved: {error}")]
    Failed { host: String, error: std::io::Error },
}

impl ResolveError {
    fn host(&self) -> &str {
        match self {
            ResolveError::RefusedName(refused) => &refused.name,
            ResolveError::Refused { host, .. }
            | ResolveError::NoAddress { host }
            | ResolveError::Failed { host, .. } => host,
        }
    }
}

/// A resolver that returns only addresses the policy allows. reqwest
/// connects to what it returns and looks nothing up again.
pub struct FilteringResolver {
    policy: Arc<AddressPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        // check_url refused these names already; the resolver is the last
        // gate before a connection, so it refuses them too, unasked.
        if let Some(refused) = refused_name(&host) {
            return Box::pin(async move {
                Err(Box::new(ResolveError::RefusedName(refused))
                    as Box<dyn std::error::Error + Send + Sync>)
            });
        }
        let lookup = self.lookup.lookup(host.clone());
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
#[derive(Debug, thiserror::Error)]
enum HopError {
    #[error("more than {0} redirects")]
    TooMany(usize),
    /// `target` is the refused hop's [`origin`]: reqwest's error carries the
    /// URL of the hop before it, which is not the one refused.
    #[error("{target} is refused: {refusal}")]
    Refused { target: String, refusal: UrlRefusal },
}

/// Where a fetched body goes, chunk by chunk, as it streams: so work on it
/// (sniffing, base64) overlaps the download instead of following it.
pub trait Sink: Send {
    /// The server's declared length, within the cap: a capacity hint only.
    fn expect(&mut self, declared: usize);
    /// The next chunk. An error stops the fetch there (e.g. not an image).
    fn push(&mut self, chunk: &[u8]) -> Result<(), ImageError>;
}

/// The plain sink: the body, exactly as sent.
impl Sink for Vec<u8> {
    fn expect(&mut self, declared: usize) {
        self.reserve_exact(declared);
    }

    fn push(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        self.extend_from_slice(chunk);
        Ok(())
    }
}

/// The limits of one fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
                Err(refusal) => {
                    let target = origin(attempt.url());
                    attempt.error(HopError::Refused { target, refusal })
                }
            }
        });
        let mut headers = header::HeaderMap::new();
        // The formats Iris reads, named: servers that negotiate would send
        // AVIF or JPEG XL for `image/*`, and Iris could not read those.
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "image/webp,image/png,image/jpeg,image/gif,image/bmp,image/tiff;q=0.9,*/*;q=0.1",
            ),
        );
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

    /// The error for a fetch of `url` past its deadline.
    pub fn timed_out(&self, url: &str) -> ImageError {
        // (A URL that does not parse is refused at once, never timed out.)
        let from = Url::parse(url).map_or_else(|_| "its URL".to_owned(), |url| origin(&url));
        ImageError::new(
            ErrorKind::FetchFailed,
            "timeout",
            format!(
                "Fetching the image from {from} took longer than {} ms.",
                self.limits.timeout.as_millis()
            ),
        )
    }

    /// Fetches `url` under every limit, returning the body exactly as sent.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, ImageError> {
        let mut body = Vec::new();
        self.fetch_into(url, &mut body).await?;
        Ok(Bytes::from(body))
    }

    /// Fetches `url` under every limit into `sink`, returning the body's length.
    pub async fn fetch_into(&self, url: &str, sink: &mut impl Sink) -> Result<usize, ImageError> {
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        self.fetch_into_by(url, sink, deadline).await
    }

    /// [`Self::fetch_into`], within a `deadline` the caller set: one
    /// request's, from its start, whoever's fetch it waited on before.
    pub async fn fetch_into_by(
        &self,
        url: &str,
        sink: &mut impl Sink,
        deadline: tokio::time::Instant,
    ) -> Result<usize, ImageError> {
        let url = Url::parse(url).map_err(|_| forbidden(&UrlRefusal::NotAUrl, None))?;
        check_url(&url, &self.policy).map_err(|r| forbidden(&r, Some(&url)))?;
        let started = Instant::now();
        let result = match tokio::time::timeout_at(deadline, self.fetch_checked(&url, sink)).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out(url.as_str())),
        };
        let elapsed = started.elapsed();
        crate::metrics::IMAGE_FETCH_DURATION
            .histogram(&[])
            .record(elapsed.as_secs_f64());
        tracing::debug!(
            origin = %origin(&url),
            bytes = result.as_ref().map_or(0, |len| *len),
            ms = elapsed.as_millis() as u64,
            error = result.as_ref().err().map(|e| e.reason),
            "image fetched"
        );
        match &result {
            Ok(len) => {
                crate::metrics::IMAGE_FETCHES
                    .counter(&[("result", "ok")])
                    .increment(1);
                crate::metrics::IMAGE_FETCHED_BYTES
                    .counter(&[])
                    .increment(*len as u64);
            }
            Err(e) => {
                crate::metrics::IMAGE_FETCHES
                    .counter(&[("result", e.kind.code().as_str())])
                    .increment(1);
            }
        }
        result
    }

    async fn fetch_checked(&self, url: &Url, sink: &mut impl Sink) -> Result<usize, ImageError> {
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
        if status.is_redirection()
            && let Some(location) = response.headers().get(header::LOCATION)
            && let Some(refused) =
                unfollowed_redirect(response.url(), location.as_bytes(), status, &self.policy)
        {
            return Err(refused);
        }
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
        sink.expect(declared.map_or(64 * 1024, |len| len as usize));
        let mut received = 0;
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
            received += chunk.len();
            if received > max {
                return Err(too_large());
            }
            sink.push(&chunk)?;
        }
        Ok(received)
    }
}

fn forbidden(refusal: &UrlRefusal, url: Option<&Url>) -> ImageError {
    let message = match url {
        Some(url) => format!("The image URL {} is refused: {refusal}.", origin(url)),
        None => format!("The image URL is refused: {refusal}."),
    };
    ImageError::new(ErrorKind::Forbidden, refusal.reason(), message)
}

/// A redirect refused, named by its target (`scheme://host:port`, or what
/// can be told of a `Location` that is not a URL), never by the hop before.
fn redirect_refused(target: &str, refusal: &UrlRefusal) -> ImageError {
    ImageError::new(
        ErrorKind::Forbidden,
        refusal.reason(),
        format!("The image URL redirects to {target}, which is refused: {refusal}."),
    )
}

/// Judges a redirect that reqwest handed back instead of following. Its
/// redirect policy sees every `Location` that parses into a URL the HTTP
/// stack can request; what arrives here could not be parsed (not UTF-8,
/// not a URL), or names a scheme the stack cannot even represent
/// (`file:`, `data:`, `javascript:`), or came with a status that is not
/// followed (300, 304). All but the last kind are refused; a plain 300 or
/// 304 towards an allowed URL is left to the status check.
fn unfollowed_redirect(
    base: &Url,
    location: &[u8],
    status: reqwest::StatusCode,
    policy: &AddressPolicy,
) -> Option<ImageError> {
    let followed = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
    let target = std::str::from_utf8(location)
        .ok()
        .and_then(|location| base.join(location).ok());
    let Some(target) = target else {
        let what = location_scheme(location).map_or_else(|| "a Location".to_owned(), |s| s + ":");
        return Some(redirect_refused(&what, &UrlRefusal::Location));
    };
    match check_url(&target, policy) {
        Err(refusal) => Some(redirect_refused(&origin(&target), &refusal)),
        Ok(()) if followed => Some(redirect_refused(&origin(&target), &UrlRefusal::Location)),
        Ok(()) => None,
    }
}

/// The scheme a `Location` that is not a URL starts with, if it has one:
/// the one part of it safe to repeat.
fn location_scheme(location: &[u8]) -> Option<String> {
    let colon = location.iter().position(|b| *b == b':')?;
    let scheme = &location[..colon];
    let valid = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme.len() <= 32
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    valid.then(|| String::from_utf8_lossy(scheme).to_ascii_lowercase())
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
                HopError::Refused { target, refusal } => redirect_refused(target, refusal),
            };
        }
        if let Some(resolve) = e.downcast_ref::<ResolveError>() {
            let label = match resolve {
                ResolveError::RefusedName(refused) => refused.reason.label(),
                ResolveError::Refused { refused, .. } => refused.reason.label(),
                _ => {
                    return ImageError::new(
                        ErrorKind::FetchFailed,
                        "dns",
                        format!("The image could not be fetched: {resolve}."),
                    );
                }
            };
            // A name other than the URL's own came from a redirect.
            let message = if url.host_str() == Some(resolve.host()) {
                format!("The image URL is refused: {resolve}.")
            } else {
                format!(
                    "The image URL redirects to {}, which is refused: {resolve}.",
                    resolve.host()
                )
            };
            return ImageError::new(ErrorKind::Forbidden, label, message);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::images::address_policy::Reason;

    fn refusal(url: &str, allowed: &[&str]) -> Option<UrlRefusal> {
        let policy = AddressPolicy::new(allowed).expect("policy");
        check_url(&Url::parse(url).expect("url"), &policy).err()
    }

    fn reason(url: &str) -> Option<&'static str> {
        refusal(url, &[]).map(|r| r.reason())
    }

    #[test]
    fn schemes_and_userinfo() {
        for url in [
            "ftp://example.com/a.png",
            "file:///etc/passwd",
            "gopher://example.com/",
            "javascript:alert(1)",
            "blob:https://example.com/uuid",
            "ws://example.com/",
        ] {
            assert_eq!(reason(url), Some("scheme"), "{url}");
        }
        for url in [
            "http://user@example.com/a.png",
            "http://user:secret@example.com/a.png",
            "https://:secret@example.com/a.png",
        ] {
            assert_eq!(reason(url), Some("userinfo"), "{url}");
        }
        assert_eq!(
            reason("http://example.com/a.png?x=1"),
            None,
            "names go to the resolver"
        );
        assert_eq!(reason("HTTPS://EXAMPLE.COM/a.png"), None);
    }

    #[test]
    fn ipv4_in_every_notation_is_caught() {
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://0x7f.1/",
            "http://0x7f.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://017700000001/",
            "http://0177.0.0.1/",
            "http://0177.0.0.01/",
            "http://127.0.0.1./",
            "http://127.000.000.001/",
        ] {
            assert_eq!(reason(url), Some("loopback"), "{url}");
        }
        for (url, expected) in [
            ("http://169.254.169.254/latest/meta-data/", "metadata"),
            ("http://0xa9fea9fe/", "metadata"),
            ("http://2852039166/", "metadata"),
            ("http://0251.0376.0251.0376/", "metadata"),
            ("http://10.1/", "private"),
            ("http://0/", "unspecified"),
            ("http://0.0.0.0:8080/", "unspecified"),
            ("http://100.64.0.1/", "cgnat"),
            ("http://192.168.0.1/", "private"),
            ("http://172.16.5.4/", "private"),
            ("http://224.0.0.1/", "multicast"),
            ("http://255.255.255.255/", "broadcast"),
            ("http://192.0.2.1/", "documentation"),
        ] {
            assert_eq!(reason(url), Some(expected), "{url}");
        }
        assert_eq!(reason("http://8.8.8.8/"), None);
    }

    #[test]
    fn ipv6_and_embedded_ipv4_literals_are_caught() {
        for (url, expected) in [
            ("http://[::1]/", "loopback"),
            ("http://[::]/", "unspecified"),
            ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://[::ffff:7f00:1]/", "loopback"),
            ("http://[::ffff:169.254.169.254]/", "metadata"),
            ("http://[0:0:0:0:0:ffff:a9fe:a9fe]/", "metadata"),
            ("http://[::127.0.0.1]/", "loopback"),
            ("http://[::10.0.0.1]/", "private"),
            ("http://[64:ff9b::169.254.169.254]/", "metadata"),
            ("http://[64:ff9b::a00:1]/", "private"),
            ("http://[2002:a9fe:a9fe::]/", "metadata"),
            ("http://[2002:7f00:1::1]/", "loopback"),
            ("http://[fe80::1]/", "link_local"),
            ("http://[fd00:ec2::254]/", "metadata"),
            ("http://[fc00::1]/", "private"),
            ("http://[ff02::1]/", "multicast"),
        ] {
            assert_eq!(reason(url), Some(expected), "{url}");
        }
        assert_eq!(reason("http://[2606:4700:4700::1111]/"), None);
    }

    /// Every notation of an endpoint's address that the URL parser turns
    /// into that address: each must come out as the same refusal.
    fn notations_v4(a: [u8; 4]) -> Vec<String> {
        let [w, x, y, z] = a;
        let n = u32::from_be_bytes(a);
        vec![
            format!("{w}.{x}.{y}.{z}"),
            format!("{w}.{x}.{y}.{z}."),
            // Decimal, hex and octal, whole and per part, and the short forms.
            format!("{n}"),
            format!("0x{n:x}"),
            format!("0X{n:X}"),
            format!("0{n:o}"),
            format!("0x{w:x}.0x{x:x}.0x{y:x}.0x{z:x}"),
            format!("0{w:o}.0{x:o}.0{y:o}.0{z:o}"),
            format!("0x{w:02X}.{x}.0{y:o}.{z}"),
            format!("{w}.{x}.{}", u32::from(y) << 8 | u32::from(z)),
            format!("{w}.{}", n & 0xff_ffff),
            // Percent-encoded digits are decoded before the address is parsed.
            format!("%3{}{}.{x}.{y}.{z}", w / 100, &w.to_string()[1..]),
            // IPv6 forms that embed it.
            format!("[::ffff:{w}.{x}.{y}.{z}]"),
            format!("[::FFFF:{:X}:{:X}]", n >> 16, n & 0xffff),
            format!("[0:0:0:0:0:ffff:{w}.{x}.{y}.{z}]"),
            format!("[::{w}.{x}.{y}.{z}]"),
            format!("[::ffff:0:{w}.{x}.{y}.{z}]"),
            format!("[64:ff9b::{w}.{x}.{y}.{z}]"),
            format!("[2002:{:x}:{:x}::1]", n >> 16, n & 0xffff),
        ]
    }

    #[test]
    fn metadata_endpoints_are_refused_in_every_notation() {
        // Azure's WireServer and Alibaba's metadata are outside 169.254/16,
        // and allowed networks that contain them must not open them.
        let allowed = &[
            "100.64.0.0/10",
            "169.254.0.0/16",
            "168.63.0.0/16",
            "2002::/16",
            "64:ff9b::/96",
        ];
        for endpoint in [
            [169, 254, 169, 254],
            [168, 63, 129, 16],
            [100, 100, 100, 200],
            [192, 0, 0, 192],
            [169, 254, 170, 2],
            [169, 254, 170, 23],
            [169, 254, 0, 23],
        ] {
            for host in notations_v4(endpoint) {
                let url = format!("http://{host}/latest/meta-data/");
                let parsed = Url::parse(&url).expect("the URL parser takes it");
                let refused = refusal(&url, allowed).expect("refused");
                assert_eq!(refused.reason(), "metadata", "{url} ({parsed}): {refused}");
                // The verdict is about this endpoint, whichever way it was written.
                let v4 = std::net::Ipv4Addr::from(endpoint);
                let UrlRefusal::Address(refused) = refused else {
                    panic!("{url}: {refused:?}");
                };
                assert!(
                    refused.addr == IpAddr::V4(v4) || refused.embedded == Some(v4),
                    "{url}: {refused:?}"
                );
            }
        }
        for url in [
            "http://[fd00:ec2::254]/",
            "http://[FD00:EC2::254]/",
            "http://[fd00:ec2:0:0:0:0:0:254]/",
            "http://[fd00:ec2::23]/",
            "http://[fd20:ce::254]/",
            "http://[fd00:a9fe:a9fe::1]/",
            "http://[64:ff9b:1::a9fe:a9fe]/",
            "http://[2001:0:a9fe:a9fe::1]/",
        ] {
            let refused = refusal(url, &["::/0"]).expect("refused");
            assert_eq!(refused.reason(), "metadata", "{url}: {refused}");
        }
        // Zone indexes are not part of a URL: refused as not a URL.
        assert!(Url::parse("http://[fe80::a9fe:a9fe%25eth0]/").is_err());
    }

    #[test]
    fn metadata_and_cluster_names_are_refused_in_every_spelling() {
        for (url, expected) in [
            (
                "http://metadata.google.internal/computeMetadata/v1/",
                "metadata",
            ),
            ("http://METADATA.GOOGLE.INTERNAL/", "metadata"),
            ("http://metadata.google.internal./", "metadata"),
            ("http://metadata.google.internal:80/", "metadata"),
            ("http://metadata%2Egoogle%2Einternal/", "metadata"),
            ("http://%6Detadata.google.internal/", "metadata"),
            // Ideographic full stops, full-width letters and a soft hyphen
            // are mapped by IDNA to the same ASCII name.
            ("http://metadata\u{3002}google\u{3002}internal/", "metadata"),
            (
                "http://\u{ff4d}\u{ff45}\u{ff54}\u{ff41}data.google.internal/",
                "metadata",
            ),
            ("http://meta\u{ad}data.google.internal/", "metadata"),
            ("http://metadata/computeMetadata/v1/", "metadata"),
            ("http://metadata./", "metadata"),
            ("http://metadata.goog/", "metadata"),
            ("http://instance-data/latest/meta-data/", "metadata"),
            ("http://instance-data.ec2.internal/latest/", "metadata"),
            (
                "http://instance-data.us-west-2.compute.internal/",
                "metadata",
            ),
            (
                "http://metadata.tencentyun.com/latest/meta-data/",
                "metadata",
            ),
            ("https://kubernetes.default.svc/api", "cluster_service"),
            (
                "https://kubernetes.default.svc.cluster.local:443/api",
                "cluster_service",
            ),
            (
                "https://KUBERNETES.default.svc.cluster.local./",
                "cluster_service",
            ),
            ("https://kubernetes.default/", "cluster_service"),
            ("https://kubernetes/", "cluster_service"),
        ] {
            let refused = refusal(url, &["0.0.0.0/0", "::/0"]).expect("refused by name");
            assert_eq!(refused.reason(), expected, "{url}: {refused}");
            assert!(matches!(refused, UrlRefusal::Name(_)), "{url}: {refused:?}");
        }
        assert_eq!(reason("http://metadata.example.com/a.png"), None);
        assert_eq!(reason("http://kubernetes.io/a.png"), None);
    }

    #[test]
    fn origins_name_scheme_host_and_port_only() {
        for (url, expected) in [
            ("http://example.com/a.png?sig=SECRET", "http://example.com"),
            ("https://example.com:8443/a", "https://example.com:8443"),
            ("http://[::1]:8080/", "http://[::1]:8080"),
            ("file:///etc/passwd", "file:"),
            ("file://fileserver/share/secret", "file://fileserver"),
            ("data:image/png;base64,iVBORw0KGgo=", "data:"),
            ("javascript:alert(1)", "javascript:"),
            ("gopher://127.0.0.2:70/_SECRET", "gopher://127.0.0.2:70"),
            ("mailto:someone@example.com", "mailto:"),
        ] {
            assert_eq!(origin(&Url::parse(url).expect("url")), expected, "{url}");
        }
        assert_eq!(location_scheme(b"http://[::1"), Some("http".to_owned()));
        assert_eq!(
            location_scheme(b"HTTP://exa mple/"),
            Some("http".to_owned())
        );
        assert_eq!(location_scheme(b"//[::1"), None);
        assert_eq!(location_scheme(b"1http://x"), None);
        assert_eq!(location_scheme(b"/a:b"), None);
        assert_eq!(location_scheme(b"\xff\xfe:x"), None);
    }

    #[test]
    fn allowed_networks_open_literals() {
        assert!(refusal("http://127.0.0.2:8080/a.png", &["127.0.0.2/32"]).is_none());
        assert!(refusal("http://[::ffff:127.0.0.2]/a.png", &["127.0.0.2/32"]).is_none());
        assert!(refusal("http://127.0.0.1/a.png", &["127.0.0.2/32"]).is_some());
        // Userinfo stays refused on an allowed host.
        assert!(refusal("http://u:p@127.0.0.2/", &["127.0.0.2/32"]).is_some());
    }

    #[test]
    fn messages_name_the_origin_never_the_path_or_query() {
        let url = Url::parse("http://192.168.7.1:8080/private/path?X-Amz-Signature=SECRET#frag")
            .expect("url");
        let refusal = check_url(&url, &AddressPolicy::default()).expect_err("refused");
        let error = forbidden(&refusal, Some(&url));
        assert_eq!(error.kind, ErrorKind::Forbidden);
        assert_eq!(error.reason, "private");
        assert_eq!(
            error.message,
            "The image URL http://192.168.7.1:8080 is refused: 192.168.7.1 is a private network address."
        );
        let url = Url::parse("http://user:hunter2@example.com/").expect("url");
        let error = forbidden(
            &check_url(&url, &AddressPolicy::default()).expect_err("x"),
            Some(&url),
        );
        assert!(!error.message.contains("hunter2"), "{}", error.message);
    }

    /// A name table standing in for DNS, counting lookups.
    #[derive(Default)]
    struct Table {
        names: Mutex<HashMap<String, Vec<Vec<IpAddr>>>>,
        lookups: AtomicUsize,
    }

    impl Table {
        /// Successive lookups of `name` get successive answers (the last repeats).
        fn set(&self, name: &str, answers: &[&[&str]]) {
            let answers = answers
                .iter()
                .map(|a| a.iter().map(|ip| ip.parse().expect("ip")).collect())
                .collect();
            self.names
                .lock()
                .expect("lock")
                .insert(name.to_owned(), answers);
        }
    }

    impl Lookup for Arc<Table> {
        fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
            let n = self.lookups.fetch_add(1, Ordering::SeqCst);
            let answer = self
                .names
                .lock()
                .expect("lock")
                .get(&host)
                .map(|answers| answers[n.min(answers.len() - 1)].clone());
            Box::pin(async move {
                answer.ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")
                })
            })
        }
    }

    /// Serves `body` over HTTP on `ip:port`, counting connections.
    async fn serve(ip: &str, port: u16, body: &'static [u8]) -> Option<(u16, Arc<AtomicUsize>)> {
        let listener = tokio::net::TcpListener::bind((ip, port)).await.ok()?;
        let port = listener.local_addr().ok()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(body).await;
                });
            }
        });
        Some((port, connections))
    }

    fn fetcher(table: &Arc<Table>, allowed: &[&str]) -> Fetcher {
        Fetcher::with_lookup(
            Arc::new(AddressPolicy::new(allowed).expect("policy")),
            FetchLimits {
                timeout: Duration::from_secs(5),
                max_bytes: 1 << 20,
                max_redirects: 3,
            },
            Arc::new(Arc::clone(table)),
        )
        .expect("fetcher")
    }

    #[tokio::test]
    async fn the_connection_goes_only_to_an_address_the_resolver_let_through() {
        // The same port on two loopback addresses: 127.0.0.2 is allowed,
        // 127.0.0.1 is not. The name resolves to both, refused one first.
        let mut servers = None;
        for _ in 0..20 {
            let Some((port, good)) = serve("127.0.0.2", 0, b"allowed").await else {
                continue;
            };
            if let Some((_, bad)) = serve("127.0.0.1", port, b"refused").await {
                servers = Some((port, good, bad));
                break;
            }
        }
        let (port, good, bad) = servers.expect("two servers on one port");
        let table = Arc::new(Table::default());
        table.set("images.test", &[&["127.0.0.1", "127.0.0.2"]]);
        let fetcher = fetcher(&table, &["127.0.0.2/32"]);
        let body = fetcher
            .fetch(&format!("http://images.test:{port}/a.png"))
            .await
            .expect("fetched");
        assert_eq!(&body[..], b"allowed");
        assert_eq!(
            bad.load(Ordering::SeqCst),
            0,
            "the refused address saw no connection"
        );
        assert_eq!(good.load(Ordering::SeqCst), 1);
        assert_eq!(
            table.lookups.load(Ordering::SeqCst),
            1,
            "one lookup, no second one"
        );

        // Only refused addresses: refused, and nothing is connected to.
        table.set("loopback.test", &[&["127.0.0.1", "::1"]]);
        let e = fetcher
            .fetch(&format!("http://loopback.test:{port}/a.png?sig=SECRET"))
            .await
            .expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Forbidden, "{e}");
        assert_eq!(e.reason, Reason::Loopback.label());
        assert!(!e.message.contains("SECRET"), "{}", e.message);
        assert_eq!(bad.load(Ordering::SeqCst), 0);

        // A name that does not resolve is a fetch failure, not a refusal.
        let e = fetcher
            .fetch(&format!("http://nowhere.test:{port}/"))
            .await
            .expect_err("no such name");
        assert_eq!(e.kind, ErrorKind::FetchFailed, "{e}");
        assert_eq!(e.reason, "dns");
    }

    #[tokio::test]
    async fn a_rebinding_name_is_looked_up_once_per_connection() {
        // First answer allowed, every later answer refused: the fetch uses
        // the first, checked answer and never asks again mid-request.
        let (port, good) = serve("127.0.0.2", 0, b"first").await.expect("server");
        let table = Arc::new(Table::default());
        table.set("rebind.test", &[&["127.0.0.2"], &["127.0.0.1"]]);
        let fetcher = fetcher(&table, &["127.0.0.2/32"]);
        let body = fetcher
            .fetch(&format!("http://rebind.test:{port}/"))
            .await
            .expect("fetched");
        assert_eq!(&body[..], b"first");
        assert_eq!(good.load(Ordering::SeqCst), 1);
        assert_eq!(table.lookups.load(Ordering::SeqCst), 1);
        // The server closed that connection; the next one resolves again
        // and is refused.
        let e = fetcher
            .fetch(&format!("http://rebind.test:{port}/"))
            .await
            .expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Forbidden, "{e}");
        assert_eq!(good.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn resolver_filters_and_errors_when_nothing_is_left() {
        use reqwest::dns::Resolve as _;
        let table = Arc::new(Table::default());
        table.set(
            "mixed.test",
            &[&["10.0.0.1", "127.0.0.2", "169.254.169.254", "8.8.8.8"]],
        );
        table.set("private.test", &[&["10.0.0.1", "fd00::1"]]);
        let resolver = FilteringResolver {
            policy: Arc::new(AddressPolicy::new(&["127.0.0.2/32"]).expect("policy")),
            lookup: Arc::new(Arc::clone(&table)),
        };
        let addrs: Vec<IpAddr> = resolver
            .resolve("mixed.test".parse().expect("name"))
            .await
            .expect("some allowed")
            .map(|a| a.ip())
            .collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.2".parse::<IpAddr>().expect("ip"),
                "8.8.8.8".parse().expect("ip")
            ]
        );
        let Err(e) = resolver
            .resolve("private.test".parse().expect("name"))
            .await
        else {
            panic!("nothing allowed");
        };
        let e = e.downcast_ref::<ResolveError>().expect("a ResolveError");
        assert!(
            matches!(e, ResolveError::Refused { refused, .. } if refused.reason == Reason::Private)
        );
    }

    #[tokio::test]
    async fn names_resolving_to_metadata_are_refused_whatever_is_allowed() {
        use reqwest::dns::Resolve as _;
        let table = Arc::new(Table::default());
        // Public-looking names whose DNS answers point at host services, the
        // way a rebinding or wildcard-DNS service (nip.io) would.
        table.set("wireserver.test", &[&["168.63.129.16"]]);
        table.set("alibaba.test", &[&["100.100.100.200"]]);
        table.set(
            "imds6.test",
            &[&["fd00:ec2::254", "::ffff:169.254.169.254"]],
        );
        table.set("169.254.169.254.nip.test", &[&["169.254.169.254"]]);
        table.set("mixed.test", &[&["168.63.129.16", "127.0.0.2"]]);
        let resolver = FilteringResolver {
            policy: Arc::new(
                AddressPolicy::new(&[
                    "168.63.0.0/16",
                    "100.64.0.0/10",
                    "169.254.0.0/16",
                    "fd00::/8",
                    "127.0.0.2/32",
                ])
                .expect("policy"),
            ),
            lookup: Arc::new(Arc::clone(&table)),
        };
        for name in [
            "wireserver.test",
            "alibaba.test",
            "imds6.test",
            "169.254.169.254.nip.test",
        ] {
            let Err(e) = resolver.resolve(name.parse().expect("name")).await else {
                panic!("{name}: nothing allowed");
            };
            let e = e.downcast_ref::<ResolveError>().expect("a ResolveError");
            assert!(
                matches!(e, ResolveError::Refused { refused, .. } if refused.reason == Reason::Metadata),
                "{name}: {e}"
            );
        }
        // A metadata address among others is dropped; the rest is used.
        let addrs: Vec<IpAddr> = resolver
            .resolve("mixed.test".parse().expect("name"))
            .await
            .expect("127.0.0.2 is allowed")
            .map(|a| a.ip())
            .collect();
        assert_eq!(addrs, ["127.0.0.2".parse::<IpAddr>().expect("ip")]);

        // Metadata and API-server names are refused without a lookup.
        let before = table.lookups.load(Ordering::SeqCst);
        for name in [
            "metadata.google.internal",
            "instance-data",
            "kubernetes.default.svc",
        ] {
            let Err(e) = resolver.resolve(name.parse().expect("name")).await else {
                panic!("{name}: refused by name");
            };
            let e = e.downcast_ref::<ResolveError>().expect("a ResolveError");
            assert!(matches!(e, ResolveError::RefusedName(_)), "{name}: {e}");
        }
        assert_eq!(
            table.lookups.load(Ordering::SeqCst),
            before,
            "no lookup made"
        );

        // Through the fetcher: image_url_forbidden, reason metadata, and the
        // message names the host and the service.
        let fetcher = fetcher(&table, &["168.63.0.0/16"]);
        let e = fetcher
            .fetch("http://wireserver.test/machine?comp=goalstate")
            .await
            .expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Forbidden, "{e}");
        assert_eq!(e.reason, "metadata");
        assert_eq!(
            e.message,
            "The image URL is refused: wireserver.test resolves only to refused addresses \
             (168.63.129.16 is a cloud metadata or host-agent endpoint (Azure WireServer, the host agent's endpoint))."
        );
    }
}
