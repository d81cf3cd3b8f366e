//! Connection-level defences, against the real server on loopback: slow
//! headers, slow bodies, idle keep-alive connections, the connection cap,
//! oversize headers; and that a connection parked between requests is
//! reused, pipelined and closed exactly as HTTP/1.1 says. With the real
//! binary: the warning about a low open-files limit, and TCP_NODELAY on
//! client and upstream connections.
//!
//! Deadlines are configured short (about a second); every "closed within"
//! assertion allows generous slack for a busy machine, and a lower bound
//! shows that the deadline, not something else, closed the connection.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::binary::Binary;
use crate::support::{self, Iris, KEY_A, MockUpstream};
use iris::keys::KeyHash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Slack on top of a deadline before a still-open connection is a failure.
const SLACK: Duration = Duration::from_secs(4);
/// A connection closed sooner than its deadline minus this was closed by
/// something else.
const EARLY: Duration = Duration::from_millis(150);

/// The built-in demo upstream, an in-memory store, client `a` with
/// [`KEY_A`], and `server` lines added to `[server]`.
fn config(server: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 10000
{server}

[store]
kind = "memory"

[[upstreams]]
name = "demo"
kind = "demo"

[[models]]
name = "demo"
upstream = "demo"

[[clients]]
name = "a"
key = "{key}"
"#,
        key = KeyHash::of(KEY_A)
    )
}

/// A chat completion request for the demo model, whole.
fn chat_request(extra_headers: &str) -> Vec<u8> {
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"Hello"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: iris\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: iris\r\n\r\n";

/// One response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A raw HTTP/1.1 connection, for what reqwest hides: what is sent when,
/// and whether the server closed the connection.
struct Raw {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buffered: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads more into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next whole response (Content-Length or chunked body), or `None`
    /// if the connection ends first.
    async fn answer(&mut self) -> Option<Answer> {
        let head_end = loop {
            if let Some(i) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).into_owned();
        self.buffered.drain(..head_end);
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let mut answer = Answer {
            status,
            head,
            body: Vec::new(),
        };
        if answer
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let Some(line_end) = self.buffered.windows(2).position(|w| w == b"\r\n") else {
                    if !self.fill().await {
                        return None;
                    }
                    continue;
                };
                let size_text = String::from_utf8_lossy(&self.buffered[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.trim(), 16).ok()?;
                while self.buffered.len() < line_end + 2 + size + 2 {
                    if !self.fill().await {
                        return None;
                    }
                }
                answer
                    .body
                    .extend_from_slice(&self.buffered[line_end + 2..line_end + 2 + size]);
                self.buffered.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    return Some(answer);
                }
            }
        }
        let length: usize = answer
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.buffered.len() < length {
            if !self.fill().await {
                return None;
            }
        }
        answer.body = self.buffered.drain(..length).collect();
        Some(answer)
    }

    /// Waits (at most `within`) for the server to close the connection;
    /// `true` if it did. Anything it sends first is discarded.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.fill().await {} })
            .await
            .is_ok()
    }
}

/// Sends `head` at once, then `drip` every 200 ms until the server closes
/// the connection; returns when that happened (from `started`) and what it
/// answered first, if anything. Gives up after `give_up`.
async fn drip(
    addr: SocketAddr,
    head: Vec<u8>,
    drip: &'static [u8],
    started: Instant,
    give_up: Duration,
) -> (Option<Duration>, Option<Answer>) {
    let mut raw = Raw::connect(addr).await;
    raw.send(&head).await;
    let (mut read, mut write) = raw.stream.split();
    let writer = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(drip).await.is_err() {
                // The server is gone; the reader sees it.
                std::future::pending::<()>().await;
            }
        }
    };
    let mut received = Vec::new();
    let reader = async {
        let mut chunk = [0u8; 1024];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let closed = tokio::select! {
        () = reader => Some(started.elapsed()),
        () = writer => None,
        () = tokio::time::sleep_until(started + give_up) => None,
    };
    let answer = if received.is_empty() {
        None
    } else {
        let mut parsed = Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buffered: received,
        };
        parsed.answer().await
    };
    (closed, answer)
}

