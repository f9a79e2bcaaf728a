//! HTTP routes of the shard server: the seed endpoints ([`seed`]) and ours under `/v1` plus
//! `/status` and `/metrics` ([`v1`]). Shared request checks live here.

pub mod seed;
pub mod v1;

use crate::api::Op;
use crate::error::ApiError;
use crate::node::{Node, ShardRole};
use crate::replication::Shard;
use crate::schema::Schema;
use crate::topology::ReplicaState;
use std::collections::HashSet;
use std::sync::Arc;

/// Reads are served by the primary holding a lease from the operator, a ready replica holding a
/// read lease from its primary (see [`crate::replication`]), or a standalone shard.
pub(crate) fn check_readable(shard: &str, role: &ShardRole) -> Result<(), ApiError> {
    match role {
        ShardRole::Primary { stale_copy: true, .. } | ShardRole::Replica { stale_copy: true, .. } => {
            Err(ApiError::NotReady(format!(
                "this copy of shard {shard} lost its data, diverged from its primary or is catching up, and serves \
                 no reads until healed"
            )))
        }
        ShardRole::Primary { leased: false, .. } => Err(ApiError::NotReady(format!(
            "this primary of shard {shard} holds no lease from the operator (cut off from it, or just started) \
             and serves no reads"
        ))),
        ShardRole::Replica { state, .. } if *state != ReplicaState::Ready => {
            Err(ApiError::NotReady(format!("this copy of shard {shard} is {state:?} and serves no reads")))
        }
        ShardRole::Replica { leased: false, primary, .. } => Err(ApiError::NotReady(format!(
            "this copy of shard {shard} holds no read lease from its primary {primary} (cut off from it, or no \
             longer ready there) and serves no reads"
        ))),
        _ => Ok(()),
    }
}

/// Reads ranges of a shard as of a confirmed state (see `replication::visibility`). A primary (or
/// standalone shard) holding unconfirmed entries is asked to confirm them, so a read waiting for
/// them does not depend on a write coming along.
pub(crate) async fn read_confirmed(
    node: &Arc<Node>,
    shard: &Arc<Shard>,
    role: &ShardRole,
    ranges: &[(i64, i64)],
) -> Result<Vec<String>, ApiError> {
    if matches!(role, ShardRole::Primary { .. } | ShardRole::Standalone) && shard.unconfirmed() {
        shard.request_barrier(node);
    }
    shard.read_ranges_json(&node.db, ranges).await
}

/// Checks a batch before it is queued: rows have the schema's shape, an update keeps its key, no
/// key appears twice, and (when the topology gives the shard a range) every key is inside it.
pub(crate) fn check_ops(shard: &str, schema: &Schema, role: &ShardRole, ops: &[Op]) -> Result<(), ApiError> {
    if ops.is_empty() {
        return Err(ApiError::bad_request("the batch is empty"));
    }
    let key_name = schema.key_name();
    let mut seen = HashSet::with_capacity(ops.len());
    for op in ops {
        let key = match op {
            Op::Insert { row } => {
                schema.check_positional(row).map_err(|e| ApiError::bad_request(e.to_string()))?;
                row.key(schema)
            }
            Op::Update { key, row } => {
                schema.check_positional(row).map_err(|e| ApiError::bad_request(e.to_string()))?;
                if row.key(schema) != *key {
                    return Err(ApiError::bad_request(format!(
                        "an update may not change the key: {key_name} {key} was given a row with {key_name} {}",
                        row.key(schema)
                    )));
                }
                *key
            }
            Op::Delete { key } => *key,
        };
        if !seen.insert(key) {
            return Err(ApiError::bad_request(format!("{key_name} {key} appears more than once in the batch")));
        }
        if let ShardRole::Primary { entry, .. } = role
            && !entry.contains(key)
        {
            return Err(ApiError::bad_request(format!(
                "{key_name} {key} is outside shard {shard} [{}, {})",
                entry.low,
                entry.high_exclusive()
            )));
        }
    }
    Ok(())
}

/// A standalone shard (created by the seed's `/config`, outside any topology) takes writes without
/// an epoch. One carrying an epoch comes from a router that believes this server is the shard's
/// primary in some topology. When this server follows an older topology than the sender's, a newer
/// one may yet give it the shard, so the sender should retry (503 `epoch_ahead`, as for any shard
/// on a server that is behind); otherwise no topology it knows makes it the primary, and the write
/// is refused for good (421 `not_primary`), never with a code that invites endless retries.
pub(crate) fn check_routed_write(
    node: &Node,
    shard: &str,
    role: &ShardRole,
    epoch: Option<u64>,
) -> Result<(), ApiError> {
    let (ShardRole::Standalone, Some(got)) = (role, epoch) else { return Ok(()) };
    match node.topology() {
        Some(t) if t.epoch < got => Err(ApiError::EpochAhead { got, ours: t.epoch }),
        _ => Err(ApiError::NotPrimary { server: node.name().to_owned(), shard: shard.to_owned() }),
    }
}
