//! Per-shard write path and replication. Does I/O (Postgres, peers).
//!
//! **Primary.** Writes for a shard queue to one writer task, which takes every queued batch as one
//! group (group commit): it reads the stored rows the group touches, decides each batch against them
//! in arrival order (a batch is all-or-nothing: a conflict or absent key fails that batch alone),
//! and commits the surviving batches' final row states as one entry with the shard's next sequence
//! number, in one transaction. It then brings every `ready` replica up to that sequence number and
//! only then acknowledges. A replica that cannot apply fails the group's writes (the client may
//! retry: an identical insert is a no-op) until the operator demotes it. Because a retried no-op
//! still waits for every ready replica to reach the primary's sequence number, an acknowledgement
//! always means "on every ready replica", even for a write first committed by an earlier attempt.
//!
//! **Replica.** Entries must arrive in sequence: an entry at or below the applied number is skipped
//! (replays are harmless), one beyond the next is refused with `seq_gap` and the replica's position,
//! so the primary resends from there (from its in-memory cache or its durable log).
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
//!
//! **Read leases.** Waiting for every ready replica is only enough if nobody reads from a replica
//! the primary stopped waiting for. But topology changes reach servers and routers at different
//! times (a ConfigMap watch can lag by a second or more), and a replica cut off from its primary
//! and the operator may stay reachable by routers. So a ready replica serves reads only while it
//! holds a *read lease* from its shard's current primary, and a primary acknowledges nothing a
//! lease holder misses:
//!
//! - Every `lease_renew` (default 500 ms) a replica sends each primary it replicates from one
//!   `POST /v1/lease` naming all the shards it is a ready replica of there (one small request per
//!   primary, whatever the traffic). It notes its own monotonic time *before sending*; for every
//!   shard granted, its lease runs until that time plus `lease` (default 2 s). A replica that just
//!   became ready asks at once. Outside its lease a replica answers reads with `not_ready` (503), so
//!   routers try another copy.
//! - The primary grants a shard only if it is its primary (with its data intact) and lists the
//!   replica as ready, and records the grant time per replica, reading the topology and recording
//!   under one lock.
//! - Before acknowledging a group (or a refusal decided on stored rows), the primary takes every
//!   replica with a grant younger than `lease` (+1% for clock-rate drift) that the group's topology
//!   does not list as ready, and waits until that replica has applied the group's entry or the
//!   lease has run out. A process that just started does not know its predecessor's grants, so it
//!   acknowledges nothing before `lease` after its start.
//!
//! Why the replica asks rather than the primary pushing grants with its replication traffic: the
//! replica measures from before its request left, which is before the primary recorded the grant,
//! so the replica's lease always ends first, however long the request or its answer was delayed
//! (an answer arriving late only shortens the lease; one lost grants nothing). A pushed grant would
//! be measured from when it arrived, later than any time the primary knows, and a push that timed
//! out could still arrive and be honoured after the primary stopped counting on it. Why a grant
//! checks the topology under the lock the writer takes after reading its own: a grant decided on a
//! topology where the replica is ready is either visible to the writer, or was decided before the
//! writer's topology, which then lists the replica as ready and makes the writer wait for it anyway.
//!
//! The lease bounds the delay a demotion adds to writes (at most `lease`, once per demotion, and
//! none when the demoted replica is reachable and applies) and the time a replica cut off from its
//! primary keeps serving reads; four renewals per lease let three in a row fail before reads stop.
//! Leases do not cover a failover where the deposed primary keeps granting: that is fenced by
//! epochs and by the operator, as before.

use crate::api::{
    Change, Entry, Op, RecoverResponse, ReplicateRequest, ShardClient, ShardStats, SnapshotEnd, SnapshotHeader,
    WriteResponse,
};
use crate::db::{Db, DbError, ShardTable};
use crate::error::{ApiError, ReplicationError};
use crate::node::{Node, ShardRole};
use crate::rowcache::{Budget, RowCache};
use crate::schema::{Row, Schema};
use crate::topology::ReplicaState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most operations one group commits together.
const MAX_GROUP_OPS: usize = 4096;
/// Entries kept in memory for catching up replicas without reading the log table.
const CACHE_ENTRIES: usize = 2048;
/// Most row changes those entries may hold together: big batches (a bulk load of 500-row writes)
/// would otherwise keep hundreds of thousands of rows in memory. Older entries come from the log.
const CACHE_CHANGES: usize = 32_768;
/// Entries kept in the durable log.
const LOG_ENTRIES: u64 = 20_000;
/// Most entries sent to a replica in one request.
const MAX_SEND: usize = 256;

