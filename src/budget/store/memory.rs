//! The in-memory store: each account's windows behind its own mutex, held
//! only for the few arithmetic steps of one operation (never across an
//! await), so reservations of different accounts never wait on each other.
//! Also the authoritative state of the SQLite store, which is why its map
//! is keyed by the accounts' storage keys (the SQLite rows').

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::{Parties, Refused, Reserved, Store, StoreError, StoreFuture, ready, worst};
use crate::alerts::{AlertClaims, ClaimFuture};
use crate::budget::window::{Charge, ClientState, Hold, Snapshot};
use crate::budget::{Account, Limits};

#[derive(Default)]
struct Entry {
    state: ClientState,
    /// Changed since the last flush (persistent stores only care).
    dirty: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    /// By [`Account::key`] (foldhash: the keys are the operator's names,
    /// not a client's text, and SipHash cost 190 instructions for each of
    /// a request's two lookups).
    accounts: RwLock<HashMap<Box<str>, Mutex<Entry>, foldhash::fast::RandomState>>,
    /// Budget alerts claimed ([`AlertClaims`]), with when each claim ends.
    claims: Mutex<HashMap<Box<str>, tokio::time::Instant>>,
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
            claims: Mutex::default(),
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

    /// The state under a storage key, if the account has been seen.
    pub fn state_of(&self, key: &str) -> Option<ClientState> {
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        accounts.get(key).map(|entry| lock(entry).state)
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

    /// [`Store::reserve`], answered at once: every party's state locked
    /// (in one order, the storage keys', so two reservations never wait on
    /// each other in a circle), reserved on copies, written back only if
    /// every party admits it.
    pub fn reserve_now(&self, parties: &Parties, charge: Charge, now: u64) -> Reserved {
        if let [party] = &parties[..] {
            // One account: no copies, no ordering.
            return self.update(party.account.key(), |state| {
                let outcome = state
                    .reserve(&party.limits, charge, now)
                    .map_err(|refusal| Refused { party: 0, refusal });
                Reserved {
                    outcome,
                    snapshots: vec![state.snapshot(&party.limits, now)],
                }
            });
        }
        self.create(parties);
        let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
        let mut order: Vec<usize> = (0..parties.len()).collect();
        order.sort_by_key(|&i| parties[i].account.key());
        debug_assert!(
            order
                .windows(2)
                .all(|w| parties[w[0]].account.key() != parties[w[1]].account.key()),
            "one account twice in a reservation"
        );
        let mut guards: Vec<(usize, MutexGuard<'_, Entry>)> = order
            .into_iter()
            .filter_map(|i| accounts.get(parties[i].account.key()).map(|e| (i, lock(e))))
            .collect();
        guards.sort_by_key(|(i, _)| *i);
        let mut states: Vec<ClientState> = guards.iter().map(|(_, e)| e.state).collect();
        let mut holds = Vec::with_capacity(parties.len());
        let mut refusals = Vec::new();
        for (i, party) in parties.iter().enumerate() {
            match states[i].reserve(&party.limits, charge, now) {
                Ok(hold) => holds.push(hold),
                Err(refusal) => refusals.push(Refused { party: i, refusal }),
            }
        }
        let outcome = match worst(refusals) {
            Some(refused) => {
                // Nothing written: the snapshots are of the states as stored.
                states = guards.iter().map(|(_, e)| e.state).collect();
                Err(refused)
            }
            None => {
                for ((_, entry), state) in guards.iter_mut().zip(&states) {
                    entry.state = *state;
                    entry.dirty = true;
                }
                Ok(holds[0])
            }
        };
        Reserved {
            outcome,
            snapshots: parties
                .iter()
                .zip(&states)
                .map(|(party, state)| state.snapshot(&party.limits, now))
                .collect(),
        }
    }

    /// Makes sure every party has an entry.
    fn create(&self, parties: &Parties) {
        let missing = {
            let accounts = self.accounts.read().unwrap_or_else(PoisonError::into_inner);
            parties
                .iter()
                .any(|party| !accounts.contains_key(party.account.key()))
        };
        if missing {
            let mut accounts = self
                .accounts
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for party in parties.iter() {
                accounts.entry(party.account.key().into()).or_default();
            }
        }
    }

    /// [`Store::settle`], done at once (each party on its own: a settlement
    /// only corrects, it cannot be refused).
    pub fn settle_now(&self, parties: &Parties, hold: &Hold, actual: Charge, now: u64) {
        for party in parties.iter() {
            self.update(party.account.key(), |state| {
                state.settle(&party.limits, hold, actual, now);
            });
        }
    }

    /// [`AlertClaims::claim`], answered at once: an in-process set, the
    /// whole truth for the one instance that counts in this memory.
    pub fn claim_now(&self, key: &str, ttl: std::time::Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.retain(|_, until| *until > now);
        if claims.contains_key(key) {
            return false;
        }
        claims.insert(key.into(), now + ttl);
        true
    }

    /// [`Store::snapshot`], answered at once.
    pub fn snapshot_now(&self, account: &Account, limits: &Limits, now: u64) -> Snapshot {
        self.state(account).snapshot(limits, now)
    }
}

impl Store for MemoryStore {
    fn reserve(&self, parties: &Parties, charge: Charge, now: u64) -> StoreFuture<Reserved> {
        ready(Ok(self.reserve_now(parties, charge, now)))
    }

    fn settle(&self, parties: &Parties, hold: Hold, actual: Charge, now: u64) -> StoreFuture<()> {
        self.settle_now(parties, &hold, actual, now);
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

impl AlertClaims for MemoryStore {
    fn claim(&self, key: &str, ttl: std::time::Duration) -> ClaimFuture {
        Box::pin(std::future::ready(Ok(self.claim_now(key, ttl))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_alert_is_claimed_once_until_its_claim_ends() {
        let store = MemoryStore::new();
        assert!(store.claim_now("k", Duration::from_secs(60)));
        assert!(!store.claim_now("k", Duration::from_secs(60)));
        assert!(store.claim_now("short", Duration::ZERO));
        assert!(
            store.claim_now("short", Duration::from_secs(60)),
            "an ended claim is forgotten"
        );
    }
}
