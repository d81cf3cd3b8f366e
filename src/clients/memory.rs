//! Managed clients in this process's memory (`store.kind = "memory"`): gone
//! at restart, like the budgets.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{ManagedClient, Registry, RegistryError, RegistryFuture};

#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<(u64, BTreeMap<String, ManagedClient>)>,
}

impl MemoryRegistry {
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut (u64, BTreeMap<String, ManagedClient>)) -> Result<T, RegistryError>,
    ) -> RegistryFuture<T> {
        let result = match self.state.lock() {
            Ok(mut state) => f(&mut state),
            Err(_) => Err(RegistryError::Unavailable("poisoned".into())),
        };
        Box::pin(std::future::ready(result))
    }
}

impl Registry for MemoryRegistry {
    fn load(&self) -> RegistryFuture<(u64, Vec<ManagedClient>)> {
        self.with(|(version, clients)| Ok((*version, clients.values().cloned().collect())))
    }

    fn version(&self) -> RegistryFuture<u64> {
        self.with(|(version, _)| Ok(*version))
    }

    fn create(&self, client: ManagedClient) -> RegistryFuture<()> {
        self.with(move |(version, clients)| {
            if clients.contains_key(&client.name) {
                return Err(RegistryError::Exists(client.name));
            }
            clients.insert(client.name.clone(), client);
            *version += 1;
            Ok(())
        })
    }

    fn replace(&self, client: ManagedClient) -> RegistryFuture<()> {
        self.with(
            move |(version, clients)| match clients.get_mut(&client.name) {
                Some(stored) => {
                    *stored = client;
                    *version += 1;
                    Ok(())
                }
                None => Err(RegistryError::NotFound(client.name)),
            },
        )
    }

    fn delete(&self, name: &str) -> RegistryFuture<()> {
        let name = name.to_owned();
        self.with(move |(version, clients)| match clients.remove(&name) {
            Some(_) => {
                *version += 1;
                Ok(())
            }
            None => Err(RegistryError::NotFound(name)),
        })
    }
}
