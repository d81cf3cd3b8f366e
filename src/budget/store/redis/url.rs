//! `store.url`: which Redis deployment the store talks to, read from the
//! URL's scheme, so one key says everything and every command that opens
//! the store (`serve`, `usage`, `check`) reads it the same way.
//!
//! | scheme | deployment |
//! |---|---|
//! | `redis://`, `rediss://`, `unix://`, `redis+unix://` | one endpoint: a server, a managed primary, a proxy |
//! | `redis+cluster://`, `rediss+cluster://` | a Redis Cluster: the hosts are seed nodes, the rest is discovered |
//! | `redis+sentinel://`, `rediss+sentinel://` | the primary that Sentinel names: the hosts are sentinels |
//!
//! ```text
//! redis+cluster://[user[:password]@]host[:port][,host[:port]…][/]
//! redis+sentinel://[user[:password]@]host[:port][,host[:port]…]/service[/db]
//!     [?sentinel_username=…&sentinel_password=…]
//! ```
//!
//! The user and password are the data nodes' (percent-encoded, as in any
//! URL); sentinels that require a password of their own get it in the query.
//! Ports default to 6379 for a Cluster's nodes and 26379 for sentinels.
//!
//! The URL may carry passwords: no error here repeats any part of it, and
//! [`Deployment`]'s `Debug` prints `***` for them.

use std::fmt;

/// Where the store's data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Deployment {
    /// One endpoint, opened with `redis::Client::open(url)`.
    Single(String),
    /// A Redis Cluster, found from any of its `nodes`.
    Cluster {
        nodes: Vec<Node>,
        auth: Auth,
        tls: bool,
    },
    /// The primary of `service`, as the `sentinels` name it.
    Sentinel {
        sentinels: Vec<Node>,
        service: String,
        db: i64,
        auth: Auth,
        sentinel_auth: Auth,
        tls: bool,
    },
}

/// A `host:port` of the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

/// A user name and password (either may be absent).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl fmt::Debug for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The whole URL: it may hold a password anywhere.
            Self::Single(_) => f.write_str("Single(***)"),
            Self::Cluster { nodes, auth, tls } => f
                .debug_struct("Cluster")
                .field("nodes", nodes)
                .field("auth", auth)
                .field("tls", tls)
                .finish(),
            Self::Sentinel {
                sentinels,
                service,
                db,
                auth,
                sentinel_auth,
                tls,
            } => f
                .debug_struct("Sentinel")
                .field("sentinels", sentinels)
                .field("service", service)
                .field("db", db)
                .field("auth", auth)
                .field("sentinel_auth", sentinel_auth)
                .field("tls", tls)
                .finish(),
        }
    }
}

const SCHEMES: &str = "a redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, \
                       redis+sentinel:// or rediss+sentinel:// URL";

impl Deployment {
    /// Reads `url`. The error names what is wrong, never the URL's text.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("must be {SCHEMES}"));
        };
        match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => match redis::Client::open(url) {
                Ok(_) => Ok(Self::Single(url.to_owned())),
                Err(e) => Err(format!("not a valid Redis URL ({:?})", e.kind())),
            },
            "redis+cluster" | "rediss+cluster" => {
                let parts = Parts::split(rest, 6379)?;
                if !matches!(parts.path, "" | "/" | "/0") {
                    return Err(
                        "a Redis Cluster has only database 0: end the URL after the last node \
                         (or with /0)"
                            .into(),
                    );
                }
                if let Some((key, _)) = parts.query.first() {
                    return Err(format!(
                        "a redis+cluster:// URL takes no query parameters ({key:?} given)"
                    ));
                }
                Ok(Self::Cluster {
                    nodes: parts.nodes,
                    auth: parts.auth,
                    tls: scheme == "rediss+cluster",
                })
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let parts = Parts::split(rest, 26379)?;
                let path = parts.path.strip_prefix('/').unwrap_or_default();
                let (service, db) = match path.split_once('/') {
                    Some((service, db)) => (service, db),
                    None => (path, ""),
                };
                let service = decode(service).ok_or("the service name is not percent-encoded")?;
                if service.is_empty() {
                    return Err(
                        "a redis+sentinel:// URL names the primary's service after the \
                         sentinels: redis+sentinel://host:26379/mymaster"
                            .into(),
                    );
                }
                let db = match db.trim_end_matches('/') {
                    "" => 0,
                    db => db
                        .parse::<i64>()
                        .ok()
                        .filter(|db| *db >= 0)
                        .ok_or("the database after the service name must be a number")?,
                };
                let mut sentinel_auth = Auth::default();
                for (key, value) in parts.query {
                    match key.as_str() {
                        "sentinel_username" => sentinel_auth.username = Some(value),
                        "sentinel_password" => sentinel_auth.password = Some(value),
                        _ => {
                            return Err(format!(
                                "unknown query parameter {key:?} (a redis+sentinel:// URL takes \
                                 sentinel_username and sentinel_password)"
                            ));
                        }
                    }
                }
                Ok(Self::Sentinel {
                    sentinels: parts.nodes,
                    service,
                    db,
                    auth: parts.auth,
                    sentinel_auth,
                    tls: scheme == "rediss+sentinel",
                })
            }
            _ => Err(format!("must be {SCHEMES}")),
        }
    }

    /// What the store is connected to, for logs: no host, no password.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Single(_) => "Redis",
            Self::Cluster { .. } => "Redis Cluster",
            Self::Sentinel { .. } => "Redis Sentinel",
        }
    }
}

