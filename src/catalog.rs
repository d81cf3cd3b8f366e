//! Who may call what, where: clients by key, the teams they belong to,
//! models by name, each model's deployments. Built by the config (see [`crate::config`]) from validated,
//! typed values; requests only look things up.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use jiff::Timestamp;

use crate::budget::Limits;
use crate::budget::money::Price;
use crate::keys::{KeyHash, KeyIndex};
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
    /// In config order.
    clients: Vec<Arc<Client>>,
    /// The same clients by the SHA-256 of their keys (unique: the config
    /// check refuses a hash given twice) and by name: one lookup a request
    /// however many clients the file lists.
    by_key: KeyIndex<Arc<Client>>,
    by_name: HashMap<Arc<str>, Arc<Client>, foldhash::fast::RandomState>,
    /// In config order.
    teams: Vec<Arc<Team>>,
    /// The same teams by name: a team client's request looks its team up.
    teams_by_name: HashMap<Arc<str>, Arc<Team>, foldhash::fast::RandomState>,
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
        let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
        let teams: Vec<Arc<Team>> = teams.into_iter().map(Arc::new).collect();
        Self {
            upstreams,
            models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            model_order,
            by_key: clients.iter().map(|c| (c.key, Arc::clone(c))).collect(),
            by_name: clients
                .iter()
                .map(|c| (Arc::clone(&c.name), Arc::clone(c)))
                .collect(),
            clients,
            teams_by_name: teams
                .iter()
                .map(|t| (Arc::clone(&t.name), Arc::clone(t)))
                .collect(),
            teams,
        }
    }

    /// The client whose key hashes to `presented` (the presented key's
    /// [`KeyHash::of`], taken once per request for both this and the
    /// managed clients' index).
    ///
    /// One lookup, the hash then compared in constant time ([`KeyIndex`]).
    /// Comparing every configured hash, as before 2026-12-06, cost a
    /// request 33 ns a client in the file.
    pub fn authenticate(&self, presented: &KeyHash) -> Option<&Arc<Client>> {
        self.by_key.get(presented)
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
        self.by_name.contains_key(name)
    }

    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    /// The config file's team of that name (a managed one is not here: see
    /// `AppState::team` for the lookup that finds either).
    pub fn team(&self, name: &str) -> Option<&Arc<Team>> {
        self.teams_by_name.get(name)
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

    /// A file of `n` clients, `client-{i}` with the key `key-{i}`.
    fn catalog_of(n: usize) -> Catalog {
        let mut text = String::from(
            "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1/v1/\"\napi_key = \"k\"\n\
             [[models]]\nname = \"a\"\nupstream = \"u\"\n",
        );
        for i in 0..n {
            let key = KeyHash::of(&format!("key-{i}"));
            text.push_str(&format!(
                "[[clients]]\nname = \"client-{i}\"\nkey = \"{key}\"\n"
            ));
        }
        crate::config::parse(&text, &|_| None)
            .expect("valid config")
            .catalog
    }

    #[test]
    fn among_many_clients_each_is_found_by_its_key_and_its_name() {
        let catalog = catalog_of(500);
        for i in [0, 1, 250, 499] {
            let found = catalog.authenticate(&KeyHash::of(&format!("key-{i}")));
            assert_eq!(
                found.map(|c| c.name.to_string()),
                Some(format!("client-{i}"))
            );
            assert!(catalog.has_client(&format!("client-{i}")));
        }
        assert!(catalog.authenticate(&KeyHash::of("key-500")).is_none());
        assert!(!catalog.has_client("client-500"));
        assert_eq!(catalog.clients().len(), 500, "in config order, all of them");
        assert_eq!(&*catalog.clients()[499].name, "client-499");
    }

    /// What finding a client costs among 10,000: the lookup by digest, and
    /// the comparison of every configured hash in constant time that it
    /// replaced (the same `KeyHash::matches` over the same clients).
    /// `cargo test --release --lib authenticate_among_many -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement; run it in a release build"]
    fn authenticate_among_many() {
        let catalog = catalog_of(10_000);
        let presented: Vec<KeyHash> = (0..1000)
            .map(|i| KeyHash::of(&format!("key-{}", i * 10)))
            .collect();
        let timed = |find: &dyn Fn(&KeyHash) -> bool| {
            let start = std::time::Instant::now();
            let mut found = 0;
            for key in &presented {
                found += usize::from(std::hint::black_box(find(key)));
            }
            assert_eq!(found, presented.len());
            start.elapsed() / presented.len() as u32
        };
        let by_digest = timed(&|key| catalog.authenticate(key).is_some());
        let every_hash = timed(&|key| {
            let mut found = None;
            for client in catalog.clients() {
                if client.key.matches(key) && found.is_none() {
                    found = Some(client);
                }
            }
            found.is_some()
        });
        println!("10,000 clients: by digest {by_digest:?}, every hash compared {every_hash:?}");
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
