//! Which deployment a request goes to: by weight within the lowest usable
//! priority; a deployment cools down after `allowed_fails` failures and comes
//! back after `cooldown_ms`; a model whose every deployment is cooling is
//! still served.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use super::{Config, assert_answered, chat, farm, metric};
use crate::support::mock_upstream::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_share_the_load_within_tolerance() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("selw-a", &a.base_url(), "")
        .upstream("selw-b", &b.base_url(), "")
        .model(
            "selw",
            &[("selw-a", "weight = 2"), ("selw-b", "weight = 1")],
        )
        .start()
        .await;
    const N: usize = 300;
    let replies: Vec<_> = futures_util::stream::iter(0..N)
        .map(|_| chat(&iris, "selw"))
        .buffer_unordered(8)
        .collect()
        .await;
    let mut to_a = 0;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.attempts(), 1);
        match reply.upstream() {
            "selw-a" => to_a += 1,
            "selw-b" => {}
            other => panic!("answered by {other}"),
        }
    }
    assert_eq!((a.requests(), b.requests()), (to_a, N as u64 - to_a));
    // 2:1 is a share of 2/3 for a; ±0.10 is over 3.5 standard deviations
    // of 300 draws, while equal shares (0.5) or ignoring b (1.0) fall out.
    let share = to_a as f64 / N as f64;
    assert!(
        (share - 2.0 / 3.0).abs() <= 0.10,
        "a answered {to_a} of {N} ({share:.3}), expected about 2/3"
    );
}

#[tokio::test]
async fn the_next_priority_serves_only_while_the_first_is_down() {
    let [a, b, c] = farm().await;
    let iris = Config::new()
        .upstream("selp-a", &a.base_url(), "")
        .upstream("selp-b", &b.base_url(), "")
        .upstream("selp-c", &c.base_url(), "")
        .model(
            "selp",
            &[
                ("selp-a", ""),
                ("selp-b", "priority = 0, weight = 1"),
                ("selp-c", "priority = 1, weight = 100"),
            ],
        )
        .routing("backoff_ms = 1\nallowed_fails = 1\ncooldown_ms = 1000")
        .start()
        .await;
    for _ in 0..20 {
        let reply = chat(&iris, "selp").await;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.upstream(), "selp-c", "priority 0 is up");
    }
    assert_eq!(c.requests(), 0);
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "both of priority 0 used"
    );

    // Priority 0 down: a refuses connections, b answers 503.
    a.stop().await;
    b.fail_always(Fault::status(503));
    for _ in 0..10 {
        let reply = chat(&iris, "selp").await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.upstream(), "selp-c");
    }
    let c_while_down = c.requests();
    assert_eq!(c_while_down, 10);

    // Priority 0 back: once its cooldown is over, c is left alone again.
    a.restart().await;
    b.heal();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = chat(&iris, "selp").await;
        assert_eq!(reply.status, 200);
        if reply.upstream() != "selp-c" {
            break;
        }
        assert!(Instant::now() < deadline, "priority 0 never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c_before = c.requests();
    for _ in 0..10 {
        let reply = chat(&iris, "selp").await;
        assert_ne!(reply.upstream(), "selp-c");
    }
    assert_eq!(c.requests(), c_before);
}

#[tokio::test]
async fn a_deployment_cools_down_after_allowed_fails_and_comes_back_after_cooldown_ms() {
    let [a, b] = farm().await;
    let iris = Config::new()
        .upstream("selcd-a", &a.base_url(), "")
        .upstream("selcd-b", &b.base_url(), "")
        .model("selcd", &[("selcd-a", ""), ("selcd-b", "")])
        .routing("backoff_ms = 1\nretries = 1\nallowed_fails = 2\ncooldown_ms = 3000")
        .start()
        .await;
    let cooling = || metric(&iris, "iris_upstream_cooling", &["upstream=\"selcd-a\""]);
    let cooldowns = || {
        metric(
            &iris,
            "iris_upstream_cooldowns_total",
            &["upstream=\"selcd-a\"", "reason=\"failures\""],
        )
    };
    a.fail_always(Fault::status(503));

    // Equal weights: a is chosen first about every other request, fails,
    // and b answers; until a has failed twice.
    let mut sent = 0;
    while a.requests() < 2 {
        let reply = chat(&iris, "selcd").await;
        assert_eq!((reply.status, reply.upstream()), (200, "selcd-b"));
        sent += 1;
        assert!(sent < 60, "a never chosen in {sent} requests");
    }
    let cooled_at = Instant::now();
    assert_eq!(cooldowns().await, 1.0);
    assert_eq!(cooling().await, 1.0);

    // Cooling: a is skipped (only requests sent well within cooldown_ms
    // count, however slow this machine is).
    let mut while_cooling = 0;
    while cooled_at.elapsed() < Duration::from_millis(2000) && while_cooling < 20 {
        assert_answered(&chat(&iris, "selcd").await, "selcd-b", 1);
        while_cooling += 1;
    }
    assert!(while_cooling > 0);
    assert_eq!(
        a.requests(),
        2,
        "allowed_fails = 2: cooling after the second"
    );

    // After cooldown_ms, a is chosen again.
    a.heal();
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(cooled_at.elapsed())).await;
    let mut back = false;
    for _ in 0..40 {
        let reply = chat(&iris, "selcd").await;
        assert_eq!(reply.status, 200);
        if reply.upstream() == "selcd-a" {
            back = true;
            break;
        }
    }
    assert!(back, "a never chosen again after its cooldown");
    assert_eq!(cooling().await, 0.0, "the gauge follows");
    assert_eq!(cooldowns().await, 1.0);
}

