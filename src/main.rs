//! The `iris` binary: parse the command line, run the command.

use std::process::ExitCode;

use clap::Parser;
use iris::cli::{Cli, Command, ConfigArg, KeyCommand};
use iris::commands;

/// A gateway allocates many short-lived buffers per request; mimalloc serves
/// them faster than the system allocator (measured with examples/bench.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse()
        .command
        .unwrap_or(Command::Serve(ConfigArg::default()))
    {
        Command::Serve(config) => commands::serve(&config),
        Command::Check(config) => commands::check(&config),
        Command::Key(KeyCommand::New) => commands::key_new(),
        Command::Key(KeyCommand::Hash { key }) => commands::key_hash(&key),
        Command::Clients(command) => commands::clients(command),
        Command::Teams(command) => commands::teams(command),
        Command::Upstreams { config, url } => commands::upstreams(&config, url.as_deref()),
        Command::Usage {
            config,
            client,
            spend,
        } => commands::usage(&config, client.as_deref(), &spend),
    }
}
