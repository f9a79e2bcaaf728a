//! The Kubernetes body of the healer: every round, for each `ShardedDatabase`, read the topology
//! ConfigMap, probe each server's `/status`, plan with the brain, write the next topology, and run
//! verified recovers of `recovering` copies — what `local::healer` does with a file. Does I/O.
//!
//! # Design
//! - **One task beside the controller, not inside reconcile.** Heals need a short period (a
//!   second) while a reconcile applies every child (a dozen API calls) and is best left to spec
//!   changes and resyncs; a recover can stream for minutes and must not hold a reconcile up.
//!   The task runs inside [`super::controller::run`], so it only runs while the controller does:
//!   after the Lease is won, and it stops with it (dropping it aborts recovers in flight).
//! - **State lives in the ConfigMap.** Each round re-reads the document; the primary, the state of
//!   every copy and their identities are all there, so after an operator restart (or a change of
//!   leader) a failover or heal in progress simply continues. Only the observations are in
//!   memory, as the brain intends: after a restart timeouts count again from the first failed
//!   probe, which delays actions and never causes one.
//! - **Writes never clobber.** The healer replaces the ConfigMap only at the resourceVersion it
//!   read ([`super::topology::write`]); the reconcile does the same. A round that loses the race
//!   writes nothing and the next one plans again from the newer document. A verified recover's
//!   outcome exists only in memory, so marking it ready re-reads and retries a few times.
//! - **Status has one writer, the reconcile.** The healer shares which servers it could not reach
//!   and asks for a reconcile when that set changes; a topology it writes wakes the reconcile
//!   through the ConfigMap watch.
//! - A fresh database's server that is slow to start (an image pull) is demoted once its silence
//!   passes `demote_after`, and recovered (from a still empty primary, in a moment) when it
//!   answers: the brain treats a silent replica alike whatever the reason, and waiting for it
//!   would fail writes meanwhile.
//! - **Spec changes are placement moves** (`brain::moves`), planned against the placement of the
//!   validated spec in rounds where the heal plan changes nothing (as the local healer does): one
//!   kind of change per round, so a move never races a failover. A new holder joins `recovering`
//!   and the heal plan fills it; a copy leaves only once the shard's wanted holders are ready; a
//!   server leaves the document once it holds nothing, and the reconcile then deletes its
//!   StatefulSet. A desired server outside the document is probed too, and joins it only once it
//!   answers (its pod is up: the headless Service publishes not-ready addresses), so copies are
//!   not given to a pod still pulling its image, and recovers do not fail meanwhile. An invalid
//!   spec moves nothing.
//! - Databases are handled one after the other in a round; the probes of one database run
//!   concurrently and time out after a second, so a round takes about a second per database whose
//!   servers hang, and a few milliseconds otherwise.

use super::build::Owner;
use super::controller::{Context, publish};
use super::topology::{self, Published, WriteError};
use crate::brain::moves::{self, Move};
use crate::brain::observe::{Health, Observations};
use crate::brain::placement::{Placement, place};
use crate::brain::plan::{self, Action, Settings};
use crate::brain::validate::{ValidatedDb, validate_with_defaults};
use crate::crd::ShardedDatabase;
use crate::exec::{self, PROBE_TIMEOUT, RECOVER_TIMEOUT, RecoveredCopy};
use futures::channel::mpsc::UnboundedSender;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use shard_server::api::ClientError;
use shard_server::topology::Topology;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How the healer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealSettings {
    /// The brain's timeouts.
    pub plan: Settings,
    /// How often each database is looked at.
    pub round: Duration,
}

impl Default for HealSettings {
    fn default() -> Self {
        HealSettings { plan: Settings::default(), round: Duration::from_secs(1) }
    }
}

/// How many times marking a verified copy ready is retried when the ConfigMap changed meanwhile.
const READY_ATTEMPTS: usize = 5;

/// What the healer keeps per database between rounds.
#[derive(Default)]
struct DbState {
    seen: Observations,
    /// (shard, server) pairs with a recover running.
    running: BTreeSet<(String, String)>,
    /// Clients presenting the operator's certificate for this database (probe, recover); made
    /// once the reconcile has registered the database's CA. A renewed certificate is used by
    /// them without rebuilding them.
    http: Option<(reqwest::Client, reqwest::Client)>,
}

/// The outcome of one recover task.
struct Finished {
    db: Arc<ShardedDatabase>,
    shard: String,
    server: String,
    /// The primary it copied from: the copy only becomes ready if that is still the primary.
    primary: String,
    took: Duration,
    result: Result<RecoveredCopy, ClientError>,
}

