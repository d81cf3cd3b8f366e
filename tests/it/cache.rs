//! The response cache (issue 22, items 2 and 3) through the real server: a
//! repeated request answered by Iris without calling upstream (the mock's
//! request count says so), streams kept whole and replayed in either form,
//! images keyed by their bytes, tenants kept apart, `Cache-Control`, what is
//! never kept, what a hit costs, its spend record, Redis shared by two
//! instances, a reload that changes the model, and eviction.

use iris::keys::KeyHash;
use serde_json::{Value, json};

use crate::support::image_server::ImageServer;
use crate::support::mock_upstream::Fault;
use crate::support::redis::{SharedRedis, with_store};
use crate::support::{
    Iris, KEY_A, KEY_B, MockUpstream, admin_toml, base_config, chat_body, metric_sum, stream_body,
    write_config,
};

/// `test-model` (renamed upstream) with `cache = true` and `[cache]` as
/// given; `other-model` does not cache. `extra` is appended.
fn config(upstream: &str, cache: &str, extra: &str) -> String {
    let renamed = "upstream_model = \"upstream-model\"\n";
    let config = base_config(upstream, &format!("\n[cache]\n{cache}\n{extra}"));
    assert!(config.contains(renamed), "base_config changed test-model");
    config.replacen(renamed, &format!("{renamed}cache = true\n"), 1)
}

const MEMORY: &str = "kind = \"memory\"";

async fn memory_iris(upstream: &MockUpstream) -> Iris {
    Iris::start(&config(&upstream.base_url(), MEMORY, "")).await
}

/// A chat body for `test-model` asking `question`.
fn ask(question: &str) -> Value {
    json!({"model": "test-model", "messages": [{"role": "user", "content": question}]})
}

/// The response's `x-iris-cache`, if any.
fn cache_header(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-iris-cache")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

/// Sends `body` as `key`: `x-iris-cache`, status and body text.
async fn send(
    iris: &Iris,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (String, u16, String) {
    let response = iris.chat(key, body, headers).await;
    let cache = cache_header(&response).unwrap_or_else(|| "none".into());
    let status = response.status().as_u16();
    (cache, status, response.text().await.expect("body"))
}

/// The `data:` payloads of an SSE body, `[DONE]` as the string.
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap_or_else(|_| json!(data)))
        .collect()
}

