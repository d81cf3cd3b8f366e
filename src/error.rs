//! The one error type Iris answers with, rendered in OpenAI's shape.
//!
//! Every error Iris produces itself goes through [`ApiError`]'s `IntoResponse`,
//! so the body shape, the `Content-Type` and the retry headers are decided in
//! one place. Errors an upstream returns are not `ApiError`s: they pass
//! through untouched.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answer: status, OpenAI error `type`, `code`, `param` and message,
/// plus the headers it must carry.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Extra headers, e.g. `retry-after`, `x-should-retry` and `x-ratelimit-*`
    /// (boxed: most errors have none, and errors travel in `Result`s).
    pub headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
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
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided. Send your Iris key as `Authorization: Bearer KEY`.",
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("Your key is not allowed to use the model `{model}`."),
        )
        .with_param("model")
    }

    pub fn not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("Unknown request URL: {method} {path}."),
        )
    }

    pub fn request_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("The request body is larger than this gateway accepts ({limit} bytes)."),
        )
    }

    /// OpenAI's error `type` for this status.
    fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS if self.code == "insufficient_quota" => {
                "insufficient_quota"
            }
            StatusCode::TOO_MANY_REQUESTS => "requests",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
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
                kind: self.error_type(),
                param: self.param.as_deref(),
                code: self.code,
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
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// Left on error responses so the request log can name the code.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_openai_shape_with_param_and_retry_headers() {
        let response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow down",
        )
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
