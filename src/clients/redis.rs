//! Managed clients and teams in Redis: a hash of records per kind and one
//! version counter, `{prefix}:v1:{clients}:all` (clients),
//! `…:teams` and `…:version` (one hash tag: one Cluster slot), changed
//! together by one script each. Every instance watches the
//! version. The connection is the budget store's kind
//! ([`RedisConnection`]): a single endpoint, a Cluster or a Sentinel-managed
//! primary, as `store.url` says.

use std::sync::LazyLock;

use super::{Kind, Registry, RegistryError, RegistryFuture};
use crate::budget::store::{Lua, REDIS_LAYOUT, RedisConnection, RedisOptions};

/// KEYS: the clients' hash, the version, the teams' hash.
static LOAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1]), \
         redis.call('HGETALL', KEYS[3])}",
    )
});
// The writes' KEYS: the kind's hash, the version.
static CREATE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end \
         redis.call('INCR', KEYS[2]) return 1",
    )
});
static REPLACE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end \
         redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('INCR', KEYS[2]) return 1",
    )
});
static DELETE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end \
         redis.call('INCR', KEYS[2]) return 1",
    )
});

pub struct RedisRegistry {
    connection: RedisConnection,
    /// The clients' hash (named before teams existed).
    all: String,
    teams: String,
    version: String,
    timeout: std::time::Duration,
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("redis: {e}"))
}

impl RedisRegistry {
    pub fn connect(url: &str, options: &RedisOptions) -> Result<Self, String> {
        // The URL may carry a password: never repeat it in an error.
        let connection =
            RedisConnection::open(url, options.timeout).map_err(|e| format!("store.url: {e}"))?;
        let base = format!("{}:{REDIS_LAYOUT}:{{clients}}:", options.prefix);
        Ok(Self {
            connection,
            all: format!("{base}all"),
            teams: format!("{base}teams"),
            version: format!("{base}version"),
            timeout: options.timeout,
        })
    }

    fn hash(&self, kind: Kind) -> &str {
        match kind {
            Kind::Client => &self.all,
            Kind::Team => &self.teams,
        }
    }

    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &'static Lua,
        keys: &[&str],
        args: &[&str],
    ) -> RegistryFuture<T> {
        let mut call = script.call();
        for key in keys {
            call.key(*key);
        }
        for arg in args {
            call.arg(*arg);
        }
        let connection = self.connection.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connection.eval::<T>(&call)).await {
                Ok(result) => result.map_err(unavailable),
                Err(_) => Err(unavailable("no answer in time")),
            }
        })
    }

    fn changed(
        &self,
        script: &'static Lua,
        kind: Kind,
        name: &str,
        record: &str,
        missing: RegistryError,
    ) -> RegistryFuture<()> {
        let keys = [self.hash(kind), self.version.as_str()];
        let reply = self.run::<i64>(script, &keys, &[name, record]);
        Box::pin(async move {
            match reply.await? {
                1 => Ok(()),
                _ => Err(missing),
            }
        })
    }
}

impl Registry for RedisRegistry {
    fn load_records(&self) -> RegistryFuture<(u64, Vec<(Kind, String)>)> {
        type Reply = (String, Vec<(String, String)>, Vec<(String, String)>);
        let keys = [
            self.all.as_str(),
            self.version.as_str(),
            self.teams.as_str(),
        ];
        let reply = self.run::<Reply>(&LOAD, &keys, &[]);
        Box::pin(async move {
            let (version, clients, teams) = reply.await?;
            let records = (clients.into_iter().map(|(_, text)| (Kind::Client, text)))
                .chain(teams.into_iter().map(|(_, text)| (Kind::Team, text)))
                .collect();
            Ok((version.parse().unwrap_or(0), records))
        })
    }

    fn version(&self) -> RegistryFuture<u64> {
        let mut connection = self.connection.clone();
        let key = self.version.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut command = redis::cmd("GET");
            command.arg(key);
            let get = command.query_async::<Option<u64>>(&mut connection);
            match tokio::time::timeout(timeout, get).await {
                Ok(result) => result.map(Option::unwrap_or_default).map_err(unavailable),
                Err(_) => Err(unavailable("no answer in time")),
            }
        })
    }

    fn insert(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        let taken = RegistryError::Exists(name.clone());
        self.changed(&CREATE, kind, &name, &record, taken)
    }

    fn update(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        let missing = RegistryError::NotFound(name.clone());
        self.changed(&REPLACE, kind, &name, &record, missing)
    }

    fn remove(&self, kind: Kind, name: String) -> RegistryFuture<()> {
        let missing = RegistryError::NotFound(name.clone());
        self.changed(&DELETE, kind, &name, "", missing)
    }
}
