//! One module per endpoint group; each turns HTTP into calls on the layers
//! below and back.

pub mod chat;
pub mod health;
pub mod models;
pub mod responses;
pub mod usage;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use std::sync::Arc;

use crate::app::SharedState;
use crate::catalog::Client;
use crate::error::ApiError;
use crate::observe::ClientSlot;

/// The client a request authenticated as; extracting it answers 401 otherwise.
pub struct Authenticated(pub Arc<Client>);

impl FromRequestParts<SharedState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let client = state
            .catalog
            .authenticate(&parts.headers)
            .ok_or_else(ApiError::invalid_api_key)?;
        if let Some(slot) = parts.extensions.get::<ClientSlot>() {
            slot.set(Arc::clone(&client.name));
        }
        Ok(Authenticated(Arc::clone(client)))
    }
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(method.as_str(), uri.path())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not supported on {}.", uri.path()),
    )
}
