//! What both bodies' admin endpoints share: the requests, and the seed's answers to them. Each
//! body decides a request with `brain::declare` against its own declared configuration (the
//! local `declared.json`, or the `ShardedDatabase` resource) and answers with these shapes, which
//! the router relays unchanged; and the body extractor and fallbacks that keep every answer of
//! both endpoints in the error shape (a malformed body, an unknown path or a wrong method too).
//! Pure, apart from reading a request body.

use crate::brain::declare::AdminError;
use crate::crd::ShardedDatabaseSpec;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
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

/// A refused request in the error shape.
#[derive(Debug)]
pub struct Rejection(pub StatusCode, pub Value);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// A JSON request body, whatever its `Content-Type`; a body that cannot be read or parsed is a 400
/// (413 when too large) in the error shape, naming the problem.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Rejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::PayloadTooLarge
            } else {
                ErrorCode::BadRequest
            };
            let (status, body) = error(status, code, format!("cannot read the request body: {}", e.body_text()));
            Rejection(status, body)
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            let (status, body) =
                error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("malformed JSON body: {e}"));
            Rejection(status, body)
        })
    }
}

/// The `{namespace}/{name}` of a database in the path, refused in the error shape when unreadable.
pub struct DatabasePath(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for DatabasePath {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Rejection> {
        let axum::extract::Path((namespace, name)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state).await.map_err(|e| {
                let (status, body) = error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.body_text());
                Rejection(status, body)
            })?;
        Ok(DatabasePath(namespace, name))
    }
}

/// Fallback for a path the endpoint does not serve.
pub async fn no_route(method: Method, uri: Uri) -> Rejection {
    let (status, body) =
        error(StatusCode::NOT_FOUND, ErrorCode::NotFound, format!("no endpoint {method} {}", uri.path()));
    Rejection(status, body)
}

/// Fallback for a served path asked with another method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Rejection {
    let message = format!("method {method} is not allowed on {}", uri.path());
    let (status, body) = error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed, message);
    Rejection(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;

    async fn ask(base: &str, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        let http = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http
            .request(method, format!("{base}{path}"))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text:?}")))
    }

    #[tokio::test]
    async fn every_refusal_is_in_the_error_shape() {
        async fn rm(DatabasePath(ns, name): DatabasePath, JsonBody(req): JsonBody<RmRequest>) -> String {
            format!("{ns}/{name}: {}", req.n)
        }
        let app = axum::Router::new()
            .route("/databases/{namespace}/{name}/rm", post(rm))
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed);
        shard_server::api::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cases = [
            ("POST", "/databases/a/b/rm", "text/plain", r#"{"n": "x"}"#, 400, "malformed JSON body: invalid type"),
            ("POST", "/databases/a/b/rm", "application/json", "{", 400, "malformed JSON body: EOF"),
            ("POST", "/nowhere", "application/json", "{}", 404, "no endpoint POST /nowhere"),
            ("GET", "/databases/a/b/rm", "application/json", "", 405, "method GET is not allowed on /databases/a/b/rm"),
        ];
        for (method, uri, ct, body, want, message) in cases {
            let (status, json) = ask(&base, method, uri, ct, body).await;
            assert_eq!(status, want, "{method} {uri}: {json}");
            assert_eq!(json["status"], "failure");
            let got = json["message"].as_str().unwrap();
            assert!(got.starts_with(&format!("<Error> {message}")), "{got}");
        }
    }
}
