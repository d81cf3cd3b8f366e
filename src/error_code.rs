//! Every error code Iris emits, in one list: the codes of its HTTP error
//! answers, of the SSE error event that ends a stream cut short, and of the
//! spend log's records. Each has its status (none for a code that is never
//! an HTTP answer), OpenAI's error `type` and a line of documentation;
//! `docs/errors.md` is checked against [`ErrorCode::ALL`].
//!
//! At the bottom of the house, beside the wire types: the layers that
//! decide on a failure (images, the relay, the budget) name its code here,
//! and only the edge ([`crate::error`]) turns it into an answer.

use http::StatusCode;

/// Declares [`ErrorCode`], its [`ErrorCode::ALL`] list and its facts, one
/// line per code, so that a code cannot exist without being listed.
macro_rules! error_codes {
    ($(
        $(#[doc = $doc:literal])+
        $variant:ident = $code:literal, $status:expr, $kind:literal;
    )+) => {
        /// An error code Iris emits.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order of `docs/errors.md`'s table.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The code as clients and the spend log see it.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)+ }
            }

            /// The HTTP status of an answer with this code; `None` for a
            /// code only sent in an SSE error event or written to the
            /// spend log.
            pub const fn status(self) -> Option<StatusCode> {
                match self { $(ErrorCode::$variant => $status,)+ }
            }

            /// OpenAI's error `type` for it.
            pub const fn error_type(self) -> &'static str {
                match self { $(ErrorCode::$variant => $kind,)+ }
            }

            /// When it is emitted, in a sentence.
            pub const fn doc(self) -> &'static str {
                match self { $(ErrorCode::$variant => concat!($($doc),+),)+ }
            }
        }
    };
}

const fn status(code: u16) -> Option<StatusCode> {
    match StatusCode::from_u16(code) {
        Ok(status) => Some(status),
        Err(_) => None,
    }
}

