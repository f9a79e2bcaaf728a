//! The Kubernetes body's admin endpoint: the seed's `/init`, `/add` and `/rm`, changing the
//! `ShardedDatabase` resource. Routers built by the operator forward these verbs here
//! (`--control-url`), as the local router forwards them to the local control plane. Does I/O.
//!
//! # Design
//! - **The database is in the path**: `POST /databases/{namespace}/{name}/init`,
//!   `POST …/add`, `DELETE …/rm`, with the bodies and answers of the local endpoint
//!   (`crate::admin`). A router's control URL is `…/databases/{namespace}/{name}`, so the router
//!   only appends the verb, whatever serves it. Headers would hide the database from logs and
//!   proxies; the path names it.
//! - **The resource is the declared configuration.** A request reads the `ShardedDatabase`,
//!   decides with `brain::declare` on its spec, checks the result against the operator's defaults
//!   (what the reconcile will validate), and replaces the resource at the resourceVersion it
//!   read. A concurrent change (`kubectl edit`, another request) makes the replace fail with a
//!   conflict and the request is decided again from the newer spec, so two requests never undo
//!   each other. A refused request (400/409) writes nothing.
//! - **Accepting is not carrying out**: the answer comes once the spec is stored; the reconcile
//!   then starts new servers' pods, and the healer fills them, drains removed servers and only
//!   then lets the reconcile delete their StatefulSets. The resource's status says when the
//!   database is `Ready` again (`PlacementChanging` until the topology matches the spec).
//! - **`/init` answers 409 here**: the resource is created with its configuration, so the seed's
//!   `/init` never applies to an existing one. A database that does not exist answers 404.
//! - Every operator replica serves the endpoint, leader or not: a request only writes the spec,
//!   at a version, which any replica may do safely.
//! - **Only the database's own routers.** The endpoint serves TLS with the operator's certificate
//!   (`k8s::pki`) and checks every client's certificate against the CAs of the databases it
//!   manages; a request for `/databases/{namespace}/{name}/…` is then answered only when the
//!   certificate names the router of exactly that database. No certificate: 401; any other
//!   component or database: 403; a certificate of an unknown CA does not complete the handshake.
//!   Nothing of a refused request is read. The chart's NetworkPolicy admits only router pods to
//!   the port as well, where the CNI enforces it.
//! - **A database in internal-auth `none`** (taken over from a release before internal
//!   authentication, or so set) has routers with no certificate. The port serves plain HTTP
//!   beside TLS (the first byte decides, as a shard server in `migrate` does), and a plain
//!   request is answered only when the database its path names is in `none` (as the operator's
//!   [`OperatorPki`] knows it); for any other database it is a 401.

use super::build::Owner;
use super::pki::OperatorPki;
use super::topology;
use crate::admin::{AdminRequest, DatabasePath, JsonBody, Reply, error, internal, leaving, refused};
use crate::brain::declare::{self, AdminError};
use crate::brain::validate::{Images, validate_with_defaults};
use crate::crd::ShardedDatabase;
use axum::Json;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::Value;
use shard_server::admin::{AddRequest, InitRequest, RmRequest};
use shard_server::api::ErrorCode;
use shard_server::tls::{Component, DatabaseId, TlsPeer};
use std::sync::Arc;

/// How many times a request is decided again when the resource changed meanwhile.
const ATTEMPTS: usize = 5;

/// What the endpoint needs.
#[derive(Clone)]
pub struct AdminState {
    client: Client,
    /// Which databases are in internal-auth `none`.
    pki: Arc<OperatorPki>,
    /// The operator's default images, so a change is validated as the reconcile will.
    images: Arc<Images>,
}

/// The path a database's admin verbs are served under, relative to the endpoint's base URL.
pub fn database_path(namespace: &str, name: &str) -> String {
    format!("/databases/{namespace}/{name}")
}

/// The endpoint's routes. Serve them with `shard_server::serve::serve_migrate` and the TLS
/// configuration of `pki`, as `sharddb-operator run` does: a request over TLS carries its
/// [`TlsPeer`]; one over plain HTTP carries none and is answered for databases in `none` only.
pub fn router(client: Client, images: Images, pki: Arc<OperatorPki>) -> axum::Router {
    let state = AdminState { client, images: Arc::new(images), pki };
    axum::Router::new()
        .route("/databases/{namespace}/{name}/init", post(init))
        .route("/databases/{namespace}/{name}/add", post(add))
        .route("/databases/{namespace}/{name}/rm", delete(rm))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), only_its_routers))
        .fallback(crate::admin::no_route)
        .method_not_allowed_fallback(crate::admin::method_not_allowed)
        .layer(axum::middleware::from_fn(shard_server::protocol::versioned))
        .with_state(state)
}