/// The text a stream's chunks carry.
fn streamed_text(text: &str) -> String {
    events(text)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn a_repeated_request_is_answered_by_iris_byte_for_byte() {
    let upstream = MockUpstream::start().await;
    let iris = memory_iris(&upstream).await;

    let first = iris.chat(KEY_A, &ask("hello?"), &[]).await;
    assert_eq!(cache_header(&first).as_deref(), Some("miss"));
    assert!(first.headers().contains_key("x-iris-attempts"));
    let first_type = first.headers()["content-type"].clone();
    let first = first.bytes().await.expect("body");
    assert_eq!(upstream.requests(), 1);

    let again = iris.chat(KEY_A, &ask("hello?"), &[]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(cache_header(&again).as_deref(), Some("hit"));
    assert!(
        !again.headers().contains_key("x-iris-attempts"),
        "Iris answered"
    );
    assert!(!again.headers().contains_key("x-iris-upstream"));
    assert_eq!(again.headers()["content-type"], first_type);
    assert_eq!(
        again.headers()["content-length"],
        first.len().to_string().as_str(),
        "a whole answer is sent with its length"
    );
    assert_eq!(again.bytes().await.expect("body"), first, "byte for byte");
    assert_eq!(upstream.requests(), 1, "the upstream was not called");

    // Another question, and fields that change the answer, are other requests;
    // `user` and `stream_options` do not change it.
    let (cache, ..) = send(&iris, KEY_A, &ask("goodbye?"), &[]).await;
    assert_eq!(cache, "miss");
    let mut hot = ask("hello?");
    hot["temperature"] = json!(1.5);
    assert_eq!(send(&iris, KEY_A, &hot, &[]).await.0, "miss");
    let mut user = ask("hello?");
    user["user"] = json!("end-user-7");
    assert_eq!(send(&iris, KEY_A, &user, &[]).await.0, "hit");
    assert_eq!(upstream.requests(), 3);

    // A model without `cache = true` says nothing of the cache.
    let other = iris.chat(KEY_A, &chat_body("other-model"), &[]).await;
    assert_eq!(cache_header(&other), None);
    let other = iris.chat(KEY_A, &chat_body("other-model"), &[]).await;
    assert_eq!(cache_header(&other), None);
    assert_eq!(upstream.requests(), 5);

    let metrics = iris.metrics().await;
    let model = "model=\"test-model\"";
    assert!(metric_sum(&metrics, "iris_cache_hits_total", &[model]) >= 2.0);
    assert!(metric_sum(&metrics, "iris_cache_misses_total", &[model]) >= 3.0);
}

#[tokio::test]
async fn a_stream_is_kept_whole_and_replayed_in_either_form() {
    let upstream = MockUpstream::start().await;
    let iris = memory_iris(&upstream).await;
    let mut streamed = stream_body("test-model");

    // Stored as a stream (with the usage chunk Iris asked for on its own).
    let (cache, status, first) = send(&iris, KEY_A, &streamed, &[]).await;
    assert_eq!((cache.as_str(), status), ("miss", 200));
    assert_eq!(streamed_text(&first), "word0 word1 word2 ");

    // Replayed as a stream, whole, ending in [DONE]; the usage chunk only
    // when asked for.
    let (cache, _, again) = send(&iris, KEY_A, &streamed, &[]).await;
    assert_eq!(cache, "hit");
    assert!(again.ends_with("data: [DONE]\n\n"), "{again}");
    assert_eq!(streamed_text(&again), "word0 word1 word2 ");
    assert!(
        events(&again).iter().all(|e| e.get("usage").is_none()),
        "{again}"
    );
    assert!(
        events(&again)
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "stop")
    );
    streamed["stream_options"] = json!({"include_usage": true});
    let (cache, _, with_usage) = send(&iris, KEY_A, &streamed, &[]).await;
    assert_eq!(cache, "hit");
    let usage = events(&with_usage)
        .into_iter()
        .find_map(|e| e.get("usage").cloned())
        .unwrap_or_else(|| panic!("no usage chunk in {with_usage}"));
    assert_eq!(usage["completion_tokens"], 3);

    // Asked for plain: the stream assembled into one completion.
    let (cache, _, plain) = send(&iris, KEY_A, &chat_body("test-model"), &[]).await;
    assert_eq!(cache, "hit");
    let plain: Value = serde_json::from_str(&plain).expect("JSON");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(
        plain["choices"][0]["message"]["content"],
        "word0 word1 word2 "
    );
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    assert_eq!(upstream.requests(), 1);

    // The other way round: a plain answer split into a stream.
    let (cache, _, stored) = send(&iris, KEY_A, &ask("plain first"), &[]).await;
    assert_eq!(cache, "miss");
    let stored: Value = serde_json::from_str(&stored).expect("JSON");
    let mut as_stream = ask("plain first");
    as_stream["stream"] = json!(true);
    let (cache, _, split) = send(&iris, KEY_A, &as_stream, &[]).await;
    assert_eq!(cache, "hit");
    assert!(split.ends_with("data: [DONE]\n\n"), "{split}");
    assert_eq!(
        streamed_text(&split),
        stored["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
    );
    assert_eq!(upstream.requests(), 2);

    // Through an OpenAI-compatible reader: the chunks are chunks.
    let chunks = events(&split);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn the_same_image_by_two_urls_or_as_a_data_uri_is_the_same_request() {
    use base64::Engine as _;
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start("127.0.0.2").await;
    let mirror = ImageServer::start("127.0.0.3").await;
    let cat = png(90);
    host.add("cat.png", "image/png", cat.clone());
    host.add("same-cat.png", "image/png", cat.clone());
    mirror.add("cat-copy.png", "image/png", cat.clone());
    host.add("other.png", "image/png", png(91));
    let iris = Iris::start(&image_config(&upstream.base_url(), "")).await;

    let (cache, status, _) =
        send(&iris, KEY_A, &with_image(&host.url("/files/cat.png")), &[]).await;
    assert_eq!((cache.as_str(), status), ("miss", 200));
    assert_eq!(
        host.hits("/files/cat.png"),
        1,
        "fetched once: the key and the attempt share it"
    );
    for url in [
        host.url("/files/same-cat.png"),
        mirror.url("/files/cat-copy.png"),
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&cat)
        ),
    ] {
        let (cache, status, _) = send(&iris, KEY_A, &with_image(&url), &[]).await;
        assert_eq!((cache.as_str(), status), ("hit", 200), "{}", &url[..40]);
    }
    assert_eq!(upstream.requests(), 1);
    let (cache, status, _) = send(
        &iris,
        KEY_A,
        &with_image(&host.url("/files/other.png")),
        &[],
    )
    .await;
    assert_eq!(
        (cache.as_str(), status),
        ("miss", 200),
        "other bytes, another request"
    );
    assert_eq!(upstream.requests(), 2);

    // An image refused keeps its error, with its param.
    let response = iris
        .chat(KEY_A, &with_image(&host.url("/status/404")), &[])
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(error["error"]["code"], "image_fetch_failed");
    assert_eq!(
        error["error"]["param"],
        "messages[0].content[1].image_url.url"
    );
}

/// An 8x8 PNG, its blue channel `blue`: another value, another picture.
fn png(blue: u8) -> Vec<u8> {
    let image =
        image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, blue]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// A chat body for `test-model` with one image at `url`.
fn with_image(url: &str) -> Value {
    json!({"model": "test-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]})
}

/// `config` with images inlined by the mock's upstream, fetched from
/// 127.0.0.2 and 127.0.0.3.
fn image_config(upstream: &str, extra: &str) -> String {
    let images = "[images]\nallowed_networks = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n";
    config(upstream, MEMORY, &format!("{extra}\n{images}")).replacen(
        "timeout_ms = 2000\n",
        "timeout_ms = 2000\ninline_images = true\n",
        1,
    )
}

#[tokio::test]
async fn a_lookup_over_the_request_limit_is_refused_before_any_fetch() {
    let upstream = MockUpstream::start().await;
    let host = ImageServer::start("127.0.0.2").await;
    host.add("first.png", "image/png", png(1));
    host.add("second.png", "image/png", png(2));
    let text = image_config(
        &upstream.base_url(),
        "[clients.budget]\nrequests_per_minute = 1\n",
    )
    .replace("models = [\"other-model\"]", "models = [\"test-model\"]");
    let iris = Iris::start(&text).await;
    let (cache, status, _) = send(
        &iris,
        KEY_B,
        &with_image(&host.url("/files/first.png")),
        &[],
    )
    .await;
    assert_eq!((cache.as_str(), status), ("miss", 200));
    let (cache, status, _) = send(
        &iris,
        KEY_B,
        &with_image(&host.url("/files/second.png")),
        &[],
    )
    .await;
    assert_eq!((cache.as_str(), status), ("miss", 429));
    assert_eq!(
        host.hits("/files/second.png"),
        0,
        "nothing fetched for a refused request"
    );
    assert_eq!(upstream.requests(), 1);
}

const KEY_C: &str = "test-key-c";
const KEY_D: &str = "test-key-d";
const KEY_E: &str = "test-key-e";

/// Clients c and d in team `research`, e in team `ops`; a has no team.
fn teams() -> String {
    let client = |name: &str, key: &str, team: &str| {
        format!(
            "\n[[clients]]\nname = \"{name}\"\nkey = \"{}\"\nteam = \"{team}\"\n",
            KeyHash::of(key)
        )
    };
    format!(
        "{}{}{}\n[[teams]]\nname = \"research\"\n\n[[teams]]\nname = \"ops\"\n",
        client("c", KEY_C, "research"),
        client("d", KEY_D, "research"),
        client("e", KEY_E, "ops"),
    )
}

#[tokio::test]
async fn a_team_shares_its_entries_and_nothing_crosses_tenants() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(&upstream.base_url(), MEMORY, &teams())).await;
    let question = ask("shared?");
    assert_eq!(send(&iris, KEY_C, &question, &[]).await.0, "miss");
    assert_eq!(
        send(&iris, KEY_D, &question, &[]).await.0,
        "hit",
        "same team"
    );
    assert_eq!(upstream.requests(), 1);
    assert_eq!(
        send(&iris, KEY_E, &question, &[]).await.0,
        "miss",
        "another team"
    );
    assert_eq!(
        send(&iris, KEY_A, &question, &[]).await.0,
        "miss",
        "no team"
    );
    assert_eq!(upstream.requests(), 3);
    // And each of those is its own tenant's now.
    assert_eq!(send(&iris, KEY_E, &question, &[]).await.0, "hit");
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "hit");
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn no_store_neither_looks_up_nor_stores_and_no_cache_only_stores() {
    let upstream = MockUpstream::start().await;
    let iris = memory_iris(&upstream).await;
    let question = ask("fresh?");
    let no_store = [("cache-control", "no-store")];
    assert_eq!(send(&iris, KEY_A, &question, &no_store).await.0, "miss");
    assert_eq!(send(&iris, KEY_A, &question, &no_store).await.0, "miss");
    assert_eq!(upstream.requests(), 2, "not stored, not looked up");
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "miss");
    assert_eq!(send(&iris, KEY_A, &question, &no_store).await.0, "miss");
    assert_eq!(upstream.requests(), 4, "stored, but not looked up");

    // no-cache: past the stored answer to the upstream, whose fresh answer
    // is stored.
    let other = ask("changing?");
    let no_cache = [("cache-control", "no-cache")];
    assert_eq!(send(&iris, KEY_A, &other, &[]).await.0, "miss");
    assert_eq!(send(&iris, KEY_A, &other, &no_cache).await.0, "miss");
    assert_eq!(upstream.requests(), 6);
    assert_eq!(send(&iris, KEY_A, &other, &[]).await.0, "hit");
    let mixed = [("cache-control", "max-age=0, NO-CACHE")];
    assert_eq!(send(&iris, KEY_A, &other, &mixed).await.0, "miss");
    assert_eq!(upstream.requests(), 7);
}

