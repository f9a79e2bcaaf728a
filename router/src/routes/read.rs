//! `POST /read`: a key range scattered over the shards it intersects, merged in key order. Does I/O
//! (through `scatter`); parsing the range is pure.

use super::JsonBody;
use crate::app_state::AppState;
use crate::error::RouterError;
use crate::scatter;
use crate::upstream::UpstreamError;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value};
use shard_server::api::KeyRange;

/// `{"Stud_id": {"low": 1000, "high": 8889}}` (inclusive) → the range; `low > high` is refused.
pub fn parse_range(key_name: &str, body: &Map<String, Value>) -> Result<KeyRange, RouterError> {
    let value = body.get(key_name).ok_or_else(|| {
        RouterError::BadRequest(format!(
            r#"missing field {key_name}: send {{"{key_name}":{{"low":<key>,"high":<key>}}}}"#
        ))
    })?;
    let range = KeyRange::deserialize(value).map_err(|e| RouterError::BadRequest(format!("{key_name}: {e}")))?;
    if range.low > range.high {
        return Err(RouterError::BadRequest(format!(
            "{key_name}.low ({}) is greater than {key_name}.high ({})",
            range.low, range.high
        )));
    }
    Ok(range)
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn read(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Response, RouterError> {
    let routing = state.routing()?;
    let range = parse_range(routing.schema.key_name(), &body)?;
    let result = scatter::read_range(&state, routing, range).await.map_err(|e| match e {
        UpstreamError::Unavailable(d) => RouterError::Unavailable(format!("read {range:?}: {d}")),
        other => RouterError::Internal(format!("read {range:?}: {other}")),
    })?;
    let body = scatter::read_body(&result).map_err(|e| RouterError::Internal(e.to_string()))?;
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<KeyRange, String> {
        parse_range("Stud_id", v.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn ranges_are_checked_and_named() {
        assert_eq!(parse(json!({"Stud_id": {"low": 3, "high": 3}})), Ok(KeyRange { low: 3, high: 3 }));
        assert_eq!(
            parse(json!({"Stud_id": {"low": 5, "high": 3}})),
            Err("Stud_id.low (5) is greater than Stud_id.high (3)".into())
        );
        assert_eq!(
            parse(json!({"id": {"low": 1, "high": 3}})),
            Err(r#"missing field Stud_id: send {"Stud_id":{"low":<key>,"high":<key>}}"#.into())
        );
        assert_eq!(parse(json!({"Stud_id": {"low": 1}})), Err("Stud_id: missing field `high`".into()));
        assert!(
            parse(json!({"Stud_id": {"low": "a", "high": 3}}))
                .unwrap_err()
                .starts_with("Stud_id: invalid type: string")
        );
    }
}
