//! `iris usage`: each configured client's budgets, as the configured store
//! has them: the SQLite file (every finished response's charge is written
//! before its last byte, reservations every second, so a running server's
//! in-flight requests are at most a second old there), or Redis (live,
//! requests in flight included).

use std::fmt::Write;

use super::duration_string;
use super::store::{RedisStore, SqliteStore, Store};
use super::window::{Clock, Snapshot, Window};
use super::{Account, Limits, StoreBackend};

/// The report for `clients` (name and limits), from the store `backend`
/// describes.
pub async fn usage(
    backend: &StoreBackend,
    clients: impl IntoIterator<Item = (&str, Limits, Option<&str>)>,
) -> Result<String, String> {
    let now = Clock::system().now();
    let mut snapshots = Vec::new();
    match backend {
        StoreBackend::Sqlite { path } => {
            let states = SqliteStore::read(path).map_err(|e| e.to_string())?;
            for (client, limits, team) in clients {
                let account = Account::of_client(client, team);
                let state = states
                    .iter()
                    .find(|(stored, _)| *stored == account)
                    .map(|(_, state)| *state)
                    .unwrap_or_default();
                snapshots.push((client, state.snapshot(&limits, now)));
            }
            // Nothing is in flight as far as the file knows.
            Ok(render(snapshots, false))
        }
        StoreBackend::Redis { url, options } => {
            let store =
                RedisStore::connect(url.expose(), options.clone()).map_err(|e| e.to_string())?;
            for (client, limits, team) in clients {
                let snapshot = store
                    .snapshot(&Account::of_client(client, team), &limits, now)
                    .await
                    .map_err(|e| format!("budget store: {e}"))?;
                snapshots.push((client, snapshot));
            }
            Ok(render(snapshots, true))
        }
        StoreBackend::Memory => Err(
            "store.kind = \"memory\" keeps usage inside the running server only; \
             ask it with GET /v1/usage"
                .into(),
        ),
    }
}

