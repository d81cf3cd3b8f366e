//! One function per command of the `iris` binary. Each loads the config
//! through the same path (`config::load`: text to typed values, every
//! problem with its key path), so `iris check` accepts exactly what `iris
//! serve` runs.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::{BudgetFlags, ClientSettings, ClientsCommand, ConfigArg, SpendArgs, TeamsCommand};
use crate::clients::ops::{self, BudgetInput, ClientChange, ClientView, NewClient, Rotation};
use crate::clients::teams::{self, NewTeam, TeamChange, TeamView};
use crate::config::{self, Config};
use crate::keys::{self, KeyHash};
use crate::routing::view::DeploymentView;
use crate::spend::Query;
use crate::spend::report as spend_report;

/// `iris serve`: runs the gateway until SIGTERM/SIGINT.
pub fn serve(arg: &ConfigArg) -> ExitCode {
    crate::telemetry::init();
    let path = arg.path();
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems.0 {
                tracing::error!(config = %path.display(), "{problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    for warning in &config.warnings {
        tracing::warn!(config = %path.display(), "{warning}");
    }
    report(block_on(true, run(config, path)), |message| {
        tracing::error!("{message}");
    })
}

async fn run(config: Config, path: std::path::PathBuf) -> Result<(), String> {
    crate::reload::hold_sighup();
    crate::init_tls();
    let listen = config.server.listen;
    let state = crate::state::AppState::new(config)
        .await?
        .with_config_path(path);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %local, "iris is serving");
    crate::server::run(listener, state, crate::server::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
}

/// `iris check`: validates a config; exit 1 on any problem.
pub fn check(arg: &ConfigArg) -> ExitCode {
    let path = arg.path();
    match config::load(&path) {
        Ok(config) => {
            // Allowed, so not problems: exit 0, but say so.
            for warning in &config.warnings {
                println!("warning: {warning}");
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for problem in &problems.0 {
                println!("{problem}");
            }
            eprintln!("{}: {} problem(s)", path.display(), problems.0.len());
            ExitCode::FAILURE
        }
    }
}

/// `iris key new`: a fresh client key and its hash.
pub fn key_new() -> ExitCode {
    match keys::generate() {
        Ok(key) => {
            println!("key:  {key}\nhash: {}", KeyHash::of(&key));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iris: no randomness available: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `iris key hash KEY`.
pub fn key_hash(key: &str) -> ExitCode {
    println!("{}", KeyHash::of(key));
    ExitCode::SUCCESS
}

/// `iris usage`: each client's budgets from the configured store; with
/// `--since`, totals from the spend log.
pub fn usage(arg: &ConfigArg, only: Option<&str>, spend: &SpendArgs) -> ExitCode {
    let path = arg.path();
    if let Some(since) = &spend.since {
        let result = config_or_message(&path).and_then(|config| {
            let now = crate::spend::unix_ms(std::time::SystemTime::now());
            let mut query = Query::parse(since, spend.until.as_deref(), spend.by.as_deref(), now)
                .map_err(|e| format!("--{e}"))?;
            query.client = only.map(str::to_owned);
            let report = block_on(
                false,
                crate::spend::report_from_config(
                    &config.spend_log,
                    &config.store.backend,
                    &query,
                    &config.currency,
                ),
            )?;
            print!(
                "{}",
                spend_report::render(&report, spend.format.unwrap_or_default())
            );
            Ok(())
        });
        return report(result, |message| eprintln!("iris usage: {message}"));
    }
    let result = config_or_message(&path).and_then(|config| {
        if let Some(name) = only
            && !config.catalog.has_client(name)
        {
            return Err(format!("no client named {name:?} in the config"));
        }
        let clients = config
            .catalog
            .clients()
            .iter()
            .filter(|c| only.is_none_or(|name| &*c.name == name))
            .map(|c| (&*c.name, c.budget, c.team.as_deref()));
        block_on(
            false,
            crate::budget::report::usage(&config.store.backend, clients),
        )
    });
    report(result.map(|text| print!("{text}")), |message| {
        eprintln!("iris usage: {message}");
    })
}

/// `iris clients ...`: the admin API's client operations, on the store.
pub fn clients(command: ClientsCommand) -> ExitCode {
    let config_arg = match &command {
        ClientsCommand::List(config)
        | ClientsCommand::Add { config, .. }
        | ClientsCommand::Set { config, .. }
        | ClientsCommand::Rotate { config, .. }
        | ClientsCommand::Remove { config, .. } => config,
    };
    let result = config_or_message(&config_arg.path()).and_then(|config| {
        block_on(false, async move {
            let registry = crate::clients::open(&config.store.backend)?;
            let registry = registry.as_ref();
            let said = |e: ops::ClientError| e.to_string();
            match command {
                ClientsCommand::List(_) => {
                    let (_, managed) = registry.load().await.map_err(|e| e.to_string())?;
                    let views = config
                        .catalog
                        .clients()
                        .iter()
                        .map(|client| ClientView::from(&**client))
                        .chain(managed.iter().map(ClientView::from));
                    let mut out = String::from("NAME\tSOURCE\tMODELS\tDISABLED\n");
                    for view in views {
                        let disabled = if view.disabled { "yes" } else { "no" };
                        out.push_str(&format!(
                            "{}\t{}\t{}\t{disabled}\n",
                            view.name,
                            view.source,
                            view.models.join(",")
                        ));
                    }
                    Ok(out)
                }
                ClientsCommand::Add { name, settings, .. } => {
                    let request = NewClient {
                        name,
                        models: settings.models.clone(),
                        budget: budget_input(&settings.budget)?,
                        disabled: false,
                        team: settings.team.clone().filter(|team| !team.is_empty()),
                        expires_at: expires_at_input(&settings).flatten(),
                        allowed_networks: networks_input(&settings).flatten(),
                    };
                    let (client, key) = ops::create(registry, &config, request).await.map_err(said)?;
                    Ok(format!(
                        "created {}\nkey: {key}\n(the key is shown only now; Iris keeps its hash)\n",
                        client.name
                    ))
                }
                ClientsCommand::Set {
                    name,
                    settings,
                    disable,
                    enable,
                    ..
                } => {
                    let change = ClientChange {
                        models: settings.models.clone(),
                        budget: budget_input(&settings.budget)?,
                        disabled: (disable || enable).then_some(disable),
                        team: settings
                            .team
                            .clone()
                            .map(|team| Some(team).filter(|team| !team.is_empty())),
                        expires_at: expires_at_input(&settings),
                        allowed_networks: networks_input(&settings),
                    };
                    let client = ops::change(registry, &config, &name, change).await.map_err(said)?;
                    Ok(format!(
                        "changed {}{}\n",
                        client.name,
                        if client.disabled { " (disabled)" } else { "" }
                    ))
                }
                ClientsCommand::Rotate { name, grace_s, .. } => {
                    let rotation = Rotation {
                        grace_s: Some(grace_s),
                    };
                    let (client, key) = ops::rotate(registry, &config, &name, rotation).await.map_err(said)?;
                    Ok(format!(
                        "rotated {}\nkey: {key}\n(the old key works {grace_s} s more)\n",
                        client.name
                    ))
                }
                ClientsCommand::Remove { name, .. } => {
                    ops::remove(registry, &config, &name).await.map_err(said)?;
                    Ok(format!("removed {name}\n"))
                }
            }
        })
    });
    report(result.map(|text| print!("{text}")), |message| {
        eprintln!("iris clients: {message}");
    })
}

/// `iris teams ...`: the admin API's team operations, on the store.
pub fn teams(command: TeamsCommand) -> ExitCode {
    let config_arg = match &command {
        TeamsCommand::List(config)
        | TeamsCommand::Add { config, .. }
        | TeamsCommand::Set { config, .. }
        | TeamsCommand::Remove { config, .. } => config,
    };
    let result = config_or_message(&config_arg.path()).and_then(|config| {
        block_on(false, async move {
            let registry = crate::clients::open(&config.store.backend)?;
            let registry = registry.as_ref();
            let said = |e: teams::TeamError| e.to_string();
            match command {
                TeamsCommand::List(_) => {
                    let loaded = registry.load_all().await.map_err(|e| e.to_string())?;
                    let views = teams::views(&config, &loaded.clients, &loaded.teams);
                    let mut out = String::from("NAME\tSOURCE\tBUDGET\tMEMBERS\n");
                    for view in &views {
                        out.push_str(&team_line(view));
                    }
                    Ok(out)
                }
                TeamsCommand::Add { name, limits, .. } => {
                    let request = NewTeam {
                        name,
                        budget: budget_input(&limits)?,
                    };
                    let team = teams::create(registry, &config, request)
                        .await
                        .map_err(said)?;
                    Ok(format!("created {}\n", team.name))
                }
                TeamsCommand::Set { name, limits, .. } => {
                    let change = TeamChange {
                        budget: budget_input(&limits)?,
                    };
                    let team = teams::change(registry, &config, &name, change)
                        .await
                        .map_err(said)?;
                    Ok(format!("changed {}\n", team.name))
                }
                TeamsCommand::Remove { name, .. } => {
                    teams::remove(registry, &config, &name)
                        .await
                        .map_err(said)?;
                    Ok(format!("removed {name}\n"))
                }
            }
        })
    });
    report(result.map(|text| print!("{text}")), |message| {
        eprintln!("iris teams: {message}");
    })
}

/// One team of `iris teams list`: its limits as `key=value` (or `-`), its
/// members comma-separated (or `-`).
fn team_line(view: &TeamView) -> String {
    let limits = serde_json::to_value(view.budget).unwrap_or_default();
    let budget: Vec<String> = limits
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, limit)| !limit.is_null())
        .map(|(key, limit)| format!("{key}={limit}"))
        .collect();
    let dash = |list: Vec<String>| {
        if list.is_empty() {
            "-".to_owned()
        } else {
            list.join(",")
        }
    };
    format!(
        "{}\t{}\t{}\t{}\n",
        view.name,
        view.source,
        dash(budget),
        dash(view.members.clone())
    )
}

/// `iris upstreams`: `GET /admin/upstreams` of the running server, as a table.
pub fn upstreams(arg: &ConfigArg, url: Option<&str>) -> ExitCode {
    let result = config_or_message(&arg.path()).and_then(|config| {
        let key = std::env::var("IRIS_ADMIN_KEY")
            .map_err(|_| "set IRIS_ADMIN_KEY to the admin key".to_owned())?;
        let base = match url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let mut listen = config.server.listen;
                if listen.ip().is_unspecified() {
                    listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{listen}")
            }
        };
        block_on(false, async move {
            crate::init_tls();
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| e.to_string())?;
            let response = client
                .get(format!("{base}/admin/upstreams"))
                .bearer_auth(key)
                .send()
                .await
                .map_err(|e| format!("{base}: {e}"))?;
            let status = response.status();
            let text = response.bytes().await.map_err(|e| e.to_string())?;
            let body: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| format!("not JSON: {e}"))?;
            if !status.is_success() {
                return Err(format!(
                    "{status}: {}",
                    body["error"]["message"].as_str().unwrap_or("")
                ));
            }
            /// The answer's rows, read as the server wrote them.
            #[derive(serde::Deserialize)]
            struct List {
                #[serde(default)]
                data: Vec<DeploymentView>,
            }
            let list: List = serde_json::from_value(body)
                .map_err(|e| format!("not a list of deployments: {e}"))?;
            let mut out = String::from("DEPLOYMENT\tSTATE\tATTEMPTS_5M\tFAILURES_5M\n");
            for row in &list.data {
                let state = match row.cooling_until_utc() {
                    Some(until) => format!("cooling until {until}"),
                    None => "healthy".to_owned(),
                };
                out.push_str(&format!(
                    "{}\t{state}\t{}\t{}\n",
                    row.deployment, row.attempts_5m, row.failures_5m
                ));
            }
            Ok(out)
        })
    });
    report(result.map(|text| print!("{text}")), |message| {
        eprintln!("iris upstreams: {message}");
    })
}

