//! A chat completion from request to response, step by step as the
//! contract lists them: resolve the model and check the client may use it,
//! reserve the estimate against the client's budget, rewrite the request for
//! the upstream, forward it, and hand back a body that relays the answer and
//! settles the reservation when it ends ([`relay::ResponseBody`]).
//!
//! Knows nothing of the server's HTTP edge: failures are [`ChatError`]s,
//! which the edge renders.

pub mod relay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use tokio_util::sync::CancellationToken;

use crate::budget::window::Snapshot;
use crate::budget::{BudgetError, Budgets, estimate};
use crate::catalog::{Catalog, Client};
use crate::images::Images;
use crate::openai::chat::{ChatRequest, RequestError};
use crate::openai::stream::UsageTap;
use crate::rewrite::{self, ImageRefusal};
use crate::upstream::{self, Forwarder, UpstreamError};
use relay::ResponseBody;

/// The services every chat completion uses, built once per process.
pub struct Gateway {
    pub budgets: Budgets,
    pub images: Images,
    pub forwarder: Forwarder,
    /// Cancelled when shutdown's grace period is over: responses still
    /// streaming end (and settle) then.
    pub drain: CancellationToken,
}

/// Why a chat completion was answered by Iris rather than the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Your key is not allowed to use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Image(#[from] ImageRefusal),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// The upstream's answer on its way back.
pub struct Answer {
    pub status: StatusCode,
    /// The upstream's response headers that may reach the client.
    pub headers: HeaderMap,
    /// The client's budget windows as of the reservation.
    pub budget: Snapshot,
    pub body: ResponseBody,
}

/// What a request learned on its way, for its log line and metrics; kept
/// whether or not it succeeded.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    pub model: Option<String>,
    pub upstream: Option<String>,
    pub upstream_latency: Option<Duration>,
    /// Tokens reserved (prompt estimate + completion cap), also set when the
    /// budget refused the request.
    pub estimated_tokens: Option<u64>,
}

/// One chat completion request as received.
pub struct Incoming<'a> {
    pub client: &'a Client,
    pub body: Bytes,
    /// The client's request headers; the forwarder drops its credentials.
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
}

impl Gateway {
    pub async fn complete(
        &self,
        catalog: &Catalog,
        incoming: Incoming<'_>,
        trail: &mut Trail,
    ) -> Result<Answer, ChatError> {
        let Incoming {
            client,
            body,
            headers,
            request_id,
        } = incoming;
        let mut request = ChatRequest::parse(&body)?;

        let model = catalog
            .model(&request.model)
            .ok_or_else(|| ChatError::ModelNotFound(request.model.to_string()))?;
        if !client.may_use(&model.name) {
            return Err(ChatError::ModelNotAllowed(model.name.clone()));
        }
        trail.model = Some(model.name.clone());

        // Budget: reserve the estimate now, or refuse without calling
        // upstream. Every early return below drops the reservation, which
        // gives it back.
        let estimate = estimate::estimate_body(&body, &request, model.max_output_tokens).await;
        trail.estimated_tokens = Some(estimate.total());
        let mut reservation = self
            .budgets
            .reserve(&client.name, &client.budget, &model.name, estimate)
            .await?;
        reservation.set_request_id(request_id);

        let upstream = Arc::clone(&model.upstream);
        trail.upstream = Some(upstream.name.clone());
        rewrite::apply_image_policy(&self.images, &upstream.images, &mut request).await?;
        if let Some(name) = &model.upstream_model {
            request.set_model(name);
        }
        // Iris asks for the usage chunk to account streamed requests exactly;
        // the client only sees it if it asked for it too.
        let drop_usage_chunk = request.stream && upstream.stream_usage && !request.include_usage;
        if drop_usage_chunk {
            request.request_stream_usage();
        }
        let stream = request.stream;
        let upstream_body = if request.changed() {
            Bytes::from(request.to_body())
        } else {
            body.clone()
        };
        drop(request);

        let sent = Instant::now();
        let response = self.forwarder.send(&upstream, upstream_body, headers).await;
        trail.upstream_latency = Some(sent.elapsed());
        let response = response?;

        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let upstream_ok = status.is_success();
        // Only an event stream is read (and edited) event by event; anything
        // else, even in answer to `stream: true`, is a plain body.
        let event_stream = upstream_ok
            && stream
            && response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        let headers = upstream::response_headers(response.headers());
        let budget = *reservation.snapshot();
        let tap = UsageTap::new(event_stream, drop_usage_chunk && event_stream);
        let body = ResponseBody::new(
            response.bytes_stream().boxed(),
            tap,
            upstream.timeout,
            reservation,
            upstream_ok,
            self.drain.clone(),
        );
        Ok(Answer {
            status,
            headers,
            budget,
            body,
        })
    }
}
