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

/// The compatibility rules of the contract (see [`crate::api`], versions), on its types.
#[cfg(test)]
mod compatibility {
    use crate::api::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_newer_peers_unknown_code_parses_and_reads_as_its_status() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"message":"<Error> x","status":"failure","code":"from_the_future","extra":1}"#)
                .unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
        let err = |status| ClientError::Api { url: "u".into(), status, body: body.clone() };
        for (status, code) in [
            (503, ErrorCode::Unavailable),
            (504, ErrorCode::Unavailable),
            (421, ErrorCode::NotPrimary),
            (409, ErrorCode::Conflict),
            (404, ErrorCode::NotFound),
            (413, ErrorCode::PayloadTooLarge),
            (400, ErrorCode::BadRequest),
            (418, ErrorCode::BadRequest),
            (500, ErrorCode::Internal),
        ] {
            assert_eq!(err(status).code(), Some(code), "{status}");
        }
        let known = ClientError::Api { url: "u".into(), status: 503, body: ErrorBody::new(ErrorCode::NotReady, "x") };
        assert_eq!(known.code(), Some(ErrorCode::NotReady), "a known code is kept");
    }

    #[test]
    fn every_code_this_build_sends_round_trips() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Conflict,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::PayloadTooLarge,
            ErrorCode::StaleEpoch,
            ErrorCode::EpochAhead,
            ErrorCode::NotPrimary,
            ErrorCode::SeqGap,
            ErrorCode::Diverged,
            ErrorCode::NotReady,
            ErrorCode::Unavailable,
            ErrorCode::LogTruncated,
            ErrorCode::NotImplemented,
            ErrorCode::Internal,
            ErrorCode::UnsupportedProtocol,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code, "{json}");
        }
    }

    #[test]
    fn a_previous_releases_status_reads_as_protocol_1_and_unknown_fields_and_roles_are_tolerated() {
        let old = r#"{"server":"Server0","epoch":3,"shards":{"sh1":{"role":"primary","applied_seq":5,"rows":2}}}"#;
        let s: ServerStatus = serde_json::from_str(old).unwrap();
        assert_eq!((s.protocol, s.shards["sh1"].applied_seq), (1, 5));
        let newer = r#"{"server":"Server0","protocol":3,"epoch":3,"later":{"a":1},
            "shards":{"sh1":{"role":"witness","applied_seq":5,"rows":2,"copy_id":"c","more":true}}}"#;
        let s: ServerStatus = serde_json::from_str(newer).unwrap();
        assert_eq!((s.protocol, s.shards["sh1"].role, s.shards["sh1"].copy_id.as_str()), (3, Role::Unknown, "c"));
        let ours = serde_json::to_value(ServerStatus {
            server: "S".into(),
            protocol: PROTOCOL_VERSION,
            epoch: 1,
            shards: BTreeMap::new(),
            lease_token: None,
            internal_auth: None,
        })
        .unwrap();
        assert_eq!(ours["protocol"], PROTOCOL_VERSION);
    }

    #[test]
    fn a_previous_releases_bodies_parse_and_ours_parse_there() {
        // A write request as the previous release sends it (no dry_run), and a replicate request
        // without prev_epoch: the defaults mean what that release did.
        let w: WriteRequest = serde_json::from_str(r#"{"epoch":4,"ops":[{"op":"delete","key":7}]}"#).unwrap();
        assert!(!w.dry_run);
        let r: ReplicateRequest = serde_json::from_str(r#"{"epoch":4,"primary":"S","entries":[]}"#).unwrap();
        assert_eq!(r.prev_epoch, None);
        assert!(peer_protocol(None).unwrap().is_none());
        assert_eq!(peer_protocol(Some(" 2 ")).unwrap(), Some(2));
        assert!(peer_protocol(Some("v2")).is_err());
    }
}
