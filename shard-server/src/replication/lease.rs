//! Read leases: a ready replica serves reads only while its primary counts on it. Holds the lease
//! state of both sides; the node sends the requests and the `/v1/lease` route answers them. Does
//! I/O only to sync a demoted replica while waiting out its lease.
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
//!   acknowledges nothing before `lease` after its start, unless it has no predecessor (see
//!   [`predecessor_grants_end`]).
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
//!
//! **Primary leases.** A primary serves reads only while it holds a lease from the operator, and
//! grants replicas no lease that outlasts its own. That covers a primary the operator replaces
//! while it is alive but cut off from the operator (and from the topology it publishes), yet still
//! reachable by routers: it would otherwise go on answering reads with what it has, missing every
//! write its successor acknowledges. The operator grants it the way a primary grants replicas,
//! measured from a moment the server named first:
//!
//! - Every answer to `GET /status` carries a *token*, this process's clock just before answering.
//!   The operator probes, records its grant time before sending `POST /v1/primary_lease` with that
//!   token, the topology epoch it decided on, the shards and the lease length. The server takes
//!   it for the shards it is the primary of in a topology at least that new, until the token's
//!   moment plus the lease. The token's moment is before the operator's grant time, so the
//!   server's lease ends first, however late the grant arrives; a token of an earlier process (a
//!   restart since) names nothing and is refused.
//! - A replica's lease runs at most as long as what is left of its primary's (less 1% for the two
//!   clocks' rates): the replica measures from before it asked, so it ends before its primary's.
//! - The operator promotes another copy, or hands a shard over, only once the old primary's lease
//!   has surely run out (`operator::brain::lease`): from then on neither the old primary nor any
//!   replica whose lease came from it serves a read, wherever the network left them.

use super::Shard;
use crate::node::Node;
use crate::topology::ReplicaState;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Shard {
    /// Primary side: takes the operator's lease, until `until` (never shortening it: grants may
    /// arrive out of order).
    pub fn extend_primary_lease(&self, until: Instant) {
        let mut l = self.primary_lease.lock().expect("lock");
        *l = Some(l.map_or(until, |current| current.max(until)));
    }

    /// Primary side: what is left of the operator's lease (`None`: none, or it ran out).
    pub fn primary_lease_left(&self) -> Option<Duration> {
        let until = (*self.primary_lease.lock().expect("lock"))?;
        until.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
    }

    pub fn holds_primary_lease(&self) -> bool {
        self.primary_lease_left().is_some()
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
    /// data intact and a lease of its own) and lists `replica` as ready; returns how long it may
    /// run at most. The topology is read and the grant recorded under one lock, which the writer's
    /// `process_group` also takes after reading the topology: a grant decided on an older topology
    /// is always visible to a group that saw the newer one.
    pub fn grant_lease(&self, node: &Node, replica: &str) -> Option<Duration> {
        let mut grants = self.grants.lock().expect("lock");
        let topo = node.topology();
        let entry = topo.as_ref().and_then(|t| t.shard(self.id()))?;
        let intact = entry.copies.get(node.name()).is_none_or(|recorded| *recorded == self.copy_id());
        let ok = entry.primary == node.name()
            && replica != node.name()
            && intact
            && entry.replicas.get(replica) == Some(&ReplicaState::Ready);
        let left = self.primary_lease_left()?;
        if !ok {
            return None;
        }
        grants.insert(replica.to_owned(), Instant::now());
        Some(node.config.lease.min(left - left / 100))
    }

    /// Primary side: replicas whose lease may still run, with when it surely has run out. The
    /// bound adds a margin for the two monotonic clocks running at slightly different rates.
    pub(super) fn live_grants(&self, lease: Duration) -> Vec<(String, Instant)> {
        let now = Instant::now();
        let mut grants = self.grants.lock().expect("lock");
        grants.retain(|_, granted| *granted + lease_bound(lease) > now);
        grants.iter().map(|(r, granted)| (r.clone(), *granted + lease_bound(lease))).collect()
    }
}

/// Until when acknowledgements wait for read leases granted by an earlier process of this server,
/// which this process cannot know of: `lease` (plus the clock margin) after it started, or its
/// start when it was declared to have no predecessor.
///
/// Why skipping the wait is safe then, and only then. A replica serves reads only under a lease
/// from the server its topology names as the shard's primary, *by name*, and counts the lease from
/// before it asked. The grants this process makes itself are in `grants` and waited for as usual;
/// the only grants it cannot see are those of an earlier process running under the same name, and
/// they matter only while a replica process holding one is alive to serve reads. With no earlier
/// process of this name in this cluster there is no such lease. The declaration comes from whoever
/// starts the process, which alone can know it, and the claim is deliberately narrow: the local
/// mode gives `--no-predecessor` only to the first servers it starts in a data directory that had
/// neither a topology nor a servers directory when it started (no shard server ever ran there),
/// and only on their first start. So:
/// - a process restarted at the same address (a crash and the supervisor's restart, or the
///   `kill`/`start` and `wipe`/`start` fault verbs) never has the flag, and waits;
/// - a wiped data directory changes nothing: the flag is about processes, not data, and the
///   server that comes back over it is a restart;
/// - the local mode resumed on a data directory, or an `/init` retried after a failed one: the
///   directory has a predecessor, so no flag;
/// - a server promoted after a failover: the leases that matter then are the deposed primary's,
///   granted under another name; this wait never covered them (promotion comes long after start)
///   and the flag does not touch whatever covers them;
/// - Kubernetes: a restarted container runs with the same arguments, so a first start cannot be
///   told apart, and the operator never passes the flag.
///
/// Whoever changes who grants read leases must recheck this: the argument holds only while every
/// lease a replica may hold was granted either by this process or by an earlier one of its name.
pub(super) fn predecessor_grants_end(node: &Node) -> Instant {
    if node.has_no_predecessor() { node.started } else { node.started + lease_bound(node.config.lease) }
}

/// When a lease granted at `t` has surely run out on the replica: `t + lease` plus a margin for
/// the replica's monotonic clock running slower than ours (real clocks drift by parts per million;
/// the margin allows 1%).
pub(super) fn lease_bound(lease: Duration) -> Duration {
    lease + lease / 100
}

/// Holds back an acknowledgement until `peer`, which may still hold a read lease ending by `end`
/// but is no longer a ready replica, has applied `target` or that lease has run out.
pub(super) async fn wait_out_lease(
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
