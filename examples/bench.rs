//! Load benchmark: the same requests sent straight to a mock upstream, through
//! a bare pass-through proxy, and through Iris, in one run.
//!
//!   cargo run --release --example bench [-- --seconds 3] [--only 'small chat/64/iris']
//!       [--paired ROUNDS] [--no-rss]
//!
//! Iris is measured with budgets in the memory store (`store.kind = "memory"`,
//! no write per settlement), in the SQLite store that is the default (a file
//! in a temporary directory of the run's own: each response's settlement and
//! spend record committed before its end, one group commit for many) and,
//! when a Redis answers at `redis://127.0.0.1:6379/13` (or
//! `$IRIS_BENCH_REDIS_URL`), in the shared Redis store too (keys under a
//! prefix of the run's own, deleted at the end; its spend log is SQLite,
//! `iris-spend.db` in the working directory: run from a scratch directory).
//!
//! Each server runs on its own 1-thread runtime and the load generator on
//! another, so the numbers compare like with like on a small machine. The bare
//! proxy (a few dozen lines of hyper that forward bytes and nothing else) is the
//! floor any gateway sits on: Iris's overhead is reported next to it, and a
//! summary gives each headline figure as a ratio to the floor's.
//!
//! Each cell also gives the server's CPU time per request (its threads'
//! user and system time, from /proc, over the cell's requests), and the
//! summary the whole run's (load generator, mock upstream and server): on a
//! machine shared with other work, wall-clock throughput moves with the
//! neighbours from run to run, while CPU per request moves much less. At
//! c=64 the run keeps both cores busy, so the throughput ratio is about the
//! inverse of the whole run's CPU ratio: 0.8 of the floor's throughput is
//! about 1.25x its CPU per request.
//!
//! The goals' figures are then measured again in paired rounds (5 unless
//! `--paired N`; 0 skips them; `--only paired` runs only them): in each
//! round, the cells a ratio compares run one right after the other, 1 s
//! each, and the table gives each ratio's median, lowest and highest over
//! the rounds and in how many it was within its goal. A neighbour that
//! slows the machine for half a minute moves a ratio of cells minutes
//! apart; it moves both cells of a pair alike.
//!
//! The response cache is measured as hits: the same small chat again and
//! again to a model with `cache = true` (in memory, and on Redis when the
//! Redis store is measured), which no upstream answers after the first.
//!
//! Memory is measured apart, in child processes (this program run again as
//! the real `iris serve`, and as the bare proxy), from /proc: resident set
//! when idle and after a load at concurrency 64; and what one cached answer
//! costs, as the growth of the resident set over a number of distinct
//! answers stored (after as many requests that stored nothing, so that
//! what serving them costs is already counted). `--no-rss` skips it.

#[path = "../tests/it/support/mock_upstream.rs"]
mod mock_upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use iris::keys::KeyHash;

/// The allocator the `iris` binary uses, so in-process numbers match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-key";
const KEY_BUDGETED: &str = "bench-key-budgeted";

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Small,
    Image,
    Stream,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Small => "small chat",
            Scenario::Image => "150 KB base64 image",
            Scenario::Stream => "streamed (time to first chunk)",
        }
    }

    fn body(self, model: &str) -> Bytes {
        let content = match self {
            Scenario::Image => {
                let image = sample_jpeg(150 * 1024);
                let data = base64::engine::general_purpose::STANDARD.encode(&image);
                serde_json::json!([
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{data}")}}
                ])
            }
            _ => serde_json::json!("Say hello in five words."),
        };
        let mut body = serde_json::json!({
            "model": model,
            "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}],
            "max_tokens": 64,
        });
        if self == Scenario::Stream {
            body["stream"] = serde_json::json!(true);
        }
        Bytes::from(body.to_string())
    }
}

/// A JPEG of about `size` bytes: noise compresses badly, so a few hundred
/// pixels a side reach 150 KB.
fn sample_jpeg(size: usize) -> Vec<u8> {
    let mut side = 64u32;
    loop {
        let mut state = 0x2545_f491_u32;
        let image = image::RgbImage::from_fn(side, side, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        let _ = image::DynamicImage::ImageRgb8(image).write_to(&mut out, image::ImageFormat::Jpeg);
        if out.get_ref().len() >= size || side > 4096 {
            return out.into_inner();
        }
        side += 16;
    }
}

/// Runs `future`'s server on a dedicated 1-thread runtime in its own OS thread.
fn spawn_runtime<F, Fut>(name: &str, make: F) -> SocketAddr
where
    F: FnOnce(tokio::sync::oneshot::Sender<SocketAddr>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name_for_pool = name.to_owned();
    // Named threads, so a profiler (and `cpu_of`) can tell the servers apart.
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Its blocking threads get the name too: their CPU time is the
            // server's (see `cpu_of`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .thread_name(name_for_pool)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                make(tx).await;
                std::future::pending::<()>().await;
            });
        });
    if let Err(e) = spawned {
        panic!("thread: {e}");
    }
    rx.blocking_recv()
        .unwrap_or_else(|e| panic!("server start: {e}"))
}

