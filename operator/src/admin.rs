//! What both bodies' admin endpoints share: the requests, and the seed's answers to them. Each
//! body decides a request with `brain::declare` against its own declared configuration (the
//! local `declared.json`, or the `ShardedDatabase` resource) and answers with these shapes, which
//! the router relays unchanged. Pure.

use crate::brain::declare::AdminError;
use crate::crd::ShardedDatabaseSpec;
use axum::http::StatusCode;
use serde_json::{Value, json};
use shard_server::admin::{AddRequest, InitRequest, RmRequest};
use shard_server::api::{ErrorBody, ErrorCode};
use std::collections::BTreeSet;

/// One admin verb with its parsed body.
#[derive(Debug)]
pub enum AdminRequest {
    Init(InitRequest),
    Add(AddRequest),
    Rm(RmRequest),
}

/// What a successful admin request answers with.
#[derive(Debug)]
pub enum Reply {
    Init,
    /// The servers added, as named in the spec.
    Add(Vec<String>),
    /// The servers removed.
    Rm(Vec<String>),
}

impl Reply {
    /// The seed's success body; `servers` is how many servers are declared after the change.
    pub fn answer(&self, servers: usize) -> (StatusCode, Value) {
        match self {
            Reply::Init => (StatusCode::OK, json!({"message": "Configured Database", "status": "success"})),
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

/// Whether `spec` declares a server called `name`.
pub fn declared_server(spec: &ShardedDatabaseSpec, name: &str) -> bool {
    match &spec.placement {
        Some(p) => p.contains_key(name),
        None => (0..spec.servers).any(|i| crate::brain::placement::server_name(i as usize) == name),
    }
}

/// Servers still in the topology (`present`) that `spec` no longer declares: being drained, so
/// `/add` may not reuse their names yet.
pub fn leaving<'a>(spec: &ShardedDatabaseSpec, present: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    present.into_iter().filter(|n| !declared_server(spec, n)).cloned().collect()
}

/// The answer to a refused admin request: 409 when it conflicts with the state, else 400.
pub fn refused(e: &AdminError) -> (StatusCode, Value) {
    let (status, code) = if e.is_conflict() {
        (StatusCode::CONFLICT, ErrorCode::Conflict)
    } else {
        (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
    };
    error(status, code, e)
}

/// An error answer in the API's error shape.
pub fn error(status: StatusCode, code: ErrorCode, message: impl std::fmt::Display) -> (StatusCode, Value) {
    (status, serde_json::to_value(ErrorBody::new(code, message)).expect("an error body serialises"))
}

/// The answer to an admin request that could not be carried out; the caller logs the detail.
pub fn internal() -> (StatusCode, Value) {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "internal error; the details are in the operator's log",
    )
}
