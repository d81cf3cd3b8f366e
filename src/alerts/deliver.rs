//! The background side of alerts: for each alert queued, claim it in the
//! store, then POST it to the webhook, signed, until the receiver answers
//! 2xx or ten minutes have passed.
//!
//! Each alert runs as its own task, so a receiver that hangs delays only
//! its own alerts' retries, and nothing here is ever awaited by a request.
//! A redirect is not followed (the receiver is the operator's URL, not
//! wherever it points): a 3xx is a failed attempt like a 5xx.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::header::{self, HeaderValue};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Alert, AlertClaims, AlertSettings, count};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-iris-signature";

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
#[expect(clippy::expect_used, reason = "HMAC takes a key of any length")]
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When attempts happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The pause before the first retry; each later one doubles.
    pub first_retry: Duration,
    /// No attempt starts later than this after the first.
    pub give_up_after: Duration,
    /// One attempt (connecting, sending, the answer) at most.
    pub attempt_timeout: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(1),
            give_up_after: Duration::from_secs(600),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// The retries of one alert: doubling pauses, none starting past the end.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pause: Duration,
    give_up_at: Instant,
}

impl Backoff {
    pub fn new(schedule: &Schedule, start: Instant) -> Self {
        Self {
            pause: schedule.first_retry,
            give_up_at: start + schedule.give_up_after,
        }
    }

    /// After a failed attempt ending at `now`: when to try again (the
    /// last try at the end itself), or `None` to give up.
    pub fn next(&mut self, now: Instant) -> Option<Instant> {
        if now >= self.give_up_at {
            return None;
        }
        let at = (now + self.pause).min(self.give_up_at);
        self.pause = self.pause.saturating_mul(2);
        Some(at)
    }
}

/// What delivers alerts: the settings, the store to claim in, a client.
pub struct Delivery {
    settings: AlertSettings,
    claims: Arc<dyn AlertClaims>,
    schedule: Schedule,
    client: reqwest::Client,
}

impl Delivery {
    pub fn new(
        settings: AlertSettings,
        claims: Arc<dyn AlertClaims>,
        schedule: Schedule,
    ) -> Result<Self, String> {
        // reqwest panics building a client with no TLS provider installed.
        crate::init_tls();
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(schedule.attempt_timeout)
            .user_agent(concat!("iris-alerts/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("alerts: HTTP client: {e}"))?;
        Ok(Self {
            settings,
            claims,
            schedule,
            client,
        })
    }

    /// Delivers every alert received, each in a task of its own, until the
    /// queue's senders are gone.
    pub async fn run(self, mut received: mpsc::Receiver<Alert>) {
        let this = Arc::new(self);
        while let Some(alert) = received.recv().await {
            tokio::spawn(Arc::clone(&this).deliver(alert));
        }
    }

    /// Claims `alert`, then posts it until it is answered 2xx or the
    /// schedule gives up. The claim is retried on the same schedule while
    /// the store does not answer; a claim someone else holds ends it.
    async fn deliver(self: Arc<Self>, alert: Alert) {
        let key = alert.claim_key();
        let mut backoff = Backoff::new(&self.schedule, Instant::now());
        loop {
            let why = match self.claims.claim(&key, alert.claim_ttl()).await {
                Ok(true) => break,
                Ok(false) => {
                    count("claimed_elsewhere");
                    tracing::debug!(alert = %key, "budget alert already claimed");
                    return;
                }
                Err(e) => format!("the store did not answer its claim: {e}"),
            };
            if !self.wait(&mut backoff, &key, &why).await {
                return;
            }
        }
        let body = match serde_json::to_vec(&alert) {
            Ok(body) => body,
            Err(e) => {
                count("failed");
                tracing::error!(alert = %key, "budget alert not serialized: {e}");
                return;
            }
        };
        let signed = self
            .settings
            .secret
            .as_ref()
            .map(|secret| signature(secret.expose().as_bytes(), &body));
        loop {
            let why = match self.post(&body, signed.as_deref()).await {
                Ok(()) => {
                    count("delivered");
                    tracing::info!(
                        subject = %alert.subject.name,
                        kind = alert.subject.kind,
                        window = alert.window,
                        threshold = alert.threshold,
                        "budget alert delivered"
                    );
                    return;
                }
                Err(why) => why,
            };
            if !self.wait(&mut backoff, &key, &why).await {
                return;
            }
        }
    }

    /// After a failed attempt: waits for the next one (`true`, counted as
    /// a retry), or gives up (`false`, counted as failed).
    async fn wait(&self, backoff: &mut Backoff, key: &str, why: &str) -> bool {
        match backoff.next(Instant::now()) {
            Some(at) => {
                count("retried");
                tracing::warn!(alert = %key, "budget alert not delivered yet: {why}");
                tokio::time::sleep_until(at).await;
                true
            }
            None => {
                count("failed");
                tracing::error!(
                    alert = %key,
                    "budget alert given up after {} s: {why}",
                    self.schedule.give_up_after.as_secs()
                );
                false
            }
        }
    }

    /// One attempt: Ok on a 2xx answer.
    async fn post(&self, body: &[u8], signed: Option<&str>) -> Result<(), String> {
        let mut request = self
            .client
            .post(self.settings.webhook_url.clone())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .body(body.to_vec());
        if let Some(signed) = signed {
            request = request.header(SIGNATURE_HEADER, signed);
        }
        // Never the URL in the error: it may carry a token.
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                format!(
                    "no answer within {} s",
                    self.schedule.attempt_timeout.as_secs()
                )
            } else {
                format!("{}", e.without_url())
            }
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test case 2.
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_double_and_stop_at_ten_minutes() {
        let start = Instant::now();
        let schedule = Schedule::default();
        let mut backoff = Backoff::new(&schedule, start);
        let mut now = start;
        let mut pauses = Vec::new();
        while let Some(at) = backoff.next(now) {
            pauses.push((at - now).as_secs());
            now = at;
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 128, 256, 89]);
        assert_eq!(
            now - start,
            schedule.give_up_after,
            "the last try at ten minutes"
        );
        // A slow attempt counts against the ten minutes too.
        let mut backoff = Backoff::new(&schedule, start);
        assert_eq!(
            backoff.next(start + Duration::from_secs(598)),
            Some(start + Duration::from_secs(599))
        );
        assert_eq!(backoff.next(start + Duration::from_secs(600)), None);
    }
}
