//! `/admin/*`: the operator's API, present only when `[admin]` is set (else
//! every path under it is 404, as if it did not exist). Every request
//! carries the admin key (`Authorization: Bearer`), compared in constant
//! time with its configured hash; client keys get 401 here, and wrong keys
//! count against the address like client keys do.
//!
//! | method, path | does |
//! |---|---|
//! | `GET /admin/clients` | every client: source, models, budget, usage now (and the `currency` of its amounts) |
//! | `POST /admin/clients` | create a managed client; answers its key once |
//! | `PATCH /admin/clients/{name}` | change models, budget, `disabled` |
//! | `POST /admin/clients/{name}/rotate` | a new key; the old one works `grace_s` more |
//! | `DELETE /admin/clients/{name}` | delete; its key stops working |
//! | `GET /admin/teams` | every team: source, budget, members, usage now (and the `currency`) |
//! | `POST /admin/teams` | create a managed team |
//! | `PATCH /admin/teams/{name}` | change its budget |
//! | `DELETE /admin/teams/{name}` | delete a team no client names |
//! | `POST /admin/reload` | re-read the config file |

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::failed_authentication;
use crate::budget::Account;
use crate::clients::ops::{self, ClientChange, ClientView, NewClient, Rotation};
use crate::clients::teams::{self, NewTeam, TeamChange, TeamView};
use crate::config::Config;
use crate::error::ApiError;
use crate::keys::{KeyHash, bearer_key};
use crate::routing::view::DeploymentView;
use crate::state::SharedState;

/// The operator, authenticated; carries the configuration snapshot.
pub struct Admin {
    pub config: Arc<Config>,
}

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let config = state.config();
        let Some(admin_key) = config.admin else {
            return Err(ApiError::not_found(parts.method.as_str(), parts.uri.path()));
        };
        let presented = bearer_key(&parts.headers).map(KeyHash::of);
        if presented.is_some_and(|key| key.matches(&admin_key)) {
            Ok(Admin { config })
        } else {
            Err(failed_authentication(state, parts))
        }
    }
}

/// A client's view with its budget windows now.
async fn with_usage(state: &SharedState, view: ClientView) -> Value {
    let mut value = serde_json::to_value(&view).unwrap_or_default();
    let usage = state
        .gateway
        .budgets
        .snapshot(
            &Account::of_client(view.name.as_str(), view.team.as_deref()),
            &view.budget,
        )
        .await
        .map(|snapshot| super::usage::windows_json(&snapshot))
        .unwrap_or(Value::Null);
    value["usage"] = usage;
    value
}

pub async fn list_clients(
    State(state): State<SharedState>,
    Admin { config }: Admin,
) -> Json<Value> {
    let mut data = Vec::new();
    for client in config.catalog.clients() {
        data.push(with_usage(&state, ClientView::from(&**client)).await);
    }
    let managed = state.clients.index().clients.clone();
    for client in &managed {
        data.push(with_usage(&state, ClientView::from(client)).await);
    }
    Json(json!({"object": "list", "currency": &*config.currency, "data": data}))
}

