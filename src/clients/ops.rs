//! What an operator can do to managed clients, with its validation: one
//! implementation for the admin API and the `iris clients` command. Every
//! mistake is named with its `param`; nothing is written unless all of it
//! is valid (a failed create leaves no client behind).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ManagedClient, Registry, RegistryError, StoredKey, unix_now};
use crate::budget::Limits;
use crate::budget::money::Money;
use crate::catalog::{Client, ModelAccess};
use crate::config::Config;
use crate::keys::{self, KeyHash};

/// Why an operation on a managed client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("A client named `{0}` exists already.")]
    Exists(String),
    #[error("The client `{0}` comes from the config file: change it there (and reload).")]
    ManagedByConfig(String),
    #[error("There is no managed client named `{0}`.")]
    NotFound(String),
    #[error("The client store is unavailable: {0}")]
    Unavailable(String),
}

impl From<RegistryError> for ClientError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Exists(name) => ClientError::Exists(name),
            RegistryError::NotFound(name) => ClientError::NotFound(name),
            RegistryError::Unavailable(why) => ClientError::Unavailable(why),
        }
    }
}

pub(super) fn invalid(param: &str, message: impl Into<String>) -> ClientError {
    ClientError::Invalid {
        param: param.to_owned(),
        message: message.into(),
    }
}

/// A budget as written in a request: signed, so that a negative limit is
/// refused by name rather than as a type error. In a change, a limit left
/// out stays as it was and `null` removes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetInput {
    #[serde(default, deserialize_with = "present")]
    pub requests_per_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub tokens_per_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub tokens_per_day: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub tokens_per_month: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub max_concurrent: Option<Option<i64>>,
    /// Currency units (a JSON number; a string is refused by its type).
    #[serde(default, deserialize_with = "present")]
    pub cost_per_day: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub cost_per_month: Option<Option<f64>>,
}

/// Tells a field written as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

impl BudgetInput {
    /// `base` with these changes, each limit checked.
    pub(super) fn apply(&self, base: Limits) -> Result<Limits, ClientError> {
        let mut limits = base;
        for (key, input, slot) in [
            (
                "requests_per_minute",
                self.requests_per_minute,
                &mut limits.requests_per_minute,
            ),
            (
                "tokens_per_minute",
                self.tokens_per_minute,
                &mut limits.tokens_per_minute,
            ),
            (
                "tokens_per_day",
                self.tokens_per_day,
                &mut limits.tokens_per_day,
            ),
            (
                "tokens_per_month",
                self.tokens_per_month,
                &mut limits.tokens_per_month,
            ),
            (
                "max_concurrent",
                self.max_concurrent,
                &mut limits.max_concurrent,
            ),
        ] {
            match input {
                None => {}
                Some(None) => *slot = None,
                Some(Some(value)) => match u64::try_from(value) {
                    Ok(value) if value > 0 => *slot = Some(value),
                    _ => {
                        return Err(invalid(
                            &format!("budget.{key}"),
                            format!(
                                "'budget.{key}' must be a positive integer, or null for no limit."
                            ),
                        ));
                    }
                },
            }
        }
        for (key, input, slot) in [
            ("cost_per_day", self.cost_per_day, &mut limits.cost_per_day),
            (
                "cost_per_month",
                self.cost_per_month,
                &mut limits.cost_per_month,
            ),
        ] {
            match input {
                None => {}
                Some(None) => *slot = None,
                Some(Some(units)) => match Money::from_units(units) {
                    Some(amount) if amount > Money::ZERO => *slot = Some(amount),
                    _ => {
                        return Err(invalid(
                            &format!("budget.{key}"),
                            format!(
                                "'budget.{key}' must be an amount above 0 in the pricing \
                                 currency, or null for no limit."
                            ),
                        ));
                    }
                },
            }
        }
        Ok(limits)
    }
}

/// `POST /admin/clients`, `iris clients add`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    /// Required; defaulted only so that a missing name is refused by
    /// [`check_name`] with `param: "name"`, not as a body-level error.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub budget: BudgetInput,
    #[serde(default)]
    pub disabled: bool,
    /// A team's name (config or managed).
    #[serde(default)]
    pub team: Option<String>,
    /// RFC 3339; may be past already (the key then gets `key_expired`).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// CIDRs; none: anywhere.
    #[serde(default)]
    pub allowed_networks: Option<Vec<String>>,
}

/// `PATCH /admin/clients/{name}`, `iris clients set`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientChange {
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub budget: BudgetInput,
    #[serde(default)]
    pub disabled: Option<bool>,
    /// A team's name; `null` takes the client out of its team.
    #[serde(default, deserialize_with = "present")]
    pub team: Option<Option<String>>,
    /// `null` removes the expiry.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// `null` or `[]`: anywhere.
    #[serde(default, deserialize_with = "present")]
    pub allowed_networks: Option<Option<Vec<String>>>,
}

