//! The router's failures and their one mapping to HTTP: status, `ErrorBody` JSON, and what goes to
//! the log. 4xx bodies say what the caller did wrong; 5xx bodies are generic and the detail is
//! logged. No I/O beyond logging.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shard_server::api::{ErrorBody, ErrorCode};

/// The message every 503 carries; the cause goes to the log.
pub const UNAVAILABLE_MESSAGE: &str = "the database is temporarily unavailable; retry shortly";
/// The message every 500 carries; the cause goes to the log.
pub const INTERNAL_MESSAGE: &str = "internal error; the details are in the router's log";

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request breaks a rule; the text names the field, row or key.
    #[error("{0}")]
    BadRequest(String),
    /// A key the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Keys already hold different rows; `message` names them.
    #[error("{message}")]
    Conflict { message: String, keys: Vec<i64> },
    /// The body (or a shard's part of it) is larger than accepted; the text says which limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body did not arrive in full within the body timeout.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("no endpoint {method} {path}")]
    NoRoute { method: String, path: String },
    /// An admin verb without the bearer token this router requires.
    #[error("{0}")]
    Unauthenticated(String),
    /// The endpoint needs something this router was not given (e.g. a control plane).
    #[error("{0}")]
    NotImplemented(String),
    /// No topology has been loaded since start.
    #[error("no topology is loaded yet; retry shortly")]
    NoTopology,
    /// Shard servers could not be reached or kept refusing within the retry budget.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected answer from a shard server.
    #[error("internal: {0}")]
    Internal(String),
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RouterError::NotFound(_) | RouterError::NoRoute { .. } => StatusCode::NOT_FOUND,
            RouterError::Conflict { .. } => StatusCode::CONFLICT,
            RouterError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RouterError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RouterError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            RouterError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            RouterError::NoTopology | RouterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            RouterError::BadRequest(_) => ErrorCode::BadRequest,
            RouterError::NotFound(_) | RouterError::NoRoute { .. } => ErrorCode::NotFound,
            RouterError::Conflict { .. } => ErrorCode::Conflict,
            RouterError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            RouterError::RequestTimeout(_) => ErrorCode::RequestTimeout,
            RouterError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            RouterError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            RouterError::NotImplemented(_) => ErrorCode::NotImplemented,
            RouterError::NoTopology | RouterError::Unavailable(_) => ErrorCode::Unavailable,
            RouterError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The body sent to the caller.
    pub fn body(&self) -> ErrorBody {
        let mut body = match self {
            RouterError::Unavailable(_) => ErrorBody::new(self.code(), UNAVAILABLE_MESSAGE),
            RouterError::Internal(_) => ErrorBody::new(self.code(), INTERNAL_MESSAGE),
            other => ErrorBody::new(self.code(), other),
        };
        if let RouterError::Conflict { keys, .. } = self {
            body.keys = keys.clone();
        }
        body
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        match &self {
            RouterError::Internal(detail) => tracing::error!(%detail, "request failed"),
            RouterError::Unavailable(detail) => tracing::warn!(%detail, "request failed"),
            _ => tracing::debug!(error = %self, "request rejected"),
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let RouterError::Unauthenticated(_) = self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"sharddb\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_explain_and_server_errors_stay_generic() {
        let b = RouterError::BadRequest("data[2]: column x is not in the schema".into()).body();
        assert_eq!(b.message, "<Error> data[2]: column x is not in the schema");
        assert_eq!(b.status, "failure");
        assert_eq!(b.code, ErrorCode::BadRequest);

        let e = RouterError::Internal("shard sh1 answered garbage from http://10.0.0.7:5000".into());
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body().message.contains("10.0.0.7"), "no detail leaks into a 5xx body");
        let e = RouterError::Unavailable("http://10.0.0.7:5000 refused".into());
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.body().message.contains("10.0.0.7"));

        let c = RouterError::Conflict { message: "Stud_id 3, 5 already hold different rows".into(), keys: vec![3, 5] };
        let json = serde_json::to_value(c.body()).unwrap();
        assert_eq!(json["keys"], serde_json::json!([3, 5]));
        assert_eq!(json["code"], "conflict");
        assert_eq!(RouterError::NoTopology.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(RouterError::NoTopology.body().message.contains("no topology is loaded yet"));
    }
}
