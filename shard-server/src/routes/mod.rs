//! HTTP routes of the shard server: the seed endpoints ([`seed`]) and ours under `/v1` plus
//! `/status` and `/metrics` ([`v1`]). Shared request checks live here.

pub mod seed;
pub mod v1;

use crate::api::Op;
use crate::error::ApiError;
use crate::node::ShardRole;
use crate::schema::Schema;
use crate::topology::ReplicaState;
use std::collections::HashSet;

/// Reads are served by the primary, a ready replica holding a read lease from its primary (see
/// [`crate::replication`]), or a standalone shard.
pub(crate) fn check_readable(shard: &str, role: &ShardRole) -> Result<(), ApiError> {
    match role {
        ShardRole::Primary { stale_copy: true, .. } | ShardRole::Replica { stale_copy: true, .. } => {
            Err(ApiError::NotReady(format!(
                "this copy of shard {shard} lost its data, diverged from its primary or is catching up, and serves \
                 no reads until healed"
            )))
        }
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