#[tokio::test]
async fn errors_cut_streams_and_answers_cut_by_length_are_never_kept() {
    let upstream = MockUpstream::start().await;
    let iris = memory_iris(&upstream).await;

    // An upstream 500 (every attempt), passed through.
    let question = ask("fail?");
    let (cache, status, _) = send(&iris, KEY_A, &question, &[("x-mock-status", "500")]).await;
    assert_eq!((cache.as_str(), status), ("miss", 500));
    let before = upstream.requests();
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "miss");
    assert_eq!(upstream.requests(), before + 1, "the error was not kept");

    // A stream the upstream cut.
    let streamed = stream_body("test-model");
    let (cache, _, cut) = send(&iris, KEY_A, &streamed, &[("x-mock-die-after", "2")]).await;
    assert_eq!(cache, "miss");
    assert!(cut.contains("upstream_stream_interrupted"), "{cut}");
    let (cache, _, whole) = send(&iris, KEY_A, &streamed, &[]).await;
    assert_eq!(cache, "miss", "the cut stream was not kept");
    assert_eq!(streamed_text(&whole), "word0 word1 word2 ");
    assert_eq!(send(&iris, KEY_A, &streamed, &[]).await.0, "hit");

    // A stream the client left half-way.
    let slow = ask("slowly?");
    let mut slow_stream = slow.clone();
    slow_stream["stream"] = json!(true);
    let mut response = iris
        .chat(
            KEY_A,
            &slow_stream,
            &[("x-mock-chunk-delay-ms", "200"), ("x-mock-chunks", "20")],
        )
        .await;
    let _ = response.chunk().await;
    drop(response);
    assert_eq!(
        send(&iris, KEY_A, &slow, &[]).await.0,
        "miss",
        "a stream left was not kept"
    );

    // An answer that stopped at its length.
    upstream.fail_next(1, Fault::Huge(1000));
    let long = ask("at length?");
    let (cache, status, cut_short) = send(&iris, KEY_A, &long, &[]).await;
    assert_eq!((cache.as_str(), status), ("miss", 200));
    assert!(cut_short.contains("\"finish_reason\":\"length\""));
    assert_eq!(send(&iris, KEY_A, &long, &[]).await.0, "miss");
}

