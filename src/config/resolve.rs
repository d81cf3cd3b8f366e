//! From the file's shape to the typed values the server runs on, in one pass
//! that checks every value on the way: ranges, formats, CIDRs, URLs, key
//! hashes, unique names and cross-references (a model naming a missing
//! upstream). Every problem is collected with its key path, so `iris check`
//! lists them all; the server never interprets a config string again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;

use super::schema::{self, SpendLogKind, StoreKind, UpstreamKind};
use super::{Config, Problem, Server};
use crate::alerts::AlertSettings;
use crate::budget::money::{Money, Price};
use crate::budget::store::{RedisClock, RedisDeployment, RedisOptions};
use crate::budget::{Limits, StoreBackend, StoreSettings};
use crate::cache::{CacheKind, CacheSettings};
use crate::catalog::{Catalog, Client, Deployment, Model, ModelAccess, Team};
use crate::images::{FetchLimits, Format, FormatSet, ImagePolicy, ImagesSettings};
use crate::keys::KeyHash;
use crate::openai::chat::RequestLimits;
use crate::routing::{RetryOn, RoutingSettings};
use crate::spend::{SpendBackend, SpendSettings, WriterOptions};
use crate::tls::PrivateCa;
use crate::upstream::{Endpoint, Upstream};

/// Problems found so far; each resolver adds to it and returns what it
/// could make of its section, so later sections are still checked.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem::new(path, message));
    }

    /// `value`, or a problem at `path` when it is zero.
    fn above_zero<T: Default + PartialEq>(&mut self, path: &str, value: T) -> T {
        if value == T::default() {
            self.add(path, "must be above 0");
        }
        value
    }
}

/// The smallest `server.max_header_bytes`: a request line and the few
/// headers every client sends.
const MIN_HEADER_BYTES: usize = 1024;

/// The largest `server.max_connections`: more than one process can hold
/// sockets for (and within what a semaphore counts).
const MAX_CONNECTIONS: usize = 1 << 24;

pub fn resolve(file: schema::File) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems::default();
    let server = server(&file.server, &mut problems);
    let store = store(&file, &mut problems);
    let images = images(&file.images, &mut problems);
    let upstreams: Vec<Arc<Upstream>> = upstreams(&file.upstreams, &mut problems);
    let models = models(&file.models, &upstreams, &mut problems);
    let routing = routing(&file.routing, &mut problems);
    let admin = file.admin.as_ref().and_then(|admin| {
        KeyHash::parse(&admin.key)
            .map_err(|message| problems.add("admin.key", message))
            .ok()
    });
    let teams = teams(&file.teams, &mut problems);
    let mut warnings = Vec::new();
    let clients = clients(&file.clients, &models, &teams, &mut problems, &mut warnings);
    let spend_log = spend_log(&file.spend_log, &mut problems);
    let alerts = file
        .alerts
        .as_ref()
        .and_then(|section| alerts(section, &mut problems));
    let currency = file.pricing.currency.trim();
    if currency.is_empty() || currency.chars().any(char::is_control) {
        problems.add(
            "pricing.currency",
            "must be a label such as \"USD\" (no control characters)",
        );
    }
    let cache = cache(&file, &mut problems);
    warnings.extend(unpriced_cost_limits(&clients, &models));
    match (problems.0.is_empty(), server, store) {
        (true, Some(server), Some(store)) => Ok(Config {
            server,
            store,
            images,
            routing,
            admin,
            catalog: Catalog::new(upstreams, models, clients, teams),
            spend_log,
            currency: Arc::from(currency),
            alerts,
            cache,
            warnings,
        }),
        _ => Err(problems.0),
    }
}

fn server(server: &schema::Server, problems: &mut Problems) -> Option<Server> {
    let listen = server.listen.parse::<SocketAddr>().map_err(|_| {
        problems.add(
            "server.listen",
            format!("{:?} is not a host:port address", server.listen),
        );
    });
    let max_body_bytes = problems.above_zero("server.max_body_bytes", server.max_body_bytes);
    let millis = |problems: &mut Problems, key: &str, ms: u64| {
        Duration::from_millis(problems.above_zero(&format!("server.{key}"), ms))
    };
    let header_read_timeout = millis(
        problems,
        "header_read_timeout_ms",
        server.header_read_timeout_ms,
    );
    let body_read_timeout = millis(
        problems,
        "body_read_timeout_ms",
        server.body_read_timeout_ms,
    );
    let keep_alive_timeout = millis(
        problems,
        "keep_alive_timeout_ms",
        server.keep_alive_timeout_ms,
    );
    if server.max_header_bytes < MIN_HEADER_BYTES {
        problems.add(
            "server.max_header_bytes",
            format!("must be at least {MIN_HEADER_BYTES}"),
        );
    }
    let max_headers = problems.above_zero("server.max_headers", server.max_headers);
    let max_connections = problems.above_zero("server.max_connections", server.max_connections);
    if max_connections > MAX_CONNECTIONS {
        problems.add(
            "server.max_connections",
            format!("must be at most {MAX_CONNECTIONS}"),
        );
    }
    let request_limits = RequestLimits {
        max_messages: problems.above_zero("server.max_messages", server.max_messages),
        max_content_parts: problems
            .above_zero("server.max_content_parts", server.max_content_parts),
    };
    let trusted_proxies = networks(&server.trusted_proxies, "server.trusted_proxies", problems);
    Some(Server {
        listen: listen.ok()?,
        max_body_bytes,
        shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
        header_read_timeout,
        body_read_timeout,
        keep_alive_timeout,
        max_header_bytes: server.max_header_bytes,
        max_headers,
        max_connections,
        request_limits,
        trusted_proxies,
    })
}

/// A list of CIDRs (or single addresses), each problem at its index.
fn networks(list: &[String], at: &str, problems: &mut Problems) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, network)| {
            crate::client_addr::parse_network(network)
                .map_err(|message| problems.add(format!("{at}[{i}]"), message))
                .ok()
        })
        .collect()
}

