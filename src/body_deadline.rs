//! One deadline for a whole request body, counted from the moment its
//! headers were read: a client sending a byte now and then cannot hold a
//! connection and a handler past it.
//!
//! tower-http's `RequestBodyTimeout` is not this: its timer restarts after
//! every frame, so a body trickled one byte per 29 s never ends under a
//! 30 s timeout. The handler that reads the body answers the
//! [`BodyDeadlineElapsed`] error 408 `request_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// A body that must end by a deadline.
pub struct DeadlineBody {
    inner: Body,
    limit: Duration,
    deadline: Instant,
    /// Armed the first time the body waits for data: a request whose body
    /// is never read (or is empty) never registers a timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    pub fn new(inner: Body, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: Instant::now() + limit,
            sleep: None,
        }
    }

    fn elapsed(&self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        Poll::Ready(Some(Err(Box::new(BodyDeadlineElapsed(self.limit)))))
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // What has arrived is delivered; only waiting for more is bounded.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => self.elapsed(),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body had not fully arrived by its deadline.
#[derive(Debug)]
pub struct BodyDeadlineElapsed(pub Duration);

impl std::fmt::Display for BodyDeadlineElapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyDeadlineElapsed {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that sends one byte every `every`, `count` times.
    fn trickle(every: Duration, count: usize) -> Body {
        let stream = futures_util::stream::unfold(0, move |sent| async move {
            if sent == count {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), sent + 1))
        });
        Body::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_fails_at_the_deadline_whatever_its_pace() {
        let started = Instant::now();
        let body = DeadlineBody::new(
            trickle(Duration::from_secs(2), 1000),
            Duration::from_secs(30),
        );
        let error = body
            .collect()
            .await
            .expect_err("the deadline ends the body");
        assert!(error.is::<BodyDeadlineElapsed>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_within_the_deadline_is_read_whole() {
        let body = DeadlineBody::new(trickle(Duration::from_secs(2), 10), Duration::from_secs(30));
        let bytes = body.collect().await.expect("in time").to_bytes();
        assert_eq!(&bytes[..], b"xxxxxxxxxx");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_headers_not_from_the_first_read() {
        let body = DeadlineBody::new(trickle(Duration::from_secs(2), 10), Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(25)).await;
        // 5 s left: the trickle's 20 s no longer fit.
        let error = body.collect().await.expect_err("too late");
        assert!(error.is::<BodyDeadlineElapsed>(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_already_received_is_delivered_however_late_it_is_read() {
        let body = DeadlineBody::new(Body::from("{}"), Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(31)).await;
        let bytes = body
            .collect()
            .await
            .expect("nothing to wait for")
            .to_bytes();
        assert_eq!(&bytes[..], b"{}");
    }
}
