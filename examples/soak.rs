//! The soak kit (`scripts/soak [--minutes N]`): Iris run the way its largest
//! users run it, while parts fail, and then checked.
//!
//! - Three `iris serve` processes (this build's binary) on a private Redis
//!   Cluster (three primaries, a replica each), logging to a private
//!   PostgreSQL, in front of a farm of two mock upstreams that fail on their
//!   own (429s with Retry-After, connection resets, streams that die
//!   mid-way).
//! - Clients of several teams at mixed concurrency, each hitting the
//!   instances in turn (the next one when one refuses connections, as a
//!   load balancer would): plain and streamed chat completions, inline
//!   images, embeddings.
//! - At random moments: an instance killed with SIGKILL (and started again),
//!   a Redis primary killed (its replica takes over), PostgreSQL stopped
//!   (30 s, or a quarter of a short run) and started again.
//!
//! At the end, once every spool has drained, it checks and prints:
//! - every response a client received whole has exactly one record, with
//!   the usage the client saw (so the log's token totals equal what the
//!   upstreams reported);
//! - no request id is recorded twice;
//! - no client's or team's daily window went past its limit by more than
//!   one in-flight request's reservation, in the log as in the store;
//! - what the store charged exceeds the log only by the reservations of
//!   requests that never finished (killed with their instance): nothing was
//!   charged twice;
//! - p50/p99 latency per phase (steady, and during each kind of fault).
//!
//! Exits 1 when an invariant does not hold.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test harness: a setup step that fails ends the run, loudly"
)]

#[path = "../tests/it/support/mock_upstream.rs"]
mod mock_upstream;

// The tests' private servers; they skip through `super::skip`, which here
// is the tests' own policy (under `IRIS_REQUIRE_REDIS=1`, a failure).
#[path = "../tests/it/support/skip.rs"]
mod skip_policy;
use skip_policy::skip;

#[path = "../tests/it/support/ports.rs"]
mod ports;

#[path = "../tests/it/support/redis_cluster.rs"]
mod redis_cluster;

#[path = "../tests/it/support/private_postgres.rs"]
mod private_postgres;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use iris::keys::KeyHash;
use mock_upstream::{Fault, MockUpstream};
use private_postgres::PrivatePostgres;
use redis_cluster::RedisCluster;
use serde_json::{Value, json};

/// The clients: name, team, concurrency (workers), daily token limit.
const CLIENTS: [(&str, &str, usize, u64); 6] = [
    ("research-1", "research", 6, 50_000_000),
    ("research-2", "research", 3, 50_000_000),
    ("research-3", "research", 1, 40_000),
    ("ops-1", "ops", 4, 50_000_000),
    ("ops-2", "ops", 2, 50_000_000),
    ("ops-3", "ops", 1, 30_000),
];
/// The teams' daily token limits (those under a million are reached during
/// a run: scaled by the run's length, see [`day_limit`]).
const TEAMS: [(&str, u64); 2] = [("research", 100_000_000), ("ops", 400_000)];
/// A client without a team, outside the load: for the round trips.
const SOLO: &str = "solo";
/// Every request's completion cap: with the prompt estimate, the most one
/// request reserves.
const MAX_TOKENS: u64 = 64;

/// A daily limit for a run of `minutes`: the small ones (meant to be
/// reached, so that the windows' bound is put to the test) grow with the
/// run, so that they are reached late in a long run as in a short one.
fn day_limit(base: u64, minutes: f64) -> u64 {
    if base < 1_000_000 {
        base * minutes.ceil().max(1.0) as u64
    } else {
        base
    }
}

fn key_of(client: &str) -> String {
    format!("soak-key-{client}")
}

struct Options {
    minutes: f64,
    instances: usize,
    seed: u64,
}

