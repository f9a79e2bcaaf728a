//! The reconcile driver: a kube-runtime `Controller` on `ShardedDatabase` owning every child kind.
//! Each reconcile runs validate → internal-auth mode ([`super::internal_auth`]) → build → apply →
//! observe → status. Beside it runs the healer ([`super::heal`]), which keeps the topology in
//! step with the servers. Does I/O.
//!
//! The topology ConfigMap is shared with the healer: the reconcile only creates it when missing;
//! every later change (failovers, heals, and the placement moves that carry out a spec change) is
//! the healer's, written at the resourceVersion it read.
//!
//! Servers follow the document, not only the spec: a server runs (its StatefulSet is applied)
//! while the spec wants it *or* the published topology still lists it. A server removed from the
//! spec is therefore kept until the healer has drained it (moved its copies to the servers that
//! replace it) and dropped it from the document; the ConfigMap watch then reconciles, and only
//! then is its StatefulSet deleted. A server added to the spec gets its StatefulSet at once, and
//! the healer fills it from ready copies. Each server has its own StatefulSet of one pod, so any
//! server can leave, not only the highest ordinal.
//!
//! Errors are classified once, here: an invalid spec is the user's to fix, so it becomes a
//! `Ready=False, reason=InvalidSpec` condition and an Event, and the controller waits for the next
//! change; everything else is transient and retried with exponential backoff and jitter.

use super::admin::database_path;
use super::apply::{self, ApplyError};
use super::build::configmap::first_topology;
use super::build::netpol::{self, OperatorPods};
use super::build::secret::{generate_password, postgres_secret, stored_password};
use super::build::tls::database_id;
use super::build::{Owner, names, pdb, rbac, router, service, statefulset};
use super::heal::{self, HealSettings};
use super::identities::ensure_identities;
use super::internal_auth;
use super::pki::{OperatorPki, PkiError};
use super::status::{self, Observed, READY};
use super::topology::{self, HeadlessService, ServerUrls, WriteError};
use super::workloads;
use crate::brain::placement::place;
use crate::brain::topology::TopologyBuildError;
use crate::brain::validate::{Images, validate_with_defaults};
use crate::crd::{ConditionStatus, ShardedDatabase, ShardedDatabaseStatus};
use futures::FutureExt;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shard_server::tls::InternalAuth;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::instrument;

