//! One function per command of the `iris` binary. Each loads the config
//! through the same path (`config::load`: text to typed values, every
//! problem with its key path), so `iris check` accepts exactly what `iris
//! serve` runs.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::{ConfigArg, SpendArgs};
use crate::config::{self, Config};
use crate::keys::{self, KeyHash};
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
    report(block_on(true, run(config)), |message| {
        tracing::error!("{message}");
    })
}

async fn run(config: Config) -> Result<(), String> {
    crate::init_tls();
    let listen = config.server.listen;
    let state = crate::app::AppState::new(config).await?;
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
        Ok(_) => {
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
                spend_report::from_config(&config.spend_log, &config.store.backend, &query),
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
            && !config.catalog.clients().iter().any(|c| &*c.name == name)
        {
            return Err(format!("no client named {name:?} in the config"));
        }
        let clients = config
            .catalog
            .clients()
            .iter()
            .filter(|c| only.is_none_or(|name| &*c.name == name))
            .map(|c| (&*c.name, c.budget));
        block_on(
            false,
            crate::budget::report::usage(&config.store.backend, clients),
        )
    });
    report(result.map(|text| print!("{text}")), |message| {
        eprintln!("iris usage: {message}");
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
