//! What an operator sees of each deployment: the rows of
//! `GET /admin/upstreams`, which `iris upstreams` reads back and prints as
//! a table. One type for both, so that the cooldown's end is converted to
//! the API's Unix seconds, and from them to a UTC time, in one place.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::health::Report;

/// Whether a deployment is routed to normally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    #[default]
    Healthy,
    /// Skipped until `cooling_until` (unless every deployment of a model is).
    CoolingDown,
}

/// One deployment as this instance sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeploymentView {
    /// Its key: `upstream/model`, the model as the upstream is sent it.
    pub deployment: String,
    pub upstream: String,
    /// What the upstream calls the model.
    pub upstream_model: String,
    /// The models it serves.
    pub models: Vec<String>,
    pub state: DeploymentState,
    /// When its cooldown ends, Unix seconds.
    pub cooling_until: Option<u64>,
    /// Attempts and failed attempts in the last five minutes.
    pub attempts_5m: u64,
    pub failures_5m: u64,
    /// Its upstream's pacing windows (as `/v1/usage` shows a client's), or
    /// null when the upstream has no limits.
    pub pacing: Value,
}

impl DeploymentView {
    /// The health part of a view: `report`, `now_ms` being the time of it
    /// in Unix milliseconds.
    pub fn health(report: &Report, now_ms: u64) -> Self {
        let cooling_until = report.cooling_for.map(|left| unix_seconds(now_ms, left));
        Self {
            state: if cooling_until.is_some() {
                DeploymentState::CoolingDown
            } else {
                DeploymentState::Healthy
            },
            cooling_until,
            attempts_5m: report.attempts,
            failures_5m: report.failures,
            ..Self::default()
        }
    }

    /// When its cooldown ends as a UTC time (`2026-11-05T14:03:00Z`), if
    /// it is cooling down.
    pub fn cooling_until_utc(&self) -> Option<String> {
        self.cooling_until
            .map(|seconds| crate::budget::window::format_utc(seconds.saturating_mul(1_000_000_000)))
    }
}

/// `left` after `now_ms`, in whole Unix seconds (rounded down).
fn unix_seconds(now_ms: u64, left: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cooldown_is_shown_in_unix_seconds_and_read_back_as_utc() {
        // 2026-11-05T14:02:59.500Z, and 30.6 s of cooldown left.
        let now_ms = 1_793_887_379_500;
        let report = Report {
            cooling_for: Some(Duration::from_millis(30_600)),
            attempts: 4,
            failures: 3,
        };
        let view = DeploymentView {
            deployment: "a/m".into(),
            ..DeploymentView::health(&report, now_ms)
        };
        assert_eq!(view.state, DeploymentState::CoolingDown);
        assert_eq!(view.cooling_until, Some(1_793_887_410));
        assert_eq!(
            view.cooling_until_utc().as_deref(),
            Some("2026-11-05T14:03:30Z")
        );
        let json = serde_json::to_value(&view).expect("serializable");
        assert_eq!(json["state"], "cooling_down");
        assert_eq!(json["cooling_until"], 1_793_887_410);
        assert_eq!(json["attempts_5m"], 4);
        assert!(json["pacing"].is_null());
        let back: DeploymentView = serde_json::from_value(json).expect("read back");
        assert_eq!(back, view);

        let healthy = DeploymentView::health(
            &Report {
                cooling_for: None,
                attempts: 0,
                failures: 0,
            },
            now_ms,
        );
        assert_eq!(healthy.state, DeploymentState::Healthy);
        assert_eq!(healthy.cooling_until_utc(), None);
        // A row from a server that leaves fields out still reads.
        let sparse: DeploymentView =
            serde_json::from_str(r#"{"deployment": "b/m", "cooling_until": null}"#).expect("read");
        assert_eq!(sparse.state, DeploymentState::Healthy);
    }
}
