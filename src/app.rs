//! The application: shared state and the one place the router and its layer
//! stack are built.

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::access_log::{self, NewRequestId};
use crate::auth_throttle::AuthFailures;
use crate::budget::Budgets;
use crate::clients::{self, ManagedClients};
use crate::config::Config;
use crate::error::{ApiError, ErrorCode, Relayed};
use crate::gateway::Gateway;
use crate::images::Images;
use crate::metrics::Metrics;
use crate::routes;
use crate::routing::health::{Health, REFRESH_EVERY};
use crate::routing::queue::Queues;
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
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Builds the state from a validated config. Async because it opens the
    /// budget store (loading its file, starting its background writer).
    pub async fn new(config: Config) -> Result<Self, String> {
        let forwarder = Forwarder::new().map_err(|e| format!("HTTP client: {e}"))?;
        // Metrics first, so the image metrics' descriptions reach the recorder.
        let metrics = Metrics::install();
        let budgets = Budgets::open(&config.store).await?;
        let images = Images::new(&config.images)?;
        for upstream in config.catalog.upstreams() {
            if matches!(upstream.endpoint, Endpoint::Demo) {
                tracing::info!(
                    upstream = %upstream.name,
                    "a demo upstream answers in-process: no model behind it"
                );
            }
        }
        let health = Arc::new(Health::new(Arc::clone(budgets.store())));
        let clients = ManagedClients::start(clients::open(&config.store.backend)?).await;
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
                drain: CancellationToken::new(),
            },
            metrics,
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

/// The router with every route and layer.
pub fn app(state: SharedState) -> Router {
    let max_body_bytes = state.config().server.max_body_bytes;
    let request_id = HeaderName::from_static(access_log::REQUEST_ID);
    // Layers in the order a request meets them (ServiceBuilder runs the
    // first one added first):
    let layers = ServiceBuilder::new()
        // 1. the request id: the client's if acceptable, else a new one...
        .layer(axum::middleware::map_request(
            access_log::drop_unacceptable_request_id,
        ))
        .layer(SetRequestIdLayer::new(request_id.clone(), NewRequestId))
        // 2. ...stamped on every response, errors of the layers below included;
        .layer(PropagateRequestIdLayer::new(request_id))
        // 3. a span per request, so every log line of it names the request;
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // 4. the request log line and metrics, seeing every final response;
        .layer(axum::middleware::from_fn(access_log::access_log))
        // 5. a handler that panics answers 500, and only its own request;
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("request handler panicked");
            ApiError::internal().into_response()
        }))
        // 6. bodies over the limit: 413, at once when Content-Length says
        //    so, else as the body streams in (the handler's read fails).
        .layer(axum::middleware::map_response_with_state(
            max_body_bytes,
            render_bare_413,
        ))
        .layer(RequestBodyLimitLayer::new(max_body_bytes));
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*id}", get(routes::models::retrieve))
        .route("/v1/usage", get(routes::usage::usage))
        .route("/v1/responses", any(routes::responses::reject))
        .route("/v1/responses/{*rest}", any(routes::responses::reject))
        .route(
            "/admin/clients",
            get(routes::admin::list_clients).post(routes::admin::create_client),
        )
        .route(
            "/admin/clients/{name}",
            axum::routing::patch(routes::admin::change_client).delete(routes::admin::delete_client),
        )
        .route(
            "/admin/clients/{name}/rotate",
            post(routes::admin::rotate_client),
        )
        .route("/admin/reload", post(routes::admin::reload))
        .route("/admin/upstreams", get(routes::admin::upstreams))
        .route("/admin", any(routes::admin::not_found))
        .route("/admin/{*rest}", any(routes::admin::not_found))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(layers)
        .with_state(state)
}

fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .headers()
        .get(access_log::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if crate::traces::enabled() {
        return crate::traces::request_span(request, id);
    }
    tracing::info_span!("request", request_id = id)
}

/// tower-http's body limit answers 413 in plain text; Iris answers every
/// error in OpenAI's shape.
async fn render_bare_413<B>(State(limit): State<usize>, response: Response<B>) -> Response
where
    Response<B>: IntoResponse,
{
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response.extensions().get::<ErrorCode>().is_none()
        && response.extensions().get::<Relayed>().is_none()
    {
        return ApiError::request_too_large(limit).into_response();
    }
    response.into_response()
}