#[tokio::test]
async fn a_model_whose_every_deployment_is_cooling_is_still_served() {
    let [a] = farm().await;
    let iris = Config::new()
        .upstream("selpanic-a", &a.base_url(), "")
        .single("selpanic", "selpanic-a")
        .routing("retries = 0\nallowed_fails = 1\ncooldown_ms = 60000")
        .start()
        .await;
    a.fail_next(1, Fault::status(503));
    let reply = chat(&iris, "selpanic").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        metric(&iris, "iris_upstream_cooling", &["upstream=\"selpanic-a\""]).await,
        1.0
    );
    // Cooling for a minute, but the only one: tried anyway.
    assert_answered(&chat(&iris, "selpanic").await, "selpanic-a", 1);
    assert_eq!(a.requests(), 2);
}

/// `GET /admin/upstreams` and `iris upstreams` show the same cooldown, in
/// Unix seconds on the API and as a UTC time in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_and_iris_upstreams_show_a_cooldown_alike() {
    let [a, b] = farm().await;
    let config = Config::new()
        .upstream("selview-a", &a.base_url(), "")
        .upstream("selview-b", &b.base_url(), "")
        .single("selview", "selview-a")
        .single("selview-ok", "selview-b")
        .routing("retries = 0\nallowed_fails = 1\ncooldown_ms = 600000")
        .extra(&crate::support::admin_toml());
    let iris = config.start().await;
    a.fail_next(1, Fault::status(503));
    let before = unix_seconds();
    assert_eq!(chat(&iris, "selview").await.status, 503);
    let after = unix_seconds();

    let (status, list) = iris
        .admin(reqwest::Method::GET, "/admin/upstreams", None)
        .await;
    assert_eq!(status, 200, "{list}");
    let rows = list["data"].as_array().expect("a list");
    let row = |deployment: &str| {
        rows.iter()
            .find(|r| r["deployment"] == deployment)
            .unwrap_or_else(|| panic!("no {deployment} in {list}"))
            .clone()
    };
    let cooling = row("selview-a/selview");
    assert_eq!(cooling["state"], "cooling_down");
    assert_eq!(cooling["upstream"], "selview-a");
    assert_eq!(cooling["models"], serde_json::json!(["selview"]));
    assert_eq!(
        (
            cooling["attempts_5m"].as_u64(),
            cooling["failures_5m"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let until = cooling["cooling_until"].as_u64().expect("Unix seconds");
    assert!(
        (before + 599..=after + 600).contains(&until),
        "cooling_until {until}: ten minutes after {before}..{after}"
    );
    let healthy = row("selview-b/selview-ok");
    assert_eq!(healthy["state"], "healthy");
    assert!(healthy["cooling_until"].is_null(), "{healthy}");
    assert!(healthy["pacing"].is_null(), "{healthy}");

    let file = crate::support::write_config(&config.text());
    let base = iris.url("");
    let output = tokio::task::spawn_blocking(move || {
        crate::support::iris_command()
            .args(["upstreams", "--url", &base, "--config"])
            .arg(file.path())
            .env("IRIS_ADMIN_KEY", crate::support::ADMIN_KEY)
            .output()
            .expect("run iris upstreams")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "DEPLOYMENT\tSTATE\tATTEMPTS_5M\tFAILURES_5M");
    let time_of_day = format!(
        "T{:02}:{:02}:{:02}Z",
        until % 86_400 / 3600,
        until % 3600 / 60,
        until % 60
    );
    let cooling_line = lines
        .iter()
        .find(|l| l.starts_with("selview-a/selview\t"))
        .unwrap_or_else(|| panic!("no selview-a in {text}"));
    let cells: Vec<&str> = cooling_line.split('\t').collect();
    assert_eq!(cells.len(), 4, "{cooling_line}");
    let shown = cells[1].strip_prefix("cooling until ").expect(cooling_line);
    assert!(
        shown.len() == 20 && shown.ends_with(&time_of_day),
        "{shown} is not the UTC time of {until} ({time_of_day})"
    );
    assert_eq!(&cells[2..], ["1", "1"]);
    assert!(
        lines.contains(&"selview-b/selview-ok\thealthy\t0\t0"),
        "{text}"
    );
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}
