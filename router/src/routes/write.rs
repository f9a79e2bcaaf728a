//! `POST /write`, `PUT /update`, `DELETE /del`: requests turned into per-shard parts (see `batch`)
//! and sent to each shard's primary. Does I/O (through `upstream`).

use super::JsonBody;
use crate::app_state::AppState;
use crate::batch::{self, Part};
use crate::error::RouterError;
use crate::state::Routing;
use crate::upstream::UpstreamError;
use axum::Json;
use axum::extract::State;
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{Map, Value};
use shard_server::api::{Message, Op, WriteResponse};
use shard_server::limits::{MAX_ROWS, bounded_vec};
use std::sync::Arc;

/// `/write` body: at most [`MAX_ROWS`] rows.
#[derive(Debug, Deserialize)]
pub struct WriteBody {
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_ROWS>")]
    pub data: Vec<Value>,
}

#[tracing::instrument(level = "debug", skip_all, fields(rows = body.data.len()))]
pub async fn write(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<WriteBody>,
) -> Result<Json<Message>, RouterError> {
    let routing = state.routing()?;
    let plan = batch::plan_inserts(&routing.schema, &routing.ranges, &body.data, routing.topology.unrouted_keys)?;
    let added = plan.routed();
    write_parts(&state, &routing, plan.parts).await?;
    Ok(Json(Message::success(added_message(routing.schema.key_name(), added, &plan.skipped))))
}

/// `3 Data entries added`, and when keys in no shard were skipped, which:
/// `2 Data entries added; 1 skipped (Stud_id 20000 is in no shard)`.
pub fn added_message(key_name: &str, added: usize, skipped: &[i64]) -> String {
    let mut message = format!("{added} Data entries added");
    if !skipped.is_empty() {
        let verb = if skipped.len() == 1 { "is" } else { "are" };
        message.push_str(&format!("; {} skipped ({key_name} {} {verb} in no shard)", skipped.len(), join(skipped)));
    }
    message
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn update(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<Message>, RouterError> {
    let routing = state.routing()?;
    let (key, parts) = batch::plan_update(&routing.schema, &routing.ranges, &body)?;
    write_parts(&state, &routing, parts).await?;
    Ok(Json(Message::success(format!("Data entry for {}: {key} updated", routing.schema.key_name()))))
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn del(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<Message>, RouterError> {
    let routing = state.routing()?;
    let (key, parts) = batch::plan_delete(&routing.schema, &routing.ranges, &body)?;
    write_parts(&state, &routing, parts).await?;
    Ok(Json(Message::success(format!("Data entry with {}:{key} removed from all replicas", routing.schema.key_name()))))
}

/// Sends every part to its shard's primary.
///
/// One part goes straight to a real write: the primary applies it atomically. Several parts are
/// first sent with `dry_run` in parallel, so a conflict anywhere (a key holding a different row)
/// is answered with 409 before any part is written; only when every dry run passes are the real
/// writes sent, again in parallel.
///
/// Remaining race: a concurrent writer can store a conflicting row between the dry run and the
/// real write of a part. That part then fails with 409 while the other parts may already be
/// written, and the 409's message says so. Likewise a part can fail for availability (503) after
/// others were written. Resending the batch is safe either way, because rows already stored are
/// no-ops on the primary; closing the window itself would need a cross-shard transaction, which
/// this system does not have.
async fn write_parts(state: &AppState, routing: &Arc<Routing>, parts: Vec<Part>) -> Result<(), RouterError> {
    if parts.len() > 1 {
        let dry = join_all(parts.iter().map(|p| send(state, routing, p, p.ops.clone(), true))).await;
        check(routing, &parts, dry, false)?;
    }
    let real = join_all(parts.iter().map(|p| send(state, routing, p, p.ops.clone(), false))).await;
    check(routing, &parts, real, parts.len() > 1)
}

async fn send(
    state: &AppState,
    routing: &Arc<Routing>,
    part: &Part,
    ops: Vec<Op>,
    dry_run: bool,
) -> Result<WriteResponse, UpstreamError> {
    let shard_id = &routing.shards[part.shard].id;
    state.coalescer().write(routing.clone(), shard_id, &part.keys, ops, dry_run).await
}

/// Folds the parts' outcomes (aligned with `parts`) into one answer: every conflicting key from
/// every part in one 409, else the first other failure. `partial` is set for real writes of a
/// multi-part batch, where a failure can follow other parts' success.
fn check(
    routing: &Routing,
    parts: &[Part],
    results: Vec<Result<WriteResponse, UpstreamError>>,
    partial: bool,
) -> Result<(), RouterError> {
    let key_name = routing.schema.key_name();
    let mut conflicts = Vec::new();
    let mut other = None;
    let mut written = 0;
    for (part, r) in parts.iter().zip(results) {
        match r {
            Ok(_) => written += 1,
            Err(UpstreamError::Conflict { keys }) => conflicts.extend(keys),
            Err(e) => {
                other.get_or_insert((part, e));
            }
        }
    }
    if !conflicts.is_empty() {
        conflicts.sort_unstable();
        conflicts.dedup();
        let mut message = format!("a different row already exists for {key_name} {}", join(&conflicts));
        if partial && (written > 0 || other.is_some()) {
            message.push_str(" (written concurrently; the batch's other rows may have been stored)");
        } else {
            message.push_str("; nothing was written");
        }
        return Err(RouterError::Conflict { message, keys: conflicts });
    }
    match other {
        None => Ok(()),
        Some((part, e)) => Err(part_error(key_name, part, e)),
    }
}

/// A part's failure as the caller should see it.
fn part_error(key_name: &str, part: &Part, e: UpstreamError) -> RouterError {
    match e {
        UpstreamError::Conflict { keys } => RouterError::Conflict {
            message: format!("a different row already exists for {key_name} {}", join(&keys)),
            keys,
        },
        UpstreamError::NotFound { .. } => {
            RouterError::NotFound(format!("no row with {key_name} {} exists", join(&part.keys)))
        }
        UpstreamError::BadRequest { message } => RouterError::BadRequest(message),
        UpstreamError::TooLarge { shard } => RouterError::PayloadTooLarge(format!(
            "the {} rows for shard {shard} are more than its server accepts in one request; send a smaller batch",
            part.keys.len()
        )),
        UpstreamError::Unavailable(d) => RouterError::Unavailable(d),
        UpstreamError::Internal(d) => RouterError::Internal(d),
    }
}

fn join(keys: &[i64]) -> String {
    keys.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_counts_what_was_stored_and_names_what_was_skipped() {
        assert_eq!(added_message("Stud_id", 3, &[]), "3 Data entries added");
        assert_eq!(added_message("Stud_id", 0, &[]), "0 Data entries added");
        assert_eq!(
            added_message("Stud_id", 2, &[20000]),
            "2 Data entries added; 1 skipped (Stud_id 20000 is in no shard)"
        );
        assert_eq!(
            added_message("id", 0, &[-1, 17000]),
            "0 Data entries added; 2 skipped (id -1, 17000 are in no shard)"
        );
    }
}