/// How often a healthy database is looked at again even without a change event.
const RESYNC: Duration = Duration::from_secs(300);
/// Backoff of transient errors: `BACKOFF_MIN * 2^failures`, at most `BACKOFF_MAX`, ±50% jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why a reconcile failed (an invalid spec is not an error: it is reported in the status).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("ShardedDatabase {0} has no namespace or uid yet")]
    NotStored(String),
    #[error(transparent)]
    Api(#[from] ApplyError),
    #[error("failed to build the topology")]
    Topology(#[from] TopologyBuildError),
    #[error("failed to publish the topology")]
    TopologyWrite(#[from] WriteError),
    #[error("failed to write the status of {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to keep the database's certificates")]
    Pki(#[from] PkiError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

/// Reconcile count, duration and errors, registered under `sharddb_operator_*`.
pub struct Metrics {
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    /// Copies the healer found differing from their primary at an equal sequence number and
    /// demoted to be copied afresh.
    pub copies_diverged: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            copies_diverged: Counter::default(),
        };
        let sub = registry.sub_registry_with_prefix("sharddb_operator");
        sub.register("reconciles", "Reconciles started", m.reconciles.clone());
        sub.register("reconcile_errors", "Reconciles that failed, by error kind", m.errors.clone());
        sub.register("reconcile_duration_seconds", "Time spent in one reconcile", m.duration.clone());
        sub.register(
            "copies_diverged",
            "Copies found differing from their primary at an equal sequence number, demoted and copied afresh",
            m.copies_diverged.clone(),
        );
        m
    }
}

impl Metrics {
    /// Reconciles started so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }
}

/// How this operator is configured (parsed once in `main`, from flags and the environment).
#[derive(Clone, Debug)]
pub struct Config {
    /// The images of a ShardedDatabase whose `spec.images` leaves them out.
    pub default_images: Images,
    /// Where servers are reached: the pods' DNS names under the headless Service, unless a test
    /// points them elsewhere.
    pub server_urls: Arc<dyn ServerUrls>,
    /// The healer's settings; `None` runs the reconcile alone (nothing probes the servers, and
    /// the topology changes only with the spec).
    pub healing: Option<HealSettings>,
    /// The base URL of this operator's admin endpoint as routers reach it (its Service), e.g.
    /// `https://sharddb-operator.sharddb-system.svc:8081`. Routers are built with
    /// `--control-url <this>/databases/<namespace>/<name>`; `None` leaves them without a control
    /// plane (the admin verbs answer 501).
    pub admin_url: Option<String>,
    /// The routers' `/init`, `/add` and `/rm` need the bearer token of `<db>-admin-token`.
    pub require_admin_token: bool,
    /// Where the operator's pods run: each database gets a NetworkPolicy admitting only its
    /// routers, its servers and these pods to its servers. `None`: no NetworkPolicies.
    pub network_policy: Option<OperatorPods>,
    /// The namespaces watched, each with namespaced permissions; `None`: the whole cluster.
    pub namespaces: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_images: Images::default(),
            server_urls: Arc::new(HeadlessService),
            healing: Some(HealSettings::default()),
            admin_url: None,
            require_admin_token: true,
            network_policy: None,
            namespaces: None,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: Config,
    /// The operator's CA and its certificates for each database (see `k8s::pki`).
    pub pki: Arc<OperatorPki>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Consecutive failures per object, for the backoff; cleared by a success.
    failures: Mutex<HashMap<ObjectRef<ShardedDatabase>, u32>>,
    /// Per database, the servers the healer could not reach at its last probe.
    unreachable: Mutex<HashMap<ObjectRef<ShardedDatabase>, BTreeSet<String>>>,
    /// Per database, the servers a rolling update restarted whose copies are not all ready yet.
    restarting: Mutex<HashMap<ObjectRef<ShardedDatabase>, BTreeSet<String>>>,
    /// Per database, the newest topology epoch every server was seen following, and since when.
    followed: Mutex<HashMap<ObjectRef<ShardedDatabase>, (u64, Instant)>>,
}

impl Context {
    /// A context with an operator CA held in memory (see [`OperatorPki::ephemeral`]).
    pub fn new(client: Client, config: Config, metrics: Metrics) -> Arc<Self> {
        let pki = OperatorPki::ephemeral(config.admin_url.as_deref());
        Context::with_pki(client, config, metrics, pki)
    }

    /// A context using the operator CA `pki` (kept in a Secret by `sharddb-operator run`).
    pub fn with_pki(client: Client, config: Config, metrics: Metrics, pki: Arc<OperatorPki>) -> Arc<Self> {
        let reporter = Reporter { controller: names::MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        let recorder = Recorder::new(client.clone(), reporter);
        Arc::new(Context {
            client,
            config,
            pki,
            recorder,
            metrics,
            failures: Mutex::default(),
            unreachable: Mutex::default(),
            restarting: Mutex::default(),
            followed: Mutex::default(),
        })
    }

    /// Where the operator reaches `server` of database `namespace/db`: over `http://` while the
    /// database is in internal-auth `none`.
    pub(super) fn server_url(&self, db: &str, namespace: &str, server: &str) -> String {
        let plain = self.pki.dials_plain(&shard_server::tls::DatabaseId::new(namespace, db)) == Some(true);
        topology::in_scheme(&self.config.server_urls.url(db, namespace, server), plain)
    }

    /// The servers of `db` the healer could not reach at its last probe.
    pub fn unreachable(&self, db: &ObjectRef<ShardedDatabase>) -> BTreeSet<String> {
        self.unreachable.lock().unwrap_or_else(|e| e.into_inner()).get(db).cloned().unwrap_or_default()
    }

    /// Records what the healer could not reach; whether that changed.
    pub(super) fn set_unreachable(&self, db: &ObjectRef<ShardedDatabase>, servers: BTreeSet<String>) -> bool {
        let mut map = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(db.clone(), servers.clone()) != Some(servers)
    }

    /// The servers of `db` a rolling update restarted whose copies are not all ready yet.
    pub fn restarting(&self, db: &ObjectRef<ShardedDatabase>) -> BTreeSet<String> {
        self.restarting.lock().unwrap_or_else(|e| e.into_inner()).get(db).cloned().unwrap_or_default()
    }

    /// Records what the rollout is restarting; whether that changed.
    pub(super) fn set_restarting(&self, db: &ObjectRef<ShardedDatabase>, servers: BTreeSet<String>) -> bool {
        let mut map = self.restarting.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(db.clone(), servers.clone()).unwrap_or_default() != servers
    }

    /// The newest topology epoch every server of `db` was seen following, and since when.
    pub fn followed(&self, db: &ObjectRef<ShardedDatabase>) -> Option<(u64, Instant)> {
        self.followed.lock().unwrap_or_else(|e| e.into_inner()).get(db).copied()
    }

    /// Records that every server of `db` follows `epoch` (seen `at`); whether that is news.
    pub(super) fn set_followed(&self, db: &ObjectRef<ShardedDatabase>, epoch: u64, at: Instant) -> bool {
        let mut map = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(db).is_some_and(|(seen, _)| *seen >= epoch) {
            return false;
        }
        map.insert(db.clone(), (epoch, at));
        true
    }

    /// Forgets databases of `scope` (a namespace, or every one) that are gone.
    pub(super) fn forget_unreachable_except(
        &self,
        scope: Option<&str>,
        keep: &std::collections::HashSet<ObjectRef<ShardedDatabase>>,
    ) {
        let in_scope = |k: &ObjectRef<ShardedDatabase>| scope.is_none_or(|ns| k.namespace.as_deref() == Some(ns));
        self.unreachable.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !in_scope(k) || keep.contains(k));
        self.restarting.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !in_scope(k) || keep.contains(k));
        self.followed.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !in_scope(k) || keep.contains(k));
    }
}

