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
use crate::api::{Entry, RecoverResponse, RecoverTimings, ReplicateRequest, ShardClient, SnapshotEnd, SnapshotHeader};
use crate::error::ApiError;
use crate::node::Node;
use crate::schema::{Row, Schema};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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

    /// Applies entries sent by the primary (replica side), then takes the primary's confirmation
    /// (see `visibility.rs`).
    /// Returns the sequence number this copy then holds, with its history hash there.
    pub async fn replicate(&self, node: &Node, req: ReplicateRequest) -> Result<(u64, Option<u128>), ApiError> {
        let mut applied = self.applied.lock().await;
        let done = self.apply_entries(node, &mut applied, req.entries, req.prev_epoch).await?;
        let hash = self.history_hash();
        drop(applied);
        if let Some(c) = req.confirmed {
            self.confirm_from_primary(node, c).await;
        }
        Ok((done, hash))
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
            let hash = self.check_continues(node, &entry).await?;
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
            self.set_history_hash(hash);
            node.metrics.entries_applied.inc();
            self.after_apply(node, Arc::new(entry));
        }
        Ok(*applied)
    }

    /// Replaces this copy with a snapshot from `source` and verifies it at one sequence number; the
    /// previous copy stays intact if anything fails before the new one commits. See
    /// [`Shard::recover_locked`].
    pub async fn recover(&self, node: &Node, source: &ShardClient) -> Result<RecoverResponse, ApiError> {
        let started = Instant::now();
        let mut applied = self.applied.lock().await;
        // The table is about to be replaced: the cache goes off first and is loaded again from
        // whatever the table holds after (the new copy, or the old one if anything failed).
        self.rows.turn_off();
        let result = self.recover_locked(node, source, &mut applied).await;
        let cache = Instant::now();
        self.load_rows_locked(&node.db, *applied, true).await;
        result.map(|mut done| {
            if let Some(t) = &mut done.timings {
                t.cache_us = micros(cache.elapsed());
                t.total_us = micros(started.elapsed());
            }
            done
        })
    }

    /// The install, in one Postgres transaction: the table is emptied and its primary key index
    /// dropped; the snapshot's rows stream into it through one binary `COPY` as they arrive (the
    /// HTTP stream is read, parsed and encoded while Postgres takes the previous chunk); the index
    /// is rebuilt; and, when the snapshot's end line carries a digest, this copy's row count and
    /// digest are computed inside the same transaction and must equal the snapshot's before it
    /// commits: verified at the snapshot's sequence number, with nothing asked of the source's
    /// writer. The entries the source committed meanwhile are then applied from its log, as a
    /// catch-up applies them. From a source that sends no digest (an older release) the copy is
    /// verified as before: with this copy's writes held off, it asks the source for its row count
    /// and checksum at the source's current sequence number, pulls the entries in between from the
    /// source's log, and compares at that number.
    async fn recover_locked(
        &self,
        node: &Node,
        source: &ShardClient,
        applied: &mut u64,
    ) -> Result<RecoverResponse, ApiError> {
        let recovery = |what: String| ApiError::Recovery(what);
        let mut timings = RecoverTimings::default();
        let clock = Instant::now();
        let resp = source.snapshot(self.id()).await.map_err(|e| recovery(format!("opening the snapshot: {e}")))?;
        let mut lines = LineReader::new(resp);
        let header: SnapshotHeader = match lines.next().await? {
            Some(l) => serde_json::from_slice(l).map_err(|e| recovery(format!("bad snapshot header: {e}")))?,
            None => return Err(recovery("empty snapshot".into())),
        };
        if header.shard != self.id()
            || Schema::try_from(header.schema.clone()).ok().as_ref() != Some(&self.table.schema)
        {
            return Err(recovery(format!("the snapshot is of shard {} with another schema", header.shard)));
        }
        let mut install = node.db.begin_install(&self.table).await?;
        timings.prepare_us = micros(clock.elapsed());

        let clock = Instant::now();
        let (chunks, rx) = tokio::sync::mpsc::channel(COPY_CHUNKS_IN_FLIGHT);
        let (read, copied) =
            tokio::join!(read_rows(&mut lines, &self.table.schema, chunks), install.copy_rows(&self.table, rx));
        let copied = copied.map_err(|e| recovery(format!("copying the rows: {e}")));
        let read = match read {
            Ok(read) => read,
            // A copy that stopped early failed: its error says why.
            Err(ReadError::CopyStopped) => {
                return Err(copied.err().unwrap_or_else(|| recovery("the copy stopped".into())));
            }
            Err(ReadError::Snapshot(e)) => return Err(e),
        };
        let copied = copied?;
        timings.copy_us = micros(clock.elapsed());
        timings.stream_wait_us = micros(read.stream_wait);
        timings.parse_us = micros(read.parse);
        timings.copy_wait_us = micros(copied.wait);
        let (end, count) = (read.end, read.rows);
        if end.rows != count || copied.rows != count {
            return Err(recovery(format!(
                "the snapshot announced {} rows, carried {count} and {} were copied",
                end.rows, copied.rows
            )));
        }
        let clock = Instant::now();
        install.restore_key(&self.table).await.map_err(|e| recovery(format!("rebuilding the primary key: {e}")))?;
        timings.index_us = micros(clock.elapsed());
        if let Some(theirs) = &end.digest {
            let clock = Instant::now();
            let (rows, ours) = install.digest(&self.table).await?;
            timings.verify_us = micros(clock.elapsed());
            if u64::try_from(rows).ok() != Some(count) || ours != *theirs {
                return Err(recovery(format!(
                    "verification failed at seq {}: {rows} rows / digest {ours} installed, {count} / {theirs} streamed",
                    header.seq
                )));
            }
        }
        let clock = Instant::now();
        let copy_id = install.finish(&self.table, header.seq, header.hash.as_deref()).await?;
        timings.commit_us = micros(clock.elapsed());
        *self.copy_id.lock().expect("lock") = copy_id;
        self.diverged.store(false, Ordering::Release);
        *applied = header.seq;
        // The source's hash at the snapshot's number: the entries caught up next must continue it.
        self.set_history_hash(super::divergence::stored_hash(header.seq, header.hash.as_deref()));
        self.cache.lock().expect("lock").clear();
        tracing::info!(shard = self.id(), seq = header.seq, rows = count, "snapshot installed");

        let clock = Instant::now();
        if let Some(digest) = end.digest {
            self.catch_up_with_source(node, source, applied).await?;
            timings.catch_up_us = micros(clock.elapsed());
            return Ok(RecoverResponse {
                snapshot_seq: header.seq,
                snapshot_rows: count,
                verified_seq: header.seq,
                rows: i64::try_from(count).unwrap_or(i64::MAX),
                checksum: digest,
                timings: Some(timings),
            });
        }

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
            timings.catch_up_us = micros(clock.elapsed());
            return Ok(RecoverResponse {
                snapshot_seq: header.seq,
                snapshot_rows: count,
                verified_seq: theirs.applied_seq,
                rows: theirs.rows,
                checksum: theirs.checksum,
                timings: Some(timings),
            });
        }
        Err(recovery("could not verify at one sequence number".into()))
    }

    /// Applies, from the source's log, what it committed since this copy's snapshot, up to the
    /// position it reports now (later entries reach this copy as they reach any replica).
    async fn catch_up_with_source(&self, node: &Node, source: &ShardClient, applied: &mut u64) -> Result<(), ApiError> {
        let recovery = |what: String| ApiError::Recovery(what);
        let status = source.status(false).await.map_err(|e| recovery(format!("source status: {e}")))?;
        let target = status.shards.get(self.id()).map_or(*applied, |s| s.applied_seq);
        while *applied < target {
            let got = source
                .log(self.id(), *applied + 1, target)
                .await
                .map_err(|e| recovery(format!("catching up from the source's log: {e}")))?;
            if got.entries.is_empty() {
                return Err(recovery("the source returned no log entries".into()));
            }
            self.apply_entries(node, applied, got.entries, None).await?;
        }
        Ok(())
    }
}