struct Healer {
    ctx: Arc<Context>,
    settings: HealSettings,
    dbs: HashMap<ObjectRef<ShardedDatabase>, DbState>,
    recovers: JoinSet<Finished>,
    /// Asks the controller to reconcile (so the status shows a change in reachability).
    reconcile: UnboundedSender<()>,
}

/// Runs the healer over every database in `dbs` (the controller's cache of `scope`, a namespace
/// or the whole cluster) until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    dbs: Store<ShardedDatabase>,
    scope: Option<String>,
    settings: HealSettings,
    reconcile: UnboundedSender<()>,
    shutdown: impl Future<Output = ()>,
) {
    let mut healer = Healer { ctx, settings, dbs: HashMap::new(), recovers: JoinSet::new(), reconcile };
    let mut ticks = tokio::time::interval(settings.round);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut shutdown => return,
        }
        while let Some(done) = healer.recovers.try_join_next() {
            match done {
                Ok(done) => healer.finish_recover(done).await,
                Err(e) => tracing::error!(error = %e, "a recover task failed"),
            }
        }
        let current = dbs.state();
        let keys: HashSet<_> = current.iter().map(|db| ObjectRef::from_obj(db.as_ref())).collect();
        healer.dbs.retain(|k, _| keys.contains(k));
        healer.ctx.forget_unreachable_except(scope.as_deref(), &keys);
        let ids =
            current.iter().filter_map(|db| Owner::of(db)).map(|o| crate::k8s::build::tls::database_id(&o)).collect();
        if let Err(e) = healer.ctx.pki.forget_except(scope.as_deref(), &ids) {
            tracing::warn!(error = %e, "cannot update the admin endpoint's trusted CAs");
        }
        for db in current {
            healer.round(db).await;
        }
    }
}

impl Healer {
    /// The probe and recover clients of a database, presenting the operator's certificate for it.
    fn clients(
        &mut self,
        owner: &Owner,
        key: &ObjectRef<ShardedDatabase>,
    ) -> Option<(reqwest::Client, reqwest::Client)> {
        let state = self.dbs.entry(key.clone()).or_default();
        if state.http.is_none() {
            let credentials = self.ctx.pki.credentials(&crate::k8s::build::tls::database_id(owner))?;
            state.http = Some((credentials.http_client(PROBE_TIMEOUT), credentials.http_client(RECOVER_TIMEOUT)));
        }
        state.http.clone()
    }

    /// One round for one database: observe → plan → write → start recovers.
    async fn round(&mut self, db: Arc<ShardedDatabase>) {
        let Some(owner) = Owner::of(&db) else { return };
        if db.metadata.deletion_timestamp.is_some() {
            return;
        }
        let published = match topology::read(&self.ctx.client, &owner).await {
            Ok(Some(p)) => p,
            // Not created yet: the reconcile publishes the first document.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(db = %owner.name, error = %e, "cannot read the topology; not healing this round");
                return;
            }
        };
        let Some(topology) = published.topology else { return };
        let key = ObjectRef::from_obj(db.as_ref());
        // The declared placement, for the moves; `None` while the spec is invalid.
        let desired = validate_with_defaults(&db.spec, &self.ctx.config.default_images).ok().map(|valid| {
            let placement = place(&valid);
            (valid, placement)
        });
        let mut probed: BTreeSet<&String> = topology.servers.keys().collect();
        probed.extend(desired.iter().flat_map(|(_, p)| &p.servers));
        let servers: Vec<(String, String)> = probed
            .into_iter()
            .map(|s| (s.clone(), self.ctx.config.server_urls.url(&owner.name, &owner.namespace, s)))
            .collect();
        let Some((probe_http, _)) = self.clients(&owner, &key) else {
            // The reconcile has not made the database's certificates yet: nothing can be asked.
            return;
        };
        // One `now` for the round, taken before any probe leaves (see `Observations`).
        let now = Instant::now();
        let probes = exec::probe_servers(&probe_http, servers).await;
        let state = self.dbs.entry(key.clone()).or_default();
        for (server, probe) in probes {
            state.seen.record(&server, probe, now);
        }
        let unreachable: BTreeSet<String> =
            topology.servers.keys().filter(|s| matches!(state.seen.health(s), Health::Down { .. })).cloned().collect();
        if self.ctx.set_unreachable(&key, unreachable) {
            let _ = self.reconcile.unbounded_send(());
        }