fn options() -> Options {
    let mut options = Options {
        minutes: 1.0,
        instances: 3,
        seed: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--minutes" => options.minutes = value.parse().expect("--minutes N"),
            "--instances" => options.instances = value.parse().expect("--instances N"),
            "--seed" => options.seed = value.parse().expect("--seed N"),
            other => panic!(
                "unknown argument {other}; usage: soak [--minutes N] [--instances N] [--seed N]"
            ),
        }
        i += 2;
    }
    options
}

/// A small deterministic generator (xorshift), so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------------------
// The instances

/// One `iris serve` at a fixed port, so it can be killed and started again
/// where the clients look for it.
struct Instance {
    index: usize,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

fn iris_binary() -> PathBuf {
    // target/<profile>/examples/soak -> target/<profile>/iris
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("iris"))
        .filter(|path| path.exists())
        .expect("the iris binary beside the examples (cargo build --bin iris)")
}

impl Instance {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(iris_binary())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("IRIS_LOG", "warn")
            .env_remove("IRIS_CONFIG")
            .current_dir(self.config.parent().expect("dir"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start iris");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn wait_ready(&self, http: &reqwest::Client) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(response) = http.get(self.url("/readyz")).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "instance {} not ready after 60 s; its log: {}",
            self.index,
            self.log.display()
        );
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: a clean stop at the end of the run.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// An instance's port: fixed for the run (it is started again on it).
fn free_port() -> u16 {
    ports::listen_port()
}

fn config(
    port: u16,
    redis: &str,
    postgres: &str,
    spool: &Path,
    upstreams: &[String],
    minutes: f64,
) -> String {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_ms = 3000

[store]
kind = "redis"
url = "{redis}"

[spend_log]
kind = "postgres"
url = "{postgres}"
spool_path = "{spool}"
flush_ms = 200

[routing]
retries = 2
backoff_ms = 20
allowed_fails = 5
cooldown_ms = 2000

[pricing]
currency = "USD"
"#,
        spool = spool.display()
    );
    for (i, url) in upstreams.iter().enumerate() {
        text += &format!(
            "\n[[upstreams]]\nname = \"mock-{i}\"\nbase_url = \"{url}\"\napi_key = \"soak-upstream-key\"\n\
             timeout_ms = 5000\ninline_images = true\n"
        );
    }
    // The first mock again, under pacing limits (what the provider allows
    // Iris's key): for the round trips a paced request costs.
    text += &format!(
        "\n[[upstreams]]\nname = \"paced\"\nbase_url = \"{}\"\napi_key = \"soak-upstream-key\"\n\
         requests_per_minute = 1000000\ntokens_per_minute = 1000000000\n",
        upstreams[0]
    );
    text += "\n[[models]]\nname = \"paced\"\nupstream = \"paced\"\n";
    let deployments: Vec<String> = (0..upstreams.len())
        .map(|i| format!("{{ upstream = \"mock-{i}\" }}"))
        .collect();
    text += &format!(
        "\n[[models]]\nname = \"vision\"\ndeployments = [{d}]\nmax_output_tokens = {MAX_TOKENS}\n\
         price = {{ input = 2.50, cached_input = 1.25, output = 10.00 }}\n\
         \n[[models]]\nname = \"embed\"\nendpoint = \"embeddings\"\ndeployments = [{d}]\n\
         price = {{ input = 0.02, output = 0 }}\n",
        d = deployments.join(", ")
    );
    for (team, per_day) in TEAMS {
        let per_day = day_limit(per_day, minutes);
        text += &format!(
            "\n[[teams]]\nname = \"{team}\"\n[teams.budget]\ntokens_per_day = {per_day}\n"
        );
    }
    text += &format!(
        "\n[[clients]]\nname = \"{SOLO}\"\nkey = \"{}\"\n[clients.budget]\ntokens_per_day = 1000000000\n",
        KeyHash::of(&key_of(SOLO))
    );
    for (name, team, _, per_day) in CLIENTS {
        let per_day = day_limit(per_day, minutes);
        text += &format!(
            "\n[[clients]]\nname = \"{name}\"\nkey = \"{}\"\nteam = \"{team}\"\n\
             [clients.budget]\ntokens_per_day = {per_day}\nrequests_per_minute = 100000\n",
            KeyHash::of(&key_of(name))
        );
    }
    text
}

// ---------------------------------------------------------------------------
// What the clients saw

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    Steady,
    InstanceKilled,
    RedisFailover,
    PostgresDown,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::InstanceKilled => "instance killed",
            Self::RedisFailover => "redis failover",
            Self::PostgresDown => "postgres down",
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Received whole: 200 and a complete body; the usage it reported.
    Whole { total_tokens: u64 },
    /// A 200 whose body did not end as it should (a stream cut, the
    /// connection lost mid-way).
    Cut,
    /// An error answer, with its code.
    Refused { status: u16, code: String },
    /// No instance answered at all.
    Unreachable,
}

