//! The in-memory store: each account's windows behind its own mutex, held
//! only for the few arithmetic steps of one operation (never across an
//! await), so reservations of different accounts never wait on each other.
//! Also the authoritative state of the SQLite store, which is why its map
//! is keyed by the accounts' storage keys (the SQLite rows').

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::{Reserved, Store, StoreError, StoreFuture, ready};
use crate::budget::window::{ClientState, Hold, Snapshot};
use crate::budget::{Account, Limits};

#[derive(Default)]
struct Entry {
    state: ClientState,
    /// Changed since the last flush (persistent stores only care).
    dirty: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    /// By [`Account::key`].
    accounts: RwLock<HashMap<Box<str>, Mutex<Entry>>>,
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

    /// A store holding previously persisted states, by storage key.
    pub fn with_states(states: impl IntoIterator<Item = (String, ClientState)>) -> Self {
        let accounts = states
            .into_iter()
            .map(|(key, state)| {
                let entry = Entry {
                    state,
                    dirty: false,
                };
                (key.into_boxed_str(), Mutex::new(entry))
            })
            .collect();
        Self {
            accounts: RwLock::new(accounts),
        }
    }

    /// Runs `f` on the state under `key` (created on first use) and marks
    /// it dirty.
    fn update<R>(&self, key: &str, f: impl FnOnce(&mut ClientState) -> R) -> R {
        {
            let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = accounts.get(key) {
                let mut entry = lock(entry);
                entry.dirty = true;
                return f(&mut entry.state);
            }
        }
        let mut accounts = self
            .accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = accounts.entry(key.into()).or_default();
        let entry = entry.get_mut().unwrap_or_else(PoisonError::into_inner);
        entry.dirty = true;
        f(&mut entry.state)
    }

    /// The account's state (the empty state for one never seen).
    fn state(&self, account: &Account) -> ClientState {
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        accounts
            .get(account.key())
            .map(|entry| lock(entry).state)
            .unwrap_or_default()
    }

    /// The states changed since the last call, by storage key, marking them
    /// clean.
    pub fn take_dirty(&self) -> Vec<(String, ClientState)> {
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        accounts
            .iter()
            .filter_map(|(key, entry)| {
                let mut entry = lock(entry);
                std::mem::take(&mut entry.dirty).then(|| (key.to_string(), entry.state))
            })
            .collect()
    }

    /// Marks the states under `keys` dirty again after a failed write.
    pub fn mark_dirty(&self, keys: impl IntoIterator<Item = String>) {
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            if let Some(entry) = accounts.get(key.as_str()) {
                lock(entry).dirty = true;
            }
        }
    }

    /// [`Store::reserve`], answered at once.
    pub fn reserve_now(
        &self,
        account: &Account,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> Reserved {
        self.update(account.key(), |state| {
            let outcome = state.reserve(limits, tokens, now);
            Reserved {
                outcome,
                snapshot: state.snapshot(limits, now),
            }
        })
    }

    /// [`Store::settle`], done at once.
    pub fn settle_now(
        &self,
        account: &Account,
        limits: &Limits,
        hold: &Hold,
        actual: u64,
        now: u64,
    ) {
        self.update(account.key(), |state| {
            state.settle(limits, hold, actual, now);
        });
    }

    /// [`Store::snapshot`], answered at once.
    pub fn snapshot_now(&self, account: &Account, limits: &Limits, now: u64) -> Snapshot {
        self.state(account).snapshot(limits, now)
    }
}

impl Store for MemoryStore {
    fn reserve(
        &self,
        account: &Account,
        limits: &Limits,
        tokens: u64,
        now: u64,
    ) -> StoreFuture<Reserved> {
        ready(Ok(self.reserve_now(account, limits, tokens, now)))
    }

    fn settle(
        &self,
        account: &Account,
        limits: &Limits,
        hold: Hold,
        actual: u64,
        now: u64,
    ) -> StoreFuture<()> {
        self.settle_now(account, limits, &hold, actual, now);
        ready(Ok(()))
    }

    fn snapshot(&self, account: &Account, limits: &Limits, now: u64) -> StoreFuture<Snapshot> {
        ready(Ok(self.snapshot_now(account, limits, now)))
    }

    fn health(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }

    fn flush(&self) -> StoreFuture<()> {
        ready(Ok::<(), StoreError>(()))
    }
}
