//! The config file's shape: every key a user may write, with its default.
//! Values are kept as written (strings, integers); [`super::resolve`] turns
//! them into the typed values the server runs on, checking each on the way.
//!
//! Field names here are the config keys users write; changing one is a
//! breaking change (see docs/configuration.md).

use serde::Deserialize;

use crate::budget::money::Price;
use crate::budget::{Limits, OnUnavailable};
use crate::openai::chat::RequestLimits;
use crate::secret::Secret;

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct File {
    pub server: Server,
    pub store: Store,
    pub images: Images,
    pub upstreams: Vec<Upstream>,
    pub models: Vec<Model>,
    pub routing: Routing,
    /// `/admin/*` exists only when this is set.
    pub admin: Option<Admin>,
    pub clients: Vec<Client>,
    /// Budgets shared by the clients that name them.
    pub teams: Vec<Team>,
    pub spend_log: SpendLog,
    pub pricing: Pricing,
    /// Budget alerts to a webhook, only when set.
    pub alerts: Option<Alerts>,
    /// The response cache, for models with `cache = true`.
    pub cache: Cache,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheKind {
    #[default]
    Off,
    Memory,
    Redis,
}

/// `[cache]`: answers kept and served again without calling upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Cache {
    pub kind: CacheKind,
    /// How long an answer is served after it was stored.
    pub ttl_s: u64,
    /// `kind = "memory"`: the most the entries may hold.
    pub max_bytes: u64,
}

impl Default for Cache {
    fn default() -> Self {
        let defaults = crate::cache::CacheSettings::default();
        Self {
            kind: CacheKind::Off,
            ttl_s: defaults.ttl.as_secs(),
            max_bytes: defaults.max_bytes,
        }
    }
}

/// `[alerts]`: where a budget threshold reached is posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Alerts {
    /// `http://` or `https://`; loopback and private addresses allowed.
    pub webhook_url: String,
    /// Signs each delivery (`X-Iris-Signature`).
    pub secret: Option<Secret>,
    /// Fractions of a daily or monthly window, each in (0, 1], ascending.
    pub thresholds: Vec<f64>,
}

impl Default for Alerts {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            secret: None,
            thresholds: crate::alerts::DEFAULT_THRESHOLDS.to_vec(),
        }
    }
}