        let actions = plan::plan(&topology, &state.seen, now, &self.settings.plan);
        let (changes, recovers): (Vec<_>, Vec<_>) = actions.into_iter().partition(Action::changes_topology);
        if let Some(next) = plan::apply(&topology, &changes) {
            match topology::write(&self.ctx.client, &owner, &next, Some(&published.resource_version)).await {
                Ok(_) => {
                    tracing::info!(db = %owner.name, epoch = next.epoch, "topology written");
                    for action in &changes {
                        self.announce(&db, action, next.epoch).await;
                    }
                }
                Err(e) => return self.not_written(&owner, e),
            }
        } else if let Some((next, steps)) =
            desired.and_then(|(valid, placement)| self.moves(&owner, &topology, &valid, &placement, &key))
        {
            match topology::write(&self.ctx.client, &owner, &next, Some(&published.resource_version)).await {
                Ok(_) => {
                    for step in &steps {
                        self.announce_move(&db, step, next.epoch).await;
                    }
                }
                Err(e) => return self.not_written(&owner, e),
            }
        }
        for action in recovers {
            self.start_recover(&db, &owner, action);
        }
    }

    /// The placement moves due now toward `placement` (of `valid`), and the document they lead
    /// to; `None` when there is nothing to do. Only servers in the document or answering probes
    /// have a URL, so only those can join.
    fn moves(
        &self,
        owner: &Owner,
        topology: &Topology,
        valid: &ValidatedDb,
        placement: &Placement,
        key: &ObjectRef<ShardedDatabase>,
    ) -> Option<(Topology, Vec<Move>)> {
        let seen = &self.dbs.get(key)?.seen;
        let urls = placement
            .servers
            .iter()
            .filter(|s| topology.servers.contains_key(*s) || matches!(seen.health(s), Health::Up { .. }))
            .map(|s| (s.clone(), self.ctx.config.server_urls.url(&owner.name, &owner.namespace, s)))
            .collect();
        let steps = moves::plan_moves(topology, valid, placement, &urls, seen);
        let next = moves::apply(topology, &steps)?;
        Some((next, steps))
    }

    /// Logs a write that did not happen; the next round plans again from a fresh read.
    fn not_written(&self, owner: &Owner, error: WriteError) {
        match error {
            WriteError::Conflict(_) => {
                tracing::debug!(db = %owner.name, "topology changed meanwhile; planning again next round");
            }
            WriteError::Api(e) => tracing::warn!(db = %owner.name, error = %e, "cannot write the topology"),
        }
    }

    fn start_recover(&mut self, db: &Arc<ShardedDatabase>, owner: &Owner, action: Action) {
        let Action::Recover { shard, server, primary } = action else { return };
        let state = self.dbs.entry(ObjectRef::from_obj(db.as_ref())).or_default();
        if !state.running.insert((shard.clone(), server.clone())) {
            return;
        }
        tracing::info!(db = %owner.name, %shard, %server, %primary, "recovering a copy");
        let url = self.ctx.config.server_urls.url(&owner.name, &owner.namespace, &server);
        let Some((probe_http, recover_http)) = self.clients(owner, &ObjectRef::from_obj(db.as_ref())) else {
            self.dbs.entry(ObjectRef::from_obj(db.as_ref())).or_default().running.remove(&(shard, server));
            return;
        };
        let db = Arc::clone(db);
        self.recovers.spawn(async move {
            let started = Instant::now();
            let result = exec::recover_copy(&recover_http, &probe_http, &url, &shard, &primary).await;
            Finished { db, shard, server, primary, took: started.elapsed(), result }
        });
    }

    /// Marks a verified copy ready, if it still may be: the ConfigMap is re-read (and the write
    /// retried on a conflict), and a failover while copying means the copy came from a deposed
    /// primary, so it is not used.
    async fn finish_recover(&mut self, done: Finished) {
        let Some(owner) = Owner::of(&done.db) else { return };
        if let Some(state) = self.dbs.get_mut(&ObjectRef::from_obj(done.db.as_ref())) {
            state.running.remove(&(done.shard.clone(), done.server.clone()));
        }
        let copy = match done.result {
            Ok(copy) => copy,
            Err(e) => {
                tracing::warn!(db = %owner.name, shard = %done.shard, server = %done.server, error = %e, "recover failed; retrying next round");
                let note = format!("recover of {} on {} failed: {e}", done.shard, done.server);
                publish(&self.ctx, &done.db, EventType::Warning, "RecoverFailed", "Heal", note).await;
                return;
            }
        };
        for _ in 0..READY_ATTEMPTS {
            let (current, version): (Topology, String) = match topology::read(&self.ctx.client, &owner).await {
                Ok(Some(Published { topology: Some(t), resource_version })) => (t, resource_version),
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(db = %owner.name, error = %e, "cannot read the topology; the recover is redone");
                    return;
                }
            };
            let primary = current.shard(&done.shard).map(|s| s.primary.as_str());
            if primary != Some(done.primary.as_str()) || copy.copy_id.is_empty() {
                let note = format!(
                    "recover of {} on {} is discarded: the primary changed while copying",
                    done.shard, done.server
                );
                publish(&self.ctx, &done.db, EventType::Warning, "RecoverFailed", "Heal", note).await;
                return;
            }
            let ready = Action::MarkReady {
                shard: done.shard.clone(),
                server: done.server.clone(),
                copy_id: copy.copy_id.clone(),
            };
            let Some(next) = plan::apply(&current, &[ready]) else { return };
            match topology::write(&self.ctx.client, &owner, &next, Some(&version)).await {
                Ok(_) => {
                    let r = &copy.response;
                    let note = format!(
                        "{} on {} is ready (epoch {}): recovered in {} ms, snapshot of {} rows at seq {}, verified {} rows at seq {}",
                        done.shard,
                        done.server,
                        next.epoch,
                        done.took.as_millis(),
                        r.snapshot_rows,
                        r.snapshot_seq,
                        r.rows,
                        r.verified_seq
                    );
                    tracing::info!(db = %owner.name, "{note}");
                    publish(&self.ctx, &done.db, EventType::Normal, "ReplicaReady", "Heal", note).await;
                    return;
                }
                Err(WriteError::Conflict(_)) => continue,
                Err(WriteError::Api(e)) => {
                    tracing::warn!(db = %owner.name, error = %e, "cannot write the topology; the recover is redone");
                    return;
                }
            }
        }
        tracing::warn!(db = %owner.name, shard = %done.shard, server = %done.server, "the topology kept changing; the recover is redone");
    }

    /// An Event (and a log line) for each placement move published.
    async fn announce_move(&self, db: &ShardedDatabase, step: &Move, epoch: u64) {
        let (reason, note) = match step {
            Move::AddServer { server, .. } => ("ServerAdded", format!("{server} joins the topology (epoch {epoch})")),
            Move::AddShard { shard, primary, .. } => {
                ("ShardAdded", format!("{shard} is added, primary {primary} (epoch {epoch})"))
            }
            Move::AddReplica { shard, server } => {
                ("ReplicaAdded", format!("{shard} gets a copy on {server}, recovering (epoch {epoch})"))
            }
            Move::HandOver { shard, from, to } => (
                "HandedOver",
                format!("{to} is the primary of {shard}, taking over from leaving {from} (epoch {epoch})"),
            ),
            Move::RemoveReplica { shard, server } => {
                ("ReplicaRemoved", format!("{shard} no longer has a copy on {server} (epoch {epoch})"))
            }
            Move::RemoveServer { server } => {
                ("ServerDrained", format!("{server} holds nothing and leaves the topology (epoch {epoch})"))
            }
            Move::SetUnroutedKeys { policy } => (
                "UnroutedKeysChanged",
                format!("written keys in no shard are now handled as {policy:?} (epoch {epoch})"),
            ),
        };
        tracing::info!(db = %db.metadata.name.as_deref().unwrap_or_default(), reason, "{note}");
        publish(&self.ctx, db, EventType::Normal, reason, "Move", note).await;
    }

    /// An Event (and a log line) for each transition the healer published.
    async fn announce(&self, db: &ShardedDatabase, action: &Action, epoch: u64) {
        let (type_, reason, note) = match action {
            Action::RecordCopy { shard, server, copy_id } => {
                tracing::info!(%shard, %server, %copy_id, epoch, "copy identity recorded");
                return;
            }
            Action::MarkRecovering { shard, server, reason } => (
                EventType::Warning,
                "Demoted",
                format!("{shard} on {server} {reason}: recovering, serves no reads (epoch {epoch})"),
            ),
            Action::Promote { shard, from, to, reason } => (
                EventType::Warning,
                "Promoted",
                format!("{to} is the primary of {shard}, replacing {from} ({reason}); epoch {epoch}"),
            ),
            Action::MarkReady { shard, server, .. } => {
                (EventType::Normal, "ReplicaReady", format!("{shard} on {server} is ready (epoch {epoch})"))
            }
            Action::Recover { .. } => return,
        };
        tracing::info!(db = %db.metadata.name.as_deref().unwrap_or_default(), reason, "{note}");
        publish(&self.ctx, db, type_, reason, "Heal", note).await;
    }
}
