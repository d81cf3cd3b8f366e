//! The response body on its way to the client: the upstream's bytes, chunk
//! by chunk as they arrive (never collected), watched for usage, and the
//! request's [`Reservation`], which travels with the body and is settled
//! exactly once, here, however the body ends:
//!
//! - the upstream body reached its end: settled from what it reported, and
//!   the response's last bytes wait until the settlement is persisted
//!   ([`crate::budget::store::Store::persisted`]) and its spend record
//!   committed ([`SpendLog::committed`]: in the same transaction with the
//!   SQLite store), so a client never holds a complete answer whose charge
//!   or record a crash could still lose. A plain body
//!   is sent one chunk behind, its last chunk held back until then (a JSON
//!   body is of no use before its end anyway, and nothing is copied); a
//!   stream holds back what comes once it said it is done (the finish
//!   chunk, the usage chunk, `[DONE]`), never a token before that;
//! - the upstream body failed, stalled past the upstream's timeout, or (a
//!   stream) ended without saying it was done: settled from what was
//!   generated so far, and the client told so ([`Cut`]) rather than left
//!   with what looks like a complete answer;
//! - the process is shutting down and its grace period is over: settled
//!   from what was generated so far;
//! - the client went away (the body is dropped): settled from what was
//!   generated so far, and dropping the upstream response cancels the
//!   upstream request.
//!
//! For a model that caches, the upstream's chunks are also collected (a
//! [`Tee`]); only an answer that reached its end is offered to the cache,
//! and its last bytes wait for the cache too, so a client that has the
//! whole answer finds it there with its next request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::budget::Reservation;
use crate::budget::store::StoreFuture;
use crate::cache::{Form, Tee};
use crate::error_code::ErrorCode;
use crate::openai::stream::UsageTap;
use crate::spend::{Draft, Ending, SpendLog};
use crate::upstream::{Chunks, error_chain};

/// Why a body ends before its end: the edge tells the client (a stream gets
/// one error event, then ends without `[DONE]`; a plain body is aborted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The upstream failed, stalled, or stopped short.
    Upstream { stream: bool },
    /// The server's shutdown grace period is over.
    ShuttingDown { stream: bool },
}

impl Cut {
    /// The error code the client is told (a stream, in its error event).
    pub fn error_code(self) -> ErrorCode {
        match self {
            Self::Upstream { .. } => ErrorCode::UpstreamStreamInterrupted,
            Self::ShuttingDown { .. } => ErrorCode::ServerShuttingDown,
        }
    }
}

pub struct ResponseBody {
    /// The first chunk, read before the answer was taken (see
    /// `Attempts::send`), then the upstream's body.
    first: Option<Bytes>,
    upstream: Chunks,
    tap: UsageTap,
    /// The longest wait for each chunk, counted from `idle_since`.
    idle: Duration,
    /// When the last chunk came (or the body started).
    idle_since: Instant,
    /// The waits below are made when the upstream first keeps the body
    /// waiting: a small answer, whole when its first chunk is read, never
    /// needs them (no timer, no allocation).
    deadline: Option<Pin<Box<Sleep>>>,
    /// `deadline` is set from `idle_since`.
    deadline_set: bool,
    drain: CancellationToken,
    /// Taken when the body ends: `None` means it has.
    reservation: Option<Reservation>,
    /// The upstream answered with success (an error body releases the
    /// reservation unless it reports usage).
    upstream_ok: bool,
    /// Resolves when shutdown's grace period is over.
    drained: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The request's spend-log record, finished when the body ends.
    spend: Option<Draft>,
    /// When the first byte went to the client.
    first_byte: Option<Instant>,
    /// The request's span (when traces are on), for the usage.
    span: tracing::Span,
    /// The response's last bytes, held back until its settlement is
    /// persisted.
    held: Bytes,
    /// A complete response's settlement being persisted: then `held` goes.
    persisting: Option<StoreFuture<()>>,
    /// An end before the end, told after the held-back bytes went out.
    cut_next: Option<Cut>,
    /// The answer collected for the response cache.
    tee: Option<Tee>,
}

