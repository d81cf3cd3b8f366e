//! Waiting for upstream room, fairly: when no deployment of a model has
//! room, requests queue per model, and turns go round-robin across clients
//! (each client's requests in arrival order), so one busy client cannot
//! starve the others. Only the request whose turn it is tries for room; it
//! keeps the turn until it gets room or gives up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// One queue per model, made on first use.
#[derive(Default)]
pub struct Queues {
    by_model: Mutex<HashMap<String, Arc<Queue>>>,
}

impl Queues {
    pub fn of(&self, model: &str) -> Arc<Queue> {
        let mut queues = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            queues
                .entry(model.to_owned())
                .or_insert_with(|| Arc::new(Queue::new(model))),
        )
    }
}

pub struct Queue {
    model: String,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Clients with waiting requests; the front one has the turn.
    ring: VecDeque<Arc<str>>,
    /// Each client's waiting tickets, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<u64>>,
    next: u64,
}

impl State {
    fn head(&self) -> Option<u64> {
        let client = self.ring.front()?;
        self.waiting.get(client)?.front().copied()
    }
}

impl Queue {
    fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the queue for `client`.
    pub fn join(self: &Arc<Self>, client: &Arc<str>) -> Ticket {
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        let tickets = state.waiting.entry(Arc::clone(client)).or_default();
        tickets.push_back(id);
        if tickets.len() == 1 {
            state.ring.push_back(Arc::clone(client));
        }
        let length: usize = state.waiting.values().map(VecDeque::len).sum();
        drop(state);
        crate::metrics::UPSTREAM_QUEUE_LENGTH
            .gauge(&[("model", &self.model)])
            .set(length as f64);
        Ticket {
            queue: Arc::clone(self),
            client: Arc::clone(client),
            id,
        }
    }
}

/// A request's place in a queue; leaving (dropping it) passes the turn on.
pub struct Ticket {
    queue: Arc<Queue>,
    client: Arc<str>,
    id: u64,
}

impl Ticket {
    /// Resolves when it is this request's turn.
    pub async fn turn(&self) {
        loop {
            let changed = self.queue.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change in between is not missed.
            changed.as_mut().enable();
            if self.queue.lock().head() == Some(self.id) {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        let was_head = state.head() == Some(self.id);
        if let Some(tickets) = state.waiting.get_mut(&self.client) {
            tickets.retain(|&id| id != self.id);
            let empty = tickets.is_empty();
            if empty {
                state.waiting.remove(&self.client);
            }
            if was_head || empty {
                // The client leaves its place in the ring: to the back if it
                // still waits (round robin), out if not.
                if let Some(at) = state.ring.iter().position(|c| *c == self.client) {
                    state.ring.remove(at);
                }
                if !empty {
                    state.ring.push_back(Arc::clone(&self.client));
                }
            }
        }
        let length: usize = state.waiting.values().map(VecDeque::len).sum();
        drop(state);
        crate::metrics::UPSTREAM_QUEUE_LENGTH
            .gauge(&[("model", &self.queue.model)])
            .set(length as f64);
        self.queue.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(queue: &Arc<Queue>, tickets: &mut Vec<(char, Ticket)>) -> String {
        let mut served = String::new();
        while !tickets.is_empty() {
            let head = queue.lock().head();
            let at = tickets
                .iter()
                .position(|(_, t)| Some(t.id) == head)
                .expect("someone has the turn");
            served.push(tickets.remove(at).0);
        }
        served
    }

    #[test]
    fn turns_go_round_robin_across_clients() {
        let queue = Arc::new(Queue::new("m"));
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let mut tickets = Vec::new();
        for _ in 0..4 {
            tickets.push(('a', queue.join(&a)));
        }
        tickets.push(('b', queue.join(&b)));
        tickets.push(('c', queue.join(&c)));
        tickets.push(('b', queue.join(&b)));
        assert_eq!(order(&queue, &mut tickets), "abcabaa");
    }

    #[test]
    fn leaving_early_keeps_the_order_of_the_rest() {
        let queue = Arc::new(Queue::new("m"));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a1 = queue.join(&a);
        let b1 = queue.join(&b);
        let a2 = queue.join(&a);
        drop(b1);
        assert_eq!(queue.lock().head(), Some(a1.id));
        drop(a1);
        assert_eq!(queue.lock().head(), Some(a2.id));
    }

    #[tokio::test]
    async fn the_next_in_turn_is_woken() {
        let queue = Arc::new(Queue::new("m"));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = queue.join(&a);
        let second = queue.join(&b);
        first.turn().await;
        let waiting = tokio::spawn(async move {
            second.turn().await;
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken")
            .expect("task");
    }
}
