//! The local control plane's admin endpoint: `POST /init`, `POST /add`, `DELETE /rm` with the
//! typed bodies of `shard_server::admin`, served on 127.0.0.1 for the router (`--control-url`).
//! Each request is handed to the operator's main loop, which owns the declared configuration, and
//! the loop's answer (the seed body and status) goes back. Does I/O (HTTP).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use serde_json::Value;
use shard_server::admin::{AddRequest, InitRequest, RmRequest};
use shard_server::api::{ErrorBody, ErrorCode};
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
