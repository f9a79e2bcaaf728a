//! The shard server's one error type and its single mapping to HTTP: 4xx bodies say what the caller
//! did wrong; 5xx bodies stay generic and the detail goes to the log.

use crate::api::{ClientError, ErrorBody, ErrorCode};
use crate::db::DbError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    Conflict { message: String, keys: Vec<i64> },
    #[error("{message}")]
    NotFound { message: String, keys: Vec<i64> },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive in full within {timeout:?}")]
    BodyTimeout { timeout: std::time::Duration },
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The caller showed no credential of this database's components.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("the sender's topology epoch {got} is older than ours ({ours})")]
    StaleEpoch { got: u64, ours: u64 },
    #[error("the sender's topology epoch {got} is newer than ours ({ours}); retry shortly")]
    EpochAhead { got: u64, ours: u64 },
    #[error("{server} is not the primary of shard {shard}")]
    NotPrimary { server: String, shard: String },
    #[error("entries start at {first} but this replica applied up to {applied}")]
    SeqGap { first: u64, applied: u64 },
    #[error(
        "this copy of shard {shard} differs from its primary's history at entry {seq} ({detail}): it gave up its \
         copy and must be copied afresh"
    )]
    Diverged { shard: String, seq: u64, detail: String },
    #[error("{0}")]
    NotReady(String),
    #[error("database error")]
    Db(#[from] DbError),
    #[error("replica {replica} of shard {shard} did not apply up to seq {seq}")]
    Replication {
        shard: String,
        replica: String,
        seq: u64,
        #[source]
        source: std::sync::Arc<ReplicationError>,
    },
    #[error("{0}")]
    LogTruncated(String),
    #[error("recovery failed: {0}")]
    Recovery(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why bringing a replica up to date failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the replica is at seq {replica} but the primary only at {primary}: the copies diverged")]
    Ahead { replica: u64, primary: u64 },
    #[error("entries {from}..={to} are no longer in the log; the replica needs a snapshot")]
    NeedsSnapshot { from: u64, to: u64 },
    #[error("reading the log: {0}")]
    Db(#[from] DbError),
    #[error("no progress after repeated attempts")]
    NoProgress,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        ApiError::BadRequest(m.into())
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, ErrorCode::Conflict),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
            ApiError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, ErrorCode::RequestTimeout),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            ApiError::StaleEpoch { .. } => (StatusCode::CONFLICT, ErrorCode::StaleEpoch),
            ApiError::EpochAhead { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::EpochAhead),
            ApiError::NotPrimary { .. } => (StatusCode::MISDIRECTED_REQUEST, ErrorCode::NotPrimary),
            ApiError::SeqGap { .. } => (StatusCode::CONFLICT, ErrorCode::SeqGap),
            ApiError::Diverged { .. } => (StatusCode::CONFLICT, ErrorCode::Diverged),
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NotReady),
            ApiError::Db(_) | ApiError::Replication { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::LogTruncated(_) => (StatusCode::GONE, ErrorCode::LogTruncated),
            // Copying failed at a peer or on the way; the caller may try again (from another source).
            ApiError::Recovery(_) => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        let mut body = match self {
            // Ours, not the caller's: say what to do, keep the detail for the log.
            ApiError::Db(_) => ErrorBody::new(code, "the database is unavailable; the request may be retried"),
            ApiError::Replication { shard, replica, .. } => ErrorBody::new(
                code,
                format!("replica {replica} of shard {shard} did not confirm the write; the request may be retried"),
            ),
            ApiError::Internal(_) => ErrorBody::new(code, "internal error"),
            // The operator reads this message; it names a peer or a count, never caller input.
            ApiError::Recovery(m) => ErrorBody::new(code, format!("recovery failed: {m}")),
            other => ErrorBody::new(code, other),
        };
        match self {
            ApiError::Conflict { keys, .. } | ApiError::NotFound { keys, .. } => body.keys = keys.clone(),
            ApiError::SeqGap { applied, .. } => body.applied = Some(*applied),
            ApiError::StaleEpoch { ours, .. } | ApiError::EpochAhead { ours, .. } => body.epoch = Some(*ours),
            _ => {}
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, source = ?std::error::Error::source(&self), "request failed");
        }
        (status, axum::Json(self.body())).into_response()
    }
}
