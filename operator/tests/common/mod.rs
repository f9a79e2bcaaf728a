//! The harness of the Kubernetes-body tests: the in-process fake API server, the real
//! `Controller` and healer, the operator's admin endpoint, and real shard servers (in-process,
//! over a throwaway Postgres) that follow the topology ConfigMap through a watch on that API,
//! reached at local addresses through the injectable `ServerUrls`. Shared by `k8s_heal` and
//! `k8s_rollout`; each uses what it needs.
//!
//! The admin endpoint is served over TLS as in `sharddb-operator run`, and called with the
//! router certificate the operator put in the routers' Secret. Servers present certificates of
//! the database's CA (the one the operator made in `students-ca`), and the healer reaches them
//! with its own certificate for the database, as in a cluster. A server (re)started once its
//! StatefulSet exists runs in the internal-auth mode of that StatefulSet's pod template
//! (`SHARDDB_INTERNAL_AUTH`), as its pod would.
#![allow(dead_code)]

use fake_apiserver::FakeApiServer;
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use localpg::LocalPg;
use operator::brain::plan::Settings;
use operator::brain::validate::Images;
use operator::crd::ShardedDatabase;
use operator::k8s::controller::{Config, Context, Metrics, run};
use operator::k8s::heal::HealSettings;
use operator::k8s::pki::OperatorPki;
use operator::k8s::topology::ServerUrls;
use serde_json::{Value, json};
use shard_server::api::{Op, ShardClient, WriteRequest, install_crypto_provider};
use shard_server::db::Db;
use shard_server::node::{Node, NodeConfig};
use shard_server::schema::{Row, Value as Cell};
use shard_server::tls::issue::{Ca, LeafRequest};
use shard_server::tls::source::Pem;
use shard_server::tls::{Component, Credentials, DatabaseId, Identity, InternalAuth, TlsListener, TlsPeer, TlsSource};
use shard_server::topology::Topology;
use shard_server::topology_source::watch_configmap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Generous: it bounds a failure, not a success, and the machine may be busy.
pub const WAIT: Duration = Duration::from_secs(60);
pub const NS: &str = "default";
pub const CONFIGMAP: &str = "students-topology";

/// Servers at local addresses instead of DNS names.
#[derive(Debug)]
pub struct LocalUrls(BTreeMap<String, String>);

impl ServerUrls for LocalUrls {
    fn url(&self, _db: &str, _namespace: &str, server: &str) -> String {
        self.0.get(server).cloned().unwrap_or_else(|| "https://127.0.0.1:9".into())
    }
}

pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub db_url: String,
    /// While it runs.
    pub process: Option<Process>,
}

/// A shard server on a runtime of its own, as in a process of its own: stopping it ends every
/// task it started, as a process's exit does. (Stopping only its listener would leave its
/// replication, lease renewals and topology watch running beside its successor on the same
/// database: two servers of one name, which no cluster has.)
pub struct Process(Option<tokio::runtime::Runtime>);

impl Process {
    fn start(name: &str, main: impl std::future::Future<Output = ()> + Send + 'static) -> Process {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("a runtime for a server");
        runtime.spawn(main);
        Process(Some(runtime))
    }

    /// Ends every task of the server and waits until they are gone (their sockets closed).
    pub async fn stop(mut self) {
        if let Some(runtime) = self.0.take() {
            tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(10))).await.unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

pub struct Harness {
    pub api: FakeApiServer,
    /// The operator's admin endpoint.
    pub admin: SocketAddr,
    pub pg: LocalPg,
    pub servers: Vec<Server>,
    /// Presents a certificate of the operator for the database: what the servers answer.
    pub http: reqwest::Client,
    /// The operator's CA, kept across operator restarts as its Secret would keep it.
    pub pki: Arc<OperatorPki>,
    /// The database's CA, as the operator made it in `students-ca`.
    pub ca: Option<Ca>,
    pub config: Option<Config>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub operator: Option<JoinHandle<()>>,
    /// The metrics of the operator started last.
    pub registry: Option<prometheus_client::registry::Registry>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for s in &mut self.servers {
            s.process.take();
        }
    }
}