async fn healthz_ok(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut raw = Raw::connect(addr).await;
    raw.send(HEALTHZ).await;
    let answer = raw.answer().await.expect("an answer");
    assert_eq!(answer.status, 200);
    started.elapsed()
}

#[tokio::test]
async fn slow_headers_are_closed_at_the_header_deadline_and_others_are_served_meanwhile() {
    let iris = Iris::start(&config("header_read_timeout_ms = 1000")).await;
    let deadline = Duration::from_millis(1000);
    let started = Instant::now();
    let mut slow = JoinSet::new();
    for _ in 0..300 {
        slow.spawn(drip(
            iris.addr,
            b"GET /healthz HTTP/1.1\r\nHost: iris\r\n".to_vec(),
            b"X-Slow: 1\r\n",
            Instant::now(),
            deadline + SLACK,
        ));
    }
    // Served promptly while 300 sockets dribble headers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let took = healthz_ok(iris.addr).await;
        assert!(
            took < Duration::from_secs(2),
            "a normal request took {took:?}"
        );
    }
    let fates = slow.join_all().await;
    for (closed, answer) in &fates {
        let closed = closed.expect("every slow-header socket is closed");
        assert!(
            closed >= deadline - EARLY,
            "closed after {closed:?}, before the deadline"
        );
        assert!(answer.is_none(), "no answer to a request never completed");
    }
    assert!(started.elapsed() < deadline + SLACK + Duration::from_secs(2));
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_later_requests_header_deadline_runs_from_its_first_byte_not_from_the_previous_answer() {
    let iris = Iris::start(&config(
        "header_read_timeout_ms = 500\nkeep_alive_timeout_ms = 5000",
    ))
    .await;
    let mut raw = Raw::connect(iris.addr).await;
    raw.send(HEALTHZ).await;
    assert_eq!(raw.answer().await.expect("first").status, 200);
    // Idle longer than the header deadline, within the keep-alive one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    raw.send(HEALTHZ).await;
    assert_eq!(
        raw.answer().await.expect("second, same connection").status,
        200
    );
    // A request whose headers then stall is cut at the header deadline.
    let stalled = Instant::now();
    raw.send(b"GET /healthz HTTP/1.1\r\n").await;
    assert!(raw.closed_within(Duration::from_millis(500) + SLACK).await);
    assert!(stalled.elapsed() >= Duration::from_millis(500) - EARLY);
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn slow_bodies_get_408_and_are_closed_at_the_body_deadline() {
    let iris = Iris::start(&config("body_read_timeout_ms = 1000")).await;
    let deadline = Duration::from_millis(1000);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: iris\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    );
    let mut slow = JoinSet::new();
    for _ in 0..100 {
        slow.spawn(drip(
            iris.addr,
            head.clone().into_bytes(),
            b" ",
            Instant::now(),
            deadline + SLACK,
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = healthz_ok(iris.addr).await;
    assert!(
        took < Duration::from_secs(2),
        "a normal request took {took:?}"
    );
    for (closed, answer) in slow.join_all().await {
        let closed = closed.expect("every slow-body socket is closed");
        assert!(closed >= deadline - EARLY, "closed after {closed:?}");
        let answer = answer.expect("a 408");
        assert_eq!(answer.status, 408);
        assert_eq!(answer.header("connection"), Some("close"));
        let json = answer.json();
        assert_eq!(json["error"]["code"], "request_timeout");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn idle_connections_are_closed_at_their_deadlines_and_busy_ones_are_reused() {
    let iris = Iris::start(&config(
        "header_read_timeout_ms = 800\nkeep_alive_timeout_ms = 1500",
    ))
    .await;
    // Connected, nothing sent: the header deadline.
    let mut silent = Raw::connect(iris.addr).await;
    let started = Instant::now();
    assert!(
        silent
            .closed_within(Duration::from_millis(800) + SLACK)
            .await
    );
    assert!(started.elapsed() >= Duration::from_millis(800) - EARLY);

    // One request, then nothing: the keep-alive deadline, from the answer.
    let mut idle = Raw::connect(iris.addr).await;
    idle.send(HEALTHZ).await;
    assert_eq!(idle.answer().await.expect("answer").status, 200);
    let answered = Instant::now();
    assert!(
        idle.closed_within(Duration::from_millis(1500) + SLACK)
            .await
    );
    let waited = answered.elapsed();
    assert!(waited >= Duration::from_millis(1500) - EARLY, "{waited:?}");

    // A request every 500 ms keeps one connection going past both deadlines.
    let mut busy = Raw::connect(iris.addr).await;
    for _ in 0..6 {
        busy.send(HEALTHZ).await;
        assert_eq!(busy.answer().await.expect("same connection").status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn over_the_connection_cap_a_client_gets_503_and_is_served_once_others_close() {
    let iris = Iris::start(&config("max_connections = 5")).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut raw = Raw::connect(iris.addr).await;
        raw.send(HEALTHZ).await;
        assert_eq!(raw.answer().await.expect("within the cap").status, 200);
        held.push(raw);
    }
    let mut refused = Raw::connect(iris.addr).await;
    refused.send(&chat_request("")).await;
    let answer = refused.answer().await.expect("a refusal, not a reset");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json = answer.json();
    assert_eq!(json["error"]["code"], "too_many_connections");
    assert_eq!(json["error"]["type"], "api_error");
    assert!(refused.closed_within(SLACK).await, "closed after the 503");

    // reqwest sees the same, as a plain 503 it can retry.
    let response = support::http()
        .get(iris.url("/healthz"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 503);

    drop(held);
    let until = Instant::now() + SLACK;
    loop {
        let mut raw = Raw::connect(iris.addr).await;
        raw.send(&chat_request("")).await;
        let answer = raw.answer().await.expect("an answer");
        if answer.status == 200 {
            assert_eq!(answer.json()["object"], "chat.completion");
            break;
        }
        assert_eq!(answer.status, 503);
        assert!(
            Instant::now() < until,
            "still refused after the others closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn oversize_or_too_many_headers_get_431() {
    let iris = Iris::start(&config("max_header_bytes = 2048\nmax_headers = 12")).await;
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: iris\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );
    let many: String = (0..20).map(|i| format!("X-Header-{i}: {i}\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nHost: iris\r\n{many}\r\n");
    for request in [big, many] {
        let mut raw = Raw::connect(iris.addr).await;
        raw.send(request.as_bytes()).await;
        let answer = raw.answer().await.expect("an answer");
        assert_eq!(answer.status, 431, "{}", answer.head);
        assert!(raw.closed_within(SLACK).await);
    }
    // Just under both limits is fine.
    let fits = format!(
        "GET /healthz HTTP/1.1\r\nHost: iris\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1500)
    );
    let mut raw = Raw::connect(iris.addr).await;
    raw.send(fits.as_bytes()).await;
    assert_eq!(raw.answer().await.expect("an answer").status, 200);
    iris.stop().await.expect("clean stop");
}

/// The default limit (100 header fields) is hyper's own, which Iris then
/// leaves unset: it still holds, 100 fields (Host among them) pass, 101 do not.
#[tokio::test]
async fn the_default_limit_on_header_fields_holds() {
    let iris = Iris::start(&config("")).await;
    let request = |fields: usize| {
        let many: String = (0..fields).map(|i| format!("X-H-{i}: {i}\r\n")).collect();
        format!("GET /healthz HTTP/1.1\r\nHost: iris\r\n{many}\r\n")
    };
    for (fields, status) in [(99, 200), (100, 431)] {
        let mut raw = Raw::connect(iris.addr).await;
        raw.send(request(fields).as_bytes()).await;
        let answer = raw.answer().await.expect("an answer");
        assert_eq!(answer.status, status, "{} fields and Host", fields);
    }
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_parked_connection_keeps_http_semantics() {
    let iris = Iris::start(&config("")).await;

    // Pipelined: two requests in one write, two answers in order, and the
    // connection stays usable.
    let mut raw = Raw::connect(iris.addr).await;
    let mut two = chat_request("");
    two.extend_from_slice(HEALTHZ);
    raw.send(&two).await;
    let first = raw.answer().await.expect("first");
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["object"], "chat.completion");
    assert_eq!(raw.answer().await.expect("second").body, b"ok");
    // Split across writes, in pieces, after a pause.
    let request = chat_request("");
    let (a, b) = request.split_at(30);
    raw.send(a).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.send(b).await;
    assert_eq!(raw.answer().await.expect("third").status, 200);
    // A request and the start of the next in one write: what was read of
    // the next one survives the park between them.
    let mut one_and_a_half = HEALTHZ.to_vec();
    one_and_a_half.extend_from_slice(a);
    raw.send(&one_and_a_half).await;
    assert_eq!(raw.answer().await.expect("fourth").body, b"ok");
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.send(b).await;
    let fifth = raw.answer().await.expect("fifth");
    assert_eq!(fifth.status, 200, "{fifth:?}");
    assert_eq!(fifth.json()["object"], "chat.completion");

    // A chunked request body read to its end leaves the connection reusable.
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"Hi"}]}"#;
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: iris\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    raw.send(chunked.as_bytes()).await;
    assert_eq!(raw.answer().await.expect("chunked").status, 200);
    raw.send(HEALTHZ).await;
    assert_eq!(raw.answer().await.expect("after chunked").status, 200);

    // A streamed answer, then the next request on the same connection.
    let stream_body =
        r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let streamed = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: iris\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{stream_body}",
        stream_body.len()
    );
    raw.send(streamed.as_bytes()).await;
    let answer = raw.answer().await.expect("stream");
    assert!(
        String::from_utf8_lossy(&answer.body).ends_with("data: [DONE]\n\n"),
        "{answer:?}"
    );
    raw.send(HEALTHZ).await;
    assert_eq!(raw.answer().await.expect("after the stream").status, 200);

    // `Connection: close`: answered, then closed.
    raw.send(&chat_request("Connection: close\r\n")).await;
    assert_eq!(raw.answer().await.expect("last").status, 200);
    assert!(raw.closed_within(SLACK).await);

    // HTTP/1.0 without keep-alive: answered, then closed.
    let mut old = Raw::connect(iris.addr).await;
    old.send(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(old.answer().await.expect("1.0").status, 200);
    assert!(old.closed_within(SLACK).await);

    // A body the handler never read (401 before reading): answered whole,
    // and, the body having arrived, drained: the connection goes on.
    let mut unread = Raw::connect(iris.addr).await;
    unread
        .send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: iris\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let answer = unread.answer().await.expect("401");
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"]["code"], "invalid_api_key");
    assert_eq!(answer.header("connection"), None);
    for _ in 0..2 {
        unread.send(HEALTHZ).await;
        assert_eq!(unread.answer().await.expect("after the 401").status, 200);
    }
    iris.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once() {
    let iris = Iris::start(&config("")).await;
    let mut parked = Raw::connect(iris.addr).await;
    parked.send(HEALTHZ).await;
    assert_eq!(parked.answer().await.expect("answer").status, 200);
    let mut silent = Raw::connect(iris.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    // The grace is 10 s: nothing is in flight, so the stop is immediate.
    iris.stop().await.expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(parked.closed_within(SLACK).await);
    assert!(silent.closed_within(SLACK).await);
}

/// The open-files limit (docs/connections.md): below
/// `server.max_connections` plus 256, Iris warns at startup, naming both;
/// above it, not. The real binary under `ulimit -n 512`.
#[tokio::test]
async fn a_low_open_files_limit_is_warned_about_at_startup() {
    for (max_connections, warned) in [(10_000, true), (200, false)] {
        let config = config(&format!("max_connections = {max_connections}"));
        let iris = Binary::start_after(&config, "ulimit -n 512").await;
        // Answered: the accept loop runs, so the check before it has.
        let healthz = support::http()
            .get(iris.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(healthz.status(), 200);
        let warnings = iris.logged("open-files limit");
        if warned {
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert_eq!(warnings[0]["level"], "WARN");
            assert_eq!(warnings[0]["open_files_limit"], 512);
            assert_eq!(warnings[0]["max_connections"], max_connections);
        } else {
            assert!(warnings.is_empty(), "{warnings:?}");
        }
    }
}

/// TCP_NODELAY (docs/performance.md): set on the connection Iris accepts
/// from a client and on the one it opens to an upstream. The option lives
/// in the kernel and reading it back needs the socket itself (and `unsafe`,
/// which Iris forbids), so the real binary's system calls are read instead:
/// `strace` attached to it while it serves one chat completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_nodelay_is_set_on_client_and_upstream_connections() {
    if !std::path::Path::new("/usr/bin/strace").exists() {
        support::skip::<()>("no /usr/bin/strace");
        return;
    }
    let upstream = MockUpstream::start().await;
    let iris = Binary::start(&support::base_config(&upstream.base_url(), "")).await;
    let trace = tempfile::NamedTempFile::new().expect("temp file");
    let strace = Strace::attach(iris.pid(), trace.path()).await;
    let answer = support::http()
        .post(iris.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&support::chat_body("test-model"))
        .send()
        .await
        .expect("chat");
    assert_eq!(answer.status(), 200);
    strace.detach().await;

    let calls = std::fs::read_to_string(trace.path()).expect("trace");
    let fd_after = |line: &str, call: &str| -> Option<u32> {
        line.split(call)
            .nth(1)?
            .split(',')
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let returned = |line: &str| -> Option<u32> { line.rsplit("= ").next()?.trim().parse().ok() };
    let accepted: Vec<u32> = calls
        .lines()
        .filter(|line| line.contains("accept"))
        .filter_map(returned)
        .collect();
    let upstream_port = format!("htons({})", upstream.addr.port());
    let connected: Vec<u32> = calls
        .lines()
        .filter(|line| line.contains(&upstream_port))
        .filter_map(|line| fd_after(line, "connect("))
        .collect();
    let nodelay: Vec<u32> = calls
        .lines()
        .filter(|line| line.contains("TCP_NODELAY, [1]"))
        .filter_map(|line| fd_after(line, "setsockopt("))
        .collect();
    assert_eq!(accepted.len(), 1, "{calls}");
    assert_eq!(connected.len(), 1, "{calls}");
    for fd in accepted.iter().chain(&connected) {
        assert!(nodelay.contains(fd), "no TCP_NODELAY on fd {fd}:\n{calls}");
    }
}

/// `strace -f -p PID` writing to a file, until detached (killed on drop).
struct Strace(Option<std::process::Child>);

impl Strace {
    /// Attaches to every thread of `pid`, and waits until it says so
    /// ("Process N attached with T threads": once all are stopped, no
    /// system call of theirs goes untraced).
    async fn attach(pid: u32, trace: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new("strace")
            .args(["-f", "-e", "trace=accept,accept4,connect,setsockopt", "-o"])
            .arg(trace)
            .args(["-p", &pid.to_string()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("strace");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Read to the end: strace must never write to a closed pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let said = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .expect("join")
            .expect("strace says something");
        assert!(said.contains("attached"), "{said}");
        Self(Some(child))
    }

    /// Detaches (SIGTERM: the traced process runs on) and waits for the
    /// trace to be written.
    async fn detach(mut self) {
        let mut child = self.0.take().expect("attached");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("strace exits");
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