/// One batch waiting for the writer.
pub struct Job {
    pub ops: Vec<Op>,
    pub epoch: Option<u64>,
    pub dry_run: bool,
    pub reply: oneshot::Sender<Result<WriteResponse, ApiError>>,
}

pub struct Shard {
    pub table: ShardTable,
    /// Last applied sequence number; held while applying, which serialises appliers.
    applied: tokio::sync::Mutex<u64>,
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
    /// What each peer is known to have applied (`None`: unknown, ask).
    peers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// Replica side: the read lease this copy holds, from which primary and until when.
    lease: Mutex<Option<(String, Instant)>>,
    /// Primary side: when a read lease was last granted to each replica. Only changed under this
    /// lock after checking the topology under it too (see [`Shard::grant_lease`]).
    grants: Mutex<HashMap<String, Instant>>,
    /// The table's rows in memory, changed only under `applied` (see [`crate::rowcache`]).
    rows: RowCache,
    /// An apply failed: its commit may still have happened (the answer was lost), so `applied`
    /// and `rows` may be behind the table. The next holder of `applied` reads both back from
    /// Postgres before doing anything else.
    resync: AtomicBool,
    /// This copy met an entry that contradicts its own and gave up its identity (see the module
    /// documentation, divergence); cleared when a snapshot replaces it.
    diverged: AtomicBool,
}

impl Shard {
    /// A shard whose row cache is off; [`Shard::load_rows`] fills it.
    pub fn spawn(
        table: ShardTable,
        applied: u64,
        copy_id: String,
        standalone: bool,
        budget: Arc<Budget>,
    ) -> Arc<Shard> {
        let (tx, rx) = mpsc::channel(4096);
        let rows = RowCache::off(&table.schema, budget);
        Arc::new(Shard {
            table,
            applied: tokio::sync::Mutex::new(applied),
            jobs: tx,
            job_rx: Mutex::new(Some(rx)),
            standalone: AtomicBool::new(standalone),
            copy_id: Mutex::new(copy_id),
            gate: Mutex::new(GateState::Unseen),
            cache: Mutex::new(Recent::default()),
            peers: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
            grants: Mutex::new(HashMap::new()),
            rows,
            resync: AtomicBool::new(false),
            diverged: AtomicBool::new(false),
        })
    }

    /// After a failed apply (see `resync`), takes the applied seq and the rows from the table
    /// again. The caller holds `applied`.
    async fn resync_if_needed(&self, db: &Db, applied: &mut u64) -> Result<(), DbError> {
        if !self.resync.load(Ordering::Acquire) {
            return Ok(());
        }
        let stored = db.stats(&self.table, false).await?;
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
        self.load_rows_locked(db).await;
        self.resync.store(false, Ordering::Release);
        Ok(())
    }

    /// Loads the row cache from the table (it stays off if the rows do not fit the server's budget
    /// or Postgres fails).
    pub async fn load_rows(&self, db: &Db) {
        let _applied = self.applied.lock().await;
        self.load_rows_locked(db).await;
    }

    /// [`Shard::load_rows`] for a caller holding `applied`.
    async fn load_rows_locked(&self, db: &Db) {
        self.rows.turn_off();
        let room = usize::try_from(self.rows.budget_left()).unwrap_or(0);
        match db.all_rows(&self.table, room).await {
            Ok(Some(rows)) => self.rows.load(&self.table.schema, rows),
            Ok(None) => {
                tracing::info!(shard = self.id(), room, "shard too large for the row cache; reads go to Postgres")
            }
            Err(e) => tracing::warn!(shard = self.id(), error = %e, "cannot load the row cache; reads go to Postgres"),
        }
    }

    /// Whether reads and decisions are served from memory.
    pub fn rows_cached(&self) -> bool {
        self.rows.is_on()
    }

    /// The rows of each inclusive range as a JSON array text, sorted by key: from the row cache,
    /// or from Postgres when it is off.
    pub async fn read_ranges_json(&self, db: &Db, ranges: &[(i64, i64)]) -> Result<Vec<String>, DbError> {
        match self.rows.ranges_json(ranges) {
            Some(parts) => Ok(parts),
            None => db.read_ranges_json(&self.table, ranges).await,
        }
    }