#[tokio::test]
async fn a_hit_costs_no_tokens_but_counts_as_a_request() {
    let upstream = MockUpstream::start().await;
    // Client b, on a budget, may use test-model here.
    let budget = "[clients.budget]\nrequests_per_minute = 3\ntokens_per_day = 100000\n";
    let text = config(&upstream.base_url(), MEMORY, budget)
        .replace("models = [\"other-model\"]", "models = [\"test-model\"]");
    let iris = Iris::start(&text).await;
    let question = ask("how much?");
    assert_eq!(send(&iris, KEY_B, &question, &[]).await.0, "miss");
    iris.settled(KEY_B).await;
    let charged = iris.used(KEY_B, "tokens_per_day").await;
    assert!(charged > 0);

    let hit = iris.chat(KEY_B, &question, &[]).await;
    assert_eq!(cache_header(&hit).as_deref(), Some("hit"));
    assert_eq!(
        hit.headers()["x-ratelimit-limit-requests"],
        "3",
        "the client's headers"
    );
    assert_eq!(hit.headers()["x-ratelimit-remaining-requests"], "1");
    let _ = hit.bytes().await;
    iris.settled(KEY_B).await;
    assert_eq!(
        iris.used(KEY_B, "tokens_per_day").await,
        charged,
        "no tokens"
    );
    assert_eq!(
        iris.used(KEY_B, "requests_per_minute").await,
        2,
        "one request each"
    );

    assert_eq!(send(&iris, KEY_B, &question, &[]).await.0, "hit");
    let (_, status, refused) = send(&iris, KEY_B, &question, &[]).await;
    assert_eq!(status, 429, "a fourth request in the minute: {refused}");
    assert!(refused.contains("rate_limit_exceeded"), "{refused}");
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn a_hit_is_logged_with_cache_hit_and_no_tokens() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("iris.db");
    let text = config(&upstream.base_url(), MEMORY, "").replace(
        "[store]\nkind = \"memory\"",
        &format!(
            "[store]\nkind = \"sqlite\"\npath = {:?}",
            db.display().to_string()
        ),
    );
    let iris = Iris::start(&text).await;
    let question = ask("logged?");
    let miss = iris.chat(KEY_A, &question, &[]).await;
    let miss_id = miss.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let _ = miss.bytes().await;
    let hit = iris.chat(KEY_A, &question, &[]).await;
    assert_eq!(cache_header(&hit).as_deref(), Some("hit"));
    let hit_id = hit.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let _ = hit.bytes().await;
    iris.stop().await.expect("stop");

    let db = rusqlite::Connection::open(&db).expect("open");
    let row = |id: &str| -> (i64, i64, i64, i64, i64, i64, Option<String>, i64) {
        db.query_row(
            "SELECT cache_hit, status, prompt_tokens, completion_tokens, total_tokens, \
             cost_micros, upstream, attempts FROM spend_log WHERE request_id = ?1",
            [id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .expect("a record")
    };
    let (cache_hit, status, prompt, ..) = row(&miss_id);
    assert_eq!((cache_hit, status), (0, 200));
    assert!(prompt > 0);
    assert_eq!(row(&hit_id), (1, 200, 0, 0, 0, 0, None, 0));
}

#[tokio::test]
async fn two_instances_on_one_redis_share_a_hit() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let text = with_store(
        &config(&upstream.base_url(), "kind = \"redis\"\nttl_s = 60", ""),
        &redis.store_toml("timeout_ms = 2000"),
    );
    let one = Iris::start(&text).await;
    let two = Iris::start(&text).await;
    let streamed = stream_body("test-model");
    assert_eq!(send(&one, KEY_A, &streamed, &[]).await.0, "miss");
    let (cache, _, replayed) = send(&two, KEY_A, &streamed, &[]).await;
    assert_eq!(cache, "hit", "stored by the other instance");
    assert!(replayed.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        send(&two, KEY_A, &chat_body("test-model"), &[]).await.0,
        "hit"
    );
    assert_eq!(upstream.requests(), 1);

    // One key per entry under the store's prefix, with its TTL.
    let client = redis::Client::open(redis.url.as_str()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:cache:*", redis.prefix))
        .query_async(&mut connection)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut connection)
        .await
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}

#[tokio::test]
async fn a_reload_that_changes_the_models_upstream_or_price_misses_at_once() {
    let first = MockUpstream::start().await;
    let second = MockUpstream::start().await;
    let before = config(&first.base_url(), MEMORY, &admin_toml());
    let file = write_config(&before);
    let iris = Iris::start_from_file(file.path()).await;
    let question = ask("which upstream?");
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "miss");
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "hit");

    let reload = async |text: &str| {
        std::fs::write(file.path(), text).expect("write");
        let (status, answer) = iris
            .admin(reqwest::Method::POST, "/admin/reload", None)
            .await;
        assert_eq!(status, 200, "{answer}");
    };
    // A reload that leaves the model alone keeps its entries.
    reload(
        &(before.clone()
            + "\n[[clients]]\nname = \"z\"\nkey = \""
            + &KeyHash::of("z").to_string()
            + "\"\n"),
    )
    .await;
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "hit");
    // Another base URL: the old answer is not served.
    let moved = before.replace(&first.base_url(), &second.base_url());
    reload(&moved).await;
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "miss");
    assert_eq!((first.requests(), second.requests()), (1, 1));
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "hit");
    // Another price: neither.
    let priced = moved.replacen(
        "cache = true\n",
        "cache = true\nprice = { input = 1.0, output = 2.0 }\n",
        1,
    );
    reload(&priced).await;
    assert_eq!(send(&iris, KEY_A, &question, &[]).await.0, "miss");
    assert_eq!(second.requests(), 2);
}

