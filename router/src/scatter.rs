//! Range reads across shards: one clipped read per intersecting shard, all in parallel, merged in
//! key order. [`read_range`] does I/O; merging and the response body are pure.
//!
//! Shards are disjoint and ordered by key, and every shard server returns its rows sorted by key,
//! so the merge is a concatenation of the servers' JSON arrays in shard order. Rows are passed
//! through as raw JSON text and never re-parsed.

use crate::app_state::AppState;
use crate::state::Routing;
use crate::upstream::UpstreamError;
use futures::future::try_join_all;
use serde_json::value::RawValue;
use shard_server::api::KeyRange;
use std::sync::Arc;

/// What the shards answered, in key order.
#[derive(Debug)]
pub struct RangeRead {
    pub shards: Vec<String>,
    pub parts: Vec<Box<RawValue>>,
}

/// Reads `range` from every shard it intersects. One request id serves every shard's replica
/// choice (each shard has its own ring, so they stay independent).
pub async fn read_range(state: &AppState, routing: Arc<Routing>, range: KeyRange) -> Result<RangeRead, UpstreamError> {
    let request = state.next_request_id();
    let split = routing.ranges.split(range);
    let shards: Vec<String> = split.iter().map(|&(i, _)| routing.shards[i].id.clone()).collect();
    let reads = split.iter().zip(&shards).map(|(&(_, clipped), id)| state.coalescer().read(id, clipped, request));
    let parts = try_join_all(reads).await?;
    Ok(RangeRead { shards, parts })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("shard {shard} answered `data` that is not a JSON array")]
pub struct NotAnArray {
    pub shard: String,
}

/// The `/read` answer: `{"shards_queried":[...],"data":[...],"status":"success"}`, with `data` the
/// concatenation of the shards' arrays.
pub fn read_body(read: &RangeRead) -> Result<String, NotAnArray> {
    let raw: usize = read.parts.iter().map(|p| p.get().len()).sum();
    let mut out = String::with_capacity(raw + 64 + read.shards.iter().map(|s| s.len() + 3).sum::<usize>());
    out.push_str(r#"{"shards_queried":"#);
    // Shard ids are validated identifiers; serialising strings cannot fail.
    out.push_str(&serde_json::to_string(&read.shards).unwrap_or_else(|_| "[]".to_owned()));
    out.push_str(r#","data":["#);
    let mut first = true;
    for (part, shard) in read.parts.iter().zip(&read.shards) {
        let inner = array_items(part).ok_or_else(|| NotAnArray { shard: shard.clone() })?;
        if inner.is_empty() {
            continue;
        }
        if !first {
            out.push(',');
        }
        out.push_str(inner);
        first = false;
    }
    out.push_str(r#"],"status":"success"}"#);
    Ok(out)
}

/// The text between the brackets of a JSON array (trimmed; empty for `[]`), or `None` when the
/// value is not an array. The value is valid JSON (the client checked), so a value that starts
/// with `[` is an array whose last character is its closing `]`.
fn array_items(value: &RawValue) -> Option<&str> {
    let text = value.get().trim();
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    Some(inner.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn read(parts: &[(&str, &str)]) -> RangeRead {
        RangeRead {
            shards: parts.iter().map(|p| p.0.to_owned()).collect(),
            parts: parts.iter().map(|p| raw(p.1)).collect(),
        }
    }

    #[test]
    fn merges_shard_arrays_in_shard_order_without_touching_rows() {
        let r = read(&[
            ("sh1", r#"[{"Stud_id":1,"Stud_name":"a]","Stud_marks":2}, {"Stud_id":7,"Stud_name":"b","Stud_marks":3}]"#),
            ("sh2", "[]"),
            ("sh3", " [ {\"Stud_id\":9000,\"Stud_name\":\"c\",\"Stud_marks\":1.50} ] "),
        ]);
        let body = read_body(&r).unwrap();
        assert_eq!(
            body,
            r#"{"shards_queried":["sh1","sh2","sh3"],"data":[{"Stud_id":1,"Stud_name":"a]","Stud_marks":2}, {"Stud_id":7,"Stud_name":"b","Stud_marks":3},{"Stud_id":9000,"Stud_name":"c","Stud_marks":1.50}],"status":"success"}"#,
            "rows pass through byte for byte (even 1.50)"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys: Vec<i64> = v["data"].as_array().unwrap().iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect();
        assert_eq!(keys, [1, 7, 9000]);
    }

    #[test]
    fn no_shards_and_empty_shards_give_empty_lists() {
        assert_eq!(read_body(&read(&[])).unwrap(), r#"{"shards_queried":[],"data":[],"status":"success"}"#);
        let body = read_body(&read(&[("sh1", "[]"), ("sh2", "[ ]")])).unwrap();
        assert_eq!(body, r#"{"shards_queried":["sh1","sh2"],"data":[],"status":"success"}"#);
    }

    #[test]
    fn a_non_array_answer_is_refused() {
        let err = read_body(&read(&[("sh1", "[]"), ("sh2", r#"{"rows":[]}"#)])).unwrap_err();
        assert_eq!(err, NotAnArray { shard: "sh2".into() });
    }
}
