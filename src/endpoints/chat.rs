//! `POST /v1/chat/completions` and `POST /v1/embeddings`: the body read
//! within its limit, handed to the [`Gateway`](crate::gateway::Gateway), and
//! its answer (or error) sent back: the upstream's status, headers and
//! streamed body, plus the client's rate-limit headers.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError};

use super::Authenticated;
use crate::access_log::RequestLog;
use crate::body_deadline::BodyDeadlineElapsed;
use crate::client_addr;
use crate::config;
use crate::error::{self, ApiError, Relayed};
use crate::facts::RequestFacts;
use crate::gateway::{Answer, AnswerBody, Incoming};
use crate::openai::Api;
use crate::spend::{Draft, Record};
use crate::stamp::Stamp;
use crate::state::SharedState;
use futures_util::Stream;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

pub async fn completions(
    State(state): State<SharedState>,
    authenticated: Authenticated,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    forward(Api::Chat, state, authenticated, parts, body).await
}

pub async fn embeddings(
    State(state): State<SharedState>,
    authenticated: Authenticated,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    forward(Api::Embeddings, state, authenticated, parts, body).await
}

/// A `POST` to `api`'s route as the server's connections hand it over,
/// past the router (see [`crate::app::App`]): the key checked as the
/// [`Authenticated`] extractor checks it, then the same steps as
/// [`completions`] and [`embeddings`].
pub async fn serve(api: Api, state: SharedState, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    match Authenticated::from_request_parts(&mut parts, &state).await {
        Ok(authenticated) => forward(api, state, authenticated, parts, body).await,
        Err(refused) => refused.into_response(),
    }
}

// Names made once: `from_static` outside a constant parses the name at
// every call.
const X_IRIS_CACHE: HeaderName = HeaderName::from_static("x-iris-cache");
const X_IRIS_UPSTREAM: HeaderName = HeaderName::from_static("x-iris-upstream");
const X_IRIS_ATTEMPTS: HeaderName = HeaderName::from_static("x-iris-attempts");

/// A request to `api`, forwarded: the same steps whichever API it is.
///
/// The request is taken whole, its headers and extensions moved out of it
/// (axum's `HeaderMap` and `Extension` extractors would copy them).
async fn forward(
    api: Api,
    state: SharedState,
    Authenticated { client, config }: Authenticated,
    http::request::Parts {
        headers,
        extensions,
        ..
    }: http::request::Parts,
    body: Body,
) -> Response {
    let started = Instant::now();
    let client_addr = client_addr::of(&extensions);
    // The edge gave every request its id.
    let request_id = Stamp::request_id(&extensions);
    let mut facts = RequestFacts::new(request_id, api, &client.name, client_addr);
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let answer = match read_body(body, length, &config.server).await {
        Ok(body) => {
            let team = client
                .team
                .as_deref()
                .and_then(|name| state.team(&config, name));
            let incoming = Incoming {
                client: &client,
                team: team.as_deref(),
                body,
                headers: &headers,
                request_id,
            };
            let gateway = &state.gateway;
            // Boxed: the gateway's future is most of a request's state, and
            // held inline it would make the future of each step above it
            // (this one, the edge's, the connection's) that much larger,
            // and each of those is copied whole when it is made.
            match api {
                Api::Chat => Box::pin(gateway.complete(&config, incoming, &mut facts)).await,
                Api::Embeddings => Box::pin(gateway.embed(&config, incoming, &mut facts)).await,
            }
            .map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    let facts = Arc::new(facts);
    let mut response = match answer {
        Ok(mut answer) => {
            if state.spend.is_on() {
                answer.body.record_to(Draft {
                    log: state.spend.clone(),
                    facts: Arc::clone(&facts),
                    status: answer.status.as_u16(),
                    started,
                });
            }
            respond(answer)
        }
        Err(error) => {
            if state.spend.is_on() {
                state.spend.record(Record::refused(
                    Arc::clone(&facts),
                    error.status.as_u16(),
                    error.code.as_str(),
                    started,
                ));
                // Like a relayed answer's, the record is committed before
                // the answer goes (a group commit with every other).
                if let Err(e) = state.spend.committed().await {
                    tracing::error!("spend record not committed before the response: {e}");
                }
            }
            error.into_response()
        }
    };
    // Whether the response cache answered, for a model that caches.
    if let Some(cache) = facts.cache {
        response
            .headers_mut()
            .insert(X_IRIS_CACHE, HeaderValue::from_static(cache.as_str()));
    }
    // Which deployment answered (or was tried last), and after how many attempts.
    if facts.attempts > 0 {
        let headers = response.headers_mut();
        if let Some(value) = facts
            .upstream
            .as_deref()
            .and_then(|name| HeaderValue::from_str(name).ok())
        {
            headers.insert(X_IRIS_UPSTREAM, value);
        }
        headers.insert(X_IRIS_ATTEMPTS, HeaderValue::from(facts.attempts));
    }
    response.extensions_mut().insert(RequestLog(facts));
    response
}

fn respond(answer: Answer) -> Response {
    let Answer {
        status,
        headers,
        budget,
        body,
        length,
    } = answer;
    let mut response = Response::new(Body::new(AnswerHttpBody { body, length }));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    error::set_rate_limit_headers(response.headers_mut(), &budget);
    response.extensions_mut().insert(Relayed);
    response
}

/// An answer's body as hyper sends it: its length when known (so the
/// client gets a `Content-Length`), and an end before the end told as
/// [`error::cut_short`] says (an error event, or an aborted body).
struct AnswerHttpBody {
    body: AnswerBody,
    length: Option<u64>,
}

impl http_body::Body for AnswerHttpBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.body).poll_next(cx).map(|item| {
            item.map(|item| match item {
                Ok(bytes) => Ok(Frame::data(bytes)),
                Err(cut) => error::cut_short(cut).map(Frame::data),
            })
        })
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
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
