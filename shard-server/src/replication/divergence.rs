//! Divergence detection on the replica: an entry that does not continue this copy's history makes
//! it give up its copy. Pure hashing, plus I/O (Postgres: the durable log, the copy identity).
//!
//! **Divergence.** An entry is named by its sequence number and the epoch of the primary that
//! created it; one primary never makes two entries with the same number. A replica can still hold
//! an entry its new primary lacks: the old primary sent it while the operator was handing the shard
//! over, it reached this replica but not the new primary, so nobody acknowledged it, and the new
//! primary gives its own next entry the same number. Skipping that entry as a replay would leave
//! the copies different for good.
//!
//! **History hash.** So every entry carries the running hash of the shard's history up to and
//! including it: `hash(n) = H(hash(n - 1), seq, epoch, changes)` (128-bit SipHash; an empty
//! history hashes to 0), computed by the primary that creates it and stored with the copy's
//! applied sequence number and in its log. A replica appending entry `n` computes the hash from
//! its own `hash(n - 1)` and the entry, and compares: a different result means its history up to
//! `n - 1` differs from the primary's (wherever that difference lies, however long ago: the hash
//! covers it all), or the entry is not what the primary hashed. A replayed entry (at or below the
//! applied number) must carry the hash this copy recorded for that number. This holds after a
//! snapshot install (the snapshot carries the source's hash at its number) and whatever the log
//! still keeps, which the epoch checks below could not: each entry a primary sends, in replication,
//! catch-up or recovery, carries the overlap with the receiver's history in its hash. The
//! confirmations of `visibility.rs` name the hash too, so a copy never shows an entry of another
//! history.
//!
//! The epochs are checked too, as before (an entry held must have the same epoch as the
//! primary's, and the first entry appended must follow an entry of the epoch the primary says it
//! has there, `prev_epoch`); they still catch a difference where a hash is unknown: copies made
//! before hashes existed, until a snapshot brings one.
//!
//! On a mismatch the replica gives up its copy: it takes a new copy identity, so it is
//! `stale_copy` at once (no reads, no writes) and the operator, which recorded the old identity,
//! demotes it and copies it afresh. It answers `diverged`, so the write that met it is not
//! acknowledged and is retried, and counts it (`sharddb_shard_copies_diverged`). Copies that hold
//! the same number with different rows but the same history (rows changed behind the server's
//! back) are found by the operator, which compares the copies' checksums at equal numbers.

use super::Shard;
use crate::api::Entry;
use crate::db::DbError;
use crate::error::ApiError;
use crate::node::Node;
use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;
use std::sync::atomic::Ordering;

/// The hash of an empty history (a fresh copy at sequence number 0).
pub const EMPTY_HISTORY: u128 = 0;

/// The history hash after `entry`, which follows a history hashing to `prev`. Covers the entry's
/// number, epoch and changes (its `hash` field is what is being computed, so not that).
pub fn entry_hash(prev: u128, entry: &Entry) -> u128 {
    let mut h = SipHasher13::new_with_keys(0x7368_6172_6464_6221, 0x6869_7374_6f72_7921);
    h.write(&prev.to_le_bytes());
    h.write(&entry.seq.to_le_bytes());
    h.write(&entry.epoch.to_le_bytes());
    h.write(&serde_json::to_vec(&entry.changes).expect("changes serialise"));
    h.finish128().as_u128()
}

pub fn to_hex(hash: u128) -> String {
    format!("{hash:032x}")
}

pub fn from_hex(text: &str) -> Option<u128> {
    (text.len() == 32).then(|| u128::from_str_radix(text, 16).ok()).flatten()
}

/// The known hash of a copy at `applied` as stored: an empty copy's is [`EMPTY_HISTORY`]; a copy
/// from before hashes existed (none stored) has none.
pub fn stored_hash(applied: u64, stored: Option<&str>) -> Option<u128> {
    if applied == 0 { Some(EMPTY_HISTORY) } else { stored.and_then(from_hex) }
}

impl Shard {
    /// The hash of this copy's history at its applied number, when known; the caller holds
    /// `applied`.
    pub(super) fn history_hash(&self) -> Option<u128> {
        *self.hash.lock().expect("lock")
    }

    pub(super) fn set_history_hash(&self, hash: Option<u128>) {
        *self.hash.lock().expect("lock") = hash;
    }

    /// The hash `entry` must carry to continue this copy's history, whose hash is `ours`; `Err`
    /// (after giving up the copy) when it carries another. The caller holds `applied`.
    pub(super) async fn check_continues(&self, node: &Node, entry: &Entry) -> Result<Option<u128>, ApiError> {
        let theirs = match entry.hash.as_deref() {
            None => return Ok(None),
            Some(text) => from_hex(text).ok_or_else(|| {
                ApiError::bad_request(format!("entry {}: hash {text:?} is not 32 hex digits", entry.seq))
            })?,
        };
        match self.history_hash() {
            Some(ours) if entry_hash(ours, entry) != theirs => Err(self
                .diverge(node, entry.seq, "the entry's history hash does not follow this copy's history".into())
                .await),
            // Unknown here (a copy from before hashes): take the primary's from now on.
            _ => Ok(Some(theirs)),
        }
    }

