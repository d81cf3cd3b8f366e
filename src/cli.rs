//! The command line (README "Commands").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::spend::report::Format;

#[derive(Debug, Parser)]
#[command(
    name = "iris",
    version,
    about = "An OpenAI-compatible gateway for vision-language models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve(ConfigArg),
    /// Validate a config and every environment variable it names.
    Check(ConfigArg),
    /// Make or hash client keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print each client's budgets: used and remaining; with --since, the
    /// totals from the spend log instead.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        #[command(flatten)]
        spend: SpendArgs,
    },
}

/// `iris usage --since …`: totals from the spend log.
#[derive(Debug, Args, Default)]
pub struct SpendArgs {
    /// Totals from the spend log from this time: YYYY-MM-DD (UTC),
    /// YYYY-MM-DDTHH:MM:SSZ, or Nd (N days ago)
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (a date includes its whole day) [default: now]
    #[arg(long, requires = "since")]
    pub until: Option<String>,
    /// Group by any of client,model,upstream,day (comma-separated)
    #[arg(long, requires = "since")]
    pub by: Option<String>,
    /// Output format [default: table]
    #[arg(long, value_enum, requires = "since")]
    pub format: Option<Format>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print a fresh random client key and its sha256: hash for the config.
    New,
    /// Print the sha256: hash of KEY.
    Hash { key: String },
}

#[derive(Debug, Args, Default)]
pub struct ConfigArg {
    /// Config file [default: $IRIS_CONFIG, else config/iris.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| std::env::var_os("IRIS_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("config/iris.toml"))
    }
}