/// The floor: accepts, forwards the bytes to `upstream`, streams the answer back.
async fn bare_proxy(upstream: SocketAddr, ready: tokio::sync::oneshot::Sender<SocketAddr>) {
    bare_proxy_on(upstream, ("127.0.0.1", 0), ready).await;
}

async fn bare_proxy_on(
    upstream: SocketAddr,
    listen: (&str, u16),
    ready: tokio::sync::oneshot::Sender<SocketAddr>,
) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let _ = ready.send(
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}")),
    );
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let uri = format!("http://{upstream}{}", request.uri().path());
                    *request.uri_mut() = uri.parse().unwrap_or_default();
                    request.headers_mut().remove(hyper::header::HOST);
                    match client.request(request).await {
                        Ok(response) => Ok::<_, Infallible>(response.map(|b| b.boxed())),
                        Err(_) => Ok(Response::builder()
                            .status(502)
                            .body(
                                Full::new(Bytes::new())
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                            .unwrap_or_default()),
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// An upstream that answers every request 503 at once, for the failover cells.
async fn failing_upstream(ready: tokio::sync::oneshot::Sender<SocketAddr>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let _ = ready.send(
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}")),
    );
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(503)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"error":{"message":"overloaded","type":"server_error","code":null}}"#,
                        )))
                        .unwrap_or_default(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn iris_server(
    upstream: SocketAddr,
    second: SocketAddr,
    failing: SocketAddr,
    store: String,
    ready: tokio::sync::oneshot::Sender<SocketAddr>,
) {
    iris::init_tls();
    // The cache where the store is: in memory, or on the store's Redis.
    let cache = if store.contains("\"redis\"") {
        "redis"
    } else {
        "memory"
    };
    let config = format!(
        r#"
        {store}
        [cache]
        kind = "{cache}"
        [[upstreams]]
        name = "mock"
        base_url = "http://{upstream}/v1"
        api_key = "upstream-key"
        [[upstreams]]
        name = "mock-2"
        base_url = "http://{second}/v1"
        api_key = "upstream-key"
        [[upstreams]]
        name = "failing"
        base_url = "http://{failing}/v1"
        api_key = "upstream-key"
        [[models]]
        name = "bench-model"
        upstream = "mock"
        [[models]]
        name = "bench-routed"
        deployments = [{{ upstream = "mock" }}, {{ upstream = "mock-2" }}]
        [[models]]
        name = "bench-failover"
        deployments = [{{ upstream = "failing" }}, {{ upstream = "mock" }}]
        [[models]]
        name = "bench-cached"
        upstream = "mock"
        cache = true
        [[clients]]
        name = "bench"
        key = "{key}"
        [[clients]]
        name = "bench-budgeted"
        key = "{budgeted}"
        [clients.budget]
        requests_per_minute = 100000000
        tokens_per_minute = 100000000000
        tokens_per_day = 1000000000000
        tokens_per_month = 10000000000000
        max_concurrent = 100000
        "#,
        key = KeyHash::of(KEY),
        budgeted = KeyHash::of(KEY_BUDGETED),
    );
    let config = iris::config::parse(&config, &|_| None).unwrap_or_else(|p| panic!("config: {p}"));
    let state = iris::app::AppState::new(config)
        .await
        .unwrap_or_else(|e| panic!("state: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let _ = ready.send(
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}")),
    );
    let _ = iris::server::run(listener, state, std::future::pending()).await;
}

#[derive(Default)]
struct Measured {
    requests: usize,
    /// Requests answered, the warm-up's included (what the servers' CPU
    /// time over the whole load is divided by).
    sent: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index]
    }
}

/// Sends `body` to `target` from `concurrency` connections for `seconds`;
/// for streams the latency is the time to the first body chunk.
async fn load(
    target: SocketAddr,
    key: &str,
    model: &str,
    scenario: Scenario,
    concurrency: usize,
    seconds: f64,
) -> Measured {
    let body = scenario.body(model);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(connector);
    let uri: hyper::Uri = format!("http://{target}/v1/chat/completions")
        .parse()
        .unwrap_or_default();
    let auth = format!("Bearer {key}");

    // Warm the connections and caches.
    let warm_until = Instant::now() + Duration::from_millis(300);
    let deadline = warm_until + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, uri, auth, body) = (client.clone(), uri.clone(), auth.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut measured = Measured::default();
            loop {
                let started = Instant::now();
                if started >= deadline {
                    break;
                }
                let request = Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("authorization", &auth)
                    .body(Full::new(body.clone()))
                    .unwrap_or_default();
                let ok = match client.request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let mut body = response.into_body();
                        let mut latency = None;
                        while let Some(frame) = body.frame().await {
                            if frame.is_err() {
                                break;
                            }
                            if scenario == Scenario::Stream && latency.is_none() {
                                latency = Some(started.elapsed());
                            }
                        }
                        let latency = latency.unwrap_or_else(|| started.elapsed());
                        if started >= warm_until {
                            measured.latencies.push(latency);
                        }
                        ok
                    }
                    Err(_) => false,
                };
                measured.sent += 1;
                if started >= warm_until {
                    measured.requests += 1;
                    measured.errors += usize::from(!ok);
                }
            }
            measured
        }));
    }
    let mut total = Measured {
        elapsed: Duration::from_secs_f64(seconds),
        ..Measured::default()
    };
    for task in tasks {
        if let Ok(measured) = task.await {
            total.requests += measured.requests;
            total.sent += measured.sent;
            total.errors += measured.errors;
            total.latencies.extend(measured.latencies);
        }
    }
    total.latencies.sort_unstable();
    total
}