/// Runs the controller and the healer until `shutdown` resolves; reconciles in flight are
/// finished first, recovers in flight are abandoned (the next leader redoes them).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = shutdown.shared();
    match ctx.config.namespaces.clone() {
        None => run_scope(ctx, None, shutdown).await,
        // One controller and healer per namespace: each lists and watches its namespace alone,
        // which is all a namespaced Role lets it do.
        Some(namespaces) => {
            let scopes = namespaces.into_iter().map(|ns| run_scope(ctx.clone(), Some(ns), shutdown.clone()));
            futures::future::join_all(scopes).await;
        }
    }
}

/// The controller and healer over one namespace, or over the whole cluster (`None`).
async fn run_scope(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: futures::future::Shared<impl Future<Output = ()> + Send + Sync + 'static>,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let cfg = || watcher::Config::default().labels(&format!("{}={}", names::LABEL_MANAGED_BY, names::MANAGER));
    // The healer asks for a reconcile (to refresh the status) when a server's reachability changes.
    let (reconcile_tx, reconcile_rx) = futures::channel::mpsc::unbounded();
    let mut controller = Controller::new(api::<ShardedDatabase>(&client, ns), watcher::Config::default())
        .owns(api::<StatefulSet>(&client, ns), cfg())
        .owns(api::<Deployment>(&client, ns), cfg())
        .owns(api::<Service>(&client, ns), cfg())
        .owns(api::<ConfigMap>(&client, ns), cfg())
        .owns(api::<Secret>(&client, ns), cfg())
        .owns(api::<ServiceAccount>(&client, ns), cfg())
        .owns(api::<Role>(&client, ns), cfg())
        .owns(api::<RoleBinding>(&client, ns), cfg())
        .owns(api::<PodDisruptionBudget>(&client, ns), cfg());
    if ctx.config.network_policy.is_some() {
        controller = controller.owns(api::<NetworkPolicy>(&client, ns), cfg());
    }
    let controller = controller.reconcile_all_on(reconcile_rx).graceful_shutdown_on(shutdown.clone());
    let healer = match ctx.config.healing {
        Some(settings) => {
            heal::run(ctx.clone(), controller.store(), namespace.clone(), settings, reconcile_tx, shutdown).boxed()
        }
        None => futures::future::ready(()).boxed(),
    };
    let reconciles = controller.run(reconcile, error_policy, ctx).for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "reconcile did not complete");
        }
    });
    futures::future::join(reconciles, healer).await;
}

