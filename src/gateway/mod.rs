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
mod hit;
pub mod relay;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::window::Snapshot;
use crate::budget::{BudgetError, Budgets, Claim, Reservation, estimate};
use crate::cache::key::{KeyParts, fingerprint};
use crate::cache::replay::{Replayed, replay};
use crate::cache::{CacheKey, Permission, ResponseCache, Tee, Tenant};
use crate::catalog::{Client, Model, Team};
use crate::config::Config;
use crate::facts::{CacheOutcome, RequestFacts};
use crate::images::Images;
use crate::images::data_uri::is_data_uri;
use crate::openai::Api;
use crate::openai::chat::{ChatRequest, RequestError};
use crate::openai::embeddings::EmbeddingsRequest;
use crate::rewrite::{ImageRefusal, ImageWork};
use crate::routing::health::Health;
use crate::routing::queue::Queues;
use crate::spend::Draft;
use crate::upstream::{Forwarder, UpstreamError};
use hit::HitBody;
use relay::{Cut, ResponseBody};

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
    /// Replaced when a reload changes `[cache]`.
    pub cache: arc_swap::ArcSwap<ResponseCache>,
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

/// The answer on its way back: the upstream's, or one from the cache.
pub struct Answer {
    pub status: StatusCode,
    /// The upstream's response headers that may reach the client.
    pub headers: HeaderMap,
    /// The client's budget windows as of the reservation.
    pub budget: Snapshot,
    pub body: AnswerBody,
    /// The body's length when it is known before it is sent: an upstream's
    /// plain body relayed byte for byte, with the length it declared. The
    /// client then gets a `Content-Length` rather than a chunked body.
    pub length: Option<u64>,
}

/// An answer's body: relayed from the upstream, or replayed from the cache.
///
/// Both are boxed: a relayed body (824 bytes) made every `Answer` 1,288,
/// moved whole at each of the five levels it is returned through and
/// again into the response, where a box costs one allocation.
pub enum AnswerBody {
    Relayed(Box<ResponseBody>),
    Hit(Box<HitBody>),
}

impl AnswerBody {
    /// Writes the request's spend-log record when the body ends.
    pub fn record_to(&mut self, draft: Draft) {
        match self {
            Self::Relayed(body) => body.record_to(draft),
            Self::Hit(body) => body.record_to(draft),
        }
    }
}

impl Stream for AnswerBody {
    type Item = Result<Bytes, Cut>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Relayed(body) => Pin::new(body).poll_next(cx),
            Self::Hit(body) => Pin::new(body).poll_next(cx),
        }
    }
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

        let images = self.images.load_full();
        let images = ImageWork::new(&images, &incoming.body);
        let caching = Caching::of(self, &incoming, model, &images, facts);
        let (admission, mut key) = match &caching {
            Some(caching) => match caching.look_up(self, Asked::Chat(&request), facts).await? {
                Looked::Hit(answer) => return Ok(answer),
                Looked::Miss { admission, key } => (admission, key),
            },
            None => (None, None),
        };

        let count = counts_tokens(&incoming, model);
        let estimate = blocking_if(estimate::is_heavy(body.len(), &request, count), || {
            estimate::estimate_counting(body.len(), &request, model.max_output_tokens, count)
        });
        let mut reservation = self
            .reserve(&incoming, model, estimate, admission, facts)
            .await?;
        if !count {
            reservation.count_prompt_later(body.clone(), limits);
        }
        // With `no-cache`, the key is made for storing only, once the
        // request holds its budget.
        if let Some(caching) = caching.as_ref().filter(|c| c.permission.store)
            && key.is_none()
        {
            let made = caching.key(Asked::Chat(&request)).await;
            (facts.images, facts.image_bytes) = images.fetched();
            key = Some(made?);
        }
        let answer = self
            .attempts(config, &incoming, model, estimate, &images)
            .run(Parsed::Chat(request), reservation, facts)
            .await;
        attempted(answer, &images, caching, key, facts)
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
        let images = self.images.load_full();
        let images = ImageWork::new(&images, &incoming.body);
        let caching = Caching::of(self, &incoming, model, &images, facts);
        let asked = Asked::Embeddings(&request);
        let (admission, mut key) = match &caching {
            Some(caching) => match caching.look_up(self, asked, facts).await? {
                Looked::Hit(answer) => return Ok(answer),
                Looked::Miss { admission, key } => (admission, key),
            },
            None => (None, None),
        };
        let count = counts_tokens(&incoming, model);
        let estimate = blocking_if(count && body.len() > estimate::OFFLOAD_BYTES, || {
            estimate::embeddings_estimate(&request, count)
        });
        let reservation = self
            .reserve(&incoming, model, estimate, admission, facts)
            .await?;
        if let Some(caching) = caching.as_ref().filter(|c| c.permission.store)
            && key.is_none()
        {
            key = Some(caching.key(asked).await?);
        }
        let answer = self
            .attempts(config, &incoming, model, estimate, &images)
            .run(Parsed::Embeddings(request), reservation, facts)
            .await;
        attempted(answer, &images, caching, key, facts)
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
    /// `admission`: the request was counted already, by a cache lookup's
    /// reservation of nothing (see [`Budgets::reserve_admitted`]).
    async fn reserve(
        &self,
        incoming: &Incoming<'_>,
        model: &Model,
        estimate: estimate::Estimate,
        admission: Option<Reservation>,
        facts: &mut RequestFacts,
    ) -> Result<Reservation, ChatError> {
        let (client, team) = (incoming.client, incoming.team);
        facts.estimated_tokens = Some(estimate.total());
        facts.team = team.map(|team| Arc::clone(&team.name));
        let claim = Claim {
            client: &client.name,
            limits: &client.budget,
            team: team.map(|team| (&*team.name, &team.budget)),
            model: &model.name,
            estimate,
            price: model.reserve_price,
        };
        let reserving = async {
            match admission {
                Some(admission) => self.budgets.reserve_admitted(claim, admission).await,
                None => self.budgets.reserve(claim).await,
            }
        };
        let mut reservation = reserving
            .instrument(crate::traces::budget_span(estimate.total()))
            .await?;
        reservation.set_request_id(incoming.request_id);
        Ok(reservation)
    }

    /// The model's deployments, to be attempted with the request
    /// ([`attempt`]); the caller notes the images fetched on the way when
    /// the attempts end. (A plain function, not an `async` one around
    /// `run`: each `async` level is one more copy of the future below it.)
    fn attempts<'g>(
        &'g self,
        config: &'g Config,
        incoming: &'g Incoming<'_>,
        model: &'g Model,
        estimate: estimate::Estimate,
        images: &'g ImageWork<'_>,
    ) -> attempt::Attempts<'g> {
        attempt::Attempts {
            gateway: self,
            settings: &config.routing,
            model,
            client: incoming.client,
            estimate,
            body: &incoming.body,
            headers: incoming.headers,
            request_id: incoming.request_id,
            images,
            limits: config.server.request_limits,
        }
    }
}