/// A table: one line per client and window.
/// `in_flight`: whether the store knows the requests in flight (else the
/// `max_concurrent` rows are left out).
pub fn render<'a>(
    snapshots: impl IntoIterator<Item = (&'a str, Snapshot)>,
    in_flight: bool,
) -> String {
    let mut rows = vec![[
        "CLIENT".to_owned(),
        "WINDOW".to_owned(),
        "LIMIT".to_owned(),
        "USED".to_owned(),
        "REMAINING".to_owned(),
        "RESETS".to_owned(),
    ]];
    for (client, snapshot) in snapshots {
        for status in snapshot.reported() {
            if status.window == Window::MaxConcurrent && !in_flight {
                continue;
            }
            let dash = || "-".to_owned();
            rows.push([
                client.to_owned(),
                status.window.name().to_owned(),
                status.limit.map_or_else(dash, |l| l.to_string()),
                status.used.to_string(),
                status.remaining().map_or_else(dash, |r| r.to_string()),
                status.reset_at.map_or_else(dash, |at| {
                    format!(
                        "{} (in {})",
                        super::window::format_utc(at.max(snapshot.now)),
                        duration_string(at.saturating_sub(snapshot.now))
                    )
                }),
            ]);
        }
    }
    let mut widths = [0; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::budget::store::OneAccount;
    use crate::config::Config;

    fn config(path: &Path) -> Config {
        crate::config::parse(
            &format!(
                r#"
                [store]
                path = "{}"
                [[clients]]
                name = "team-a"
                key = "{}"
                [clients.budget]
                tokens_per_day = 1000
                requests_per_minute = 5
                [[clients]]
                name = "team-b"
                key = "{}"
                "#,
                path.display(),
                crate::keys::KeyHash::of("a"),
                crate::keys::KeyHash::of("b"),
            ),
            &|_| None,
        )
        .expect("config")
    }

    #[tokio::test]
    async fn reports_persisted_usage_per_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let config = config(&path);
        let store = SqliteStore::open(&path).expect("open");
        let limits = config.catalog.clients()[0].budget;
        let now = Clock::system().now();
        let hold = store
            .reserve_one(&Account::client("team-a"), &limits, 400, now)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&Account::client("team-a"), &limits, hold, 321, now)
            .await
            .expect("settle");
        store.flush().await.expect("flush");

        let report = report_for(&config, None).await.expect("report");
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].starts_with("CLIENT"), "{report}");
        let day_a = lines
            .iter()
            .find(|l| l.starts_with("team-a") && l.contains("tokens_per_day"))
            .expect("team-a's day");
        let cells: Vec<&str> = day_a.split_whitespace().collect();
        assert_eq!(&cells[2..5], ["1000", "321", "679"], "{report}");
        assert!(report.contains("requests_per_minute"), "{report}");
        let day_b = lines
            .iter()
            .find(|l| l.starts_with("team-b") && l.contains("tokens_per_day"))
            .expect("team-b's day is listed without a limit");
        assert_eq!(
            &day_b.split_whitespace().collect::<Vec<_>>()[2..5],
            ["-", "0", "-"]
        );

        let only_b = report_for(&config, Some("team-b")).await.expect("report");
        assert!(!only_b.contains("team-a"), "{only_b}");
        assert!(!only_b.contains("max_concurrent"), "{only_b}");
    }

    /// The report for the config's clients, or only one.
    async fn report_for(config: &Config, only: Option<&str>) -> Result<String, String> {
        let clients = config
            .catalog
            .clients()
            .iter()
            .filter(|c| only.is_none_or(|name| &*c.name == name))
            .map(|c| (&*c.name, c.budget, c.team.as_deref()));
        usage(&config.store.backend, clients).await
    }

    #[tokio::test]
    async fn a_memory_store_has_nothing_to_report() {
        assert!(
            usage(&StoreBackend::Memory, [("a", Limits::default(), None)])
                .await
                .expect_err("memory")
                .contains("GET /v1/usage")
        );
    }

    #[tokio::test]
    async fn reports_live_usage_from_redis() {
        use crate::budget::store::RedisClock;
        use crate::budget::store::redis_tests::test_store;

        let Some((store, keys)) = test_store(RedisClock::Server).await else {
            return;
        };
        let config = config(Path::new("unused.db"));
        let options = |timeout| crate::budget::store::RedisOptions {
            prefix: keys.prefix.clone(),
            lease: Duration::from_secs(600),
            timeout,
            clock: RedisClock::Server,
        };
        let redis = StoreBackend::Redis {
            url: crate::secret::Secret::new(keys.url.clone()),
            options: options(Duration::from_secs(2)),
        };
        let limits = config.catalog.clients()[0].budget;
        let hold = store
            .reserve_one(&Account::client("team-a"), &limits, 400, 0)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&Account::client("team-a"), &limits, hold, 321, 0)
            .await
            .expect("settle");
        let _in_flight = store
            .reserve_one(&Account::client("team-a"), &limits, 50, 0)
            .await
            .expect("store")
            .outcome
            .expect("fits");

        let report = usage(&redis, [("team-a", limits, None)])
            .await
            .expect("report");
        let row = |window: &str| -> Vec<String> {
            report
                .lines()
                .find(|l| l.contains(window))
                .unwrap_or_else(|| panic!("no {window} in {report}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            &row("tokens_per_day")[2..5],
            ["1000", "371", "629"],
            "{report}"
        );
        assert_eq!(&row("max_concurrent")[2..4], ["-", "1"], "{report}");

        // A team member's windows live in its team's slot: the report reads
        // them there (a bare client key would show nothing).
        let member = Account::member("team-b", &Account::team("blue"));
        let hold = store
            .reserve_one(&member, &limits, 200, 0)
            .await
            .expect("store")
            .outcome
            .expect("fits");
        store
            .settle_one(&member, &limits, hold, 123, 0)
            .await
            .expect("settle");
        let report = usage(&redis, [("team-b", limits, Some("blue"))])
            .await
            .expect("report");
        let day = report
            .lines()
            .find(|l| l.contains("tokens_per_day"))
            .unwrap_or_else(|| panic!("no tokens_per_day in {report}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(&day[2..5], ["1000", "123", "877"], "{report}");

        let nowhere = StoreBackend::Redis {
            url: crate::secret::Secret::new("redis://127.0.0.1:1/0"),
            options: options(Duration::from_millis(300)),
        };
        let error = usage(&nowhere, [("team-a", limits, None)])
            .await
            .expect_err("no Redis there");
        assert!(error.starts_with("budget store: "), "{error}");
    }
}