error_codes! {
    /// The body is not JSON, not a chat completion request, or a field is
    /// of the wrong kind, repeated or over a limit.
    InvalidRequest = "invalid_request", status(400), "invalid_request_error";
    /// Anything under `/v1/responses`: the Responses API is not served.
    UnsupportedApi = "unsupported_api", status(400), "invalid_request_error";
    /// An image URL Iris will not fetch (scheme, address, redirect).
    ImageUrlForbidden = "image_url_forbidden", status(400), "invalid_request_error";
    /// Fetching an image failed (DNS, connection, status, time).
    ImageFetchFailed = "image_fetch_failed", status(400), "invalid_request_error";
    /// An image over `max_bytes` or `max_pixels`, or that cannot fit `max_image_bytes`.
    ImageTooLarge = "image_too_large", status(400), "invalid_request_error";
    /// Not an image Iris recognises, or one that cannot be decoded.
    ImageFormatUnsupported = "image_format_unsupported", status(400), "invalid_request_error";
    /// A malformed `data:` URI or invalid base64.
    InvalidImageData = "invalid_image_data", status(400), "invalid_request_error";
    /// More image parts than `images.max_images_per_request`.
    TooManyImages = "too_many_images", status(400), "invalid_request_error";
    /// No key, or one that belongs to no client.
    InvalidApiKey = "invalid_api_key", status(401), "authentication_error";
    /// The key's client has an `expires_at`, and it has passed.
    KeyExpired = "key_expired", status(401), "authentication_error";
    /// Too many wrong keys from the client's address.
    TooManyAuthFailures = "too_many_auth_failures", status(429), "requests";
    /// `POST /admin/clients`: the name is taken.
    ClientExists = "client_exists", status(409), "invalid_request_error";
    /// Changing a client from the config file through the admin API or CLI.
    ClientManagedByConfig = "client_managed_by_config", status(409), "invalid_request_error";
    /// No managed client of that name.
    ClientNotFound = "client_not_found", status(404), "invalid_request_error";
    /// `POST /admin/teams`: the name is taken (by a config or a managed team).
    TeamExists = "team_exists", status(409), "invalid_request_error";
    /// Changing or deleting a team from the config file through the admin API or CLI.
    TeamManagedByConfig = "team_managed_by_config", status(409), "invalid_request_error";
    /// Deleting a team that clients (config or managed) still name.
    TeamNotEmpty = "team_not_empty", status(409), "invalid_request_error";
    /// No managed team of that name.
    TeamNotFound = "team_not_found", status(404), "invalid_request_error";
    /// `GET /admin/usage` with the spend log off.
    SpendLogOff = "spend_log_off", status(409), "invalid_request_error";
    /// `GET /admin/usage`: the spend log failed or did not answer.
    SpendLogUnavailable = "spend_log_unavailable", status(503), "api_error";
    /// `POST /admin/reload`: the config file has problems.
    ConfigInvalid = "config_invalid", status(400), "invalid_request_error";
    /// `POST /admin/reload`: the change needs a restart.
    RestartRequired = "restart_required", status(409), "invalid_request_error";
    /// The model serves another API (`models[].endpoint`): a chat model
    /// asked for embeddings, or an embeddings model for a chat completion.
    ModelNotSupported = "model_not_supported", status(400), "invalid_request_error";
    /// The model is configured, but not in the client's `models`.
    ModelNotAllowed = "model_not_allowed", status(403), "permission_error";
    /// The request came from outside the client's `allowed_networks` (its
    /// address as `server.trusted_proxies` says).
    ClientNetworkForbidden = "client_network_forbidden", status(403), "permission_error";
    /// No model of that name is configured.
    ModelNotFound = "model_not_found", status(404), "invalid_request_error";
    /// No such path.
    NotFound = "not_found", status(404), "invalid_request_error";
    /// The path exists, but not with this method.
    MethodNotAllowed = "method_not_allowed", status(405), "invalid_request_error";
    /// The body did not arrive within `server.body_read_timeout_ms`.
    RequestTimeout = "request_timeout", status(408), "invalid_request_error";
    /// The body is longer than `server.max_body_bytes`.
    RequestTooLarge = "request_too_large", status(413), "invalid_request_error";
    /// A rate or per-minute limit has no room now.
    RateLimitExceeded = "rate_limit_exceeded", status(429), "requests";
    /// A daily or monthly budget is spent, or the request exceeds a whole window.
    InsufficientQuota = "insufficient_quota", status(429), "insufficient_quota";
    /// A bug in Iris while handling the request.
    InternalError = "internal_error", status(500), "api_error";
    /// Every deployment of the model is at its upstream pacing limits.
    UpstreamRateLimited = "upstream_rate_limited", status(429), "requests";
    /// No attempt got an answer from an upstream.
    UpstreamUnavailable = "upstream_unavailable", status(502), "api_error";
    /// The upstream refused Iris's own credentials (401 or 403).
    UpstreamAuthFailed = "upstream_auth_failed", status(502), "api_error";
    /// The budget store failed or did not answer in time.
    StoreUnavailable = "store_unavailable", status(503), "api_error";
    /// `server.max_connections` connections are open.
    TooManyConnections = "too_many_connections", status(503), "api_error";
    /// No response head within the upstream's `timeout_ms`.
    UpstreamTimeout = "upstream_timeout", status(504), "api_error";
    /// The upstream failed, stalled or stopped short after the response
    /// started: the stream's last event.
    UpstreamStreamInterrupted = "upstream_stream_interrupted", None, "server_error";
    /// The shutdown grace period ended while the response was streaming:
    /// the stream's last event.
    ServerShuttingDown = "server_shutting_down", None, "server_error";
    /// The client went away before the response ended (spend log only).
    ClientDisconnected = "client_disconnected", None, "server_error";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_with_a_type_that_fits_its_status() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(!code.doc().is_empty(), "{code}");
            let expected = match code.status().map(|s| s.as_u16()) {
                None => "server_error",
                Some(401) => "authentication_error",
                Some(403) => "permission_error",
                Some(429) if *code == ErrorCode::InsufficientQuota => "insufficient_quota",
                Some(429) => "requests",
                Some(s) if s >= 500 => "api_error",
                Some(_) => "invalid_request_error",
            };
            assert_eq!(code.error_type(), expected, "{code}");
        }
    }
}
