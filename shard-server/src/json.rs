//! Extractors that speak our error body. [`JsonBody`]: any Content-Type is accepted (the seed's
//! clients use `curl -d`, which sends a form content type), malformed JSON is a 400 naming the
//! problem, an oversized body a 413. [`Query`] and [`PathParam`]: an unreadable query string or
//! path parameter is a 400 naming the problem, never axum's plain-text rejection. No I/O beyond
//! reading the body.

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use std::time::Duration;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limits = req.extensions().get::<BodyLimit>().copied();
        let limit = limits.map_or(usize::MAX, |l| l.bytes);
        let timeout = limits.map_or(Duration::MAX, |l| l.timeout);
        let read = Bytes::from_request(req, state);
        let bytes = match tokio::time::timeout(timeout, read).await {
            Ok(read) => read.map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::bad_request(format!("cannot read the request body: {e}"))
                }
            })?,
            Err(_) => return Err(ApiError::BodyTimeout { timeout }),
        };
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body, naming what is wrong.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty; a JSON object is expected"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// The configured body limits (size, and time to arrive in full), put in request extensions.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit {
    pub bytes: usize,
    pub timeout: Duration,
}

/// A query string parsed into `T`; a 400 in our error body when it does not parse.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::bad_request(format!("query string: {}", e.body_text())))
    }
}

/// Path parameters parsed into `T`; a 400 in our error body when they do not parse.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParam(p.0))
            .map_err(|e| ApiError::bad_request(format!("path: {}", e.body_text())))
    }
}
