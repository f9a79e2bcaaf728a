//! The node: this server's identity, its database, the topology it follows, and the registry of
//! shards it holds with each one's role. Decides "may I serve/accept this?"; does I/O only to
//! create a shard's table on first use.

use crate::api::{LeaseRequest, LeaseToken, ShardClient};
use crate::auth::Gate;
use crate::db::{Db, ShardTable};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::replication::Shard;
use crate::schema::Schema;
use crate::tls::Credentials;
use crate::topology::{ReplicaState, ShardEntry, Topology};
use crate::topology_source::TopologyRx;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Settings of a node, parsed once from flags.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// Timeout of a replication call to a peer.
    pub peer_timeout: Duration,
    /// Largest accepted request body.
    pub body_limit: usize,
    /// How long a replica may serve reads after asking its primary for a lease, and how long a
    /// primary holds back acknowledgements a demoted replica misses (see [`crate::replication`]).
    pub lease: Duration,
    /// How often a ready replica renews its leases; several renewals fit in one lease, so one
    /// lost or slow renewal does not interrupt reads.
    pub lease_renew: Duration,
    /// Rows this server keeps in memory across its shards (see [`crate::rowcache`]).
    pub cache_rows: usize,
    /// Bytes (estimated) those rows may take together.
    pub cache_bytes: usize,
    /// How long a request body may take to arrive in full (see [`crate::serve`]).
    pub body_timeout: Duration,
    /// Who this server is to its peers, and how it checks them (see [`crate::tls`]).
    pub credentials: Credentials,
    /// Whether callers over plain HTTP are served too (see [`crate::tls::InternalAuth`]).
    pub internal_auth: crate::tls::InternalAuth,
}

impl NodeConfig {
    /// Default lease: long enough that a few missed renewals (a GC-free server under load, a lost
    /// packet) do not stop reads, short enough that a write delayed by a demotion waits at most
    /// about this long, once per demotion.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);
    /// Default renewal interval: a quarter of the lease, so three renewals in a row may fail.
    pub const DEFAULT_LEASE_RENEW: Duration = Duration::from_millis(500);
    /// Default row cache: 50,000 rows, about 10 MiB with the seed's short rows (measured: a server
    /// restarted over 45,000 rows, all cached, rests at 22.4 MiB against 13.3 MiB empty, so about
    /// 200 bytes per row, map and allocator included). Shards that do not fit are read from Postgres.
    pub const DEFAULT_CACHE_ROWS: usize = 50_000;
    /// Default byte budget of the row cache: 16 MiB as [`crate::rowcache::row_bytes`] estimates
    /// it, about three times what 50,000 of the seed's rows take, so the row count is what limits
    /// short rows and this limits long ones.
    pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;
}

/// What this server is for one shard, as of the topology it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardRole {
    /// `stale_copy`: the topology records another identity for this copy than the one it has, so
    /// it lost its data since the operator last looked (e.g. restarted on an empty volume). Such a
    /// copy must neither accept writes as primary (it would number them from scratch, and replicas
    /// would take them for replays) nor serve reads, until the operator heals it.
    /// `leased`: holds an unexpired lease from the operator (see `replication::lease`).
    Primary { epoch: u64, entry: ShardEntry, stale_copy: bool, leased: bool },
    Replica {
        epoch: u64,
        state: ReplicaState,
        primary: String,
        stale_copy: bool,
        /// Holds an unexpired read lease from `primary`.
        leased: bool,
    },
    /// Configured with `/config`, outside any topology: its own sole primary.
    Standalone,
}

