//! The local control plane's admin endpoint: `POST /init`, `POST /add`, `DELETE /rm` with the
//! typed bodies of `shard_server::admin`, served on 127.0.0.1 for the router (`--control-url`).
//! Each request is handed to the operator's main loop, which owns the declared configuration, and
//! the loop's answer (the seed body and status) goes back; [`LocalCluster::admin`] decides it
//! with `brain::declare`, saves the result and, for `/init`, starts the servers. Does I/O (HTTP).

use super::declared::{Declared, save_declared};
use super::{DECLARED_FILE, LocalCluster, LocalError};
use crate::brain::declare::{self, AdminError};
use crate::crd::ShardedDatabaseSpec;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use serde_json::{Value, json};
use shard_server::admin::{AddRequest, InitRequest, RmRequest};
use shard_server::api::{ErrorBody, ErrorCode};
use std::collections::BTreeSet;
use tokio::sync::{mpsc, oneshot};

/// One admin request and where its answer goes.
#[derive(Debug)]
pub struct AdminCall {
    pub request: AdminRequest,
    pub reply: oneshot::Sender<(StatusCode, Value)>,
}

#[derive(Debug)]
pub enum AdminRequest {
    Init(InitRequest),
    Add(AddRequest),
    Rm(RmRequest),
}

/// Serves the endpoint on `listener` until the loop's receiver is gone.
pub fn serve(listener: tokio::net::TcpListener, calls: mpsc::Sender<AdminCall>) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/init", post(init))
        .route("/add", post(add))
        .route("/rm", delete(rm))
        .with_state(calls);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
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

async fn init(State(calls): State<mpsc::Sender<AdminCall>>, Json(req): Json<InitRequest>) -> Response {
    call(&calls, AdminRequest::Init(req)).await
}

async fn add(State(calls): State<mpsc::Sender<AdminCall>>, Json(req): Json<AddRequest>) -> Response {
    call(&calls, AdminRequest::Add(req)).await
}

async fn rm(State(calls): State<mpsc::Sender<AdminCall>>, Json(req): Json<RmRequest>) -> Response {
    call(&calls, AdminRequest::Rm(req)).await
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
                let leaving: BTreeSet<String> = self
                    .read_topology()
                    .map(|t| {
                        t.servers.into_keys().filter(|n| !current.is_some_and(|c| declared_server(c, n))).collect()
                    })
                    .unwrap_or_default();
                declare::add(current, &leaving, &req).map(|(spec, added)| (spec, Reply::Add(added)))
            }
            AdminRequest::Rm(req) => declare::rm(current, &req).map(|(spec, removed)| (spec, Reply::Rm(removed))),
        };
        let (spec, reply) = match outcome {
            Ok(ok) => ok,
            Err(e) => return refused(e),
        };
        let declared = match Declared::new(spec) {
            Ok(d) => d,
            Err(e) => return refused(AdminError::Invalid(e.to_string())),
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
                    (StatusCode::OK, json!({"message": "Configured Database", "status": "success"}))
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
            Reply::Add(added) => {
                let names: Vec<String> = added.iter().map(|n| shard_server::admin::seed_display(n)).collect();
                let message = format!("Add {}", names.join(" and "));
                (StatusCode::OK, json!({"N": servers, "message": message, "status": "successful"}))
            }
            Reply::Rm(removed) => {
                (StatusCode::OK, json!({"message": {"N": servers, "servers": removed}, "status": "successful"}))
            }
        }
    }
}

/// What a successful admin request answers with.
#[derive(Debug)]
enum Reply {
    Init,
    Add(Vec<String>),
    Rm(Vec<String>),
}

fn declared_server(spec: &ShardedDatabaseSpec, name: &str) -> bool {
    match &spec.placement {
        Some(p) => p.contains_key(name),
        None => (0..spec.servers).any(|i| crate::brain::placement::server_name(i as usize) == name),
    }
}

/// The answer to a refused admin request: 409 when it conflicts with the state, else 400.
fn refused(e: AdminError) -> (StatusCode, Value) {
    let (status, code) = if e.is_conflict() {
        (StatusCode::CONFLICT, ErrorCode::Conflict)
    } else {
        (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
    };
    (status, serde_json::to_value(ErrorBody::new(code, &e)).expect("an error body serialises"))
}

/// The answer to an admin request we failed to carry out; the detail goes to the log.
fn internal(e: &LocalError) -> (StatusCode, Value) {
    tracing::error!(error = %e, "admin request failed");
    let body = ErrorBody::new(ErrorCode::Internal, "internal error; the details are in the operator's log");
    (StatusCode::INTERNAL_SERVER_ERROR, serde_json::to_value(body).expect("an error body serialises"))
}
