//! The HTTP edge's errors: the one place where what went wrong becomes a
//! status, an OpenAI-shaped body (`message`, `type`, `param`, `code`) and
//! the headers SDKs act on (`retry-after`, `retry-after-ms`,
//! `x-should-retry`, `x-ratelimit-*`).
//!
//! The layers below report their own errors ([`ChatError`] and the domain
//! errors inside it, [`BudgetError`]); each is mapped here, and every error
//! Iris answers goes through [`ApiError`]'s `IntoResponse`. Errors an
//! upstream returns are not `ApiError`s: they pass through untouched, but
//! for a 401 or 403 (Iris's own credentials refused), which becomes
//! `upstream_auth_failed`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::budget::window::{Refusal, Snapshot};
use crate::budget::{BudgetError, Rejection};
use crate::clients::ops::ClientError;
use crate::clients::teams::TeamError;
pub use crate::error_code::ErrorCode;
use crate::gateway::ChatError;
use crate::gateway::relay::Cut;
use crate::reload::ReloadError;
use crate::spend::SpendError;
use crate::upstream::UpstreamError;
use bytes::{Bytes, BytesMut};

/// An error answer: its code (which gives the status and OpenAI's error
/// `type`), `param` and message, plus the headers it must carry.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
    /// Extra headers, e.g. `retry-after`, `x-should-retry` and `x-ratelimit-*`
    /// (boxed: most errors have none, and errors travel in `Result`s).
    pub headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    /// An answer with `code`'s status (500 for a code that is never an
    /// HTTP answer, which would be a bug).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.status().unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
            param: None,
            headers: None,
        }
    }

    /// Names the offending field, e.g. `messages[0].content[1].image_url.url`.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.get_or_insert_default().insert(name, value);
        self
    }

    /// Sets `retry-after` (whole seconds, rounded up) and `retry-after-ms`,
    /// which OpenAI's SDKs read to time their retries.
    pub fn with_retry_after(self, wait: Duration) -> Self {
        let ms = wait.as_millis().max(1);
        let secs = ms.div_ceil(1000);
        self.with_header(header::RETRY_AFTER, HeaderValue::from(secs as u64))
            .with_header(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(ms as u64),
            )
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            ErrorCode::InvalidApiKey,
            "Incorrect API key provided. Send your Iris key as `Authorization: Bearer KEY`.",
        )
    }

    /// A real key whose client's `expires_at` has passed.
    pub fn key_expired() -> Self {
        Self::new(
            ErrorCode::KeyExpired,
            "Your API key has expired. Ask the operator of this gateway for a new one.",
        )
    }

    /// A key used from outside its client's `allowed_networks`.
    pub fn client_network_forbidden(addr: std::net::IpAddr) -> Self {
        Self::new(
            ErrorCode::ClientNetworkForbidden,
            format!("Your API key may not be used from your address ({addr})."),
        )
    }

    /// Too many wrong keys from one address.
    pub fn too_many_auth_failures(wait: Duration) -> Self {
        Self::new(
            ErrorCode::TooManyAuthFailures,
            "Too many requests with a wrong key from your address. Please try again later.",
        )
        .with_retry_after(wait)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            ErrorCode::ModelNotFound,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            ErrorCode::ModelNotAllowed,
            format!("Your key is not allowed to use the model `{model}`."),
        )
        .with_param("model")
    }

    pub fn not_found(method: &str, path: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("Unknown request URL: {method} {path}."),
        )
    }

    pub fn unsupported_api() -> Self {
        Self::new(
            ErrorCode::UnsupportedApi,
            "The Responses API is not supported by this gateway. Use POST /v1/chat/completions instead.",
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not supported on {path}."),
        )
    }

    pub fn internal() -> Self {
        Self::new(
            ErrorCode::InternalError,
            "The gateway failed to handle this request.",
        )
    }

    pub fn request_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::RequestTooLarge,
            format!("The request body is larger than this gateway accepts ({limit} bytes)."),
        )
    }

    /// The body did not arrive within `server.body_read_timeout_ms`. The
    /// connection is closed after it: the rest of the body may still come.
    pub fn request_timeout(limit: Duration) -> Self {
        Self::new(
            ErrorCode::RequestTimeout,
            format!(
                "The request body did not arrive within {} ms.",
                limit.as_millis()
            ),
        )
        .with_header(header::CONNECTION, HeaderValue::from_static("close"))
    }

    /// `server.max_connections` connections are open: this one is answered
    /// and closed before its request is read.
    pub fn too_many_connections(limit: usize) -> Self {
        Self::new(
            ErrorCode::TooManyConnections,
            format!(
                "The gateway is serving as many connections as it accepts ({limit}). \
                 Retry shortly."
            ),
        )
        .with_retry_after(Duration::from_secs(1))
        .with_header(header::CONNECTION, HeaderValue::from_static("close"))
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> Self {
        let message = error.to_string();
        match error {
            ChatError::Request(e) => {
                let error = Self::invalid_request(e.message);
                match e.param {
                    Some(param) => error.with_param(param),
                    None => error,
                }
            }
            ChatError::ModelNotFound(model) => Self::model_not_found(&model),
            ChatError::ModelNotAllowed(model) => Self::model_not_allowed(&model),
            ChatError::ModelNotSupported { .. } => {
                Self::new(ErrorCode::ModelNotSupported, message).with_param("model")
            }
            ChatError::Budget(e) => e.into(),
            ChatError::Image(refusal) => {
                Self::new(refusal.error.kind.code(), refusal.error.message)
                    .with_param(refusal.param.to_string())
            }
            ChatError::Upstream(
                UpstreamError::Unreachable { .. } | UpstreamError::Invalid { .. },
            ) => Self::new(ErrorCode::UpstreamUnavailable, message),
            ChatError::Upstream(UpstreamError::CredentialsRefused { .. }) => {
                Self::new(ErrorCode::UpstreamAuthFailed, message)
            }
            ChatError::Upstream(UpstreamError::Timeout { .. }) => {
                Self::new(ErrorCode::UpstreamTimeout, message)
            }
            ChatError::NoUpstreamRoom { retry_after, .. } => {
                Self::new(ErrorCode::UpstreamRateLimited, message).with_retry_after(retry_after)
            }
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        let message = error.to_string();
        match error {
            ClientError::Invalid { param, .. } => {
                let error = Self::invalid_request(message);
                if param.is_empty() {
                    error
                } else {
                    error.with_param(param)
                }
            }
            ClientError::Exists(_) => {
                Self::new(ErrorCode::ClientExists, message).with_param("name")
            }
            ClientError::ManagedByConfig(_) => Self::new(ErrorCode::ClientManagedByConfig, message),
            ClientError::NotFound(_) => Self::new(ErrorCode::ClientNotFound, message),
            ClientError::Unavailable(_) => Self::new(ErrorCode::StoreUnavailable, message)
                .with_retry_after(Duration::from_secs(1)),
        }
    }
}

impl From<TeamError> for ApiError {
    fn from(error: TeamError) -> Self {
        let message = error.to_string();
        match error {
            TeamError::Invalid { param, .. } => {
                let error = Self::invalid_request(message);
                if param.is_empty() {
                    error
                } else {
                    error.with_param(param)
                }
            }
            TeamError::Exists(_) => Self::new(ErrorCode::TeamExists, message).with_param("name"),
            TeamError::ManagedByConfig(_) => Self::new(ErrorCode::TeamManagedByConfig, message),
            TeamError::NotEmpty { .. } => Self::new(ErrorCode::TeamNotEmpty, message),
            TeamError::NotFound(_) => Self::new(ErrorCode::TeamNotFound, message),
            TeamError::Unavailable(_) => Self::new(ErrorCode::StoreUnavailable, message)
                .with_retry_after(Duration::from_secs(1)),
        }
    }
}

impl From<SpendError> for ApiError {
    fn from(error: SpendError) -> Self {
        let message = error.to_string();
        match error {
            SpendError::Off => Self::new(ErrorCode::SpendLogOff, message),
            SpendError::Sink(_) => Self::new(ErrorCode::SpendLogUnavailable, message)
                .with_retry_after(Duration::from_secs(1)),
        }
    }
}

impl From<ReloadError> for ApiError {
    fn from(error: ReloadError) -> Self {
        let message = error.to_string();
        match error {
            ReloadError::Invalid(problems) => {
                let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
                Self::new(
                    ErrorCode::ConfigInvalid,
                    format!("{message}; nothing changed: {}", listed.join("; ")),
                )
            }
            ReloadError::NeedsRestart(_) => Self::new(
                ErrorCode::RestartRequired,
                format!("{message}; nothing changed"),
            ),
            ReloadError::NoFile => Self::new(ErrorCode::ConfigInvalid, message),
        }
    }
}

impl From<BudgetError> for ApiError {
    fn from(error: BudgetError) -> Self {
        match error {
            BudgetError::StoreUnavailable => {
                Self::new(ErrorCode::StoreUnavailable, error.to_string())
                    .with_retry_after(Duration::from_secs(1))
            }
            BudgetError::Rejected(rejection) => Self::rejected(&rejection),
        }
    }
}

impl ApiError {
    /// The 429 for a budget refusal: `rate_limit_exceeded` when waiting
    /// helps (the SDKs retry after `retry-after`), `insufficient_quota` with
    /// `x-should-retry: false` when a budget is spent or the request can
    /// never fit (the SDKs stop).
    fn rejected(rejection: &Rejection) -> Self {
        let message = rejection.to_string();
        let mut error = match rejection.refusal {
            Refusal::RateLimited { .. } => Self::new(ErrorCode::RateLimitExceeded, message),
            Refusal::Exhausted { .. } | Refusal::TooLarge { .. } => {
                Self::new(ErrorCode::InsufficientQuota, message).with_header(
                    HeaderName::from_static("x-should-retry"),
                    HeaderValue::from_static("false"),
                )
            }
        };
        if let Some(wait) = rejection.retry_after() {
            error = error.with_retry_after(wait);
        }
        error
            .headers
            .get_or_insert_default()
            .extend(rate_limit_headers(&rejection.snapshot));
        error
    }
}

/// How a response body cut short ends for the client: a stream gets one
/// last event with an OpenAI-shaped error and no `[DONE]` (the SDKs raise
/// on it instead of returning a truncated answer as if complete); a plain
/// body is aborted (the connection closes before its end).
pub fn cut_short(cut: Cut) -> Result<Bytes, std::io::Error> {
    let code = cut.error_code();
    let (stream, message) = match cut {
        Cut::Upstream { stream } => (
            stream,
            "The upstream failed after the response started; the answer is incomplete.",
        ),
        Cut::ShuttingDown { stream } => (
            stream,
            "The gateway is shutting down; the answer is incomplete.",
        ),
    };
    if !stream {
        return Err(std::io::Error::other(message));
    }
    let event = serde_json::to_string(&Envelope {
        error: Body {
            message,
            kind: code.error_type(),
            param: None,
            code: code.as_str(),
        },
    })
    .unwrap_or_default();
    Ok(Bytes::from(format!("data: {event}\n\n")))
}

static TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
static REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];

