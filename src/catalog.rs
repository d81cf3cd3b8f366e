//! Who may call what, where: clients by key, the teams they belong to,
//! models by name, each model's deployments. Built by the config (see [`crate::config`]) from validated,
//! typed values; requests only look things up.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use jiff::Timestamp;

use crate::budget::Limits;
use crate::budget::money::Price;
use crate::keys::KeyHash;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Model {
    /// What clients send as `model`.
    pub name: String,
    /// The API it serves: asked for another, Iris refuses
    /// (`model_not_supported`).
    pub api: crate::openai::Api,
    /// In priority order (lowest first), config order within a priority.
    pub deployments: Vec<Deployment>,
    /// Completion tokens reserved when a request sets no cap.
    pub max_output_tokens: u64,
    /// The highest of its deployments' prices, what a request is reserved
    /// at before one answers; `None` when none has a price (it costs nothing).
    pub reserve_price: Option<Price>,
    /// Its answers are kept in the response cache (when `[cache]` is on).
    pub cache: bool,
}

impl Model {
    /// The upstream that serves the model first (for `owned_by`).
    pub fn primary(&self) -> &Upstream {
        &self.deployments[0].upstream
    }
}

/// One place a model is served: an upstream and the model's name there.
#[derive(Debug)]
pub struct Deployment {
    pub upstream: Arc<Upstream>,
    /// What the upstream calls the model, when it differs from the model's name.
    pub upstream_model: Option<String>,
    /// Share of the traffic within its priority tier, at least 1.
    pub weight: u32,
    /// Lower is tried first.
    pub priority: u32,
    /// Names the deployment in health and metrics: `upstream/model`.
    pub key: Arc<str>,
    /// Per million tokens: the deployment's own, else the model's; `None`:
    /// its answers cost nothing.
    pub price: Option<Price>,
}

/// Which models a client may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelAccess {
    All,
    Only(Vec<String>),
}

#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    pub key: KeyHash,
    pub models: ModelAccess,
    pub budget: Limits,
    /// The team whose budget its requests also count against, by name: a
    /// config team or a managed one (see `AppState::team`).
    pub team: Option<Arc<str>>,
    /// From this instant on, its keys get 401 `key_expired`.
    pub expires_at: Option<Timestamp>,
    /// Where its requests may come from; empty: anywhere.
    pub allowed_networks: Vec<IpNet>,
}

/// A budget shared by the clients that name it (`[[teams]]`, or a managed
/// team).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub name: Arc<str>,
    pub budget: Limits,
}

impl Client {
    /// Whether its key has expired at `now` (checked per request, so an
    /// expiry needs no reload).
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    pub fn may_use(&self, model: &str) -> bool {
        match &self.models {
            ModelAccess::All => true,
            ModelAccess::Only(allowed) => allowed.iter().any(|m| m == model),
        }
    }
}

/// The wall clock, to the millisecond (jiff is built without `std`, so
/// without its own `now`).
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
}

#[derive(Debug, Default)]
pub struct Catalog {
    upstreams: Vec<Arc<Upstream>>,
    /// foldhash: looked up once a request; the keys are the operator's (a
    /// client's model name only looks one up), so SipHash's defence buys nothing.
    models: HashMap<String, Model, foldhash::fast::RandomState>,
    /// In config order, so `/v1/models` lists models as configured.
    model_order: Vec<String>,
    clients: Vec<Arc<Client>>,
    /// In config order.
    teams: Vec<Arc<Team>>,
}

impl Catalog {
    /// Indexes resolved upstreams, models, clients and teams (names already
    /// unique, every client's team among `teams`).
    pub fn new(
        upstreams: Vec<Arc<Upstream>>,
        models: Vec<Model>,
        clients: Vec<Client>,
        teams: Vec<Team>,
    ) -> Self {
        let model_order = models.iter().map(|m| m.name.clone()).collect();
        Self {
            upstreams,
            models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            model_order,
            clients: clients.into_iter().map(Arc::new).collect(),
            teams: teams.into_iter().map(Arc::new).collect(),
        }
    }