/// The attempts' end, whatever it was: the images fetched on the way
/// noted, and an answer offered to the cache ([`keep_if_complete`]).
fn attempted(
    answer: Result<Answer, ChatError>,
    images: &ImageWork<'_>,
    caching: Option<Caching<'_>>,
    key: Option<CacheKey>,
    facts: &mut RequestFacts,
) -> Result<Answer, ChatError> {
    (facts.images, facts.image_bytes) = images.fetched();
    let mut answer = answer?;
    keep_if_complete(caching, key, &mut answer);
    Ok(answer)
}

/// An upstream's 200 is collected as it is relayed, and kept under `key`
/// if it ends complete (see `relay`).
fn keep_if_complete(caching: Option<Caching<'_>>, key: Option<CacheKey>, answer: &mut Answer) {
    if let (Some(caching), Some(key), AnswerBody::Relayed(relayed)) =
        (caching, key, &mut answer.body)
        && answer.status == StatusCode::OK
    {
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        relayed.cache_to(Tee::new(caching.cache, key, content_type));
    }
}

/// A request as the response cache looks at it: a chat completion (its
/// images keyed by their bytes, replayed streamed or not) or embeddings.
#[derive(Clone, Copy)]
enum Asked<'r, 'a> {
    Chat(&'r ChatRequest<'a>),
    Embeddings(&'r EmbeddingsRequest<'a>),
}

impl Asked<'_, '_> {
    fn api(self) -> Api {
        match self {
            Self::Chat(_) => Api::Chat,
            Self::Embeddings(_) => Api::Embeddings,
        }
    }

    /// How a hit is replayed: streamed, with the usage chunk.
    fn delivery(self) -> (bool, bool) {
        match self {
            Self::Chat(request) => (request.stream, request.include_usage),
            Self::Embeddings(_) => (false, false),
        }
    }
}

/// The response cache's part in one request of a model that
/// caches (with the cache on): what the request's `Cache-Control` lets it
/// do, and what its key is made of beside the request itself.
struct Caching<'a> {
    cache: Arc<ResponseCache>,
    permission: Permission,
    incoming: &'a Incoming<'a>,
    model: &'a Model,
    images: &'a ImageWork<'a>,
}

/// What a lookup found.
enum Looked {
    Hit(Answer),
    /// `admission`: the request as counted for the lookup; `key`: its key,
    /// to store its answer under (neither when nothing was looked up).
    Miss {
        admission: Option<Reservation>,
        key: Option<CacheKey>,
    },
}

impl<'a> Caching<'a> {
    /// `None` for a model that does not cache, or with the cache off. The
    /// request's answer says `x-iris-cache: miss` unless it is a hit.
    fn of(
        gateway: &Gateway,
        incoming: &'a Incoming<'a>,
        model: &'a Model,
        images: &'a ImageWork<'a>,
        facts: &mut RequestFacts,
    ) -> Option<Self> {
        let cache = gateway.cache.load_full();
        if !(cache.is_on() && model.cache) {
            return None;
        }
        let permission = Permission::from_cache_control(
            incoming
                .headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .map(HeaderValue::as_bytes),
        );
        facts.cache = Some(CacheOutcome::Miss);
        Some(Self {
            cache,
            permission,
            incoming,
            model,
            images,
        })
    }

