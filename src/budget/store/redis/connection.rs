//! One connection to the store's Redis, whichever deployment `store.url`
//! names ([`Deployment`]): a single endpoint, a Redis Cluster, or the primary
//! Sentinel names. The budget store and the managed-client registry both
//! talk through it, by [`RedisConnection::eval`] (their Lua scripts) or as a
//! [`ConnectionLike`] (plain commands).
//!
//! **Single.** A [`ConnectionManager`]: one multiplexed connection,
//! reconnected on the next operation after a failure.
//!
//! **Cluster.** The `redis` crate's cluster client: it learns the slot map
//! from the seed nodes, sends each command to the primary holding its key's
//! slot (every script of Iris names keys of one hash tag, so one slot), and
//! refreshes the map when a node says `MOVED` or is lost. Its own retries are
//! off: it would resend a command whose connection dropped after sending it,
//! and a script that ran once must not run twice (see "Resending" below).
//!
//! **Sentinel.** [`SentinelPrimary`]: asks the sentinels for the primary,
//! keeps one multiplexed connection to it, and forgets it when it fails or
//! answers as a replica (`READONLY`), so the next operation asks again and
//! follows a failover.
//!
//! **Resending.** A script is sent again only when Redis answered that it did
//! not run it: `NOSCRIPT` (then sent whole with `EVAL`, which also caches it
//! on that node: a promoted replica has no scripts, they are not replicated),
//! and the answers of a cluster or a primary in transition (`MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY`, `LOADING`), after a
//! short pause, for as long as the caller's timeout allows. A lost answer (a
//! dropped connection, a timeout) is never resent: the script may have run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, FromRedisValue, Pipeline, RedisError,
    RedisFuture, RedisResult, ServerErrorKind, TlsMode, ToRedisArgs, Value,
};

use super::url::{Auth, Deployment, Node};

/// A connection to the store's Redis, cheap to clone (clones share it).
#[derive(Clone)]
pub struct RedisConnection {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelPrimary>),
}

impl RedisConnection {
    /// A connection to the deployment `url` names, every operation of it
    /// bounded by `timeout` (connecting included). Does not wait for Redis:
    /// it connects on the first operation, and again after a failure.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        // rediss:// needs rustls's crypto provider.
        crate::init_tls();
        let kind = match Deployment::parse(url)? {
            Deployment::Single(url) => {
                let client = redis::Client::open(url)
                    .map_err(|e| format!("not a valid Redis URL ({:?})", e.kind()))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    // One attempt per reconnection: a request never waits on
                    // a backoff; the next operation tries again.
                    .set_number_of_retries(0);
                Kind::Single(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| format!("redis: {e}"))?,
                )
            }
            Deployment::Cluster { nodes, auth, tls } => {
                let seeds: Vec<String> = nodes
                    .iter()
                    .map(|n| format!("redis://{}", host_port(n)))
                    .collect();
                let mut builder = ClusterClientBuilder::new(seeds)
                    // Never resend on its own (see the module documentation).
                    .retries(0)
                    // A lost node is given up after a few attempts, which
                    // makes the client fetch the slot map again and find
                    // the replica promoted in its place.
                    .max_connection_attempts(std::num::NonZeroUsize::MIN.saturating_add(2));
                if let Some(username) = &auth.username {
                    builder = builder.username(username);
                }
                if let Some(password) = &auth.password {
                    builder = builder.password(password);
                }
                if tls {
                    builder = builder.tls(TlsMode::Secure);
                }
                let client = builder
                    .build()
                    .map_err(|e| format!("not a usable Redis Cluster URL ({:?})", e.kind()))?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Kind::Cluster(client.get_pending_async_connection_with_config(config))
            }
            Deployment::Sentinel {
                sentinels,
                service,
                db,
                auth,
                sentinel_auth,
                tls,
            } => Kind::Sentinel(Arc::new(SentinelPrimary::new(
                &sentinels,
                &service,
                db,
                &auth,
                &sentinel_auth,
                tls,
                timeout,
            )?)),
        };
        Ok(Self { kind })
    }

    /// Whether commands on different slots must be sent apart (a pipeline
    /// must stay within one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// Runs `call`: `EVALSHA`, or the whole script when this node does not
    /// have it, resent only on an answer that says it did not run (see the
    /// module documentation). The caller bounds it in time.
    pub async fn eval<T: FromRedisValue>(&self, call: &LuaCall) -> RedisResult<T> {
        let mut connection = self.clone();
        let mut whole = false;
        let mut pause = Duration::from_millis(10);
        loop {
            let command = if whole { call.eval() } else { call.evalsha() };
            let error = match command.query_async::<T>(&mut connection).await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            match error.kind() {
                ErrorKind::Server(ServerErrorKind::NoScript) if !whole => whole = true,
                ErrorKind::Server(
                    ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading,
                ) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                _ => return Err(error),
            }
        }
    }
}

