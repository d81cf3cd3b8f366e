//! `POST /v1/chat/completions`: the gateway's job, step by step as
//! CONTRACT.md lists it: authenticate, resolve the model, reserve budget,
//! rewrite for the upstream, forward, relay the answer, settle.

use std::time::Instant;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::Authenticated;
use crate::app::SharedState;
use crate::budget::estimate;
use crate::error::ApiError;
use crate::observe::{RequestId, RequestLog};
use crate::openai::chat::ChatRequest;
use crate::openai::stream::UsageTap;
use crate::upstream::{self, Relay};

pub async fn completions(
    State(state): State<SharedState>,
    Authenticated(client): Authenticated,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut log = RequestLog {
        client: Some(client.name.clone()),
        ..RequestLog::default()
    };
    let mut response = match handle(&state, &client, &headers, body, &request_id, &mut log).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response.extensions_mut().insert(log);
    response
}

async fn handle(
    state: &SharedState,
    client: &crate::catalog::Client,
    headers: &HeaderMap,
    body: Body,
    request_id: &RequestId,
    log: &mut RequestLog,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.config.server.max_body_bytes).await?;
    let mut request = ChatRequest::parse(&bytes)?;

    let model = state
        .catalog
        .model(&request.model)
        .ok_or_else(|| ApiError::model_not_found(&request.model))?;
    if !client.may_use(&model.name) {
        return Err(ApiError::model_not_allowed(&model.name));
    }
    log.model = Some(model.name.clone());
    // Budget: reserve the estimate now, or answer 429 without calling
    // upstream. Any early return below drops the reservation, releasing it.
    let estimate = estimate::estimate_body(&bytes, &request, model.max_output_tokens).await;
    log.estimated_tokens = Some(estimate.total());
    let mut reservation = state.budgets.reserve(client, &model.name, estimate).await?;
    reservation.set_request_id(request_id.0.to_str().unwrap_or(""));

    let upstream = &model.upstream;
    log.upstream = Some(upstream.name.clone());

    crate::rewrite::apply_image_policy(&state.images, &upstream.config, &mut request).await?;
    if let Some(name) = &model.upstream_model {
        request.set_model(name);
    }
    // Iris asks for the usage chunk to account streamed requests exactly; the
    // client only sees it if it asked for it too.
    let drop_usage_chunk = request.stream && upstream.config.stream_usage && !request.include_usage;
    if drop_usage_chunk {
        request.request_stream_usage();
    }
    let stream = request.stream;
    let upstream_body = if request.changed() {
        Bytes::from(request.to_body())
    } else {
        bytes.clone()
    };
    drop(request);

    let sent = Instant::now();
    let upstream_response = state.forwarder.send(upstream, upstream_body, headers).await;
    log.upstream_latency = Some(sent.elapsed());
    let upstream_response = upstream_response?;

    let status = StatusCode::from_u16(upstream_response.status().as_u16())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let response_headers = upstream::response_headers(upstream_response.headers());
    let rate_limit_headers = reservation.headers().clone();
    let upstream_ok = status.is_success();
    // Only an event stream is read (and edited) event by event; anything
    // else, even in answer to `stream: true`, is a plain body.
    let event_stream = upstream_ok
        && stream
        && upstream_response
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    // Settles when the body ends, however it ends (the relay's Drop included).
    let tap = UsageTap::new(event_stream, drop_usage_chunk && event_stream)
        .on_end(move |outcome| reservation.finish(outcome, upstream_ok));
    let relay = Relay::new(upstream_response.bytes_stream(), tap, upstream.timeout);
    let mut response = Response::new(Body::from_stream(relay));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    response.headers_mut().extend(rate_limit_headers);
    Ok(response)
}

/// Reads the request body, counting bytes as they arrive so a body without
/// (or with a lying) `Content-Length` cannot exceed `limit`.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::request_too_large(limit)),
        Err(_) => Err(ApiError::invalid_request(
            "The request body could not be read.",
        )),
    }
}