    /// Looks the request up, unless its `Cache-Control` says not to. A
    /// lookup is admitted as a request of no tokens and no money: a hit
    /// counts for `requests_per_minute` and `max_concurrent` and costs
    /// nothing, and a client over those limits is refused, whatever the
    /// cache holds. Images to fetch for the key wait for the admission (a
    /// refused client must not make Iris fetch anything); without them, the
    /// key and the lookup run beside the admission, so that a hit costs one
    /// round trip to a shared store, not two.
    async fn look_up(
        &self,
        gateway: &Gateway,
        request: Asked<'_, '_>,
        facts: &mut RequestFacts,
    ) -> Result<Looked, ChatError> {
        let model = &self.model.name;
        if !self.permission.lookup {
            crate::cache::count_miss(model);
            return Ok(Looked::Miss {
                admission: None,
                key: None,
            });
        }
        let empty = estimate::Estimate::default();
        let admitting = gateway.reserve(self.incoming, self.model, empty, None, facts);
        let (admission, looked) = if self.fetches(request) {
            let admission = admitting.await?;
            (admission, self.find(request).await)
        } else {
            let (admission, looked) =
                futures_util::future::join(admitting, self.find(request)).await;
            (admission?, looked)
        };
        (facts.images, facts.image_bytes) = self.images.fetched();
        let (key, found) = looked?;
        let (stream, include_usage) = request.delivery();
        if let Some(replayed) = found.and_then(|entry| replay(&entry, stream, include_usage)) {
            crate::cache::count_hit(model);
            facts.cache = Some(CacheOutcome::Hit);
            return Ok(Looked::Hit(hit(replayed, admission)));
        }
        crate::cache::count_miss(model);
        Ok(Looked::Miss {
            admission: Some(admission),
            key: Some(key),
        })
    }

    /// The request's key, and what the cache holds under it.
    async fn find(
        &self,
        request: Asked<'_, '_>,
    ) -> Result<(CacheKey, Option<Arc<crate::cache::Entry>>), ChatError> {
        let key = self.key(request).await?;
        Ok((key, self.cache.get(&key).await))
    }

    /// Whether images are fetched for the key: when every deployment's
    /// upstream inlines them (so the request's attempt reuses the fetch).
    fn fetch_images(&self) -> bool {
        self.model
            .deployments
            .iter()
            .all(|d| d.upstream.images.inline)
    }

    /// Whether making the key fetches an image.
    fn fetches(&self, request: Asked<'_, '_>) -> bool {
        match request {
            Asked::Chat(request) => {
                self.fetch_images() && request.images().any(|(_, image)| !is_data_uri(&image.url))
            }
            Asked::Embeddings(_) => false,
        }
    }

    /// The request's cache key (see [`crate::cache::key`]); a chat
    /// request's images as their bytes' digests ([`ImageWork::digests`]),
    /// a refused image refusing the request, as the rewrite would have.
    async fn key(&self, request: Asked<'_, '_>) -> Result<CacheKey, ChatError> {
        let tenant = match self.incoming.team {
            Some(team) => Tenant::Team(&team.name),
            None => Tenant::Client(&self.incoming.client.name),
        };
        let heavy = self.incoming.body.len() > PARSE_INLINE_BYTES;
        let text = match request {
            Asked::Chat(request) => {
                let digests = self.images.digests(request, self.fetch_images()).await?;
                let at: Vec<_> = request.images().map(|(at, _)| at).zip(digests).collect();
                blocking_if(heavy, || {
                    request.to_cache_text(&mut |image| {
                        at.iter()
                            .find(|(a, _)| *a == image)
                            .and_then(|(_, digest)| *digest)
                            .map(|digest| format!("sha256:{}", hex::encode(digest)))
                    })
                })
            }
            Asked::Embeddings(request) => blocking_if(heavy, || request.to_cache_text()),
        };
        Ok(blocking_if(heavy, || {
            KeyParts {
                tenant,
                endpoint: request.api().as_str(),
                model: &self.model.name,
                fingerprint: fingerprint(self.model),
                request: &text,
            }
            .key()
        }))
    }
}

/// A hit's answer: the replayed body with its content type, the client's
/// windows as the admission left them.
fn hit(replayed: Replayed, admission: Reservation) -> Answer {
    // A stream is sent as one, as the upstream's was (chunked).
    let stream = replayed.is_stream();
    let Replayed { content_type, body } = replayed;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    Answer {
        status: StatusCode::OK,
        headers,
        budget: *admission.snapshot(),
        length: (!stream).then_some(body.len() as u64),
        body: AnswerBody::Hit(Box::new(HitBody::new(body, admission))),
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
