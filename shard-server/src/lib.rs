//! sharddb shard server: the data node. HTTP (axum) over one Postgres database holding shard
//! replicas, one table per shard. Also home of the wire contracts every other part uses:
//! [`api`] (bodies + typed client), [`schema`] (rows), [`topology`] (the routing document).

pub mod admin;
pub mod api;
pub mod auth;
pub mod db;
pub mod error;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod pgcopy;
pub mod protocol;
pub mod replication;
pub mod routes;
pub mod rowcache;
pub mod schema;
pub mod serve;
pub mod tls;
pub mod topology;
pub mod topology_source;

use crate::error::ApiError;
use crate::json::BodyLimit;
use crate::metrics::RequestLabels;
use crate::node::Node;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Instant;

/// Who may call what (see [`auth`]); the operator is accepted wherever any component is.
mod callers {
    use crate::tls::Component;
    /// The data path: routers (and the operator).
    pub const ROUTERS: &[Component] = &[Component::Router];
    /// Replication between copies: other shard servers (and the operator).
    pub const SERVERS: &[Component] = &[Component::Server];
    /// Reconfiguring and recovering: the operator alone.
    pub const OPERATOR: &[Component] = &[];
    /// What a shard holds (positions, checksums): servers, routers and the operator.
    pub const COMPONENTS: &[Component] = &[Component::Server, Component::Router];
}

/// The shard server's HTTP application. Every endpoint but `/heartbeat` (liveness) and
/// `/metrics` answers only the database's own components, each endpoint the ones listed with it.
pub fn app(node: Arc<Node>) -> Router {
    use callers::{COMPONENTS, OPERATOR, ROUTERS, SERVERS};
    let limit = node.config.body_limit;
    let gate = node.gate().clone();
    let only = |allowed| middleware::from_fn_with_state(gate.allow(allowed), auth::require);
    Router::new()
        .route("/config", post(routes::seed::config).route_layer(only(OPERATOR)))
        .route("/heartbeat", get(routes::seed::heartbeat))
        .route("/copy", get(routes::seed::copy).route_layer(only(ROUTERS)))
        .route("/read", post(routes::seed::read).route_layer(only(ROUTERS)))
        .route("/write", post(routes::seed::write).route_layer(only(ROUTERS)))
        .route("/update", axum::routing::put(routes::seed::update).route_layer(only(ROUTERS)))
        .route("/del", axum::routing::delete(routes::seed::del).route_layer(only(ROUTERS)))
        .route("/v1/shards/{shard}/write", post(routes::v1::write).route_layer(only(ROUTERS)))
        .route("/v1/shards/{shard}/write_batches", post(routes::v1::write_batches).route_layer(only(ROUTERS)))
        .route("/v1/shards/{shard}/read_ranges", post(routes::v1::read_ranges).route_layer(only(ROUTERS)))
        .route("/v1/shards/{shard}/replicate", post(routes::v1::replicate).route_layer(only(SERVERS)))
        .route("/v1/shards/{shard}/snapshot", get(routes::v1::snapshot).route_layer(only(SERVERS)))
        .route("/v1/shards/{shard}/stats", get(routes::v1::stats).route_layer(only(COMPONENTS)))
        .route("/v1/shards/{shard}/log", get(routes::v1::log).route_layer(only(SERVERS)))
        .route("/v1/shards/{shard}/recover", post(routes::v1::recover).route_layer(only(OPERATOR)))
        .route("/v1/lease", post(routes::v1::lease).route_layer(only(SERVERS)))
        // Primary leases are the operator's to grant (see `replication::lease`).
        .route("/v1/primary_lease", post(routes::v1::primary_lease).route_layer(only(OPERATOR)))
        .route("/status", get(routes::v1::status).route_layer(only(COMPONENTS)))
        .route("/metrics", get(routes::v1::metrics))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound { message: "no such endpoint".into(), keys: vec![] } })
        .layer(middleware::from_fn_with_state(Arc::clone(&node), observe))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit { bytes: limit, timeout: node.config.body_timeout }))
        .layer(middleware::from_fn(protocol::versioned))
        .with_state(node)
}

/// Counts and times every request by its route pattern (never the raw path: bounded cardinality).
async fn observe(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let labels = RequestLabels { route, status: resp.status().as_u16() };
    node.metrics.requests.get_or_create(&labels).inc();
    node.metrics.latency.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
    resp
}
