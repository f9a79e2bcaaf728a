//! The entries a shard has applied, for replicas catching up: the most recent ones in memory
//! (bounded by count and by row changes), older ones from the durable log table, which is trimmed
//! as it grows. Does I/O (Postgres, for the durable log).

use super::Shard;
use crate::api::Entry;
use crate::error::{ApiError, ReplicationError};
use crate::node::Node;
use std::collections::VecDeque;
use std::sync::Arc;

/// Entries kept in memory for catching up replicas without reading the log table.
const CACHE_ENTRIES: usize = 2048;
/// Most row changes those entries may hold together: big batches (a bulk load of 500-row writes)
/// would otherwise keep hundreds of thousands of rows in memory. Older entries come from the log.
const CACHE_CHANGES: usize = 32_768;
/// Entries kept in the durable log.
const LOG_ENTRIES: u64 = 20_000;
/// Most entries sent to a replica in one request.
const MAX_SEND: usize = 256;

/// Recent entries kept in memory, with the row changes they hold together (bounded by
/// [`CACHE_ENTRIES`] and [`CACHE_CHANGES`]).
#[derive(Debug, Default)]
pub(super) struct Recent {
    pub(super) entries: VecDeque<Arc<Entry>>,
    changes: usize,
}

impl Recent {
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.changes = 0;
    }
}

impl Shard {
    fn remember(&self, entry: Arc<Entry>) {
        let mut c = self.cache.lock().expect("lock");
        if c.entries.back().is_some_and(|b| b.seq + 1 != entry.seq) {
            c.clear();
        }
        c.changes += entry.changes.len();
        c.entries.push_back(entry);
        while c.entries.len() > 1 && (c.entries.len() > CACHE_ENTRIES || c.changes > CACHE_CHANGES) {
            let dropped = c.entries.pop_front().map_or(0, |e| e.changes.len());
            c.changes -= dropped;
        }
    }

    /// Entries `from..=to` (at most [`MAX_SEND`]), from the cache or else the durable log.
    pub(super) async fn entries(&self, node: &Node, from: u64, to: u64) -> Result<Vec<Arc<Entry>>, ReplicationError> {
        let to = to.min(from + MAX_SEND as u64 - 1);
        {
            let c = &self.cache.lock().expect("lock").entries;
            if let Some(front) = c.front()
                && front.seq <= from
                && c.back().is_some_and(|b| b.seq >= to)
            {
                let start = (from - front.seq) as usize;
                return Ok(c.range(start..=start + (to - from) as usize).cloned().collect());
            }
        }
        let got = node.db.log_entries(self.id(), from, to).await?;
        if got.len() as u64 != to - from + 1 || got.first().map(|e| e.seq) != Some(from) {
            return Err(ReplicationError::NeedsSnapshot { from, to });
        }
        Ok(got.into_iter().map(Arc::new).collect())
    }

    /// Right after an entry committed, under `applied`.
    pub(super) fn after_apply(&self, node: &Node, entry: Arc<Entry>) {
        self.entry_applied(Arc::clone(&entry));
        let seq = entry.seq;
        self.remember(entry);
        if seq.is_multiple_of(1024) && seq > LOG_ENTRIES {
            let db = node.db.clone();
            let shard = self.id().to_owned();
            tokio::spawn(async move {
                if let Err(e) = db.trim_log(&shard, seq - LOG_ENTRIES).await {
                    tracing::warn!(%shard, error = %e, "log trim failed");
                }
            });
        }
    }

    /// Log entries `from..=to` (at most a bounded number per call) for a replica catching up.
    pub async fn log_range(&self, node: &Node, from: u64, to: u64) -> Result<Vec<Entry>, ApiError> {
        if from == 0 || from > to {
            return Err(ApiError::bad_request(format!(
                "from {from} and to {to} do not make a range of sequence numbers"
            )));
        }
        let applied = self.applied().await;
        if to > applied {
            return Err(ApiError::bad_request(format!("to {to} is beyond the last applied sequence number {applied}")));
        }
        match self.entries(node, from, to).await {
            Ok(e) => Ok(e.iter().map(|e| Entry::clone(e)).collect()),
            Err(ReplicationError::NeedsSnapshot { from, to }) => Err(ApiError::LogTruncated(format!(
                "entries {from}..={to} are no longer kept; copy a snapshot instead"
            ))),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Change;
    use crate::db::ShardTable;
    use crate::replication::testing::{row, schema};

    #[test]
    fn recent_entries_kept_in_memory_are_bounded_by_count_and_by_rows() {
        let shard = Shard::spawn(
            ShardTable::new("sh1", schema()),
            0,
            None,
            "copy".into(),
            false,
            crate::rowcache::Budget::new(0, 0),
        );
        let entry = |seq: u64, rows: i64| {
            Arc::new(Entry {
                seq,
                epoch: 1,
                hash: None,
                changes: (0..rows).map(|k| Change { key: k, row: Some(row(k, "v")) }).collect(),
            })
        };
        for seq in 1..=CACHE_ENTRIES as u64 + 10 {
            shard.remember(entry(seq, 1));
        }
        let seqs = |s: &Shard| {
            let c = &s.cache.lock().unwrap().entries;
            (c.front().unwrap().seq, c.back().unwrap().seq, c.len())
        };
        assert_eq!(seqs(&shard), (11, CACHE_ENTRIES as u64 + 10, CACHE_ENTRIES));
        // Big entries: only as many as fit the row bound stay.
        let next = CACHE_ENTRIES as u64 + 11;
        for seq in next..next + 100 {
            shard.remember(entry(seq, 1000));
        }
        let (front, back, len) = seqs(&shard);
        assert_eq!(back, next + 99);
        assert_eq!(len, CACHE_CHANGES / 1000, "from seq {front}");
        // One entry larger than the bound is still kept alone.
        shard.remember(entry(next + 100, CACHE_CHANGES as i64 + 1));
        assert_eq!(seqs(&shard), (next + 100, next + 100, 1));
    }
}
