//! A chat completion (or an embeddings request, the same way with less to
//! do) from request to response, step by step as the contract lists them: resolve the model and check the client may use it,
//! reserve the estimate against the client's budget, then attempt the
//! model's deployments ([`attempt`]): each attempt gets upstream room, the
//! request rewritten for that upstream, and is forwarded; the answer comes
//! back as a body that relays it and settles the reservations when it ends
//! ([`relay::ResponseBody`]).
//!
//! Knows nothing of the server's HTTP edge: failures are [`ChatError`]s,
//! which the edge renders.

mod attempt;
pub mod relay;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::window::Snapshot;
use crate::budget::{BudgetError, Budgets, Claim, Reservation, estimate};
use crate::catalog::{Client, Model, Team};
use crate::config::Config;
use crate::facts::RequestFacts;
use crate::images::Images;
use crate::openai::Api;
use crate::openai::chat::{ChatRequest, RequestError};
use crate::openai::embeddings::EmbeddingsRequest;
use crate::rewrite::{ImageRefusal, ImageWork};
use crate::routing::health::Health;
use crate::routing::queue::Queues;
use crate::upstream::{Forwarder, UpstreamError};
use relay::ResponseBody;

/// Bodies larger than this are parsed off the async threads: serde_json
/// reads a few hundred MB/s, so a larger body would hold a worker (and every
/// connection waiting on it) for longer than handing it off costs.
const PARSE_INLINE_BYTES: usize = 256 * 1024;

/// Runs `work`, CPU-bound and borrowing from the request, on this thread;
/// when `heavy`, first tells a multi-threaded runtime so that this worker's
/// other tasks move to another thread while it runs (a current-thread
/// runtime, as in tests, runs it in place).
fn blocking_if<R>(heavy: bool, work: impl FnOnce() -> R) -> R {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi_threaded {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The services every chat completion uses, built once per process.
pub struct Gateway {
    pub budgets: Budgets,
    /// Replaced whole when a reload changes `[images]`.
    pub images: arc_swap::ArcSwap<Images>,
    pub forwarder: Forwarder,
    /// Deployments' failures and cooldowns.
    pub health: std::sync::Arc<Health>,
    /// Requests waiting for upstream room.
    pub queues: Queues,
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
    /// The model serves another API.
    #[error(
        "The model `{model}` serves {}, not this API: call {} with it.",
        serves.as_str(),
        serves.route()
    )]
    ModelNotSupported { model: String, serves: Api },
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Image(#[from] ImageRefusal),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Every deployment of the model is at its upstream limits.
    #[error(
        "Every upstream of the model `{model}` is at its rate limit. Please try again in {}.",
        crate::budget::duration_string(u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX))
    )]
    NoUpstreamRoom {
        model: String,
        retry_after: Duration,
    },
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

/// One request as received.
pub struct Incoming<'a> {
    pub client: &'a Client,
    /// The client's team, whose budget the request also counts against.
    pub team: Option<&'a Team>,
    pub body: Bytes,
    /// The client's request headers; the forwarder drops its credentials.
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
}

impl Gateway {
    pub async fn complete(
        &self,
        config: &Config,
        incoming: Incoming<'_>,
        facts: &mut RequestFacts,
    ) -> Result<Answer, ChatError> {
        let limits = config.server.request_limits;
        let body = &incoming.body;
        let request = blocking_if(body.len() > PARSE_INLINE_BYTES, || {
            ChatRequest::parse_within(body, limits)
        })?;
        facts.stream = request.stream;
        let model = self.model_for(config, incoming.client, &request.model, Api::Chat, facts)?;
        crate::traces::record_operation(Api::Chat, &model.name, request.completion_cap);
        let count = counts_tokens(&incoming, model);
        let estimate = blocking_if(estimate::is_heavy(body.len(), &request, count), || {
            estimate::estimate_counting(body.len(), &request, model.max_output_tokens, count)
        });
        let mut reservation = self.reserve(&incoming, model, estimate, facts).await?;
        if !count {
            reservation.count_prompt_later(body.clone(), limits);
        }
        self.attempt(
            config,
            &incoming,
            model,
            Parsed::Chat(request),
            estimate,
            reservation,
            facts,
        )
        .await
    }