/// `[pricing]`: what every price and cost is in.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pricing {
    /// A label (`USD`, `EUR`): Iris converts nothing.
    pub currency: String,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Admin {
    /// `sha256:<64 hex>` of the operator's key.
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Server {
    /// `host:port` to bind.
    pub listen: String,
    /// Requests with a larger body are answered 413, whether or not they sent a length.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    /// A request's line and headers must arrive within this, counted from
    /// the connection's accept or the request's first byte.
    pub header_read_timeout_ms: u64,
    /// A request's body must arrive within this, counted from its headers.
    pub body_read_timeout_ms: u64,
    /// A kept-alive connection with no request in flight is closed after this.
    pub keep_alive_timeout_ms: u64,
    /// The request line and headers together; larger get 431.
    pub max_header_bytes: usize,
    /// More header fields than this get 431.
    pub max_headers: usize,
    /// Connections served at once; those beyond get a 503 and are closed.
    pub max_connections: usize,
    /// Messages in one chat completion request; more get 400.
    pub max_messages: usize,
    /// Content parts across one request's messages; more get 400.
    pub max_content_parts: usize,
    /// CIDRs of the proxies in front of Iris: from them, the client's
    /// address is taken from `X-Forwarded-For`.
    pub trusted_proxies: Vec<String>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace_ms: 30_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            keep_alive_timeout_ms: 75_000,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            max_messages: RequestLimits::DEFAULT.max_messages,
            max_content_parts: RequestLimits::DEFAULT.max_content_parts,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Store {
    pub kind: StoreKind,
    /// SQLite file (kind = "sqlite").
    pub path: String,
    /// Redis URL (kind = "redis"); may carry a password, so it never prints.
    pub url: Option<Secret>,
    pub on_unavailable: OnUnavailable,
    /// Redis: how long a reservation holds its concurrency slot when it is
    /// never settled (its instance died): longer than any request may run.
    pub lease_ms: u64,
    /// Redis: how long one store operation (connect included) may take
    /// before the request is treated as "store unavailable".
    pub timeout_ms: u64,
    /// Redis: the first part of every key, so several Iris deployments can
    /// share one Redis (a Cluster has only database 0).
    pub key_prefix: String,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            path: "iris.db".into(),
            url: None,
            on_unavailable: OnUnavailable::Reject,
            lease_ms: 600_000,
            timeout_ms: 500,
            key_prefix: "iris".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpendLogKind {
    /// Beside the budget store: in its SQLite file, in memory with the
    /// memory store, else in `path`.
    #[default]
    Sqlite,
    Postgres,
    Off,
}

/// `[spend_log]`: one record per finished chat completion.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SpendLog {
    pub kind: SpendLogKind,
    /// SQLite file; default: the store's file (`store.kind = "sqlite"`).
    pub path: Option<String>,
    /// PostgreSQL URL (kind = "postgres"); may carry a password.
    pub url: Option<Secret>,
    /// PEM file of a private CA for the database's certificate
    /// (`sslmode=verify-full`).
    pub ca_file: Option<String>,
    /// Records older than this many days are deleted; 0 keeps them.
    pub retention_days: u64,
    /// Records waiting to be written; more are dropped and counted.
    pub queue_capacity: usize,
    /// Records written in one batch at most.
    pub batch_size: usize,
    /// The longest a record waits for its batch.
    pub flush_ms: u64,
    /// PostgreSQL: the SQLite file of the spool; default: the store's file
    /// (`store.kind = "sqlite"`), else `iris-spool.db`.
    pub spool_path: Option<String>,
    /// PostgreSQL: the most records the spool holds.
    pub spool_max_records: u64,
}

impl Default for SpendLog {
    fn default() -> Self {
        Self {
            kind: SpendLogKind::Sqlite,
            path: None,
            url: None,
            ca_file: None,
            retention_days: 90,
            queue_capacity: 10_000,
            batch_size: 500,
            flush_ms: 1000,
            spool_path: None,
            spool_max_records: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Images {
    pub fetch_timeout_ms: u64,
    pub max_bytes: usize,
    pub max_redirects: usize,
    pub max_images_per_request: usize,
    pub max_pixels: u64,
    /// CIDRs that bypass the private-address block (for an internal image host).
    pub allowed_networks: Vec<String>,
    pub cache_bytes: u64,
    pub cache_ttl_s: u64,
    /// Remove EXIF (GPS included), XMP and text metadata from forwarded images.
    pub strip_metadata: bool,
    /// Bytes of pixels that image decodes, conversions and downscales may
    /// hold at once, across the process.
    pub max_decode_bytes: u64,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            fetch_timeout_ms: 10_000,
            max_bytes: 20 * 1024 * 1024,
            max_redirects: 3,
            max_images_per_request: 16,
            max_pixels: 50_000_000,
            allowed_networks: Vec::new(),
            cache_bytes: 64 * 1024 * 1024,
            cache_ttl_s: 300,
            strip_metadata: false,
            max_decode_bytes: crate::images::DEFAULT_MAX_DECODE_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// An OpenAI-compatible HTTP endpoint at `base_url`.
    #[default]
    Openai,
    /// Iris's built-in demo model, answered in-process.
    Demo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Upstream {
    pub name: String,
    pub kind: UpstreamKind,
    /// Base URL up to and including the version segment, e.g. `https://host/v1`.
    pub base_url: String,
    /// Absent for keyless upstreams.
    pub api_key: Option<Secret>,
    /// PEM file of a private CA trusted for this upstream beside the
    /// platform's roots.
    pub ca_file: Option<String>,
    /// Replace remote image URLs by `data:` URIs before forwarding.
    pub inline_images: bool,
    /// Remove `image_url.detail` before forwarding.
    pub strip_detail: bool,
    /// Formats the upstream accepts; others are converted.
    pub image_formats: Vec<String>,
    /// Re-encode or downscale larger images until they fit.
    pub max_image_bytes: Option<usize>,
    /// Ask for `stream_options.include_usage` so streamed requests can be settled exactly.
    pub stream_usage: bool,
    pub timeout_ms: u64,
    /// The provider's fair-usage limits on this key: Iris paces itself under them.
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: UpstreamKind::Openai,
            base_url: String::new(),
            api_key: None,
            ca_file: None,
            inline_images: false,
            strip_detail: false,
            image_formats: ["jpeg", "png", "webp", "gif"].map(String::from).to_vec(),
            max_image_bytes: None,
            stream_usage: true,
            timeout_ms: 120_000,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Model {
    /// What clients send as `model`.
    pub name: String,
    /// One deployment, shorthand for `deployments = [{ upstream = … }]`.
    pub upstream: Option<String>,
    /// What is sent upstream as `model` (default: `name`); with `upstream`,
    /// or as the default of every deployment.
    pub upstream_model: Option<String>,
    /// Several deployments of one model (another key, another provider).
    pub deployments: Vec<Deployment>,
    /// Completion tokens reserved when the request sets no cap.
    pub max_output_tokens: u64,
    /// Per million tokens; a deployment's own price wins over it.
    pub price: Option<Price>,
    /// Which API the model serves.
    pub endpoint: ModelEndpoint,
    /// Answers are kept in the response cache (with `[cache]` on).
    pub cache: bool,
}

/// `models[].endpoint`: the API a model serves (a chat model is not asked
/// for embeddings, nor the other way round).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelEndpoint {
    #[default]
    Chat,
    Embeddings,
}

impl From<ModelEndpoint> for crate::openai::Api {
    fn from(endpoint: ModelEndpoint) -> Self {
        match endpoint {
            ModelEndpoint::Chat => Self::Chat,
            ModelEndpoint::Embeddings => Self::Embeddings,
        }
    }
}

impl Default for Model {
    fn default() -> Self {
        Self {
            name: String::new(),
            upstream: None,
            upstream_model: None,
            deployments: Vec::new(),
            max_output_tokens: 4096,
            price: None,
            endpoint: ModelEndpoint::Chat,
            cache: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Deployment {
    pub upstream: String,
    pub upstream_model: Option<String>,
    /// Share of the traffic within its priority tier (signed, so that a
    /// negative one is reported rather than a type error).
    pub weight: i64,
    /// Lower is tried first; the next tier only when none of this one is usable.
    pub priority: i64,
    /// This deployment's price per million tokens (default: the model's).
    pub price: Option<Price>,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            upstream: String::new(),
            upstream_model: None,
            weight: 1,
            priority: 0,
            price: None,
        }
    }
}

/// `[routing]`: retries and failover between deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Routing {
    pub retries: u32,
    /// `"connect"`, `"timeout"`, or upstream statuses.
    pub retry_on: Vec<RetryOn>,
    pub backoff_ms: u64,
    pub max_retry_wait_ms: u64,
    pub allowed_fails: u32,
    pub cooldown_ms: u64,
    pub max_queue_ms: u64,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            retries: 2,
            retry_on: vec![
                RetryOn::Condition("connect".into()),
                RetryOn::Condition("timeout".into()),
                RetryOn::Status(401),
                RetryOn::Status(403),
                RetryOn::Status(429),
                RetryOn::Status(500),
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(504),
            ],
            backoff_ms: 100,
            max_retry_wait_ms: 10_000,
            allowed_fails: 3,
            cooldown_ms: 30_000,
            max_queue_ms: 0,
        }
    }
}

/// One `retry_on` entry: a condition's name or an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RetryOn {
    Status(i64),
    Condition(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Client {
    pub name: String,
    /// `sha256:<64 hex>` of the client's key; the key itself is never configured.
    pub key: String,
    /// Model names this client may use; `"*"` allows all.
    pub models: Vec<String>,
    pub budget: Limits,
    /// A `[[teams]]` name: the client's requests also count against its budget.
    pub team: Option<String>,
    /// RFC 3339: from then on the key gets 401 `key_expired`.
    pub expires_at: Option<String>,
    /// CIDRs: from any other address the key gets 403 (empty: anywhere).
    pub allowed_networks: Vec<String>,
}

impl Default for Client {
    fn default() -> Self {
        Self {
            name: String::new(),
            key: String::new(),
            models: vec!["*".into()],
            budget: Limits::default(),
            team: None,
            expires_at: None,
            allowed_networks: Vec::new(),
        }
    }
}

/// `[[teams]]`: a budget with the same keys as a client's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Team {
    pub name: String,
    pub budget: Limits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let upstream = Upstream {
            api_key: Some(Secret::new("sk-live-123")),
            ..Upstream::default()
        };
        assert!(!format!("{upstream:?}").contains("sk-live"));
    }
}
