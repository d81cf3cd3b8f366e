//! The `iris` binary: parse the command line, load the config, run.

use std::process::ExitCode;

use clap::Parser;
use iris::cli::{Cli, Command, ConfigArg, KeyCommand};
use iris::keys::{self, KeyHash};

/// A gateway allocates many short-lived buffers per request; mimalloc serves
/// them faster than the system allocator (measured with examples/bench.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ConfigArg::default())) {
        Command::Serve(config) => serve(&config),
        Command::Check(config) => check(&config),
        Command::Key(KeyCommand::New) => match keys::generate() {
            Ok(key) => {
                println!("key:  {key}\nhash: {}", KeyHash::of(&key));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("iris: no randomness available: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Key(KeyCommand::Hash { key }) => {
            println!("{}", KeyHash::of(&key));
            ExitCode::SUCCESS
        }
        Command::Usage { config, client } => usage(&config, client.as_deref()),
    }
}

fn check(arg: &ConfigArg) -> ExitCode {
    let path = arg.path();
    match iris::config::load(&path) {
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

fn usage(arg: &ConfigArg, client: Option<&str>) -> ExitCode {
    let path = arg.path();
    let config = match iris::config::load(&path) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("iris usage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(iris::budget::report::usage(&config, client)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("iris usage: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(arg: &ConfigArg) -> ExitCode {
    iris::telemetry::init();
    let path = arg.path();
    let config = match iris::config::load(&path) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems.0 {
                tracing::error!(config = %path.display(), "{problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: iris::config::Config) -> Result<(), String> {
    iris::init_tls();
    let listen = config.server.listen.clone();
    let state = iris::app::AppState::new(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %local, "iris is serving");
    iris::server::run(listener, state, iris::server::shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
}
