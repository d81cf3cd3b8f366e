//! Redis for Iris's tests, the one harness: the shared server on
//! 127.0.0.1:6379 (database 13, or `$IRIS_TEST_REDIS_URL`), each test under
//! its own random key prefix, deleted afterwards; and throwaway
//! `redis-server` processes on free ports for tests that kill and restart
//! Redis. The library's Redis tests include this file with `#[path]` (it
//! names nothing of Iris), so the URL, the cleanup and the skip policy are
//! written once.
//!
//! Without Redis the tests say they were skipped and pass, unless
//! `IRIS_REQUIRE_REDIS=1` (CI): see [`super::skip`].

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip;

pub fn test_url() -> String {
    std::env::var("IRIS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/13".into())
}

/// Whether Redis at `url` answers PING within a second.
pub async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(_))
    )
}

/// A key prefix of the test's own on the shared Redis, deleted on drop.
pub struct SharedRedis {
    pub url: String,
    pub prefix: String,
}

impl SharedRedis {
    pub async fn get() -> Option<Self> {
        let url = test_url();
        if !answers(&url).await {
            return skip(format!(
                "Redis at {url} does not answer; start redis-server (or point IRIS_TEST_REDIS_URL at one)"
            ));
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).expect("random");
        Some(Self {
            url,
            prefix: format!("iris-test-{}", hex::encode(random)),
        })
    }

    /// The `[store]` table for an Iris on this Redis and prefix (and the
    /// spend log off).
    pub fn store_toml(&self, extra: &str) -> String {
        store_toml(&self.url, &self.prefix, extra)
    }
}

impl Drop for SharedRedis {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut connection)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut connection);
        }
    }
}

/// The `[store]` table for an Iris on Redis at `url` under `prefix`, with
/// `extra` store keys; and the spend log off (beside a Redis store it would
/// be a SQLite file in the working directory, shared by every test).
pub fn store_toml(url: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n{extra}\n\
         [spend_log]\nkind = \"off\"\n"
    )
}

/// [`super::base_config`] with its memory store replaced by `store`.
pub fn with_store(config: &str, store: &str) -> String {
    let memory = "[store]\nkind = \"memory\"\n";
    assert!(config.contains(memory), "base_config changed its store");
    config.replacen(memory, store, 1)
}

/// A `redis-server` of the test's own on a free port, without persistence
/// (unless [`Self::persistent`]), that the test may kill and start again.
pub struct RedisProcess {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// An append-only file, synced on every write: a restart after a kill
    /// comes back with every write Redis answered.
    appendonly: bool,
}

const REDIS_SERVER: &str = "/usr/bin/redis-server";

impl RedisProcess {
    /// A free port and a directory, nothing started yet; `None` (skipped)
    /// without a `redis-server` binary.
    pub fn prepare() -> Option<Self> {
        if !Path::new(REDIS_SERVER).exists() {
            return skip(format!("{REDIS_SERVER} is not installed"));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Some(Self {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            appendonly: false,
        })
    }

    /// Keeps its data across a kill (in its directory).
    pub fn persistent(mut self) -> Self {
        self.appendonly = true;
        self
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server and waits until it answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.appendonly {
                ["--appendonly", "yes", "--appendfsync", "always"].as_slice()
            } else {
                ["--appendonly", "no"].as_slice()
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers(&self.url()).await {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: a crash, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