#[tokio::test]
async fn the_memory_cache_evicts_the_least_recently_used_within_max_bytes() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&config(
        &upstream.base_url(),
        "kind = \"memory\"\nmax_bytes = 3000",
        "",
    ))
    .await;
    let evicted_before = metric_sum(&iris.metrics().await, "iris_cache_evictions_total", &[]);
    for i in 0..10 {
        assert_eq!(
            send(&iris, KEY_A, &ask(&format!("question {i}")), &[])
                .await
                .0,
            "miss"
        );
    }
    // The latest is there; the first was evicted to make room.
    assert_eq!(send(&iris, KEY_A, &ask("question 9"), &[]).await.0, "hit");
    assert_eq!(send(&iris, KEY_A, &ask("question 0"), &[]).await.0, "miss");
    assert_eq!(upstream.requests(), 11);
    let evicted = metric_sum(&iris.metrics().await, "iris_cache_evictions_total", &[]);
    assert!(
        evicted >= evicted_before + 5.0,
        "{evicted_before} -> {evicted}"
    );
}

/// `POST /v1/embeddings` as `key`: `x-iris-cache`, status and body text.
async fn embed(iris: &Iris, key: &str, body: &Value) -> (String, u16, String) {
    let response = iris.embed(key, body, &[]).await;
    let cache = cache_header(&response).unwrap_or_else(|| "none".into());
    let status = response.status().as_u16();
    (cache, status, response.text().await.expect("body"))
}

