//! Choosing the deployment of each attempt: the lowest priority tier with a
//! usable deployment, then by weight. A deployment is usable when it is not
//! cooling down, has upstream room, and (for a retry) has not been tried in
//! this request yet, where another one can be; when every deployment is
//! cooling down, they are all used anyway, so that a model is never
//! unavailable merely because its only upstream had a bad minute (Envoy's
//! "panic threshold" does the same).

use tokio::time::Instant;

use super::health::Health;
use crate::catalog::Deployment;

/// The attempts of one request over a model's deployments.
pub struct Selector<'a> {
    deployments: &'a [Deployment],
    /// What this request did with each deployment (one allocation for all).
    slots: Vec<Slot>,
}

/// What a request did with one deployment.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Attempts made on it.
    tried: u32,
    /// No upstream room right now (cleared when the request waits).
    full: bool,
    /// Not to be tried again (its Retry-After is too long).
    given_up: bool,
    /// Not to be tried again before then (its Retry-After).
    retry_at: Option<Instant>,
}

impl<'a> Selector<'a> {
    pub fn new(deployments: &'a [Deployment]) -> Self {
        Self {
            deployments,
            slots: vec![Slot::default(); deployments.len()],
        }
    }

    pub fn deployment(&self, index: usize) -> &'a Deployment {
        &self.deployments[index]
    }

    /// Attempts already made on deployment `index`.
    pub fn tried(&self, index: usize) -> u32 {
        self.slots[index].tried
    }

    pub fn attempted(&mut self, index: usize) {
        self.slots[index].tried += 1;
    }

    /// When deployment `index`'s upstream asked to be tried again, if it did.
    pub fn retry_at(&self, index: usize) -> Option<Instant> {
        self.slots[index].retry_at
    }

    /// Deployment `index`'s upstream asked not to be tried again before `at`.
    pub fn set_retry_at(&mut self, index: usize, at: Instant) {
        self.slots[index].retry_at = Some(at);
    }

    /// Deployment `index` has no upstream room: skip it until [`Self::waited`].
    pub fn full(&mut self, index: usize) {
        self.slots[index].full = true;
    }

    /// Deployment `index` is not tried again in this request.
    pub fn give_up(&mut self, index: usize) {
        self.slots[index].given_up = true;
    }

    /// Whether every deployment was given up.
    pub fn exhausted(&self) -> bool {
        self.slots.iter().all(|slot| slot.given_up)
    }

    /// Whether a deployment other than `index` was not given up.
    pub fn open_besides(&self, index: usize) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(i, slot)| i != index && !slot.given_up)
    }

    /// After waiting for room: every deployment may have some again.
    pub fn waited(&mut self) {
        for slot in &mut self.slots {
            slot.full = false;
        }
    }

    /// The next deployment to try, or `None` when every one is full (or
    /// given up).
    pub fn next(&self, health: &Health) -> Option<usize> {
        let now = Instant::now();
        let open: Vec<usize> = (0..self.deployments.len())
            .filter(|&i| !self.slots[i].full && !self.slots[i].given_up)
            .collect();
        if open.is_empty() {
            return None;
        }
        let healthy: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| {
                health
                    .cooling_until(&self.deployments[i].key, now)
                    .is_none()
            })
            .collect();
        // Every open deployment cooling down: use them anyway.
        let usable = if healthy.is_empty() { open } else { healthy };
        let untried: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| self.slots[i].tried == 0)
            .collect();
        let pool = if untried.is_empty() { usable } else { untried };
        let tier = pool.iter().map(|&i| self.deployments[i].priority).min()?;
        let candidates: Vec<usize> = pool
            .into_iter()
            .filter(|&i| self.deployments[i].priority == tier)
            .collect();
        Some(self.by_weight(&candidates))
    }

    /// One of `candidates`, each as likely as its weight.
    fn by_weight(&self, candidates: &[usize]) -> usize {
        let total: u64 = candidates
            .iter()
            .map(|&i| u64::from(self.deployments[i].weight))
            .sum();
        if candidates.len() == 1 || total == 0 {
            return candidates[0];
        }
        let mut point = getrandom::u64().unwrap_or(0) % total;
        for &i in candidates {
            let weight = u64::from(self.deployments[i].weight);
            if point < weight {
                return i;
            }
            point -= weight;
        }
        candidates[candidates.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::routing::{Failure, RoutingSettings};

    fn deployments(spec: &[(&str, u32, u32)]) -> Vec<Deployment> {
        let config = crate::config::parse(
            &format!(
                "{}\n[[models]]\nname = \"m\"\ndeployments = [{}]\n",
                spec.iter()
                    .map(|(name, ..)| format!(
                        "[[upstreams]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:1/v1\"\n"
                    ))
                    .collect::<String>(),
                spec.iter()
                    .map(|(name, weight, priority)| format!(
                        "{{ upstream = \"{name}\", weight = {weight}, priority = {priority} }}"
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &|_| None,
        )
        .expect("config");
        let model = config.catalog.model("m").expect("model");
        model
            .deployments
            .iter()
            .map(|d| Deployment {
                upstream: Arc::clone(&d.upstream),
                upstream_model: d.upstream_model.clone(),
                weight: d.weight,
                priority: d.priority,
                key: Arc::clone(&d.key),
                price: d.price,
            })
            .collect()
    }

    fn health() -> Health {
        Health::new(None)
    }

    #[tokio::test]
    async fn weights_share_a_tier_and_lower_priorities_wait() {
        let deployments = deployments(&[("a", 2, 0), ("b", 1, 0), ("c", 5, 1)]);
        let health = health();
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            let selector = Selector::new(&deployments);
            counts[selector.next(&health).expect("one")] += 1;
        }
        assert_eq!(
            counts[2], 0,
            "the backup tier is not used while the first is healthy"
        );
        let share = f64::from(counts[0]) / 3000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.05, "{counts:?}");
    }

    #[tokio::test]
    async fn retries_go_elsewhere_first_then_to_the_next_tier() {
        let deployments = deployments(&[("a", 1, 0), ("b", 1, 0), ("c", 1, 1)]);
        let health = health();
        let mut selector = Selector::new(&deployments);
        let first = selector.next(&health).expect("one");
        selector.attempted(first);
        let second = selector.next(&health).expect("one");
        assert_ne!(first, second);
        selector.attempted(second);
        assert_eq!(selector.next(&health), Some(2), "then the backup tier");
        selector.attempted(2);
        assert!(selector.next(&health).is_some(), "then again, with backoff");
        for i in 0..3 {
            selector.full(i);
        }
        assert_eq!(selector.next(&health), None, "no room anywhere");
        selector.waited();
        assert!(selector.next(&health).is_some());
    }

    #[tokio::test]
    async fn deployments_given_up_are_not_chosen_and_the_rest_stay_open() {
        let deployments = deployments(&[("a", 1, 0), ("b", 1, 0), ("c", 1, 1)]);
        let health = health();
        let mut selector = Selector::new(&deployments);
        assert!(selector.open_besides(0));
        selector.give_up(0);
        selector.give_up(1);
        assert_eq!(selector.next(&health), Some(2), "only c is left");
        assert!(!selector.open_besides(2), "nothing besides c");
        assert!(selector.open_besides(0), "c, besides a");
        assert!(!selector.exhausted());
        selector.give_up(2);
        assert!(selector.exhausted());
        assert_eq!(selector.next(&health), None);
    }

    #[tokio::test]
    async fn cooling_deployments_are_skipped_unless_all_are() {
        let deployments = deployments(&[("a", 1, 0), ("b", 1, 1)]);
        let health = health();
        let settings = RoutingSettings::default();
        assert!(
            health
                .failed(&deployments[0], Failure::Status(429), None, &settings)
                .is_some()
        );
        let selector = Selector::new(&deployments);
        for _ in 0..20 {
            assert_eq!(selector.next(&health), Some(1), "a cools down: b serves");
        }
        health.failed(&deployments[1], Failure::Status(401), None, &settings);
        assert!(
            selector.next(&health).is_some(),
            "both cooling: routed anyway"
        );
    }
}
