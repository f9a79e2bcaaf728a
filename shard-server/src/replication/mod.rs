//! Per-shard write path and replication. Does I/O (Postgres, peers).
//!
//! A [`Shard`] is this server's copy of one shard: its table, the sequence number it has applied,
//! its row cache and its recent entries. The same type serves both sides, as the topology says.
//! Each part lives in its own file, which opens with the safety argument for that part:
//!
//! - `writer.rs`, the primary: one writer task per shard commits queued batches as groups and
//!   acknowledges only once every ready replica holds the group's entry (what an acknowledgement
//!   means, and why a retried no-op still waits).
//! - `replica.rs`, the replica: applies entries strictly in sequence, catches up before serving
//!   reads, and installs and verifies snapshots.
//! - `divergence.rs`: how a replica notices an entry that contradicts its own (`prev_epoch` and
//!   the epochs of entries it already holds) and gives up its copy.
//! - `lease.rs`: read leases, which keep a replica the primary no longer waits for from serving
//!   reads that miss acknowledged writes.
//! - `entry_log.rs`: the recent entries kept in memory and the durable log that replicas catch up
//!   from.
//! - `visibility.rs`: what readers may see: only confirmed entries, never a pending one, and no
//!   key while a change of it is pending (the argument that reads are linearizable).
//!
//! Together: a write is acknowledged only once every copy that may serve reads holds it (the
//! writer waits for ready replicas, leases cover those it stopped waiting for), a copy shows an
//! entry only once it is confirmed (held by all of those), and a copy only ever holds entries that
//! continue its primary's (sequence checks and divergence detection).

pub mod divergence;
mod entry_log;
mod lease;
mod replica;
mod visibility;
mod writer;

pub use writer::Job;

use crate::api::ShardStats;
use crate::db::{Db, DbError, ShardTable};
use crate::error::ApiError;
use crate::node::Node;
use crate::rowcache::{Budget, RowCache};
use crate::schema::Row;
use entry_log::Recent;
use replica::GateState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
pub use visibility::READ_WAIT;
use visibility::Visibility;

/// A peer's last known applied sequence number, and the primary epoch it was learnt in.
type PeerPosition = tokio::sync::Mutex<(u64, Option<u64>)>;

pub struct Shard {
    pub table: ShardTable,
    /// Last applied sequence number; held while applying, which serialises appliers.
    applied: tokio::sync::Mutex<u64>,
    /// The running hash of this copy's history at `applied`, when known (see `divergence.rs`);
    /// changed only under `applied`.
    hash: Mutex<Option<u128>>,
    jobs: mpsc::Sender<Job>,
    job_rx: Mutex<Option<mpsc::Receiver<Job>>>,
    standalone: AtomicBool,
    /// This copy's identity (see [`crate::api::ShardStatus::copy_id`]).
    copy_id: Mutex<String>,
    /// Read gate of a ready replica: closed while it catches up after becoming ready, open once it
    /// may serve reads. See [`Shard::catch_up_then_open`].
    gate: Mutex<GateState>,
    /// Recent entries, ascending and consecutive.
    cache: Mutex<Recent>,
    /// What each peer is known to have applied (`None`: unknown, ask), and in which primary's
    /// epoch that was learnt: a position from an earlier term of this server as primary may be
    /// long stale (the peer was copied afresh since), so it is asked anew.
    peers: Mutex<HashMap<String, Arc<PeerPosition>>>,
    /// Replica side: the read lease this copy holds, from which primary and until when.
    lease: Mutex<Option<(String, Instant)>>,
    /// Primary side: when a read lease was last granted to each replica. Only changed under this
    /// lock after checking the topology under it too (see [`Shard::grant_lease`]).
    grants: Mutex<HashMap<String, Instant>>,
    /// Primary side: until when the operator lets this copy serve reads as the primary.
    primary_lease: Mutex<Option<Instant>>,
    /// The table's rows at the visible sequence number, in memory (see [`crate::rowcache`]).
    rows: RowCache,
    /// Which applied entries readers may see (see `visibility.rs`).
    visibility: Visibility,
    /// An apply failed: its commit may still have happened (the answer was lost), so `applied`
    /// and `rows` may be behind the table. The next holder of `applied` reads both back from
    /// Postgres before doing anything else.
    resync: AtomicBool,
    /// This copy met an entry that contradicts its own and gave up its identity (see
    /// `divergence.rs`); cleared when a snapshot replaces it.
    diverged: AtomicBool,
}