pub struct Node {
    pub config: NodeConfig,
    pub db: Db,
    pub metrics: Metrics,
    topology: TopologyRx,
    /// Checks callers of the internal endpoints (see [`crate::auth`]).
    gate: Gate,
    http: reqwest::Client,
    /// For long transfers (snapshots): no overall deadline, but a bound on every read.
    stream_http: reqwest::Client,
    shards: RwLock<HashMap<String, Arc<Shard>>>,
    /// Serialises the creation of shard tables.
    creating: tokio::sync::Mutex<()>,
    /// When this process started: leases granted by an earlier incarnation of this server are
    /// unknown, so acknowledgements wait until they have surely run out.
    pub started: Instant,
    /// No earlier process ever ran under this server's name (see [`Node::declare_no_predecessor`]).
    no_predecessor: AtomicBool,
    /// Names this process in the lease tokens it hands out (random per start).
    boot: u64,
    /// What the row caches of this server's shards may hold together.
    row_budget: Arc<crate::rowcache::Budget>,
}

impl Node {
    pub fn new(config: NodeConfig, db: Db, topology: TopologyRx) -> Arc<Node> {
        let http = config.credentials.http_client(config.peer_timeout);
        let stream_http =
            config.credentials.client_builder().read_timeout(config.peer_timeout).build().expect("HTTP client builds");
        let metrics = Metrics::default();
        let mut gate = Gate::for_credentials(&config.credentials).unwrap_or_else(Gate::nobody);
        if config.internal_auth.accepts_plain() {
            gate = gate.accepting_plain(metrics.plain_internal_requests.clone());
        }
        let row_budget = crate::rowcache::Budget::new(config.cache_rows, config.cache_bytes);
        Arc::new(Node {
            row_budget,
            config,
            db,
            metrics,
            topology,
            gate,
            http,
            stream_http,
            shards: RwLock::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            no_predecessor: AtomicBool::new(false),
            boot: boot_id(),
        })
    }

    /// Declares that no earlier process ever ran under this server's name in its database, so no
    /// read lease can have been granted in its name before this process started, and the wait for
    /// a predecessor's leases is skipped (the argument is in `replication::lease`). Only whoever
    /// starts the process can know this: the local mode says so (`--no-predecessor`) for the
    /// servers of a cluster it has just created, on their first start only.
    pub fn declare_no_predecessor(&self) {
        self.no_predecessor.store(true, Ordering::Release);
    }

    pub fn has_no_predecessor(&self) -> bool {
        self.no_predecessor.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The check of callers of the internal endpoints.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// This moment of this process's clock, for the operator to grant a primary lease from.
    pub fn lease_token(&self) -> LeaseToken {
        LeaseToken { boot: self.boot, at_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX) }
    }

    /// The moment a token of this process names; `None` for another process's token (a server
    /// restarted since the operator probed it) or one from the future.
    pub fn token_instant(&self, token: LeaseToken) -> Option<Instant> {
        let at = self.started.checked_add(Duration::from_micros(token.at_us))?;
        (token.boot == self.boot && at <= Instant::now()).then_some(at)
    }

    pub fn topology(&self) -> Option<Arc<Topology>> {
        self.topology.borrow().clone()
    }

    pub fn epoch(&self) -> u64 {
        self.topology().map_or(0, |t| t.epoch)
    }

    /// Waits, at most `bound`, until this server follows topology epoch `epoch` or a newer one;
    /// the topology it then follows, or `None` when it does not yet.
    pub async fn follow_epoch(&self, epoch: u64, bound: Duration) -> Option<Arc<Topology>> {
        let mut rx = self.topology.clone();
        let newer = async move {
            rx.wait_for(|t| t.as_ref().is_some_and(|t| t.epoch >= epoch)).await.ok().and_then(|t| t.clone())
        };
        tokio::time::timeout(bound, newer).await.ok().flatten()
    }

    pub fn peer(&self, url: &str) -> ShardClient {
        ShardClient::new(self.http.clone(), url)
    }

    /// A client for long transfers from a peer (snapshots).
    pub fn streaming_peer(&self, url: &str) -> ShardClient {
        ShardClient::new(self.stream_http.clone(), url)
    }

