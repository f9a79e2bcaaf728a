//! The protocol version on the wire (see [`crate::api`], versions): every response of a sharddb
//! process says this build's version in [`PROTOCOL_HEADER`], and a request declaring a version
//! older than this build works with is refused before any handler sees it. An axum middleware
//! over headers only; no I/O of its own. The shard server, the router and the operator's admin
//! endpoints all wrap their routes in it.

use crate::api::{ErrorBody, ErrorCode, OLDEST_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION, peer_protocol};
use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// `axum::middleware::from_fn(versioned)`.
pub async fn versioned(request: Request, next: Next) -> Response {
    // A value that is not text is not a version either.
    let declared = request.headers().get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let mut response = match peer_protocol(declared) {
        Err(message) => refuse(ErrorCode::BadRequest, message),
        Ok(Some(v)) if v < OLDEST_PROTOCOL_VERSION => refuse(
            ErrorCode::UnsupportedProtocol,
            format!(
                "the sender speaks protocol {v}; this process speaks {PROTOCOL_VERSION} and works with \
                 {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}: upgrade one release at a time"
            ),
        ),
        Ok(_) => next.run(request).await,
    };
    response.headers_mut().insert(PROTOCOL_HEADER, HeaderValue::from(PROTOCOL_VERSION));
    response
}

fn refuse(code: ErrorCode, message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(ErrorBody::new(code, message))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn call(header: Option<&str>) -> (StatusCode, Option<String>, String) {
        let app = Router::new().route("/x", get(|| async { "ok" })).layer(axum::middleware::from_fn(versioned));
        let mut request = Request::builder().uri("/x");
        if let Some(h) = header {
            request = request.header(PROTOCOL_HEADER, h);
        }
        let response = app.oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let version = response.headers().get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn every_answer_says_the_version_and_only_too_old_senders_are_refused() {
        let ours = Some(PROTOCOL_VERSION.to_string());
        assert_eq!(call(None).await, (StatusCode::OK, ours.clone(), "ok".into()), "a seed client");
        for v in OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION + 1 {
            assert_eq!(call(Some(&v.to_string())).await.0, StatusCode::OK, "protocol {v}: a newer peer keeps to ours");
        }
        let (status, version, body) = call(Some(&(OLDEST_PROTOCOL_VERSION - 1).to_string())).await;
        assert_eq!((status, version), (StatusCode::BAD_REQUEST, ours.clone()));
        let body: ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(body.code, ErrorCode::UnsupportedProtocol);
        assert!(body.message.contains("upgrade one release at a time"), "{}", body.message);
        let (status, _, body) = call(Some("two")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("\"bad_request\"") && body.contains("is not a version number"), "{body}");
    }
}