impl ResponseBody {
    /// `(idle, since)`: the longest wait for each chunk, and when the
    /// upstream's answer came (the first wait counts from then).
    pub fn new(
        (first, upstream): (Option<Bytes>, Chunks),
        tap: UsageTap,
        (idle, since): (Duration, Instant),
        reservation: Reservation,
        upstream_ok: bool,
        drain: CancellationToken,
    ) -> Self {
        Self {
            first,
            upstream,
            tap,
            idle,
            idle_since: since,
            deadline: None,
            deadline_set: false,
            drain,
            reservation: Some(reservation),
            upstream_ok,
            drained: None,
            spend: None,
            first_byte: None,
            // Built in the handler, so the current span is the request's.
            span: crate::traces::current(),
            held: Bytes::new(),
            persisting: None,
            cut_next: None,
            tee: None,
        }
    }

    /// Collects the upstream's chunks for the response cache, which gets
    /// them if the answer ends complete.
    pub fn cache_to(&mut self, tee: Tee) {
        self.tee = Some(tee);
    }

    /// Writes the request's spend-log record when the body ends.
    pub fn record_to(&mut self, draft: Draft) {
        self.spend = Some(draft);
    }

    /// The one place the body ends: the tap reports how it went and the
    /// reservation is settled with it, then the spend log told what it was
    /// charged. `cut`: the error code of an end before the end. A complete
    /// end adds the bytes still to send to `held` and starts persisting the
    /// settlement, which they wait for.
    fn end(&mut self, complete: bool, cut: Option<ErrorCode>) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let (unsent, outcome) = self.tap.finish(complete);
        crate::traces::record_usage(&self.span, &outcome);
        if complete {
            if let Some(unsent) = unsent {
                self.hold(unsent);
            }
            if !self.held.is_empty() {
                self.first_byte.get_or_insert_with(Instant::now);
            }
        }
        let error_code = match cut {
            Some(code) => Some(code.as_str().to_owned()),
            // An upstream error relayed: its own code.
            None if !self.upstream_ok => outcome.error_code.clone(),
            None => None,
        };
        // A log written behind (in memory) has no commit to wait for.
        let log = self
            .spend
            .as_ref()
            .filter(|draft| draft.log.commits())
            .map(|draft| draft.log.clone());
        let then: Box<dyn FnOnce(crate::budget::Charged) + Send> = match self.spend.take() {
            Some(draft) => Box::new(draft.finish(Ending {
                error_code,
                first_byte: self.first_byte,
            })),
            None => Box::new(|_| {}),
        };
        let persisted = reservation.settle(outcome, self.upstream_ok, then);
        // Only a complete response's last bytes wait for it; otherwise the
        // settlement runs on, and nothing is left to hold back.
        if complete {
            let persisting = match log {
                Some(log) => with_record(persisted, log),
                None => persisted,
            };
            // The answer is offered to the cache (a stream as the events it
            // was read as) alongside.
            let tee = self
                .tee
                .take()
                .filter(|_| cut.is_none() && self.upstream_ok);
            self.persisting = Some(match tee {
                Some(tee) => {
                    let form = if self.tap.reads_events() {
                        Form::Stream
                    } else {
                        Form::Json
                    };
                    let storing = tee.finish(form);
                    Box::pin(async move {
                        let (persisted, ()) = futures_util::future::join(persisting, storing).await;
                        persisted
                    })
                }
                None => persisting,
            });
        } else if let Some(log) = log
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Nobody waits, but the record is committed (with the
            // settlement) now, when Iris noticed, rather than at the next
            // periodic commit.
            let committing = with_record(persisted, log);
            runtime.spawn(async move {
                if let Err(e) = committing.await {
                    tracing::error!("usage settled but not persisted: {e}");
                }
            });
        }
    }

    /// What of a chunk goes to the client now; the rest waits in `held`
    /// for the end (see the module's comment).
    fn hold_back(&mut self, out: Bytes) -> Bytes {
        if self.tap.reads_events() {
            if self.held.is_empty() && !self.tap.said_done() {
                return out;
            }
            self.hold(out);
            return Bytes::new();
        }
        if out.is_empty() {
            return out;
        }
        std::mem::replace(&mut self.held, out)
    }

    /// Adds `more` to what is held back (a copy only when both have bytes:
    /// a stream's last few small events).
    fn hold(&mut self, more: Bytes) {
        if self.held.is_empty() {
            self.held = more;
        } else if !more.is_empty() {
            let mut both = Vec::with_capacity(self.held.len() + more.len());
            both.extend_from_slice(&self.held);
            both.extend_from_slice(&more);
            self.held = Bytes::from(both);
        }
    }

    /// A complete body's end: once its settlement is persisted, the bytes
    /// held back for it, then the end.
    fn poll_persisting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Cut>>> {
        if let Some(persisting) = self.persisting.as_mut() {
            let Poll::Ready(persisted) = persisting.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            self.persisting = None;
            if let Err(e) = persisted {
                // The answer is complete: cutting it now would not unspend it.
                tracing::error!("usage settled but not persisted before the response ended: {e}");
            }
        }
        let last = std::mem::take(&mut self.held);
        Poll::Ready((!last.is_empty()).then_some(Ok(last)))
    }

    /// Ends the body early: settles, and says why (a stream first gets what
    /// it said before, held back for its end).
    fn cut(&mut self, why: fn(bool) -> Cut) -> Poll<Option<Result<Bytes, Cut>>> {
        let stream = self.tap.reads_events();
        let cut = why(stream);
        self.end(false, Some(cut.error_code()));
        if stream && !self.held.is_empty() {
            self.cut_next = Some(cut);
            return Poll::Ready(Some(Ok(std::mem::take(&mut self.held))));
        }
        Poll::Ready(Some(Err(cut)))
    }
}