fn store(file: &schema::File, problems: &mut Problems) -> Option<StoreSettings> {
    let store = &file.store;
    let backend = match store.kind {
        StoreKind::Memory => StoreBackend::Memory,
        StoreKind::Sqlite => {
            if store.path.is_empty() {
                problems.add("store.path", "must name a file");
            }
            StoreBackend::Sqlite {
                path: PathBuf::from(&store.path),
            }
        }
        StoreKind::Redis => {
            let options = redis_options(file, problems);
            let Some(url) = &store.url else {
                problems.add("store.url", "required when store.kind = \"redis\"");
                return None;
            };
            // A single endpoint, a Cluster or Sentinel, by the scheme. The
            // URL may carry a password: the problem is named, never the URL.
            if let Err(e) = RedisDeployment::parse(url.expose()) {
                problems.add("store.url", e);
            }
            StoreBackend::Redis {
                url: url.clone(),
                options,
            }
        }
    };
    Some(StoreSettings {
        backend,
        on_unavailable: store.on_unavailable,
    })
}

/// The Redis-only knobs: a lease shorter than an upstream's timeout would
/// free a concurrency slot while its request may still be running.
fn redis_options(file: &schema::File, problems: &mut Problems) -> RedisOptions {
    let store = &file.store;
    problems.above_zero("store.timeout_ms", store.timeout_ms);
    if store.key_prefix.is_empty()
        || store
            .key_prefix
            .chars()
            .any(|c| matches!(c, '{' | '}') || c.is_whitespace() || c.is_control())
    {
        problems.add(
            "store.key_prefix",
            "must be non-empty, without braces or spaces",
        );
    }
    let longest = file
        .upstreams
        .iter()
        .map(|u| (u.timeout_ms, u.name.as_str()))
        .max();
    match longest {
        _ if store.lease_ms == 0 => problems.add("store.lease_ms", "must be above 0"),
        Some((timeout_ms, name)) if store.lease_ms <= timeout_ms => problems.add(
            "store.lease_ms",
            format!(
                "must be longer than every upstream's timeout_ms ({timeout_ms} for {name:?}), \
                 or a slow request's concurrency slot is freed while it still runs"
            ),
        ),
        _ => {}
    }
    RedisOptions {
        prefix: store.key_prefix.clone(),
        lease: Duration::from_millis(store.lease_ms),
        timeout: Duration::from_millis(store.timeout_ms),
        clock: RedisClock::Server,
    }
}

/// `[cache]`: a Redis cache lives on the store's Redis, so it needs one.
fn cache(file: &schema::File, problems: &mut Problems) -> CacheSettings {
    let section = &file.cache;
    let kind = match section.kind {
        schema::CacheKind::Off => CacheKind::Off,
        schema::CacheKind::Memory => CacheKind::Memory,
        schema::CacheKind::Redis => {
            if file.store.kind != StoreKind::Redis {
                problems.add(
                    "cache.kind",
                    "\"redis\" keeps entries on the store's Redis: it needs store.kind = \"redis\"",
                );
            }
            CacheKind::Redis
        }
    };
    CacheSettings {
        kind,
        ttl: Duration::from_secs(problems.above_zero("cache.ttl_s", section.ttl_s)),
        max_bytes: problems.above_zero("cache.max_bytes", section.max_bytes),
    }
}

/// `[alerts]`: the webhook's URL (http or https, any host: it is the
/// operator's own) and the thresholds.
fn alerts(section: &schema::Alerts, problems: &mut Problems) -> Option<AlertSettings> {
    let url = match reqwest::Url::parse(&section.webhook_url) {
        _ if section.webhook_url.is_empty() => {
            problems.add("alerts.webhook_url", "required");
            None
        }
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Some(url),
        Ok(_) => {
            problems.add("alerts.webhook_url", "must be an http:// or https:// URL");
            None
        }
        // The URL may carry a token: name the problem, never the URL.
        Err(e) => {
            problems.add("alerts.webhook_url", format!("not a URL: {e}"));
            None
        }
    };
    if section.thresholds.is_empty() {
        problems.add("alerts.thresholds", "must list at least one threshold");
    }
    let mut fine = !section.thresholds.is_empty();
    for (i, threshold) in section.thresholds.iter().enumerate() {
        if !(*threshold > 0.0 && *threshold <= 1.0) {
            problems.add(
                format!("alerts.thresholds[{i}]"),
                format!("{threshold} is not a fraction in (0, 1] (0.8 is 80% of a window)"),
            );
            fine = false;
        } else if i > 0 && section.thresholds[i - 1] >= *threshold {
            problems.add(
                format!("alerts.thresholds[{i}]"),
                "must be above the one before it (ascending, each once)",
            );
            fine = false;
        }
    }
    if section
        .secret
        .as_ref()
        .is_some_and(|s| s.expose().is_empty())
    {
        problems.add(
            "alerts.secret",
            "must not be empty (leave it out to sign nothing)",
        );
        fine = false;
    }
    Some(AlertSettings {
        webhook_url: url?,
        secret: section.secret.clone(),
        thresholds: section.thresholds.clone(),
    })
    .filter(|_| fine)
}

fn spend_log(log: &schema::SpendLog, problems: &mut Problems) -> SpendSettings {
    let queue_capacity = problems.above_zero("spend_log.queue_capacity", log.queue_capacity);
    let batch_size = problems.above_zero("spend_log.batch_size", log.batch_size);
    let flush_ms = problems.above_zero("spend_log.flush_ms", log.flush_ms);
    if log.kind != SpendLogKind::Postgres && log.url.is_some() {
        problems.add("spend_log.url", "only with spend_log.kind = \"postgres\"");
    }
    if log.kind != SpendLogKind::Sqlite && log.path.is_some() {
        problems.add("spend_log.path", "only with spend_log.kind = \"sqlite\"");
    }
    if log.kind != SpendLogKind::Postgres && log.spool_path.is_some() {
        problems.add(
            "spend_log.spool_path",
            "only with spend_log.kind = \"postgres\"",
        );
    }
    if log.spool_path.as_deref() == Some("") {
        problems.add("spend_log.spool_path", "must name a file");
    }
    let spool_max_records =
        problems.above_zero("spend_log.spool_max_records", log.spool_max_records);
    let backend = match log.kind {
        SpendLogKind::Off => SpendBackend::Off,
        SpendLogKind::Sqlite => {
            if log.path.as_deref() == Some("") {
                problems.add("spend_log.path", "must name a file");
            }
            SpendBackend::Sqlite {
                path: log.path.as_ref().map(PathBuf::from),
            }
        }
        SpendLogKind::Postgres => match &log.url {
            None => {
                problems.add(
                    "spend_log.url",
                    "required when spend_log.kind = \"postgres\"",
                );
                SpendBackend::Off
            }
            Some(url) => {
                // The URL may carry a password: name the problem, never the URL.
                let mode = match crate::spend::postgres::check_url(url.expose()) {
                    Ok((_, mode)) => Some(mode),
                    Err(e) => {
                        problems.add("spend_log.url", e);
                        None
                    }
                };
                let ca_file = log
                    .ca_file
                    .as_deref()
                    .and_then(|path| private_ca("spend_log.ca_file", path, problems));
                if log.ca_file.is_some()
                    && mode.is_some_and(|mode| mode != crate::spend::postgres::TlsMode::VerifyFull)
                {
                    // Only verify-full checks certificates: a CA given with
                    // any other mode would look like protection it is not.
                    problems.add(
                        "spend_log.ca_file",
                        "only with sslmode=verify-full in spend_log.url (the other modes \
                         check no certificate)",
                    );
                }
                SpendBackend::Postgres {
                    url: url.clone(),
                    ca_file,
                    spool: log.spool_path.as_ref().map(PathBuf::from),
                }
            }
        },
    };
    if log.kind != SpendLogKind::Postgres && log.ca_file.is_some() {
        problems.add(
            "spend_log.ca_file",
            "only with spend_log.kind = \"postgres\"",
        );
    }
    SpendSettings {
        backend,
        retention: (log.retention_days > 0)
            .then(|| Duration::from_secs(log.retention_days.saturating_mul(86_400))),
        writer: WriterOptions {
            queue_capacity,
            batch_size,
            flush: Duration::from_millis(flush_ms),
            spool_max_records,
            ..WriterOptions::default()
        },
    }
}

