//! Private Redis deployments for the tests that take a node down: a Redis
//! Cluster (three primaries, a replica each) and a Sentinel-watched primary
//! (one replica, three sentinels). Every server runs from `redis-server` on
//! free loopback ports, in a temporary directory, without persistence, and
//! is killed when its deployment drops. The library's tests include this
//! file with `#[path]` (it names nothing of Iris), as they do `redis.rs`.
//!
//! Without the `redis-server` and `redis-cli` binaries the tests say they
//! were skipped and pass, unless `IRIS_REQUIRE_REDIS=1` (CI): see
//! [`super::skip`].
//!
//! A node is failed after 2 s of silence: short, so that a failover takes a
//! few seconds and the tests stay quick, yet longer than the stalls of a
//! loaded two-core machine, so that no healthy node is ever failed over. Every
//! server, sentinels included, requires [`PASSWORD`], which the URLs carry
//! percent-encoded: Iris must decode and send it to each node it finds.
//!
//! Nothing here waits for a fixed time: every step polls for the state it
//! needs (a node answering, the cluster agreeing, a replica promoted) until
//! [`WITHIN`], a deadline generous enough for a loaded two-core machine
//! running several deployments at once, and fails naming what it waited for.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip;

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// Every server's password: characters a URL must percent-encode.
pub const PASSWORD: &str = "p@ss:w/rd?%";
/// [`PASSWORD`] as a URL carries it.
const PASSWORD_IN_URL: &str = "p%40ss%3Aw%2Frd%3F%25";

/// Silence after which a cluster node, or the primary the sentinels watch,
/// is taken for failed.
const NODE_TIMEOUT_MS: u64 = 2000;

/// How long any one wait here may take: generous, since each ends as soon as
/// its condition holds.
pub const WITHIN: Duration = Duration::from_secs(60);

/// A loopback port nobody listens on (just now).
/// A port for a server of this module: see [`super::ports`].
fn free_port() -> u16 {
    super::ports::listen_port()
}

/// `None` (skipped) unless both binaries are installed.
fn binaries() -> Option<()> {
    for binary in [REDIS_SERVER, REDIS_CLI] {
        if !Path::new(binary).exists() {
            return skip(format!("{binary} is not installed"));
        }
    }
    Some(())
}

/// One `redis-server` process, and how it was started (to start it again).
struct Server {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
}

impl Server {
    fn spawn(port: u16, dir: &Path, args: &[String]) -> Self {
        std::fs::create_dir_all(dir).expect("server dir");
        let mut server = Self {
            port,
            child: None,
            dir: dir.to_owned(),
            args: args.to_vec(),
        };
        server.start();
        server
    }

    fn start(&mut self) {
        let child = Command::new(REDIS_SERVER)
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
    }