/// The settlement's persistence, then the spend record's commit (the
/// record is taken when the settlement is worked out, so only then can its
/// commit be asked for; where it rides in the store's transaction, the
/// first already held it).
fn with_record(persisted: StoreFuture<()>, log: SpendLog) -> StoreFuture<()> {
    Box::pin(async move {
        let settled = persisted.await;
        if let Err(e) = log.committed_with_settlement().await {
            tracing::error!("spend record not committed before the response ended: {e}");
        }
        settled
    })
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, Cut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(cut) = this.cut_next.take() {
            return Poll::Ready(Some(Err(cut)));
        }
        if this.persisting.is_some() {
            return this.poll_persisting(cx);
        }
        if this.reservation.is_none() {
            return Poll::Ready(None);
        }
        let next = match this.first.take() {
            Some(first) => Poll::Ready(Some(Ok(first))),
            None => this.upstream.as_mut().poll_next(cx),
        };
        match next {
            Poll::Ready(Some(Ok(chunk))) => {
                this.idle_since = Instant::now();
                this.deadline_set = false;
                if let Some(tee) = &mut this.tee {
                    tee.push(&chunk);
                }
                let out = this.tap.on_chunk(chunk);
                let out = this.hold_back(out);
                if !out.is_empty() {
                    this.first_byte.get_or_insert(this.idle_since);
                }
                Poll::Ready(Some(Ok(out)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %error_chain("body error", &*e), "upstream body failed");
                this.cut(|stream| Cut::Upstream { stream })
            }
            Poll::Ready(None) => {
                if this.tap.reads_events() && !this.tap.said_done() {
                    tracing::warn!("upstream stream ended without [DONE]");
                    return this.cut(|stream| Cut::Upstream { stream });
                }
                this.end(true, None);
                this.poll_persisting(cx)
            }
            Poll::Pending => {
                let until = this.idle_since + this.idle;
                let deadline = match &mut this.deadline {
                    Some(deadline) => {
                        if !this.deadline_set {
                            deadline.as_mut().reset(until);
                        }
                        deadline
                    }
                    None => this
                        .deadline
                        .insert(Box::pin(tokio::time::sleep_until(until))),
                };
                this.deadline_set = true;
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::warn!("upstream body stalled past the upstream timeout");
                    return this.cut(|stream| Cut::Upstream { stream });
                }
                let drain = &this.drain;
                let drained = this
                    .drained
                    .get_or_insert_with(|| Box::pin(drain.clone().cancelled_owned()));
                if drained.as_mut().poll(cx).is_ready() {
                    tracing::warn!("response cut short: the server is shutting down");
                    return this.cut(|stream| Cut::ShuttingDown { stream });
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client hung up (or the server gave up on it) before the end:
        // still account what was relayed.
        self.end(false, Some(ErrorCode::ClientDisconnected));
    }
}