/// The private CA in the PEM file at `path`, or a problem at `key`.
fn private_ca(key: &str, path: &str, problems: &mut Problems) -> Option<PrivateCa> {
    if path.is_empty() {
        problems.add(key, "must name a file");
        return None;
    }
    PrivateCa::load(std::path::Path::new(path))
        .map_err(|e| problems.add(key, e))
        .ok()
}

fn images(images: &schema::Images, problems: &mut Problems) -> ImagesSettings {
    let allowed_networks = networks(
        &images.allowed_networks,
        "images.allowed_networks",
        problems,
    );
    let timeout_ms = problems.above_zero("images.fetch_timeout_ms", images.fetch_timeout_ms);
    ImagesSettings {
        fetch: FetchLimits {
            timeout: Duration::from_millis(timeout_ms),
            max_bytes: images.max_bytes,
            max_redirects: images.max_redirects,
        },
        max_images_per_request: images.max_images_per_request,
        max_pixels: images.max_pixels,
        allowed_networks,
        cache_bytes: images.cache_bytes,
        cache_ttl: Duration::from_secs(images.cache_ttl_s),
        strip_metadata: images.strip_metadata,
        max_decode_bytes: problems.above_zero("images.max_decode_bytes", images.max_decode_bytes),
    }
}

fn upstreams(upstreams: &[schema::Upstream], problems: &mut Problems) -> Vec<Arc<Upstream>> {
    let mut names = HashSet::new();
    let mut resolved = Vec::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let at = |key: &str| format!("upstreams[{i}].{key}");
        if upstream.name.is_empty() {
            problems.add(at("name"), "required");
        } else if !names.insert(upstream.name.as_str()) {
            problems.add(
                at("name"),
                format!("duplicate upstream {:?}", upstream.name),
            );
        }
        let endpoint = match upstream.kind {
            UpstreamKind::Openai => http_endpoint(upstream, i, problems),
            UpstreamKind::Demo => {
                for (key, set) in [
                    ("base_url", !upstream.base_url.is_empty()),
                    ("api_key", upstream.api_key.is_some()),
                    ("ca_file", upstream.ca_file.is_some()),
                ] {
                    if set {
                        problems.add(at(key), "not used by kind = \"demo\": leave it out");
                    }
                }
                Some(Endpoint::Demo)
            }
        };
        let formats = image_formats(&upstream.image_formats, i, problems);
        if upstream.max_image_bytes == Some(0) {
            problems.add(at("max_image_bytes"), "must be above 0");
        }
        let timeout_ms = problems.above_zero(&at("timeout_ms"), upstream.timeout_ms);
        for (key, limit) in [
            ("requests_per_minute", upstream.requests_per_minute),
            ("tokens_per_minute", upstream.tokens_per_minute),
            ("max_concurrent", upstream.max_concurrent),
        ] {
            if limit == Some(0) {
                problems.add(at(key), "must be above 0 (leave it out for no limit)");
            }
        }
        if let Some(endpoint) = endpoint {
            resolved.push(Arc::new(Upstream {
                name: upstream.name.clone(),
                endpoint,
                timeout: Duration::from_millis(timeout_ms),
                images: ImagePolicy {
                    inline: upstream.inline_images,
                    strip_detail: upstream.strip_detail,
                    formats,
                    max_image_bytes: upstream.max_image_bytes,
                },
                stream_usage: upstream.stream_usage,
                pacing: Limits {
                    requests_per_minute: upstream.requests_per_minute,
                    tokens_per_minute: upstream.tokens_per_minute,
                    max_concurrent: upstream.max_concurrent,
                    ..Limits::default()
                },
            }));
        }
    }
    resolved
}

/// `{base_url}/chat/completions`, `{base_url}/embeddings` and the
/// `Authorization` header for them.
fn http_endpoint(
    upstream: &schema::Upstream,
    i: usize,
    problems: &mut Problems,
) -> Option<Endpoint> {
    let at = |key: &str| format!("upstreams[{i}].{key}");
    let base = upstream.base_url.trim_end_matches('/');
    let chat_url = match reqwest::Url::parse(&format!("{base}/chat/completions")) {
        _ if upstream.base_url.is_empty() => {
            problems.add(at("base_url"), "required");
            None
        }
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            // A URL may be printed (Debug, errors); only `api_key` never is.
            problems.add(
                at("base_url"),
                "must not contain a user name or password: put the key in api_key",
            );
            None
        }
        // Checked by the URL standard's parser, sent as the `Uri` the HTTP
        // client takes (the serialized URL always parses as one).
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            match url.as_str().parse::<http::Uri>() {
                Ok(uri) => Some(uri),
                Err(e) => {
                    problems.add(at("base_url"), format!("not a URL: {e}"));
                    None
                }
            }
        }
        Ok(_) => {
            problems.add(at("base_url"), "must be an http:// or https:// URL");
            None
        }
        Err(e) => {
            problems.add(at("base_url"), format!("not a URL: {e}"));
            None
        }
    };
    let authorization = match &upstream.api_key {
        Some(key) if !key.expose().is_empty() => {
            match HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    Some(value)
                }
                Err(_) => {
                    problems.add(at("api_key"), "is not a valid header value");
                    None
                }
            }
        }
        _ => None,
    };
    let ca = upstream
        .ca_file
        .as_deref()
        .and_then(|path| private_ca(&at("ca_file"), path, problems));
    if let (Some(_), Some(url)) = (&ca, &chat_url)
        && url.scheme_str() != Some("https")
    {
        problems.add(at("ca_file"), "only with an https:// base_url");
    }
    let chat_url = chat_url?;
    // The same base with another last segment: it parses as the chat URL did.
    let embeddings_url = format!("{base}/embeddings").parse::<http::Uri>().ok()?;
    // The URL standard's serialization leaves out a scheme's own port, so
    // the authority is what the HTTP client would write as `Host`.
    let host = HeaderValue::from_str(chat_url.authority()?.as_str()).ok()?;
    Some(Endpoint::Http {
        chat_url,
        embeddings_url,
        host,
        authorization,
        ca,
    })
}