    /// Loads the standalone shards recorded in the database, then follows the topology: every shard
    /// the topology gives this server gets its table before the first request needs it.
    pub async fn start(self: &Arc<Self>) -> Result<(), ApiError> {
        for stored in self.db.stored_shards().await? {
            if stored.standalone {
                let schema = Schema::try_from(stored.schema)
                    .map_err(|e| ApiError::Internal(format!("stored schema of {}: {e}", stored.shard)))?;
                self.open_shard(&stored.shard, schema, true).await?;
            }
        }
        let node = Arc::clone(self);
        let mut rx = self.topology.clone();
        tokio::spawn(async move {
            loop {
                let topo = rx.borrow_and_update().clone();
                if let Some(t) = topo {
                    node.adopt(&t).await;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node.config.lease_renew);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                node.renew_leases();
            }
        });
        Ok(())
    }

    /// Asks every primary this server replicates from for leases on all the shards it is a ready
    /// replica of there: one request per primary, each in its own task so that an unreachable
    /// primary delays no other.
    fn renew_leases(self: &Arc<Self>) {
        let Some(t) = self.topology() else { return };
        let mut by_primary: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (entry, state) in t.shards_of(self.name()) {
            if state == ReplicaState::Ready && entry.primary != self.name() {
                by_primary.entry(&entry.primary).or_default().push(entry.id.clone());
            }
        }
        for (primary, shards) in by_primary {
            let Some(url) = t.servers.get(primary).map(|s| s.url.clone()) else { continue };
            let (node, primary) = (Arc::clone(self), primary.to_owned());
            tokio::spawn(async move { node.request_lease(&primary, &url, shards).await });
        }
    }