/// Admits a request only from the router of the database its path names.
async fn only_its_routers(
    State(state): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    let (namespace, name) = match path[..] {
        ["databases", namespace, name, _] => (namespace.to_owned(), name.to_owned()),
        _ => return answer(error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such endpoint")),
    };
    let over_tls = req.extensions().get::<ConnectInfo<TlsPeer>>().map(|c| c.0.identity.clone());
    let refusal = match over_tls {
        // Plain HTTP: the routers of a database in `none` present nothing, and nothing is asked.
        None if state.pki.is_plain(&DatabaseId::new(namespace.as_str(), name.as_str())) => None,
        None => Some((
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            format!(
                "only the routers of {namespace}/{name} may change it: call over TLS with their client certificate"
            ),
        )),
        Some(None) => Some((
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            format!("only the routers of {namespace}/{name} may change it: present their client certificate"),
        )),
        Some(Some(id))
            if id.component == Component::Router && id.database.namespace == namespace && id.database.name == name =>
        {
            None
        }
        Some(Some(id)) => Some((
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("only the routers of {namespace}/{name} may change it, not the {id}"),
        )),
    };
    match refusal {
        None => next.run(req).await,
        Some((status, code, message)) => {
            tracing::info!(%namespace, %name, %message, "admin request refused");
            answer(error(status, code, message))
        }
    }
}

async fn init(
    State(state): State<AdminState>,
    DatabasePath(namespace, name): DatabasePath,
    JsonBody(req): JsonBody<InitRequest>,
) -> Response {
    answer(decide(&state, &namespace, &name, AdminRequest::Init(req)).await)
}

async fn add(
    State(state): State<AdminState>,
    DatabasePath(namespace, name): DatabasePath,
    JsonBody(req): JsonBody<AddRequest>,
) -> Response {
    answer(decide(&state, &namespace, &name, AdminRequest::Add(req)).await)
}

async fn rm(
    State(state): State<AdminState>,
    DatabasePath(namespace, name): DatabasePath,
    JsonBody(req): JsonBody<RmRequest>,
) -> Response {
    answer(decide(&state, &namespace, &name, AdminRequest::Rm(req)).await)
}

fn answer((status, body): (StatusCode, Value)) -> Response {
    (status, Json(body)).into_response()
}

/// Decides `request` against the resource and stores the result; retried from a fresh read when
/// the resource changed between the read and the write.
pub async fn decide(state: &AdminState, namespace: &str, name: &str, request: AdminRequest) -> (StatusCode, Value) {
    let api: Api<ShardedDatabase> = Api::namespaced(state.client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let db = match api.get_opt(name).await {
            Ok(Some(db)) => db,
            Ok(None) => {
                let message = format!("ShardedDatabase {namespace}/{name} does not exist");
                return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, message);
            }
            Err(e) => {
                tracing::error!(%namespace, %name, error = %e, "cannot read the ShardedDatabase");
                return internal();
            }
        };
        let current = &db.spec;
        let outcome = match &request {
            AdminRequest::Init(req) => declare::init(Some(current), req).map(|spec| (spec, Reply::Init)),
            AdminRequest::Add(req) => {
                let present = match Owner::of(&db) {
                    Some(owner) => match topology::read(&state.client, &owner).await {
                        Ok(published) => published.and_then(|p| p.topology).map(|t| t.servers).unwrap_or_default(),
                        Err(e) => {
                            tracing::error!(%namespace, %name, error = %e, "cannot read the topology");
                            return internal();
                        }
                    },
                    None => Default::default(),
                };
                declare::add(Some(current), &leaving(current, present.keys()), req)
                    .map(|(spec, added)| (spec, Reply::Add(added)))
            }
            AdminRequest::Rm(req) => declare::rm(Some(current), req).map(|(spec, removed)| (spec, Reply::Rm(removed))),
        };
        let (spec, reply) = match outcome {
            Ok(ok) => ok,
            Err(e) => return refused(&e),
        };
        let servers = match validate_with_defaults(&spec, &state.images) {
            Ok(valid) => valid.server_count(),
            Err(e) => return refused(&AdminError::Invalid(e.to_string())),
        };
        let mut next = db.clone();
        next.spec = spec;
        // `db` carries the resourceVersion read: the replace fails if anything changed since.
        match api.replace(name, &PostParams::default(), &next).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, ?reply, servers, "ShardedDatabase spec changed by an admin request");
                return reply.answer(servers);
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                tracing::debug!(%namespace, %name, "the ShardedDatabase changed meanwhile; deciding again");
            }
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                // The API server's own validation (the CRD schema) refused it.
                return refused(&AdminError::Invalid(s.message));
            }
            Err(e) => {
                tracing::error!(%namespace, %name, error = %e, "cannot update the ShardedDatabase");
                return internal();
            }
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!("ShardedDatabase {namespace}/{name} kept changing while this request was decided; retry"),
    )
}
