//! One module per endpoint group; each turns HTTP into calls on the layers
//! below and their answers (or errors, through [`ApiError`]) back into HTTP.

pub mod chat;
pub mod health;
pub mod models;
pub mod responses;
pub mod usage;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri, header};

use crate::access_log::ClientSlot;
use crate::app::SharedState;
use crate::catalog::Client;
use crate::config::Config;
use crate::error::ApiError;

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
        let client = bearer_key(&parts.headers)
            .and_then(|key| config.catalog.authenticate(key))
            .cloned()
            .ok_or_else(ApiError::invalid_api_key)?;
        if let Some(slot) = parts.extensions.get::<ClientSlot>() {
            slot.set(Arc::clone(&client.name));
        }
        Ok(Authenticated { client, config })
    }
}

/// The key of `Authorization: Bearer KEY`.
fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|key| !key.is_empty())
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(method.as_str(), uri.path())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
