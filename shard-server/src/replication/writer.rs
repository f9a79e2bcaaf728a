//! The primary's side of a shard: the writer task, group commit, and bringing replicas up to date
//! before acknowledging. Does I/O (Postgres, peers).
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
//! A ready replica that refuses the group because it already follows a newer topology is not a
//! replica that cannot apply: the primary follows that topology (bounded) and, while it still names
//! it the shard's primary, replicates the group at that epoch to that epoch's ready replicas.
//!
//! **A failed group.** When the group's commit fails, its batches are committed again one at a
//! time, each decided afresh: a batch that Postgres refuses (for whatever reason) fails alone, and
//! every other batch of its group succeeds as if sent alone.
//!
//! Replicas that are not ready are fed too but hold up no acknowledgement, except while they may
//! still hold a read lease (see `lease.rs`).
//!
//! **Confirmation.** The moment a group is acknowledged its entry is confirmed: the primary shows
//! it to its readers (before it answers anyone) and tells the replicas, with the entries it sends
//! next or, when no group follows at once, with a message of its own (see `visibility.rs`). An
//! entry committed by a group that failed stays pending, hidden from readers, until a later group
//! confirms it; an idle writer with pending entries (a failed group, or a copy that just became
//! the primary with entries from its predecessor) runs an empty group now and then, which brings
//! every ready replica up to the primary's last entry and so confirms everything it holds.

use super::lease::{predecessor_grants_end, wait_out_lease};
use super::{Shard, divergence};
use crate::api::{Change, Entry, Op, ReplicateRequest, WriteResponse};
use crate::db::DbError;
use crate::error::{ApiError, ReplicationError};
use crate::node::{Node, ShardRole};
use crate::topology::ReplicaState;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most operations one group commits together.
const MAX_GROUP_OPS: usize = 4096;
/// How often an idle writer with unconfirmed entries tries to confirm them with an empty group.
const BARRIER_RETRY: Duration = Duration::from_millis(200);
/// How long a primary waits to follow a newer topology one of its ready replicas already follows,
/// and how many such epochs one group goes through, before its writes fail.
const FOLLOW_REPLICA_EPOCH: Duration = Duration::from_secs(2);
const MAX_EPOCH_HOPS: usize = 3;
/// How long an acknowledged group's confirmation waits for a next group to carry it before it is
/// sent on its own (see [`push_confirmation`]).
const CONFIRM_LINGER: Duration = Duration::from_millis(5);
/// A group that took longer than this is confirmed to the replicas at once (see
/// [`push_confirmation`]).
const CONFIRM_AT_ONCE_AFTER: Duration = Duration::from_millis(super::READ_WAIT.as_millis() as u64 / 2);

/// One batch waiting for the writer.
pub struct Job {
    pub ops: Vec<Op>,
    pub epoch: Option<u64>,
    pub dry_run: bool,
    pub reply: oneshot::Sender<Result<WriteResponse, ApiError>>,
}

impl Shard {
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

    /// Asks the writer (started if need be) for an empty group, which confirms every entry this
    /// primary holds once every ready replica has it: readers waiting for pending entries of a
    /// primary that is not writing need it. Does nothing when the queue is full (a group runs).
    pub fn request_barrier(self: &Arc<Self>, node: &Arc<Node>) {
        if let Some(rx) = self.job_rx.lock().expect("lock").take() {
            tokio::spawn(writer(Arc::clone(node), Arc::clone(self), rx));
        }
        let (reply, _) = oneshot::channel();
        let _ = self.jobs.try_send(Job { ops: Vec::new(), epoch: None, dry_run: false, reply });
    }

    fn peer_state(&self, peer: &str) -> Arc<super::PeerPosition> {
        Arc::clone(self.peers.lock().expect("lock").entry(peer.to_owned()).or_default())
    }

