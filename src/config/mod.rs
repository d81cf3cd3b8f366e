//! The config: from TOML text to the typed [`Config`] the server runs on, in
//! one path that `iris check` and `iris serve` share: read the TOML, expand
//! `${ENV}`, deserialize its shape ([`schema`]), then [`resolve`] every value
//! into its type, checking each.
//!
//! Every problem is reported with its key path (`upstreams[1].base_url: …`),
//! and loading goes on past the first one so `iris check` can list them all.
//!
//! The config sits above the modules whose settings it fills (budget,
//! images, upstream, catalog): they define the typed values they need, and
//! only this module knows how a file spells them.

mod env;
mod resolve;
pub use resolve::parse_instant;
pub mod schema;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::alerts::AlertSettings;
use crate::budget::StoreSettings;
use crate::cache::CacheSettings;
use crate::catalog::Catalog;
use crate::images::ImagesSettings;
use crate::keys::KeyHash;
use crate::openai::chat::RequestLimits;
use crate::routing::RoutingSettings;
use crate::spend::SpendSettings;

/// A whole, valid configuration: one immutable snapshot of what the server
/// runs on. Held behind an atomic pointer by the app and taken once per
/// request, so a reload is a pointer swap.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub store: StoreSettings,
    pub images: ImagesSettings,
    pub routing: RoutingSettings,
    /// The operator's key, when `[admin]` is set (else no `/admin/*`).
    pub admin: Option<KeyHash>,
    pub catalog: Catalog,
    pub spend_log: SpendSettings,
    /// `[pricing] currency`: the label of every price and cost.
    pub currency: Arc<str>,
    /// `[alerts]`: budget thresholds posted to a webhook, when set.
    pub alerts: Option<AlertSettings>,
    /// `[cache]`: the response cache (off unless set).
    pub cache: CacheSettings,
    /// What is allowed but probably a mistake (a config client whose key
    /// has already expired, a cost limit on a model without a price), each
    /// at its key path: `iris check` prints these and exits 0, the server
    /// logs them.
    pub warnings: Vec<Problem>,
}

/// `[server]`: the listener, and the limits on connections and requests
/// that keep slow or idle clients from holding the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub listen: SocketAddr,
    /// Larger request bodies are answered 413, counted as they arrive.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// The request line and headers must have arrived this long after the
    /// connection was accepted (its first request) or the request's first
    /// byte arrived (later ones); else the connection is closed.
    pub header_read_timeout: Duration,
    /// The whole body must have arrived this long after the headers; else 408.
    pub body_read_timeout: Duration,
    /// How long a connection may wait for its next request.
    pub keep_alive_timeout: Duration,
    /// The request line and headers together; larger get 431.
    pub max_header_bytes: usize,
    /// Header fields per request; more get 431.
    pub max_headers: usize,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Messages and content parts one chat completion may hold.
    pub request_limits: RequestLimits,
    /// From these peers, the client's address is taken from
    /// `X-Forwarded-For` (see [`crate::client_addr`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// One thing wrong with a config, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `upstreams[1].base_url`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one config; empty never escapes `load`.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Reads and checks the config at `path`.
pub fn load(path: &Path) -> Result<Config, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    parse(&text, &|name| std::env::var(name).ok())
}

/// Parses config text, looking environment variables up through `lookup`.
pub fn parse(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, Problems> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Problems(vec![Problem::new("", e.to_string())]))?;

    let mut problems = env::expand(&mut table, lookup);

    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
    let deserializer =
        serde_ignored::Deserializer::new(toml::Value::Table(table), &mut note_unknown);
    let file: Result<schema::File, _> = serde_path_to_error::deserialize(deserializer);
    problems.extend(
        unknown
            .into_iter()
            .map(|path| Problem::new(path, "unknown key")),
    );
    let file = match file {
        Ok(file) => file,
        Err(e) => {
            problems.push(Problem::new(e.path().to_string(), e.inner().to_string()));
            return Err(Problems(problems));
        }
    };
    match resolve::resolve(file) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(Problems(problems)),
        Err(found) => {
            problems.extend(found);
            Err(Problems(problems))
        }
    }
}

