//! The local control plane's admin endpoint: `POST /init`, `POST /add`, `DELETE /rm` with the
//! typed bodies of `shard_server::admin`, served on 127.0.0.1 for the router (`--control-url`),
//! or on the switch's gateway address when processes run in network namespaces (see `hosts`).
//! Each request is handed to the operator's main loop, which owns the declared configuration, and
//! the loop's answer (the seed body and status) goes back; [`LocalCluster::admin`] decides it
//! with `brain::declare`, saves the result and, for `/init`, starts the servers. Only the cluster's
//! router may call it (mutual TLS, see `pki`). Does I/O (HTTP).
//!
//! It also serves the topology document to processes that cannot follow the file (`GET
//! /topology?after=EPOCH`, a long poll: the document once its epoch is past `after`, or 204 after
//! [`TOPOLOGY_HOLD`]); the cluster's routers and servers alone may read it.

use super::declared::{Declared, save_declared};
use super::{DECLARED_FILE, LocalCluster, LocalError};
pub use crate::admin::AdminRequest;
use crate::admin::{JsonBody, Reply, leaving, refused};
use crate::brain::declare::{self, AdminError};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::Value;
use shard_server::admin::{AddRequest, InitRequest, RmRequest};
use shard_server::api::{ErrorBody, ErrorCode};
use shard_server::auth::{self, Gate};
use shard_server::tls::{Component, Credentials, TlsListener, TlsPeer};
use shard_server::topology_source::TopologyRx;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Longest a `GET /topology?after=N` waits for a newer document before answering 204 (its caller
/// asks again at once); well below any client's timeout.
pub const TOPOLOGY_HOLD: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AdminState {
    calls: mpsc::Sender<AdminCall>,
    topology: TopologyRx,
}

/// One admin request and where its answer goes.
#[derive(Debug)]
pub struct AdminCall {
    pub request: AdminRequest,
    pub reply: oneshot::Sender<(StatusCode, Value)>,
}

/// Serves the endpoint on `listener` until the loop's receiver is gone: over TLS with the
/// operator's certificate (or, with TLS off, checking the per-cluster secret), answering the
/// cluster's router alone (and, for `GET /topology`, its servers too); anyone else is refused
/// (401/403) before the request is read. `topology` follows the topology file.
pub fn serve(
    listener: tokio::net::TcpListener,
    credentials: &Credentials,
    calls: mpsc::Sender<AdminCall>,
    topology: TopologyRx,
) -> tokio::task::JoinHandle<()> {
    let mut gate = Gate::for_credentials(credentials).unwrap_or_else(Gate::nobody);
    if matches!(credentials, Credentials::Plain) {
        // `--internal-auth=none`: the previous release's routers call without credentials.
        gate = gate.accepting_plain(prometheus_client::metrics::counter::Counter::default());
    }
    let routers_only = axum::middleware::from_fn_with_state(gate.allow(&[Component::Router]), auth::require);
    let members =
        axum::middleware::from_fn_with_state(gate.allow(&[Component::Router, Component::Server]), auth::require);
    let app = axum::Router::new()
        .route("/init", post(init))
        .route("/add", post(add))
        .route("/rm", delete(rm))
        .route_layer(routers_only)
        .route("/topology", get(topology_document).route_layer(members))
        .fallback(crate::admin::no_route)
        .method_not_allowed_fallback(crate::admin::method_not_allowed)
        .layer(axum::middleware::from_fn(shard_server::protocol::versioned))
        .with_state(AdminState { calls, topology });
    let credentials = credentials.clone();
    tokio::spawn(async move {
        let served = match credentials {
            Credentials::Tls(source) => {
                let listener = TlsListener::new(listener, source.server_config());
                axum::serve(listener, app.into_make_service_with_connect_info::<TlsPeer>()).await
            }
            Credentials::Token { .. } | Credentials::Plain => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the admin endpoint stopped");
        }
    })
}

async fn call(calls: &mpsc::Sender<AdminCall>, request: AdminRequest) -> Response {
    let (reply, answer) = oneshot::channel();
    let unavailable = || {
        let body = ErrorBody::new(ErrorCode::Unavailable, "the operator is shutting down");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    if calls.send(AdminCall { request, reply }).await.is_err() {
        return unavailable();
    }
    match answer.await {
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(_) => unavailable(),
    }
}

async fn init(State(s): State<AdminState>, JsonBody(req): JsonBody<InitRequest>) -> Response {
    call(&s.calls, AdminRequest::Init(req)).await
}

async fn add(State(s): State<AdminState>, JsonBody(req): JsonBody<AddRequest>) -> Response {
    call(&s.calls, AdminRequest::Add(req)).await
}

async fn rm(State(s): State<AdminState>, JsonBody(req): JsonBody<RmRequest>) -> Response {
    call(&s.calls, AdminRequest::Rm(req)).await
}

#[derive(serde::Deserialize)]
struct TopologyQuery {
    /// Answer only with a document of a later epoch (waiting up to [`TOPOLOGY_HOLD`] for one).
    after: Option<u64>,
}

/// `GET /topology[?after=EPOCH]`: the current document, once it is newer than `after`; 204 when
/// none is within [`TOPOLOGY_HOLD`] (or there is no topology yet).
async fn topology_document(State(s): State<AdminState>, Query(q): Query<TopologyQuery>) -> Response {
    let mut rx = s.topology.clone();
    let newer = |t: &Option<std::sync::Arc<shard_server::topology::Topology>>| {
        t.as_ref().is_some_and(|t| q.after.is_none_or(|after| t.epoch > after))
    };
    let document = match tokio::time::timeout(TOPOLOGY_HOLD, rx.wait_for(newer)).await {
        Ok(Ok(t)) => t.as_ref().map(|t| t.to_json_pretty()),
        _ => None,
    };
    match document {
        Some(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

impl LocalCluster {
    /// Decides one admin request against the declared configuration and answers it.
    pub(super) async fn admin(&mut self, call: AdminCall) {
        let answer = self.decide(call.request).await;
        let _ = call.reply.send(answer);
    }

    async fn decide(&mut self, request: AdminRequest) -> (StatusCode, Value) {
        let current = self.declared.as_ref().map(|d| &d.spec);
        let outcome = match request {
            AdminRequest::Init(req) => declare::init(current, &req).map(|spec| (spec, Reply::Init)),
            AdminRequest::Add(req) => {
                let leaving = match (self.read_topology(), current) {
                    (Some(t), Some(c)) => leaving(c, t.servers.keys()),
                    _ => Default::default(),
                };
                declare::add(current, &leaving, &req).map(|(spec, added)| (spec, Reply::Add(added)))
            }
            AdminRequest::Rm(req) => declare::rm(current, &req).map(|(spec, removed)| (spec, Reply::Rm(removed))),
        };
        let (spec, reply) = match outcome {
            Ok(ok) => ok,
            Err(e) => return refused(&e),
        };
        let declared = match Declared::new(spec) {
            Ok(d) => d,
            Err(e) => return refused(&AdminError::Invalid(e.to_string())),
        };
        if let Err(e) = save_declared(&self.dir, &declared.spec) {
            return internal(&e);
        }
        let servers = declared.placement.servers.len();
        tracing::info!(?reply, servers, "declared configuration changed");
        self.declared = Some(declared.clone());
        match reply {
            Reply::Init => match self.start_servers(&declared.db, &declared.placement).await {
                Ok(()) => {
                    if let Err(e) = self.write_cluster_file() {
                        tracing::error!(error = %e, "cannot update cluster.json");
                    }
                    // The client reads next: its primaries need their leases (see `leases`).
                    self.leases.grant_now(self.read_topology().as_ref()).await;
                    Reply::Init.answer(servers)
                }
                Err(e) => {
                    // Undo it all, so that /init can be retried: nothing half-configured stays.
                    let answer = internal(&e);
                    for name in self.servers.iter().map(|s| s.name.clone()).collect::<Vec<_>>() {
                        self.remove_server(&name).await;
                    }
                    for file in [self.dir.join(DECLARED_FILE), self.topology_path()] {
                        let _ = std::fs::remove_file(file);
                    }
                    self.declared = None;
                    answer
                }
            },
            reply => reply.answer(servers),
        }
    }
}

/// The answer to an admin request we failed to carry out; the detail goes to the log.
fn internal(e: &LocalError) -> (StatusCode, Value) {
    // The whole chain: "failed to initialise postgres for Server1" alone does not say why.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        detail.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    tracing::error!(error = %detail, "admin request failed");
    crate::admin::internal()
}
