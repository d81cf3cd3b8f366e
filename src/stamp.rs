//! What the edge learns of every request before its handler runs: the
//! client's address ([`crate::client_addr::resolve`]), the request's id
//! ([`crate::access_log::request_id_for`]) and the slot authentication
//! names the client in, for the log line. Left on the request as one
//! extension: each extension is a boxed entry of a map, and three of them
//! made it grow (and rehash) on every request.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use axum::http::{Extensions, HeaderValue};

#[derive(Clone)]
pub struct Stamp {
    pub client_addr: IpAddr,
    pub request_id: HeaderValue,
    pub client: ClientSlot,
}

impl Stamp {
    /// The stamp the edge left in `extensions`, if it did.
    pub fn of(extensions: &Extensions) -> Option<&Self> {
        extensions.get::<Self>()
    }

    /// The request's id as text ("" without a stamp; ids are printable
    /// ASCII).
    pub fn request_id(extensions: &Extensions) -> &str {
        Self::of(extensions).map_or("", |stamp| stamp.request_id.to_str().unwrap_or(""))
    }
}

/// Where authentication records the client's name for the log line, on
/// every route (set by [`crate::endpoints::Authenticated`]).
#[derive(Clone, Default)]
pub struct ClientSlot(Arc<OnceLock<Arc<str>>>);

impl ClientSlot {
    pub fn set(&self, name: Arc<str>) {
        let _ = self.0.set(name);
    }

    pub fn get(&self) -> Option<&Arc<str>> {
        self.0.get()
    }
}