    /// An entry at or below the applied number is a replay, harmless only if this copy's entry at
    /// that number is the same one: same epoch and, where both are known, same history hash.
    pub(super) async fn check_replayed(&self, node: &Node, entry: &Entry) -> Result<(), ApiError> {
        if let Some((ours, hash)) = self.identity_at(node, entry.seq).await? {
            if ours != entry.epoch {
                return Err(self
                    .diverge(
                        node,
                        entry.seq,
                        format!("its entry is of epoch {ours}, the primary's of epoch {}", entry.epoch),
                    )
                    .await);
            }
            if let (Some(ours), Some(theirs)) = (hash, entry.hash.as_deref())
                && ours != theirs
            {
                return Err(self
                    .diverge(node, entry.seq, "its history hash there differs from the primary's".into())
                    .await);
            }
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
            return Err(self
                .diverge(node, seq, format!("its entry is of epoch {ours}, the primary's of epoch {theirs}"))
                .await);
        }
        Ok(())
    }

    /// The epoch of this copy's entry `seq`, from memory or the durable log; `None` when neither
    /// has it any more (or `seq` is 0).
    pub(super) async fn epoch_at(&self, node: &Node, seq: u64) -> Result<Option<u64>, DbError> {
        Ok(self.identity_at(node, seq).await?.map(|(epoch, _)| epoch))
    }

    /// The epoch and history hash (when recorded) of this copy's entry `seq`, from memory or the
    /// durable log; `None` when neither has it any more (or `seq` is 0).
    pub(super) async fn identity_at(&self, node: &Node, seq: u64) -> Result<Option<(u64, Option<String>)>, DbError> {
        if seq == 0 {
            return Ok(None);
        }
        {
            let c = &self.cache.lock().expect("lock").entries;
            if let Some(front) = c.front()
                && front.seq <= seq
                && let Some(e) = c.get((seq - front.seq) as usize)
            {
                return Ok(Some((e.epoch, e.hash.clone())));
            }
        }
        node.db.log_identity(self.id(), seq).await
    }

    /// Gives up this copy after its entry `seq` met the primary's and differed (`detail` says how).
    async fn diverge(&self, node: &Node, seq: u64, detail: String) -> ApiError {
        if !self.diverged.swap(true, Ordering::AcqRel) {
            match node.db.renew_copy_id(self.id()).await {
                Ok(id) => {
                    *self.copy_id.lock().expect("lock") = id;
                    node.metrics.copies_diverged.inc();
                }
                // Still refused below; the next attempt tries again.
                Err(e) => {
                    self.diverged.store(false, Ordering::Release);
                    tracing::error!(shard = self.id(), error = %e, "cannot give up a diverged copy");
                }
            }
            tracing::warn!(shard = self.id(), seq, %detail, "copy diverged from its primary; it waits to be copied afresh");
        }
        ApiError::Diverged { shard: self.id().to_owned(), seq, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Change;
    use crate::replication::testing::row;

    fn entry(seq: u64, epoch: u64, v: &str) -> Entry {
        Entry { seq, epoch, changes: vec![Change { key: 1, row: Some(row(1, v)) }], hash: None }
    }

    #[test]
    fn the_hash_covers_the_whole_history_and_every_part_of_an_entry() {
        let h1 = entry_hash(EMPTY_HISTORY, &entry(1, 1, "a"));
        let h2 = entry_hash(h1, &entry(2, 1, "b"));
        assert_eq!(h2, entry_hash(entry_hash(EMPTY_HISTORY, &entry(1, 1, "a")), &entry(2, 1, "b")), "deterministic");
        // Another first entry changes every later hash.
        let other = entry_hash(entry_hash(EMPTY_HISTORY, &entry(1, 1, "x")), &entry(2, 1, "b"));
        assert_ne!(h2, other);
        assert_ne!(entry_hash(h1, &entry(2, 2, "b")), h2, "the epoch counts");
        assert_ne!(entry_hash(h1, &entry(3, 1, "b")), h2, "the number counts");
        let mut hashed = entry(2, 1, "b");
        hashed.hash = Some(to_hex(h2));
        assert_eq!(entry_hash(h1, &hashed), h2, "an entry's own hash field is not hashed");
    }

    #[test]
    fn hashes_are_32_hex_digits_and_an_empty_copy_is_known() {
        let h = entry_hash(EMPTY_HISTORY, &entry(1, 1, "a"));
        assert_eq!(from_hex(&to_hex(h)), Some(h));
        assert_eq!(to_hex(1).len(), 32);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex(&"g".repeat(32)), None);
        assert_eq!(stored_hash(0, None), Some(EMPTY_HISTORY));
        assert_eq!(stored_hash(5, None), None, "a copy from before hashes");
        assert_eq!(stored_hash(5, Some(&to_hex(h))), Some(h));
    }
}
