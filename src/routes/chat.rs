//! `POST /v1/chat/completions`: the body read within its limit, handed to
//! the [`Gateway`](crate::gateway::Gateway), and its answer (or error) sent
//! back: the upstream's status, headers and streamed body, plus the
//! client's rate-limit headers.

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError};
use tower_http::request_id::RequestId;

use super::Authenticated;
use crate::access_log::RequestLog;
use crate::body_deadline::BodyDeadlineElapsed;
use crate::config;
use crate::error::{self, ApiError, Relayed, rate_limit_headers};
use crate::gateway::{Answer, Incoming, Trail};
use crate::state::SharedState;
use futures_util::StreamExt;

pub async fn completions(
    State(state): State<SharedState>,
    Authenticated { client, config }: Authenticated,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut trail = Trail::default();
    let answer = match read_body(body, &config.server).await {
        Ok(body) => {
            let incoming = Incoming {
                client: &client,
                body,
                headers: &headers,
                request_id: request_id.header_value().to_str().unwrap_or(""),
            };
            state
                .gateway
                .complete(&config, incoming, &mut trail)
                .await
                .map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    let mut response = match answer {
        Ok(answer) => respond(answer),
        Err(error) => error.into_response(),
    };
    // Which deployment answered (or was tried last), and after how many attempts.
    if trail.attempts > 0 {
        let headers = response.headers_mut();
        if let Some(value) = trail
            .upstream
            .as_deref()
            .and_then(|name| HeaderValue::from_str(name).ok())
        {
            headers.insert(HeaderName::from_static("x-iris-upstream"), value);
        }
        headers.insert(
            HeaderName::from_static("x-iris-attempts"),
            HeaderValue::from(trail.attempts),
        );
    }
    response.extensions_mut().insert(RequestLog(trail));
    response
}

fn respond(answer: Answer) -> Response {
    let Answer {
        status,
        headers,
        budget,
        body,
    } = answer;
    let mut response = Response::new(Body::from_stream(body.map(|item| match item {
        Ok(bytes) => Ok(bytes),
        Err(cut) => error::cut_short(cut),
    })));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().extend(rate_limit_headers(&budget));
    response.extensions_mut().insert(Relayed);
    response
}

/// Reads the request body; the body limit layer counts bytes as they
/// arrive, so a body without (or with a lying) `Content-Length` cannot
/// exceed the limit either, and the deadline layer ends a body that has not
/// arrived in time.
async fn read_body(body: Body, server: &config::Server) -> Result<Bytes, ApiError> {
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if caused_by::<BodyDeadlineElapsed>(&e) => {
            Err(ApiError::request_timeout(server.body_read_timeout))
        }
        Err(e) if caused_by::<LengthLimitError>(&e) => {
            Err(ApiError::request_too_large(server.max_body_bytes))
        }
        Err(_) => Err(ApiError::invalid_request(
            "The request body could not be read.",
        )),
    }
}

/// Whether `E` is somewhere in `error`'s chain of causes.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<E>() {
            return true;
        }
        cause = e.source();
    }
    false
}
