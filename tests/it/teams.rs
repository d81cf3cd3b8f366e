//! Teams as entities (issue 20, item 3 without the budget arithmetic):
//! `[[teams]]` and `clients[].team` checked by `iris check`; managed teams
//! over `/admin/teams` and `iris teams`, with their 409s and their bad input
//! refused by name, nothing written; managed clients joining and leaving a
//! team; a change seen by another process on the same SQLite file and by
//! another instance on the same Redis within 2 s; reloads that would break
//! a team refused; the one team lookup (`AppState::team`) and the team
//! name on an authenticated client.

use std::path::Path;
use std::time::Duration;

use iris::keys::KeyHash;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::redis::{SharedRedis, with_store};
use crate::support::{
    Iris, MockUpstream, admin_toml, base_config, eventually, iris_cli, iris_command, ok, stderr,
    stdout, write_config,
};

const WITHIN: Duration = Duration::from_secs(2);

const KEY_C: &str = "test-key-c";

/// The base config with a config team `research` (a daily limit) and a
/// third client `c` in it.
fn teams_config(upstream: &str) -> String {
    base_config(
        upstream,
        &format!(
            "{}\n[[clients]]\nname = \"c\"\nkey = \"{}\"\nteam = \"research\"\n\
             [[teams]]\nname = \"research\"\n[teams.budget]\ntokens_per_day = 900000\n",
            admin_toml(),
            KeyHash::of(KEY_C)
        ),
    )
}

fn sqlite(config: &str, db: &Path) -> String {
    with_store(
        config,
        &format!("[store]\nkind = \"sqlite\"\npath = \"{}\"\n", db.display()),
    )
}

/// `GET /admin/teams`'s entry for `name`, if listed.
async fn team(iris: &Iris, name: &str) -> Option<Value> {
    let (status, list) = iris.admin(Method::GET, "/admin/teams", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
}

/// Every team listed, without its usage (whose countdowns move).
async fn teams_without_usage(iris: &Iris) -> Vec<Value> {
    let (status, list) = iris.admin(Method::GET, "/admin/teams", None).await;
    assert_eq!(status, 200, "{list}");
    let mut data = list["data"].as_array().expect("a list").clone();
    for team in &mut data {
        team.as_object_mut().expect("an object").remove("usage");
    }
    data
}

async fn team_names(iris: &Iris) -> Vec<String> {
    let (status, list) = iris.admin(Method::GET, "/admin/teams", None).await;
    assert_eq!(status, 200, "{list}");
    list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["name"].as_str().expect("a name").to_owned())
        .collect()
}

fn assert_error(status: u16, answer: &Value, expected: (u16, &str, Option<&str>), what: &str) {
    assert_eq!(status, expected.0, "{what}: {answer}");
    assert_eq!(answer["error"]["code"], expected.1, "{what}: {answer}");
    match expected.2 {
        Some(param) => assert_eq!(answer["error"]["param"], param, "{what}: {answer}"),
        None => assert!(answer["error"]["param"].is_null(), "{what}: {answer}"),
    }
}

// ------------------------------------------------------------------ config

#[test]
fn iris_check_refuses_each_team_problem_by_key_path() {
    let config = write_config(&format!(
        "{}\n[[clients]]\nname = \"c\"\nkey = \"{}\"\nteam = \"ghost\"\n\
         [[teams]]\nname = \"blue\"\n\
         [[teams]]\nname = \"blue\"\n\
         [[teams]]\nname = \"\"\n\
         [[teams]]\nname = \"re\\u0007d\"\n\
         [[teams]]\nname = \"green\"\n[teams.budget]\ntokens_per_day = 0\ncolour = 1\n",
        base_config("http://127.0.0.1:9/v1", ""),
        KeyHash::of(KEY_C)
    ));
    let output = iris_command()
        .args(["check", "--config"])
        .arg(config.path())
        .output()
        .expect("run iris check");
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    for expected in [
        "teams[1].name: duplicate team \"blue\"",
        "teams[2].name: required",
        "teams[3].name: must not contain control characters",
        "teams[4].budget.tokens_per_day: must be above 0 (leave it out for no limit)",
        "teams[4].budget.colour: unknown key",
        "clients[2].team: no team named \"ghost\"",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected:?} in:\n{text}"
        );
    }

    let good = write_config(&teams_config("http://127.0.0.1:9/v1"));
    let output = iris_command()
        .args(["check", "--config"])
        .arg(good.path())
        .output()
        .expect("run iris check");
    assert!(output.status.success(), "{}", stdout(&output));
}

