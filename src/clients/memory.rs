//! Managed clients and teams in this process's memory (`store.kind =
//! "memory"`): gone at restart, like the budgets.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Kind, Registry, RegistryError, RegistryFuture};

/// The version, and every record's JSON by kind and name.
type State = (u64, BTreeMap<(Kind, String), String>);

#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<State>,
}

impl MemoryRegistry {
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, RegistryError>,
    ) -> RegistryFuture<T> {
        let result = match self.state.lock() {
            Ok(mut state) => f(&mut state),
            Err(_) => Err(RegistryError::Unavailable("poisoned".into())),
        };
        Box::pin(std::future::ready(result))
    }
}

impl Registry for MemoryRegistry {
    fn load_records(&self) -> RegistryFuture<(u64, Vec<(Kind, String)>)> {
        self.with(|(version, records)| {
            let all = records
                .iter()
                .map(|((kind, _), text)| (*kind, text.clone()))
                .collect();
            Ok((*version, all))
        })
    }

    fn version(&self) -> RegistryFuture<u64> {
        self.with(|(version, _)| Ok(*version))
    }

    fn insert(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        self.with(move |(version, records)| {
            let key = (kind, name);
            if records.contains_key(&key) {
                return Err(RegistryError::Exists(key.1));
            }
            records.insert(key, record);
            *version += 1;
            Ok(())
        })
    }

    fn update(&self, kind: Kind, name: String, record: String) -> RegistryFuture<()> {
        self.with(
            move |(version, records)| match records.get_mut(&(kind, name.clone())) {
                Some(stored) => {
                    *stored = record;
                    *version += 1;
                    Ok(())
                }
                None => Err(RegistryError::NotFound(name)),
            },
        )
    }

    fn remove(&self, kind: Kind, name: String) -> RegistryFuture<()> {
        self.with(
            move |(version, records)| match records.remove(&(kind, name.clone())) {
                Some(_) => {
                    *version += 1;
                    Ok(())
                }
                None => Err(RegistryError::NotFound(name)),
            },
        )
    }
}
