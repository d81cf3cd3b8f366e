//! Measures what slow and idle clients cost a running `iris`: how long
//! slow-header and slow-body sockets are held, whether a normal request is
//! still served meanwhile, and how much memory idle connections take.
//!
//!   cargo build --release && cargo run --release --example slow_clients
//!   cargo run --release --example slow_clients -- --iris path/to/iris --only idle
//!
//! Each scenario starts its own `iris` (the binary named by `--iris`, default
//! `target/release/iris`) on a free loopback port with the built-in demo
//! upstream and an in-memory store, so one scenario's freed memory cannot
//! hide the next one's cost:
//!
//! - `slow`: 300 sockets send a request head one header line every 2 s and
//!   100 sockets send a complete head then a body one byte every 2 s. It
//!   reports how many are still open 20 s (heads) and 35 s (bodies) after
//!   they started, when each was closed and what it was answered, and the
//!   slowest of the normal requests (`GET /healthz` on a new connection)
//!   sent every 2 s meanwhile.
//! - `idle`: the server's resident memory (VmRSS) before and after 2,000
//!   connections that connect and send nothing, and after 2,000 more;
//!   then, on a new server, the same with connections that each made one
//!   keep-alive request and stay open. The server runs with
//!   `MIMALLOC_PURGE_DELAY=0`, so what its allocator holds is what it uses. Give the server a header deadline longer than
//!   opening them takes (`--server 'header_read_timeout_ms = 120000'`) or
//!   it rightly closes the silent ones first.
//!
//! Only loopback addresses are used.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "measurement tool")]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const KEY: &str = "slow-clients-probe-key";

struct Args {
    iris: String,
    only: Option<String>,
    slow_headers: usize,
    slow_bodies: usize,
    idle: usize,
    server: Vec<String>,
}