// --------------------------------------------------------------- admin API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_are_listed_created_changed_and_deleted_with_their_members() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&teams_config(&upstream.base_url())).await;

    let research = team(&iris, "research").await.expect("the config team");
    assert_eq!(research["source"], "config");
    assert_eq!(research["members"], json!(["c"]));
    assert_eq!(research["budget"]["tokens_per_day"], 900000);
    assert_eq!(research["usage"]["tokens_per_day"]["limit"], 900000);
    assert_eq!(research["usage"]["tokens_per_day"]["used"], 0);

    let (status, created) = iris
        .admin(
            Method::POST,
            "/admin/teams",
            Some(r#"{"name": "blue", "budget": {"tokens_per_day": 5000, "max_concurrent": 4}}"#),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let blue = &created["team"];
    assert_eq!(blue["name"], "blue");
    assert_eq!(blue["source"], "managed");
    assert_eq!(blue["members"], json!([]));
    assert_eq!(blue["budget"]["tokens_per_day"], 5000);
    assert_eq!(blue["budget"]["max_concurrent"], 4);
    assert_eq!(team_names(&iris).await, ["research", "blue"]);
    let listed = team(&iris, "blue").await.expect("listed");
    assert_eq!(listed["usage"]["max_concurrent"]["limit"], 4);

    // A config team's name, a taken name: 409 naming `name`.
    for body in [r#"{"name": "research"}"#, r#"{"name": "blue"}"#] {
        let (status, answer) = iris.admin(Method::POST, "/admin/teams", Some(body)).await;
        assert_error(status, &answer, (409, "team_exists", Some("name")), body);
    }
    // A config team is read-only.
    let (status, answer) = iris
        .admin(
            Method::PATCH,
            "/admin/teams/research",
            Some(r#"{"budget": {"tokens_per_day": 1}}"#),
        )
        .await;
    assert_error(
        status,
        &answer,
        (409, "team_managed_by_config", None),
        "PATCH",
    );
    let (status, answer) = iris
        .admin(Method::DELETE, "/admin/teams/research", None)
        .await;
    assert_error(
        status,
        &answer,
        (409, "team_managed_by_config", None),
        "DELETE",
    );
    for method in [Method::PATCH, Method::DELETE] {
        let (status, answer) = iris
            .admin(method.clone(), "/admin/teams/nobody", Some("{}"))
            .await;
        assert_error(
            status,
            &answer,
            (404, "team_not_found", None),
            method.as_str(),
        );
    }

    let (status, changed) = iris
        .admin(
            Method::PATCH,
            "/admin/teams/blue",
            Some(r#"{"budget": {"tokens_per_day": 7000, "max_concurrent": null}}"#),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["team"]["budget"]["tokens_per_day"], 7000);
    assert!(changed["team"]["budget"]["max_concurrent"].is_null());

    // Managed clients join a team, config or managed; an unknown team is
    // refused by name, nothing written.
    let _ = iris
        .create_client(r#"{"name": "nb", "team": "blue"}"#)
        .await;
    let _ = iris
        .create_client(r#"{"name": "nb-r", "team": "research"}"#)
        .await;
    let (status, answer) = iris
        .admin(
            Method::POST,
            "/admin/clients",
            Some(r#"{"name": "lost", "team": "ghost"}"#),
        )
        .await;
    assert_error(
        status,
        &answer,
        (400, "invalid_request", Some("team")),
        "ghost",
    );
    assert!(iris.listed("lost").await.is_none());
    assert_eq!(iris.listed("nb").await.expect("nb")["team"], "blue");
    assert_eq!(iris.listed("c").await.expect("c")["team"], "research");
    assert!(iris.listed("a").await.expect("a").get("team").is_none());
    assert_eq!(
        team(&iris, "research").await.expect("research")["members"],
        json!(["c", "nb-r"])
    );
    assert_eq!(
        team(&iris, "blue").await.expect("blue")["members"],
        json!(["nb"])
    );
    let (status, answer) = iris
        .admin(
            Method::PATCH,
            "/admin/clients/nb",
            Some(r#"{"team": "ghost"}"#),
        )
        .await;
    assert_error(
        status,
        &answer,
        (400, "invalid_request", Some("team")),
        "PATCH ghost",
    );
    assert_eq!(iris.listed("nb").await.expect("nb")["team"], "blue");

    // A team with clients stays; out of it, it goes.
    let (status, answer) = iris.admin(Method::DELETE, "/admin/teams/blue", None).await;
    assert_error(status, &answer, (409, "team_not_empty", None), "not empty");
    assert!(answer["error"]["message"].as_str().unwrap().contains("nb"));
    let (status, answer) = iris
        .admin(
            Method::PATCH,
            "/admin/clients/nb",
            Some(r#"{"team": null}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["client"].get("team").is_none(), "{answer}");
    let (status, answer) = iris.admin(Method::DELETE, "/admin/teams/blue", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"name": "blue", "deleted": true}));
    assert_eq!(team_names(&iris).await, ["research"]);
    iris.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_team_input_is_refused_by_name_and_writes_nothing() {
    let upstream = MockUpstream::start().await;
    let iris = Iris::start(&teams_config(&upstream.base_url())).await;
    let before = teams_without_usage(&iris).await;
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            json!({"name": "x", "colour": "blue"}).to_string(),
            Some("colour"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_day": -5}}).to_string(),
            Some("budget.tokens_per_day"),
        ),
        (
            json!({"name": "x", "budget": {"max_concurrent": 0}}).to_string(),
            Some("budget.max_concurrent"),
        ),
        (
            json!({"name": "x", "budget": {"tokens_per_month": "lots"}}).to_string(),
            Some("budget.tokens_per_month"),
        ),
        (
            json!({"name": "x", "budget": {"tokenz": 5}}).to_string(),
            Some("budget.tokenz"),
        ),
        (
            json!({"name": "x", "budget": 5}).to_string(),
            Some("budget"),
        ),
        (json!({"name": 42}).to_string(), Some("name")),
        (json!({"name": "re\u{7}d"}).to_string(), Some("name")),
        (json!({"name": "x\n"}).to_string(), Some("name")),
        (json!({"name": ""}).to_string(), Some("name")),
        (json!({"name": "a/b"}).to_string(), Some("name")),
        (json!({"name": ".."}).to_string(), Some("name")),
        (json!({"budget": {}}).to_string(), Some("name")),
        ("not json".to_owned(), None),
        ("[\"x\"]".to_owned(), None),
    ];
    for (body, param) in &cases {
        let (status, answer) = iris.admin(Method::POST, "/admin/teams", Some(body)).await;
        assert_error(status, &answer, (400, "invalid_request", *param), body);
        assert_eq!(
            teams_without_usage(&iris).await,
            before,
            "{body} left something behind"
        );
    }
    let (status, _) = iris
        .admin(
            Method::POST,
            "/admin/teams",
            Some(r#"{"name": "blue", "budget": {"tokens_per_day": 100}}"#),
        )
        .await;
    assert_eq!(status, 201);
    for (body, param) in [
        (
            r#"{"budget": {"tokens_per_day": -1}}"#,
            Some("budget.tokens_per_day"),
        ),
        (
            r#"{"budget": {"tokens_per_day": "x"}}"#,
            Some("budget.tokens_per_day"),
        ),
        (r#"{"name": "other"}"#, Some("name")),
        (r#"{"disabled": true}"#, Some("disabled")),
    ] {
        let (status, answer) = iris
            .admin(Method::PATCH, "/admin/teams/blue", Some(body))
            .await;
        assert_error(status, &answer, (400, "invalid_request", param), body);
        let blue = team(&iris, "blue").await.expect("blue");
        assert_eq!(blue["budget"]["tokens_per_day"], 100, "{body} changed it");
    }
    iris.stop().await.unwrap();
}

// ------------------------------------------------- the lookup, in process

#[tokio::test]
async fn the_team_lookup_finds_config_and_managed_teams_and_clients_carry_theirs() {
    let upstream = MockUpstream::start().await;
    let config = teams_config(&upstream.base_url());
    let state = crate::support::state(&config).await;
    let snapshot = state.config();
    let registry = state.clients.registry().as_ref();
    let created = iris::clients::teams::create(
        registry,
        &snapshot,
        serde_json::from_value(json!({"name": "blue", "budget": {"tokens_per_day": 10}})).unwrap(),
    )
    .await
    .expect("created");
    assert_eq!(created.name, "blue");
    let (_, key) = iris::clients::ops::create(
        registry,
        &snapshot,
        serde_json::from_value(json!({"name": "nb", "team": "blue"})).unwrap(),
    )
    .await
    .expect("created");
    state.clients.refresh().await;

    let research = state.team(&snapshot, "research").expect("config team");
    assert_eq!(research.budget.tokens_per_day, Some(900000));
    let blue = state.team(&snapshot, "blue").expect("managed team");
    assert_eq!(blue.budget.tokens_per_day, Some(10));
    assert!(state.team(&snapshot, "ghost").is_none());

    let c = snapshot
        .catalog
        .authenticate(&iris::keys::KeyHash::of(KEY_C))
        .expect("c");
    assert_eq!(c.team.as_deref(), Some("research"));
    let index = state.clients.index();
    let nb = index
        .authenticate(&iris::keys::KeyHash::of(&key))
        .expect("nb");
    assert_eq!(nb.team.as_deref(), Some("blue"));
}

// --------------------------------------------- CLI, another process, SQLite

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_teams_under_a_running_server_within_two_seconds() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite(
        &teams_config(&upstream.base_url()),
        &dir.path().join("iris.db"),
    );
    let file = write_config(&config);
    let path = file.path();
    let iris = Iris::start(&config).await;

    ok(&iris_cli(path, &["teams", "add", "blue", "--tokens-per-day", "5000"]).await);
    let took = eventually(
        WITHIN,
        "the server lists a team the CLI added",
        async || team(&iris, "blue").await.is_some(),
    )
    .await;
    eprintln!("added by the CLI, listed by the server after {took:?}");
    ok(&iris_cli(path, &["clients", "add", "nb", "--team", "blue"]).await);
    ok(&iris_cli(
        path,
        &[
            "teams",
            "set",
            "blue",
            "--tokens-per-day",
            "none",
            "--max-concurrent",
            "3",
            "--cost-per-day",
            "12.5",
        ],
    )
    .await);
    eventually(
        WITHIN,
        "the server sees the member and the new limits",
        async || {
            team(&iris, "blue").await.is_some_and(|t| {
                t["members"] == json!(["nb"])
                    && t["budget"]["max_concurrent"] == 3
                    && t["budget"]["cost_per_day"] == 12.5
                    && t["budget"]["tokens_per_day"].is_null()
            })
        },
    )
    .await;
    assert_eq!(
        ok(&iris_cli(path, &["teams", "list"]).await),
        "NAME\tSOURCE\tBUDGET\tMEMBERS\n\
         research\tconfig\ttokens_per_day=900000\tc\n\
         blue\tmanaged\tcost_per_day=12.5,max_concurrent=3\tnb\n"
    );

    // Refusals: exit 1, the reason named, nothing written.
    for (args, says) in [
        (&["teams", "remove", "blue"][..], "still has clients (nb)"),
        (
            &["teams", "remove", "research"][..],
            "comes from the config file",
        ),
        (
            &["teams", "set", "research", "--tokens-per-day", "5"][..],
            "comes from the config file",
        ),
        (&["teams", "add", "research"][..], "exists already"),
        (
            &["teams", "add", "x", "--tokens-per-day", "-5"][..],
            "'budget.tokens_per_day'",
        ),
        (
            &["teams", "add", "x", "--cost-per-day", "-5"][..],
            "'budget.cost_per_day'",
        ),
        (
            &["teams", "add", "x", "--cost-per-month", "lots"][..],
            "--cost-per-month",
        ),
        (&["teams", "add", "re d"][..], "'name' must be"),
        (
            &["clients", "add", "lost", "--team", "ghost"][..],
            "no team named `ghost`",
        ),
        (
            &["clients", "set", "nb", "--team", "ghost"][..],
            "no team named `ghost`",
        ),
    ] {
        let output = iris_cli(path, args).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            stdout(&output)
        );
        assert!(
            stderr(&output).contains(says),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    assert_eq!(
        ok(&iris_cli(path, &["teams", "list"]).await)
            .lines()
            .count(),
        3,
        "a refusal wrote something"
    );
    assert!(!ok(&iris_cli(path, &["clients", "list"]).await).contains("lost"));

    ok(&iris_cli(path, &["clients", "set", "nb", "--team", ""]).await);
    ok(&iris_cli(path, &["teams", "remove", "blue"]).await);
    eventually(
        WITHIN,
        "the server drops a team the CLI removed",
        async || team(&iris, "blue").await.is_none(),
    )
    .await;
    assert!(iris.listed("nb").await.expect("nb").get("team").is_none());
    iris.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_teams_in_sqlite_survive_a_restart() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite(
        &teams_config(&upstream.base_url()),
        &dir.path().join("iris.db"),
    );
    let first = Iris::start(&config).await;
    let (status, _) = first
        .admin(
            Method::POST,
            "/admin/teams",
            Some(r#"{"name": "kept", "budget": {"tokens_per_month": 42}}"#),
        )
        .await;
    assert_eq!(status, 201);
    let _ = first
        .create_client(r#"{"name": "nb", "team": "kept"}"#)
        .await;
    first.stop().await.unwrap();

    let second = Iris::start(&config).await;
    let kept = team(&second, "kept").await.expect("still there");
    assert_eq!(kept["budget"]["tokens_per_month"], 42);
    assert_eq!(kept["members"], json!(["nb"]));
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_see_each_others_teams_within_two_seconds() {
    let Some(redis) = SharedRedis::get().await else {
        return;
    };
    let upstream = MockUpstream::start().await;
    let config = with_store(&teams_config(&upstream.base_url()), &redis.store_toml(""));
    let a = Iris::start(&config).await;
    let b = Iris::start(&config).await;

    let (status, answer) = a
        .admin(Method::POST, "/admin/teams", Some(r#"{"name": "shared"}"#))
        .await;
    assert_eq!(status, 201, "{answer}");
    let took = eventually(WITHIN, "B lists the team created on A", async || {
        team(&b, "shared").await.is_some()
    })
    .await;
    eprintln!("created on A, listed on B after {took:?}");
    // B can put a client in it (the team is in the store, not only in A).
    let _ = b
        .create_client(r#"{"name": "member", "team": "shared"}"#)
        .await;
    eventually(WITHIN, "A sees B's member", async || {
        team(&a, "shared")
            .await
            .is_some_and(|t| t["members"] == json!(["member"]))
    })
    .await;
    let (status, answer) = b
        .admin(Method::POST, "/admin/teams", Some(r#"{"name": "shared"}"#))
        .await;
    assert_eq!(status, 409, "{answer}");
    let (status, _) = b
        .admin(
            Method::PATCH,
            "/admin/clients/member",
            Some(r#"{"team": null}"#),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = b.admin(Method::DELETE, "/admin/teams/shared", None).await;
    assert_eq!(status, 200, "{answer}");
    eventually(WITHIN, "A drops the team deleted on B", async || {
        team(&a, "shared").await.is_none()
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ------------------------------------------------------------------ reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_would_break_a_managed_team_changes_nothing() {
    let upstream = MockUpstream::start().await;
    let config = teams_config(&upstream.base_url());
    let file = write_config(&config);
    let iris = Iris::start_from_file(file.path()).await;
    let (status, _) = iris
        .admin(Method::POST, "/admin/teams", Some(r#"{"name": "blue"}"#))
        .await;
    assert_eq!(status, 201);
    let _ = iris
        .create_client(r#"{"name": "nb", "team": "research"}"#)
        .await;

    // The file names a team like the managed one.
    std::fs::write(
        file.path(),
        format!("{config}\n[[teams]]\nname = \"blue\"\n"),
    )
    .unwrap();
    let (status, answer) = iris.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "config_invalid");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("teams[1].name"), "{message}");

    // The file drops the team a managed client is in (and its config member).
    let without = config.replace("team = \"research\"\n", "").replace(
        "[[teams]]\nname = \"research\"\n[teams.budget]\ntokens_per_day = 900000\n",
        "",
    );
    assert!(!without.contains("research"), "{without}");
    std::fs::write(file.path(), &without).unwrap();
    let (status, answer) = iris.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"nb\" is in the team \"research\""),
        "{message}"
    );
    assert_eq!(
        team(&iris, "research").await.expect("unchanged")["source"],
        "config"
    );
    iris.stop().await.unwrap();
}
