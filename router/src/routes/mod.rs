//! HTTP handlers of the seed load-balancer API and the router's own endpoints, plus the request
//! body extractor and the 404/405 fallbacks. Handlers do I/O through `upstream` and `scatter`.

pub mod admin;
pub mod read;
pub mod status;
pub mod write;

use crate::app_state::AppState;
use crate::error::RouterError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;

/// A JSON request body read regardless of `Content-Type` (the seed's clients use `curl -d`, which
/// sends a form content type), so parse failures and oversized bodies answer our JSON errors.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = RouterError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, RouterError> {
        let timeout = state.config().body_timeout;
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state)).await.map_err(|_| {
            RouterError::RequestTimeout(format!("the request body did not arrive in full within {timeout:?}"))
        })?;
        let bytes = read.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                RouterError::PayloadTooLarge(format!(
                    "request body is larger than the limit of {} bytes",
                    state.config().body_limit
                ))
            } else {
                RouterError::BadRequest(format!("cannot read the request body: {}", rejection.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| RouterError::BadRequest(format!("malformed JSON body: {e}")))
    }
}

/// Fallback for paths with no endpoint.
pub async fn no_route(method: Method, uri: Uri) -> RouterError {
    RouterError::NoRoute { method: method.to_string(), path: uri.path().to_owned() }
}

/// Fallback for a known path asked with a method it does not serve.
pub async fn method_not_allowed(method: Method, uri: Uri) -> RouterError {
    RouterError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
}
