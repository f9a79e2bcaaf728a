//! Divergence detection on the replica: an entry that contradicts this copy's own makes it give
//! up its copy. Does I/O (Postgres: the durable log, the copy identity).
//!
//! **Divergence.** An entry is named by its sequence number and the epoch of the primary that
//! created it; one primary never makes two entries with the same number. A replica can still hold
//! an entry its new primary lacks: the old primary sent it while the operator was handing the shard
//! over, it reached this replica but not the new primary, so nobody acknowledged it, and the new
//! primary gives its own next entry the same number. Skipping that entry as a replay would leave
//! the copies different for good. So the replica compares: an entry it already holds must have the
//! same epoch as its own, and the first entry it appends must follow an entry of the epoch the
//! primary says it has there (`prev_epoch`). On a mismatch (where either side still knows the
//! epoch: in memory or in the durable log) the replica gives up its copy: it takes a new copy
//! identity, so it is `stale_copy` at once (no reads, no writes) and the operator, which recorded
//! the old identity, demotes it and copies it afresh. It answers `diverged`, so the write that met
//! it is not acknowledged and is retried.

use super::Shard;
use crate::api::Entry;
use crate::db::DbError;
use crate::error::ApiError;
use crate::node::Node;
use std::sync::atomic::Ordering;

impl Shard {
    /// An entry at or below the applied number is a replay, harmless only if this copy's entry at
    /// that number has the same epoch (or its epoch is no longer known).
    pub(super) async fn check_replayed(&self, node: &Node, entry: &Entry) -> Result<(), ApiError> {
        if let Some(ours) = self.epoch_at(node, entry.seq).await?
            && ours != entry.epoch
        {
            return Err(self.diverge(node, entry.seq, ours, entry.epoch).await);
        }
        Ok(())
    }

    /// The entry about to be appended after `applied` must follow an entry of the epoch the sender
    /// has there: `prev` is the sender's (seq, epoch) just before it, when known.
    pub(super) async fn check_follows(
        &self,
        node: &Node,
        prev: Option<(u64, u64)>,
        applied: u64,
    ) -> Result<(), ApiError> {
        if let Some((seq, theirs)) = prev
            && seq == applied
            && let Some(ours) = self.epoch_at(node, seq).await?
            && ours != theirs
        {
            return Err(self.diverge(node, seq, ours, theirs).await);
        }
        Ok(())
    }

    /// The epoch of this copy's entry `seq`, from memory or the durable log; `None` when neither
    /// has it any more (or `seq` is 0).
    pub(super) async fn epoch_at(&self, node: &Node, seq: u64) -> Result<Option<u64>, DbError> {
        if seq == 0 {
            return Ok(None);
        }
        {
            let c = &self.cache.lock().expect("lock").entries;
            if let Some(front) = c.front()
                && front.seq <= seq
                && let Some(e) = c.get((seq - front.seq) as usize)
            {
                return Ok(Some(e.epoch));
            }
        }
        node.db.log_epoch(self.id(), seq).await
    }

    /// Gives up this copy after its entry `seq` (epoch `ours`) met the primary's (epoch `theirs`).
    async fn diverge(&self, node: &Node, seq: u64, ours: u64, theirs: u64) -> ApiError {
        if !self.diverged.swap(true, Ordering::AcqRel) {
            match node.db.renew_copy_id(self.id()).await {
                Ok(id) => *self.copy_id.lock().expect("lock") = id,
                // Still refused below; the next attempt tries again.
                Err(e) => {
                    self.diverged.store(false, Ordering::Release);
                    tracing::error!(shard = self.id(), error = %e, "cannot give up a diverged copy");
                }
            }
            tracing::warn!(
                shard = self.id(),
                seq,
                ours,
                theirs,
                "copy diverged from its primary; it waits to be copied afresh"
            );
        }
        ApiError::Diverged { shard: self.id().to_owned(), seq, ours, theirs }
    }
}
