//! sharddb router: the stateless HTTP front door speaking the seed load-balancer API. Routes each
//! key to its shard by range, sends writes to the shard's primary, reads from a ready replica
//! chosen by a consistent-hash ring, and follows topology changes without restart.
//! [`app`] builds the HTTP service; `main.rs` serves it.

pub mod app_state;
pub mod batch;
pub mod coalesce;
pub mod config;
pub mod control;
pub mod error;
pub mod metrics;
pub mod ring;
pub mod routes;
pub mod routing;
pub mod scatter;
pub mod state;
pub mod upstream;

pub use app_state::AppState;
pub use config::Config;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{delete, get, post, put};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

/// The router's HTTP service over `state`.
pub fn app(state: AppState) -> Router {
    let body_limit = state.config().body_limit;
    let admin_token = middleware::from_fn_with_state(state.clone(), routes::admin::require_token);
    Router::new()
        // The seed's assignment lists `GET /read` in its figure and `POST /read` in its text.
        .route("/read", post(routes::read::read).get(routes::read::read))
        .route("/write", post(routes::write::write))
        .route("/update", put(routes::write::update))
        .route("/del", delete(routes::write::del))
        .route("/init", post(routes::admin::init).route_layer(admin_token.clone()))
        .route("/add", post(routes::admin::add).route_layer(admin_token.clone()))
        .route("/rm", delete(routes::admin::rm).route_layer(admin_token))
        .route("/status", get(routes::status::status))
        .route("/healthz", get(routes::status::healthz))
        .route("/readyz", get(routes::status::readyz))
        .route("/metrics", get(routes::status::metrics))
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.metrics().clone(), metrics::track))
        // Failures are logged once, with their cause, by `RouterError`; the trace layer only adds
        // request spans.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
        .layer(middleware::from_fn(shard_server::protocol::versioned))
        .with_state(state)
}