/// What [`read_rows`] found in a snapshot stream.
struct ReadRows {
    end: SnapshotEnd,
    rows: u64,
    stream_wait: Duration,
    parse: Duration,
}

/// Why [`read_rows`] stopped before the end line.
enum ReadError {
    /// The stream was cut or carried something that is not a row of this shard.
    Snapshot(ApiError),
    /// The copy into Postgres stopped taking rows (it failed).
    CopyStopped,
}

impl From<ApiError> for ReadError {
    fn from(e: ApiError) -> Self {
        ReadError::Snapshot(e)
    }
}

/// Reads the rows of a snapshot stream up to its end line, checks each against `schema` and
/// sends them encoded for `COPY` in chunks of about [`COPY_CHUNK`] bytes. Dropping `out` ends the
/// copy; on any failure it is dropped early, so a copy that ends is not proof of a whole stream.
async fn read_rows(
    lines: &mut LineReader,
    schema: &Schema,
    out: tokio::sync::mpsc::Sender<bytes::Bytes>,
) -> Result<ReadRows, ReadError> {
    let recovery = |what: String| ReadError::Snapshot(ApiError::Recovery(what));
    let mut buf = Vec::with_capacity(COPY_CHUNK + 4096);
    let mut rows = 0u64;
    let mut parse = Duration::ZERO;
    let end: SnapshotEnd = loop {
        let Some(line) = lines.next().await? else {
            return Err(recovery(format!("the snapshot stream was cut after {rows} rows")));
        };
        let clock = Instant::now();
        if line.first() == Some(&b'{') {
            break serde_json::from_slice(line).map_err(|e| recovery(format!("bad snapshot end: {e}")))?;
        }
        let row: Row = serde_json::from_slice(line).map_err(|e| recovery(format!("bad snapshot row: {e}")))?;
        schema.check_positional(&row).map_err(|e| recovery(format!("bad snapshot row: {e}")))?;
        crate::pgcopy::encode_row(&mut buf, &row).map_err(|e| recovery(format!("bad snapshot row: {e}")))?;
        rows += 1;
        parse += clock.elapsed();
        if buf.len() >= COPY_CHUNK {
            let full = std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK + 4096));
            if out.send(full.into()).await.is_err() {
                return Err(ReadError::CopyStopped);
            }
        }
    };
    if !buf.is_empty() && out.send(buf.into()).await.is_err() {
        return Err(ReadError::CopyStopped);
    }
    Ok(ReadRows { end, rows, stream_wait: lines.waited, parse })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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