#[derive(Debug, Clone)]
struct Done {
    request_id: String,
    outcome: Outcome,
    latency: Duration,
    phase: Phase,
}

struct Shared {
    stop: AtomicBool,
    phase: Mutex<Phase>,
    done: Mutex<Vec<Done>>,
    sent: AtomicU64,
}

const TINY_PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0xF8, 0xCF, 0xC0, 0xF0,
    0x1F, 0x00, 0x05, 0x00, 0x01, 0xFF, 0x89, 0x99, 0x3D, 0x1D, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

/// One client worker: requests until told to stop, each to the next
/// instance that takes the connection.
async fn worker(
    shared: Arc<Shared>,
    ports: Arc<Vec<u16>>,
    client: &'static str,
    worker: usize,
    seed: u64,
) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let key = key_of(client);
    let mut rng = Rng(seed | 1);
    let image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(TINY_PNG)
    );
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let request_id = format!("soak-{client}-{worker}-{n}");
        let kind = rng.below(100);
        let (path, body, stream) = match kind {
            0..40 => ("/v1/chat/completions", chat(false, None), false),
            40..70 => ("/v1/chat/completions", chat(true, None), true),
            70..80 => ("/v1/chat/completions", chat(false, Some(&image)), false),
            _ => (
                "/v1/embeddings",
                json!({"model": "embed", "input": ["soak text", format!("item {n}")]}),
                false,
            ),
        };
        let mut headers: Vec<(&str, String)> = Vec::new();
        if stream && rng.chance(5) {
            headers.push(("x-mock-die-after", "2".into()));
        }
        if stream {
            headers.push(("x-mock-chunks", (2 + rng.below(6)).to_string()));
        }
        let started = Instant::now();
        let phase_at_start = *shared.phase.lock().expect("phase");
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let mut outcome = Outcome::Unreachable;
        for attempt in 0..ports.len() * 2 {
            let port = ports[(worker + n as usize + attempt) % ports.len()];
            let mut request = http
                .post(format!("http://127.0.0.1:{port}{path}"))
                .bearer_auth(&key)
                .header("x-request-id", &request_id)
                .json(&body);
            for (name, value) in &headers {
                request = request.header(*name, value);
            }
            match request.send().await {
                Err(e) if e.is_connect() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    outcome = Outcome::Cut;
                    break;
                }
                Ok(response) => {
                    outcome = read(response, stream).await;
                    break;
                }
            }
        }
        // A spent daily window is not retried until it resets (as the SDKs
        // do not): this client backs off instead of spinning on 429s, so
        // the load stays made of requests that are served.
        let spent =
            matches!(&outcome, Outcome::Refused { code, .. } if code == "insufficient_quota");
        let phase = (*shared.phase.lock().expect("phase")).max(phase_at_start);
        shared.done.lock().expect("done").push(Done {
            request_id,
            outcome,
            latency: started.elapsed(),
            phase,
        });
        if spent {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn chat(stream: bool, image: Option<&str>) -> Value {
    let content = match image {
        Some(url) => json!([
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": url}}
        ]),
        None => json!("Say hello"),
    };
    let mut body = json!({
        "model": "vision",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": content}],
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Reads a response to its end: whole (with its usage), cut, or refused.
async fn read(response: reqwest::Response, stream: bool) -> Outcome {
    let status = response.status().as_u16();
    let Ok(bytes) = response.bytes().await else {
        return Outcome::Cut;
    };
    if status != 200 {
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let code = json["error"]["code"].as_str().unwrap_or("-").to_owned();
        return Outcome::Refused { status, code };
    }
    if !stream {
        let Ok(json) = serde_json::from_slice::<Value>(&bytes) else {
            return Outcome::Cut;
        };
        return match json["usage"]["total_tokens"].as_u64() {
            Some(total_tokens) => Outcome::Whole { total_tokens },
            None => Outcome::Cut,
        };
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut total = None;
    let mut done = false;
    for event in text.split("\n\n") {
        let Some(data) = event.trim().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let json: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if json.get("error").is_some() {
            return Outcome::Cut;
        }
        if let Some(t) = json["usage"]["total_tokens"].as_u64() {
            total = Some(t);
        }
    }
    match (done, total) {
        (true, Some(total_tokens)) => Outcome::Whole { total_tokens },
        _ => Outcome::Cut,
    }
}

// ---------------------------------------------------------------------------
// Round trips to the store, per kind of request

/// What Iris asked of the Redis primaries so far, as their `INFO
/// commandstats` say: script calls (`EVALSHA`/`EVAL`, one round trip
/// each), other commands (the commands scripts run count here too), and
/// the CPU µs spent in scripts.
#[derive(Clone, Copy, Default)]
struct RedisWork {
    scripts: u64,
    commands: u64,
    script_usec: f64,
}

async fn redis_work(cluster: &RedisCluster) -> RedisWork {
    let mut work = RedisWork::default();
    for port in cluster.live_ports() {
        if redis_cluster::role(port).await.as_deref() != Some("master") {
            continue;
        }
        let mut connection = redis_cluster::admin(port).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        for line in info.lines() {
            let Some((name, stats)) = line.split_once(':') else {
                continue;
            };
            let command = name.trim_start_matches("cmdstat_");
            // What the harness itself asks, and replication's own traffic.
            if [
                "info", "cluster", "ping", "role", "readonly", "client", "hello", "auth",
                "command", "select", "replconf", "psync", "script",
            ]
            .iter()
            .any(|own| command.starts_with(own))
            {
                continue;
            }
            let script = command.starts_with("eval");
            for field in stats.split(',') {
                match field.split_once('=') {
                    Some(("calls", n)) => {
                        let n = n.parse::<u64>().unwrap_or(0);
                        if script {
                            work.scripts += n;
                        } else {
                            work.commands += n;
                        }
                    }
                    Some(("usec", n)) if script => {
                        work.script_usec += n.parse::<f64>().unwrap_or(0.0)
                    }
                    _ => {}
                }
            }
        }
    }
    work
}

/// Per kind of request, sent one at a time before the load: the Redis
/// commands each costs, and the primaries' CPU µs per request.
async fn round_trips(cluster: &RedisCluster, port: u16, http: &reqwest::Client) -> Vec<String> {
    const N: u64 = 40;
    let team_client = CLIENTS[0].0;
    let kinds: [(&str, &str, &str, Value); 5] = [
        (
            "plain chat, client alone",
            SOLO,
            "/v1/chat/completions",
            chat(false, None),
        ),
        (
            "plain chat, client in a team",
            team_client,
            "/v1/chat/completions",
            chat(false, None),
        ),
        (
            "streamed chat, client in a team",
            team_client,
            "/v1/chat/completions",
            chat(true, None),
        ),
        (
            "embeddings, client in a team",
            team_client,
            "/v1/embeddings",
            json!({"model": "embed", "input": "a"}),
        ),
        (
            "paced upstream, client alone",
            SOLO,
            "/v1/chat/completions",
            {
                let mut body = chat(false, None);
                body["model"] = json!("paced");
                body
            },
        ),
    ];
    let mut lines = Vec::new();
    for (what, client, path, body) in kinds {
        let before = redis_work(cluster).await;
        for _ in 0..N {
            let response = http
                .post(format!("http://127.0.0.1:{port}{path}"))
                .bearer_auth(key_of(client))
                .json(&body)
                .send()
                .await
                .expect("a measured request");
            assert_eq!(response.status(), 200, "{what}");
            let _ = response.bytes().await;
        }
        let after = redis_work(cluster).await;
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / N as f64;
        lines.push(format!(
            "{what}: {:.1} Redis round trips (scripts), {:.1} commands inside or beside them, \
             {:.0} µs of a primary's CPU in scripts",
            per(after.scripts, before.scripts),
            per(after.commands, before.commands),
            (after.script_usec - before.script_usec) / N as f64
        ));
    }
    lines
}

// ---------------------------------------------------------------------------
// The run

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    KillInstance,
    FailRedisPrimary,
    StopPostgres,
}

#[tokio::main]
async fn main() {
    iris::init_tls();
    let options = options();
    let run_for = Duration::from_secs_f64(options.minutes * 60.0);
    let dir = tempfile::tempdir().expect("tempdir");
    println!(
        "soak: {} instance(s), {:.1} min, seed {}, in {}",
        options.instances,
        options.minutes,
        options.seed,
        dir.path().display()
    );

    // Without redis-server or PostgreSQL's binaries the run is skipped (and
    // under IRIS_REQUIRE_REDIS=1, as in CI, that is a failure).
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let Some(mut postgres) = PrivatePostgres::start().await else {
        return;
    };
    let farm = [MockUpstream::start().await, MockUpstream::start().await];
    for upstream in &farm {
        upstream.state.keep_bodies(false);
    }
    let upstream_urls: Vec<String> = farm.iter().map(MockUpstream::base_url).collect();

    let mut instances: Vec<Instance> = (0..options.instances)
        .map(|index| {
            let port = free_port();
            let config_path = dir.path().join(format!("iris-{index}.toml"));
            let spool = dir.path().join(format!("spool-{index}.db"));
            std::fs::write(
                &config_path,
                config(
                    port,
                    &cluster.url(),
                    &postgres.url("sslmode=disable"),
                    &spool,
                    &upstream_urls,
                    options.minutes,
                ),
            )
            .expect("write config");
            Instance {
                index,
                port,
                config: config_path,
                log: dir.path().join(format!("iris-{index}.log")),
                child: None,
            }
        })
        .collect();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    for instance in &mut instances {
        instance.start();
    }
    for instance in &instances {
        instance.wait_ready(&http).await;
    }
    let ports = Arc::new(instances.iter().map(|i| i.port).collect::<Vec<_>>());
    let round_trips = round_trips(&cluster, ports[0], &http).await;
    let db = postgres.client().await;
    let commits = async |db: &tokio_postgres::Client| -> i64 {
        db.query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(0)
    };
    let commits_before = commits(&db).await;
    let redis_before = redis_work(&cluster).await;

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        phase: Mutex::new(Phase::Steady),
        done: Mutex::new(Vec::new()),
        sent: AtomicU64::new(0),
    });
    let mut workers = Vec::new();
    for (c, (client, _, concurrency, _)) in CLIENTS.iter().enumerate() {
        for w in 0..*concurrency {
            let seed = options.seed.wrapping_mul(1_000_003) ^ ((c * 64 + w) as u64 + 7);
            workers.push(tokio::spawn(worker(
                Arc::clone(&shared),
                Arc::clone(&ports),
                client,
                c * 64 + w,
                seed,
            )));
        }
    }

    // The upstreams' own faults, all along: a reset, a 429 with
    // Retry-After, now and then, on one of them.
    let upstream_faults = {
        let shared = Arc::clone(&shared);
        let mut rng = Rng(options.seed ^ 0x5eed);
        let farm = Arc::new(farm);
        let faulty = Arc::clone(&farm);
        let task = tokio::spawn(async move {
            let mut injected = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
                let upstream = &faulty[rng.below(faulty.len() as u64) as usize];
                match rng.below(3) {
                    0 => upstream.fail_next(1, Fault::Reset),
                    1 => upstream.fail_next(1, Fault::retry_after_ms(300)),
                    _ => upstream.fail_next(1, Fault::status(503)),
                }
                injected += 1;
            }
            injected
        });
        (farm, task)
    };
    let (farm, upstream_fault_task) = upstream_faults;

    // The faults of the deployment, at random moments: each kind at least
    // once, one more of each per five minutes.
    let started = Instant::now();
    let mut rng = Rng(options.seed ^ 0xfa17);
    let rounds = 1 + (options.minutes / 5.0) as usize;
    let mut schedule: Vec<(Duration, FaultKind)> = Vec::new();
    for round in 0..rounds {
        let span = run_for / rounds as u32;
        let base = span * round as u32;
        // A round is four slots: three faults in a shuffled order, each
        // starting at a random point of its slot's second quarter, and a
        // last slot of steady running.
        let mut kinds = [
            FaultKind::KillInstance,
            FaultKind::FailRedisPrimary,
            FaultKind::StopPostgres,
        ];
        let swap = rng.below(3) as usize;
        kinds.swap(0, swap);
        let slot_len = span / 4;
        for (slot, kind) in kinds.into_iter().enumerate() {
            let jitter = Duration::from_millis(rng.below(slot_len.as_millis() as u64 / 4 + 1));
            let at = base + slot_len * slot as u32 + slot_len / 4 + jitter;
            schedule.push((at, kind));
        }
    }
    schedule.sort_by_key(|(at, _)| *at);
    let postgres_down_for = Duration::from_secs(30).min(run_for / 4);
    let mut faults_done: Vec<String> = Vec::new();
    for (at, kind) in schedule {
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let t = started.elapsed().as_secs_f64();
        match kind {
            FaultKind::KillInstance => {
                *shared.phase.lock().expect("phase") = Phase::InstanceKilled;
                let victim = rng.below(instances.len() as u64) as usize;
                instances[victim].kill9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                instances[victim].start();
                instances[victim].wait_ready(&http).await;
                faults_done.push(format!(
                    "{t:.1}s: kill -9 of instance {victim}, started again"
                ));
            }
            FaultKind::FailRedisPrimary => {
                *shared.phase.lock().expect("phase") = Phase::RedisFailover;
                let primary = cluster.primary_for(&format!("soak-{t}")).await;
                let replica = cluster.replica_of(primary).await;
                cluster.kill(primary);
                cluster.wait_promoted(replica).await;
                // The old primary comes back as its successor's replica, so
                // that the next failover has a replica to promote.
                cluster.restart(primary).await;
                faults_done.push(format!(
                    "{t:.1}s: Redis primary :{primary} killed, replica :{replica} promoted, \
                     :{primary} back as its replica"
                ));
            }
            FaultKind::StopPostgres => {
                *shared.phase.lock().expect("phase") = Phase::PostgresDown;
                postgres.stop();
                tokio::time::sleep(postgres_down_for).await;
                postgres.restart().await;
                faults_done.push(format!(
                    "{t:.1}s: PostgreSQL stopped for {:.0} s, started again",
                    postgres_down_for.as_secs_f64()
                ));
            }
        }
        // A few seconds of recovery still count as the fault's phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
        *shared.phase.lock().expect("phase") = Phase::Steady;
    }
    if let Some(left) = run_for.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let upstream_faults_injected = upstream_fault_task.await.unwrap_or(0);
    let elapsed = started.elapsed();

    let redis_after = redis_work(&cluster).await;
    // Every spool drained into PostgreSQL: the log stops growing.
    let db = postgres.client().await;
    let mut last = -1i64;
    let mut stable_since = Instant::now();
    let drain_started = Instant::now();
    loop {
        let count: i64 = db
            .query_one("SELECT count(*) FROM spend_log", &[])
            .await
            .map(|row| row.get(0))
            .unwrap_or(-1);
        if count != last {
            last = count;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        if drain_started.elapsed() > Duration::from_secs(180) {
            println!("soak: the log was still growing after 180 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let done = std::mem::take(&mut *shared.done.lock().expect("done"));
    let commits_after = commits(&db).await;
    let records: i64 = db
        .query_one("SELECT count(*) FROM spend_log", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(0);
    let report = check(&db, &done, &instances, &http, options.minutes).await;
    drop(farm);
    println!();
    println!(
        "soak: {:.0} s, {} requests sent ({:.0}/s), {} instances",
        elapsed.as_secs_f64(),
        done.len(),
        done.len() as f64 / elapsed.as_secs_f64(),
        instances.len()
    );
    println!("faults injected:");
    for fault in &faults_done {
        println!("  {fault}");
    }
    println!(
        "  upstream faults (resets, 429 with Retry-After, 503): {upstream_faults_injected}; streams told to die mid-way: ~5% of streams"
    );
    print_outcomes(&done);
    print_latency(&done);
    println!("store round trips per request (sent one at a time, before the load):");
    for line in &round_trips {
        println!("  {line}");
    }
    let scripts = redis_after.scripts.saturating_sub(redis_before.scripts) as f64;
    println!(
        "under load: {:.2} Redis round trips per request ({:.0} scripts/s on three primaries, \
         {:.0} µs of CPU each; a killed primary's counts are lost with it); \
         PostgreSQL: {} transactions for {} records ({:.1} records per transaction)",
        scripts / done.len().max(1) as f64,
        scripts / elapsed.as_secs_f64(),
        (redis_after.script_usec - redis_before.script_usec) / scripts.max(1.0),
        commits_after - commits_before,
        records,
        records as f64 / (commits_after - commits_before).max(1) as f64
    );
    println!("invariants:");
    let mut failed = false;
    for (ok, line) in &report {
        println!("  [{}] {line}", if *ok { "ok" } else { "FAILED" });
        failed |= !ok;
    }
    if failed {
        println!("logs: {}", dir.path().display());
        std::mem::forget(dir);
        std::process::exit(1);
    }
}

fn print_outcomes(done: &[Done]) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for d in done {
        let key = match &d.outcome {
            Outcome::Whole { .. } => "received whole".to_owned(),
            Outcome::Cut => "cut short".to_owned(),
            Outcome::Refused { status, code } => format!("{status} {code}"),
            Outcome::Unreachable => "no instance answered".to_owned(),
        };
        *counts.entry(key).or_default() += 1;
    }
    println!("outcomes:");
    for (key, count) in counts {
        println!("  {key}: {count}");
    }
}

fn print_latency(done: &[Done]) {
    let mut by_phase: BTreeMap<Phase, Vec<Duration>> = BTreeMap::new();
    for d in done {
        if matches!(d.outcome, Outcome::Whole { .. }) {
            by_phase.entry(d.phase).or_default().push(d.latency);
        }
    }
    println!("latency of responses received whole, by phase:");
    for (phase, mut latencies) in by_phase {
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        println!(
            "  {:<16} n={:<6} p50 {:>7.1} ms  p99 {:>7.1} ms",
            phase.name(),
            latencies.len(),
            at(0.5).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0
        );
    }
}

/// The invariants, each with whether it held.
async fn check(
    db: &tokio_postgres::Client,
    done: &[Done],
    instances: &[Instance],
    http: &reqwest::Client,
    minutes: f64,
) -> Vec<(bool, String)> {
    let mut report = Vec::new();
    let rows = db
        .query(
            "SELECT request_id, client, team, total_tokens FROM spend_log",
            &[],
        )
        .await
        .expect("read the spend log");
    let mut records: HashMap<String, (u64, String, Option<String>, i64)> = HashMap::new();
    for row in &rows {
        let id: String = row.get(0);
        let entry = records
            .entry(id)
            .or_insert((0, row.get(1), row.get(2), row.get(3)));
        entry.0 += 1;
    }
    let twice = records.values().filter(|r| r.0 > 1).count();
    report.push((
        twice == 0,
        format!(
            "{} records, {} request ids recorded more than once",
            rows.len(),
            twice
        ),
    ));

    let whole: Vec<&Done> = done
        .iter()
        .filter(|d| matches!(d.outcome, Outcome::Whole { .. }))
        .collect();
    let missing: Vec<&str> = whole
        .iter()
        .filter(|d| !records.contains_key(&d.request_id))
        .map(|d| d.request_id.as_str())
        .collect();
    report.push((
        missing.is_empty(),
        format!(
            "{} responses received whole, {} without a record{}",
            whole.len(),
            missing.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", missing[..missing.len().min(5)].join(", "))
            }
        ),
    ));
    let (mut seen, mut logged, mut differ) = (0u64, 0u64, 0u64);
    for d in &whole {
        let Outcome::Whole { total_tokens } = d.outcome else {
            continue;
        };
        seen += total_tokens;
        if let Some(record) = records.get(&d.request_id) {
            logged += record.3 as u64;
            differ += u64::from(record.3 as u64 != total_tokens);
        }
    }
    report.push((
        differ == 0 && missing.is_empty(),
        format!(
            "tokens the upstreams reported to clients {seen}, in their records {logged} ({differ} records differ)"
        ),
    ));

    // Budgets: the log's day per client and team, and the store's. A
    // window may end past its limit by what in-flight requests settled
    // beyond their reservations (the mock reports a token per 4 bytes of
    // body, more than the prompt's estimate): this bound covers the most
    // one request of this run reserves (an image's 255 tokens, the prompt,
    // the cap) with room for that.
    let max_reservation = 1024;
    let mut by_client: HashMap<String, u64> = HashMap::new();
    let mut by_team: HashMap<String, u64> = HashMap::new();
    for (_, client, team, total) in records.values() {
        *by_client.entry(client.clone()).or_default() += *total as u64;
        if let Some(team) = team {
            *by_team.entry(team.clone()).or_default() += *total as u64;
        }
    }
    let unfinished = done
        .iter()
        .filter(|d| matches!(d.outcome, Outcome::Cut | Outcome::Unreachable))
        .count() as u64;
    let live = instances
        .iter()
        .find(|i| i.child.is_some())
        .expect("a live instance");
    for (name, _, _, per_day) in CLIENTS {
        let per_day = day_limit(per_day, minutes);
        let logged = by_client.get(name).copied().unwrap_or(0);
        let usage: Value = http
            .get(live.url("/v1/usage"))
            .bearer_auth(key_of(name))
            .send()
            .await
            .expect("GET /v1/usage")
            .json()
            .await
            .unwrap_or(Value::Null);
        let stored = usage["windows"]["tokens_per_day"]["used"]
            .as_u64()
            .unwrap_or(0);
        report.push((
            logged <= per_day + max_reservation && stored <= per_day + max_reservation,
            format!(
                "client {name}: day window {per_day}, logged {logged}, store {stored} (at most one reservation, {max_reservation}, over)"
            ),
        ));
        // A request cut short or lost with its instance was charged what
        // it generated (or still holds its reservation); a Redis primary
        // that dies takes its last writes not yet on the replica with it
        // (asynchronous replication): the store may then show less.
        let extra = stored.saturating_sub(logged);
        report.push((
            extra <= unfinished * max_reservation,
            format!(
                "client {name}: the store charged {extra} more than the log ({} less), \
                 within the reservations of the {unfinished} requests that did not finish",
                logged.saturating_sub(stored)
            ),
        ));
    }
    for (team, per_day) in TEAMS {
        let per_day = day_limit(per_day, minutes);
        let logged = by_team.get(team).copied().unwrap_or(0);
        report.push((
            logged <= per_day + max_reservation,
            format!("team {team}: day window {per_day}, logged {logged}"),
        ));
    }
    report
}
