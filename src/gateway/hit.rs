//! A cache hit's body: the replayed answer, sent in one piece, with the
//! request's admission (a reservation of no tokens and no money) held until
//! it is sent, so the hit counts for `max_concurrent` while it runs and for
//! `requests_per_minute` after. Its spend record (`cache_hit`, no tokens,
//! no cost) is taken before the bytes go and, like a relayed answer's, is
//! committed before they do; when the body ends the admission goes back
//! (its request stays counted).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::Instant;

use super::relay::Cut;
use crate::budget::store::StoreFuture;
use crate::budget::{Charged, Reservation};
use crate::error_code::ErrorCode;
use crate::spend::{Draft, Ending, SpendLog};

pub struct HitBody {
    /// `None` once sent.
    body: Option<Bytes>,
    /// `None` once the body ended.
    admission: Option<Reservation>,
    /// `None` once recorded (or with the spend log off).
    spend: Option<Draft>,
    /// The record's commit, which the bytes wait for.
    committing: Option<StoreFuture<()>>,
}

impl HitBody {
    pub fn new(body: Bytes, admission: Reservation) -> Self {
        Self {
            body: Some(body),
            admission: Some(admission),
            spend: None,
            committing: None,
        }
    }

    /// Writes the request's spend-log record when the body is sent.
    pub fn record_to(&mut self, draft: Draft) {
        self.spend = Some(draft);
    }

    /// Takes the hit's record, nothing charged: sent (`error_code` none),
    /// or the client gone first. Returns the log when its commits are
    /// waited for.
    fn record(&mut self, error_code: Option<ErrorCode>) -> Option<SpendLog> {
        let draft = self.spend.take()?;
        let log = draft.log.commits().then(|| draft.log.clone());
        draft.finish(Ending {
            error_code: error_code.map(|code| code.as_str().to_owned()),
            first_byte: Some(Instant::now()),
        })(Charged::default());
        log
    }
}

impl Stream for HitBody {
    type Item = Result<Bytes, Cut>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.body.is_some()
            && let Some(log) = this.record(None)
        {
            this.committing = Some(log.committed());
        }
        if let Some(committing) = this.committing.as_mut() {
            let Poll::Ready(committed) = committing.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            this.committing = None;
            if let Err(e) = committed {
                tracing::error!("spend record not committed before the response ended: {e}");
            }
        }
        match this.body.take() {
            Some(body) => Poll::Ready(Some(Ok(body))),
            None => {
                // Nothing to charge: everything but the request goes back.
                this.admission = None;
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for HitBody {
    fn drop(&mut self) {
        // The client went away before the body was asked for: its record
        // says so (the admission goes back with this body).
        self.record(Some(ErrorCode::ClientDisconnected));
    }
}