/// Bytes of encoded rows per chunk handed to the `COPY` (about 5,000 seed rows).
const COPY_CHUNK: usize = 128 * 1024;
/// Chunks between the reader and the `COPY` at most: memory stays bounded whatever the shard's size.
const COPY_CHUNKS_IN_FLIGHT: usize = 4;

/// Splits a streamed HTTP body into lines without holding more than one chunk and one line.
struct LineReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// Where the next line starts in `buf`.
    pos: usize,
    done: bool,
    /// Time spent waiting for the body's next chunk.
    waited: Duration,
}

impl LineReader {
    fn new(resp: reqwest::Response) -> Self {
        LineReader { resp, buf: Vec::new(), pos: 0, done: false, waited: Duration::ZERO }
    }

    /// The next line, without its newline; the last one may lack it.
    async fn next(&mut self) -> Result<Option<&[u8]>, ApiError> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|b| *b == b'\n') {
                let start = self.pos;
                self.pos += i + 1;
                return Ok(Some(&self.buf[start..start + i]));
            }
            // Lines are taken from the front without moving the rest: what is left of the chunk
            // moves once, here, before the next chunk is appended.
            self.buf.drain(..self.pos);
            self.pos = 0;
            if self.done {
                self.pos = self.buf.len();
                return Ok((!self.buf.is_empty()).then_some(&self.buf[..]));
            }
            let clock = Instant::now();
            let chunk = self.resp.chunk().await;
            self.waited += clock.elapsed();
            match chunk {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => self.done = true,
                Err(e) => return Err(ApiError::Recovery(format!("reading the snapshot: {e}"))),
            }
        }
    }
}