impl Harness {
    /// Three servers, the controller and healer with short timeouts, and the database created.
    pub async fn start() -> Harness {
        Harness::start_with(3).await
    }

    /// As [`Harness::start`], with `servers` servers (`Server0`…) known by address, of which
    /// only the spec's three are served: the others play pods yet to be created, started later
    /// with [`Harness::restart`].
    pub async fn start_with(servers: usize) -> Harness {
        Harness::start_in(servers, None).await
    }

    /// As [`Harness::start_with`], the database created with `spec.tls.internalAuth: mode` when
    /// given. In `none` the servers serve plain HTTP with no credential, and no CA is awaited.
    pub async fn start_in(servers: usize, mode: Option<&str>) -> Harness {
        install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .try_init();
        let pg = tokio::task::spawn_blocking(LocalPg::temporary).await.unwrap().expect("throwaway postgres");
        let api = FakeApiServer::start().await;
        api.install_crd(&ShardedDatabase::crd()).unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let admin_url = format!("https://{admin}");
        let pki = OperatorPki::ephemeral(Some(&admin_url));
        let endpoint = operator::k8s::admin::router(api.client(), Images::default(), pki.clone());
        let limits = shard_server::serve::ServeLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
        };
        let tls = pki.admin_tls().server_config();
        tokio::spawn(async move {
            shard_server::serve::serve_migrate(admin_listener, endpoint, limits, tls, std::future::pending())
                .await
                .unwrap()
        });
        let mut h = Harness {
            api,
            admin,
            pg,
            servers: Vec::new(),
            http: shard_server::api::http_client(Duration::from_secs(30)),
            pki,
            ca: None,
            config: None,
            stop: None,
            operator: None,
            registry: None,
        };
        let mut listeners = Vec::new();
        for i in 0..servers {
            let db = format!("server{i}");
            h.pg.create_database(&db).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            h.servers.push(Server { name: format!("Server{i}"), addr, db_url: h.pg.url(&db), process: None });
            listeners.push(listener);
        }
        let urls = h.servers.iter().map(|s| (s.name.clone(), format!("https://{}", s.addr))).collect();
        // Shorter than the defaults (3 s) to keep the test quick, long enough that a probe slowed
        // down by a busy machine is not mistaken for an outage.
        let settings = Settings { failover_after: Duration::from_secs(2), demote_after: Duration::from_secs(2) };
        let config = Config {
            server_urls: Arc::new(LocalUrls(urls)),
            healing: Some(HealSettings { plan: settings, round: Duration::from_millis(200) }),
            admin_url: Some(admin_url),
            ..Config::default()
        };
        h.config = Some(config);
        h.start_operator();

        let mut db = students(3);
        if let Some(mode) = mode {
            db["spec"]["tls"] = json!({ "internalAuth": mode });
        }
        let db: ShardedDatabase = serde_json::from_value(db).unwrap();
        Api::<ShardedDatabase>::namespaced(h.api.client(), NS).create(&PostParams::default(), &db).await.unwrap();
        if mode == Some("none") {
            for (i, l) in listeners.into_iter().enumerate().take(3) {
                h.serve(i, l).await;
            }
            return h;
        }

