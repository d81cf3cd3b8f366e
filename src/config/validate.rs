//! Checks that serde cannot: values in range, names unique, cross-references
//! that resolve (a model naming a missing upstream).

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{Config, Problem, StoreKind};
use crate::keys::KeyHash;

/// Image formats Iris can recognise and convert between.
pub const IMAGE_FORMATS: &[&str] = &["jpeg", "png", "webp", "gif", "bmp", "tiff"];

pub fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |path: String, message: String| problems.push(Problem::new(path, message));

    if config.server.listen.parse::<SocketAddr>().is_err() {
        problem(
            "server.listen".into(),
            format!("{:?} is not a host:port address", config.server.listen),
        );
    }
    if config.server.max_body_bytes == 0 {
        problem("server.max_body_bytes".into(), "must be above 0".into());
    }

    match config.store.kind {
        StoreKind::Redis if config.store.url.is_none() => {
            problem(
                "store.url".into(),
                "required when store.kind = \"redis\"".into(),
            );
        }
        StoreKind::Redis => {
            let url = config.store.url.as_ref().map(|u| u.expose()).unwrap_or("");
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                problem(
                    "store.url".into(),
                    "must be a redis:// or rediss:// URL".into(),
                );
            } else if let Err(e) = redis::Client::open(url) {
                // The URL may carry a password: name the problem, never the URL.
                problem(
                    "store.url".into(),
                    format!("not a valid Redis URL ({:?})", e.kind()),
                );
            }
        }
        StoreKind::Sqlite if config.store.path.is_empty() => {
            problem("store.path".into(), "must name a file".into());
        }
        _ => {}
    }

    if config.store.kind == StoreKind::Redis {
        validate_redis_store(config, &mut problem);
    }

    for (i, network) in config.images.allowed_networks.iter().enumerate() {
        if network.parse::<ipnet::IpNet>().is_err() && network.parse::<std::net::IpAddr>().is_err()
        {
            problem(
                format!("images.allowed_networks[{i}]"),
                format!("{network:?} is not a CIDR such as 10.0.0.0/8"),
            );
        }
    }
    if config.images.fetch_timeout_ms == 0 {
        problem("images.fetch_timeout_ms".into(), "must be above 0".into());
    }

    let mut upstream_names = HashSet::new();
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let at = |key: &str| format!("upstreams[{i}].{key}");
        if upstream.name.is_empty() {
            problem(at("name"), "required".into());
        } else if !upstream_names.insert(upstream.name.as_str()) {
            problem(
                at("name"),
                format!("duplicate upstream {:?}", upstream.name),
            );
        }
        match reqwest::Url::parse(&upstream.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            Ok(_) => problem(at("base_url"), "must be an http:// or https:// URL".into()),
            Err(e) if upstream.base_url.is_empty() => {
                let _ = e;
                problem(at("base_url"), "required".into());
            }
            Err(e) => problem(at("base_url"), format!("not a URL: {e}")),
        }
        for (j, format) in upstream.image_formats.iter().enumerate() {
            if !IMAGE_FORMATS.contains(&format.as_str()) {
                problem(
                    format!("upstreams[{i}].image_formats[{j}]"),
                    format!(
                        "unknown format {format:?}; known: {}",
                        IMAGE_FORMATS.join(", ")
                    ),
                );
            }
        }
        if upstream.image_formats.is_empty() {
            problem(at("image_formats"), "must list at least one format".into());
        }
        if upstream.max_image_bytes == Some(0) {
            problem(at("max_image_bytes"), "must be above 0".into());
        }
        if upstream.timeout_ms == 0 {
            problem(at("timeout_ms"), "must be above 0".into());
        }
    }

    let mut model_names = HashSet::new();
    for (i, model) in config.models.iter().enumerate() {
        let at = |key: &str| format!("models[{i}].{key}");
        if model.name.is_empty() {
            problem(at("name"), "required".into());
        } else if !model_names.insert(model.name.as_str()) {
            problem(at("name"), format!("duplicate model {:?}", model.name));
        }
        if !upstream_names.contains(model.upstream.as_str()) {
            problem(
                at("upstream"),
                format!("no upstream named {:?}", model.upstream),
            );
        }
        if model.max_output_tokens == 0 {
            problem(at("max_output_tokens"), "must be above 0".into());
        }
    }

    let mut client_names = HashSet::new();
    let mut client_keys: Vec<KeyHash> = Vec::new();
    for (i, client) in config.clients.iter().enumerate() {
        let at = |key: &str| format!("clients[{i}].{key}");
        if client.name.is_empty() {
            problem(at("name"), "required".into());
        } else if !client_names.insert(client.name.as_str()) {
            problem(at("name"), format!("duplicate client {:?}", client.name));
        }
        match KeyHash::parse(&client.key) {
            Ok(hash) if client_keys.contains(&hash) => {
                problem(
                    at("key"),
                    "the same key hash is configured for another client".into(),
                );
            }
            Ok(hash) => client_keys.push(hash),
            Err(message) => problem(at("key"), message),
        }
        for (j, model) in client.models.iter().enumerate() {
            if model != "*" && !model_names.contains(model.as_str()) {
                problem(
                    format!("clients[{i}].models[{j}]"),
                    format!("no model named {model:?}"),
                );
            }
        }
        let budget = &client.budget;
        for (key, limit) in [
            ("requests_per_minute", budget.requests_per_minute),
            ("tokens_per_minute", budget.tokens_per_minute),
            ("tokens_per_day", budget.tokens_per_day),
            ("tokens_per_month", budget.tokens_per_month),
            ("max_concurrent", budget.max_concurrent),
        ] {
            if limit == Some(0) {
                problem(
                    format!("clients[{i}].budget.{key}"),
                    "must be above 0 (leave it out for no limit)".into(),
                );
            }
        }
    }

    problems
}

/// The Redis-only knobs: a lease shorter than an upstream's timeout would
/// free a concurrency slot while its request may still be running.
fn validate_redis_store(config: &Config, problem: &mut impl FnMut(String, String)) {
    let store = &config.store;
    if store.timeout_ms == 0 {
        problem("store.timeout_ms".into(), "must be above 0".into());
    }
    if store.key_prefix.is_empty()
        || store
            .key_prefix
            .chars()
            .any(|c| matches!(c, '{' | '}') || c.is_whitespace() || c.is_control())
    {
        problem(
            "store.key_prefix".into(),
            "must be non-empty, without braces or spaces".into(),
        );
    }
    let longest = config
        .upstreams
        .iter()
        .map(|u| (u.timeout_ms, u.name.as_str()))
        .max();
    match longest {
        _ if store.lease_ms == 0 => problem("store.lease_ms".into(), "must be above 0".into()),
        Some((timeout_ms, name)) if store.lease_ms <= timeout_ms => problem(
            "store.lease_ms".into(),
            format!(
                "must be longer than every upstream's timeout_ms ({timeout_ms} for {name:?}), \
                 or a slow request's concurrency slot is freed while it still runs"
            ),
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, &|_| None) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(ToString::to_string).collect(),
        }
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
    fn redis_store_needs_a_url() {
        assert_eq!(
            problems("[store]\nkind = \"redis\"\n"),
            vec!["store.url: required when store.kind = \"redis\"".to_string()]
        );
    }
}