/// Renders serde_ignored's path in the same `a[1].b` form as every other problem.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text, &no_env) {
            Ok(_) => Vec::new(),
            Err(p) => p.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn empty_config_takes_every_default() {
        let config = parse("", &no_env).expect("empty config is valid");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.max_body_bytes, 33_554_432);
        assert!(matches!(
            &config.store.backend,
            crate::budget::StoreBackend::Sqlite { path } if path.as_os_str() == "iris.db"
        ));
        assert_eq!(config.images.max_images_per_request, 16);
    }

    #[test]
    fn unknown_keys_are_all_named_with_their_path() {
        let found = problems(
            r#"
            typo = 1
            [server]
            lisen = "x"
            [[upstreams]]
            name = "a"
            base_url = "http://a/v1"
            [[upstreams]]
            name = "b"
            base_url = "http://b/v1"
            api_kye = "k"
            "#,
        );
        assert!(
            found.contains(&"typo: unknown key".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"server.lisen: unknown key".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"upstreams[1].api_kye: unknown key".to_string()),
            "{found:?}"
        );
    }

    /// Every type a config becomes (the file's shape, the typed config, the
    /// store settings, the catalog, each upstream and its endpoint, the
    /// problems found) prints no credential with `{:?}` or `{:#?}`, so
    /// neither a log line, an error nor a panic message can carry one.
    #[test]
    fn no_config_type_prints_a_secret() {
        const UPSTREAM_KEY: &str = "sk-audit-upstream-4b1e";
        const REDIS_PASSWORD: &str = "audit-redis-password-9c2d";
        let text = format!(
            r#"
            [store]
            kind = "redis"
            url = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/13"
            [[upstreams]]
            name = "u"
            base_url = "https://upstream.example/v1"
            api_key = "{UPSTREAM_KEY}"
            [[models]]
            name = "m"
            upstream = "u"
            [[clients]]
            name = "c"
            key = "{}"
            "#,
            crate::keys::KeyHash::of("audit-client-key")
        );
        let secrets = [UPSTREAM_KEY, REDIS_PASSWORD, "audit-client-key"];
        let check = |what: &str, printed: String| {
            for secret in secrets {
                assert!(
                    !printed.contains(secret),
                    "{what} prints {secret}: {printed}"
                );
            }
        };
        let table: toml::Table = text.parse().expect("toml");
        let file: schema::File = toml::Value::Table(table).try_into().expect("schema");
        check("schema::File", format!("{file:?} {file:#?}"));
        let config = parse(&text, &no_env).expect("valid");
        check("Config", format!("{config:?} {config:#?}"));
        check("StoreSettings", format!("{:?}", config.store));
        check("Catalog", format!("{:?}", config.catalog));
        for upstream in config.catalog.upstreams() {
            check("Upstream", format!("{upstream:?} {:?}", upstream.endpoint));
            // The credential is there, just not printed.
            assert!(
                matches!(&upstream.endpoint, crate::upstream::Endpoint::Http { authorization: Some(v), .. }
                    if v.as_bytes().ends_with(UPSTREAM_KEY.as_bytes()))
            );
        }
        // A config that fails names the key, never the secret in it.
        let bad = text.replace("6379/13", "notaport/13").replace(
            "https://upstream.example/v1",
            &format!("https://user:{UPSTREAM_KEY}@upstream.example/v1"),
        );
        let problems = parse(&bad, &no_env).expect_err("invalid");
        check("Problems", format!("{problems} {problems:?}"));
        for key in ["store.url", "upstreams[0].base_url"] {
            assert!(problems.0.iter().any(|p| p.path == key), "{problems}");
        }
    }

    /// Every config the repository ships passes the checks `iris check` runs.
    #[test]
    fn shipped_configs_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut paths = vec![root.join("config/iris.toml")];
        let examples = std::fs::read_dir(root.join("config/examples")).expect("examples");
        paths.extend(examples.filter_map(|e| e.ok().map(|e| e.path())));
        // Variables the examples name: key hashes must look like hashes.
        let lookup = |name: &str| {
            Some(if name.ends_with("_KEY_HASH") {
                crate::keys::KeyHash::of(name).to_string()
            } else {
                format!("value-of-{name}")
            })
        };
        for path in paths {
            let text = std::fs::read_to_string(&path).expect("read");
            if let Err(problems) = parse(&text, &lookup) {
                panic!("{}:\n{problems}", path.display());
            }
        }
    }

    #[test]
    fn type_errors_name_the_key() {
        let found = problems("[server]\nmax_body_bytes = \"big\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("server.max_body_bytes: "), "{found:?}");
    }
}