    /// The client whose key hashes to `presented` (the presented key's
    /// [`KeyHash::of`], taken once per request for both this and the
    /// managed clients' index).
    ///
    /// Every configured hash is compared, in constant time, whatever matches,
    /// so the time taken says nothing about which key is close.
    pub fn authenticate(&self, presented: &KeyHash) -> Option<&Arc<Client>> {
        let mut found = None;
        for client in &self.clients {
            if client.key.matches(presented) && found.is_none() {
                found = Some(client);
            }
        }
        found
    }

    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    /// Every model, in config order.
    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.model_order
            .iter()
            .filter_map(|name| self.models.get(name))
    }

    /// The models `client` may use, in config order.
    pub fn models_for<'a>(&'a self, client: &'a Client) -> impl Iterator<Item = &'a Model> {
        self.model_order
            .iter()
            .filter_map(|name| self.models.get(name))
            .filter(|model| client.may_use(&model.name))
    }

    /// Whether a client of the config file has this name.
    pub fn has_client(&self, name: &str) -> bool {
        self.clients.iter().any(|c| &*c.name == name)
    }

    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    /// The config file's team of that name (a managed one is not here: see
    /// `AppState::team` for the lookup that finds either).
    pub fn team(&self, name: &str) -> Option<&Arc<Team>> {
        self.teams.iter().find(|t| &*t.name == name)
    }

    /// The config file's teams, in config order.
    pub fn teams(&self) -> &[Arc<Team>] {
        &self.teams
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Every deployment, once, with its metric labels (upstream, model).
    pub fn deployment_labels(&self) -> Vec<(Arc<str>, String, String)> {
        let mut seen = std::collections::HashSet::new();
        let mut labels = Vec::new();
        for model in self
            .model_order
            .iter()
            .filter_map(|name| self.models.get(name))
        {
            for deployment in &model.deployments {
                if seen.insert(Arc::clone(&deployment.key)) {
                    let sent_as = deployment
                        .key
                        .split_once('/')
                        .map_or_else(String::new, |(_, m)| m.to_owned());
                    labels.push((
                        Arc::clone(&deployment.key),
                        deployment.upstream.name.clone(),
                        sent_as,
                    ));
                }
            }
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let config = crate::config::parse(
            &format!(
                r#"
                [[upstreams]]
                name = "u"
                base_url = "http://127.0.0.1:1/v1/"
                api_key = "upstream-secret"
                [[models]]
                name = "a"
                upstream = "u"
                upstream_model = "real-a"
                [[models]]
                name = "b"
                upstream = "u"
                [[clients]]
                name = "one"
                key = "{}"
                models = ["a"]
                [[clients]]
                name = "two"
                key = "{}"
                "#,
                KeyHash::of("key-one"),
                KeyHash::of("key-two")
            ),
            &|_| None,
        )
        .expect("valid config");
        config.catalog
    }

    #[test]
    fn authenticates_by_key_hash() {
        let catalog = catalog();
        assert_eq!(
            catalog
                .authenticate(&KeyHash::of("key-one"))
                .map(|c| &*c.name),
            Some("one")
        );
        assert_eq!(
            catalog
                .authenticate(&KeyHash::of("key-two"))
                .map(|c| &*c.name),
            Some("two")
        );
        assert!(catalog.authenticate(&KeyHash::of("key-three")).is_none());
        assert!(catalog.authenticate(&KeyHash::of("")).is_none());
    }

    #[test]
    fn model_lists_and_renames() {
        let catalog = catalog();
        let one = catalog
            .authenticate(&KeyHash::of("key-one"))
            .expect("client");
        let two = catalog
            .authenticate(&KeyHash::of("key-two"))
            .expect("client");
        assert_eq!(
            catalog
                .models_for(one)
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(catalog.models_for(two).count(), 2);
        let a = &catalog.model("a").expect("model").deployments[0];
        assert_eq!(a.upstream_model.as_deref(), Some("real-a"));
        assert_eq!(&*a.key, "u/real-a");
        assert!(matches!(
            &a.upstream.endpoint,
            crate::upstream::Endpoint::Http { chat_url, .. }
                if chat_url == "http://127.0.0.1:1/v1/chat/completions"
        ));
        assert!(!format!("{a:?}").contains("upstream-secret"));
        assert!(
            catalog.model("b").expect("model").deployments[0]
                .upstream_model
                .is_none()
        );
    }
}