/// The Redis the "iris + budgets (redis)" target uses, if one answers.
struct BenchRedis {
    url: String,
    prefix: String,
}

impl BenchRedis {
    fn find() -> Option<Self> {
        let url = std::env::var("IRIS_BENCH_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/13".into());
        let answers = redis::Client::open(url.as_str())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
            .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
        if let Err(e) = answers {
            println!("(no Redis at {url}: {e}; the Redis store is not measured)\n");
            return None;
        }
        let mut random = [0u8; 8];
        let _ = getrandom::fill(&mut random);
        Some(Self {
            url,
            prefix: format!("iris-bench-{}", hex::encode(random)),
        })
    }
}

impl Drop for BenchRedis {
    /// The run's budget keys would otherwise live until the month ends.
    fn drop(&mut self) {
        let Ok(mut connection) = redis::Client::open(self.url.as_str())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
        else {
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

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    // Child modes, for the memory figures.
    if let Some(config) = arg("--serve-iris") {
        std::process::exit(i32::from(
            iris::commands::serve(&iris::cli::ConfigArg {
                config: Some(config.into()),
            }) != std::process::ExitCode::SUCCESS,
        ));
    }
    if let (Some(upstream), Some(port)) = (arg("--serve-bare"), arg("--port")) {
        serve_bare_child(&upstream, &port);
        return;
    }
    let seconds: f64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(3.0);
    // `--only TEXT`: run only the cells whose "scenario/concurrency/target" contains TEXT.
    let only = arg("--only").unwrap_or_default();

    let upstream = spawn_runtime("mock", |ready| async move {
        let mock = mock_upstream::MockUpstream::start().await;
        mock.state.keep_bodies(false);
        let _ = ready.send(mock.addr);
        std::future::pending::<()>().await;
    });
    // The second deployment is another upstream entry on the same mock, so
    // the cell measures routing, not a second server's thread.
    let second = upstream;
    let failing = spawn_runtime("failing", failing_upstream);
    let bare = spawn_runtime("bare", move |ready| bare_proxy(upstream, ready));
    let iris = spawn_runtime("iris", move |ready| {
        iris_server(
            upstream,
            second,
            failing,
            "[store]\nkind = \"memory\"".into(),
            ready,
        )
    });
    // The default store: a file of the run's own, removed at the end.
    let sqlite_dir = std::env::temp_dir().join(format!("iris-bench-sqlite-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&sqlite_dir);
    let sqlite_store = format!(
        "[store]\nkind = \"sqlite\"\npath = \"{}\"",
        sqlite_dir.join("iris.db").display()
    );
    let iris_sqlite = spawn_runtime("iris-sqlite", move |ready| {
        iris_server(upstream, second, failing, sqlite_store, ready)
    });
    let redis = BenchRedis::find();
    let iris_redis = redis.as_ref().map(|redis| {
        let store = format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{}\"",
            redis.url, redis.prefix
        );
        spawn_runtime("iris-redis", move |ready| {
            iris_server(upstream, second, failing, store, ready)
        })
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));

    println!(
        "# Iris load benchmark ({seconds} s per cell, 1-thread runtimes, {} cores)\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut cells = Vec::new();
    println!(
        "| scenario | concurrency | target | req/s | p50 | p99 | added p50 | server CPU / request | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let servers = Servers {
        mock: upstream,
        bare,
        iris,
        iris_sqlite,
        iris_redis,
    };
    for scenario in [Scenario::Small, Scenario::Image, Scenario::Stream] {
        for concurrency in [1, 64] {
            let mut direct_p50 = Duration::ZERO;
            for target in servers.targets(scenario) {
                let cell = format!("{}/{concurrency}/{}", scenario.name(), target.name);
                if !cell.contains(&only) && (target.name != "direct" || !only.is_empty()) {
                    continue;
                }
                let cell = measure(
                    &runtime,
                    &target,
                    scenario,
                    concurrency,
                    seconds,
                    direct_p50,
                );
                if target.name == "direct" {
                    direct_p50 = cell.p50;
                }
                println!(
                    "| {} | {concurrency} | {} | {:.0} | {} | {} | {} | {:.1} µs | {} |",
                    scenario.name(),
                    target.name,
                    cell.rps,
                    micros(cell.p50),
                    micros(cell.p99),
                    if target.name == "direct" {
                        "-".into()
                    } else {
                        micros(cell.added_p50)
                    },
                    cell.cpu_per_request.as_secs_f64() * 1e6,
                    cell.errors,
                );
                cells.push(cell);
            }
        }
    }
    if !cells.is_empty() {
        print_summary(&cells);
    }
    let rounds: usize = arg("--paired").and_then(|n| n.parse().ok()).unwrap_or(5);
    if rounds > 0 && (only.is_empty() || only == "paired") {
        paired_rounds(&runtime, &servers, rounds);
    }
    if std::env::args().all(|a| a != "--no-rss") {
        runtime.block_on(print_memory(upstream, seconds));
    }
    let _ = std::fs::remove_dir_all(&sqlite_dir);
}

/// One measured cell, kept for the summary.
struct Cell {
    scenario: Scenario,
    concurrency: usize,
    target: &'static str,
    rps: f64,
    p50: Duration,
    p99: Duration,
    added_p50: Duration,
    errors: usize,
    /// The server's threads' CPU time (user and system) per request.
    cpu_per_request: Duration,
    /// The load generator's and the mock upstream's, per request.
    rest_per_request: Duration,
}

/// The servers a run measures, each on its own runtime thread.
struct Servers {
    mock: SocketAddr,
    bare: SocketAddr,
    /// Budgets in the memory store.
    iris: SocketAddr,
    /// Budgets in the SQLite store, the default.
    iris_sqlite: SocketAddr,
    iris_redis: Option<SocketAddr>,
}

/// Where a cell's load goes, and as whom.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The name of the server's threads (see [`cpu_of`]).
    threads: &'static str,
    key: &'static str,
    model: &'static str,
}

impl Servers {
    /// The cells of `scenario`, in the order they run: "direct" first (the
    /// others' added latency counts from it), then the floor.
    fn targets(&self, scenario: Scenario) -> Vec<Target> {
        let target = |name, addr, threads, key, model| Target {
            name,
            addr,
            threads,
            key,
            model,
        };
        let model = "bench-model";
        let mut targets = vec![
            target("direct", self.mock, "mock", KEY, model),
            target("bare proxy", self.bare, "bare", KEY, model),
            target("iris", self.iris, "iris", KEY, model),
            target("iris + budgets", self.iris, "iris", KEY_BUDGETED, model),
            target("iris (sqlite)", self.iris_sqlite, "iris-sqlite", KEY, model),
            target(
                "iris + budgets (sqlite)",
                self.iris_sqlite,
                "iris-sqlite",
                KEY_BUDGETED,
                model,
            ),
        ];
        if let Some(iris_redis) = self.iris_redis {
            targets.push(target(
                "iris + budgets (redis)",
                iris_redis,
                "iris-redis",
                KEY_BUDGETED,
                model,
            ));
        }
        if scenario == Scenario::Small {
            // Routing: two healthy deployments; then one of two answering
            // 503 to everything (failover, then its cooldown).
            targets.push(target(
                "iris, 2 deployments",
                self.iris,
                "iris",
                KEY,
                "bench-routed",
            ));
            targets.push(target(
                "iris, 1 of 2 failing",
                self.iris,
                "iris",
                KEY,
                "bench-failover",
            ));
        }
        if scenario != Scenario::Image {
            // The same request again and again: answered from the cache.
            targets.push(target(
                "iris, cache hit",
                self.iris,
                "iris",
                KEY_BUDGETED,
                "bench-cached",
            ));
            if let Some(iris_redis) = self.iris_redis {
                targets.push(target(
                    "iris, cache hit (redis)",
                    iris_redis,
                    "iris-redis",
                    KEY_BUDGETED,
                    "bench-cached",
                ));
            }
        }
        targets
    }

    /// The target called `name` in `scenario`.
    fn target(&self, scenario: Scenario, name: &str) -> Option<Target> {
        self.targets(scenario).into_iter().find(|t| t.name == name)
    }
}

/// The cells a paired ratio compares.
const FLOOR: &str = "bare proxy";
const MEMORY: &str = "iris + budgets";
const SQLITE: &str = "iris + budgets (sqlite)";

/// One of the goals' figures, as the paired rounds read it.
struct Figure {
    name: &'static str,
    goal: Goal,
    /// The figure's value in a round, from the round's cells.
    of: fn(&Round) -> Option<f64>,
}

/// A figure's goal: a bound and the unit its table prints after it.
#[derive(Clone, Copy)]
enum Goal {
    /// A figure measured for what it explains, with no goal of its own.
    None,
    AtMost(f64, &'static str),
    AtLeast(f64, &'static str),
}

impl Goal {
    /// Whether `value` is within the goal (never, without one).
    fn within(self, value: f64) -> bool {
        match self {
            Self::None => false,
            Self::AtMost(bound, _) => value <= bound,
            Self::AtLeast(bound, _) => value >= bound,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("-"),
            Self::AtMost(bound, unit) => write!(f, "≤ {bound}{unit}"),
            Self::AtLeast(bound, unit) => write!(f, "≥ {bound}{unit}"),
        }
    }
}

/// The cells one round measured.
struct Round(Vec<Cell>);

impl Round {
    fn cell(&self, scenario: Scenario, concurrency: usize, target: &str) -> Option<&Cell> {
        self.0
            .iter()
            .find(|c| c.scenario == scenario && c.concurrency == concurrency && c.target == target)
    }

    /// `of`'s value in `target`'s cell over its value in `base`'s.
    fn ratio(
        &self,
        (scenario, concurrency): (Scenario, usize),
        target: &str,
        base: &str,
        of: fn(&Cell) -> f64,
    ) -> Option<f64> {
        let target = of(self.cell(scenario, concurrency, target)?);
        let base = of(self.cell(scenario, concurrency, base)?);
        Some(target / base.max(1e-12))
    }
}

const SMALL_1: (Scenario, usize) = (Scenario::Small, 1);
const SMALL_64: (Scenario, usize) = (Scenario::Small, 64);
const STREAM_1: (Scenario, usize) = (Scenario::Stream, 1);

const FIGURES: [Figure; 7] = [
    Figure {
        name: "latency added, small chat, c=1 (p50): iris + budgets ÷ floor",
        goal: Goal::AtMost(1.5, "x"),
        of: |round| round.ratio(SMALL_1, MEMORY, FLOOR, |c| c.added_p50.as_secs_f64()),
    },
    Figure {
        name: "throughput, small chat, c=64: iris + budgets ÷ floor",
        goal: Goal::AtLeast(0.8, ""),
        of: |round| round.ratio(SMALL_64, MEMORY, FLOOR, |c| c.rps),
    },
    Figure {
        name: "latency added to the first streamed chunk, c=1 (p50): iris + budgets ÷ floor",
        goal: Goal::AtMost(1.5, "x"),
        of: |round| round.ratio(STREAM_1, MEMORY, FLOOR, |c| c.added_p50.as_secs_f64()),
    },
    Figure {
        name: "server CPU per request, small chat, c=64: iris + budgets ÷ floor",
        goal: Goal::None,
        of: |round| round.ratio(SMALL_64, MEMORY, FLOOR, |c| c.cpu_per_request.as_secs_f64()),
    },
    Figure {
        name: "the run's CPU per request, small chat, c=64: iris + budgets ÷ floor",
        goal: Goal::AtMost(1.25, "x"),
        of: |round| {
            round.ratio(SMALL_64, MEMORY, FLOOR, |c| {
                (c.cpu_per_request + c.rest_per_request).as_secs_f64()
            })
        },
    },
    Figure {
        name: "throughput, small chat, c=64: SQLite store ÷ memory store",
        goal: Goal::AtLeast(0.9, ""),
        of: |round| round.ratio(SMALL_64, SQLITE, MEMORY, |c| c.rps),
    },
    Figure {
        name: "latency added, small chat, c=1 (p50): SQLite store − memory store, µs",
        goal: Goal::AtMost(10.0, ""),
        of: |round| {
            let added = |target| Some(round.cell(SMALL_1.0, SMALL_1.1, target)?.added_p50);
            Some((added(SQLITE)?.as_secs_f64() - added(MEMORY)?.as_secs_f64()) * 1e6)
        },
    },
];

/// The goals' figures, measured in rounds: in each round every figure's
/// cells run one right after the other (1 s each), so each ratio compares
/// cells measured seconds apart, not minutes. On a machine shared with
/// other work the floor's own throughput moves by a fifth between runs;
/// a ratio of cells far apart in a run carries that, the median of
/// adjacent pairs much less.
fn paired_rounds(runtime: &tokio::runtime::Runtime, servers: &Servers, rounds: usize) {
    const SECONDS: f64 = 1.0;
    println!(
        "\n## Paired rounds ({rounds} rounds; a figure's cells 1 s each, one after the other)\n"
    );
    let mut values: Vec<Vec<f64>> = FIGURES.iter().map(|_| Vec::new()).collect();
    for number in 1..=rounds {
        let mut round = Round(Vec::new());
        for ((scenario, concurrency), names) in [
            (SMALL_1, &[FLOOR, MEMORY, SQLITE][..]),
            (SMALL_64, &[FLOOR, MEMORY, SQLITE][..]),
            (STREAM_1, &[FLOOR, MEMORY][..]),
        ] {
            // At c=1 the added latency counts from the mock's own, measured
            // in the same round.
            let direct_p50 = match servers.target(scenario, "direct") {
                Some(direct) if concurrency == 1 => {
                    measure(runtime, &direct, scenario, 1, SECONDS, Duration::ZERO).p50
                }
                _ => Duration::ZERO,
            };
            // In every other round the order is turned around, so that
            // neither side of a ratio always runs first.
            let mut names = names.to_vec();
            if number % 2 == 0 {
                names.reverse();
            }
            for target in names
                .into_iter()
                .filter_map(|name| servers.target(scenario, name))
            {
                let cell = measure(runtime, &target, scenario, concurrency, SECONDS, direct_p50);
                round.0.push(cell);
            }
        }
        for (figure, values) in FIGURES.iter().zip(&mut values) {
            values.extend((figure.of)(&round));
        }
        let rps = |target| {
            round
                .cell(Scenario::Small, 64, target)
                .map_or(0.0, |c| c.rps)
        };
        println!(
            "round {number}: at c=64 the floor {:.0} req/s, iris + budgets {:.0}, SQLite store {:.0}",
            rps(FLOOR),
            rps(MEMORY),
            rps(SQLITE)
        );
    }
    println!("\n| figure | median | lowest | highest | rounds within the goal | goal |");
    println!("|---|---|---|---|---|---|");
    for (figure, mut values) in FIGURES.iter().zip(values) {
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median = if values.len() % 2 == 1 {
            values[middle]
        } else {
            f64::midpoint(values[middle - 1], values[middle])
        };
        let within = match figure.goal {
            Goal::None => "-".to_owned(),
            goal => {
                let count = values.iter().filter(|v| goal.within(**v)).count();
                format!("{count} of {}", values.len())
            }
        };
        println!(
            "| {} | {median:.2} | {:.2} | {:.2} | {within} | {} |",
            figure.name,
            values[0],
            values[values.len() - 1],
            figure.goal
        );
    }
}

/// One cell: `target` loaded for `seconds`, with its server's CPU time and
/// the rest of the run's; its latency added to `direct_p50`'s.
fn measure(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    scenario: Scenario,
    concurrency: usize,
    seconds: f64,
    direct_p50: Duration,
) -> Cell {
    let cpu_before = cpu_of(target.threads);
    let rest_before = cpu_of("mock") + cpu_of_this_thread();
    let measured = runtime.block_on(load(
        target.addr,
        target.key,
        target.model,
        scenario,
        concurrency,
        seconds,
    ));
    let cpu = cpu_of(target.threads).saturating_sub(cpu_before);
    // The rest of the run's work: the load generator (this thread) and the
    // mock upstream (less the server's own: the mock is the "direct"
    // cell's server).
    let rest = (cpu_of("mock") + cpu_of_this_thread())
        .saturating_sub(rest_before)
        .saturating_sub(if target.threads == "mock" {
            cpu
        } else {
            Duration::ZERO
        });
    let sent = u32::try_from(measured.sent.max(1)).unwrap_or(u32::MAX);
    let p50 = measured.percentile(0.5);
    Cell {
        scenario,
        concurrency,
        target: target.name,
        rps: measured.rps(),
        p50,
        p99: measured.percentile(0.99),
        added_p50: p50.saturating_sub(direct_p50),
        errors: measured.errors,
        cpu_per_request: cpu / sent,
        rest_per_request: rest / sent,
    }
}

/// The CPU time (user and system, from the scheduler's own count in
/// nanoseconds) that this process's threads named `name` have used so far.
/// A server's runtime and blocking threads share its name (see
/// `spawn_runtime`); a blocking thread that has ended since is not counted,
/// which a cell of a few seconds' steady load does not see.
fn cpu_of(name: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut nanos = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let named =
            std::fs::read_to_string(path.join("comm")).is_ok_and(|comm| comm.trim_end() == name);
        if !named {
            continue;
        }
        nanos += on_cpu_nanos(&path);
    }
    Duration::from_nanos(nanos)
}

/// The CPU time the calling thread has used so far (see [`cpu_of`]).
fn cpu_of_this_thread() -> Duration {
    Duration::from_nanos(on_cpu_nanos(std::path::Path::new("/proc/thread-self")))
}

/// The first field of a task's `schedstat`: its time on a CPU, in
/// nanoseconds (0 when it cannot be read).
fn on_cpu_nanos(task: &std::path::Path) -> u64 {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The headline figures as ratios to the bare proxy's, from this run's cells.
fn print_summary(cells: &[Cell]) {
    let find = |scenario, concurrency, target: &str| {
        cells
            .iter()
            .find(|c| c.scenario == scenario && c.concurrency == concurrency && c.target == target)
    };
    println!("\n| figure | bare proxy | iris | iris ÷ floor | iris + budgets | ÷ floor | goal |");
    println!("|---|---|---|---|---|---|---|");
    // What each figure reads of a cell.
    #[derive(Clone, Copy, PartialEq)]
    enum Read {
        AddedLatency,
        Throughput,
        Cpu,
        WholeCpu,
    }
    let rows: [(&str, Scenario, usize, Read, &str); 5] = [
        (
            "latency added, small chat, c=1 (p50)",
            Scenario::Small,
            1,
            Read::AddedLatency,
            "≤ 1.5x",
        ),
        (
            "throughput, small chat, c=64",
            Scenario::Small,
            64,
            Read::Throughput,
            "≥ 0.8",
        ),
        (
            "latency added to the first streamed chunk, c=1 (p50)",
            Scenario::Stream,
            1,
            Read::AddedLatency,
            "≤ 1.5x",
        ),
        (
            "server CPU per request, small chat, c=64",
            Scenario::Small,
            64,
            Read::Cpu,
            "-",
        ),
        (
            "the run's CPU per request (load, mock and server), c=64",
            Scenario::Small,
            64,
            Read::WholeCpu,
            "≤ 1.25x",
        ),
    ];
    for (figure, scenario, concurrency, read, goal) in rows {
        let Some(bare) = find(scenario, concurrency, "bare proxy") else {
            continue;
        };
        let value = |cell: &Cell| match read {
            Read::Throughput => (format!("{:.0} req/s", cell.rps), cell.rps / bare.rps),
            Read::AddedLatency => {
                let floor = bare.added_p50.as_secs_f64().max(1e-6);
                (micros(cell.added_p50), cell.added_p50.as_secs_f64() / floor)
            }
            Read::Cpu | Read::WholeCpu => {
                let cpu = |cell: &Cell| {
                    let rest = if read == Read::WholeCpu {
                        cell.rest_per_request
                    } else {
                        Duration::ZERO
                    };
                    (cell.cpu_per_request + rest).as_secs_f64()
                };
                let floor = cpu(bare).max(1e-9);
                (format!("{:.1} µs", cpu(cell) * 1e6), cpu(cell) / floor)
            }
        };
        let (bare_text, _) = value(bare);
        let mut line = format!("| {figure} | {bare_text} |");
        for target in ["iris", "iris + budgets"] {
            match find(scenario, concurrency, target) {
                Some(cell) => {
                    let (text, ratio) = value(cell);
                    line.push_str(&format!(
                        " {text} | {ratio:.2}{} |",
                        if read == Read::Throughput { "" } else { "x" }
                    ));
                }
                None => line.push_str(" - | - |"),
            }
        }
        println!("{line} {goal} |");
    }

    // A hit calls no upstream: its whole latency against the floor's.
    println!(
        "\n| figure | bare proxy (to the upstream) | iris, cache hit | ÷ floor | iris, cache hit (redis) | ÷ floor | goal |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (figure, scenario, concurrency, throughput) in [
        ("latency, small chat, c=1 (p50)", Scenario::Small, 1, false),
        (
            "latency to the first streamed chunk, c=1 (p50)",
            Scenario::Stream,
            1,
            false,
        ),
        ("throughput, small chat, c=64", Scenario::Small, 64, true),
    ] {
        let Some(bare) = find(scenario, concurrency, "bare proxy") else {
            continue;
        };
        let value = |cell: &Cell| {
            if throughput {
                (format!("{:.0} req/s", cell.rps), cell.rps / bare.rps)
            } else {
                let floor = bare.p50.as_secs_f64().max(1e-6);
                (micros(cell.p50), cell.p50.as_secs_f64() / floor)
            }
        };
        let mut line = format!("| {figure} | {} |", value(bare).0);
        for target in ["iris, cache hit", "iris, cache hit (redis)"] {
            match find(scenario, concurrency, target) {
                Some(cell) => {
                    let (text, ratio) = value(cell);
                    line.push_str(&format!(" {text} | {ratio:.2} |"));
                }
                None => line.push_str(" - | - |"),
            }
        }
        let goal = if throughput { "> 1" } else { "< 1" };
        println!("{line} {goal} |");
    }
}

/// Resident memory of the real server and of the bare proxy, each in a
/// child process: idle, then after `seconds` of small chats at concurrency 64.
async fn print_memory(upstream: SocketAddr, seconds: f64) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    println!("\n| process | RSS idle | RSS after c=64 | peak (VmHWM) | goal |");
    println!("|---|---|---|---|---|");
    let bare_port = free_port();
    let bare = std::process::Command::new(&exe)
        .args([
            "--serve-bare",
            &upstream.to_string(),
            "--port",
            &bare_port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Ok(child) = bare {
        measure_child(child, bare_port, "bare proxy", KEY, seconds, "").await;
    }
    for (name, key, budgeted) in [
        ("iris serve, no token limits", KEY, false),
        ("iris serve, a client with token limits", KEY_BUDGETED, true),
    ] {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("iris-bench-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let config_path = dir.join("iris.toml");
        let budget = if budgeted {
            format!(
                "[[clients]]\nname = \"bench-budgeted\"\nkey = \"{}\"\n[clients.budget]\ntokens_per_day = 1000000000000\nrequests_per_minute = 100000000\n",
                KeyHash::of(KEY_BUDGETED)
            )
        } else {
            String::new()
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nkind = \"sqlite\"\npath = \"{db}\"\n\
             [[upstreams]]\nname = \"mock\"\nbase_url = \"http://{upstream}/v1\"\napi_key = \"k\"\n\
             [[models]]\nname = \"bench-model\"\nupstream = \"mock\"\n\
             [[clients]]\nname = \"bench\"\nkey = \"{hash}\"\n{budget}",
            db = dir.join("iris.db").display(),
            hash = KeyHash::of(KEY),
        );
        if std::fs::write(&config_path, config).is_err() {
            continue;
        }
        let child = std::process::Command::new(&exe)
            .args(["--serve-iris", &config_path.display().to_string()])
            .env("IRIS_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(child) = child {
            measure_child(child, port, name, key, seconds, "≤ 30 MiB at c=64").await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    measure_cache_entries(&exe, upstream).await;
}

/// Distinct answers stored to measure what one cached entry costs.
const CACHED_ENTRIES: usize = 20_000;

/// What a cached answer costs in memory: `iris serve` with a memory cache,
/// sent [`CACHED_ENTRIES`] distinct small chats with `Cache-Control:
/// no-store` (served, nothing kept: what serving costs settles in the
/// allocator), then as many other distinct ones that are kept; the growth
/// of the resident set in between, per entry, beside what `max_bytes`
/// counts per entry (`iris_cache_bytes`).
async fn measure_cache_entries(exe: &std::path::Path, upstream: SocketAddr) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("iris-bench-cache-{}-{port}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let config_path = dir.join("iris.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nkind = \"memory\"\n\
         [spend_log]\nkind = \"off\"\n[cache]\nkind = \"memory\"\nmax_bytes = 1073741824\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"http://{upstream}/v1\"\napi_key = \"k\"\n\
         [[models]]\nname = \"bench-cached\"\nupstream = \"mock\"\ncache = true\n\
         [[clients]]\nname = \"bench\"\nkey = \"{hash}\"\n",
        hash = KeyHash::of(KEY),
    );
    if std::fs::write(&config_path, config).is_err() {
        return;
    }
    let child = std::process::Command::new(exe)
        .args(["--serve-iris", &config_path.display().to_string()])
        .env("IRIS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return;
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fill(addr, "served", true).await;
    let before = status_kib(child.id(), "VmRSS");
    fill(addr, "kept", false).await;
    let after = status_kib(child.id(), "VmRSS");
    let counted = cache_bytes(addr).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    let per_entry = after.saturating_sub(before) as f64 * 1024.0 / CACHED_ENTRIES as f64;
    println!(
        "\n| cached entries | RSS before | RSS after | RSS per entry | counted per entry (iris_cache_bytes) |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {CACHED_ENTRIES} small chats | {:.1} MiB | {:.1} MiB | {per_entry:.0} B | {} |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        counted.map_or("-".into(), |b| format!(
            "{:.0} B",
            b / CACHED_ENTRIES as f64
        )),
    );
}

/// Sends [`CACHED_ENTRIES`] distinct small chats for `bench-cached`, 16 at
/// a time, each asking something of its own (`tag` and a number).
async fn fill(addr: SocketAddr, tag: &str, no_store: bool) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: hyper::Uri = format!("http://{addr}/v1/chat/completions")
        .parse()
        .unwrap_or_default();
    let auth = format!("Bearer {KEY}");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, uri, auth, next, tag) = (
            client.clone(),
            uri.clone(),
            auth.clone(),
            std::sync::Arc::clone(&next),
            tag.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= CACHED_ENTRIES {
                    break;
                }
                let body = serde_json::json!({
                    "model": "bench-cached",
                    "messages": [{"role": "user", "content": format!("Say hello in five words ({tag} {n}).")}],
                    "max_tokens": 64,
                });
                let mut request = Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("authorization", &auth);
                if no_store {
                    request = request.header("cache-control", "no-store");
                }
                let request = request
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap_or_default();
                if let Ok(response) = client.request(request).await {
                    let _ = response.into_body().collect().await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// `iris_cache_bytes` from the server's `/metrics`.
async fn cache_bytes(addr: SocketAddr) -> Option<f64> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: hyper::Uri = format!("http://{addr}/metrics").parse().ok()?;
    let response = client.get(uri).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find(|line| line.starts_with("iris_cache_bytes "))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

async fn measure_child(
    mut child: std::process::Child,
    port: u16,
    name: &str,
    key: &str,
    seconds: f64,
    goal: &str,
) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            println!("| {name} | did not start | | | |");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let start-up work (the tokenizer's load, first flushes) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = status_kib(child.id(), "VmRSS");
    let measured = load(addr, key, "bench-model", Scenario::Small, 64, seconds).await;
    let after = status_kib(child.id(), "VmRSS");
    let peak = status_kib(child.id(), "VmHWM");
    let _ = child.kill();
    let _ = child.wait();
    let mib =
        |kib: Option<u64>| kib.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "| {name} ({:.0} req/s, {} errors) | {} | {} | {} | {goal} |",
        measured.rps(),
        measured.errors,
        mib(idle),
        mib(after),
        mib(peak)
    );
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A port nothing listens on now (the child binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_or(0, |addr| addr.port())
}

/// `--serve-bare UPSTREAM --port PORT`: the bare proxy alone, in this process.
fn serve_bare_child(upstream: &str, port: &str) {
    let (Ok(upstream), Ok(port)) = (upstream.parse::<SocketAddr>(), port.parse::<u16>()) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(async move {
        let (ready, _) = tokio::sync::oneshot::channel();
        bare_proxy_on(upstream, ("127.0.0.1", port), ready).await;
    });
}
