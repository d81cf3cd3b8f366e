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
use crate::catalog::Client;
use crate::config;
use crate::error::{self, ApiError, Relayed, rate_limit_headers};
use crate::gateway::{Answer, Incoming, Trail};
use crate::spend::{self, Draft, Record, SpendLog};
use crate::state::SharedState;
use futures_util::StreamExt;
use std::time::SystemTime;
use tokio::time::Instant;

pub async fn completions(
    State(state): State<SharedState>,
    Authenticated { client, config }: Authenticated,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut trail = Trail::default();
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let answer = match read_body(body, length, &config.server).await {
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
    let request_id = request_id.header_value().to_str().unwrap_or("");
    let mut response = match answer {
        Ok(mut answer) => {
            if state.spend.is_on() {
                let draft = draft(&state.spend, &client, request_id, &trail, started);
                answer.body.record_to(Draft {
                    status: answer.status.as_u16(),
                    ..draft
                });
            }
            respond(answer)
        }
        Err(error) => {
            if state.spend.is_on() {
                state
                    .spend
                    .record(refused(&client, request_id, &trail, &error, started));
            }
            error.into_response()
        }
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

/// The spend-log record of a relayed answer, but for how it ends.
fn draft(
    log: &SpendLog,
    client: &Client,
    request_id: &str,
    trail: &Trail,
    started: Instant,
) -> Draft {
    Draft {
        log: log.clone(),
        request_id: request_id.to_owned(),
        client: client.name.to_string(),
        model: trail.model.clone(),
        upstream: trail.upstream.clone(),
        upstream_model: trail.upstream_model.clone(),
        status: 0,
        stream: trail.stream,
        attempts: trail.attempts,
        images: trail.images,
        image_bytes: trail.image_bytes,
        started,
    }
}

/// The spend-log record of a request Iris answered with an error (nothing
/// charged: its reservation, if any, was given back).
fn refused(
    client: &Client,
    request_id: &str,
    trail: &Trail,
    error: &ApiError,
    started: Instant,
) -> Record {
    Record {
        at_ms: spend::unix_ms(SystemTime::now()),
        request_id: request_id.to_owned(),
        client: client.name.to_string(),
        model: trail.model.clone(),
        upstream: trail.upstream.clone(),
        upstream_model: trail.upstream_model.clone(),
        status: error.status.as_u16(),
        error_code: Some(error.code.as_str().to_owned()),
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        images: trail.images,
        image_bytes: trail.image_bytes,
        stream: trail.stream,
        attempts: trail.attempts,
        ttfb_ms: None,
        total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
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
///
/// A body that came in one chunk is kept as it is; one of several chunks
/// is gathered into a buffer sized once from `length` (its
/// `Content-Length`, at most the limit), so a large body is held once, not
/// as its chunks and their copy.
async fn read_body(
    mut body: Body,
    length: Option<usize>,
    server: &config::Server,
) -> Result<Bytes, ApiError> {
    let error = |e: axum::Error| {
        if caused_by::<BodyDeadlineElapsed>(&e) {
            ApiError::request_timeout(server.body_read_timeout)
        } else if caused_by::<LengthLimitError>(&e) {
            ApiError::request_too_large(server.max_body_bytes)
        } else {
            ApiError::invalid_request("The request body could not be read.")
        }
    };
    let mut next = async || -> Result<Option<Bytes>, ApiError> {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(error)?.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    };
    let Some(first) = next().await? else {
        return Ok(Bytes::new());
    };
    let Some(second) = next().await? else {
        return Ok(first);
    };
    let capacity = length
        .unwrap_or(0)
        .min(server.max_body_bytes)
        .max(first.len() + second.len());
    let mut gathered = bytes::BytesMut::with_capacity(capacity);
    gathered.extend_from_slice(&first);
    gathered.extend_from_slice(&second);
    drop((first, second));
    while let Some(data) = next().await? {
        gathered.extend_from_slice(&data);
    }
    Ok(gathered.freeze())
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
