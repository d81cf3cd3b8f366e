//! What an operator can do to managed teams, with its validation: one
//! implementation for the admin API and the `iris teams` command, like
//! [`super::ops`] for clients (whose budget input, body parsing and name
//! rule it shares). A team of the config file is read-only here; a team
//! with clients, from the config or managed, cannot be deleted.

use serde::{Deserialize, Serialize};

use super::ops::{BudgetInput, ClientError, check_name};
use super::{Kind, ManagedClient, ManagedTeam, Registry, RegistryError, unix_now};
use crate::budget::Limits;
use crate::catalog::Team;
use crate::config::Config;

/// Why an operation on a managed team was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeamError {
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("A team named `{0}` exists already.")]
    Exists(String),
    #[error("The team `{0}` comes from the config file: change it there (and reload).")]
    ManagedByConfig(String),
    #[error("There is no managed team named `{0}`.")]
    NotFound(String),
    #[error(
        "The team `{name}` still has clients ({}): move or delete them first.",
        members.join(", ")
    )]
    NotEmpty { name: String, members: Vec<String> },
    #[error("The client store is unavailable: {0}")]
    Unavailable(String),
}

impl From<RegistryError> for TeamError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Exists(name) => TeamError::Exists(name),
            RegistryError::NotFound(name) => TeamError::NotFound(name),
            RegistryError::Unavailable(why) => TeamError::Unavailable(why),
        }
    }
}

/// The shared parts ([`super::ops::parse_json`], [`BudgetInput`], the name
/// rule) refuse with a client's error; only these two of its kinds can
/// come from them.
impl From<ClientError> for TeamError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Invalid { param, message } => TeamError::Invalid { param, message },
            other => TeamError::Unavailable(other.to_string()),
        }
    }
}

/// `POST /admin/teams`, `iris teams add`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    /// Required; defaulted so that a missing name is refused with
    /// `param: "name"`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub budget: BudgetInput,
}

/// `PATCH /admin/teams/{name}`, `iris teams set`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamChange {
    #[serde(default)]
    pub budget: BudgetInput,
}

/// A team as the admin API lists it (minus usage) and `iris teams list`
/// prints it: one view of a config team and of a managed one.
#[derive(Debug, Clone, Serialize)]
pub struct TeamView {
    pub name: String,
    /// `config` or `managed`.
    pub source: &'static str,
    pub budget: Limits,
    /// The clients in the team, config ones first, each group by name.
    pub members: Vec<String>,
    /// Managed teams: unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
}

/// The clients, from the config and managed, that name `team`.
pub fn members(config: &Config, managed: &[ManagedClient], team: &str) -> Vec<String> {
    let mut from_config: Vec<String> = config
        .catalog
        .clients()
        .iter()
        .filter(|c| c.team.as_deref() == Some(team))
        .map(|c| c.name.to_string())
        .collect();
    from_config.sort();
    let from_store = managed
        .iter()
        .filter(|c| c.team.as_deref() == Some(team))
        .map(|c| c.name.clone());
    from_config.extend(from_store);
    from_config
}

impl TeamView {
    pub fn from_config(team: &Team, config: &Config, managed: &[ManagedClient]) -> Self {
        Self {
            name: team.name.to_string(),
            source: "config",
            budget: team.budget,
            members: members(config, managed, &team.name),
            created_at: None,
        }
    }

    pub fn managed(team: &ManagedTeam, config: &Config, managed: &[ManagedClient]) -> Self {
        Self {
            name: team.name.clone(),
            source: "managed",
            budget: team.budget,
            members: members(config, managed, &team.name),
            created_at: Some(team.created_at),
        }
    }
}

/// Every team: the config's in config order, then the managed ones by name
/// (leaving out a managed team shadowed by a config team of its name).
pub fn views(config: &Config, clients: &[ManagedClient], teams: &[ManagedTeam]) -> Vec<TeamView> {
    let configured = config.catalog.teams().iter();
    configured
        .map(|team| TeamView::from_config(team, config, clients))
        .chain(
            teams
                .iter()
                .filter(|team| config.catalog.team(&team.name).is_none())
                .map(|team| TeamView::managed(team, config, clients)),
        )
        .collect()
}

/// Creates a team.
pub async fn create(
    registry: &dyn Registry,
    config: &Config,
    request: NewTeam,
) -> Result<ManagedTeam, TeamError> {
    check_name(&request.name)?;
    if config.catalog.team(&request.name).is_some() {
        return Err(TeamError::Exists(request.name));
    }
    let budget = request.budget.apply(Limits::default())?;
    let team = ManagedTeam {
        name: request.name,
        budget,
        created_at: unix_now(),
    };
    registry.create(team.clone()).await?;
    Ok(team)
}

/// Changes a team's budget.
pub async fn change(
    registry: &dyn Registry,
    config: &Config,
    name: &str,
    change: TeamChange,
) -> Result<ManagedTeam, TeamError> {
    if config.catalog.team(name).is_some() {
        return Err(TeamError::ManagedByConfig(name.to_owned()));
    }
    let loaded = registry.load_all().await?;
    let mut team = loaded
        .teams
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TeamError::NotFound(name.to_owned()))?;
    team.budget = change.budget.apply(team.budget)?;
    registry.replace(team.clone()).await?;
    Ok(team)
}

/// Deletes a team that no client names.
///
/// Its members are read from the store just before: a client given this
/// team by another instance in between keeps a team name that no longer
/// exists (the one team lookup, `AppState::team`, then finds none).
pub async fn remove(registry: &dyn Registry, config: &Config, name: &str) -> Result<(), TeamError> {
    if config.catalog.team(name).is_some() {
        return Err(TeamError::ManagedByConfig(name.to_owned()));
    }
    let loaded = registry.load_all().await?;
    if !loaded.teams.iter().any(|t| t.name == name) {
        return Err(TeamError::NotFound(name.to_owned()));
    }
    let members = members(config, &loaded.clients, name);
    if !members.is_empty() {
        return Err(TeamError::NotEmpty {
            name: name.to_owned(),
            members,
        });
    }
    registry.remove(Kind::Team, name.to_owned()).await?;
    Ok(())
}
