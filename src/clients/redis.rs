//! Managed clients in Redis: one hash of records and a version counter,
//! `{prefix}:v1:{clients}:all` and `…:version` (one hash tag: one Cluster
//! slot), changed together by one script each. Every instance watches the
//! version. The connection is the budget store's kind
//! ([`RedisConnection`]): a single endpoint, a Cluster or a Sentinel-managed
//! primary, as `store.url` says.

use std::sync::LazyLock;

use super::{ManagedClient, Registry, RegistryError, RegistryFuture};
use crate::budget::store::{Lua, REDIS_LAYOUT, RedisConnection, RedisOptions};

static LOAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new("return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}")
});
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
    all: String,
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
            version: format!("{base}version"),
            timeout: options.timeout,
        })
    }

    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &'static Lua,
        args: &[&str],
    ) -> RegistryFuture<T> {
        let mut call = script.call();
        call.key(&self.all).key(&self.version);
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
        name: &str,
        record: &str,
        missing: RegistryError,
    ) -> RegistryFuture<()> {
        let reply = self.run::<i64>(script, &[name, record]);
        Box::pin(async move {
            match reply.await? {
                1 => Ok(()),
                _ => Err(missing),
            }
        })
    }
}

fn record(client: &ManagedClient) -> Result<String, RegistryError> {
    serde_json::to_string(client).map_err(unavailable)
}

impl Registry for RedisRegistry {
    fn load(&self) -> RegistryFuture<(u64, Vec<ManagedClient>)> {
        let reply = self.run::<(String, Vec<(String, String)>)>(&LOAD, &[]);
        Box::pin(async move {
            let (version, entries) = reply.await?;
            let mut clients = Vec::new();
            for (_, text) in entries {
                match serde_json::from_str(&text) {
                    Ok(client) => clients.push(client),
                    Err(e) => tracing::error!("a managed client record is unreadable: {e}"),
                }
            }
            Ok((version.parse().unwrap_or(0), clients))
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

    fn create(&self, client: ManagedClient) -> RegistryFuture<()> {
        match record(&client) {
            Ok(text) => self.changed(
                &CREATE,
                &client.name,
                &text,
                RegistryError::Exists(client.name.clone()),
            ),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn replace(&self, client: ManagedClient) -> RegistryFuture<()> {
        match record(&client) {
            Ok(text) => self.changed(
                &REPLACE,
                &client.name,
                &text,
                RegistryError::NotFound(client.name.clone()),
            ),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn delete(&self, name: &str) -> RegistryFuture<()> {
        self.changed(&DELETE, name, "", RegistryError::NotFound(name.to_owned()))
    }
}