/// `POST /admin/clients/{name}/rotate`, `iris clients rotate`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// How long the old key keeps working, in seconds (default 0).
    #[serde(default)]
    pub grace_s: Option<i64>,
}

/// A client as the admin API lists it, minus usage, and as `iris clients
/// list` prints it: one view of a config client and of a managed one.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub name: String,
    /// `config` or `managed`.
    pub source: &'static str,
    /// The models it may use; `*`: every one.
    pub models: Vec<String>,
    pub budget: Limits,
    pub disabled: bool,
    /// Managed clients: unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
    /// Managed clients: keys in use (2 during a rotation's grace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<usize>,
    /// Its team's name, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// RFC 3339 in UTC; null: never.
    pub expires_at: Option<String>,
    /// CIDRs; empty: anywhere.
    pub allowed_networks: Vec<String>,
}

impl From<&Client> for ClientView {
    /// A client of the config file (never disabled: it is removed there).
    fn from(client: &Client) -> Self {
        Self {
            name: client.name.to_string(),
            source: "config",
            models: match &client.models {
                ModelAccess::All => vec!["*".into()],
                ModelAccess::Only(models) => models.clone(),
            },
            budget: client.budget,
            disabled: false,
            created_at: None,
            keys: None,
            team: client.team.as_deref().map(str::to_owned),
            expires_at: client.expires_at.map(|at| at.to_string()),
            allowed_networks: client
                .allowed_networks
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

impl From<&ManagedClient> for ClientView {
    fn from(client: &ManagedClient) -> Self {
        let now = unix_now();
        Self {
            name: client.name.clone(),
            source: "managed",
            models: client.models.clone(),
            budget: client.budget,
            disabled: client.disabled,
            created_at: Some(client.created_at),
            keys: Some(
                client
                    .keys
                    .iter()
                    .filter(|k| k.expires_at.is_none_or(|at| now < at))
                    .count(),
            ),
            team: client.team.clone(),
            expires_at: client.expires_at.clone(),
            allowed_networks: client.allowed_networks.clone(),
        }
    }
}

/// Parses a JSON request body, naming the offending field in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid("", format!("The request body is not valid JSON: {e}.")))?;
    // serde would also build a struct from an array (`["name"]`): only an
    // object is a request.
    if !value.is_object() {
        return Err(invalid("", "The request body must be a JSON object."));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        invalid(
            &param_of(e.path()),
            format!("The request body is invalid: {}.", e.inner()),
        )
    })
}

/// Where in a body an error is, as a `param`: `budget.tokens_per_day`,
/// `models[1]`; empty at the top level. The path stops where serde could
/// not tell the field, rather than naming `?`.
fn param_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    use std::fmt::Write as _;
    let mut param = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(param, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !param.is_empty() {
                    param.push('.');
                }
                param.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    param
}

/// A name that is safe everywhere it shows: logs, metric labels, the
/// console, Redis keys, and a path segment of `/admin/clients/{name}` as
/// sent (no character to escape; not `.` or `..`, which URL parsers,
/// browsers first, resolve away).
pub(super) fn check_name(name: &str) -> Result<(), ClientError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !matches!(name, "." | "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            "'name' must be 1 to 64 characters: letters, digits, '.', '_' or '-', \
             and not '.' or '..'.",
        ))
    }
}

fn check_models(models: &[String], config: &Config) -> Result<(), ClientError> {
    if models.is_empty() {
        return Err(invalid(
            "models",
            "'models' must list at least one model, or \"*\".",
        ));
    }
    for (i, model) in models.iter().enumerate() {
        if model != "*" && config.catalog.model(model).is_none() {
            return Err(invalid(
                &format!("models[{i}]"),
                format!("There is no model named `{model}`."),
            ));
        }
    }
    Ok(())
}

/// An `expires_at` as written, checked, in the one form it is stored in
/// (UTC). A past instant is allowed: the key then gets `key_expired`.
fn check_expires_at(text: &str) -> Result<String, ClientError> {
    crate::config::parse_instant(text)
        .map(|at| at.to_string())
        .map_err(|_| {
            invalid(
                "expires_at",
                format!(
                    "'expires_at' must be an RFC 3339 time with an offset, such as \
                     2027-01-01T00:00:00Z (or null for never), not {text:?}."
                ),
            )
        })
}

/// `allowed_networks` as written, each checked, in canonical form.
fn check_networks(networks: &[String]) -> Result<Vec<String>, ClientError> {
    networks
        .iter()
        .enumerate()
        .map(|(i, text)| {
            crate::client_addr::parse_network(text)
                .map(|net| net.to_string())
                .map_err(|message| {
                    invalid(
                        &format!("allowed_networks[{i}]"),
                        format!("'allowed_networks[{i}]': {message}."),
                    )
                })
        })
        .collect()
}

/// Refuses a client's `team` that names no team, config or managed.
async fn check_team(
    registry: &dyn Registry,
    config: &Config,
    team: &str,
) -> Result<(), ClientError> {
    if config.catalog.team(team).is_some() {
        return Ok(());
    }
    let loaded = registry
        .load_all()
        .await
        .map_err(|e| ClientError::Unavailable(e.to_string()))?;
    if loaded.teams.iter().any(|t| t.name == team) {
        Ok(())
    } else {
        Err(invalid("team", format!("There is no team named `{team}`.")))
    }
}

