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
//! - **Rolling restarts** (`brain::rollout`, `k8s::rollout`) come last, in rounds where neither
//!   heals nor moves change anything: a server whose pod runs an older revision of its
//!   StatefulSet's template (`OnDelete`: a changed template restarts nothing by itself) is
//!   drained (its primaries handed over, its copies `recovering`), its pod evicted once every
//!   other server follows that document, and the next one waits until it is back and its copies
//!   are recovered. The server about to restart is not recovered meanwhile. Each step is an Event
//!   (`ServerDraining`, `ServerRestarting`, `ServerUpdated`).
//! - Databases are handled one after the other in a round; the probes of one database run
//!   concurrently and time out after a second, so a round takes about a second per database whose
//!   servers hang, and a few milliseconds otherwise.
//! - **Primary leases** (`brain::lease`) are granted by a task of their own every half second, so
//!   a slow round never lets them lapse; the rounds keep each database's book on the topology they
//!   read, and publish a change of primary (a failover, a handover) only once the old primary's
//!   lease has surely run out. The book is in memory: a new leader waits a lease before it changes
//!   any primary.

use super::build::Owner;
use super::controller::{Context, publish, publish_related};
use super::rollout::{self as pods, Evicted, Revisions};
use super::topology::{self, Published, WriteError};
use crate::brain::lease::{DEFAULT_PRIMARY_LEASE, LeaseBook};
use crate::brain::moves::{self, Move};
use crate::brain::observe::{Health, Observations};
use crate::brain::placement::{Placement, place};
use crate::brain::plan::{self, Action, Reason, Settings};
use crate::brain::rollout::{self, Change, Step};
use crate::brain::validate::{ValidatedDb, validate_with_defaults};
use crate::crd::ShardedDatabase;
use crate::exec::{self, PROBE_TIMEOUT, RECOVER_TIMEOUT, RecoveredCopy};
use futures::channel::mpsc::UnboundedSender;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use shard_server::api::{ClientError, LeaseToken};
use shard_server::topology::{ReplicaState, Topology};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
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
struct DbState {
    seen: Observations,
    /// (shard, server) pairs with a recover running.
    running: BTreeSet<(String, String)>,
    /// Servers whose pod the rollout evicted and whose copies are not all ready again yet.
    restarted: BTreeSet<String>,
    /// Why the rollout last waited, so that a wait is logged once rather than every round.
    waiting: Option<String>,
    leases: Arc<DbLeases>,
    /// Clients presenting the operator's certificate for this database (probe, recover); made
    /// once the reconcile has registered the database's CA. A renewed certificate is used by
    /// them without rebuilding them. The flag: whether they are plain (internal-auth `none`);
    /// they are made again when the database leaves or enters `none`.
    http: Option<(bool, reqwest::Client, reqwest::Client)>,
}

/// One database's primary leases: the book, the tokens its servers last handed out, and where its
/// servers are; shared with the task that grants them.
struct DbLeases {
    book: Mutex<LeaseBook>,
    tokens: Mutex<HashMap<String, LeaseToken>>,
    name: String,
    namespace: String,
    /// The client the grants go out with (the operator's certificate for this database, or plain
    /// HTTP in internal-auth `none`); unset until the reconcile has decided, and no grant goes out
    /// meanwhile.
    http: Mutex<Option<reqwest::Client>>,
}

impl DbState {
    fn new(owner: &Owner) -> DbState {
        DbState {
            seen: Observations::new(),
            running: BTreeSet::new(),
            restarted: BTreeSet::new(),
            waiting: None,
            http: None,
            leases: Arc::new(DbLeases {
                book: Mutex::new(LeaseBook::new(DEFAULT_PRIMARY_LEASE, Instant::now())),
                tokens: Mutex::default(),
                name: owner.name.clone(),
                namespace: owner.namespace.clone(),
                http: Mutex::new(None),
            }),
        }
    }
}