pub async fn create_client(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: NewClient = ops::parse_json(&body)?;
    let (client, key) = ops::create(state.clients.registry().as_ref(), &config, request).await?;
    state.clients.refresh().await;
    tracing::info!(client = %client.name, "managed client created");
    let body = json!({"client": ClientView::from(&client), "key": key});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn change_client(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let change: ClientChange = ops::parse_json(&body)?;
    let client = ops::change(state.clients.registry().as_ref(), &config, &name, change).await?;
    state.clients.refresh().await;
    tracing::info!(client = %client.name, disabled = client.disabled, "managed client changed");
    Ok(Json(json!({"client": ClientView::from(&client)})))
}

pub async fn rotate_client(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let rotation: Rotation = if body.iter().all(u8::is_ascii_whitespace) {
        Rotation::default()
    } else {
        ops::parse_json(&body)?
    };
    let grace = ops::grace(&rotation);
    let (client, key) =
        ops::rotate(state.clients.registry().as_ref(), &config, &name, rotation).await?;
    state.clients.refresh().await;
    tracing::info!(client = %client.name, grace_s = grace.as_secs(), "managed client's key rotated");
    Ok(Json(
        json!({"client": ClientView::from(&client), "key": key}),
    ))
}

pub async fn delete_client(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ops::remove(state.clients.registry().as_ref(), &config, &name).await?;
    state.clients.refresh().await;
    tracing::info!(client = %name, "managed client deleted");
    Ok(Json(json!({"name": name, "deleted": true})))
}

/// A team's view with its budget windows now, shaped like a client's.
async fn with_team_usage(state: &SharedState, view: &TeamView) -> Value {
    let mut value = serde_json::to_value(view).unwrap_or_default();
    value["usage"] = state
        .gateway
        .budgets
        .snapshot(&Account::team(&view.name), &view.budget)
        .await
        .map(|snapshot| super::usage::windows_json(&snapshot))
        .unwrap_or(Value::Null);
    value
}

pub async fn list_teams(State(state): State<SharedState>, Admin { config }: Admin) -> Json<Value> {
    let index = state.clients.index();
    let views = teams::views(&config, &index.clients, &index.teams);
    drop(index);
    let mut data = Vec::new();
    for view in &views {
        data.push(with_team_usage(&state, view).await);
    }
    Json(json!({"object": "list", "currency": &*config.currency, "data": data}))
}

/// A managed team as it is now, with its members, for an answer.
fn team_view(state: &SharedState, config: &Config, team: &crate::clients::ManagedTeam) -> TeamView {
    TeamView::managed(team, config, &state.clients.index().clients)
}

pub async fn create_team(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: NewTeam = ops::parse_json(&body).map_err(teams::TeamError::from)?;
    let team = teams::create(state.clients.registry().as_ref(), &config, request).await?;
    state.clients.refresh().await;
    tracing::info!(team = %team.name, "managed team created");
    let body = json!({"team": team_view(&state, &config, &team)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn change_team(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let change: TeamChange = ops::parse_json(&body).map_err(teams::TeamError::from)?;
    let team = teams::change(state.clients.registry().as_ref(), &config, &name, change).await?;
    state.clients.refresh().await;
    tracing::info!(team = %team.name, "managed team changed");
    Ok(Json(json!({"team": team_view(&state, &config, &team)})))
}

pub async fn delete_team(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    teams::remove(state.clients.registry().as_ref(), &config, &name).await?;
    state.clients.refresh().await;
    tracing::info!(team = %name, "managed team deleted");
    Ok(Json(json!({"name": name, "deleted": true})))
}

/// Every deployment: healthy or cooling down (until when), attempts and
/// failures in the last five minutes, and its upstream's pacing room.
pub async fn upstreams(State(state): State<SharedState>, Admin { config }: Admin) -> Json<Value> {
    let now = crate::clients::unix_now_ms();
    let mut data = Vec::new();
    for (key, upstream_name, upstream_model) in config.catalog.deployment_labels() {
        let report = state.gateway.health.report(&key);
        let models: Vec<String> = config
            .catalog
            .models()
            .filter(|m| m.deployments.iter().any(|d| d.key == key))
            .map(|m| m.name.clone())
            .collect();
        let pacing = match config
            .catalog
            .upstreams()
            .iter()
            .find(|u| u.name == upstream_name)
        {
            Some(upstream) if upstream.pacing != crate::budget::Limits::default() => state
                .gateway
                .budgets
                .snapshot(&Account::upstream(&upstream.name), &upstream.pacing)
                .await
                .map(|snapshot| super::usage::windows_json(&snapshot))
                .unwrap_or(Value::Null),
            _ => Value::Null,
        };
        data.push(DeploymentView {
            deployment: key.to_string(),
            upstream: upstream_name,
            upstream_model,
            models,
            pacing,
            ..DeploymentView::health(&report, now)
        });
    }
    Json(json!({"object": "list", "data": data}))
}

/// `?since=&until=&by=client,team,model,upstream,endpoint,day` (and `client=`).
#[derive(Debug, serde::Deserialize)]
pub struct UsageParams {
    since: Option<String>,
    until: Option<String>,
    by: Option<String>,
    client: Option<String>,
}

/// Totals from the spend log for a period.
pub async fn usage(
    State(state): State<SharedState>,
    Admin { config }: Admin,
    params: Result<axum::extract::Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let axum::extract::Query(params) =
        params.map_err(|e| ApiError::invalid_request(format!("The query is invalid: {e}.")))?;
    let since = params.since.ok_or_else(|| {
        ApiError::invalid_request(
            "Missing required parameter: 'since' (a date such as 2026-11-01).",
        )
        .with_param("since")
    })?;
    let now = i64::try_from(crate::clients::unix_now_ms()).unwrap_or(i64::MAX);
    let mut query = crate::spend::report::Query::parse(
        &since,
        params.until.as_deref(),
        params.by.as_deref(),
        now,
    )
    .map_err(|e| ApiError::invalid_request(e.message).with_param(e.param))?;
    query.client = params.client;
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        crate::spend::report::usage(&state.spend, &query, &config.currency),
    )
    .await
    .map_err(|_| {
        ApiError::from(crate::spend::SpendError::Sink(crate::spend::SinkError(
            "the spend log did not answer within 10 s".into(),
        )))
    })?
    .map_err(ApiError::from)?;
    let mut body = serde_json::to_value(report).unwrap_or_default();
    body["object"] = json!("usage_report");
    Ok(Json(body))
}

pub async fn reload(State(state): State<SharedState>, _: Admin) -> Result<Json<Value>, ApiError> {
    crate::reload::reload(&state)?;
    Ok(Json(json!({"status": "reloaded"})))
}

/// Any other path under `/admin`: 404 in OpenAI's shape (after the admin
/// check, so without `[admin]` nothing under it seems to exist).
pub async fn not_found(_: Admin, parts: Parts) -> ApiError {
    ApiError::not_found(parts.method.as_str(), parts.uri.path())
}
