//! The in-memory store: each client's windows behind its own mutex, held
//! only for the few arithmetic steps of one operation (never across an
//! await), so reservations of different clients never wait on each other.
//! Also the authoritative state of the SQLite store.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::{Reserved, Store, StoreError, StoreFuture, ready};
use crate::budget::Limits;
use crate::budget::window::{ClientState, Hold, Snapshot};

#[derive(Default)]
struct Entry {
    state: ClientState,
    /// Changed since the last flush (persistent stores only care).
    dirty: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    clients: RwLock<HashMap<Box<str>, Mutex<Entry>>>,
}

/// A poisoned lock only means another thread panicked mid-update; the state
/// is plain numbers and still usable, so carry on rather than fail requests.
fn lock(entry: &Mutex<Entry>) -> MutexGuard<'_, Entry> {
    entry.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding previously persisted states.
    pub fn with_states(states: impl IntoIterator<Item = (String, ClientState)>) -> Self {
        let clients = states
            .into_iter()
            .map(|(client, state)| {
                let entry = Entry {
                    state,
                    dirty: false,
                };
                (client.into_boxed_str(), Mutex::new(entry))
            })
            .collect();
        Self {
            clients: RwLock::new(clients),
        }
    }

    /// Runs `f` on the client's state (created on first use) and marks it dirty.
    pub fn update<R>(&self, client: &str, f: impl FnOnce(&mut ClientState) -> R) -> R {
        {
            let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = clients.get(client) {
                let mut entry = lock(entry);
                entry.dirty = true;
                return f(&mut entry.state);
            }
        }
        let mut clients = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        let entry = clients.entry(client.into()).or_default();
        let entry = entry.get_mut().unwrap_or_else(PoisonError::into_inner);
        entry.dirty = true;
        f(&mut entry.state)
    }

    /// The client's state (the empty state for a client never seen).
    pub fn state(&self, client: &str) -> ClientState {
        let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        clients
            .get(client)
            .map(|entry| lock(entry).state)
            .unwrap_or_default()
    }

    /// The states changed since the last call, marking them clean.
    pub fn take_dirty(&self) -> Vec<(String, ClientState)> {
        let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        clients
            .iter()
            .filter_map(|(client, entry)| {
                let mut entry = lock(entry);
                std::mem::take(&mut entry.dirty).then(|| (client.to_string(), entry.state))
            })
            .collect()
    }

    /// Marks clients dirty again after a failed write.
    pub fn mark_dirty(&self, names: impl IntoIterator<Item = String>) {
        let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        for name in names {
            if let Some(entry) = clients.get(name.as_str()) {
                lock(entry).dirty = true;
            }
        }
    }

    pub fn reserve_now(&self, client: &str, limits: &Limits, tokens: u64, now: u64) -> Reserved {
        self.update(client, |state| {
            let outcome = state.reserve(limits, tokens, now);
            Reserved {
                outcome,
                snapshot: state.snapshot(limits, now),
            }
        })
    }

    pub fn settle_now(&self, client: &str, limits: &Limits, hold: &Hold, actual: u64, now: u64) {
        self.update(client, |state| state.settle(limits, hold, actual, now));
    }

    pub fn snapshot_now(&self, client: &str, limits: &Limits, now: u64) -> Snapshot {
        self.state(client).snapshot(limits, now)
    }
}

impl Store for MemoryStore {
    fn reserve(
        &self,
        client: &str,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<Reserved> {
        ready(Ok(self.reserve_now(client, limits, tokens, now)))
    }

    fn settle(
        &self,
        client: &str,
        limits: &Limits,
        hold: Hold,
        actual: u64,
        now: u64,
    ) -> StoreFuture<()> {
        self.settle_now(client, limits, &hold, actual, now);
        ready(Ok(()))
    }

    fn snapshot(&self, client: &str, limits: &Limits, now: u64) -> StoreFuture<Snapshot> {
        ready(Ok(self.snapshot_now(client, limits, now)))
    }

    fn health(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }

    fn flush(&self) -> StoreFuture<()> {
        ready(Ok::<(), StoreError>(()))
    }
}