#[instrument(skip_all, fields(db = %db.name_any(), namespace = db.namespace().unwrap_or_default()))]
pub async fn reconcile(db: Arc<ShardedDatabase>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics.reconciles.inc();
    let started = Instant::now();
    let result = reconcile_inner(&db, &ctx).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&ObjectRef::from_obj(db.as_ref()));
    }
    result
}

async fn reconcile_inner(db: &ShardedDatabase, ctx: &Context) -> Result<Action, ReconcileError> {
    let owner = Owner::of(db).ok_or_else(|| ReconcileError::NotStored(db.name_any()))?;
    let client = &ctx.client;
    let ns = owner.namespace.as_str();
    let generation = db.meta().generation;
    let previous = db.status.as_ref();
    let now = now();

    let valid = match validate_with_defaults(&db.spec, &ctx.config.default_images) {
        Ok(valid) => valid,
        Err(error) => return refuse_spec(ctx, db, &owner, error.to_string(), &now).await,
    };
    let placement = place(&valid);

    // The internal-auth mode, before anything that depends on it is written (see
    // `k8s::internal_auth`): whether the CA exists is read before `ensure_identities` makes it.
    let has_ca = valid.tls.ca_secret.is_some()
        || apply::get::<Secret>(client, ns, &names::ca_secret(&owner.name)).await?.is_some();
    let selector = names::selector_string(&names::servers_selector(&owner.name));
    let server_sets_found: Vec<StatefulSet> = apply::list::<StatefulSet>(client, ns, &selector)
        .await?
        .into_iter()
        .filter(|sts| sts.owner_references().iter().any(|r| r.uid == owner.reference.uid))
        .collect();
    let has_servers = !server_sets_found.is_empty();
    let was_tls = previous
        .and_then(|p| status::condition(p, internal_auth::INTERNAL_AUTH))
        .is_some_and(|c| internal_auth::reason_is_tls(&c.reason));
    let found = internal_auth::Found { ca: has_ca, servers: has_servers, was_tls };
    let mode = internal_auth::decide(valid.tls.internal_auth, found);
    if mode == InternalAuth::None && valid.tls.client_tls {
        let message = "spec.tls.clientTls needs the database's certificates, and this database runs in internal-auth \
                       none (taken over from a release before internal authentication): set spec.tls.internalAuth \
                       to strict (or migrate) as well";
        return refuse_spec(ctx, db, &owner, message.into(), &now).await;
    }

    // Inputs the builders need from the cluster: the stored password and the published topology.
    let secret_name = names::postgres_secret(&owner.name);
    let password = apply::get::<Secret>(client, ns, &secret_name)
        .await?
        .as_ref()
        .and_then(stored_password)
        .unwrap_or_else(generate_password);
    let published = topology::read(client, &owner).await?;
    let current = published.as_ref().and_then(|p| p.topology.clone());
    // The step of the climb toward `mode` (see `k8s::internal_auth`): which mode the templates
    // carry now and which scheme the document lists (and the operator dials).
    let key = ObjectRef::from_obj(db);
    let routers_found = apply::get::<Deployment>(client, ns, &names::router(&owner.name)).await?;
    let (seen, grace_left) = workloads::climb_seen(
        &server_sets_found,
        routers_found.as_ref(),
        current.as_ref(),
        !ctx.restarting(&key).is_empty(),
        ctx.followed(&key),
    );
    let seen = internal_auth::Seen {
        climbing: previous
            .and_then(|p| status::condition(p, internal_auth::INTERNAL_AUTH))
            .is_some_and(|c| c.reason == internal_auth::REASON_CLIMBING),
        ..seen
    };
    let step = internal_auth::climb(mode, &seen);
    let url = |server: &str| topology::in_scheme(&ctx.config.server_urls.url(&owner.name, ns, server), step.plain_urls);
    let (topology, first) = match current.clone() {
        Some(t) => (t, false),
        None => (first_topology(&valid, &placement, url)?, true),
    };

    // Identity and access first, then what pods mount, then the pods.
    apply::apply(client, ns, &rbac::server_service_account(&owner)).await?;
    apply::apply(client, ns, &rbac::router_service_account(&owner)).await?;
    apply::apply(client, ns, &rbac::topology_reader_role(&owner)).await?;
    apply::apply(client, ns, &rbac::topology_reader_binding(&owner)).await?;
    apply::apply(client, ns, &postgres_secret(&owner, &password)).await?;
    // Wanted by the spec, or still in the document (being drained).
    let mut running: BTreeSet<String> = placement.servers.iter().cloned().collect();
    if let Some(t) = &current {
        running.extend(t.servers.keys().cloned());
    }
    let database = database_id(&owner);
    // Templates in `none` get no CA, no certificates, no admin token. Any other template needs
    // them, even while the operator still dials the servers plain (climbing out of `none`).
    if step.template != InternalAuth::None
        && let Err(e) = ensure_identities(ctx, &owner, &valid, &running).await
    {
        if let ReconcileError::Pki(PkiError::BadCa { .. }) = &e {
            let note = error_chain(&e);
            publish(ctx, db, EventType::Warning, "CertificateAuthority", "Reconcile", note).await;
        }
        return Err(e);
    }
    // While the document lists `http://` URLs the operator dials plain, and answers routers over
    // plain HTTP: until the climb's second rung, some routers may still be in `none`.
    ctx.pki.set_dial_plain(&database, step.plain_urls);
    if step.plain_urls {
        ctx.pki.register_plain(&database);
    } else {
        ctx.pki.unregister_plain(&database);
    }
    match &ctx.config.network_policy {
        Some(operator) => {
            apply::apply(client, ns, &netpol::servers_network_policy(&owner, operator)).await?;
        }
        None => apply::delete::<NetworkPolicy>(client, ns, &names::servers_network_policy(&owner.name)).await?,
    }
    apply::apply(client, ns, &service::headless_service(&owner)).await?;
    if first {
        // Only at the version read (or as a create): a healer's write meanwhile makes this fail,
        // and the retry starts from the document it wrote.
        let read_at = published.as_ref().map(|p| p.resource_version.as_str());
        topology::write(client, &owner, &topology, read_at).await?;
        tracing::info!(epoch = topology.epoch, "topology published");
    }
    running.extend(topology.servers.keys().cloned());
    let mut server_sets = Vec::with_capacity(running.len());
    for server in &running {
        let sts =
            apply::apply(client, ns, &statefulset::server_statefulset(&valid, &owner, server, step.template)).await?;
        server_sets.push((server.clone(), sts));
    }
    let control_url = ctx
        .config
        .admin_url
        .as_ref()
        .map(|base| format!("{}{}", base.trim_end_matches('/'), database_path(ns, &owner.name)));
    let routers = apply::apply(
        client,
        ns,
        &router::router_deployment(
            &valid,
            &owner,
            control_url.as_deref(),
            ctx.config.require_admin_token,
            step.template,
        ),
    )
    .await?;
    apply::apply(client, ns, &service::router_service(&owner)).await?;
    apply::apply(client, ns, &pdb::server_pdb(&owner)).await?;
    apply::apply(client, ns, &pdb::router_pdb(&owner)).await?;

    // Servers neither wanted nor in the document: drained. Their pods go with them; their
    // volumes stay (a StatefulSet's claims are not garbage-collected), so re-adding a server
    // finds its data (which the healer does not trust: a re-added holder is filled again).
    let wanted: BTreeSet<String> = running.iter().map(|s| names::server_statefulset(&owner.name, s)).collect();
    for sts in apply::list::<StatefulSet>(client, ns, &selector).await? {
        let name = sts.name_any();
        let ours = sts.owner_references().iter().any(|r| r.uid == owner.reference.uid);
        if ours && !wanted.contains(&name) {
            tracing::info!(statefulset = %name, "removing a drained server");
            apply::delete::<StatefulSet>(client, ns, &name).await?;
            // Its certificate goes with it: `<db>-<server>` → `<db>-tls-<server>`.
            if let Some(server) = name.strip_prefix(&format!("{}-", owner.name)) {
                apply::delete::<Secret>(client, ns, &names::server_tls_secret(&owner.name, server)).await?;
            }
            publish(ctx, db, EventType::Normal, "ServerRemoved", "Scale", format!("removed {name}")).await;
        }
    }

    let observed = Observed {
        ready_servers: server_sets
            .iter()
            .filter(|(_, sts)| sts.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) >= 1)
            .map(|(server, _)| server.clone())
            .collect(),
        ready_routers: routers.status.as_ref().and_then(|s| s.ready_replicas).map_or(0, |r| r.max(0) as u32),
        topology,
        unreachable: ctx.unreachable(&key),
        updated_servers: server_sets
            .iter()
            .filter(|(_, sts)| workloads::updated(sts))
            .map(|(server, _)| server.clone())
            .collect(),
        // Until the last restarted server's copies are ready again, even once every pod runs the
        // current revision.
        rolling: server_sets.iter().any(|(_, sts)| workloads::outdated(sts)) || !ctx.restarting(&key).is_empty(),
    };
    let status = status::healthy_or_converging(generation, &placement, &observed, previous, &now);
    let last = previous.and_then(|p| status::condition(p, internal_auth::INTERNAL_AUTH));
    let auth = internal_auth::report(
        mode,
        valid.tls.internal_auth.is_some(),
        step.rung,
        last.map(|c| (c.reason.as_str(), c.message.as_str())),
    );
    if let Some(action) = auth.event {
        let type_ = if auth.warn { EventType::Warning } else { EventType::Normal };
        publish(ctx, db, type_, internal_auth::INTERNAL_AUTH, action, auth.message.clone()).await;
    }
    let status = status::with_condition(
        status,
        (internal_auth::INTERNAL_AUTH, auth.status, auth.reason, auth.message),
        previous,
        &now,
    );
    let was_ready = previous.and_then(|p| status::condition(p, READY)).map(|c| c.status);
    let is_ready = status::condition(&status, READY).map(|c| c.status);
    // A rolling update takes each server out of service in turn; its own Events say so.
    if was_ready != is_ready && !observed.rolling {
        let (type_, reason) = match is_ready {
            Some(ConditionStatus::True) => (EventType::Normal, "Ready"),
            _ => (EventType::Warning, "NotReady"),
        };
        let note = status::condition(&status, READY).map(|c| c.message.clone()).unwrap_or_default();
        publish(ctx, db, type_, reason, "Reconcile", note).await;
    }
    write_status(ctx, db, &owner, status).await?;
    // Waiting out the routers' grace: look again when it ends.
    match grace_left.filter(|_| step.rung == Some(internal_auth::Rung::Redial)) {
        Some(left) => Ok(Action::requeue(left + Duration::from_millis(100))),
        None => Ok(Action::requeue(RESYNC)),
    }
}

