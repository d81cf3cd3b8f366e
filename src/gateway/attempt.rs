//! The attempts of one request over its model's deployments:
//! retries before the first response byte only, on `retry_on` failures,
//! other deployments first, backoff (or the upstream's Retry-After) before
//! the same one again, all within the first upstream's timeout; upstream
//! room reserved per attempt, waited for fairly when there is none.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, header};
use tokio::time::Instant;
use tracing::Instrument;

use super::relay::ResponseBody;
use super::{Answer, AnswerBody, ChatError, Gateway, Parsed};
use crate::budget::estimate::Estimate;
use crate::budget::{BudgetError, NoRoom, Reservation};
use crate::catalog::{Client, Deployment, Model};
use crate::facts::RequestFacts;
use crate::openai::Api;
use crate::openai::chat::{ChatRequest, RequestLimits};
use crate::openai::embeddings::EmbeddingsRequest;
use crate::openai::spliced::SplicedBody;
use crate::openai::stream::UsageTap;
use crate::rewrite::ImageWork;
use crate::routing::retry::{self, FailedAttempt, Next};
use crate::routing::select::Selector;
use crate::routing::{self, Failure, RoutingSettings};
use crate::secret::KeyMask;
use crate::upstream::{self, Reply, Upstream, UpstreamError};

/// How long the request whose turn it is waits before asking for room
/// again, at most: the store's own estimate is used when shorter.
const ROOM_POLL: Duration = Duration::from_millis(50);

pub(super) struct Attempts<'a> {
    pub gateway: &'a Gateway,
    pub settings: &'a RoutingSettings,
    pub model: &'a Model,
    pub client: &'a Client,
    pub estimate: Estimate,
    pub body: &'a Bytes,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
    pub images: &'a ImageWork<'a>,
    /// What the body was accepted under, to parse it again for a retry.
    pub limits: RequestLimits,
}

/// How an attempt ended without an answer to relay.
enum Failed {
    /// No response (refused, reset, timed out), or one that was not an answer.
    Unanswered(UpstreamError, Failure),
    /// An upstream error response, kept to pass through if it is the last.
    Status(Reply),
}

/// A request as one deployment's upstream takes it ([`Attempts::prepare`]).
struct Prepared {
    body: SplicedBody,
    relaying: Relaying,
}

/// How an answer is relayed to the client.
#[derive(Debug, Clone, Copy, Default)]
struct Relaying {
    /// The client asked for a stream (an event stream is then read event
    /// by event).
    stream: bool,
    /// The stream's usage chunk is there because Iris asked for it alone:
    /// removed on the way back.
    drop_usage_chunk: bool,
}

/// An upstream's answer as the attempt got it: the response, its first
/// chunk if it was read, and how to relay it.
struct Answered {
    reply: Reply,
    first: Option<Bytes>,
    relaying: Relaying,
    /// When the answer came (its head and first chunk): the relayed
    /// body's wait for the next chunk counts from then.
    at: Instant,
}

