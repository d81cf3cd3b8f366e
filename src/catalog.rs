//! Who may call what, where: the validated config turned into lookup tables
//! (clients by key, models by name, each model's upstream).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};

use crate::config::{BudgetConfig, Config, UpstreamConfig};
use crate::keys::KeyHash;

/// An upstream with everything a request needs precomputed.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// `{base_url}/chat/completions`.
    pub chat_url: reqwest::Url,
    /// `Bearer {api_key}`, marked sensitive so it never shows in debug output.
    pub authorization: Option<HeaderValue>,
    pub timeout: Duration,
    pub config: UpstreamConfig,
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub upstream: Arc<Upstream>,
    /// What the upstream calls this model, when it differs from `name`.
    pub upstream_model: Option<String>,
    pub max_output_tokens: u64,
}

#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    key: KeyHash,
    /// `None` allows every model.
    models: Option<Vec<String>>,
    pub budget: BudgetConfig,
}

impl Client {
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model))
    }
}

#[derive(Debug)]
pub struct Catalog {
    models: HashMap<String, Model>,
    /// In config order, so `/v1/models` lists models as configured.
    model_order: Vec<String>,
    clients: Vec<Arc<Client>>,
}

impl Catalog {
    /// Builds the tables from a config that passed validation.
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut upstreams = HashMap::new();
        for upstream in &config.upstreams {
            let base = upstream.base_url.trim_end_matches('/');
            let chat_url = reqwest::Url::parse(&format!("{base}/chat/completions"))
                .map_err(|e| format!("upstream {:?}: base_url: {e}", upstream.name))?;
            let authorization = match &upstream.api_key {
                Some(key) if !key.expose().is_empty() => {
                    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                        .map_err(|_| {
                            format!(
                                "upstream {:?}: api_key is not a valid header value",
                                upstream.name
                            )
                        })?;
                    value.set_sensitive(true);
                    Some(value)
                }
                _ => None,
            };
            upstreams.insert(
                upstream.name.clone(),
                Arc::new(Upstream {
                    name: upstream.name.clone(),
                    chat_url,
                    authorization,
                    timeout: Duration::from_millis(upstream.timeout_ms),
                    config: upstream.clone(),
                }),
            );
        }

        let mut models = HashMap::new();
        let mut model_order = Vec::new();
        for model in &config.models {
            let upstream = upstreams.get(&model.upstream).ok_or_else(|| {
                format!(
                    "model {:?}: no upstream named {:?}",
                    model.name, model.upstream
                )
            })?;
            model_order.push(model.name.clone());
            models.insert(
                model.name.clone(),
                Model {
                    name: model.name.clone(),
                    upstream: Arc::clone(upstream),
                    upstream_model: model.upstream_model.clone().filter(|m| m != &model.name),
                    max_output_tokens: model.max_output_tokens,
                },
            );
        }

        let clients = config
            .clients
            .iter()
            .map(|client| {
                let key = KeyHash::parse(&client.key)
                    .map_err(|e| format!("client {:?}: key {e}", client.name))?;
                let models = if client.models.iter().any(|m| m == "*") {
                    None
                } else {
                    Some(client.models.clone())
                };
                Ok(Arc::new(Client {
                    name: Arc::from(client.name.as_str()),
                    key,
                    models,
                    budget: client.budget,
                }))
            })
            .collect::<Result<_, String>>()?;

        Ok(Self {
            models,
            model_order,
            clients,
        })
    }

    /// The client whose key is presented as `Authorization: Bearer KEY`.
    ///
    /// Every configured hash is compared, in constant time, whatever matches,
    /// so the time taken says nothing about which key is close.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<&Arc<Client>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented = KeyHash::of(key.trim());
        let mut found = None;
        for client in &self.clients {
            if client.key.matches(&presented) && found.is_none() {
                found = Some(client);
            }
        }
        found
    }

    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    /// The models `client` may use, in config order.
    pub fn models_for<'a>(&'a self, client: &'a Client) -> impl Iterator<Item = &'a Model> {
        self.model_order
            .iter()
            .filter_map(|name| self.models.get(name))
            .filter(|model| client.may_use(&model.name))
    }

    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
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
        Catalog::new(&config).expect("catalog")
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
        headers
    }

    #[test]
    fn authenticates_by_key_hash() {
        let catalog = catalog();
        assert_eq!(
            catalog.authenticate(&bearer("key-one")).map(|c| &*c.name),
            Some("one")
        );
        assert_eq!(
            catalog.authenticate(&bearer("key-two")).map(|c| &*c.name),
            Some("two")
        );
        assert!(catalog.authenticate(&bearer("key-three")).is_none());
        assert!(catalog.authenticate(&HeaderMap::new()).is_none());
    }

    #[test]
    fn model_lists_and_renames() {
        let catalog = catalog();
        let one = catalog.authenticate(&bearer("key-one")).expect("client");
        let two = catalog.authenticate(&bearer("key-two")).expect("client");
        assert_eq!(
            catalog
                .models_for(one)
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(catalog.models_for(two).count(), 2);
        let a = catalog.model("a").expect("model");
        assert_eq!(a.upstream_model.as_deref(), Some("real-a"));
        assert_eq!(
            a.upstream.chat_url.as_str(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        assert!(!format!("{a:?}").contains("upstream-secret"));
    }
}