impl Shard {
    /// A shard whose row cache is off; [`Shard::load_rows`] fills it. `hash` is the history hash
    /// stored with `applied` (see `divergence.rs`).
    pub fn spawn(
        table: ShardTable,
        applied: u64,
        hash: Option<&str>,
        copy_id: String,
        standalone: bool,
        budget: Arc<Budget>,
    ) -> Arc<Shard> {
        let (tx, rx) = mpsc::channel(4096);
        let rows = RowCache::off(&table.schema, budget);
        Arc::new(Shard {
            table,
            applied: tokio::sync::Mutex::new(applied),
            hash: Mutex::new(divergence::stored_hash(applied, hash)),
            jobs: tx,
            job_rx: Mutex::new(Some(rx)),
            standalone: AtomicBool::new(standalone),
            copy_id: Mutex::new(copy_id),
            gate: Mutex::new(GateState::Unseen),
            cache: Mutex::new(Recent::default()),
            peers: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
            grants: Mutex::new(HashMap::new()),
            primary_lease: Mutex::new(None),
            rows,
            visibility: Visibility::new(applied),
            resync: AtomicBool::new(false),
            diverged: AtomicBool::new(false),
        })
    }

    /// After a failed apply (see `resync`), takes the applied seq and the rows from the table
    /// again. The caller holds `applied`.
    pub(super) async fn resync_if_needed(&self, db: &Db, applied: &mut u64) -> Result<(), DbError> {
        if !self.resync.load(Ordering::Acquire) {
            return Ok(());
        }
        let stored = db.stats(&self.table, false).await?;
        self.set_history_hash(divergence::stored_hash(stored.applied_seq, stored.hash.as_deref()));
        if stored.applied_seq != *applied {
            tracing::warn!(
                shard = self.id(),
                memory = *applied,
                table = stored.applied_seq,
                "an apply reported as failed had committed; taking the table's state"
            );
            *applied = stored.applied_seq;
            self.cache.lock().expect("lock").clear();
        }
        self.load_rows_locked(db, *applied, false).await;
        self.resync.store(false, Ordering::Release);
        Ok(())
    }

    /// Loads the row cache from the table (it stays off if the rows do not fit the server's budget
    /// or Postgres fails).
    pub async fn load_rows(&self, db: &Db) {
        let applied = self.applied.lock().await;
        self.load_rows_locked(db, *applied, false).await;
    }

    /// [`Shard::load_rows`] for a caller holding `applied` (at `applied`). The table's state
    /// becomes the visible one, shown once confirmed (see `visibility.rs`); `new_copy`: the table
    /// holds another copy than before, so earlier confirmations no longer count.
    pub(super) async fn load_rows_locked(&self, db: &Db, applied: u64, new_copy: bool) {
        self.rows.turn_off();
        let room = usize::try_from(self.rows.budget_left()).unwrap_or(0);
        let loaded = match db.all_rows(&self.table, room).await {
            Ok(Some(rows)) => Some(rows),
            Ok(None) => {
                tracing::info!(shard = self.id(), room, "shard too large for the row cache; reads go to Postgres");
                None
            }
            Err(e) => {
                tracing::warn!(shard = self.id(), error = %e, "cannot load the row cache; reads go to Postgres");
                None
            }
        };
        // The cache and the visible state change together, so no confirmation lands in between.
        let mut vis = self.visibility_write();
        if let Some(rows) = loaded {
            self.rows.load(&self.table.schema, rows);
        }
        Shard::reset_visible(&mut vis, applied, new_copy);
    }

    /// Whether reads and decisions are served from memory.
    pub fn rows_cached(&self) -> bool {
        self.rows.is_on()
    }

    /// The latest stored rows of `keys` (pending entries included), for the writer's decisions:
    /// from the row cache, or from Postgres when it is off.
    pub(super) async fn stored_rows(&self, db: &Db, keys: &[i64]) -> Result<HashMap<i64, Row>, DbError> {
        match self.latest_cached(keys) {
            Some(rows) => Ok(rows),
            None => db.fetch_rows(&self.table, keys).await,
        }
    }

    pub fn id(&self) -> &str {
        &self.table.shard
    }
    pub fn is_standalone(&self) -> bool {
        self.standalone.load(Ordering::Relaxed)
    }
    pub fn set_standalone(&self) {
        self.standalone.store(true, Ordering::Relaxed);
    }
    pub fn copy_id(&self) -> String {
        self.copy_id.lock().expect("lock").clone()
    }

    pub async fn applied(&self) -> u64 {
        *self.applied.lock().await
    }

    /// Row count and checksum at the current sequence number, computed with writes held off (a
    /// primary pauses its writer for the length of one checksum scan).
    pub async fn stats_locked(&self, node: &Node) -> Result<ShardStats, ApiError> {
        let applied = self.applied.lock().await;
        let s = node.db.stats(&self.table, true).await?;
        debug_assert_eq!(s.applied_seq, *applied);
        Ok(ShardStats { applied_seq: s.applied_seq, rows: s.rows, checksum: s.checksum.unwrap_or_default() })
    }
}

#[cfg(test)]
mod testing {
    use crate::schema::{DType, Row, Schema, Value};

    pub fn schema() -> Schema {
        Schema::new(vec!["k".into(), "v".into()], vec![DType::Number, DType::String], None).unwrap()
    }
    pub fn row(k: i64, v: &str) -> Row {
        Row(vec![Value::Int(k), Value::Text(v.into())])
    }
}