impl Attempts<'_> {
    /// Attempts the model's deployments until one answers or
    /// [`retry::after_failure`] says to stop; the decisions are
    /// [`crate::routing`]'s, this loop carries them out and keeps their
    /// state: the deadline, the [`Selector`] (what each deployment was
    /// tried, when it may be tried again), the last failure.
    pub async fn run(
        self,
        request: Parsed<'_>,
        mut reservation: Reservation,
        facts: &mut RequestFacts,
    ) -> Result<Answer, ChatError> {
        let started = Instant::now();
        // The first upstream's timeout, for every attempt together.
        let mut deadline = None;
        let mut selector = Selector::new(&self.model.deployments);
        let mut first = Some(request);
        let mut last: Option<(Failed, Arc<Upstream>)> = None;
        loop {
            let (index, room) = match self.place(&mut selector).await {
                Ok(placed) => placed,
                // Nothing left to try: the last failure stands.
                Err(_) if last.is_some() => break,
                Err(e) => return Err(e),
            };
            let deployment = selector.deployment(index);
            let deadline = *deadline.get_or_insert(started + deployment.upstream.timeout);
            if selector.tried(index) > 0 {
                let now = Instant::now();
                let Some(wait) = retry::wait_before_retry(
                    routing::backoff(self.settings.backoff, selector.tried(index)),
                    selector
                        .retry_at(index)
                        .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
                    deadline.saturating_duration_since(now),
                ) else {
                    break;
                };
                tokio::time::sleep(wait).await;
            }
            selector.attempted(index);
            let (failed, span) = match self
                .attempt(deployment, first.take(), deadline, facts)
                .await?
            {
                Ok(answered) => {
                    reservation.link(room);
                    reservation.priced_at(deployment.price);
                    return Ok(self.answer(&deployment.upstream, answered, reservation));
                }
                Err(failed) => failed,
            };
            drop(room);
            let (failed, failure, retry_after) =
                self.failed(deployment, failed, &span, facts.attempts).await;
            let now = Instant::now();
            let next = retry::after_failure(
                &FailedAttempt {
                    failure,
                    retry_after,
                    attempts: facts.attempts,
                    left: deadline.saturating_duration_since(now),
                    others_open: selector.open_besides(index),
                },
                self.settings,
            );
            last = Some((failed, Arc::clone(&deployment.upstream)));
            match next {
                Next::Stop => break,
                Next::Retry { not_before } => {
                    if let Some(wait) = not_before {
                        selector.set_retry_at(index, now + wait);
                    }
                }
                Next::Elsewhere => selector.give_up(index),
            }
        }
        match last {
            // The last upstream error, as the upstream sent it.
            Some((Failed::Status(reply), upstream)) => {
                let answered = Answered {
                    reply,
                    first: None,
                    relaying: Relaying::default(),
                    at: Instant::now(),
                };
                Ok(self.answer(&upstream, answered, reservation))
            }
            Some((Failed::Unanswered(error, _), _)) => Err(error.into()),
            None => Err(ChatError::Upstream(UpstreamError::Unreachable {
                upstream: self.model.primary().name.clone(),
            })),
        }
    }

    /// One attempt on `deployment`, noted in the request's facts: `request`
    /// (or, for a retry, the body parsed again) prepared for its upstream
    /// and sent, within what is left until `deadline`. An attempt that
    /// failed comes back with its span, for [`Self::failed`]; an error is
    /// the request's own (its images refused, say): no retry helps.
    async fn attempt(
        &self,
        deployment: &Deployment,
        request: Option<Parsed<'_>>,
        deadline: Instant,
        facts: &mut RequestFacts,
    ) -> Result<Result<Answered, (Failed, tracing::Span)>, ChatError> {
        let upstream = &deployment.upstream;
        facts.attempts += 1;
        facts.upstream = Some(upstream.name.clone());
        facts.upstream_model = Some(
            deployment
                .upstream_model
                .clone()
                .unwrap_or_else(|| self.model.name.clone()),
        );
        let request = match request {
            Some(request) => request,
            // A retry: the same body, parsed again (it parsed before).
            None => super::blocking_if(self.body.len() > super::PARSE_INLINE_BYTES, || match self
                .model
                .api
            {
                Api::Chat => ChatRequest::parse_within(self.body, self.limits).map(Parsed::Chat),
                Api::Embeddings => EmbeddingsRequest::parse(self.body).map(Parsed::Embeddings),
            })?,
        };
        let Prepared { body, relaying } = self.prepare(deployment, request).await?;
        let sent = Instant::now();
        let remaining = deadline.saturating_duration_since(sent);
        let span = crate::traces::attempt_span(
            self.model.api,
            deployment,
            &self.model.name,
            facts.attempts,
        );
        let outcome = self
            .send(upstream, body, relaying.stream, remaining)
            .instrument(span.clone())
            .await;
        // One reading of the clock for the latency, the health's count
        // and the relayed body's first wait.
        let at = Instant::now();
        facts.upstream_latency = Some(at.saturating_duration_since(sent));
        Ok(match outcome {
            Ok((reply, first)) => {
                count_attempt(upstream, "ok");
                crate::traces::record_attempt(&span, "ok", Some(reply.status.as_u16()));
                self.gateway.health.attempted(&deployment.key, false, at);
                Ok(Answered {
                    reply,
                    first,
                    relaying,
                    at,
                })
            }
            Err(failed) => Err((failed, span)),
        })
    }

    /// A failed attempt counted, traced, told to the deployment's health
    /// and logged. Returns the failure to keep for the client, why it
    /// failed, and the wait its upstream asked for.
    async fn failed(
        &self,
        deployment: &Deployment,
        failed: Failed,
        span: &tracing::Span,
        attempt: u32,
    ) -> (Failed, Failure, Option<Duration>) {
        let upstream = &deployment.upstream;
        let (kind, retry_after) = match &failed {
            Failed::Unanswered(_, kind) => (*kind, None),
            Failed::Status(response) => (
                Failure::Status(response.status.as_u16()),
                routing::retry_after(&response.headers),
            ),
        };
        count_attempt(upstream, &kind.label());
        let status = match kind {
            Failure::Status(status) => Some(status),
            _ => None,
        };
        crate::traces::record_attempt(span, &kind.label(), status);
        let counts = match kind {
            Failure::Status(status) => routing::unhealthy(status),
            _ => true,
        };
        // A 4xx other than 401/403/429 is the request's fault, not the upstream's.
        self.gateway
            .health
            .attempted(&deployment.key, counts, Instant::now());
        if counts {
            self.gateway
                .health
                .failed(deployment, kind, retry_after, self.settings);
        }
        // An upstream that refuses Iris's own credentials: the client
        // gets Iris's 502, never the upstream's body (it may echo the
        // key); the body, masked, goes on this attempt's log line.
        let (failed, refusal) = match failed {
            Failed::Status(reply) if upstream::refuses_credentials(reply.status) => {
                let (error, body) = credentials_refused(upstream, reply).await;
                (Failed::Unanswered(error, kind), Some(body))
            }
            failed => (failed, None),
        };
        tracing::warn!(
            request_id = self.request_id,
            upstream = %upstream.name,
            attempt,
            outcome = %kind.label(),
            body = refusal.as_deref(),
            "upstream attempt failed"
        );
        (failed, kind, retry_after)
    }

    /// A deployment with upstream room, and that room; waits for it in the
    /// model's queue when there is none (at most `max_queue`).
    async fn place(
        &self,
        selector: &mut Selector<'_>,
    ) -> Result<(usize, Option<Reservation>), ChatError> {
        let mut waiting: Option<(crate::routing::queue::Ticket, Instant)> = None;
        loop {
            let mut retry_after: Option<Duration> = None;
            while let Some(index) = selector.next(&self.gateway.health) {
                let upstream = &selector.deployment(index).upstream;
                match self
                    .gateway
                    .budgets
                    .reserve_room(&upstream.name, &upstream.pacing, self.estimate)
                    .await
                {
                    Ok(room) => {
                        if let Some((_, since)) = waiting {
                            crate::metrics::UPSTREAM_QUEUE_WAIT
                                .histogram(&[("model", &self.model.name)])
                                .record(since.elapsed().as_secs_f64());
                        }
                        return Ok((index, room));
                    }
                    Err(NoRoom::Full { retry_after: wait }) => {
                        retry_after = match (retry_after, wait) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        selector.full(index);
                    }
                    Err(NoRoom::StoreUnavailable) => {
                        return Err(ChatError::Budget(BudgetError::StoreUnavailable));
                    }
                }
            }
            if selector.exhausted() {
                return Err(self.no_room(retry_after));
            }
            // No room anywhere: wait for it, our turn first.
            let (ticket, since) = match waiting.take() {
                Some(waiting) => waiting,
                None if self.settings.max_queue.is_zero() => {
                    return Err(self.no_room(retry_after));
                }
                None => (
                    self.gateway
                        .queues
                        .of(&self.model.name)
                        .join(&self.client.name),
                    Instant::now(),
                ),
            };
            let deadline = since + self.settings.max_queue;
            if tokio::time::timeout_at(deadline, ticket.turn())
                .await
                .is_err()
            {
                return Err(self.no_room(retry_after));
            }
            let pause = retry_after.unwrap_or(ROOM_POLL).min(ROOM_POLL);
            if Instant::now() + pause >= deadline {
                return Err(self.no_room(retry_after));
            }
            tokio::time::sleep(pause).await;
            selector.waited();
            waiting = Some((ticket, since));
        }
    }

    fn no_room(&self, retry_after: Option<Duration>) -> ChatError {
        ChatError::NoUpstreamRoom {
            model: self.model.name.clone(),
            retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
        }
    }

    /// The body as `deployment`'s upstream takes it: its image policy, its
    /// name for the model, the usage chunk asked for on streams.
    async fn prepare(
        &self,
        deployment: &Deployment,
        request: Parsed<'_>,
    ) -> Result<Prepared, ChatError> {
        let mut request = match request {
            Parsed::Chat(request) => request,
            Parsed::Embeddings(mut request) => {
                if let Some(name) = &deployment.upstream_model {
                    request.set_model(name);
                }
                let body = if request.changed() {
                    SplicedBody::from(request.to_body())
                } else {
                    SplicedBody::from(self.body.clone())
                };
                let relaying = Relaying::default();
                return Ok(Prepared { body, relaying });
            }
        };
        let upstream = &deployment.upstream;
        self.images.apply(&upstream.images, &mut request).await?;
        if let Some(name) = &deployment.upstream_model {
            request.set_model(name);
        }
        // Iris asks for the usage chunk to account streamed requests
        // exactly; the client only sees it if it asked for it too.
        let drop_usage_chunk = request.stream && upstream.stream_usage && !request.include_usage;
        if drop_usage_chunk {
            request.request_stream_usage();
        }
        let relaying = Relaying {
            stream: request.stream,
            drop_usage_chunk,
        };
        let body = if request.changed() {
            request.to_body(self.body)
        } else {
            SplicedBody::from(self.body.clone())
        };
        Ok(Prepared { body, relaying })
    }

    /// Sends one attempt and, on success, reads its first body chunk, so
    /// that an answer that is not one is a failed attempt (retried) rather
    /// than something a client already started to receive.
    async fn send(
        &self,
        upstream: &Upstream,
        body: SplicedBody,
        stream: bool,
        remaining: Duration,
    ) -> Result<(Reply, Option<Bytes>), Failed> {
        let timeout = upstream.timeout.min(remaining);
        // The attempt's trace context (this runs in the attempt's span).
        let mut trace = HeaderMap::new();
        crate::traces::inject(&mut trace);
        let response = self
            .gateway
            .forwarder
            .send(upstream, self.model.api, body, self.headers, trace, timeout)
            .await
            .map_err(|e| {
                let kind = match e {
                    UpstreamError::Timeout { .. } => Failure::Timeout,
                    _ => Failure::Connect,
                };
                Failed::Unanswered(e, kind)
            })?;
        if !response.status.is_success() {
            return Err(Failed::Status(response));
        }
        let event_stream = stream && is_event_stream(&response.headers);
        let invalid = |why: &str| {
            tracing::warn!(upstream = %upstream.name, "the upstream's 200 is not an answer: {why}");
            Failed::Unanswered(
                UpstreamError::Invalid {
                    upstream: upstream.name.clone(),
                },
                Failure::Invalid,
            )
        };
        let mut response = response;
        let first = match tokio::time::timeout(timeout, response.body.next()).await {
            Err(_) => {
                return Err(Failed::Unanswered(
                    UpstreamError::Timeout {
                        upstream: upstream.name.clone(),
                        after: timeout,
                    },
                    Failure::Timeout,
                ));
            }
            Ok(None) => return Err(invalid("an empty body")),
            Ok(Some(Err(_))) => {
                return Err(Failed::Unanswered(
                    UpstreamError::Unreachable {
                        upstream: upstream.name.clone(),
                    },
                    Failure::Connect,
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        if !looks_like_an_answer(&first, event_stream) {
            return Err(invalid(if event_stream {
                "not server-sent events"
            } else {
                "not JSON"
            }));
        }
        Ok((response, Some(first)))
    }

    fn answer(&self, upstream: &Upstream, answered: Answered, reservation: Reservation) -> Answer {
        let Answered {
            reply: response,
            first,
            relaying:
                Relaying {
                    stream,
                    drop_usage_chunk,
                },
            at,
        } = answered;
        let status = response.status;
        let upstream_ok = status.is_success();
        // Only an event stream is read (and edited) event by event; anything
        // else, even in answer to `stream: true`, is a plain body.
        let event_stream = upstream_ok && stream && is_event_stream(&response.headers);
        let key = upstream.api_key();
        let headers = upstream::response_headers(&response.headers, key);
        let budget = *reservation.snapshot();
        // An error passed through may echo the key Iris sent: blanked out
        // (a success's body is the model's, and is not searched).
        let mask = key
            .filter(|key| !upstream_ok && key.len() >= upstream::MIN_SEARCHED_KEY)
            .and_then(|key| KeyMask::new(key.as_bytes()));
        let body = match mask {
            Some(mask) => (None, upstream::masked(first, response.body, mask)),
            None => (first, response.body),
        };
        let tap = UsageTap::new(event_stream, drop_usage_chunk && event_stream);
        Answer {
            status,
            headers,
            budget,
            // Only an event stream is edited on the way.
            length: response.length.filter(|_| !event_stream),
            body: AnswerBody::Relayed(Box::new(ResponseBody::new(
                body,
                tap,
                (upstream.timeout, at),
                reservation,
                upstream_ok,
                self.gateway.drain.clone(),
            ))),
        }
    }
}

/// How long the body of an upstream's 401 or 403 is waited for, and how
/// much of it is read: it only goes to the log.
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(2);
const REFUSAL_BODY_LOGGED: usize = 2048;

/// The error the client gets for an upstream's refusal of Iris's
/// credentials, and the start of the upstream's body for the log, UTF-8
/// (lossy), credentials masked: Iris's key for it, bearer tokens,
/// key-shaped strings ([`crate::secret::mask_credentials`]). (The
/// operator is told what to check once per cooldown, by
/// [`crate::routing::health`].)
async fn credentials_refused(upstream: &Upstream, reply: Reply) -> (UpstreamError, String) {
    let status = reply.status.as_u16();
    let (start, cut) = reply
        .body_start(REFUSAL_BODY_LOGGED, REFUSAL_BODY_WAIT)
        .await;
    let mut text = String::from_utf8_lossy(&start).into_owned();
    if cut {
        // A token cut by the limit may be a key's start that no longer
        // looks like one: it goes, so that only whole tokens are judged.
        let whole =
            text.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c));
        text.truncate(whole.len());
        text.push_str(" …");
    }
    let body = crate::secret::mask_credentials(&text, upstream.api_key().as_slice());
    let error = UpstreamError::CredentialsRefused {
        upstream: upstream.name.clone(),
        status,
    };
    (error, body)
}

fn count_attempt(upstream: &Upstream, outcome: &str) {
    crate::metrics::UPSTREAM_ATTEMPTS
        .counter(&[("upstream", &upstream.name), ("outcome", outcome)])
        .increment(1);
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Whether the first chunk of a 200 can begin a chat completion: JSON (an
/// object) for a plain answer, server-sent events for a stream.
fn looks_like_an_answer(first: &[u8], event_stream: bool) -> bool {
    let text = first
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(first)
        .trim_ascii_start();
    if text.is_empty() {
        return true;
    }
    if !event_stream {
        return text[0] == b'{';
    }
    const FIELDS: [&[u8]; 5] = [b"data:", b":", b"event:", b"id:", b"retry:"];
    FIELDS
        .iter()
        .any(|field| text.starts_with(field) || field.starts_with(text))
}

#[cfg(test)]
mod tests {
    use super::looks_like_an_answer;

    #[test]
    fn answers_are_told_from_garbage_by_their_first_bytes() {
        assert!(looks_like_an_answer(b" {\"id\":1", false));
        assert!(!looks_like_an_answer(b"<html>", false));
        assert!(looks_like_an_answer(b"data: {}", true));
        assert!(looks_like_an_answer(b": keep-alive\n\n", true));
        assert!(looks_like_an_answer(b"da", true), "a prefix of a field");
        assert!(!looks_like_an_answer(b"{\"id\":1}", true));
        assert!(!looks_like_an_answer(b"Internal Server Error", true));
        assert!(looks_like_an_answer(b"   ", false));
    }
}
