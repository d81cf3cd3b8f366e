//! The response body on its way to the client: the upstream's bytes, chunk
//! by chunk as they arrive (never collected), watched for usage, and the
//! request's [`Reservation`], which travels with the body and is settled
//! exactly once, here, however the body ends:
//!
//! - the upstream body reached its end: settled from what it reported;
//! - the upstream body failed, stalled past the upstream's timeout, or (a
//!   stream) ended without saying it was done: settled from what was
//!   generated so far, and the client told so ([`Cut`]) rather than left
//!   with what looks like a complete answer;
//! - the process is shutting down and its grace period is over: settled
//!   from what was generated so far;
//! - the client went away (the body is dropped): settled from what was
//!   generated so far, and dropping the upstream response cancels the
//!   upstream request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::budget::Reservation;
use crate::openai::stream::UsageTap;
use crate::spend::{Draft, Ending};
use crate::upstream::error_chain;

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
    pub fn error_code(self) -> &'static str {
        match self {
            Self::Upstream { .. } => "upstream_stream_interrupted",
            Self::ShuttingDown { .. } => "server_shutting_down",
        }
    }
}

/// The spend log's error code for a response whose client went away first.
pub const CLIENT_DISCONNECTED: &str = "client_disconnected";

pub struct ResponseBody {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    tap: UsageTap,
    /// The longest wait for each chunk.
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Taken when the body ends: `None` means it has.
    reservation: Option<Reservation>,
    /// The upstream answered with success (an error body releases the
    /// reservation unless it reports usage).
    upstream_ok: bool,
    /// Resolves when shutdown's grace period is over.
    drained: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The request's spend-log record, finished when the body ends.
    spend: Option<Draft>,
    /// When the first byte went to the client.
    first_byte: Option<Instant>,
    /// The request's span (when traces are on), for the usage.
    span: tracing::Span,
}

impl ResponseBody {
    pub fn new(
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        tap: UsageTap,
        idle: Duration,
        reservation: Reservation,
        upstream_ok: bool,
        drain: CancellationToken,
    ) -> Self {
        Self {
            upstream,
            tap,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            reservation: Some(reservation),
            upstream_ok,
            drained: Box::pin(drain.cancelled_owned()),
            spend: None,
            first_byte: None,
            // Built in the handler, so the current span is the request's.
            span: crate::traces::current(),
        }
    }

    /// Writes the request's spend-log record when the body ends.
    pub fn record_to(&mut self, draft: Draft) {
        self.spend = Some(draft);
    }

    /// The one place the body ends: the tap reports how it went and the
    /// reservation is settled with it, then the spend log told what it was
    /// charged. `cut`: the error code of an end before the end. Returns
    /// bytes still to send.
    fn end(&mut self, complete: bool, cut: Option<&'static str>) -> Option<Bytes> {
        let reservation = self.reservation.take()?;
        let (unsent, outcome) = self.tap.finish(complete);
        crate::traces::record_usage(&self.span, &outcome);
        let unsent = unsent.filter(|_| complete);
        if unsent.is_some() {
            self.first_byte.get_or_insert_with(Instant::now);
        }
        match self.spend.take() {
            Some(draft) => {
                let error_code = match cut {
                    Some(code) => Some(code.to_owned()),
                    // An upstream error relayed: its own code.
                    None if !self.upstream_ok => outcome.error_code.clone(),
                    None => None,
                };
                let then = draft.finish(Ending {
                    error_code,
                    first_byte: self.first_byte,
                });
                reservation.settle_then(outcome, self.upstream_ok, then);
            }
            None => reservation.settle(outcome, self.upstream_ok),
        }
        unsent
    }
}

impl ResponseBody {
    /// Ends the body early: settles, and says why.
    fn cut(&mut self, why: fn(bool) -> Cut) -> Poll<Option<Result<Bytes, Cut>>> {
        let cut = why(self.tap.reads_events());
        self.end(false, Some(cut.error_code()));
        Poll::Ready(Some(Err(cut)))
    }
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, Cut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.reservation.is_none() {
            return Poll::Ready(None);
        }
        match this.upstream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let idle = this.idle;
                this.deadline.as_mut().reset(Instant::now() + idle);
                let out = this.tap.on_chunk(chunk);
                if !out.is_empty() {
                    this.first_byte.get_or_insert_with(Instant::now);
                }
                Poll::Ready(Some(Ok(out)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %error_chain(&e), "upstream body failed");
                this.cut(|stream| Cut::Upstream { stream })
            }
            Poll::Ready(None) => {
                if this.tap.reads_events() && !this.tap.said_done() {
                    tracing::warn!("upstream stream ended without [DONE]");
                    return this.cut(|stream| Cut::Upstream { stream });
                }
                Poll::Ready(this.end(true, None).map(Ok))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    tracing::warn!("upstream body stalled past the upstream timeout");
                    return this.cut(|stream| Cut::Upstream { stream });
                }
                if this.drained.as_mut().poll(cx).is_ready() {
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
        self.end(false, Some(CLIENT_DISCONNECTED));
    }
}
