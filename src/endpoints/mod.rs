//! One module per endpoint group; each turns HTTP into calls on the layers
//! below and their answers (or errors, through [`ApiError`]) back into HTTP.

pub mod admin;
pub mod chat;
pub mod console;
pub mod models;
pub mod probes;
pub mod responses;
pub mod usage;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, Uri};

use crate::catalog::Client;
use crate::client_addr;
use crate::config::Config;
use crate::error::ApiError;
use crate::keys::{KeyHash, bearer_key};
use crate::stamp::Stamp;
use crate::state::SharedState;

/// The client a request authenticated as, and the configuration snapshot it
/// was found in (the one the whole request then uses); extracting it
/// answers 401 otherwise.
pub struct Authenticated {
    pub client: Arc<Client>,
    pub config: Arc<Config>,
}

impl FromRequestParts<SharedState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let config = state.config();
        // The config's clients, then the managed ones; a disabled, deleted
        // or rotated-out key is in neither. The key is hashed once for both.
        let client = bearer_key(&parts.headers)
            .map(KeyHash::of)
            .and_then(|key| {
                config.catalog.authenticate(&key).cloned().or_else(|| {
                    // A managed client shadowed by a config client of the
                    // same name (the file changed under it) does not
                    // authenticate: one name, one budget, one owner.
                    state
                        .clients
                        .index()
                        .authenticate(&key)
                        .filter(|c| !config.catalog.has_client(&c.name))
                        .cloned()
                })
            })
            .ok_or_else(|| failed_authentication(state, parts))?;
        if let Some(stamp) = Stamp::of(&parts.extensions) {
            stamp.client.set(Arc::clone(&client.name));
        }
        // The key's policy, against the clock and the address of this
        // request (not at load: an expiry needs no reload).
        if client.expired(crate::catalog::now()) {
            return Err(ApiError::key_expired());
        }
        let addr = client_addr::of(&parts.extensions);
        if !client_addr::allowed(addr, &client.allowed_networks) {
            return Err(ApiError::client_network_forbidden(addr));
        }
        Ok(Authenticated { client, config })
    }
}

/// The answer to a wrong or missing key: 401, or 429 once the address sent
/// too many of them.
pub(crate) fn failed_authentication(state: &SharedState, parts: &Parts) -> ApiError {
    let address = client_addr::of(&parts.extensions);
    match state.auth_failures.failed(address) {
        Ok(()) => ApiError::invalid_api_key(),
        Err(wait) => ApiError::too_many_auth_failures(wait),
    }
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(method.as_str(), uri.path())
}

pub async fn method_not_allowed(
    axum::extract::State(state): axum::extract::State<SharedState>,
    method: Method,
    uri: Uri,
) -> ApiError {
    // Without `[admin]`, nothing under /admin exists, not even its methods.
    if crate::edge::is_admin_path(uri.path()) && state.config().admin.is_none() {
        return ApiError::not_found(method.as_str(), uri.path());
    }
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