fn image_formats(names: &[String], upstream: usize, problems: &mut Problems) -> FormatSet {
    if names.is_empty() {
        problems.add(
            format!("upstreams[{upstream}].image_formats"),
            "must list at least one format",
        );
    }
    let mut formats = Vec::new();
    for (j, name) in names.iter().enumerate() {
        match Format::from_name(name) {
            Some(format) => formats.push(format),
            None => problems.add(
                format!("upstreams[{upstream}].image_formats[{j}]"),
                format!(
                    "unknown format {name:?}; known: {}",
                    Format::ALL.map(Format::name).join(", ")
                ),
            ),
        }
    }
    FormatSet::of(&formats)
}

fn models(
    models: &[schema::Model],
    upstreams: &[Arc<Upstream>],
    problems: &mut Problems,
) -> Vec<Model> {
    let mut names = HashSet::new();
    let mut resolved = Vec::new();
    for (i, model) in models.iter().enumerate() {
        let at = |key: &str| format!("models[{i}].{key}");
        if model.name.is_empty() {
            problems.add(at("name"), "required");
        } else if !names.insert(model.name.as_str()) {
            problems.add(at("name"), format!("duplicate model {:?}", model.name));
        }
        let max_output_tokens =
            problems.above_zero(&at("max_output_tokens"), model.max_output_tokens);
        let deployments = deployments(model, i, upstreams, problems);
        if !deployments.is_empty() {
            resolved.push(Model {
                name: model.name.clone(),
                api: model.endpoint.into(),
                reserve_price: Price::highest(deployments.iter().filter_map(|d| d.price.as_ref())),
                deployments,
                max_output_tokens,
                cache: model.cache,
            });
        }
    }
    resolved
}

/// A model's deployments: `upstream = …` as the one-deployment shorthand,
/// or `deployments = […]`, in priority order.
fn deployments(
    model: &schema::Model,
    i: usize,
    upstreams: &[Arc<Upstream>],
    problems: &mut Problems,
) -> Vec<Deployment> {
    let written: Vec<(String, schema::Deployment)> =
        match (&model.upstream, model.deployments.is_empty()) {
            (Some(_), false) => {
                problems.add(
                    format!("models[{i}]"),
                    "set upstream or deployments, not both",
                );
                return Vec::new();
            }
            (None, true) => {
                problems.add(format!("models[{i}].upstream"), "required (or deployments)");
                return Vec::new();
            }
            (Some(upstream), true) => vec![(
                format!("models[{i}].upstream"),
                schema::Deployment {
                    upstream: upstream.clone(),
                    ..schema::Deployment::default()
                },
            )],
            (None, false) => model
                .deployments
                .iter()
                .enumerate()
                .map(|(j, d)| (format!("models[{i}].deployments[{j}]"), d.clone()))
                .collect(),
        };
    let mut resolved: Vec<Deployment> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut tier_weights: Vec<(u32, u64)> = Vec::new();
    for (at, written) in &written {
        let shorthand = model.deployments.is_empty();
        let field = |key: &str| {
            if shorthand {
                at.clone()
            } else {
                format!("{at}.{key}")
            }
        };
        let upstream = upstreams.iter().find(|u| u.name == written.upstream);
        if upstream.is_none() {
            problems.add(
                field("upstream"),
                format!("no upstream named {:?}", written.upstream),
            );
        }
        let weight = u32::try_from(written.weight).ok().filter(|w| *w >= 1);
        if weight.is_none() {
            problems.add(field("weight"), "must be 1 or more");
        }
        let priority = u32::try_from(written.priority).ok();
        if priority.is_none() {
            problems.add(field("priority"), "must be 0 or more");
        }
        let upstream_model = written
            .upstream_model
            .clone()
            .or_else(|| model.upstream_model.clone())
            .filter(|m| m != &model.name);
        let sent_as = upstream_model.as_deref().unwrap_or(&model.name);
        if !seen.insert((written.upstream.clone(), sent_as.to_owned())) {
            problems.add(
                at.clone(),
                "duplicate deployment (same upstream and upstream_model)",
            );
            continue;
        }
        let priority = priority.unwrap_or(0);
        match tier_weights.iter_mut().find(|(p, _)| *p == priority) {
            Some((_, total)) => *total += u64::from(weight.unwrap_or(0)),
            None => tier_weights.push((priority, u64::from(weight.unwrap_or(0)))),
        }
        if let (Some(upstream), Some(weight)) = (upstream, weight) {
            resolved.push(Deployment {
                key: Arc::from(format!("{}/{sent_as}", upstream.name)),
                upstream: Arc::clone(upstream),
                upstream_model,
                weight,
                priority,
                price: written.price.or(model.price),
            });
        }
    }
    for (priority, total) in tier_weights {
        if total == 0 {
            problems.add(
                format!("models[{i}].deployments"),
                format!("priority {priority} has no deployment with a weight"),
            );
        }
    }
    // Stable: config order within a priority.
    resolved.sort_by_key(|d| d.priority);
    resolved
}