fn from_config(name: &str, config: &Config) -> bool {
    config.catalog.has_client(name)
}

fn new_key() -> Result<(String, StoredKey), ClientError> {
    let key = keys::generate().map_err(|e| ClientError::Unavailable(e.to_string()))?;
    let hash = KeyHash::of(&key).to_string();
    Ok((
        key,
        StoredKey {
            hash,
            expires_at: None,
        },
    ))
}

/// Creates a client; returns it and its key, the only time the key is shown.
pub async fn create(
    registry: &dyn Registry,
    config: &Config,
    request: NewClient,
) -> Result<(ManagedClient, String), ClientError> {
    check_name(&request.name)?;
    if from_config(&request.name, config) {
        return Err(ClientError::Exists(request.name));
    }
    let models = request.models.unwrap_or_else(|| vec!["*".into()]);
    check_models(&models, config)?;
    let budget = request.budget.apply(Limits::default())?;
    if let Some(team) = &request.team {
        check_team(registry, config, team).await?;
    }
    let expires_at = request
        .expires_at
        .as_deref()
        .map(check_expires_at)
        .transpose()?;
    let allowed_networks = check_networks(request.allowed_networks.as_deref().unwrap_or(&[]))?;
    let (key, stored) = new_key()?;
    let client = ManagedClient {
        name: request.name,
        keys: vec![stored],
        models,
        budget,
        disabled: request.disabled,
        created_at: unix_now(),
        team: request.team,
        expires_at,
        allowed_networks,
    };
    registry.create(client.clone()).await?;
    Ok((client, key))
}

/// The managed client `name`, refusing a config client's name.
async fn existing(
    registry: &dyn Registry,
    config: &Config,
    name: &str,
) -> Result<ManagedClient, ClientError> {
    if from_config(name, config) {
        return Err(ClientError::ManagedByConfig(name.to_owned()));
    }
    let (_, clients) = registry.load().await?;
    clients
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| ClientError::NotFound(name.to_owned()))
}

/// Changes a client's models, budget, `disabled` or team.
pub async fn change(
    registry: &dyn Registry,
    config: &Config,
    name: &str,
    change: ClientChange,
) -> Result<ManagedClient, ClientError> {
    let mut client = existing(registry, config, name).await?;
    if let Some(models) = change.models {
        check_models(&models, config)?;
        client.models = models;
    }
    client.budget = change.budget.apply(client.budget)?;
    if let Some(disabled) = change.disabled {
        client.disabled = disabled;
    }
    if let Some(team) = change.team {
        if let Some(team) = &team {
            check_team(registry, config, team).await?;
        }
        client.team = team;
    }
    if let Some(expires_at) = change.expires_at {
        client.expires_at = expires_at.as_deref().map(check_expires_at).transpose()?;
    }
    if let Some(networks) = change.allowed_networks {
        client.allowed_networks = check_networks(networks.as_deref().unwrap_or(&[]))?;
    }
    registry.replace(client.clone()).await?;
    Ok(client)
}

/// Gives a client a new key; the current one keeps working for `grace`.
pub async fn rotate(
    registry: &dyn Registry,
    config: &Config,
    name: &str,
    rotation: Rotation,
) -> Result<(ManagedClient, String), ClientError> {
    let grace = match rotation.grace_s {
        None => 0,
        Some(seconds) => u64::try_from(seconds)
            .ok()
            .filter(|s| *s <= 30 * 86_400)
            .ok_or_else(|| {
                invalid(
                    "grace_s",
                    "'grace_s' must be 0 to 2592000 seconds (30 days).",
                )
            })?,
    };
    let mut client = existing(registry, config, name).await?;
    let now = unix_now();
    let until = now + grace;
    // Keys already rotated out keep their own end; the current one gets the grace.
    client
        .keys
        .retain(|k| k.expires_at.is_none_or(|at| now < at));
    for key in &mut client.keys {
        key.expires_at = Some(key.expires_at.map_or(until, |at| at.min(until)));
    }
    client
        .keys
        .retain(|k| k.expires_at.is_none_or(|at| now < at));
    let (key, stored) = new_key()?;
    client.keys.push(stored);
    registry.replace(client.clone()).await?;
    Ok((client, key))
}

/// Deletes a client; its keys stop working.
pub async fn remove(
    registry: &dyn Registry,
    config: &Config,
    name: &str,
) -> Result<(), ClientError> {
    if from_config(name, config) {
        return Err(ClientError::ManagedByConfig(name.to_owned()));
    }
    registry.delete(name).await?;
    Ok(())
}

/// The grace period as a duration, for messages.
pub fn grace(rotation: &Rotation) -> Duration {
    Duration::from_secs(
        rotation
            .grace_s
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
    )
}