/// The books of every database the healer looks after, for the grant task.
type Books = Arc<Mutex<HashMap<ObjectRef<ShardedDatabase>, Arc<DbLeases>>>>;

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
    books: Books,
    /// Rounds of database probes so far (every [`exec::CHECKSUM_EVERY`]th asks for checksums).
    rounds: u64,
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
    let mut healer = Healer {
        ctx,
        settings,
        dbs: HashMap::new(),
        recovers: JoinSet::new(),
        reconcile,
        books: Books::default(),
        rounds: 0,
    };
    let grants = tokio::spawn(grant_leases(Arc::clone(&healer.ctx), Arc::clone(&healer.books)));
    let _stop_grants = AbortOnDrop(grants);
    let mut ticks = tokio::time::interval(settings.round);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            // A finished recover is marked ready at once, not a round later: every moment it
            // waits is a moment the shard has one copy less.
            Some(done) = healer.recovers.join_next(), if !healer.recovers.is_empty() => {
                match done {
                    Ok(done) => healer.finish_recover(done).await,
                    Err(e) => tracing::error!(error = %e, "a recover task failed"),
                }
                continue;
            }
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
        healer.books.lock().expect("books lock").retain(|k, _| keys.contains(k));
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
        let state = self.dbs.entry(key.clone()).or_insert_with(|| DbState::new(owner));
        let credentials = self.ctx.pki.credentials(&crate::k8s::build::tls::database_id(owner))?;
        let plain = matches!(credentials, shard_server::tls::Credentials::Plain);
        if state.http.as_ref().is_none_or(|(was_plain, _, _)| *was_plain != plain) {
            *state.leases.http.lock().expect("lease client lock") = Some(credentials.http_client(PROBE_TIMEOUT));
            state.http =
                Some((plain, credentials.http_client(PROBE_TIMEOUT), credentials.http_client(RECOVER_TIMEOUT)));
        }
        state.http.as_ref().map(|(_, probe, recover)| (probe.clone(), recover.clone()))
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
        let named: BTreeSet<String> = probed.iter().map(|s| (*s).clone()).collect();
        let servers: Vec<(String, String)> =
            probed.into_iter().map(|s| (s.clone(), self.ctx.server_url(&owner.name, &owner.namespace, s))).collect();
        // Until this process's reconcile has decided the scheme (a new leader, a database just
        // made), nothing is probed and the document is left as it is.
        let Some(plain) = self.ctx.pki.dials_plain(&crate::k8s::build::tls::database_id(&owner)) else { return };
        let Some((probe_http, _)) = self.clients(&owner, &key) else {
            // The reconcile has not made the database's certificates yet: nothing can be asked.
            return;
        };
        // The document lists servers with the scheme of the database's mode before anything else
        // is planned on it (a database leaving `none` lists `http://` URLs its servers no longer
        // serve, and the reverse).
        if let Some(next) = topology::with_scheme(&topology, plain) {
            match topology::write(&self.ctx.client, &owner, &next, Some(&published.resource_version)).await {
                Ok(_) => {
                    tracing::info!(db = %owner.name, epoch = next.epoch, plain, "server URLs follow the internal-auth mode")
                }
                Err(e) => self.not_written(&owner, e),
            }
            return;
        }
        self.rounds += 1;
        let checksums = self.rounds.is_multiple_of(exec::CHECKSUM_EVERY);
        // One `now` for the round, taken before any probe leaves (see `Observations`).
        let now = Instant::now();
        let probes = exec::probe_servers(&probe_http, servers, checksums).await;
        // `None` when they cannot be read: no rollout step this round.
        let revisions = match pods::observe(&self.ctx.client, &owner, &named).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(db = %owner.name, error = %e, "cannot read the server pods' revisions");
                None
            }
        };
        let state = self.dbs.entry(key.clone()).or_insert_with(|| DbState::new(&owner));
        self.books.lock().expect("books lock").insert(key.clone(), Arc::clone(&state.leases));
        {
            let mut book = state.leases.book.lock().expect("lease book lock");
            book.begin_round();
            book.follow(&topology);
        }
        let leases = Arc::clone(&state.leases);
        for (server, probe) in probes {
            state.seen.record(&server, probe, now);
        }
        let unreachable: BTreeSet<String> =
            topology.servers.keys().filter(|s| matches!(state.seen.health(s), Health::Down { .. })).cloned().collect();
        if self.ctx.set_unreachable(&key, unreachable) {
            let _ = self.reconcile.unbounded_send(());
        }
        // A climb between internal-auth modes waits for every server to follow the document
        // before its last rung (`k8s::internal_auth`).
        let following =
            |s: &String| matches!(state.seen.health(s), Health::Up { epoch, .. } if *epoch >= topology.epoch);
        if topology.servers.keys().all(following) && self.ctx.set_followed(&key, topology.epoch, now) {
            let _ = self.reconcile.unbounded_send(());
        }

        let mut actions = plan::plan(&topology, &state.seen, now, &self.settings.plan);
        // Unread revisions: nothing is known to restart, nothing held.
        let held = revisions.as_ref().map(|r| rollout::held(&topology, &r.outdated, &r.replacing)).unwrap_or_default();
        rollout::hold_recovers(&mut actions, &held);
        let (mut changes, recovers): (Vec<_>, Vec<_>) = actions.into_iter().partition(Action::changes_topology);
        let mut next = plan::apply(&topology, &changes);
        if next.as_ref().is_some_and(|n| !fence(&leases, &topology, n)) {
            // Everything else goes ahead; the promotions wait for a later round.
            changes.retain(|a| !matches!(a, Action::Promote { .. }));
            next = plan::apply(&topology, &changes).filter(|n| fence(&leases, &topology, n));
        }
        if let Some(next) = next {
            match topology::write(&self.ctx.client, &owner, &next, Some(&published.resource_version)).await {
                Ok(_) => {
                    tracing::info!(db = %owner.name, epoch = next.epoch, "topology written");
                    for action in &changes {
                        self.announce(&db, action, next.epoch).await;
                    }
                }
                Err(e) => return self.not_written(&owner, e),
            }
        } else if let Some((next, steps)) = desired
            .and_then(|(valid, placement)| self.moves(&owner, &topology, &valid, &placement, &key))
            .filter(|(n, _)| fence(&leases, &topology, n))
        {
            match topology::write(&self.ctx.client, &owner, &next, Some(&published.resource_version)).await {
                Ok(_) => {
                    for step in &steps {
                        self.announce_move(&db, step, next.epoch).await;
                    }
                }
                Err(e) => return self.not_written(&owner, e),
            }
        } else if let Some(revisions) = &revisions {
            self.roll(&db, &owner, &key, &published.resource_version, &topology, revisions).await;
        }
        if let Some(revisions) = &revisions {
            self.note_updated(&db, &owner, &key, &topology, revisions).await;
        }
        // The status shows a rollout until its last server is back (see `status`).
        let restarting = self.dbs.get(&key).map(|s| s.restarted.clone()).unwrap_or_default();
        if self.ctx.set_restarting(&key, restarting) {
            let _ = self.reconcile.unbounded_send(());
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
            .map(|s| (s.clone(), self.ctx.server_url(&owner.name, &owner.namespace, s)))
            .collect();
        let steps = moves::plan_moves(topology, valid, placement, &urls, seen);
        let next = moves::apply(topology, &steps)?;
        Some((next, steps))
    }

    /// One step of the rolling restart of `db`'s outdated servers.
    async fn roll(
        &mut self,
        db: &Arc<ShardedDatabase>,
        owner: &Owner,
        key: &ObjectRef<ShardedDatabase>,
        read_at: &str,
        topology: &Topology,
        revisions: &Revisions,
    ) {
        let Some(state) = self.dbs.get_mut(key) else { return };
        let step = if revisions.unknown.is_empty() {
            rollout::plan_rollout(topology, &revisions.outdated, &revisions.replacing, &state.seen)
        } else {
            let unknown: Vec<&str> = revisions.unknown.iter().map(String::as_str).collect();
            Step::Wait(format!("the current revision of {} is not known yet", unknown.join(", ")))
        };
        match step {
            Step::Done => state.waiting = None,
            Step::Wait(why) => {
                if !revisions.outdated.is_empty() && state.waiting.as_ref() != Some(&why) {
                    tracing::info!(db = %owner.name, %why, "rollout waits");
                }
                state.waiting = Some(why);
            }
            Step::Drain { server, changes } => {
                state.waiting = None;
                let Some(next) = rollout::apply(topology, &changes) else { return };
                if let Err(e) = topology::write(&self.ctx.client, owner, &next, Some(read_at)).await {
                    return self.not_written(owner, e);
                }
                let what: Vec<String> = changes
                    .iter()
                    .map(|c| match c {
                        Change::Demote { shard, .. } => format!("{shard} stops serving there"),
                        Change::HandOver { shard, to, .. } => format!("{shard} is handed over to {to}"),
                    })
                    .collect();
                let revision = revisions.current.get(&server).map_or("?", String::as_str);
                let note = format!(
                    "{server} is drained before its restart to revision {revision}: {} (epoch {})",
                    what.join(", "),
                    next.epoch
                );
                tracing::info!(db = %owner.name, "{note}");
                let pod = Some(pods::pod_reference(owner, &server));
                publish_related(&self.ctx, db, EventType::Normal, "ServerDraining", "Rollout", note, pod).await;
            }
            Step::Restart { server } => {
                state.waiting = None;
                match pods::evict(&self.ctx.client, owner, &server).await {
                    Ok(Evicted::Done) => {
                        state.restarted.insert(server.clone());
                        let revision = revisions.current.get(&server).map_or("?", String::as_str);
                        let note = format!(
                            "{server}'s pod is evicted to run revision {revision}; its copies are recovered once it is back"
                        );
                        tracing::info!(db = %owner.name, "{note}");
                        let pod = Some(pods::pod_reference(owner, &server));
                        publish_related(&self.ctx, db, EventType::Normal, "ServerRestarting", "Rollout", note, pod)
                            .await;
                    }
                    Ok(Evicted::NotNow(why)) => {
                        tracing::info!(db = %owner.name, %server, %why, "eviction refused; retrying next round")
                    }
                    Err(e) => tracing::warn!(db = %owner.name, %server, error = %e, "cannot evict a server pod"),
                }
            }
        }
    }

    /// A `ServerUpdated` Event for each restarted server that runs its current revision, answers
    /// at the current epoch and whose copies are all ready again. Which servers were restarted is
    /// kept in memory; an operator that starts during a rollout (a new leader, an upgrade of the
    /// operator itself) takes a server that runs its current revision with copies not ready yet,
    /// while others still wait for theirs, for one the rollout restarted.
    async fn note_updated(
        &mut self,
        db: &ShardedDatabase,
        owner: &Owner,
        key: &ObjectRef<ShardedDatabase>,
        topology: &Topology,
        revisions: &Revisions,
    ) {
        let Some(state) = self.dbs.get_mut(key) else { return };
        if !revisions.outdated.is_empty() {
            let recovering = revisions.current.keys().filter(|s| {
                !revisions.outdated.contains(*s)
                    && !revisions.replacing.contains(*s)
                    && topology.shards_of(s).any(|(_, st)| st != ReplicaState::Ready)
            });
            state.restarted.extend(recovering.cloned());
        }
        let back: Vec<String> = state
            .restarted
            .iter()
            .filter(|s| !revisions.outdated.contains(*s) && !revisions.replacing.contains(*s))
            .filter(|s| matches!(state.seen.health(s), Health::Up { epoch, .. } if *epoch >= topology.epoch))
            .filter(|s| topology.shards_of(s).all(|(_, st)| st == ReplicaState::Ready))
            .cloned()
            .collect();
        let total = revisions.current.len();
        let updated = total.saturating_sub(revisions.outdated.len() + revisions.replacing.len());
        for server in back {
            state.restarted.remove(&server);
            let revision = revisions.current.get(&server).map_or("?", String::as_str);
            let note = format!(
                "{server} runs revision {revision} and its copies are ready again ({updated}/{total} servers updated)"
            );
            tracing::info!(db = %db.metadata.name.as_deref().unwrap_or_default(), "{note}");
            let pod = Some(pods::pod_reference(owner, &server));
            publish_related(&self.ctx, db, EventType::Normal, "ServerUpdated", "Rollout", note, pod).await;
        }
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
        let state = self.dbs.entry(ObjectRef::from_obj(db.as_ref())).or_insert_with(|| DbState::new(owner));
        if !state.running.insert((shard.clone(), server.clone())) {
            return;
        }
        tracing::info!(db = %owner.name, %shard, %server, %primary, "recovering a copy");
        let url = self.ctx.server_url(&owner.name, &owner.namespace, &server);
        let Some((probe_http, recover_http)) = self.clients(owner, &ObjectRef::from_obj(db.as_ref())) else {
            if let Some(state) = self.dbs.get_mut(&ObjectRef::from_obj(db.as_ref())) {
                state.running.remove(&(shard, server));
            }
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
            // Marking a copy ready changes no primary: the book only follows.
            if let Some(state) = self.dbs.get(&ObjectRef::from_obj(done.db.as_ref()))
                && !fence(&state.leases, &current, &next)
            {
                return;
            }
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
            Action::MarkRecovering { shard, server, reason: reason @ Reason::Diverged } => {
                self.ctx.metrics.copies_diverged.inc();
                (
                    EventType::Warning,
                    "Diverged",
                    format!("{shard} on {server} {reason}: recovering, to be copied afresh (epoch {epoch})"),
                )
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

/// Whether `next` may replace `current` now: a change of primary waits until the old primary's
/// lease has surely run out (see `brain::lease`), and it is granted nothing more meanwhile.
fn fence(leases: &DbLeases, current: &Topology, next: &Topology) -> bool {
    match leases.book.lock().expect("lease book lock").fence(current, next, Instant::now()) {
        Ok(()) => true,
        Err(until) => {
            let ms = until.saturating_duration_since(Instant::now()).as_millis();
            tracing::info!(db = %leases.name, epoch = next.epoch, wait_ms = ms, "a new primary waits until the old one's lease has run out");
            false
        }
    }
}

/// Grants the primaries of every database their leases, every [`exec::GRANT_EVERY`]; each
/// database's grants run on their own, so one whose servers hang holds up no other.
async fn grant_leases(ctx: Arc<Context>, books: Books) {
    let mut ticks = tokio::time::interval(exec::GRANT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = JoinSet::new();
    loop {
        ticks.tick().await;
        while running.try_join_next().is_some() {}
        let all: Vec<Arc<DbLeases>> = books.lock().expect("books lock").values().cloned().collect();
        for db in all {
            let Some(http) = db.http.lock().expect("lease client lock").clone() else { continue };
            let ctx = Arc::clone(&ctx);
            running.spawn(async move {
                let url = |server: &str, _: &str| ctx.server_url(&db.name, &db.namespace, server);
                exec::grant_primary_leases(&http, &db.book, &db.tokens, &url).await;
            });
        }
    }
}

/// Aborts a task when dropped (the healer's grant task stops with the healer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
