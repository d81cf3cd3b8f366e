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
    /// Manage clients in the configured store (every instance sees them).
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Manage teams (budgets shared by their clients) in the configured store.
    #[command(subcommand)]
    Teams(TeamsCommand),
    /// Each deployment's health, from the running server's admin API
    /// (the admin key in $IRIS_ADMIN_KEY).
    Upstreams {
        #[command(flatten)]
        config: ConfigArg,
        /// The server's base URL [default: from server.listen]
        #[arg(long)]
        url: Option<String>,
    },
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
    /// Up to this time, not included (a date: the start of that UTC day)
    /// [default: now]
    #[arg(long, requires = "since")]
    pub until: Option<String>,
    /// Group by any of client,team,model,upstream,endpoint,day (comma-separated)
    #[arg(long, requires = "since")]
    pub by: Option<String>,
    /// Output format [default: table]
    #[arg(long, value_enum, requires = "since")]
    pub format: Option<Format>,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Every client: source (config or managed), models, budget.
    List(ConfigArg),
    /// Create a managed client; prints its key once.
    Add {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        settings: ClientSettings,
    },
    /// Change a managed client's models, budget, or whether it is disabled.
    Set {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        settings: ClientSettings,
        /// Disable the client: its keys stop working.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Enable it again.
        #[arg(long)]
        enable: bool,
    },
    /// Give a managed client a new key; prints it once.
    Rotate {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        /// How long the old key keeps working, in seconds.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        grace_s: i64,
    },
    /// Delete a managed client; its keys stop working.
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// A managed client's models, limits and policy.
#[derive(Debug, Args, Default)]
pub struct ClientSettings {
    /// Model names, comma-separated; `*` for all.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[command(flatten)]
    pub budget: BudgetFlags,
    /// The team whose budget the client's requests also count against;
    /// `""` (with `set`) takes it out of its team.
    #[arg(long)]
    pub team: Option<String>,
    /// When its key stops working, RFC 3339 (2027-01-01T00:00:00Z); `none`
    /// for never.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// CIDRs its requests may come from, comma-separated; `none` for anywhere.
    #[arg(long)]
    pub allowed_networks: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TeamsCommand {
    /// Every team: source (config or managed), budget limits, members.
    List(ConfigArg),
    /// Create a managed team.
    Add {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        limits: BudgetFlags,
    },
    /// Change a managed team's budget.
    Set {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        limits: BudgetFlags,
    },
    /// Delete a managed team that no client names.
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// A budget's limits, for a client or a team. A limit is a number, or
/// `none` (with `set`) to remove it. Negative numbers are taken as values,
/// so that `--tokens-per-day -5` is refused by name like the admin API
/// refuses it, not by clap as an unknown flag.
#[derive(Debug, Args, Default)]
pub struct BudgetFlags {
    #[arg(long, allow_negative_numbers = true)]
    pub requests_per_minute: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub tokens_per_minute: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub tokens_per_day: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub tokens_per_month: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub max_concurrent: Option<String>,
    /// Money per UTC day, in the pricing currency.
    #[arg(long, allow_negative_numbers = true)]
    pub cost_per_day: Option<String>,
    /// Money per UTC month, in the pricing currency.
    #[arg(long, allow_negative_numbers = true)]
    pub cost_per_month: Option<String>,
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
