//! The local body of the brain: every half second, probe each server, plan, and carry the plan
//! out (write the next topology, run recovers), logging each transition to `DIR/events.log`. When
//! the heal plan changes nothing, the placement moves toward the declared configuration
//! (`brain::moves`): one kind of change per round, so a move never races a failover. Also
//! executes fault-injection requests dropped into `DIR/control/`. Does I/O.
//!
//! The topology file is the only state that matters: the healer reads it at every round, so after
//! an operator restart a heal or failover in progress simply continues.
//!
//! When neither heals nor placement moves have anything to do, servers running an outdated binary
//! are restarted one at a time (`brain::rollout`): drained, restarted, and recovered before the
//! next. A server about to restart is not recovered meanwhile.
//!
//! A topology that gives a shard another primary (a failover, a handover) is written only once the
//! old primary's read lease has surely run out (`leases`, `brain::lease`); until then the rest of
//! the round's changes go ahead without it. Every [`crate::exec::CHECKSUM_EVERY`]th round the
//! probes ask for the rows' checksums too, so that copies are compared at equal sequence numbers
//! (history hashes every round): a replica that differs from its primary is demoted (`demote`,
//! with the reason in `detail`) and copied afresh.
//!
//! `DIR/events.log` has one JSON object per line: `{"at_ms": <unix ms>, "event": "...", "shard",
//! "server", "epoch", "detail"}` with events `demote`, `promote`, `record_copy`, `recover_start`,
//! `ready`, `recover_failed`, `control`, for placement changes `add_server`, `add_shard`,
//! `add_replica`, `hand_over`, `remove_replica`, `remove_server`, and for upgrades `upgrade` (new
//! binaries taken), `drain_demote`, `drain_hand_over` (a copy taken out of service before its
//! server restarts), `restart` (the server restarts on the new binary) and `updated` (its copies
//! are ready again; the detail says how many servers run the new binary). A `ready` that ends a
//! recover also has `recover`: `{"took_ms": <the healer's time>, "response": <the server's answer,
//! with where the time went>}`.
//!
//! `DIR/control/<verb>.<server>` (any content) asks for a fault or its repair; the file is removed
//! once done. Verbs: `kill` (SIGKILL the shard server and keep it down), `stop` (stop it and keep it
//! down), `start`, `wipe` (stop it, replace its Postgres data with an empty cluster; it stays down
//! until `start`), `stop-postgres`, `start-postgres`, and `renew-certs.all` (issue every
//! certificate of the cluster again now, as renewal does once one is due). A crashed process is otherwise restarted by
//! the supervisor within about a second, too soon for any timeout to matter, and a stopped
//! Postgres is never restarted by itself: these verbs are how a test keeps a server down.
//!
//! `DIR/control/upgrade` (no server) takes new binaries: those of the directory the file names,
//! or, when it is empty, the bin directory's again (rebuilt in place). The router restarts on its
//! new binary at once; the servers follow one at a time.

use super::{LocalCluster, LocalError};
use crate::brain::lease::LeaseBook;
use crate::brain::moves::{self, Move};
use crate::brain::observe::{Health, Observations};
use crate::brain::plan::{self, Action, Settings};
use crate::brain::rollout::{self, Change, Step};
use crate::exec::{self, PROBE_TIMEOUT, RECOVER_TIMEOUT};
use shard_server::api::{ClientError, RecoverRequest, RecoverResponse, ShardClient};
use shard_server::tls::Credentials;
use shard_server::topology::{ReplicaState, Topology};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the healer looks at the cluster.
pub const ROUND: Duration = Duration::from_millis(500);

/// The outcome of one recover task.
pub struct Recovered {
    shard: String,
    server: String,
    /// The primary it copied from: the copy only becomes ready if that is still the primary.
    primary: String,
    started: Instant,
    result: Result<(RecoverResponse, String), ClientError>,
}