    /// `POST /v1/embeddings`: the same steps as a chat completion, with the
    /// input's tokens reserved and no images or streams.
    pub async fn embed(
        &self,
        config: &Config,
        incoming: Incoming<'_>,
        facts: &mut RequestFacts,
    ) -> Result<Answer, ChatError> {
        let body = &incoming.body;
        let request = blocking_if(body.len() > PARSE_INLINE_BYTES, || {
            EmbeddingsRequest::parse(body)
        })?;
        let model = self.model_for(
            config,
            incoming.client,
            &request.model,
            Api::Embeddings,
            facts,
        )?;
        crate::traces::record_operation(Api::Embeddings, &model.name, None);
        let count = counts_tokens(&incoming, model);
        let estimate = blocking_if(count && body.len() > estimate::OFFLOAD_BYTES, || {
            estimate::embeddings_estimate(&request, count)
        });
        let reservation = self.reserve(&incoming, model, estimate, facts).await?;
        let request = Parsed::Embeddings(request);
        self.attempt(
            config,
            &incoming,
            model,
            request,
            estimate,
            reservation,
            facts,
        )
        .await
    }

    /// The model a request names, if it exists, serves `api` and the
    /// client may use it.
    fn model_for<'c>(
        &self,
        config: &'c Config,
        client: &Client,
        name: &str,
        api: Api,
        facts: &mut RequestFacts,
    ) -> Result<&'c Model, ChatError> {
        let model = config
            .catalog
            .model(name)
            .ok_or_else(|| ChatError::ModelNotFound(name.to_owned()))?;
        if !client.may_use(&model.name) {
            return Err(ChatError::ModelNotAllowed(model.name.clone()));
        }
        if model.api != api {
            return Err(ChatError::ModelNotSupported {
                model: model.name.clone(),
                serves: model.api,
            });
        }
        facts.model = Some(model.name.clone());
        Ok(model)
    }

    /// Reserves `estimate` against the client's budget (and its team's),
    /// or refuses without calling upstream. Every early return after this
    /// drops the reservation, which gives it back; the answer's body
    /// settles it once, with the usage of the attempt that answered.
    async fn reserve(
        &self,
        incoming: &Incoming<'_>,
        model: &Model,
        estimate: estimate::Estimate,
        facts: &mut RequestFacts,
    ) -> Result<Reservation, ChatError> {
        let (client, team) = (incoming.client, incoming.team);
        facts.estimated_tokens = Some(estimate.total());
        facts.team = team.map(|team| std::sync::Arc::clone(&team.name));
        let mut reservation = self
            .budgets
            .reserve(Claim {
                client: &client.name,
                limits: &client.budget,
                team: team.map(|team| (&*team.name, &team.budget)),
                model: &model.name,
                estimate,
                price: model.reserve_price,
            })
            .instrument(crate::traces::budget_span(estimate.total()))
            .await?;
        reservation.set_request_id(incoming.request_id);
        Ok(reservation)
    }

    /// The model's deployments attempted with `request` ([`attempt`]).
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site per API, each a step of its own"
    )]
    async fn attempt(
        &self,
        config: &Config,
        incoming: &Incoming<'_>,
        model: &Model,
        request: Parsed<'_>,
        estimate: estimate::Estimate,
        reservation: Reservation,
        facts: &mut RequestFacts,
    ) -> Result<Answer, ChatError> {
        let images = self.images.load_full();
        let images = ImageWork::new(&images);
        let answer = attempt::Attempts {
            gateway: self,
            settings: &config.routing,
            model,
            client: incoming.client,
            estimate,
            body: &incoming.body,
            headers: incoming.headers,
            request_id: incoming.request_id,
            images: &images,
            limits: config.server.request_limits,
        }
        .run(request, reservation, facts)
        .await;
        (facts.images, facts.image_bytes) = images.fetched();
        answer
    }
}

/// Whether the request's prompt is tokenized: only where a token limit (the
/// client's, its team's, or an upstream's pacing) decides on the count.
fn counts_tokens(incoming: &Incoming<'_>, model: &Model) -> bool {
    incoming.client.budget.counts_tokens()
        || incoming
            .team
            .is_some_and(|team| team.budget.counts_tokens())
        || model
            .deployments
            .iter()
            .any(|d| d.upstream.pacing.counts_tokens())
}

/// A request as parsed, of the API it came in on.
pub(crate) enum Parsed<'a> {
    Chat(ChatRequest<'a>),
    Embeddings(EmbeddingsRequest<'a>),
}
