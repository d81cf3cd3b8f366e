//! The application's state: the services every request uses, built once at
//! startup, and the configuration, one immutable snapshot behind an atomic
//! pointer.

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::alerts::Alerts;
use crate::auth_throttle::AuthFailures;
use crate::budget::store::Stores;
use crate::budget::window::Clock;
use crate::budget::{Budgets, StoreBackend};
use crate::cache::{RedisLink, ResponseCache};
use crate::catalog::Team;
use crate::clients::{self, ManagedClients};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::images::Images;
use crate::metrics::Metrics;
use crate::routing::health::{Health, REFRESH_EVERY};
use crate::routing::queue::Queues;
use crate::spend::SpendLog;
use crate::upstream::{Endpoint, Forwarder};

/// Everything a request handler may need: the services, built once at
/// startup, and the configuration, one immutable snapshot behind an atomic
/// pointer.
pub struct AppState {
    config: Arc<ArcSwap<Config>>,
    /// The file the config came from, re-read by a reload.
    config_path: Option<PathBuf>,
    pub gateway: Gateway,
    /// Clients created at run time, kept current from the store.
    pub clients: Arc<ManagedClients>,
    /// Wrong keys, counted per source address.
    pub auth_failures: AuthFailures,
    pub metrics: Metrics,
    /// One record per finished chat completion.
    pub spend: SpendLog,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Builds the state from a validated config. Async because it opens the
    /// budget store (loading its file, starting its background writer).
    pub async fn new(config: Config) -> Result<Self, String> {
        let forwarder = Forwarder::new().map_err(|e| format!("HTTP client: {e}"))?;
        // Metrics first, so the image metrics' descriptions reach the recorder.
        let metrics = Metrics::install();
        // One backend, two services on it: budgets, and (where several
        // instances share it) routing's deployment health.
        let stores = Stores::open(&config.store.backend).await?;
        let budgets = Budgets::new(stores.budgets, Clock::system(), config.store.on_unavailable);
        if let Some(settings) = &config.alerts {
            // Claimed in the budget store, so every instance that counts
            // the same budgets sends an alert once between them.
            budgets.alert_on(Alerts::start(settings.clone(), stores.claims)?);
        }
        // Beside the store: in the SQLite store's file, its records ride in
        // the store's transactions (see `spend::journal`).
        let spend = SpendLog::open(
            &config.spend_log,
            &config.store.backend,
            stores.sqlite.as_ref(),
        )
        .await?;
        // A Redis cache shares the store's connection (and its key prefix).
        let redis = match (&config.store.backend, stores.redis) {
            (StoreBackend::Redis { options, .. }, Some(connection)) => Some(RedisLink {
                connection,
                prefix: options.prefix.clone(),
                timeout: options.timeout,
            }),
            _ => None,
        };
        let cache = ResponseCache::new(&config.cache, redis);
        let images = Images::new(&config.images)?;
        for upstream in config.catalog.upstreams() {
            if matches!(upstream.endpoint, Endpoint::Demo) {
                tracing::info!(
                    upstream = %upstream.name,
                    "a demo upstream answers in-process: no model behind it"
                );
            }
        }
        let health = Arc::new(Health::new(stores.health));
        let clients = ManagedClients::start(clients::open(&config.store.backend)?).await;
        for managed in &clients.index().clients {
            if config.catalog.has_client(&managed.name) {
                tracing::error!(
                    client = %managed.name,
                    "a managed client has the name of a config client: the config's wins, \
                     the managed one's keys do not work (delete it, or rename one)"
                );
            }
        }
        for managed in &clients.index().teams {
            if config.catalog.team(&managed.name).is_some() {
                tracing::error!(
                    team = %managed.name,
                    "a managed team has the name of a config team: the config's wins \
                     (delete the managed one, or rename one)"
                );
            }
        }
        // The tokenizer takes a moment to load and about 45 MB to hold: loaded
        // before the first request where a limit counts tokens, else only if
        // a request ever needs it (see `estimate::estimate_counting`).
        let counts_tokens = config
            .catalog
            .clients()
            .iter()
            .any(|c| c.budget.counts_tokens())
            || config
                .catalog
                .upstreams()
                .iter()
                .any(|u| u.pacing.counts_tokens())
            || clients
                .index()
                .clients
                .iter()
                .any(|c| c.budget.counts_tokens());
        if counts_tokens {
            let _ = tokio::task::spawn_blocking(crate::budget::estimate::warm).await;
        }
        let config = Arc::new(ArcSwap::from_pointee(config));
        spawn_health_refresh(Arc::downgrade(&health), Arc::downgrade(&config));
        Ok(Self {
            config,
            config_path: None,
            clients,
            auth_failures: AuthFailures::default(),
            gateway: Gateway {
                budgets,
                images: ArcSwap::from_pointee(images),
                forwarder,
                health,
                queues: Queues::default(),
                cache: ArcSwap::from_pointee(cache),
                drain: CancellationToken::new(),
            },
            metrics,
            spend,
        })
    }

    /// Remembers the file the config came from, for reloads.
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    /// The configuration now. Take it once per request and use that
    /// snapshot throughout, so a request never sees two configurations.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The team of that name, from `config` (the request's snapshot) or
    /// managed; a config team wins over a managed one of the same name.
    /// The one lookup of a team at request time: a client's
    /// [`Client::team`](crate::catalog::Client::team) names it.
    pub fn team(&self, config: &Config, name: &str) -> Option<Arc<Team>> {
        match config.catalog.team(name) {
            Some(team) => Some(Arc::clone(team)),
            None => self.clients.index().team(name).cloned(),
        }
    }

    /// Makes `config` the one new requests use; requests in flight finish
    /// with the one they took.
    pub fn swap_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }
}

/// Keeps deployment health current: shared cooldowns pulled from the store,
/// the cooling gauges updated. Ends when the app is gone.
fn spawn_health_refresh(health: Weak<Health>, config: Weak<ArcSwap<Config>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (Some(health), Some(config)) = (health.upgrade(), config.upgrade()) else {
                return;
            };
            let deployments = config.load().catalog.deployment_labels();
            health.refresh(&deployments).await;
        }
    });
}