        // The servers' pods start once their certificates exist, as a pod waits for its Secret.
        assert!(h.api.wait_for(WAIT, |api| secret(api, "students-ca", "ca.key").is_some()).await, "the CA is made");
        let ca_pem = secret(&h.api, "students-ca", "ca.crt").unwrap();
        let ca = Ca::from_pem(&ca_pem, &secret(&h.api, "students-ca", "ca.key").unwrap()).unwrap();
        h.http = credentials(&ca, Identity::operator(students_id()).unwrap()).http_client(Duration::from_secs(30));
        h.ca = Some(ca);
        for (i, l) in listeners.into_iter().enumerate().take(3) {
            h.serve(i, l).await;
        }
        h
    }

    /// A client presenting the routers' certificate, from the Secret the operator made for them,
    /// and checking the admin endpoint against the operator's CA given there: what a router does.
    pub fn router_http(&self) -> reqwest::Client {
        let key = |k: &str| secret(&self.api, "students-router-tls", k).expect("the routers' Secret");
        let pem = Pem { cert: key("tls.crt"), key: key("tls.key"), ca: key("operator-ca.crt") };
        Credentials::Tls(TlsSource::from_pem(pem).unwrap()).http_client(Duration::from_secs(30))
    }

    /// Starts the controller and its healer: a fresh operator process, with nothing in memory.
    pub fn start_operator(&mut self) {
        let mut registry = prometheus_client::registry::Registry::default();
        let config = self.config.clone().expect("configured");
        let ctx = Context::with_pki(self.api.client(), config, Metrics::new(&mut registry), self.pki.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.operator = Some(tokio::spawn(run(ctx, async move {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
        self.registry = Some(registry);
    }

    /// The operator's metrics, in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, self.registry.as_ref().expect("operator started"))
            .unwrap();
        text
    }

    /// Stops the operator gracefully and waits until it has.
    pub async fn stop_operator(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.operator.take() {
            task.await.unwrap();
        }
    }

    /// The internal-auth mode server `i`'s pod runs in: its StatefulSet's pod template's; before
    /// its StatefulSet exists, `strict` once the database's CA is known, else `none`.
    pub fn pod_mode(&self, i: usize) -> InternalAuth {
        let name = operator::k8s::build::names::server_statefulset("students", &self.servers[i].name);
        match self.api.get("statefulsets", NS, &name) {
            Some(sts) => {
                let pod: k8s_openapi::api::core::v1::PodSpec =
                    serde_json::from_value(sts["spec"]["template"]["spec"].clone()).unwrap();
                operator::k8s::internal_auth::template_mode(&pod)
            }
            None if self.ca.is_some() => InternalAuth::Strict,
            None => InternalAuth::None,
        }
    }

    /// Reads the database's CA from `students-ca` (waiting for it), and presents the operator's
    /// certificate for the database from then on.
    pub async fn load_ca(&mut self) {
        assert!(self.api.wait_for(WAIT, |api| secret(api, "students-ca", "ca.key").is_some()).await, "the CA is made");
        let ca_pem = secret(&self.api, "students-ca", "ca.crt").unwrap();
        let ca = Ca::from_pem(&ca_pem, &secret(&self.api, "students-ca", "ca.key").unwrap()).unwrap();
        self.http = credentials(&ca, Identity::operator(students_id()).unwrap()).http_client(WAIT);
        self.ca = Some(ca);
    }

    /// Serves server `i` over its current database, following the topology ConfigMap, in the
    /// mode of its pod ([`Harness::pod_mode`]).
    pub async fn serve(&mut self, i: usize, listener: TcpListener) {
        let mode = self.pod_mode(i);
        if mode != InternalAuth::None && self.ca.is_none() {
            // The pod mounts its certificate, so it starts once the operator has made it.
            self.load_ca().await;
        }
        let s = &self.servers[i];
        let config = NodeConfig {
            name: s.name.clone(),
            peer_timeout: Duration::from_secs(10),
            body_limit: 1 << 20,
            lease: NodeConfig::DEFAULT_LEASE,
            lease_renew: NodeConfig::DEFAULT_LEASE_RENEW,
            cache_rows: NodeConfig::DEFAULT_CACHE_ROWS,
            cache_bytes: NodeConfig::DEFAULT_CACHE_BYTES,
            body_timeout: Duration::from_secs(60),
            credentials: match (&self.ca, mode) {
                // Internal-auth `none`: plain HTTP, anyone accepted.
                (_, InternalAuth::None) => Credentials::Plain,
                (Some(ca), _) => credentials(ca, Identity::new(students_id(), Component::Server, &s.name).unwrap()),
                (None, _) => unreachable!("the CA was loaded"),
            },
            internal_auth: mode,
        };
        let limits = shard_server::serve::ServeLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
        };
        let (db_url, kube_config) = (s.db_url.clone(), self.api.config());
        let listener = listener.into_std().unwrap();
        let (started, started_rx) = tokio::sync::oneshot::channel();
        let process = Process::start(&s.name, async move {
            let listener = TcpListener::from_std(listener).unwrap();
            let db = Db::connect_patiently(&db_url, 8, Duration::from_secs(60)).await.unwrap();
            let topology = watch_configmap(kube::Client::try_from(kube_config).unwrap(), NS, CONFIGMAP);
            let tls = match &config.credentials {
                Credentials::Tls(tls) => Some(tls.server_config()),
                _ => None,
            };
            let node = Node::new(config, db, topology);
            node.start().await.unwrap();
            let app = shard_server::app(node);
            let _ = started.send(());
            match (tls, mode) {
                // TLS and plain HTTP on one port, as `sharddb-shard-server` serves `migrate`.
                (Some(tls), InternalAuth::Migrate) => {
                    shard_server::serve::serve_migrate(listener, app, limits, tls, std::future::pending())
                        .await
                        .unwrap()
                }
                (Some(tls), _) => {
                    let app = app.into_make_service_with_connect_info::<TlsPeer>();
                    axum::serve(TlsListener::new(listener, tls), app).await.unwrap()
                }
                (None, _) => shard_server::serve::serve(listener, app, limits, std::future::pending()).await.unwrap(),
            }
        });
        started_rx.await.expect("the server starts");
        self.servers[i].process = Some(process);
    }

    /// Stops server `i` as its process would stop: every task it started ends (its port stops
    /// answering, it replicates, renews and follows nothing more), its database stays.
    pub async fn kill(&mut self, i: usize) {
        if let Some(p) = self.servers[i].process.take() {
            p.stop().await;
        }
    }

    /// Starts server `i` again on the same port, over a brand-new empty database when
    /// `lose_volume` (a pod rescheduled without its volume).
    pub async fn restart(&mut self, i: usize, lose_volume: bool) {
        if lose_volume {
            let db = format!("server{i}_new");
            self.pg.create_database(&db).unwrap();
            self.servers[i].db_url = self.pg.url(&db);
        }
        let listener = TcpListener::bind(self.servers[i].addr).await.unwrap();
        self.serve(i, listener).await;
    }

    /// Sends an admin verb to the operator's endpoint for `students`, at the control URL the
    /// operator gave the router Deployment: (status, body).
    pub async fn admin(&self, method: reqwest::Method, verb: &str, body: Value) -> (u16, Value) {
        let router = self.api.get("deployments", NS, "students-router").expect("the router Deployment");
        let args = router["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().clone();
        let at = args.iter().position(|a| a == "--control-url").expect("the router has a control URL");
        let control = args[at + 1].as_str().unwrap();
        assert_eq!(control, format!("https://{}/databases/{NS}/students", self.admin));
        self.admin_at(method, &format!("{control}/{verb}"), body).await
    }

    pub async fn admin_at(&self, method: reqwest::Method, url: &str, body: Value) -> (u16, Value) {
        let response = self.router_http().request(method, url).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The resource's spec and generation (which moves with every spec write; the status is
    /// written meanwhile, so the resourceVersion may move on its own).
    pub fn resource(&self) -> (Value, Value) {
        let db = self.api.get("shardeddatabases", NS, "students").unwrap();
        (db["spec"].clone(), db["metadata"]["generation"].clone())
    }

    /// Asserts every ready copy of every shard holds the same rows (count and checksum), and
    /// returns the row count of each shard.
    pub async fn assert_ready_copies_equal(&self) -> BTreeMap<String, i64> {
        let t = self.topology().unwrap();
        let mut rows = BTreeMap::new();
        for shard in &t.shards {
            let primary = self.index(&shard.primary);
            let want = self.contents(primary, &shard.id).await;
            for ready in shard.ready_replicas() {
                let got = self.contents(self.index(ready), &shard.id).await;
                assert_eq!(got, want, "{} on {ready} equals the primary {}", shard.id, shard.primary);
            }
            rows.insert(shard.id.clone(), want.0);
        }
        rows
    }

    pub fn index(&self, server: &str) -> usize {
        self.servers.iter().position(|s| s.name == server).unwrap()
    }

    /// A client for server `i`, at the scheme the published document lists it with (before one
    /// is published: TLS once there is a CA).
    pub fn client(&self, i: usize) -> ShardClient {
        let listed = self.topology().and_then(|t| t.servers.get(&self.servers[i].name).map(|s| s.url.clone()));
        let plain = listed.map_or(self.ca.is_none(), |url| url.starts_with("http://"));
        let scheme = if plain { "http" } else { "https" };
        ShardClient::new(self.http.clone(), format!("{scheme}://{}", self.servers[i].addr))
    }

    pub fn topology(&self) -> Option<Topology> {
        let cm = self.api.get("configmaps", NS, CONFIGMAP)?;
        Topology::parse(cm["data"]["topology.json"].as_str()?.as_bytes()).ok()
    }

    pub fn status(&self) -> Value {
        self.api.get("shardeddatabases", NS, "students").map(|d| d["status"].clone()).unwrap_or(Value::Null)
    }

    pub fn condition(&self, type_: &str) -> Option<(String, String)> {
        let status = self.status();
        let c = status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
        Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
    }

    pub fn shard_status(&self, shard: &str) -> Value {
        let status = self.status();
        status["shards"].as_array().and_then(|a| a.iter().find(|s| s["id"] == shard).cloned()).unwrap_or(Value::Null)
    }

    pub fn events(&self, reason: &str) -> Vec<String> {
        self.api
            .list("events.events.k8s.io", NS)
            .iter()
            .filter(|e| e["reason"] == reason && e["regarding"]["name"] == "students")
            .filter_map(|e| e["note"].as_str().map(str::to_owned))
            .collect()
    }

    /// Plays the kubelet and the workload controllers: every StatefulSet and Deployment is ready.
    pub fn mark_workloads_ready(&self) {
        mark_workloads_ready(&self.api);
    }

    /// Waits for the first rollout: every copy's identity recorded and the database Ready.
    pub async fn wait_ready(&self) {
        let started = Instant::now();
        assert!(self.api.wait_for(WAIT, |_| self.topology().is_some()).await, "topology published");
        let built =
            |api: &FakeApiServer| api.list("statefulsets", NS).len() == 3 && api.list("deployments", NS).len() == 1;
        assert!(self.api.wait_for(WAIT, built).await, "workloads built");
        self.mark_workloads_ready();
        let recorded = |t: &Topology| t.shards.iter().all(|s| s.copies.len() == s.replicas.len());
        assert!(self.api.wait_for(WAIT, |_| self.topology().is_some_and(|t| recorded(&t))).await, "copies recorded");
        assert!(
            self.api.wait_for(WAIT, |_| self.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
            "ready: {}",
            self.status()
        );
        // The status is the operator's view; each server follows the ConfigMap through its own
        // watch, a moment later. A write sent before a replica has the document that made it
        // ready is refused by that replica, and its primary answers 503.
        let epoch = self.topology().expect("published").epoch;
        for i in 0..self.servers.len() {
            if self.servers[i].process.is_none() {
                continue;
            }
            let client = self.client(i);
            let mut followed = false;
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if client.status(false).await.is_ok_and(|s| s.epoch >= epoch) {
                    followed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(followed, "{} follows the topology of epoch {epoch}", self.servers[i].name);
        }
        println!("rollout: ready after {:?}", started.elapsed());
    }

    /// Writes rows `keys` through the shard's primary server `i`.
    pub async fn write(&self, i: usize, shard: &str, keys: std::ops::Range<i64>) {
        let ops = keys
            .map(|k| Op::Insert { row: Row(vec![Cell::Int(k), Cell::Text(format!("n{k}")), Cell::Int(k % 100)]) })
            .collect();
        self.client(i).write(shard, &WriteRequest { epoch: None, ops, dry_run: false }).await.unwrap();
    }

    /// The keys of `shard` stored in server `i`'s database, read from Postgres itself.
    pub async fn stored_keys(&self, i: usize, shard: &str) -> std::collections::BTreeSet<i64> {
        let pool = sqlx::PgPool::connect(&self.servers[i].db_url).await.unwrap();
        let keys: Vec<i64> =
            // `shard` is one of the test's own shard ids.
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT \"Stud_id\"::bigint FROM \"shard_{shard}\"")))
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        keys.into_iter().collect()
    }

    /// The keys in `acked` that `shard`'s primary does not hold (`range`: the shard's keys).
    pub async fn missing(&self, shard: &str, range: std::ops::Range<i64>, acked: &[i64]) -> Vec<i64> {
        let t = self.topology().unwrap();
        let stored = self.stored_keys(self.index(&t.shard(shard).unwrap().primary), shard).await;
        acked.iter().filter(|k| range.contains(*k) && !stored.contains(*k)).copied().collect()
    }

    /// (rows, checksum) of `shard` on server `i`.
    pub async fn contents(&self, i: usize, shard: &str) -> (i64, Option<String>) {
        let s = &self.client(i).status(true).await.unwrap().shards[shard];
        (s.rows, s.checksum.clone())
    }
}

/// Plays the kubelet and the workload controllers: every StatefulSet and Deployment in `api`
/// is ready.
pub fn mark_workloads_ready(api: &FakeApiServer) {
    for kind in ["statefulsets", "deployments"] {
        for mut o in api.list(kind, NS) {
            let replicas = o["spec"]["replicas"].clone();
            o["status"] = json!({ "replicas": replicas, "readyReplicas": replicas });
            api.upsert(o).unwrap();
        }
    }
}

/// The identity of the `students` database.
pub fn students_id() -> DatabaseId {
    DatabaseId::new(NS, "students")
}

/// A Secret's key, decoded.
pub fn secret(api: &FakeApiServer, name: &str, key: &str) -> Option<String> {
    let o = api.get("secrets", NS, name)?;
    let bytes: k8s_openapi::ByteString = serde_json::from_value(o["data"][key].clone()).ok()?;
    String::from_utf8(bytes.0).ok()
}

/// Credentials of `identity` from the database's CA, serving on the loopback address (the test's
/// servers are reached at 127.0.0.1 rather than their pods' DNS names).
pub fn credentials(ca: &Ca, identity: Identity) -> Credentials {
    let issued = ca.issue(&LeafRequest::new(identity).on_loopback(), std::time::SystemTime::now()).unwrap();
    let pem = Pem { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() };
    Credentials::Tls(TlsSource::from_pem(pem).unwrap())
}

/// The `students` database of the seed's schema: two shards of 4096 keys, two copies each, on
/// `servers` servers.
pub fn students(servers: u32) -> Value {
    json!({
        "apiVersion": "sharddb.io/v1alpha1",
        "kind": "ShardedDatabase",
        "metadata": { "name": "students", "namespace": NS },
        "spec": {
            "schema": { "columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"] },
            "shards": [
                { "id": "sh1", "low": 0, "size": 4096 },
                { "id": "sh2", "low": 4096, "size": 4096 }
            ],
            "replicas": 2,
            "servers": servers
        }
    })
}

pub fn state(t: &Topology, shard: &str, server: &str) -> Option<String> {
    let state = t.shard(shard)?.replicas.get(server)?;
    Some(serde_json::to_value(state).ok()?.as_str()?.to_owned())
}

/// The real `Controller` alone, without the healer and without servers, against a fresh fake
/// API server: what the reconcile and identities tests drive. Stopped on drop.
pub struct Reconciler {
    pub server: FakeApiServer,
    pub ctx: Arc<Context>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Reconciler {
    /// Starts the controller with `config`, healing off: no servers run here, so nothing could
    /// be probed (the healer is tested with real servers through [`Harness`]).
    pub async fn start(config: Config) -> Reconciler {
        let server = FakeApiServer::start().await;
        server.install_crd(&ShardedDatabase::crd()).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let config = Config { healing: None, ..config };
        let ctx = Context::new(server.client(), config, Metrics::new(&mut registry));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(run(ctx.clone(), async move {
            let _ = stopped.await;
        }));
        Reconciler { server, ctx, stop: Some(stop) }
    }
}