/// The pieces of a multi-host URL after its `scheme://`.
struct Parts<'a> {
    auth: Auth,
    nodes: Vec<Node>,
    path: &'a str,
    query: Vec<(String, String)>,
}

impl<'a> Parts<'a> {
    fn split(rest: &'a str, default_port: u16) -> Result<Self, String> {
        if rest.contains('#') {
            return Err(
                "a Redis URL has no #fragment (percent-encode a # in a password as %23)".into(),
            );
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, query),
            None => (rest, ""),
        };
        let (authority, path) = match before_query.find('/') {
            Some(at) => before_query.split_at(at),
            None => (before_query, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let mut auth = Auth::default();
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let bad = "the user or password is not percent-encoded correctly";
            let user = decode(user).ok_or(bad)?;
            auth.username = (!user.is_empty()).then_some(user);
            auth.password = match password {
                Some(password) => Some(decode(password).ok_or(bad)?),
                None => None,
            };
        }
        let mut nodes = Vec::new();
        for (i, host) in hosts.split(',').enumerate() {
            nodes.push(node(host, default_port).map_err(|why| format!("host {}: {why}", i + 1))?);
        }
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = "a query parameter is not percent-encoded correctly";
            pairs.push((decode(key).ok_or(bad)?, decode(value).ok_or(bad)?));
        }
        Ok(Self {
            auth,
            nodes,
            path,
            query: pairs,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn node(text: &str, default_port: u16) -> Result<Node, &'static str> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or("an unclosed [")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or("junk after the ]")?),
            ),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("empty (list hosts as host:port,host:port)");
    }
    if host.contains(['@', '/', ' ', '[', ']']) || (host.contains(':') && !text.starts_with('[')) {
        return Err("not a host name or address (an IPv6 address goes in [brackets])");
    }
    let port = match port {
        None => default_port,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port is not a number from 1 to 65535")?,
    };
    Ok(Node {
        host: host.to_owned(),
        port,
    })
}

/// Percent-decodes `text` (UTF-8); `None` when it is malformed.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: u16) -> Node {
        Node {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn single_endpoints_are_passed_through() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://:pw@example.com/3",
            "unix:///run/redis.sock",
        ] {
            assert_eq!(
                Deployment::parse(url).unwrap(),
                Deployment::Single(url.into())
            );
        }
    }

    #[test]
    fn a_cluster_url_lists_its_seed_nodes() {
        assert_eq!(
            Deployment::parse("redis+cluster://a:7000,b,[::1]:7002/").unwrap(),
            Deployment::Cluster {
                nodes: vec![node("a", 7000), node("b", 6379), node("::1", 7002)],
                auth: Auth::default(),
                tls: false,
            }
        );
        assert_eq!(
            Deployment::parse("rediss+cluster://iris:p%40ss%3Aw@a:7000").unwrap(),
            Deployment::Cluster {
                nodes: vec![node("a", 7000)],
                auth: Auth {
                    username: Some("iris".into()),
                    password: Some("p@ss:w".into()),
                },
                tls: true,
            }
        );
    }

    #[test]
    fn a_sentinel_url_names_sentinels_service_and_database() {
        assert_eq!(
            Deployment::parse(
                "redis+sentinel://:data@s1,s2:26380/mymaster/2?sentinel_password=sent"
            )
            .unwrap(),
            Deployment::Sentinel {
                sentinels: vec![node("s1", 26379), node("s2", 26380)],
                service: "mymaster".into(),
                db: 2,
                auth: Auth {
                    username: None,
                    password: Some("data".into()),
                },
                sentinel_auth: Auth {
                    username: None,
                    password: Some("sent".into()),
                },
                tls: false,
            }
        );
    }

    #[test]
    fn mistakes_are_named_without_repeating_the_url() {
        let cases = [
            ("http://a", "must be a redis://"),
            ("redis+cluster://:secret@a:7000/3", "only database 0"),
            ("redis+cluster://:secret@a:70x0", "host 1: the port"),
            ("redis+cluster://:secret@a:7000,,b", "host 2: empty"),
            ("redis+cluster://:secret@a?x=secret", "no query parameters"),
            ("redis+cluster://:sec%zzret@a", "percent-encoded"),
            ("redis+cluster://:secret@::1:7000", "[brackets]"),
            (
                "redis+sentinel://:secret@s1:26379",
                "names the primary's service",
            ),
            ("redis+sentinel://:secret@s1/m/x", "must be a number"),
            (
                "redis+sentinel://:secret@s1/m?password=secret",
                "unknown query parameter",
            ),
            ("redis+sentinel://:sec#ret@s1/m", "no #fragment"),
            ("redis://:secret@host:notaport/0", "not a valid Redis URL"),
        ];
        for (url, expected) in cases {
            let error = Deployment::parse(url).unwrap_err();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{url}: {error}");
        }
    }

    #[test]
    fn passwords_never_print() {
        for url in [
            "redis://:secret@a/0",
            "redis+cluster://u:secret@a",
            "redis+sentinel://u:secret@a/m?sentinel_password=secret",
        ] {
            let shown = format!("{:?}", Deployment::parse(url).unwrap());
            assert!(!shown.contains("secret"), "{shown}");
        }
    }
}