fn routing(routing: &schema::Routing, problems: &mut Problems) -> RoutingSettings {
    let mut retry_on = RetryOn {
        connect: false,
        timeout: false,
        statuses: Vec::new(),
    };
    for (i, condition) in routing.retry_on.iter().enumerate() {
        let at = format!("routing.retry_on[{i}]");
        match condition {
            schema::RetryOn::Condition(name) if name == "connect" => retry_on.connect = true,
            schema::RetryOn::Condition(name) if name == "timeout" => retry_on.timeout = true,
            schema::RetryOn::Condition(name) => problems.add(
                at,
                format!(
                    "unknown condition {name:?}; known: \"connect\", \"timeout\", or an HTTP status"
                ),
            ),
            schema::RetryOn::Status(status) => match u16::try_from(*status) {
                Ok(status @ 400..=599) => retry_on.statuses.push(status),
                _ => problems.add(
                    at,
                    format!("{status} is not an HTTP error status (400 to 599)"),
                ),
            },
        }
    }
    RoutingSettings {
        retries: routing.retries,
        retry_on,
        backoff: Duration::from_millis(routing.backoff_ms),
        max_retry_wait: Duration::from_millis(routing.max_retry_wait_ms),
        allowed_fails: problems.above_zero("routing.allowed_fails", routing.allowed_fails),
        cooldown: Duration::from_millis(routing.cooldown_ms),
        max_queue: Duration::from_millis(routing.max_queue_ms),
    }
}

fn teams(teams: &[schema::Team], problems: &mut Problems) -> Vec<Team> {
    let mut names = HashSet::new();
    let mut resolved = Vec::new();
    for (i, team) in teams.iter().enumerate() {
        let at = |key: &str| format!("teams[{i}].{key}");
        if team.name.is_empty() {
            problems.add(at("name"), "required");
        } else if team.name.chars().any(char::is_control) {
            // As for clients: names go into logs, metric labels and the
            // budget store's keys.
            problems.add(at("name"), "must not contain control characters");
        } else if !names.insert(team.name.as_str()) {
            problems.add(at("name"), format!("duplicate team {:?}", team.name));
        }
        check_limits(&team.budget, &at("budget"), problems);
        resolved.push(Team {
            name: Arc::from(team.name.as_str()),
            budget: team.budget,
        });
    }
    resolved
}

fn clients(
    clients: &[schema::Client],
    models: &[Model],
    teams: &[Team],
    problems: &mut Problems,
    warnings: &mut Vec<Problem>,
) -> Vec<Client> {
    let now = crate::catalog::now();
    let mut names = HashSet::new();
    let mut keys: Vec<KeyHash> = Vec::new();
    let mut resolved = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let at = |key: &str| format!("clients[{i}].{key}");
        if client.name.is_empty() {
            problems.add(at("name"), "required");
        } else if client.name.chars().any(char::is_control) {
            // Names go into logs and metric labels (and control characters
            // are how upstream pacing accounts are kept apart from clients).
            problems.add(at("name"), "must not contain control characters");
        } else if !names.insert(client.name.as_str()) {
            problems.add(at("name"), format!("duplicate client {:?}", client.name));
        }
        let key = match KeyHash::parse(&client.key) {
            Ok(hash) if keys.contains(&hash) => {
                problems.add(
                    at("key"),
                    "the same key hash is configured for another client",
                );
                None
            }
            Ok(hash) => {
                keys.push(hash);
                Some(hash)
            }
            Err(message) => {
                problems.add(at("key"), message);
                None
            }
        };
        for (j, model) in client.models.iter().enumerate() {
            if model != "*" && !models.iter().any(|m| &m.name == model) {
                problems.add(
                    format!("clients[{i}].models[{j}]"),
                    format!("no model named {model:?}"),
                );
            }
        }
        check_limits(&client.budget, &at("budget"), problems);
        if let Some(team) = &client.team
            && !teams.iter().any(|t| &*t.name == team.as_str())
        {
            problems.add(at("team"), format!("no team named {team:?}"));
        }
        let expires_at = client.expires_at.as_deref().and_then(|text| {
            let parsed = parse_instant(text)
                .map_err(|message| problems.add(at("expires_at"), message))
                .ok()?;
            if parsed <= now {
                warnings.push(Problem::new(
                    at("expires_at"),
                    format!(
                        "{text} is past: the key of {:?} gets key_expired",
                        client.name
                    ),
                ));
            }
            Some(parsed)
        });
        let allowed_networks =
            networks(&client.allowed_networks, &at("allowed_networks"), problems);
        let models = if client.models.iter().any(|m| m == "*") {
            ModelAccess::All
        } else {
            ModelAccess::Only(client.models.clone())
        };
        if let Some(key) = key {
            resolved.push(Client {
                name: Arc::from(client.name.as_str()),
                key,
                models,
                budget: client.budget,
                team: client.team.as_deref().map(Arc::from),
                expires_at,
                allowed_networks,
            });
        }
    }
    resolved
}