/// `x-ratelimit-{limit,remaining,reset}-{tokens,requests}` for the client's
/// tightest token window and its requests-per-minute limit (see
/// [`Snapshot::headline`]), on successes and 429s alike.
pub fn rate_limit_headers(snapshot: &Snapshot) -> HeaderMap {
    let mut headers = HeaderMap::new();
    set_rate_limit_headers(&mut headers, snapshot);
    headers
}

/// [`rate_limit_headers`], set in `headers` (a response's own: no map of
/// their own to build and copy, once per answer).
///
/// The six values are written into one buffer, each header a slice of it:
/// two allocations a response instead of six.
pub fn set_rate_limit_headers(headers: &mut HeaderMap, snapshot: &Snapshot) {
    let (tokens, requests) = snapshot.headline();
    if tokens.is_none() && requests.is_none() {
        // A client without limits: no headers, and no buffer for them.
        return;
    }
    let mut text = BytesMut::with_capacity(96);
    // Each name, with where its value ends in `text`.
    let mut fields: [(&'static HeaderName, usize); 6] = [(&TOKEN_HEADERS[0], 0); 6];
    let mut count = 0;
    for (names, status) in [(&TOKEN_HEADERS, tokens), (&REQUEST_HEADERS, requests)] {
        let Some(status) = status else { continue };
        let reset = status
            .reset_at
            .unwrap_or(snapshot.now)
            .saturating_sub(snapshot.now);
        let [limit, remaining, reset_name] = names;
        let mut number = itoa::Buffer::new();
        text.extend_from_slice(number.format(status.limit.unwrap_or(0)).as_bytes());
        fields[count] = (limit, text.len());
        text.extend_from_slice(number.format(status.remaining().unwrap_or(0)).as_bytes());
        fields[count + 1] = (remaining, text.len());
        crate::budget::write_duration(&mut text, reset);
        fields[count + 2] = (reset_name, text.len());
        count += 3;
    }
    let text = text.freeze();
    let mut start = 0;
    for &(name, end) in &fields[..count] {
        if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
            headers.insert(name, value);
        }
        start = end;
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Envelope {
            error: Body {
                message: &self.message,
                kind: self.code.error_type(),
                param: self.param.as_deref(),
                code: self.code.as_str(),
            },
        })
        .unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(extra) = self.headers {
            headers.extend(*extra);
        }
        // For the request log, which names the code.
        response.extensions_mut().insert(self.code);
        response
    }
}

/// Left on an upstream's answer relayed as it came (its status included),
/// so that no layer mistakes an upstream's 413 for its own.
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_openai_shape_with_param_and_retry_headers() {
        let response = ApiError::new(ErrorCode::RateLimitExceeded, "slow down")
            .with_param("model")
            .with_retry_after(Duration::from_millis(1500))
            .into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1500");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "slow down", "type": "requests", "param": "model", "code": "rate_limit_exceeded"}})
        );
    }
}