    /// SIGKILL: a crash, nothing flushed, nothing said to anyone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain connection to one server on loopback (retried until [`WITHIN`]).
pub async fn admin(port: u16) -> redis::aio::MultiplexedConnection {
    eventually_some(
        &format!("a connection to redis on port {port}"),
        async || try_admin(port).await.ok(),
    )
    .await
}

async fn try_admin(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://:{PASSWORD_IN_URL}@127.0.0.1:{port}/"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// `command` on the server at `port`, or `None` if it does not answer.
async fn ask<T: redis::FromRedisValue>(port: u16, command: &redis::Cmd) -> Option<T> {
    let mut connection = try_admin(port).await.ok()?;
    command.query_async(&mut connection).await.ok()
}

/// Polls `check` every 50 ms until it holds; panics after `within`.
async fn until(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not so after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `find` every 50 ms until it gives a value; panics after [`WITHIN`]
/// (one slow answer on a loaded machine is no failure).
async fn eventually_some<T>(what: &str, mut find: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = find().await {
            return value;
        }
        assert!(start.elapsed() < WITHIN, "{what}: none after {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which role the server at `port` has (`master`, `slave`, `sentinel`).
pub async fn role(port: u16) -> Option<String> {
    let reply: Vec<redis::Value> = ask(port, &redis::cmd("ROLE")).await?;
    match reply.first()? {
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// A Redis Cluster of three primaries and three replicas.
pub struct RedisCluster {
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the six servers, makes them one cluster and waits until every
    /// node sees every slot served; `None` (skipped) without the binaries.
    pub async fn start() -> Option<Self> {
        let mut cluster = Self::prepare()?;
        cluster.launch().await;
        Some(cluster)
    }

    /// Ports and a directory, nothing started yet (so that Iris can be
    /// started first); `None` (skipped) without the binaries.
    pub fn prepare() -> Option<Self> {
        binaries()?;
        let servers = (0..6)
            .map(|_| Server {
                port: free_port(),
                child: None,
                dir: PathBuf::new(),
                args: Vec::new(),
            })
            .collect();
        Some(Self {
            servers,
            dir: tempfile::tempdir().expect("tempdir"),
        })
    }

    /// What [`Self::start`] does after [`Self::prepare`].
    pub async fn launch(&mut self) {
        for (i, server) in self.servers.iter_mut().enumerate() {
            let port = server.port;
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--cluster-port",
                &free_port().to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
                // A replica takes over however long its primary was gone.
                "--cluster-replica-validity-factor",
                "0",
                // The slots of the other primaries keep being served while
                // one is failed over.
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                // Replicas sync at once (the default waits 5 s for more).
                "--repl-diskless-sync-delay",
                "0",
                "--requirepass",
                PASSWORD,
                "--masterauth",
                PASSWORD,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            *server = Server::spawn(port, &self.dir.path().join(i.to_string()), &args);
        }
        for server in &self.servers {
            let port = server.port;
            until(WITHIN, "redis-server started", async || {
                ask::<String>(port, &redis::cmd("PING")).await.is_some()
            })
            .await;
        }
        let nodes: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let created = tokio::task::spawn_blocking(move || {
            Command::new(REDIS_CLI)
                .arg("--cluster")
                .arg("create")
                .args(&nodes)
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .args(["-a", PASSWORD, "--no-auth-warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        })
        .await
        .expect("redis-cli task")
        .expect("run redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        self.wait_healthy().await;
    }

    /// `redis+cluster://` with the primaries as seed nodes and the password.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.servers[..3]
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+cluster://:{PASSWORD_IN_URL}@{}/", seeds.join(","))
    }

    /// The ports of the servers running now (killed ones left out).
    pub fn live_ports(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.port)
            .collect()
    }

    /// Until every live node says the cluster is ok, every slot is served
    /// by a live primary that knows it, and every primary has a replica.
    pub async fn wait_healthy(&self) {
        let live = self.live_ports();
        until(WITHIN, "cluster healthy", async || {
            for port in &live {
                let Some(info) = ask::<String>(*port, redis::cmd("CLUSTER").arg("INFO")).await
                else {
                    return false;
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    return false;
                }
                // A replica in sync, ready to take over.
                let Some(replication) =
                    ask::<String>(*port, redis::cmd("INFO").arg("replication")).await
                else {
                    return false;
                };
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return false;
                }
            }
            let Some(nodes) = self.nodes().await else {
                return false;
            };
            nodes
                .iter()
                .filter(|n| n.primary && !n.failed)
                .all(|primary| live.contains(&primary.port))
        })
        .await;
    }

    /// The cluster as a live node sees it.
    async fn nodes(&self) -> Option<Vec<ClusterNode>> {
        for port in self.live_ports() {
            if let Some(text) = ask::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await {
                return Some(text.lines().filter_map(ClusterNode::parse).collect());
            }
        }
        None
    }

    /// The port of the primary serving `key`'s slot now (as soon as a live
    /// node names one).
    pub async fn primary_for(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        let slot: u16 = eventually_some("CLUSTER KEYSLOT", async || {
            ask(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
        })
        .await;
        eventually_some(&format!("a primary serving slot {slot}"), async || {
            self.nodes()
                .await?
                .iter()
                .find(|n| n.primary && !n.failed && n.slots.iter().any(|r| r.contains(&slot)))
                .map(|n| n.port)
        })
        .await
    }

    /// The port of a replica of the primary at `port` (as soon as a live
    /// node names one).
    pub async fn replica_of(&self, port: u16) -> u16 {
        eventually_some(&format!("a replica of {port}"), async || {
            let nodes = self.nodes().await?;
            let primary = nodes.iter().find(|n| n.port == port)?;
            nodes
                .iter()
                .find(|n| n.master_id.as_deref() == Some(primary.id.as_str()) && !n.failed)
                .map(|n| n.port)
        })
        .await
    }

    /// Crashes the server at `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        for server in &mut self.servers {
            if server.port == port {
                server.kill();
            }
        }
    }

    /// Starts the server at `port` again after [`Self::kill`], from its
    /// directory: its `nodes.conf` names its cluster, which it rejoins (a
    /// primary that was failed over comes back as its successor's replica).
    /// Waits until the cluster is healthy again.
    pub async fn restart(&mut self, port: u16) {
        for server in &mut self.servers {
            if server.port == port && server.child.is_none() {
                server.start();
            }
        }
        self.wait_healthy().await;
    }

    /// Until the server at `port` is a primary and the cluster agrees.
    pub async fn wait_promoted(&self, port: u16) {
        until(WITHIN, "replica promoted", async || {
            role(port).await.as_deref() == Some("master")
        })
        .await;
        let live = self.live_ports();
        until(WITHIN, "every node sees the new primary", async || {
            for node in &live {
                let Some(text) = ask::<String>(*node, redis::cmd("CLUSTER").arg("NODES")).await
                else {
                    return false;
                };
                let nodes: Vec<ClusterNode> = text.lines().filter_map(ClusterNode::parse).collect();
                if !nodes.iter().any(|n| n.port == port && n.primary) {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// `CLUSTER FAILOVER` on the replica at `port`: the graceful switch, in
    /// which the primary stops writes until the replica has them all. A
    /// manual failover that Redis abandons (its own 5 s limit, which a
    /// loaded machine can overrun) is asked for again, until [`WITHIN`].
    pub async fn manual_failover(&self, replica: u16) {
        let start = Instant::now();
        loop {
            let reply: Option<String> = ask(replica, redis::cmd("CLUSTER").arg("FAILOVER")).await;
            assert!(
                reply.is_none() || reply.as_deref() == Some("OK"),
                "CLUSTER FAILOVER: {reply:?}"
            );
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(10) {
                if role(replica).await.as_deref() == Some("master") {
                    self.wait_promoted(replica).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                start.elapsed() < WITHIN,
                "CLUSTER FAILOVER: {replica} not promoted after {WITHIN:?}"
            );
        }
    }
}

/// A line of `CLUSTER NODES`.
#[derive(Debug)]
struct ClusterNode {
    id: String,
    port: u16,
    primary: bool,
    failed: bool,
    master_id: Option<String>,
    slots: Vec<std::ops::RangeInclusive<u16>>,
}

impl ClusterNode {
    /// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let address = fields.get(1)?.split('@').next()?;
        let port = address.rsplit_once(':')?.1.parse().ok()?;
        let flags = fields.get(2)?;
        let slots = fields
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                None => {
                    let slot = s.parse().ok()?;
                    Some(slot..=slot)
                }
            })
            .collect();
        Some(Self {
            id: (*fields.first()?).to_owned(),
            port,
            primary: flags.contains("master"),
            failed: flags.contains("fail") && !flags.contains("fail?"),
            master_id: fields
                .get(3)
                .filter(|m| **m != "-")
                .map(|m| (*m).to_owned()),
            slots,
        })
    }
}

/// The service name the sentinels watch.
pub const SERVICE: &str = "iris";

/// A primary, its replica and three sentinels (quorum two) watching them.
pub struct RedisSentinels {
    primary: Server,
    replica: Server,
    sentinels: Vec<Server>,
    dir: tempfile::TempDir,
}

impl RedisSentinels {
    /// Starts them all and waits until the sentinels know the replica and
    /// each other (what a failover needs); `None` (skipped) without the
    /// binaries.
    pub async fn start() -> Option<Self> {
        binaries()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = |port: u16| -> Vec<String> {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--requirepass",
                PASSWORD,
                "--masterauth",
                PASSWORD,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        };
        let primary_port = free_port();
        let primary = Server::spawn(
            primary_port,
            &dir.path().join("primary"),
            &data(primary_port),
        );
        let replica_port = free_port();
        let mut replica_args = data(replica_port);
        replica_args.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary_port.to_string(),
        ]);
        let replica = Server::spawn(replica_port, &dir.path().join("replica"), &replica_args);
        for port in [primary_port, replica_port] {
            until(WITHIN, "redis-server started", async || {
                ask::<String>(port, &redis::cmd("PING")).await.is_some()
            })
            .await;
        }
        until(WITHIN, "the replica in sync", async || {
            ask::<String>(replica_port, redis::cmd("INFO").arg("replication"))
                .await
                .is_some_and(|info| info.contains("master_link_status:up"))
        })
        .await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf_dir = dir.path().join(format!("sentinel-{i}"));
            std::fs::create_dir_all(&conf_dir).expect("sentinel dir");
            let conf: PathBuf = conf_dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     requirepass {PASSWORD}\nsentinel sentinel-pass {PASSWORD}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n\
                     sentinel auth-pass {SERVICE} {PASSWORD}\n\
                     sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}\n\
                     sentinel failover-timeout {SERVICE} 5000\n",
                    dir = conf_dir.display(),
                ),
            )
            .expect("sentinel.conf");
            sentinels.push(Server::spawn(
                port,
                &conf_dir,
                &[conf.display().to_string(), "--sentinel".to_owned()],
            ));
        }
        let deployment = Self {
            primary,
            replica,
            sentinels,
            dir,
        };
        for sentinel in &deployment.sentinels {
            let port = sentinel.port;
            until(
                WITHIN,
                "sentinels know the replica and each other",
                async || {
                    let replicas: Option<Vec<redis::Value>> =
                        ask(port, redis::cmd("SENTINEL").arg("REPLICAS").arg(SERVICE)).await;
                    let peers: Option<Vec<redis::Value>> =
                        ask(port, redis::cmd("SENTINEL").arg("SENTINELS").arg(SERVICE)).await;
                    replicas.is_some_and(|r| !r.is_empty()) && peers.is_some_and(|p| p.len() == 2)
                },
            )
            .await;
        }
        Some(deployment)
    }

    /// `redis+sentinel://` naming the three sentinels and the service, with
    /// the data nodes' password and the sentinels' own (the same here).
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis+sentinel://:{PASSWORD_IN_URL}@{}/{SERVICE}?sentinel_password={PASSWORD_IN_URL}",
            sentinels.join(",")
        )
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// Crashes the primary (SIGKILL).
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// Until every sentinel names the former replica as the primary and it
    /// says it is one.
    pub async fn wait_failover(&self) {
        let replica = self.replica.port;
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            until(WITHIN, "sentinels fail over", async || {
                let named: Option<(String, u16)> = ask(
                    port,
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(SERVICE),
                )
                .await;
                named.is_some_and(|(_, p)| p == replica)
            })
            .await;
        }
        until(WITHIN, "the replica is promoted", async || {
            role(replica).await.as_deref() == Some("master")
        })
        .await;
    }
}