#[tokio::test]
async fn embeddings_are_cached_on_the_same_terms_and_never_cross_endpoints() {
    let upstream = MockUpstream::start().await;
    let extra = "\n[[models]]\nname = \"embed\"\nendpoint = \"embeddings\"\nupstream = \"mock\"\ncache = true\n";
    let iris = Iris::start(&config(&upstream.base_url(), MEMORY, extra)).await;
    let body = |user: &str, dimensions: u64| {
        json!({"model": "embed", "input": ["a", "b"], "dimensions": dimensions,
               "encoding_format": "base64", "user": user})
    };

    let (cache, status, first) = embed(&iris, KEY_A, &body("u1", 4)).await;
    assert_eq!((cache.as_str(), status), ("miss", 200), "{first}");
    // Another `user`: the same vectors, from Iris.
    let (cache, status, again) = embed(&iris, KEY_A, &body("u2", 4)).await;
    assert_eq!((cache.as_str(), status), ("hit", 200));
    assert_eq!(again, first, "replayed byte for byte");
    assert_eq!(upstream.requests(), 1);
    // Another field that changes the answer: another entry.
    let (cache, _, _) = embed(&iris, KEY_A, &body("u1", 8)).await;
    assert_eq!(cache, "miss");
    assert_eq!(upstream.requests(), 2);
    // A chat request never reads an embeddings entry: each model serves one
    // API, and the key names the endpoint.
    let (cache, status, _) = send(&iris, KEY_A, &ask("a"), &[]).await;
    assert_eq!((cache.as_str(), status), ("miss", 200));
}
