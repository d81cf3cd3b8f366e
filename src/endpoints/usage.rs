//! `GET /v1/usage`: the calling client's budgets, window by window.
//!
//! ```json
//! {"object": "usage", "client": "team-a", "windows": {
//!   "tokens_per_minute": {"limit": 20000, "used": 1200, "remaining": 18800,
//!                         "reset_at": 1735689604, "reset_in": "3.6s"},
//!   "tokens_per_day":    {"limit": null, "used": 5400, "remaining": null,
//!                         "reset_at": 1735776000, "reset_in": "13h20m0s"},
//!   "max_concurrent":    {"limit": 8, "used": 1, "remaining": 7}}}
//! ```
//!
//! Every configured limit is listed; the day and month totals and the
//! requests in flight are listed even without a limit (`limit` and
//! `remaining` are then `null`). Cost windows (`cost_per_day`,
//! `cost_per_month`) are amounts in `currency` units, to the millionth. A
//! team client's team is an object `team`: its `name` and its `windows`,
//! shaped like the client's. `used` includes what requests in flight
//! have reserved. `reset_at` is when `used` is back to zero (Unix seconds,
//! the end of the UTC day or month for calendar windows) and `reset_in` the
//! same as a duration, in the format of the `x-ratelimit-reset-*` headers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::Authenticated;
use crate::budget::money::Money;
use crate::budget::window::{NANOS_PER_SEC, Snapshot};
use crate::budget::{Account, duration_string};
use crate::error::ApiError;
use crate::state::SharedState;

pub async fn usage(
    State(state): State<SharedState>,
    Authenticated { client, config }: Authenticated,
) -> Result<Json<Value>, ApiError> {
    let budgets = &state.gateway.budgets;
    let team = client
        .team
        .as_deref()
        .and_then(|name| state.team(&config, name));
    let account = Account::of_client(Arc::clone(&client.name), client.team.as_deref());
    let snapshot = budgets.snapshot(&account, &client.budget).await?;
    let mut body = json!({
        "object": "usage",
        "client": &*client.name,
        "currency": &*config.currency,
        "windows": windows_json(&snapshot),
    });
    if let Some(team) = team {
        let snapshot = budgets
            .snapshot(&Account::team(&team.name), &team.budget)
            .await?;
        body["team"] = json!({"name": &*team.name, "windows": windows_json(&snapshot)});
    }
    Ok(Json(body))
}

/// A snapshot's windows: limit, used, remaining, reset (money in currency
/// units).
pub fn windows_json(snapshot: &Snapshot) -> Value {
    let mut windows = Map::new();
    for status in snapshot.reported() {
        let amount = |value: Option<u64>| match value {
            Some(micros) if status.window.counts_cost() => json!(Money::from_micros(micros)),
            value => json!(value),
        };
        let mut window = json!({
            "limit": amount(status.limit),
            "used": amount(Some(status.used)),
            "remaining": amount(status.remaining()),
        });
        if let Some(reset_at) = status.reset_at {
            window["reset_at"] = json!(reset_at.div_ceil(NANOS_PER_SEC));
            window["reset_in"] = json!(duration_string(reset_at.saturating_sub(snapshot.now)));
        }
        windows.insert(status.window.name().to_owned(), window);
    }
    Value::Object(windows)
}