fn args() -> Args {
    let mut args = Args {
        iris: "target/release/iris".into(),
        only: None,
        slow_headers: 300,
        slow_bodies: 100,
        idle: 2000,
        server: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--iris" => args.iris = value(),
            "--only" => args.only = Some(value()),
            "--slow-headers" => args.slow_headers = value().parse().expect("a number"),
            "--slow-bodies" => args.slow_bodies = value().parse().expect("a number"),
            "--idle" => args.idle = value().parse().expect("a number"),
            // An extra `[server]` line, e.g. --server 'max_connections = 500'.
            "--server" => args.server.push(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// A running `iris` on a free loopback port; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Server {
    async fn start(args: &Args) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        std::fs::write(
            config.path(),
            format!(
                "[server]\nlisten = \"{addr}\"\n{}\n\n[store]\nkind = \"memory\"\n\n\
                 [[upstreams]]\nname = \"demo\"\nkind = \"demo\"\n\n\
                 [[models]]\nname = \"demo\"\nupstream = \"demo\"\n\n\
                 [[clients]]\nname = \"probe\"\nkey = \"{}\"\n",
                args.server.join("\n"),
                iris::keys::KeyHash::of(KEY)
            ),
        )
        .expect("write config");
        let child = Command::new(&args.iris)
            .args(["serve", "--config"])
            .arg(config.path())
            .env("IRIS_LOG", "error")
            // Freed memory goes back to the system at once, not a second
            // later: otherwise memory freed before a measurement can be
            // returned during it and pass for a saving.
            .env("MIMALLOC_PURGE_DELAY", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", args.iris));
        let server = Self {
            child,
            addr,
            _config: config,
        };
        let started = Instant::now();
        while healthz(addr).await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "iris did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Server {
    /// RSS once it stops moving: the allocator returns memory freed earlier
    /// (startup, warm-up) to the system some time later, which would
    /// otherwise pass for a saving.
    async fn settled_rss_kib(&self) -> u64 {
        let mut last = self.rss_kib();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.rss_kib();
            if now.abs_diff(last) < 64 {
                return now;
            }
            last = now;
        }
        last
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /healthz` on a new connection: how long it took, or `None`.
async fn healthz(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    response
        .starts_with(b"HTTP/1.1 200")
        .then(|| started.elapsed())
}

/// What happened to one slow socket.
struct Fate {
    /// Since the scenario started, when the server closed it.
    closed_after: Option<Duration>,
    /// The status line the server answered, if any.
    answer: Option<String>,
}

/// Sends `head` at once, then `drip` every 2 s, until the server closes the
/// connection or `hold` passes.
async fn drip(
    addr: SocketAddr,
    head: Vec<u8>,
    drip: &'static [u8],
    started: Instant,
    hold: Duration,
) -> Fate {
    let mut fate = Fate {
        closed_after: None,
        answer: None,
    };
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        fate.closed_after = Some(started.elapsed());
        fate.answer = Some("connect failed".into());
        return fate;
    };
    let (mut read, mut write) = stream.split();
    let mut received = Vec::new();
    let writer = async {
        if write.write_all(&head).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if write.write_all(drip).await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        let mut buf = [0u8; 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::select! {
        () = reader => fate.closed_after = Some(started.elapsed()),
        () = writer => {
            // The server stopped reading: wait for its close to show.
            let mut buf = [0u8; 1024];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), read.read(&mut buf)).await
            {
                if n == 0 { break }
                received.extend_from_slice(&buf[..n]);
            }
            fate.closed_after = Some(started.elapsed());
        }
        () = tokio::time::sleep_until((started + hold).into()) => {}
    }
    if !received.is_empty() {
        let text = String::from_utf8_lossy(&received);
        fate.answer = text.lines().next().map(str::to_owned);
    }
    fate
}

fn report(name: &str, fates: &[Fate], checkpoint: Duration) {
    let open_at = fates
        .iter()
        .filter(|f| f.closed_after.is_none_or(|t| t > checkpoint))
        .count();
    let mut closed: Vec<Duration> = fates.iter().filter_map(|f| f.closed_after).collect();
    closed.sort();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for fate in fates {
        *answers
            .entry(fate.answer.clone().unwrap_or_else(|| "(nothing)".into()))
            .or_default() += 1;
    }
    println!(
        "{name}: {open_at} of {} still open after {:.0} s; {} closed in all, \
         first after {:.1} s, last after {:.1} s; answers: {answers:?}",
        fates.len(),
        checkpoint.as_secs_f64(),
        closed.len(),
        closed.first().map_or(0.0, Duration::as_secs_f64),
        closed.last().map_or(0.0, Duration::as_secs_f64),
    );
}

async fn slow(args: &Args) {
    let server = Server::start(args).await;
    let addr = server.addr;
    let started = Instant::now();
    let hold = Duration::from_secs(40);
    let mut heads = JoinSet::new();
    for _ in 0..args.slow_headers {
        heads.spawn(drip(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: probe\r\n".to_vec(),
            b"X-Slow: 1\r\n",
            started,
            hold,
        ));
    }
    let mut bodies = JoinSet::new();
    for _ in 0..args.slow_bodies {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\n\
             Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\n\r\n{{"
        );
        bodies.spawn(drip(addr, head.into_bytes(), b" ", started, hold));
    }
    // Normal requests meanwhile, each on a new connection.
    let mut slowest = Duration::ZERO;
    let mut failed = 0;
    let mut sent = 0;
    while started.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(2)).await;
        sent += 1;
        match tokio::time::timeout(Duration::from_secs(10), healthz(addr)).await {
            Ok(Some(took)) => slowest = slowest.max(took),
            _ => failed += 1,
        }
    }
    let heads: Vec<Fate> = heads.join_all().await;
    let bodies: Vec<Fate> = bodies.join_all().await;
    report("slow headers", &heads, Duration::from_secs(20));
    report("slow bodies", &bodies, Duration::from_secs(35));
    println!(
        "normal requests meanwhile: {sent} sent, {failed} failed, slowest {:.1} ms",
        slowest.as_secs_f64() * 1000.0
    );
}

/// Opens `n` connections, `request` making each send one keep-alive request
/// and read its answer.
async fn open_idle(addr: SocketAddr, n: usize, request: bool) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        if request {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\nok") {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
        }
        streams.push(stream);
    }
    streams
}

/// How many of `streams` the server has not closed.
fn still_open(streams: &[TcpStream]) -> usize {
    streams
        .iter()
        .filter(|s| {
            let mut buf = [0u8; 1];
            matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

/// The RSS growth per idle connection, for the first `args.idle`
/// connections and for as many more on top of them.
async fn idle_cost(args: &Args, request: bool) {
    let server = Server::start(args).await;
    for _ in 0..50 {
        healthz(server.addr).await;
    }
    let start = server.settled_rss_kib().await;
    let first = open_idle(server.addr, args.idle, request).await;
    let middle = server.settled_rss_kib().await;
    let second = open_idle(server.addr, args.idle, request).await;
    let end = server.settled_rss_kib().await;
    // A server that had closed them would make the figure meaningless.
    let open = still_open(&first) + still_open(&second);
    let per = |from: u64, to: u64| (to as f64 - from as f64) / args.idle as f64;
    println!(
        "idle connections{}: RSS {start} KiB, {middle} KiB with {n}, {end} KiB with {}: \
         {:.2} KiB each for the first {n}, {:.2} KiB each for the next {n} \
         ({open} still open when measured)",
        if request {
            " after one keep-alive request each"
        } else {
            " that sent nothing"
        },
        2 * args.idle,
        per(start, middle),
        per(middle, end),
        n = args.idle,
    );
}

#[tokio::main]
async fn main() {
    let args = args();
    let run = |name: &str| args.only.as_deref().is_none_or(|only| only == name);
    if run("idle") {
        idle_cost(&args, false).await;
        idle_cost(&args, true).await;
    }
    if run("slow") {
        slow(&args).await;
    }
}