    /// Brings `peer` up to `target`, sending what it misses. Serialised per peer; with `wait` false
    /// (feeding a replica that holds up no acknowledgement) it gives way when a sync to that peer is
    /// already running, since the next one sends everything missed anyway.
    pub(super) async fn sync_peer(
        &self,
        node: &Node,
        epoch: u64,
        peer: &str,
        url: &str,
        target: u64,
        wait: bool,
    ) -> Result<(), ReplicationError> {
        let state = self.peer_state(peer);
        let mut guard = if wait {
            state.lock().await
        } else {
            match state.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        let (learnt_in, known) = &mut *guard;
        if *learnt_in != epoch {
            (*learnt_in, *known) = (epoch, None);
        }
        let client = node.peer(url);
        for _ in 0..64 {
            match *known {
                Some(a) if a == target => return Ok(()),
                Some(a) if a > target => return Err(ReplicationError::Ahead { replica: a, primary: target }),
                _ => {}
            }
            // Unknown position: send the newest entry (the common case) and learn from the answer.
            let from = known.map_or(target, |a| a + 1);
            let entries = if target == 0 {
                Vec::new()
            } else {
                match self.entries(node, from, target).await {
                    Ok(entries) => entries,
                    // This copy's own newest entry is not in its log (its state came from a
                    // snapshot, and it restarted since): ask the peer's position with no entries
                    // instead. A peer already there is in sync if it holds the same history
                    // (checked below); one behind is sent what it misses from there.
                    Err(ReplicationError::NeedsSnapshot { .. }) if known.is_none() => Vec::new(),
                    Err(e) => {
                        // Ask the peer's position anew next time, from the newest entry.
                        *known = None;
                        return Err(e);
                    }
                }
            };
            let probe = entries.is_empty() && target != 0;
            let prev_epoch = match entries.first() {
                Some(first) => self.epoch_at(node, first.seq - 1).await?,
                None => None,
            };
            let req = ReplicateRequest {
                epoch,
                primary: node.name().to_owned(),
                entries: entries.iter().map(|e| Entry::clone(e)).collect(),
                prev_epoch,
                confirmed: self.confirmed(node).await,
            };
            let before = *known;
            match client.replicate(self.id(), &req).await {
                Ok(r) if probe && r.applied == target => {
                    // Sent nothing, so nothing was checked: the histories must be shown the same.
                    let theirs = r.hash.as_deref().map(divergence::from_hex);
                    let same = match (self.history_hash(), theirs) {
                        (Some(ours), Some(Some(theirs))) => ours == theirs,
                        // Both from before history hashes: nothing tells them apart.
                        (None, None) => true,
                        _ => false,
                    };
                    if !same {
                        return Err(ReplicationError::NeedsSnapshot { from: target, to: target });
                    }
                    *known = Some(r.applied);
                }
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
}

/// The writer task of one shard: drains queued jobs into groups. While an entry it holds is
/// unconfirmed and nothing is queued, it runs an empty group every [`BARRIER_RETRY`].
async fn writer(node: Arc<Node>, shard: Arc<Shard>, mut rx: mpsc::Receiver<Job>) {
    loop {
        let first = if shard.unconfirmed() {
            match tokio::time::timeout(BARRIER_RETRY, rx.recv()).await {
                Ok(Some(job)) => Some(job),
                Ok(None) => return,
                Err(_) => None,
            }
        } else {
            match rx.recv().await {
                Some(job) => Some(job),
                None => return,
            }
        };
        let Some(first) = first else {
            process_group(&node, &shard, Vec::new()).await;
            continue;
        };
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

/// Decides, commits and replicates one group, then acknowledges it (see the module
/// documentation). An empty group (or one of empty jobs, see [`Shard::request_barrier`]) commits
/// nothing and only brings every ready replica up to this primary's last entry, confirming it.
async fn process_group(node: &Arc<Node>, shard: &Arc<Shard>, group: Vec<Job>) {
    let started = Instant::now();
    let barrier = group.iter().all(|j| j.ops.is_empty());
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
    if jobs.is_empty() && !barrier {
        return;
    }
    let schema = &shard.table.schema;
    let keys = keys_of(jobs.iter().flat_map(|j| j.ops.iter()), schema);

    let mut applied = shard.applied.lock().await;
    let before = *applied;
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
    // The group's real batches in arrival order, each with its decision: accepted, or refused
    // because of the stored rows (a key absent, a conflicting row). Those rows may come from an
    // entry not yet confirmed by every ready replica (a retry after a timed-out attempt,
    // typically), so a refusal is held back like an acknowledgement: a delete retried into 404
    // must mean "gone on every copy that serves reads", not "gone here".
    let mut decided = Vec::with_capacity(jobs.len());
    for job in jobs {
        match decide(&job, &stored, &changes, schema) {
            Ok(d) if job.dry_run => {
                let _ = job.reply.send(Ok(d.outcome));
            }
            Ok(d) => {
                changes.extend(d.changes);
                decided.push((job, Ok(d.outcome)));
            }
            Err(e @ (ApiError::NotFound { .. } | ApiError::Conflict { .. })) if !job.dry_run => {
                decided.push((job, Err(e)))
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    if decided.is_empty() && !barrier {
        return;
    }
    if !changes.is_empty() {
        let mut list: Vec<Change> = changes.into_iter().map(|(key, row)| Change { key, row }).collect();
        list.sort_unstable_by_key(|c| c.key);
        let (entry, hash) = next_entry(shard, *applied + 1, epoch, list);
        match node.db.apply(&shard.table, &entry).await {
            Ok(()) => {
                *applied = entry.seq;
                shard.set_history_hash(hash);
                node.metrics.entries_applied.inc();
                shard.after_apply(node, Arc::new(entry));
            }
            Err(e) => {
                // One batch Postgres refuses must not fail the others it shared the group with.
                shard.resync.store(true, Ordering::Release);
                tracing::warn!(shard = shard.id(), seq = entry.seq, batches = decided.len(), error = %e,
                    "a group commit failed; committing its batches one by one");
                decided = commit_one_by_one(node, shard, &mut applied, epoch, decided).await;
            }
        }
    }
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for (job, decision) in decided {
        match decision {
            Ok(outcome) => accepted.push((job, outcome)),
            Err(e) => refused.push((job, e)),
        }
    }
    if accepted.is_empty() && refused.is_empty() && !barrier {
        return;
    }
    let target = *applied;
    drop(applied);

    // A ready replica that already follows a newer topology than this group's refuses it as
    // stale. Every change of epoch (a rolling restart's drains, servers listed at new URLs) would
    // then fail the writes in flight although the shard may be unchanged: follow that topology
    // (both watch the same document: usually milliseconds), and when it still makes this server
    // the shard's primary, bring its ready replicas up to `target` at that epoch, as the next
    // group would (its lease waits included). Anything else fails the group as before.
    let standalone = matches!(role, Ok(ShardRole::Standalone));
    let (mut epoch, mut replicas) = (epoch, replicas);
    let mut failed = replicate_group(node, shard, epoch, &replicas, target, standalone).await;
    for _ in 0..MAX_EPOCH_HOPS {
        let Some(newer) = failed.as_ref().and_then(|(_, e)| newer_epoch(e, epoch)) else { break };
        if node.follow_epoch(newer, FOLLOW_REPLICA_EPOCH).await.is_none() {
            break;
        }
        match node.shard(shard.id()).await.map(|(_, r)| r) {
            Ok(ShardRole::Primary { epoch: now, entry, stale_copy: false, .. }) if now > epoch => {
                tracing::debug!(shard = shard.id(), from = epoch, to = now, "replicating the group at a newer epoch");
                (epoch, replicas) = (now, entry.replicas);
            }
            _ => break,
        }
        failed = replicate_group(node, shard, epoch, &replicas, target, standalone).await;
    }
    match failed {
        None => {
            // Shown to this primary's readers before anyone hears of it (see `visibility.rs`).
            shard.confirm_own(target);
            if shard.jobs.capacity() == shard.jobs.max_capacity() {
                // No group is queued to carry the confirmation to the replicas.
                let fresh = target > before && started.elapsed() < CONFIRM_AT_ONCE_AFTER;
                let linger = if fresh { CONFIRM_LINGER } else { Duration::ZERO };
                push_confirmation(node, shard, epoch, &replicas, target, linger);
            }
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
            let writes = accepted.iter().filter(|(j, _)| !j.ops.is_empty()).count()
                + refused.iter().filter(|(j, _)| !j.ops.is_empty()).count();
            if writes > 0 {
                tracing::warn!(shard = shard.id(), replica = %peer, seq = target, epoch, writes, error = %source,
                    "a ready replica did not confirm; the group's writes fail");
            }
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

/// The epoch a replica refused a group's entries for as newer than the group's `epoch`.
fn newer_epoch(error: &ReplicationError, epoch: u64) -> Option<u64> {
    let ReplicationError::Client(e) = error else { return None };
    e.body().filter(|b| b.code == crate::api::ErrorCode::StaleEpoch).and_then(|b| b.epoch).filter(|n| *n > epoch)
}

/// Brings the replicas of a group (`replicas`, at `epoch`) up to `target`; the first ready replica
/// that did not confirm, and why.
async fn replicate_group(
    node: &Arc<Node>,
    shard: &Arc<Shard>,
    epoch: u64,
    replicas: &BTreeMap<String, ReplicaState>,
    target: u64,
    standalone: bool,
) -> Option<(String, ReplicationError)> {
    // Every ready replica must hold `target` before anyone is acknowledged; recovering and leaving
    // replicas are fed too, but never hold up an acknowledgement, except while they may still hold
    // a read lease: then the acknowledgement waits until they applied `target` or the lease ran out.
    let topo = node.topology();
    let lease = node.config.lease;
    let mut leased: HashMap<String, Instant> = shard.live_grants(lease).into_iter().collect();
    let mut must = Vec::new();
    let mut lease_waits = Vec::new();
    for (peer, state) in replicas {
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
    let restart_bound = if standalone { Instant::now() } else { predecessor_grants_end(node) };
    let (results, _, _) = futures::join!(
        futures::future::join_all(must),
        futures::future::join_all(lease_waits),
        tokio::time::sleep_until(restart_bound.into()),
    );
    results.into_iter().find_map(|(peer, r)| r.err().map(|e| (peer, e)))
}

/// The keys `ops` touch, sorted, each once.
fn keys_of<'a>(ops: impl Iterator<Item = &'a Op>, schema: &crate::schema::Schema) -> Vec<i64> {
    let mut keys: Vec<i64> = ops
        .map(|op| match op {
            Op::Insert { row } => row.key(schema),
            Op::Update { key, .. } | Op::Delete { key } => *key,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// What a batch whose own commit failed is answered: a 400 when Postgres refused one of its values
/// (the caller's data, which validation should have caught), else our failure.
fn commit_error(e: &DbError, seq: u64) -> ApiError {
    match e.refused_value() {
        Some(why) => {
            ApiError::bad_request(format!("the database refused a value of this batch ({why}); nothing was written"))
        }
        None => ApiError::Internal(format!("committing seq {seq}: {e}")),
    }
}

/// The entry `seq` carrying `changes`, with the running hash of the shard's history it ends
/// (`None` while that history's hash is unknown, see `divergence`). The hash is the shard's only
/// once the entry committed: the caller sets it then.
fn next_entry(shard: &Shard, seq: u64, epoch: u64, changes: Vec<Change>) -> (Entry, Option<u128>) {
    let mut entry = Entry { seq, epoch, changes, hash: None };
    let hash = shard.history_hash().map(|prev| divergence::entry_hash(prev, &entry));
    entry.hash = hash.map(divergence::to_hex);
    (entry, hash)
}

type Decided = Vec<(Job, Result<WriteResponse, ApiError>)>;

/// After a group's commit failed, commits its batches one at a time, each decided again against
/// the stored rows (the group's decisions assumed the others' changes), so that a batch Postgres
/// refuses fails alone and every other batch of the group still succeeds. Arrival order is kept:
/// each batch gets the outcome it would have had had the failing one never been sent. Returns the
/// batches to answer once the replicas confirmed (as the group would have); a batch whose own
/// commit failed is answered here, having changed nothing. When the shard's state cannot even be
/// read back, Postgres itself is failing, and every batch left is failed at once.
async fn commit_one_by_one(
    node: &Arc<Node>,
    shard: &Arc<Shard>,
    applied: &mut u64,
    epoch: u64,
    group: Decided,
) -> Decided {
    let schema = &shard.table.schema;
    let mut out = Vec::with_capacity(group.len());
    let mut jobs = group.into_iter().map(|(job, _)| job);
    while let Some(job) = jobs.next() {
        let state = match shard.resync_if_needed(&node.db, applied).await {
            Ok(()) => shard.stored_rows(&node.db, &keys_of(job.ops.iter(), schema)).await,
            Err(e) => Err(e),
        };
        let stored = match state {
            Ok(stored) => stored,
            Err(e) => {
                let e = Arc::new(e);
                for job in std::iter::once(job).chain(jobs) {
                    let _ = job.reply.send(Err(ApiError::Internal(format!("reading the shard's state back: {e}"))));
                }
                break;
            }
        };
        let d = match decide(&job, &stored, &HashMap::new(), schema) {
            Ok(d) => d,
            Err(e @ (ApiError::NotFound { .. } | ApiError::Conflict { .. })) => {
                out.push((job, Err(e)));
                continue;
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
                continue;
            }
        };
        if !d.changes.is_empty() {
            let mut list: Vec<Change> = d.changes.into_iter().map(|(key, row)| Change { key, row }).collect();
            list.sort_unstable_by_key(|c| c.key);
            let (entry, hash) = next_entry(shard, *applied + 1, epoch, list);
            if let Err(e) = node.db.apply(&shard.table, &entry).await {
                shard.resync.store(true, Ordering::Release);
                tracing::warn!(shard = shard.id(), seq = entry.seq, error = %e, "a batch failed to commit on its own");
                let _ = job.reply.send(Err(commit_error(&e, entry.seq)));
                continue;
            }
            *applied = entry.seq;
            shard.set_history_hash(hash);
            node.metrics.entries_applied.inc();
            shard.after_apply(node, Arc::new(entry));
        }
        out.push((job, Ok(d.outcome)));
    }
    out
}

/// Tells every ready replica what this primary confirmed, up to `target` (the group just
/// acknowledged), in an otherwise empty replication request sent after `linger`, unless a next
/// group carried it first. Sent in the background; a lost one is made good by the next entries,
/// a lease answer or the idle writer's empty group.
///
/// **The linger.** Clients answered now usually write again at once, and the next group's
/// entries then carry the confirmation: under a closed-loop load, pushing it at once doubled the
/// replication requests (one per replica and group instead of two; A-1: 4,112 against 2,070 for
/// 16,000 writes). So the push waits [`CONFIRM_LINGER`] and is dropped if, by then, this copy
/// applied an entry past `target`: the writer confirms a group before it takes the next one, so
/// that entry left for every ready replica carrying a confirmation of `target` or later.
///
/// It waits only for a *fresh* group: one that committed a new entry and took less than
/// [`CONFIRM_AT_ONCE_AFTER`]. Then the replicas hold nothing unconfirmed but that entry (every
/// earlier one was confirmed to them by this group's own request), for less than that long. Any
/// other group (empty, all no-ops, or slow: the first after a start waits out the predecessor's
/// leases) pushes at once: its replicas may hold an entry that has been pending for long, and a
/// replica's read of a key pending for [`super::READ_WAIT`] gives up without waiting. An idle
/// shard's replicas learn of its last fresh group up to the linger later, so a read of those keys
/// on a replica may wait that much longer.
fn push_confirmation(
    node: &Arc<Node>,
    shard: &Arc<Shard>,
    epoch: u64,
    replicas: &BTreeMap<String, ReplicaState>,
    target: u64,
    linger: Duration,
) {
    let peers: Vec<String> = replicas
        .iter()
        .filter(|(peer, state)| *peer != node.name() && **state == ReplicaState::Ready)
        .map(|(peer, _)| peer.clone())
        .collect();
    if peers.is_empty() {
        return;
    }
    let (node, shard) = (Arc::clone(node), Arc::clone(shard));
    tokio::spawn(async move {
        if !linger.is_zero() {
            tokio::time::sleep(linger).await;
            if shard.latest_applied() > target {
                return;
            }
        }
        let Some(confirmed) = shard.confirmed(&node).await else { return };
        let topo = node.topology();
        let req = Arc::new(ReplicateRequest {
            epoch,
            primary: node.name().to_owned(),
            entries: Vec::new(),
            prev_epoch: None,
            confirmed: Some(confirmed),
        });
        for peer in peers {
            let Some(url) = topo.as_ref().and_then(|t| t.servers.get(&peer)).map(|s| s.url.clone()) else { continue };
            let (node, shard, req) = (Arc::clone(&node), Arc::clone(&shard), Arc::clone(&req));
            tokio::spawn(async move {
                if let Err(e) = node.peer(&url).replicate(shard.id(), &req).await {
                    tracing::debug!(shard = shard.id(), replica = %url, error = %e, "telling a replica what is confirmed");
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::testing::{row, schema};

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
