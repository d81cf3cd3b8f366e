//! What one request (a chat completion, embeddings) learned on its way through Iris, in one struct
//! ([`RequestFacts`]): started by the edge, filled in by the gateway as it
//! goes, then shared (not copied) by everything that reports the request:
//! the `x-iris-*` headers, the access log's line and metrics
//! ([`crate::access_log`]), and the spend log's record
//! ([`crate::spend::Record`]).

use std::sync::Arc;
use std::time::Duration;

/// What a request learned on its way; kept whether or not it succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub request_id: String,
    /// The API it came in on.
    pub api: crate::openai::Api,
    /// The client's name.
    pub client: Arc<str>,
    /// The client's team, when its requests count against one.
    pub team: Option<Arc<str>>,
    /// Where the request came from (see [`crate::client_addr`]).
    pub client_addr: Option<std::net::IpAddr>,
    /// The configured model, once the request resolved to one (a name a
    /// client made up is not kept).
    pub model: Option<String>,
    /// The upstream of the last attempt (the one that answered, if any).
    pub upstream: Option<String>,
    /// What that upstream calls the model.
    pub upstream_model: Option<String>,
    /// The client asked for a streamed answer.
    pub stream: bool,
    /// Image URLs fetched and inlined for the request, and their bytes as
    /// fetched (cache hits included).
    pub images: u32,
    pub image_bytes: u64,
    /// Attempts made upstream (0: Iris answered before any).
    pub attempts: u32,
    /// How long the last attempt took, to its first body chunk.
    pub upstream_latency: Option<Duration>,
    /// Tokens reserved (prompt estimate + completion cap), also set when the
    /// budget refused the request.
    pub estimated_tokens: Option<u64>,
    /// What the response cache did, for a model that caches (with the
    /// cache on); `None` otherwise.
    pub cache: Option<CacheOutcome>,
}

/// Whether a request of a cache-enabled model was answered from the cache
/// (`x-iris-cache: hit`) or not (`miss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

impl RequestFacts {
    /// The facts of a request `client` sent to `api`, known at the edge.
    pub fn new(
        request_id: &str,
        api: crate::openai::Api,
        client: &Arc<str>,
        client_addr: std::net::IpAddr,
    ) -> Self {
        Self {
            request_id: request_id.to_owned(),
            api,
            client: Arc::clone(client),
            client_addr: Some(client_addr),
            ..Self::default()
        }
    }
}