    /// One lease request to `primary`. The lease is measured from before the request is sent: the
    /// primary records its grant later than that, so this copy's lease always ends before the
    /// primary stops counting on it.
    pub async fn request_lease(&self, primary: &str, url: &str, shards: Vec<String>) {
        let asked = Instant::now();
        let req = LeaseRequest { replica: self.name().to_owned(), shards };
        // An answer arriving after the lease it would grant has run out grants nothing.
        match tokio::time::timeout(self.config.lease, self.peer(url).lease(&req)).await {
            Ok(Ok(r)) => {
                let granted: Vec<Arc<Shard>> = {
                    let shards = self.shards.read().expect("lock");
                    r.granted.iter().filter_map(|id| shards.get(id).cloned()).collect()
                };
                for s in granted {
                    // Never longer than the primary's own lease (see `replication::lease`).
                    let valid = r.valid_ms.get(s.id()).map_or(self.config.lease, |ms| Duration::from_millis(*ms));
                    s.extend_lease(primary, asked + valid.min(self.config.lease));
                    // What the primary confirmed, for readers waiting on pending entries here.
                    if let Some(c) = r.confirmed.get(s.id()) {
                        s.confirm_from_primary(self, c.clone()).await;
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(%primary, error = %e, "lease renewal failed"),
            Err(_) => tracing::debug!(%primary, "lease renewal timed out"),
        }
    }

    async fn adopt(self: &Arc<Self>, t: &Topology) {
        let Ok(schema) = t.schema() else { return };
        for (entry, state) in t.shards_of(self.name()) {
            match self.open_shard(&entry.id, schema.clone(), false).await {
                // A replica that becomes ready may still miss writes acknowledged while it was not
                // (they were fed to it without waiting). It serves no reads until it has caught up
                // with its primary as of this topology.
                Ok(shard) if state == ReplicaState::Ready && entry.primary != self.name() => {
                    if shard.close_read_gate(t.epoch) {
                        let (node, url) = (Arc::clone(self), t.servers.get(&entry.primary).map(|s| s.url.clone()));
                        let primary = entry.primary.clone();
                        if let Some(url) = url {
                            tokio::spawn(async move {
                                // Ask for a lease at once rather than at the next renewal, so the
                                // copy serves as soon as its gate opens.
                                node.request_lease(&primary, &url, vec![shard.id().to_owned()]).await;
                                shard.catch_up_then_open(&node, &url).await
                            });
                        }
                    }
                }
                Ok(shard) => shard.forget_read_gate(),
                Err(e) => tracing::error!(shard = %entry.id, error = %e, "cannot open shard"),
            }
        }
    }

    /// Registers a shard (creating its table if needed). Idempotent.
    pub async fn open_shard(&self, id: &str, schema: Schema, standalone: bool) -> Result<Arc<Shard>, ApiError> {
        if let Some(s) = self.shards.read().expect("lock").get(id) {
            if s.table.schema != schema {
                return Err(ApiError::Conflict {
                    message: format!("shard {id} already exists with another schema"),
                    keys: vec![],
                });
            }
            if standalone && !s.is_standalone() {
                s.set_standalone();
            }
            return Ok(Arc::clone(s));
        }
        let _guard = self.creating.lock().await;
        if let Some(s) = self.shards.read().expect("lock").get(id) {
            return Ok(Arc::clone(s));
        }
        let table = ShardTable::new(id, schema);
        let (applied, copy_id, hash) = self.db.ensure_shard(&table, standalone).await.map_err(|e| match e {
            crate::db::DbError::SchemaMismatch { shard, .. } => ApiError::Conflict {
                message: format!("shard {shard} already exists with another schema"),
                keys: vec![],
            },
            other => ApiError::Db(other),
        })?;
        let shard = Shard::spawn(table, applied, hash.as_deref(), copy_id, standalone, Arc::clone(&self.row_budget));
        shard.load_rows(&self.db).await;
        self.shards.write().expect("lock").insert(id.to_owned(), Arc::clone(&shard));
        tracing::info!(shard = id, applied, standalone, "shard opened");
        Ok(shard)
    }

    /// Shards registered here, in name order.
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        let mut v: Vec<_> = self.shards.read().expect("lock").values().cloned().collect();
        v.sort_by(|a, b| a.id().cmp(b.id()));
        v
    }

    /// The shard and this server's role for it. A shard the topology gives us but that is not open
    /// yet is opened now.
    pub async fn shard(&self, id: &str) -> Result<(Arc<Shard>, ShardRole), ApiError> {
        let topo = self.topology();
        let listed = topo.as_ref().and_then(|t| t.shard(id).map(|e| (t, e)));
        if let Some((t, entry)) = listed
            && let Some(state) = entry.replicas.get(self.name())
        {
            let schema = t.schema().map_err(|e| ApiError::Internal(e.to_string()))?;
            let shard = self.open_shard(id, schema, false).await?;
            let stale_copy = entry.copies.get(self.name()).is_some_and(|recorded| *recorded != shard.copy_id());
            let role = if entry.primary == self.name() {
                let leased = shard.holds_primary_lease();
                ShardRole::Primary { epoch: t.epoch, entry: entry.clone(), stale_copy, leased }
            } else {
                ShardRole::Replica {
                    epoch: t.epoch,
                    state: *state,
                    primary: entry.primary.clone(),
                    stale_copy: stale_copy || shard.read_gate_closed(),
                    leased: shard.holds_lease(&entry.primary),
                }
            };
            return Ok((shard, role));
        }
        let existing = self.shards.read().expect("lock").get(id).cloned();
        match existing {
            Some(s) if s.is_standalone() => Ok((s, ShardRole::Standalone)),
            _ => {
                Err(ApiError::NotFound { message: format!("shard {id} is not held by {}", self.name()), keys: vec![] })
            }
        }
    }

    /// The schema to use for a request about `shard`, whatever our role.
    pub async fn schema_of(&self, id: &str) -> Result<Schema, ApiError> {
        Ok(self.shard(id).await?.0.table.schema.clone())
    }
}

/// A number telling this process from every other start of it: the clock's nanoseconds and the
/// pid, mixed.
fn boot_id() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
