//! The replica's side of a shard: applying the primary's entries, catching up before serving
//! reads, and installing a snapshot. Does I/O (Postgres, peers).
//!
//! **Replica.** Entries must arrive in sequence: an entry at or below the applied number is skipped
//! (replays are harmless), one beyond the next is refused with `seq_gap` and the replica's position,
//! so the primary resends from there (from its in-memory cache or its durable log).
//!
//! An entry this copy already holds must still agree with its own, and the first entry appended
//! must follow the primary's: see `divergence.rs`.

use super::Shard;
use crate::api::{Entry, RecoverResponse, ReplicateRequest, ShardClient, SnapshotEnd, SnapshotHeader};
use crate::error::ApiError;
use crate::node::Node;
use crate::schema::{Row, Schema};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Shard {
    /// Called for every topology in which this copy is a ready replica. Returns true when a
    /// catch-up must start: the copy was not known ready before (it just became ready, or the
    /// server just started).
    pub fn close_read_gate(&self, epoch: u64) -> bool {
        let mut g = self.gate.lock().expect("lock");
        match *g {
            GateState::Open | GateState::CatchingUp(_) => false,
            GateState::Unseen => {
                *g = GateState::CatchingUp(epoch);
                true
            }
        }
    }

    /// Called for every topology in which this copy is not a ready replica.
    pub fn forget_read_gate(&self) {
        *self.gate.lock().expect("lock") = GateState::Unseen;
    }

    pub fn read_gate_closed(&self) -> bool {
        self.diverged.load(Ordering::Acquire) || matches!(*self.gate.lock().expect("lock"), GateState::CatchingUp(_))
    }

    /// Opens the read gate once this copy holds everything its primary had applied at a moment
    /// when the primary already followed the topology that made this copy ready: every write
    /// acknowledged before that moment is at or below that sequence number, and every write
    /// acknowledged after it waited for this copy.
    pub async fn catch_up_then_open(self: Arc<Self>, node: &Node, primary_url: &str) {
        let epoch = match *self.gate.lock().expect("lock") {
            GateState::CatchingUp(e) => e,
            _ => return,
        };
        let primary = node.peer(primary_url);
        loop {
            if !self.read_gate_closed() {
                return; // the topology moved on
            }
            match self.catch_up_once(node, &primary, epoch).await {
                Ok(()) => {
                    let mut g = self.gate.lock().expect("lock");
                    if *g == GateState::CatchingUp(epoch) {
                        *g = GateState::Open;
                        tracing::info!(shard = self.id(), epoch, "caught up; serving reads");
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(shard = self.id(), error = %e, "catching up before serving reads");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn catch_up_once(&self, node: &Node, primary: &ShardClient, epoch: u64) -> Result<(), String> {
        let status = primary.status(false).await.map_err(|e| e.to_string())?;
        if status.epoch < epoch {
            return Err(format!("the primary is still at epoch {}", status.epoch));
        }
        let target =
            status.shards.get(self.id()).map(|s| s.applied_seq).ok_or("the primary does not hold the shard")?;
        let mut applied = self.applied.lock().await;
        while *applied < target {
            let got = primary.log(self.id(), *applied + 1, target).await.map_err(|e| e.to_string())?;
            if got.entries.is_empty() {
                return Err("the primary returned no log entries".into());
            }
            self.apply_entries(node, &mut applied, got.entries, None).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Applies entries sent by the primary (replica side).
    pub async fn replicate(&self, node: &Node, req: ReplicateRequest) -> Result<u64, ApiError> {
        let mut applied = self.applied.lock().await;
        self.apply_entries(node, &mut applied, req.entries, req.prev_epoch).await
    }

    /// Applies consecutive entries on top of `applied` (held locked by the caller), checking that
    /// they continue this copy's own (see `divergence.rs`). `prev_epoch` is the sender's epoch for
    /// the entry before the first one, if it knows it.
    async fn apply_entries(
        &self,
        node: &Node,
        applied: &mut u64,
        entries: Vec<Entry>,
        prev_epoch: Option<u64>,
    ) -> Result<u64, ApiError> {
        if self.diverged.load(Ordering::Acquire) {
            return Err(ApiError::NotReady(format!(
                "this copy of shard {} diverged from its primary; it waits to be copied afresh",
                self.id()
            )));
        }
        self.resync_if_needed(&node.db, applied).await?;
        // The sender's (seq, epoch) just before the next entry, when known.
        let mut prev = entries.first().and_then(|e| Some((e.seq.checked_sub(1)?, prev_epoch?)));
        for entry in entries {
            if entry.seq <= *applied {
                self.check_replayed(node, &entry).await?;
                prev = Some((entry.seq, entry.epoch));
                continue;
            }
            if entry.seq != *applied + 1 {
                return Err(ApiError::SeqGap { first: entry.seq, applied: *applied });
            }
            self.check_follows(node, prev, *applied).await?;
            prev = Some((entry.seq, entry.epoch));
            for c in &entry.changes {
                if let Some(row) = &c.row {
                    self.table
                        .schema
                        .check_positional(row)
                        .map_err(|e| ApiError::bad_request(format!("entry {}: {e}", entry.seq)))?;
                    if row.key(&self.table.schema) != c.key {
                        return Err(ApiError::bad_request(format!(
                            "entry {}: row key differs from change key {}",
                            entry.seq, c.key
                        )));
                    }
                }
            }
            if let Err(e) = node.db.apply(&self.table, &entry).await {
                self.resync.store(true, Ordering::Release);
                return Err(e.into());
            }
            *applied = entry.seq;
            node.metrics.entries_applied.inc();
            self.after_apply(node, Arc::new(entry));
        }
        Ok(*applied)
    }

    /// Replaces this copy with a snapshot from `source`, then verifies it: with this copy's writes
    /// held off, it asks the source for its row count and checksum at the source's current sequence
    /// number, pulls the entries in between from the source's log, and compares at that number.
    /// The previous copy stays intact if anything fails before the snapshot commits.
    pub async fn recover(&self, node: &Node, source: &ShardClient) -> Result<RecoverResponse, ApiError> {
        let mut applied = self.applied.lock().await;
        // The table is about to be replaced: the cache goes off first and is loaded again from
        // whatever the table holds after (the new copy, or the old one if anything failed).
        self.rows.turn_off();
        let result = self.recover_locked(node, source, &mut applied).await;
        self.load_rows_locked(&node.db).await;
        result
    }

    async fn recover_locked(
        &self,
        node: &Node,
        source: &ShardClient,
        applied: &mut u64,
    ) -> Result<RecoverResponse, ApiError> {
        let recovery = |what: String| ApiError::Recovery(what);
        let resp = source.snapshot(self.id()).await.map_err(|e| recovery(format!("opening the snapshot: {e}")))?;
        let mut lines = LineReader::new(resp);
        let header: SnapshotHeader = match lines.next().await? {
            Some(l) => serde_json::from_slice(&l).map_err(|e| recovery(format!("bad snapshot header: {e}")))?,
            None => return Err(recovery("empty snapshot".into())),
        };
        if header.shard != self.id()
            || Schema::try_from(header.schema.clone()).ok().as_ref() != Some(&self.table.schema)
        {
            return Err(recovery(format!("the snapshot is of shard {} with another schema", header.shard)));
        }
        let mut install = node.db.begin_install(&self.table).await?;
        let mut batch = Vec::with_capacity(INSTALL_BATCH);
        let mut count = 0u64;
        let end: SnapshotEnd = loop {
            let Some(line) = lines.next().await? else {
                return Err(recovery(format!("the snapshot stream was cut after {count} rows")));
            };
            if line.first() == Some(&b'{') {
                break serde_json::from_slice(&line).map_err(|e| recovery(format!("bad snapshot end: {e}")))?;
            }
            let row: Row = serde_json::from_slice(&line).map_err(|e| recovery(format!("bad snapshot row: {e}")))?;
            self.table.schema.check_positional(&row).map_err(|e| recovery(format!("bad snapshot row: {e}")))?;
            batch.push(row);
            count += 1;
            if batch.len() == INSTALL_BATCH {
                install.insert(&self.table, &batch).await?;
                batch.clear();
            }
        };
        if end.rows != count {
            return Err(recovery(format!("the snapshot announced {} rows but carried {count}", end.rows)));
        }
        install.insert(&self.table, &batch).await?;
        let copy_id = install.finish(&self.table, header.seq).await?;
        *self.copy_id.lock().expect("lock") = copy_id;
        self.diverged.store(false, Ordering::Release);
        *applied = header.seq;
        self.cache.lock().expect("lock").clear();
        tracing::info!(shard = self.id(), seq = header.seq, rows = count, "snapshot installed");

        // Verify at one sequence number. The source can only be ahead of us, never behind.
        for _ in 0..8 {
            let theirs = source.stats(self.id()).await.map_err(|e| recovery(format!("source stats: {e}")))?;
            if theirs.applied_seq < *applied {
                return Err(recovery(format!(
                    "the source is at seq {} behind this copy at {}",
                    theirs.applied_seq, *applied
                )));
            }
            while *applied < theirs.applied_seq {
                let got = source
                    .log(self.id(), *applied + 1, theirs.applied_seq)
                    .await
                    .map_err(|e| recovery(format!("catching up from the source's log: {e}")))?;
                if got.entries.is_empty() {
                    return Err(recovery("the source returned no log entries".into()));
                }
                self.apply_entries(node, applied, got.entries, None).await?;
            }
            let ours = node.db.stats(&self.table, true).await?;
            if ours.applied_seq != theirs.applied_seq {
                continue;
            }
            if ours.rows != theirs.rows || ours.checksum.as_deref() != Some(theirs.checksum.as_str()) {
                return Err(recovery(format!(
                    "verification failed at seq {}: {} rows / checksum {:?} here, {} / {} at the source",
                    theirs.applied_seq, ours.rows, ours.checksum, theirs.rows, theirs.checksum
                )));
            }
            return Ok(RecoverResponse {
                snapshot_seq: header.seq,
                snapshot_rows: count,
                verified_seq: theirs.applied_seq,
                rows: theirs.rows,
                checksum: theirs.checksum,
            });
        }
        Err(recovery("could not verify at one sequence number".into()))
    }
}

/// Whether a ready replica may serve reads yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GateState {
    /// Not seen as a ready replica yet.
    Unseen,
    /// Became ready at this epoch; catching up with the primary.
    CatchingUp(u64),
    Open,
}

/// Rows per insert statement while installing a snapshot.
const INSTALL_BATCH: usize = 5000;

/// Splits a streamed HTTP body into lines without holding more than one chunk and one line.
struct LineReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
    done: bool,
}

impl LineReader {
    fn new(resp: reqwest::Response) -> Self {
        LineReader { resp, buf: Vec::new(), done: false }
    }

    async fn next(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.done {
                return Ok(if self.buf.is_empty() { None } else { Some(std::mem::take(&mut self.buf)) });
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => self.done = true,
                Err(e) => return Err(ApiError::Recovery(format!("reading the snapshot: {e}"))),
            }
        }
    }
}
