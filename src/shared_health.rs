//! Deployment health shared between Iris instances: one instance's failures
//! and cooldowns seen by every instance, through a store they all reach.
//!
//! Routing's health keeps each instance's own view and writes to and reads
//! from the others' through this one trait; the budget store that several
//! instances share (Redis) implements it on the same connection. The
//! in-process stores share nothing, so with them there is no
//! [`SharedHealth`] at all and each instance's memory is the whole truth.
//! Here, below both, so that neither routing nor the budget stores import
//! the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// What every operation returns: `'static`, so routing can spawn it and
/// never wait (health is advice, not accounting).
pub type ShareFuture<T> = Pin<Box<dyn Future<Output = Result<T, ShareError>> + Send + 'static>>;

/// The shared store did not answer: the instance goes on with its own view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShareError(pub String);

/// Cooldowns and failure counts of deployments (named by their key,
/// `upstream/model`), shared by every instance on the same store.
pub trait SharedHealth: Send + Sync + 'static {
    /// Counts a failure of deployment `key` for every instance: at `allowed`
    /// failures within `window`, it cools down for `cooldown`.
    fn share_failure(
        &self,
        key: &str,
        window: Duration,
        allowed: u32,
        cooldown: Duration,
    ) -> ShareFuture<()>;

    /// Cools deployment `key` down for `length` for every instance (unless
    /// it already cools down longer).
    fn share_cooldown(&self, key: &str, length: Duration) -> ShareFuture<()>;

    /// For each key, how long its shared cooldown still runs.
    fn shared_cooldowns(&self, keys: &[Arc<str>]) -> ShareFuture<Vec<Option<Duration>>>;
}