/// The limits given as flags: a number, or `none` to remove one.
fn budget_input(flags: &BudgetFlags) -> Result<BudgetInput, String> {
    let parse = |flag: &str, value: &Option<String>| -> Result<Option<Option<i64>>, String> {
        match value.as_deref() {
            None => Ok(None),
            Some("none") => Ok(Some(None)),
            Some(text) => text
                .parse::<i64>()
                .map(|n| Some(Some(n)))
                .map_err(|_| format!("--{flag}: {text:?} is not a number (or none)")),
        }
    };
    // Amounts of money: checked (above 0) where the admin API checks them.
    let money = |flag: &str, value: &Option<String>| -> Result<Option<Option<f64>>, String> {
        match value.as_deref() {
            None => Ok(None),
            Some("none") => Ok(Some(None)),
            Some(text) => text
                .parse::<f64>()
                .map(|n| Some(Some(n)))
                .map_err(|_| format!("--{flag}: {text:?} is not an amount (or none)")),
        }
    };
    Ok(BudgetInput {
        requests_per_minute: parse("requests-per-minute", &flags.requests_per_minute)?,
        tokens_per_minute: parse("tokens-per-minute", &flags.tokens_per_minute)?,
        tokens_per_day: parse("tokens-per-day", &flags.tokens_per_day)?,
        tokens_per_month: parse("tokens-per-month", &flags.tokens_per_month)?,
        max_concurrent: parse("max-concurrent", &flags.max_concurrent)?,
        cost_per_day: money("cost-per-day", &flags.cost_per_day)?,
        cost_per_month: money("cost-per-month", &flags.cost_per_month)?,
    })
}

/// `--expires-at`: a time, or `none` for never.
fn expires_at_input(settings: &ClientSettings) -> Option<Option<String>> {
    settings
        .expires_at
        .as_ref()
        .map(|text| (text != "none").then(|| text.clone()))
}

/// `--allowed-networks`: comma-separated CIDRs, or `none` for anywhere.
fn networks_input(settings: &ClientSettings) -> Option<Option<Vec<String>>> {
    settings.allowed_networks.as_ref().map(|text| {
        (text != "none").then(|| text.split(',').map(|n| n.trim().to_owned()).collect())
    })
}

fn config_or_message(path: &Path) -> Result<Config, String> {
    config::load(path).map_err(|problems| problems.to_string())
}

/// Runs `future` on a runtime: all cores for the server, one thread for a
/// command that asks the store a question.
fn block_on<T>(server: bool, future: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    let runtime = if server {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    runtime
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(future)
}

fn report(result: Result<(), String>, say: impl FnOnce(&str)) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            say(&message);
            ExitCode::FAILURE
        }
    }
}