/// Whether the same call may succeed later: the connection, the topology
/// or the primary is changing, rather than the call being wrong.
pub fn transient(error: &RedisError) -> bool {
    !matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::NoScript
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NotBusy
                | ServerErrorKind::NoSub
                | ServerErrorKind::NoPerm
        ) | ErrorKind::UnexpectedReturnType
            | ErrorKind::InvalidClientConfig
            | ErrorKind::AuthenticationFailed
            | ErrorKind::EmptySentinelList
    )
}

fn host_port(node: &Node) -> String {
    if node.host.contains(':') {
        format!("[{}]:{}", node.host, node.port)
    } else {
        format!("{}:{}", node.host, node.port)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.kind {
            Kind::Single(connection) => connection.req_packed_command(cmd),
            Kind::Cluster(connection) => connection.req_packed_command(cmd),
            Kind::Sentinel(primary) => {
                let primary = Arc::clone(primary);
                Box::pin(async move {
                    let (generation, mut connection) = primary.connection().await?;
                    let reply = connection.req_packed_command(cmd).await;
                    primary.check(generation, reply)
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.kind {
            Kind::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            Kind::Sentinel(primary) => {
                let primary = Arc::clone(primary);
                Box::pin(async move {
                    let (generation, mut connection) = primary.connection().await?;
                    let reply = connection
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                    primary.check(generation, reply)
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Single(connection) => connection.get_db(),
            Kind::Cluster(_) => 0,
            Kind::Sentinel(primary) => primary.db,
        }
    }
}

/// The primary of a Sentinel-managed service, followed across failovers.
struct SentinelPrimary {
    /// Asks the sentinels (one question at a time).
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the primary as last named, with its generation.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    config: AsyncConnectionConfig,
    db: i64,
}

impl SentinelPrimary {
    fn new(
        sentinels: &[Node],
        service: &str,
        db: i64,
        auth: &Auth,
        sentinel_auth: &Auth,
        tls: bool,
        timeout: Duration,
    ) -> Result<Self, String> {
        let addresses = sentinels.iter().map(|n| {
            if tls {
                ConnectionAddr::TcpTls {
                    host: n.host.clone(),
                    port: n.port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(n.host.clone(), n.port)
            }
        });
        let invalid = |e: RedisError| format!("not a usable Redis Sentinel URL ({:?})", e.kind());
        let mut builder =
            SentinelClientBuilder::new(addresses, service, SentinelServerType::Master)
                .map_err(invalid)?
                .set_client_to_redis_db(db);
        if let Some(username) = &auth.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &auth.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &sentinel_auth.username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &sentinel_auth.password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if tls {
            builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
        }
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(builder.build().map_err(invalid)?),
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            db,
        })
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().map_or(None, |current| current.clone())
    }

    /// The connection to the primary, asking the sentinels for it first if
    /// there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another operation may have connected while this one waited.
        if let Some(current) = self.current() {
            return Ok(current);
        }
        // The crate checks that the named primary says it is one.
        let client = sentinel.async_get_client().await?;
        let connection = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut current) = self.current.lock() {
            *current = Some((generation, connection.clone()));
        }
        Ok((generation, connection))
    }

    /// `reply` as it is, forgetting the connection of `generation` first if
    /// the reply says it no longer leads to a working primary.
    fn check<T>(&self, generation: u64, reply: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &reply {
            let lost = e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || matches!(
                    e.kind(),
                    ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
                );
            if lost
                && let Ok(mut current) = self.current.lock()
                && current.as_ref().is_some_and(|(g, _)| *g == generation)
            {
                *current = None;
            }
        }
        reply
    }
}

/// A Lua script Iris runs: its text and its SHA-1 (what `EVALSHA` names).
pub struct Lua {
    code: String,
    hash: String,
}

impl Lua {
    pub fn new(code: &str) -> Self {
        Self {
            hash: redis::Script::new(code).get_hash().to_owned(),
            code: code.to_owned(),
        }
    }

    /// A call of this script, to which keys and arguments are added.
    pub fn call(&'static self) -> LuaCall {
        LuaCall {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A script with its keys (`KEYS`, which route it in a Cluster) and
/// arguments (`ARGV`).
pub struct LuaCall {
    lua: &'static Lua,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl LuaCall {
    pub fn key(&mut self, key: impl Into<String>) -> &mut Self {
        self.keys.push(key.into());
        self
    }

    pub fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut command = redis::cmd(name);
        command.arg(script).arg(self.keys.len());
        for key in &self.keys {
            command.arg(key);
        }
        for arg in &self.args {
            command.arg(arg.as_slice());
        }
        command
    }

    fn evalsha(&self) -> Cmd {
        self.command("EVALSHA", &self.lua.hash)
    }

    fn eval(&self) -> Cmd {
        self.command("EVAL", &self.lua.code)
    }
}
