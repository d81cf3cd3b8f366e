//! `GET /admin/ui`: the operator console, a small page served from the
//! binary (its four files are compiled in: no CDN, no external font or
//! script; it works offline). The page itself needs no key: it asks for the
//! admin key and then uses only the admin API with it. Like every path
//! under `/admin`, it does not exist without `[admin]`.
//!
//! Safe by default: a Content-Security-Policy that allows only Iris's own
//! origin (scripts and styles from its files, requests to its API) and
//! forbids framing; the script renders every value as text.

use axum::extract::{OriginalUri, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::SharedState;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");
const ICON: &str = include_str!("console/icon.svg");

/// Only this origin's own files and API; no inline script or style, no
/// plugins, no framing, no forms posted elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn asset(
    state: &SharedState,
    uri: &OriginalUri,
    content_type: &'static str,
    body: &'static str,
) -> Response {
    if state.config().admin.is_none() {
        return ApiError::not_found(Method::GET.as_str(), uri.path()).into_response();
    }
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn page(State(state): State<SharedState>, uri: OriginalUri) -> Response {
    asset(&state, &uri, "text/html; charset=utf-8", INDEX)
}

pub async fn script(State(state): State<SharedState>, uri: OriginalUri) -> Response {
    asset(&state, &uri, "text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style(State(state): State<SharedState>, uri: OriginalUri) -> Response {
    asset(&state, &uri, "text/css; charset=utf-8", STYLE)
}

/// The tab's icon: served here, since the policy refuses `data:` images and a
/// browser asks for `/favicon.ico` (a 404) when the page names none.
pub async fn icon(State(state): State<SharedState>, uri: OriginalUri) -> Response {
    asset(&state, &uri, "image/svg+xml", ICON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_small_and_loads_nothing_from_elsewhere() {
        let total = INDEX.len() + SCRIPT.len() + STYLE.len() + ICON.len();
        assert!(total < 200 * 1024, "{total} bytes");
        for text in [INDEX, SCRIPT, STYLE, ICON] {
            assert!(!text.contains("http://") || text.contains("http://www.w3.org/2000/svg"));
            assert!(!text.contains("https://"));
            assert!(!text.contains("innerHTML"), "values are rendered as text");
            assert!(!text.contains("localStorage."), "the key stays in the tab");
            assert!(
                !text.contains("document.cookie"),
                "the key stays in the tab"
            );
        }
        assert!(!INDEX.contains("<script>"), "no inline script");
        assert!(!INDEX.contains("style="), "no inline style");
    }
}