/// A warning for each client with a cost limit that may use a model without
/// a price on every deployment: its requests there cost nothing, so the
/// limit does not hold them.
fn unpriced_cost_limits(clients: &[Client], models: &[Model]) -> Vec<Problem> {
    let mut warnings = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        if !client.budget.counts_cost() {
            continue;
        }
        let unpriced: Vec<&str> = models
            .iter()
            .filter(|m| client.may_use(&m.name))
            .filter(|m| m.deployments.iter().any(|d| d.price.is_none()))
            .map(|m| m.name.as_str())
            .collect();
        if !unpriced.is_empty() {
            warnings.push(Problem::new(
                format!("clients[{i}].budget"),
                format!(
                    "has a cost limit but may use {} without a price (free there, so not held \
                     to the limit): set models[].price",
                    unpriced
                        .iter()
                        .map(|m| format!("{m:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    warnings
}

/// An RFC 3339 instant with its offset (`2027-01-01T00:00:00Z`,
/// `2027-01-01T01:00:00+01:00`).
pub fn parse_instant(text: &str) -> Result<jiff::Timestamp, String> {
    text.parse::<jiff::Timestamp>().map_err(|_| {
        format!("{text:?} is not an RFC 3339 time with an offset, such as 2027-01-01T00:00:00Z")
    })
}

fn check_limits(budget: &Limits, at: &str, problems: &mut Problems) {
    for (key, limit) in [
        ("cost_per_day", budget.cost_per_day),
        ("cost_per_month", budget.cost_per_month),
    ] {
        if limit == Some(Money::ZERO) {
            problems.add(
                format!("{at}.{key}"),
                "must be above 0 (leave it out for no limit)",
            );
        }
    }
    for (key, limit) in [
        ("requests_per_minute", budget.requests_per_minute),
        ("tokens_per_minute", budget.tokens_per_minute),
        ("tokens_per_day", budget.tokens_per_day),
        ("tokens_per_month", budget.tokens_per_month),
        ("max_concurrent", budget.max_concurrent),
    ] {
        if limit == Some(0) {
            problems.add(
                format!("{at}.{key}"),
                "must be above 0 (leave it out for no limit)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::cache::{CacheKind, CacheSettings};
    use crate::config::parse;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, &|_| None) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// The spool's keys: a path only for a PostgreSQL log, never empty; a
    /// bound above 0.
    #[test]
    fn spool_keys_are_checked() {
        let postgres = "[spend_log]\nkind = \"postgres\"\nurl = \"postgres://db/iris\"\n";
        assert!(
            problems(&format!(
                "{postgres}spool_path = \"/var/lib/iris/spool.db\""
            ))
            .is_empty()
        );
        assert_eq!(
            problems(&format!(
                "{postgres}spool_path = \"\"\nspool_max_records = 0"
            )),
            vec![
                "spend_log.spool_path: must name a file".to_string(),
                "spend_log.spool_max_records: must be above 0".to_string(),
            ]
        );
        assert_eq!(
            problems("[spend_log]\nspool_path = \"spool.db\""),
            vec!["spend_log.spool_path: only with spend_log.kind = \"postgres\"".to_string()]
        );
    }

    /// Prices and cost limits: every bad one at its key path; a client with
    /// a cost limit that may use an unpriced model is a warning.
    #[test]
    fn prices_and_cost_limits_are_checked_with_their_key_paths() {
        let config = |price: &str, limit: &str| {
            format!(
                r#"
                [[upstreams]]
                name = "u"
                base_url = "http://127.0.0.1:1/v1"
                [[models]]
                name = "m"
                upstream = "u"
                {price}
                [[models]]
                name = "free"
                upstream = "u"
                [[clients]]
                name = "c"
                key = "{}"
                [clients.budget]
                {limit}
                "#,
                crate::keys::KeyHash::of("k")
            )
        };
        for (price, limit, expected) in [
            (
                "price = { input = -1.0, output = 2.0 }",
                "",
                "models[0].price.input: -1 is not an amount of money",
            ),
            (
                r#"price = { input = "2.5", output = 2.0 }"#,
                "",
                "models[0].price.input: invalid type: string",
            ),
            (
                "price = { input = 1.0 }",
                "",
                "models[0].price: missing field `output`",
            ),
            (
                "",
                "cost_per_day = 0.0",
                "clients[0].budget.cost_per_day: must be above 0",
            ),
            (
                "",
                "cost_per_month = -3",
                "clients[0].budget.cost_per_month: -3 is not an amount of money",
            ),
        ] {
            let found = problems(&config(price, limit));
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{price} {limit}: {found:?}"
            );
        }
        let warned = parse(
            &config(
                "price = { input = 1.0, output = 2.0 }",
                "cost_per_day = 5.0",
            ),
            &|_| None,
        )
        .expect("a warning is no problem");
        let warnings: Vec<String> = warned.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("clients[0].budget: has a cost limit but may use \"free\""),
            "{warnings:?}"
        );
        let priced = warned.catalog.model("m").expect("model").reserve_price;
        assert_eq!(
            priced.map(|p| (p.input.micros(), p.cached_input.micros(), p.output.micros())),
            Some((1_000_000, 1_000_000, 2_000_000)),
            "cached_input defaults to input"
        );
    }

    #[test]
    fn cross_references_are_checked() {
        let found = problems(
            r#"
            [[upstreams]]
            name = "a"
            base_url = "http://a/v1"
            [[upstreams]]
            name = "b"
            base_url = "ftp://b"
            image_formats = ["png", "avif"]
            [[models]]
            name = "m"
            upstream = "x"
            [[clients]]
            name = "c"
            key = "plain-key"
            models = ["m", "nope"]
            [clients.budget]
            tokens_per_day = 0
            "#,
        );
        for expected in [
            "upstreams[1].base_url: must be an http:// or https:// URL",
            "models[0].upstream: no upstream named \"x\"",
            "clients[0].models[1]: no model named \"nope\"",
            "clients[0].budget.tokens_per_day: must be above 0 (leave it out for no limit)",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "missing {expected:?} in {found:?}"
            );
        }
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("upstreams[1].image_formats[1]: unknown format"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("clients[0].key: must start with"))
        );
    }

    #[test]
    fn deployments_are_checked_with_their_key_paths() {
        let found = problems(
            r#"
            [[upstreams]]
            name = "a"
            base_url = "http://a/v1"
            [[upstreams]]
            name = "b"
            base_url = "http://b/v1"
            [[models]]
            name = "m"
            deployments = [
              { upstream = "a", weight = 0 },
              { upstream = "nope" },
              { upstream = "b", priority = -1 },
              { upstream = "a", upstream_model = "m" },
            ]
            [[models]]
            name = "both"
            upstream = "a"
            deployments = [{ upstream = "b" }]
            [[models]]
            name = "neither"
            [routing]
            retry_on = ["connect", "sometimes", 200, 503]
            "#,
        );
        for expected in [
            "models[0].deployments[0].weight: must be 1 or more",
            "models[0].deployments[1].upstream: no upstream named \"nope\"",
            "models[0].deployments[2].priority: must be 0 or more",
            "models[0].deployments[3]: duplicate deployment (same upstream and upstream_model)",
            "models[1]: set upstream or deployments, not both",
            "models[2].upstream: required (or deployments)",
            "routing.retry_on[2]: 200 is not an HTTP error status (400 to 599)",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "missing {expected:?} in {found:?}"
            );
        }
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("routing.retry_on[1]: unknown condition \"sometimes\""))
        );
    }

    #[test]
    fn deployments_are_resolved_in_priority_order() {
        let config = parse(
            r#"
            [[upstreams]]
            name = "a"
            base_url = "http://a/v1"
            requests_per_minute = 60
            [[upstreams]]
            name = "b"
            base_url = "http://b/v1"
            [[models]]
            name = "m"
            upstream_model = "shared-name"
            deployments = [
              { upstream = "b", priority = 1 },
              { upstream = "a", weight = 3, upstream_model = "own-name" },
            ]
            [routing]
            retries = 5
            retry_on = [503, "timeout"]
            "#,
            &|_| None,
        )
        .expect("valid");
        let model = config.catalog.model("m").expect("model");
        let summary: Vec<(&str, u32, u32, Option<&str>)> = model
            .deployments
            .iter()
            .map(|d| {
                (
                    d.upstream.name.as_str(),
                    d.weight,
                    d.priority,
                    d.upstream_model.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", 3, 0, Some("own-name")),
                ("b", 1, 1, Some("shared-name"))
            ]
        );
        assert_eq!(
            model.deployments[0].upstream.pacing.requests_per_minute,
            Some(60)
        );
        assert_eq!(config.routing.retries, 5);
        assert!(config.routing.retry_on.timeout && !config.routing.retry_on.connect);
        assert_eq!(config.routing.retry_on.statuses, [503]);
    }

    #[test]
    fn values_are_typed_once() {
        let config = parse(
            r#"
            [server]
            listen = "127.0.0.1:9"
            shutdown_grace_ms = 1500
            [images]
            allowed_networks = ["10.1.0.0/16", "192.168.1.7"]
            fetch_timeout_ms = 2500
            [[upstreams]]
            name = "u"
            base_url = "http://127.0.0.1:1/v1/"
            image_formats = ["png", "jpeg"]
            max_image_bytes = 1000
            timeout_ms = 700
            "#,
            &|_| None,
        )
        .expect("valid");
        assert_eq!(config.server.listen.port(), 9);
        assert_eq!(config.server.shutdown_grace.as_millis(), 1500);
        assert_eq!(config.images.fetch.timeout.as_millis(), 2500);
        assert_eq!(
            config
                .images
                .allowed_networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.1.0.0/16", "192.168.1.7/32"]
        );
        let upstream = &config.catalog.upstreams()[0];
        assert_eq!(upstream.timeout.as_millis(), 700);
        assert!(upstream.images.formats.contains(crate::images::Format::Png));
        assert!(!upstream.images.formats.contains(crate::images::Format::Gif));
        assert_eq!(upstream.images.max_image_bytes, Some(1000));
    }

    /// `Host` is written once per upstream as the HTTP client would write
    /// it: the host, and the port only when it is not the scheme's own.
    #[test]
    fn an_upstreams_host_is_its_urls_host_and_other_port() {
        for (base_url, host) in [
            ("https://api.example.com/v1", "api.example.com"),
            ("https://api.example.com:443/v1", "api.example.com"),
            ("http://API.example.com:80/v1", "api.example.com"),
            ("https://api.example.com:8443/v1", "api.example.com:8443"),
            ("http://127.0.0.1:8080/v1/", "127.0.0.1:8080"),
            ("http://[::1]:9000/v1", "[::1]:9000"),
        ] {
            let config = parse(
                &format!("[[upstreams]]\nname = \"u\"\nbase_url = \"{base_url}\"\n"),
                &|_| None,
            )
            .expect("valid");
            match &config.catalog.upstreams()[0].endpoint {
                crate::upstream::Endpoint::Http { host: sent, .. } => {
                    assert_eq!(sent, host, "{base_url}");
                }
                crate::upstream::Endpoint::Demo => panic!("an HTTP upstream"),
            }
        }
    }

    #[test]
    fn redis_store_knobs_are_checked() {
        let found = problems(
            r#"
            [store]
            kind = "redis"
            url = "redis://127.0.0.1:6379/0"
            lease_ms = 1000
            timeout_ms = 0
            key_prefix = "a{b}"
            [[upstreams]]
            name = "slow"
            base_url = "http://127.0.0.1:1/v1"
            api_key = "k"
            timeout_ms = 5000
            "#,
        );
        assert_eq!(
            found,
            vec![
                "store.timeout_ms: must be above 0".to_string(),
                "store.key_prefix: must be non-empty, without braces or spaces".to_string(),
                "store.lease_ms: must be longer than every upstream's timeout_ms (5000 for \"slow\"), \
                 or a slow request's concurrency slot is freed while it still runs"
                    .to_string(),
            ]
        );
        let bad_url =
            problems("[store]\nkind = \"redis\"\nurl = \"redis://:secret@host:notaport/0\"\n");
        assert_eq!(bad_url.len(), 1, "{bad_url:?}");
        assert!(
            bad_url[0].starts_with("store.url: not a valid Redis URL"),
            "{bad_url:?}"
        );
        assert!(!bad_url[0].contains("secret"), "{bad_url:?}");
        assert!(problems("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/3\"\n").is_empty());
    }

    #[test]
    fn cluster_and_sentinel_urls_are_checked_without_printing_passwords() {
        let store = |url: &str| problems(&format!("[store]\nkind = \"redis\"\nurl = \"{url}\"\n"));
        for good in [
            "redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7000/",
            "rediss+cluster://iris:secret@node-a",
            "redis+sentinel://:secret@s1:26379,s2:26379/mymaster",
            "rediss+sentinel://s1/mymaster/2?sentinel_password=secret",
        ] {
            assert!(store(good).is_empty(), "{good}: {:?}", store(good));
        }
        for (bad, expected) in [
            (
                "redis+cluster://:secret@a:7000/2",
                "store.url: a Redis Cluster has only database 0",
            ),
            (
                "redis+sentinel://:secret@s1:26379",
                "store.url: a redis+sentinel:// URL names the primary's service",
            ),
            (
                "redis+sentinel://:secret@s1:99999/m",
                "store.url: host 1: the port",
            ),
            ("memcached://:secret@a", "store.url: must be a redis://"),
        ] {
            let found = store(bad);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(found[0].starts_with(expected), "{bad}: {found:?}");
            assert!(!found[0].contains("secret"), "{bad}: {found:?}");
        }
    }

    #[test]
    fn teams_are_checked_and_named_on_their_clients() {
        let found = problems(
            "[[teams]]\nname = \"blue\"\n[[teams]]\nname = \"blue\"\n\
             [[teams]]\nname = \"\"\n[[teams]]\nname = \"re\\u0007d\"\n\
             [teams.budget]\ntokens_per_day = 0\n\
             [[clients]]\nname = \"c\"\nkey = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nteam = \"green\"\n",
        );
        assert_eq!(
            found,
            [
                "teams[1].name: duplicate team \"blue\"",
                "teams[2].name: required",
                "teams[3].name: must not contain control characters",
                "teams[3].budget.tokens_per_day: must be above 0 (leave it out for no limit)",
                "clients[0].team: no team named \"green\"",
            ]
        );
        let config = parse(
            &format!(
                "[[teams]]\nname = \"blue\"\n[teams.budget]\ntokens_per_day = 500\n\
                 [[clients]]\nname = \"c\"\nkey = \"{}\"\nteam = \"blue\"\n\
                 [[clients]]\nname = \"d\"\nkey = \"{}\"\n",
                crate::keys::KeyHash::of("c"),
                crate::keys::KeyHash::of("d")
            ),
            &|_| None,
        )
        .expect("valid");
        let team = config.catalog.team("blue").expect("team");
        assert_eq!(team.budget.tokens_per_day, Some(500));
        assert_eq!(config.catalog.teams().len(), 1);
        assert!(config.catalog.team("green").is_none());
        let clients = config.catalog.clients();
        assert_eq!(clients[0].team.as_deref(), Some("blue"));
        assert_eq!(clients[1].team, None);
    }

    #[test]
    fn key_policy_and_trusted_proxies_are_checked_with_their_key_paths() {
        let key = crate::keys::KeyHash::of("k");
        let text = |expires_at: &str| {
            format!(
                r#"
                [server]
                trusted_proxies = ["10.0.0.0/8", "fd00::/8", "10.0.0.300"]
                [[clients]]
                name = "c"
                key = "{key}"
                expires_at = "{expires_at}"
                allowed_networks = ["192.168.0.0/16", "2001:db8::/32", "192.168.0.0/33"]
                "#
            )
        };
        assert_eq!(
            problems(&text("2027-13-01T00:00:00Z")),
            vec![
                "server.trusted_proxies[2]: \"10.0.0.300\" is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32"
                    .to_string(),
                "clients[0].expires_at: \"2027-13-01T00:00:00Z\" is not an RFC 3339 time with an \
                 offset, such as 2027-01-01T00:00:00Z"
                    .to_string(),
                "clients[0].allowed_networks[2]: \"192.168.0.0/33\" is not a CIDR such as 10.0.0.0/8 \
                 or 2001:db8::/32"
                    .to_string(),
            ]
        );
        // Without an offset, the instant is ambiguous: refused.
        assert!(
            problems(&text("2027-01-01T00:00:00"))
                .iter()
                .any(|p| p.starts_with("clients[0].expires_at: ")),
        );
        let valid = text("2027-01-01T01:00:00+01:00")
            .replace(", \"10.0.0.300\"", "")
            .replace(", \"192.168.0.0/33\"", "");
        let config = parse(&valid, &|_| None).expect("valid");
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let client = &config.catalog.clients()[0];
        assert_eq!(
            client.expires_at.map(|at| at.to_string()).as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(client.allowed_networks.len(), 2);
        assert_eq!(config.server.trusted_proxies.len(), 2);
    }

    #[test]
    fn a_config_client_already_expired_is_a_warning_not_a_problem() {
        let config = parse(
            &format!(
                "[[clients]]\nname = \"old\"\nkey = \"{}\"\nexpires_at = \"2020-01-01T00:00:00Z\"\n",
                crate::keys::KeyHash::of("k")
            ),
            &|_| None,
        )
        .expect("valid: a warning only");
        let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "clients[0].expires_at: 2020-01-01T00:00:00Z is past: the key of \"old\" gets key_expired"
            ]
        );
    }

    #[test]
    fn redis_store_needs_a_url() {
        assert_eq!(
            problems("[store]\nkind = \"redis\"\n"),
            vec!["store.url: required when store.kind = \"redis\"".to_string()]
        );
    }

    #[test]
    fn alerts_are_checked_with_their_key_paths() {
        let with = |table: &str| format!("[alerts]\n{table}\n");
        assert_eq!(
            problems(&with("thresholds = [0.5]")),
            vec!["alerts.webhook_url: required".to_string()]
        );
        assert_eq!(
            problems(&with(
                "webhook_url = \"ftp://hooks.example/x\"\nthresholds = [0, 0.9, 0.5, 1.5]"
            )),
            vec![
                "alerts.webhook_url: must be an http:// or https:// URL".to_string(),
                "alerts.thresholds[0]: 0 is not a fraction in (0, 1] (0.8 is 80% of a window)"
                    .to_string(),
                "alerts.thresholds[2]: must be above the one before it (ascending, each once)"
                    .to_string(),
                "alerts.thresholds[3]: 1.5 is not a fraction in (0, 1] (0.8 is 80% of a window)"
                    .to_string(),
            ]
        );
        assert_eq!(
            problems(&with("webhook_url = \"not a url\"\nthresholds = []")),
            vec![
                "alerts.webhook_url: not a URL: relative URL without a base".to_string(),
                "alerts.thresholds: must list at least one threshold".to_string(),
            ]
        );
        // Loopback and private addresses are the operator's to choose.
        let config = parse(
            &with("webhook_url = \"http://127.0.0.1:9/hook\"\nsecret = \"s3cret\""),
            &|_| None,
        )
        .expect("valid");
        let alerts = config.alerts.expect("[alerts]");
        assert_eq!(alerts.thresholds, [0.8, 1.0]);
        assert_eq!(alerts.webhook_url.as_str(), "http://127.0.0.1:9/hook");
        assert!(!format!("{alerts:?}").contains("s3cret"));
        assert!(parse("", &|_| None).expect("valid").alerts.is_none());
    }

    #[test]
    fn the_cache_is_checked_with_its_key_paths() {
        assert_eq!(
            problems("[cache]\nkind = \"redis\"\n"),
            vec![
                "cache.kind: \"redis\" keeps entries on the store's Redis: it needs store.kind = \"redis\""
                    .to_string()
            ]
        );
        assert_eq!(
            problems("[cache]\nkind = \"memory\"\nttl_s = 0\nmax_bytes = 0\n"),
            vec![
                "cache.ttl_s: must be above 0".to_string(),
                "cache.max_bytes: must be above 0".to_string(),
            ]
        );
        let config = parse(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/0\"\n[cache]\nkind = \"redis\"\nttl_s = 60\n\
             [[upstreams]]\nname = \"u\"\nbase_url = \"http://u/v1\"\n\
             [[models]]\nname = \"m\"\nupstream = \"u\"\ncache = true\n",
            &|_| None,
        )
        .expect("valid");
        assert_eq!(config.cache.kind, CacheKind::Redis);
        assert_eq!(config.cache.ttl, Duration::from_secs(60));
        assert!(config.catalog.model("m").expect("m").cache);
        let defaults = parse("", &|_| None).expect("valid").cache;
        assert_eq!(defaults, CacheSettings::default());
        assert_eq!(defaults.kind, CacheKind::Off);
    }
}
