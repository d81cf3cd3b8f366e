//! Reloading the config without a restart (`SIGHUP`, `POST /admin/reload`):
//! the file is read and checked whole, exactly as `iris check` does; on any
//! problem nothing changes. Otherwise the new configuration is swapped in
//! at once: new requests use it, requests in flight finish with the one
//! they took, budgets (kept by client name in the store) are untouched, and
//! clients that are gone stop authenticating. What a running process cannot
//! change (`[server]`, `[store]`, `[spend_log]`) makes the reload refuse,
//! saying so.

use std::sync::Arc;

use crate::cache::ResponseCache;
use crate::config::{self, Config, Problem};
use crate::images::Images;
use crate::state::AppState;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("there is no config file to reload (the config was given in code)")]
    NoFile,
    #[error("the config has {} problem(s)", .0.len())]
    Invalid(Vec<Problem>),
    #[error("changing {} needs a restart", .0.join(" and "))]
    NeedsRestart(Vec<&'static str>),
}

impl ReloadError {
    /// The `result` label of `iris_config_reloads_total`.
    fn label(&self) -> &'static str {
        match self {
            ReloadError::NoFile | ReloadError::Invalid(_) => "invalid",
            ReloadError::NeedsRestart(_) => "restart_required",
        }
    }
}

/// Re-reads the config file and swaps it in, or changes nothing.
pub fn reload(state: &AppState) -> Result<(), ReloadError> {
    let result = apply(state);
    let label = match &result {
        Ok(()) => "ok",
        Err(e) => e.label(),
    };
    crate::metrics::CONFIG_RELOADS
        .counter(&[("result", label)])
        .increment(1);
    match &result {
        Ok(()) => {
            tracing::info!("config reloaded");
            for warning in &state.config().warnings {
                tracing::warn!("{warning}");
            }
        }
        Err(ReloadError::Invalid(problems)) => {
            for problem in problems {
                tracing::error!("config not reloaded: {problem}");
            }
        }
        Err(e) => tracing::error!("config not reloaded: {e}"),
    }
    result
}

fn apply(state: &AppState) -> Result<(), ReloadError> {
    let path = state.config_path().ok_or(ReloadError::NoFile)?;
    let new = config::load(path).map_err(|problems| ReloadError::Invalid(problems.0))?;
    let old = state.config();
    let fixed = needs_restart(&old, &new);
    if !fixed.is_empty() {
        return Err(ReloadError::NeedsRestart(fixed));
    }
    let mut taken = names_of_managed_clients(state, &new);
    taken.extend(teams_against_managed(state, &new));
    if !taken.is_empty() {
        return Err(ReloadError::Invalid(taken));
    }
    if new.images != old.images {
        // A new image service: new limits, an empty cache (the same budget
        // of decode memory, if its size did not change).
        let images = Images::succeeding(&state.gateway.images.load(), &new.images)
            .map_err(|e| ReloadError::Invalid(vec![Problem::new("images", e)]))?;
        state.gateway.images.store(Arc::new(images));
    }
    if new.cache != old.cache {
        // A new cache, empty unless only the models' `cache` changed (then
        // this is not reached); on the same Redis.
        let cache = ResponseCache::succeeding(&state.gateway.cache.load_full(), &new.cache);
        state.gateway.cache.store(cache);
    }
    state.swap_config(new);
    Ok(())
}

/// Config clients named like a managed client. Names are unique across
/// both (creating a managed client refuses a config client's name): two
/// clients of one name would share one budget, and the managed one could
/// no longer be changed or deleted, since a config client's name is
/// read-only.
fn names_of_managed_clients(state: &AppState, new: &Config) -> Vec<Problem> {
    let managed = state.clients.index();
    new.catalog
        .clients()
        .iter()
        .enumerate()
        .filter(|(_, client)| managed.clients.iter().any(|m| *m.name == *client.name))
        .map(|(i, client)| {
            Problem::new(
                format!("clients[{i}].name"),
                format!(
                    "a managed client is named {:?}: delete it (or rename this one) first",
                    &*client.name
                ),
            )
        })
        .collect()
}

/// Config teams named like a managed team (unique across both, as for
/// clients), and teams the file drops that managed clients still name (a
/// team with clients cannot be deleted through the admin API either).
fn teams_against_managed(state: &AppState, new: &Config) -> Vec<Problem> {
    let managed = state.clients.index();
    let mut problems = Vec::new();
    for (i, team) in new.catalog.teams().iter().enumerate() {
        if managed.team(&team.name).is_some() {
            problems.push(Problem::new(
                format!("teams[{i}].name"),
                format!(
                    "a managed team is named {:?}: delete it (or rename this one) first",
                    &*team.name
                ),
            ));
        }
    }
    for client in &managed.clients {
        if let Some(team) = &client.team
            && new.catalog.team(team).is_none()
            && managed.team(team).is_none()
        {
            problems.push(Problem::new(
                "teams",
                format!(
                    "the managed client {:?} is in the team {team:?}, which this file no \
                     longer has: move the client to another team first",
                    client.name
                ),
            ));
        }
    }
    problems
}

/// The sections a running process keeps: it listens where it listens and
/// counts where it counts.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    if old.server != new.server {
        fixed.push("[server]");
    }
    if old.store != new.store {
        fixed.push("[store]");
    }
    // The spend log's writer and database are opened once, at startup.
    if old.spend_log != new.spend_log {
        fixed.push("[spend_log]");
    }
    // The alerts' delivery task starts once, with its settings.
    if old.alerts != new.alerts {
        fixed.push("[alerts]");
    }
    fixed
}

/// Takes `SIGHUP` away from its default (ending the process) at once, so
/// that one arriving while the server starts does not stop it; reloads are
/// served from [`on_sighup`] once it runs.
pub fn hold_sighup() {
    #[cfg(unix)]
    if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracing::warn!("SIGHUP cannot be watched: {e}");
    }
}

/// Reloads on every `SIGHUP`, for as long as the process runs.
pub fn on_sighup(state: std::sync::Weak<AppState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("SIGHUP cannot be watched: reload with POST /admin/reload");
            return;
        };
        while hangups.recv().await.is_some() {
            let Some(state) = state.upgrade() else {
                return;
            };
            tracing::info!("SIGHUP: reloading the config");
            let _ = reload(&state);
        }
    });
}