/// Reports an invalid spec (`Ready=False, reason=InvalidSpec`, and an Event when the message is
/// new) and waits for the next change: the user's to fix, nothing is retried.
async fn refuse_spec(
    ctx: &Context,
    db: &ShardedDatabase,
    owner: &Owner,
    message: String,
    now: &str,
) -> Result<Action, ReconcileError> {
    tracing::info!(%message, "invalid spec");
    let previous = db.status.as_ref();
    let status = status::invalid_spec(db.meta().generation, &message, previous, now);
    let newly_invalid = previous
        .and_then(|p| status::condition(p, READY))
        .is_none_or(|c| c.reason != status::REASON_INVALID_SPEC || c.message != message);
    if newly_invalid {
        publish(ctx, db, EventType::Warning, status::REASON_INVALID_SPEC, "Validate", message).await;
    }
    write_status(ctx, db, owner, status).await?;
    Ok(Action::await_change())
}

/// Transient errors: retry with exponential backoff and ±50% jitter, so many failing objects do
/// not retry in lockstep against a struggling API server.
pub fn error_policy(db: Arc<ShardedDatabase>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let kind = match error {
        ReconcileError::NotStored(_) => "not_stored",
        ReconcileError::Api(_) => "api",
        ReconcileError::Topology(_) => "topology",
        ReconcileError::TopologyWrite(WriteError::Conflict(_)) => "topology_conflict",
        ReconcileError::TopologyWrite(WriteError::Api(_)) => "api",
        ReconcileError::Status { .. } => "status",
        ReconcileError::Pki(_) => "pki",
    };
    ctx.metrics.errors.get_or_create(&ErrorLabels { kind: kind.into() }).inc();
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ObjectRef::from_obj(db.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures, rand::random::<f64>());
    tracing::warn!(error = %error_chain(error), failures, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The delay after `failures` consecutive failures; `jitter` in `[0, 1)` scales it by 0.5–1.5.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
    exp.min(BACKOFF_MAX).mul_f64(0.5 + jitter.clamp(0.0, 1.0))
}

/// An error and its sources, joined with `: ` (for logs and Events).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Patches the status subresource, only when it changed.
async fn write_status(
    ctx: &Context,
    db: &ShardedDatabase,
    owner: &Owner,
    status: ShardedDatabaseStatus,
) -> Result<(), ReconcileError> {
    if db.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ShardedDatabase> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&owner.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ReconcileError::Status { name: owner.name.clone(), source })?;
    Ok(())
}

/// Events are best effort: failing to record one must not fail the reconcile.
pub(super) async fn publish(
    ctx: &Context,
    db: &ShardedDatabase,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    publish_related(ctx, db, type_, reason, action, note, None).await
}

/// [`publish`], naming another object the event concerns. The recorder folds an event into an
/// earlier one of the same reason, action and objects (counting it in a series, keeping the first
/// note), so events about different servers name each server's pod to stay apart.
pub(super) async fn publish_related(
    ctx: &Context,
    db: &ShardedDatabase,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    secondary: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary };
    if let Err(error) = ctx.recorder.publish(&event, &db.object_ref(&())).await {
        tracing::warn!(%error, reason, "failed to record an event");
    }
}

fn now() -> String {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(1, 0.5), BACKOFF_MIN);
        assert_eq!(backoff(3, 0.5), BACKOFF_MIN * 4);
        assert_eq!(backoff(40, 0.5), BACKOFF_MAX);
        assert_eq!(backoff(1, 0.0), BACKOFF_MIN / 2);
        assert!(backoff(1, 0.999) < BACKOFF_MIN * 3 / 2 + Duration::from_millis(1));
    }
}