    /// The stored rows of `keys`: from the row cache, or from Postgres when it is off.
    async fn stored_rows(&self, db: &Db, keys: &[i64]) -> Result<HashMap<i64, Row>, DbError> {
        match self.rows.rows(keys) {
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

    /// Replica side: whether this copy holds an unexpired read lease from `primary`.
    pub fn holds_lease(&self, primary: &str) -> bool {
        self.lease
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|(from, until)| from == primary && Instant::now() < *until)
    }

    /// Replica side: records a lease from `primary` valid until `until` (never shortens one from
    /// the same primary: renewals may answer out of order).
    pub fn extend_lease(&self, primary: &str, until: Instant) {
        let mut l = self.lease.lock().expect("lock");
        match &mut *l {
            Some((from, current)) if from == primary => *current = (*current).max(until),
            other => *other = Some((primary.to_owned(), until)),
        }
    }

    /// Primary side: grants `replica` a read lease if this server is the shard's primary (with its
    /// data intact) and lists `replica` as ready. The topology is read and the grant recorded under
    /// one lock, which [`process_group`] also takes after reading the topology: a grant decided on
    /// an older topology is always visible to a group that saw the newer one.
    pub fn grant_lease(&self, node: &Node, replica: &str) -> bool {
        let mut grants = self.grants.lock().expect("lock");
        let topo = node.topology();
        let Some(entry) = topo.as_ref().and_then(|t| t.shard(self.id())) else { return false };
        let intact = entry.copies.get(node.name()).is_none_or(|recorded| *recorded == self.copy_id());
        let ok = entry.primary == node.name()
            && replica != node.name()
            && intact
            && entry.replicas.get(replica) == Some(&ReplicaState::Ready);
        if ok {
            grants.insert(replica.to_owned(), Instant::now());
        }
        ok
    }

    /// Primary side: replicas whose lease may still run, with when it surely has run out. The
    /// bound adds a margin for the two monotonic clocks running at slightly different rates.
    fn live_grants(&self, lease: Duration) -> Vec<(String, Instant)> {
        let now = Instant::now();
        let mut grants = self.grants.lock().expect("lock");
        grants.retain(|_, granted| *granted + lease_bound(lease) > now);
        grants.iter().map(|(r, granted)| (r.clone(), *granted + lease_bound(lease))).collect()
    }

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

    /// Queues a batch for the writer (started on first use) and waits for its outcome.
    pub async fn submit(
        self: &Arc<Self>,
        node: &Arc<Node>,
        ops: Vec<Op>,
        epoch: Option<u64>,
        dry_run: bool,
    ) -> Result<WriteResponse, ApiError> {
        if let Some(rx) = self.job_rx.lock().expect("lock").take() {
            tokio::spawn(writer(Arc::clone(node), Arc::clone(self), rx));
        }
        let (reply, wait) = oneshot::channel();
        self.jobs
            .send(Job { ops, epoch, dry_run, reply })
            .await
            .map_err(|_| ApiError::Internal("shard writer stopped".into()))?;
        wait.await.map_err(|_| ApiError::Internal("shard writer dropped a request".into()))?
    }

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
    async fn entries(&self, node: &Node, from: u64, to: u64) -> Result<Vec<Arc<Entry>>, ReplicationError> {
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

    fn peer_state(&self, peer: &str) -> Arc<tokio::sync::Mutex<Option<u64>>> {
        Arc::clone(self.peers.lock().expect("lock").entry(peer.to_owned()).or_default())
    }

    /// Brings `peer` up to `target`, sending what it misses. Serialised per peer; with `wait` false
    /// (feeding a replica that holds up no acknowledgement) it gives way when a sync to that peer is
    /// already running, since the next one sends everything missed anyway.
    async fn sync_peer(
        &self,
        node: &Node,
        epoch: u64,
        peer: &str,
        url: &str,
        target: u64,
        wait: bool,
    ) -> Result<(), ReplicationError> {
        let state = self.peer_state(peer);
        let mut known = if wait {
            state.lock().await
        } else {
            match state.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        let client = node.peer(url);
        for _ in 0..64 {
            match *known {
                Some(a) if a == target => return Ok(()),
                Some(a) if a > target => return Err(ReplicationError::Ahead { replica: a, primary: target }),
                _ => {}
            }
            // Unknown position: send the newest entry (the common case) and learn from the answer.
            let from = known.map_or(target, |a| a + 1);
            let entries = if target == 0 { Vec::new() } else { self.entries(node, from, target).await? };
            let prev_epoch = match entries.first() {
                Some(first) => self.epoch_at(node, first.seq - 1).await?,
                None => None,
            };
            let req = ReplicateRequest {
                epoch,
                primary: node.name().to_owned(),
                entries: entries.iter().map(|e| Entry::clone(e)).collect(),
                prev_epoch,
            };
            let before = *known;
            match client.replicate(self.id(), &req).await {
                Ok(r) => *known = Some(r.applied),
                Err(e) => match e.body() {
                    Some(b) if b.code == crate::api::ErrorCode::SeqGap => *known = b.applied,
                    _ => {
                        *known = None;
                        return Err(e.into());
                    }
                },
            }
            if *known == before && before.is_some() {
                return Err(ReplicationError::NoProgress);
            }
        }
        Err(ReplicationError::NoProgress)
    }

    /// Applies entries sent by the primary (replica side).
    pub async fn replicate(&self, node: &Node, req: ReplicateRequest) -> Result<u64, ApiError> {
        let mut applied = self.applied.lock().await;
        self.apply_entries(node, &mut applied, req.entries, req.prev_epoch).await
    }

    /// The epoch of this copy's entry `seq`, from memory or the durable log; `None` when neither
    /// has it any more (or `seq` is 0).
    async fn epoch_at(&self, node: &Node, seq: u64) -> Result<Option<u64>, DbError> {
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

    /// Applies consecutive entries on top of `applied` (held locked by the caller), checking that
    /// they continue this copy's own (see the module documentation, divergence). `prev_epoch` is
    /// the sender's epoch for the entry before the first one, if it knows it.
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
                if let Some(ours) = self.epoch_at(node, entry.seq).await?
                    && ours != entry.epoch
                {
                    return Err(self.diverge(node, entry.seq, ours, entry.epoch).await);
                }
                prev = Some((entry.seq, entry.epoch));
                continue;
            }
            if entry.seq != *applied + 1 {
                return Err(ApiError::SeqGap { first: entry.seq, applied: *applied });
            }
            if let Some((seq, theirs)) = prev
                && seq == *applied
                && let Some(ours) = self.epoch_at(node, seq).await?
                && ours != theirs
            {
                return Err(self.diverge(node, seq, ours, theirs).await);
            }
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

    /// Right after an entry committed, under `applied`.
    fn after_apply(&self, node: &Node, entry: Arc<Entry>) {
        self.rows.apply(&entry.changes);
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

/// When a lease granted at `t` has surely run out on the replica: `t + lease` plus a margin for
/// the replica's monotonic clock running slower than ours (real clocks drift by parts per million;
/// the margin allows 1%).
fn lease_bound(lease: Duration) -> Duration {
    lease + lease / 100
}

/// Holds back an acknowledgement until `peer`, which may still hold a read lease ending by `end`
/// but is no longer a ready replica, has applied `target` or that lease has run out.
async fn wait_out_lease(
    node: Arc<Node>,
    shard: Arc<Shard>,
    epoch: u64,
    peer: String,
    url: Option<String>,
    target: u64,
    end: Instant,
) {
    if let Some(url) = url {
        let synced =
            tokio::time::timeout_at(end.into(), shard.sync_peer(&node, epoch, &peer, &url, target, true)).await;
        match synced {
            Ok(Ok(())) => return,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a demoted replica still holding a lease cannot apply"),
            Err(_) => {}
        }
    }
    tracing::info!(shard = shard.id(), %peer, seq = target, "waiting out the read lease of a demoted replica");
    tokio::time::sleep_until(end.into()).await;
}

/// Recent entries kept in memory, with the row changes they hold together (bounded by
/// [`CACHE_ENTRIES`] and [`CACHE_CHANGES`]).
#[derive(Debug, Default)]
struct Recent {
    entries: VecDeque<Arc<Entry>>,
    changes: usize,
}

impl Recent {
    fn clear(&mut self) {
        self.entries.clear();
        self.changes = 0;
    }
}

/// Whether a ready replica may serve reads yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateState {
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

/// The writer task of one shard: drains queued jobs into groups.
async fn writer(node: Arc<Node>, shard: Arc<Shard>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut ops = first.ops.len();
        let mut group = vec![first];
        while ops < MAX_GROUP_OPS {
            match rx.try_recv() {
                Ok(j) => {
                    ops += j.ops.len();
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        node.metrics.group_size.observe(group.len() as f64);
        process_group(&node, &shard, group).await;
    }
}

/// What one batch does, decided against the stored rows plus earlier batches of the group.
#[derive(Debug, Default)]
struct Decision {
    changes: HashMap<i64, Option<crate::schema::Row>>,
    outcome: WriteResponse,
}

fn decide(
    job: &Job,
    stored: &HashMap<i64, crate::schema::Row>,
    group: &HashMap<i64, Option<crate::schema::Row>>,
    schema: &crate::schema::Schema,
) -> Result<Decision, ApiError> {
    let mut d = Decision::default();
    let mut conflicts = Vec::new();
    let mut absent = Vec::new();
    for op in &job.ops {
        let key = match op {
            Op::Insert { row } => row.key(schema),
            Op::Update { key, .. } | Op::Delete { key } => *key,
        };
        let current = match d.changes.get(&key).or_else(|| group.get(&key)) {
            Some(state) => state.as_ref(),
            None => stored.get(&key),
        };
        match (op, current) {
            (Op::Insert { row }, None) => {
                d.changes.insert(key, Some(row.clone()));
                d.outcome.inserted += 1;
            }
            (Op::Insert { row }, Some(cur)) if cur == row => d.outcome.unchanged += 1,
            (Op::Insert { .. }, Some(_)) => conflicts.push(key),
            (Op::Update { .. } | Op::Delete { .. }, None) => absent.push(key),
            (Op::Update { row, .. }, Some(_)) => {
                d.changes.insert(key, Some(row.clone()));
                d.outcome.updated += 1;
            }
            (Op::Delete { .. }, Some(_)) => {
                d.changes.insert(key, None);
                d.outcome.deleted += 1;
            }
        }
    }
    let list = |keys: &[i64]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
    let key_name = schema.key_name();
    if !conflicts.is_empty() {
        return Err(ApiError::Conflict {
            message: format!("{key_name} {} already hold(s) a different row; nothing was written", list(&conflicts)),
            keys: conflicts,
        });
    }
    if !absent.is_empty() {
        return Err(ApiError::NotFound {
            message: format!("no data entry for {key_name} {}; nothing was written", list(&absent)),
            keys: absent,
        });
    }
    Ok(d)
}

async fn process_group(node: &Arc<Node>, shard: &Arc<Shard>, group: Vec<Job>) {
    let role = node.shard(shard.id()).await.map(|(_, r)| r);
    let (epoch, replicas) = match &role {
        Ok(ShardRole::Primary { stale_copy: true, .. }) => {
            for job in group {
                let _ = job.reply.send(Err(ApiError::NotReady(format!(
                    "this copy of shard {} lost its data; it accepts no writes until the operator heals it",
                    shard.id()
                ))));
            }
            return;
        }
        Ok(ShardRole::Primary { epoch, entry, .. }) => (*epoch, entry.replicas.clone()),
        Ok(ShardRole::Standalone) => (0, BTreeMap::new()),
        Ok(ShardRole::Replica { .. }) | Err(_) => {
            for job in group {
                let _ =
                    job.reply.send(Err(ApiError::NotPrimary { server: node.name().into(), shard: shard.id().into() }));
            }
            return;
        }
    };
    // Fencing: only a sender on our epoch may write.
    let mut jobs = Vec::with_capacity(group.len());
    for job in group {
        match job.epoch {
            Some(e) if e < epoch => {
                let _ = job.reply.send(Err(ApiError::StaleEpoch { got: e, ours: epoch }));
            }
            Some(e) if e > epoch => {
                let _ = job.reply.send(Err(ApiError::EpochAhead { got: e, ours: epoch }));
            }
            _ => jobs.push(job),
        }
    }
    if jobs.is_empty() {
        return;
    }
    let schema = &shard.table.schema;
    let mut keys: Vec<i64> = jobs
        .iter()
        .flat_map(|j| j.ops.iter())
        .map(|op| match op {
            Op::Insert { row } => row.key(schema),
            Op::Update { key, .. } | Op::Delete { key } => *key,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();

    let mut applied = shard.applied.lock().await;
    if let Err(e) = shard.resync_if_needed(&node.db, &mut applied).await {
        let e = Arc::new(e);
        for job in jobs {
            let _ = job.reply.send(Err(ApiError::Internal(format!("reading the shard's state back: {e}"))));
        }
        return;
    }
    let stored = match shard.stored_rows(&node.db, &keys).await {
        Ok(s) => s,
        Err(e) => {
            let e = Arc::new(e);
            for job in jobs {
                let _ = job.reply.send(Err(ApiError::Internal(format!("reading rows: {e}"))));
            }
            return;
        }
    };
    let mut changes: HashMap<i64, Option<crate::schema::Row>> = HashMap::new();
    let mut accepted = Vec::with_capacity(jobs.len());
    // Batches refused because of the stored rows (a key absent, a conflicting row). Those rows may
    // come from an entry not yet confirmed by every ready replica (a retry after a timed-out
    // attempt, typically), so the refusal is held back like an acknowledgement: a delete retried
    // into 404 must mean "gone on every copy that serves reads", not "gone here".
    let mut refused = Vec::new();
    for job in jobs {
        match decide(&job, &stored, &changes, schema) {
            Ok(d) if job.dry_run => {
                let _ = job.reply.send(Ok(d.outcome));
            }
            Ok(d) => {
                changes.extend(d.changes);
                accepted.push((job, d.outcome));
            }
            Err(e @ (ApiError::NotFound { .. } | ApiError::Conflict { .. })) if !job.dry_run => refused.push((job, e)),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    if accepted.is_empty() && refused.is_empty() {
        return;
    }
    if !changes.is_empty() {
        let mut list: Vec<Change> = changes.into_iter().map(|(key, row)| Change { key, row }).collect();
        list.sort_unstable_by_key(|c| c.key);
        let entry = Entry { seq: *applied + 1, epoch, changes: list };
        if let Err(e) = node.db.apply(&shard.table, &entry).await {
            shard.resync.store(true, Ordering::Release);
            let e = Arc::new(e);
            for job in accepted.into_iter().map(|(j, _)| j).chain(refused.into_iter().map(|(j, _)| j)) {
                let _ = job.reply.send(Err(ApiError::Internal(format!("committing seq {}: {e}", entry.seq))));
            }
            return;
        }
        *applied = entry.seq;
        node.metrics.entries_applied.inc();
        shard.after_apply(node, Arc::new(entry));
    }
    let target = *applied;
    drop(applied);

    // Every ready replica must hold `target` before anyone is acknowledged; recovering and leaving
    // replicas are fed too, but never hold up an acknowledgement, except while they may still hold
    // a read lease: then the acknowledgement waits until they applied `target` or the lease ran out.
    let topo = node.topology();
    let lease = node.config.lease;
    let mut leased: HashMap<String, Instant> = shard.live_grants(lease).into_iter().collect();
    let mut must = Vec::new();
    let mut lease_waits = Vec::new();
    for (peer, state) in &replicas {
        if peer == node.name() {
            continue;
        }
        let ready = *state == ReplicaState::Ready;
        // A ready replica is waited for in full anyway.
        let lease_end = leased.remove(peer);
        if !ready && let Some(end) = lease_end {
            let url = topo.as_ref().and_then(|t| t.servers.get(peer)).map(|s| s.url.clone());
            lease_waits.push(wait_out_lease(
                Arc::clone(node),
                Arc::clone(shard),
                epoch,
                peer.clone(),
                url,
                target,
                end,
            ));
            continue;
        }
        let Some(url) = topo.as_ref().and_then(|t| t.servers.get(peer)).map(|s| s.url.clone()) else { continue };
        let (node2, shard2, peer2) = (Arc::clone(node), Arc::clone(shard), peer.clone());
        let task = async move {
            let r = shard2.sync_peer(&node2, epoch, &peer2, &url, target, ready).await;
            (peer2, r)
        };
        if ready {
            must.push(task);
        } else {
            tokio::spawn(async move {
                if let (peer, Err(e)) = task.await {
                    tracing::debug!(%peer, error = %e, "feeding a non-ready replica failed");
                }
            });
        }
    }
    // Replicas no longer listed at all may still hold a lease too.
    for (peer, end) in leased {
        let url = topo.as_ref().and_then(|t| t.servers.get(&peer)).map(|s| s.url.clone());
        lease_waits.push(wait_out_lease(Arc::clone(node), Arc::clone(shard), epoch, peer, url, target, end));
    }
    // Leases granted by an earlier run of this server are unknown: wait them out once. A
    // standalone shard has no replicas and never granted any.
    let standalone = matches!(role, Ok(ShardRole::Standalone));
    let restart_bound = if standalone { Instant::now() } else { node.started + lease_bound(lease) };
    let (results, _, _) = futures::join!(
        futures::future::join_all(must),
        futures::future::join_all(lease_waits),
        tokio::time::sleep_until(restart_bound.into()),
    );
    let failed = results.into_iter().find_map(|(peer, r)| r.err().map(|e| (peer, e)));
    match failed {
        None => {
            for (job, mut outcome) in accepted {
                outcome.seq = target;
                let _ = job.reply.send(Ok(outcome));
            }
            for (job, e) in refused {
                let _ = job.reply.send(Err(e));
            }
        }
        Some((peer, source)) => {
            node.metrics.replication_failures.inc();
            let source = Arc::new(source);
            for job in accepted.into_iter().map(|(j, _)| j).chain(refused.into_iter().map(|(j, _)| j)) {
                let _ = job.reply.send(Err(ApiError::Replication {
                    shard: shard.id().into(),
                    replica: peer.clone(),
                    seq: target,
                    source: Arc::clone(&source),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{DType, Row, Schema, Value};

    fn schema() -> Schema {
        Schema::new(vec!["k".into(), "v".into()], vec![DType::Number, DType::String], None).unwrap()
    }
    fn row(k: i64, v: &str) -> Row {
        Row(vec![Value::Int(k), Value::Text(v.into())])
    }
    fn job(ops: Vec<Op>) -> Job {
        Job { ops, epoch: None, dry_run: false, reply: oneshot::channel().0 }
    }

    #[test]
    fn decisions_follow_the_seed_rules() {
        let s = schema();
        let stored: HashMap<_, _> = [(1, row(1, "a")), (2, row(2, "b"))].into();
        let none = HashMap::new();
        // New key inserts; identical row is a no-op; different row conflicts and fails the batch.
        let d =
            decide(&job(vec![Op::Insert { row: row(3, "c") }, Op::Insert { row: row(1, "a") }]), &stored, &none, &s)
                .unwrap();
        assert_eq!((d.outcome.inserted, d.outcome.unchanged), (1, 1));
        assert_eq!(d.changes.len(), 1);
        let e =
            decide(&job(vec![Op::Insert { row: row(3, "c") }, Op::Insert { row: row(1, "x") }]), &stored, &none, &s)
                .unwrap_err();
        assert!(matches!(&e, ApiError::Conflict { keys, .. } if keys == &[1]), "{e}");
        // Update and delete need the key to exist.
        let e = decide(&job(vec![Op::Update { key: 9, row: row(9, "z") }]), &stored, &none, &s).unwrap_err();
        assert!(matches!(&e, ApiError::NotFound { keys, .. } if keys == &[9]), "{e}");
        let d = decide(&job(vec![Op::Delete { key: 2 }, Op::Update { key: 1, row: row(1, "n") }]), &stored, &none, &s)
            .unwrap();
        assert_eq!(d.changes[&2], None);
        assert_eq!(d.changes[&1], Some(row(1, "n")));
    }

    #[test]
    fn recent_entries_kept_in_memory_are_bounded_by_count_and_by_rows() {
        let shard =
            Shard::spawn(ShardTable::new("sh1", schema()), 0, "copy".into(), false, crate::rowcache::Budget::new(0));
        let entry = |seq: u64, rows: i64| {
            Arc::new(Entry {
                seq,
                epoch: 1,
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

    #[test]
    fn later_batches_of_a_group_see_earlier_ones() {
        let s = schema();
        let stored = HashMap::new();
        let group: HashMap<_, _> = [(5, Some(row(5, "first"))), (6, None)].into();
        // Same row again: no-op; different: conflict; a key deleted earlier in the group is absent.
        assert_eq!(
            decide(&job(vec![Op::Insert { row: row(5, "first") }]), &stored, &group, &s).unwrap().outcome.unchanged,
            1
        );
        assert!(decide(&job(vec![Op::Insert { row: row(5, "second") }]), &stored, &group, &s).is_err());
        let stored6: HashMap<_, _> = [(6, row(6, "old"))].into();
        assert!(matches!(
            decide(&job(vec![Op::Delete { key: 6 }]), &stored6, &group, &s),
            Err(ApiError::NotFound { .. })
        ));
    }
}