pub struct Healer {
    topology: PathBuf,
    events: PathBuf,
    control: PathBuf,
    settings: Settings,
    seen: Observations,
    probe_http: reqwest::Client,
    recover_http: reqwest::Client,
    /// (shard, server) pairs with a recover running.
    running: BTreeSet<(String, String)>,
    /// Servers restarted by the rollout whose copies are not all ready again yet.
    restarted: BTreeSet<String>,
    /// Why the rollout waits, when it last said (so a wait is logged once, not every round).
    waiting: Option<String>,
    done_tx: mpsc::UnboundedSender<Recovered>,
    done_rx: mpsc::UnboundedReceiver<Recovered>,
    /// The primaries' leases, shared with the task that grants them (see `leases`).
    leases: Arc<Mutex<LeaseBook>>,
    /// Rounds of probes so far (every [`crate::exec::CHECKSUM_EVERY`]th asks for checksums).
    rounds: u64,
}

impl Healer {
    /// `credentials` are the operator's: servers answer `/status` and `/recover` only to it.
    pub fn new(
        dir: &Path,
        topology: PathBuf,
        credentials: &Credentials,
        settings: Settings,
        leases: Arc<Mutex<LeaseBook>>,
    ) -> Result<Healer, LocalError> {
        let control = dir.join("control");
        super::make_dir(&control)?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Healer {
            topology,
            events: dir.join("events.log"),
            control,
            settings,
            seen: Observations::new(),
            probe_http: credentials.http_client(PROBE_TIMEOUT),
            recover_http: credentials.http_client(RECOVER_TIMEOUT),
            running: BTreeSet::new(),
            restarted: BTreeSet::new(),
            waiting: None,
            done_tx,
            done_rx,
            leases,
            rounds: 0,
        })
    }

    /// Whether `next` may replace `current` now: a change of primary waits until the old primary's
    /// lease has surely run out (see `brain::lease`), and it is granted nothing more meanwhile.
    fn fence(&self, current: &Topology, next: &Topology) -> bool {
        match self.leases.lock().expect("lease book lock").fence(current, next, Instant::now()) {
            Ok(()) => true,
            Err(until) => {
                let ms = until.saturating_duration_since(Instant::now()).as_millis();
                tracing::info!(
                    epoch = next.epoch,
                    wait_ms = ms,
                    "a new primary waits until the old one's lease has run out"
                );
                false
            }
        }
    }

    /// One round: fault requests, finished recovers, then observe → plan → act.
    pub async fn round(&mut self, cluster: &mut LocalCluster) {
        self.control_requests(cluster).await;
        while let Ok(done) = self.done_rx.try_recv() {
            self.finish_recover(done);
        }
        if cluster.declared().is_none() {
            // Waiting for `/init`: there is no topology yet.
            return;
        }
        let topology = match self.read_topology() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the topology; not healing this round");
                return;
            }
        };
        {
            let mut book = self.leases.lock().expect("lease book lock");
            book.begin_round();
            book.follow(&topology);
        }
        self.observe(&topology).await;
        let outdated = cluster.outdated_servers();
        let mut actions = plan::plan(&topology, &self.seen, Instant::now(), &self.settings);
        // Local mode restarts a server itself, start to end within one step: none is ever
        // half-restarted when a round plans.
        let replacing = BTreeSet::new();
        rollout::hold_recovers(&mut actions, &rollout::held(&topology, &outdated, &replacing));
        let (mut changes, recovers): (Vec<_>, Vec<_>) = actions.into_iter().partition(Action::changes_topology);
        let mut next = plan::apply(&topology, &changes);
        if next.as_ref().is_some_and(|n| !self.fence(&topology, n)) {
            // Everything else goes ahead; the promotions wait for a later round.
            changes.retain(|a| !matches!(a, Action::Promote { .. }));
            next = plan::apply(&topology, &changes).filter(|n| self.fence(&topology, n));
        }
        if let Some(next) = next {
            if let Err(e) = self.write_topology(&next) {
                tracing::error!(error = %e, "cannot write the topology");
                return;
            }
            for a in &changes {
                self.log_action(a, next.epoch);
            }
        } else if let Some(declared) = cluster.declared() {
            let steps = moves::plan_moves(&topology, &declared.db, &declared.placement, &cluster.urls(), &self.seen);
            if let Some(next) = moves::apply(&topology, &steps).filter(|n| self.fence(&topology, n)) {
                if let Err(e) = self.write_topology(&next) {
                    tracing::error!(error = %e, "cannot write the topology");
                    return;
                }
                for m in &steps {
                    self.log_move(m, next.epoch);
                }
            } else {
                self.roll(cluster, &topology, &outdated).await;
            }
        }
        self.note_updated(cluster, &topology, &outdated);
        for a in recovers {
            self.start_recover(a, topology.epoch);
        }
    }

    /// One step of the rolling restart of outdated servers.
    async fn roll(&mut self, cluster: &LocalCluster, topology: &Topology, outdated: &BTreeSet<String>) {
        match rollout::plan_rollout(topology, outdated, &BTreeSet::new(), &self.seen) {
            Step::Done => {}
            Step::Wait(why) => {
                if self.waiting.as_ref() != Some(&why) {
                    tracing::info!(%why, "rollout waits");
                    self.waiting = Some(why);
                }
            }
            Step::Drain { server, changes } => {
                self.waiting = None;
                let Some(next) = rollout::apply(topology, &changes) else { return };
                if let Err(e) = self.write_topology(&next) {
                    tracing::error!(error = %e, "cannot write the topology");
                    return;
                }
                for change in &changes {
                    match change {
                        Change::Demote { shard, server } => {
                            self.event("drain_demote", shard, server, Some(next.epoch), "before its restart")
                        }
                        Change::HandOver { shard, from, to } => self.event(
                            "drain_hand_over",
                            shard,
                            to,
                            Some(next.epoch),
                            &format!("takes over from {from}, which restarts"),
                        ),
                    }
                }
                tracing::info!(%server, "drained before its restart");
            }
            Step::Restart { server } => {
                self.waiting = None;
                let binary = cluster.bins.shard_server.display().to_string();
                match cluster.restart_server(&server).await {
                    Ok(()) => {
                        self.restarted.insert(server.clone());
                        self.event("restart", "", &server, Some(topology.epoch), &binary);
                    }
                    Err(e) => tracing::error!(%server, error = %e, "cannot restart a server; retrying next round"),
                }
            }
        }
    }

    /// An `updated` event for each restarted server that is up to date and whose copies are all
    /// ready again.
    fn note_updated(&mut self, cluster: &LocalCluster, topology: &Topology, outdated: &BTreeSet<String>) {
        let done: Vec<String> = self
            .restarted
            .iter()
            .filter(|s| {
                !outdated.contains(*s)
                    && matches!(self.seen.health(s), Health::Up { epoch, .. } if *epoch >= topology.epoch)
            })
            .filter(|s| topology.shards_of(s).all(|(_, state)| state == ReplicaState::Ready))
            .cloned()
            .collect();
        for server in done {
            self.restarted.remove(&server);
            let total = cluster.servers.len();
            let updated = total - outdated.len();
            self.event("updated", "", &server, Some(topology.epoch), &format!("{updated}/{total} servers updated"));
        }
    }

    async fn observe(&mut self, topology: &Topology) {
        self.rounds += 1;
        let checksums = self.rounds.is_multiple_of(crate::exec::CHECKSUM_EVERY);
        // One `now` for the round, taken before any probe leaves (see `Observations`).
        let now = Instant::now();
        let servers = topology.servers.iter().map(|(name, s)| (name.clone(), s.url.clone())).collect();
        for (name, probe) in exec::probe_servers(&self.probe_http, servers, checksums).await {
            self.seen.record(&name, probe, now);
        }
    }

    fn start_recover(&mut self, action: Action, epoch: u64) {
        let Action::Recover { shard, server, primary } = action else { return };
        if !self.running.insert((shard.clone(), server.clone())) {
            return;
        }
        let Some(url) = self.read_topology().ok().and_then(|t| t.servers.get(&server).map(|s| s.url.clone())) else {
            self.running.remove(&(shard, server));
            return;
        };
        self.event("recover_start", &shard, &server, Some(epoch), &format!("from {primary}"));
        let client = ShardClient::new(self.recover_http.clone(), url.clone());
        let status_client = ShardClient::new(self.probe_http.clone(), url);
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = async {
                let done = client.recover(&shard, &RecoverRequest { primary: primary.clone() }).await?;
                // The identity of the copy just installed: recorded when it becomes ready.
                let status = status_client.status(false).await?;
                let copy_id = status.shards.get(&shard).map(|s| s.copy_id.clone()).unwrap_or_default();
                Ok((done, copy_id))
            }
            .await;
            let _ = tx.send(Recovered { shard, server, primary, started, result });
        });
    }

    /// The next recover to finish (pending while none runs).
    pub async fn next_recovered(&mut self) -> Option<Recovered> {
        self.done_rx.recv().await
    }

    /// Marks a finished recover's copy ready (if it still may be) with an event saying how long
    /// it took and where the time went.
    pub fn finish_recover(&mut self, done: Recovered) {
        self.running.remove(&(done.shard.clone(), done.server.clone()));
        let took = done.started.elapsed().as_millis();
        let (response, copy_id) = match done.result {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(shard = %done.shard, server = %done.server, error = %e, "recover failed; retrying next round");
                self.event("recover_failed", &done.shard, &done.server, None, &e.to_string());
                return;
            }
        };
        let Ok(topology) = self.read_topology() else { return };
        // A failover while copying means the copy came from a deposed primary: start over.
        if topology.shard(&done.shard).map(|s| s.primary.as_str()) != Some(done.primary.as_str()) || copy_id.is_empty()
        {
            self.event("recover_failed", &done.shard, &done.server, None, "the primary changed while copying");
            return;
        }
        let ready = Action::MarkReady { shard: done.shard.clone(), server: done.server.clone(), copy_id };
        if let Some(next) = plan::apply(&topology, &[ready]).filter(|n| self.fence(&topology, n)) {
            match self.write_topology(&next) {
                Ok(()) => {
                    let detail = format!(
                        "recovered in {took} ms ({:.0} rows/s): snapshot of {} rows at seq {}, verified {} rows at seq {}",
                        response.snapshot_rows as f64 / (took.max(1) as f64 / 1000.0),
                        response.snapshot_rows,
                        response.snapshot_seq,
                        response.rows,
                        response.verified_seq
                    );
                    let recovered = serde_json::json!({"took_ms": took as u64, "response": response});
                    self.event_with("ready", &done.shard, &done.server, Some(next.epoch), &detail, Some(recovered));
                }
                Err(e) => tracing::error!(error = %e, "cannot write the topology"),
            }
        }
    }

    fn log_action(&self, action: &Action, epoch: u64) {
        match action {
            Action::RecordCopy { shard, server, copy_id } => {
                self.event("record_copy", shard, server, Some(epoch), copy_id)
            }
            Action::MarkRecovering { shard, server, reason } => {
                self.event("demote", shard, server, Some(epoch), &reason.to_string())
            }
            Action::Promote { shard, from, to, reason } => {
                self.event("promote", shard, to, Some(epoch), &format!("replaces {from}, which {reason}"))
            }
            Action::MarkReady { shard, server, .. } => self.event("ready", shard, server, Some(epoch), ""),
            Action::Recover { .. } => {}
        }
    }

    fn log_move(&self, m: &Move, epoch: u64) {
        let e = Some(epoch);
        match m {
            Move::AddServer { server, url } => self.event("add_server", "", server, e, url),
            Move::AddShard { shard, primary, replicas, .. } => {
                self.event("add_shard", shard, primary, e, &format!("copies on {}", replicas.join(", ")))
            }
            Move::AddReplica { shard, server } => self.event("add_replica", shard, server, e, "recovering"),
            Move::HandOver { shard, from, to } => {
                self.event("hand_over", shard, to, e, &format!("takes over from {from}, which is leaving"))
            }
            Move::RemoveReplica { shard, server } => self.event("remove_replica", shard, server, e, ""),
            Move::RemoveServer { server } => self.event("remove_server", "", server, e, ""),
            Move::SetUnroutedKeys { policy } => self.event("unrouted_keys", "", "", e, &format!("{policy:?}")),
        }
    }

    /// Logs a transition and appends it to `events.log`.
    fn event(&self, event: &str, shard: &str, server: &str, epoch: Option<u64>, detail: &str) {
        self.event_with(event, shard, server, epoch, detail, None);
    }

    /// An event with a structured `recover` field: the healer's time and the server's answer.
    fn event_with(
        &self,
        event: &str,
        shard: &str,
        server: &str,
        epoch: Option<u64>,
        detail: &str,
        recover: Option<serde_json::Value>,
    ) {
        tracing::info!(event, shard, server, epoch, detail, "healer");
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let mut line = serde_json::json!({
            "at_ms": at_ms as u64, "event": event, "shard": shard, "server": server, "epoch": epoch, "detail": detail,
        });
        if let Some(r) = recover {
            line["recover"] = r;
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.events)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            tracing::warn!(error = %e, path = %self.events.display(), "cannot append to the event log");
        }
    }

    fn read_topology(&self) -> Result<Topology, LocalError> {
        let bytes = std::fs::read(&self.topology).map_err(|source| LocalError::Io {
            action: "read",
            path: self.topology.clone(),
            source,
        })?;
        Topology::parse(&bytes).map_err(|source| LocalError::BadTopology { path: self.topology.clone(), source })
    }

    fn write_topology(&self, t: &Topology) -> Result<(), LocalError> {
        shard_server::topology_source::write_atomic(&self.topology, t).map_err(|source| LocalError::Io {
            action: "write",
            path: self.topology.clone(),
            source,
        })?;
        tracing::info!(epoch = t.epoch, "topology written");
        Ok(())
    }

    /// Carries out the requests in `DIR/control/`, oldest name first.
    async fn control_requests(&mut self, cluster: &mut LocalCluster) {
        let Ok(entries) = std::fs::read_dir(&self.control) else { return };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for path in files {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            if name == "upgrade" {
                self.upgrade(cluster, &path).await;
                continue;
            }
            let Some((verb, server)) = name.split_once('.') else { continue };
            let outcome = control(cluster, verb, server).await;
            let detail = match &outcome {
                Ok(()) => verb.to_owned(),
                Err(e) => format!("{verb} failed: {e}"),
            };
            self.event("control", "", server, None, &detail);
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Healer {
    /// `DIR/control/upgrade`: new binaries (see the module documentation).
    async fn upgrade(&mut self, cluster: &mut LocalCluster, request: &Path) {
        let named = std::fs::read_to_string(request).unwrap_or_default();
        let dir = Some(named.trim()).filter(|d| !d.is_empty()).map(PathBuf::from);
        let detail = match cluster.upgrade(dir.as_deref()).await {
            Ok(router) => {
                let outdated = cluster.outdated_servers().len();
                let router = if router { "router restarted" } else { "router up to date" };
                format!("{}: {router}; {outdated} servers to restart", cluster.bins.dir.display())
            }
            Err(e) => format!("upgrade failed: {e}"),
        };
        self.event("upgrade", "", "", None, &detail);
        let _ = std::fs::remove_file(request);
    }
}

/// One fault-injection verb (see the module documentation).
async fn control(cluster: &LocalCluster, verb: &str, server: &str) -> Result<(), LocalError> {
    if verb == "renew-certs" {
        // Every certificate of the cluster, whatever follows the dot.
        return cluster.renew_certificates(true).map(drop);
    }
    let s = cluster.known(server)?;
    match verb {
        "kill" => {
            if let Some(pid) = cluster.supervisor.pid(server) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            cluster.stop_server(server).await
        }
        "stop" => cluster.stop_server(server).await,
        "start" => cluster.start_server(server),
        "wipe" => {
            cluster.stop_server(server).await?;
            s.postgres.wipe().await?;
            s.postgres.start().await?;
            cluster.supervisor.announce();
            Ok(())
        }
        "stop-postgres" => cluster.stop_postgres(server).await,
        "start-postgres" => cluster.start_postgres(server).await,
        other => Err(LocalError::UnknownControl(other.to_owned())),
    }
}
