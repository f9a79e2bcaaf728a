//! The Kubernetes body of the healer: the real `Controller` and healer against the in-process fake
//! API server, and real shard servers (in-process, over a throwaway Postgres) that follow the
//! topology ConfigMap through a watch on that API. The servers are reached at local addresses
//! through the injectable `ServerUrls`, as they would be at their headless-Service names.
//!
//! Database `students`: shards sh1 (primary Server0, copy on Server1) and sh2 (primary Server2,
//! copy on Server0), per the count-mode placement of 2 shards × 2 replicas on 3 servers.
//!
//! The admin verbs go through the operator's admin endpoint (`k8s::admin`), served here over TLS
//! as in `sharddb-operator run`, with the router certificate the operator put in the routers'
//! Secret; the spec changes they make are carried out by the healer's moves. Servers present
//! certificates of the database's CA (the one the operator made in `students-ca`), and the
//! healer reaches them with its own certificate for the database, as in a cluster.

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
use shard_server::tls::{Component, Credentials, DatabaseId, Identity, TlsListener, TlsPeer, TlsSource};
use shard_server::topology::Topology;
use shard_server::topology_source::watch_configmap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Generous: it bounds a failure, not a success, and the machine may be busy.
const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "default";
const CONFIGMAP: &str = "students-topology";

/// Servers at local addresses instead of DNS names.
#[derive(Debug)]
struct LocalUrls(BTreeMap<String, String>);

impl ServerUrls for LocalUrls {
    fn url(&self, _db: &str, _namespace: &str, server: &str) -> String {
        self.0.get(server).cloned().unwrap_or_else(|| "https://127.0.0.1:9".into())
    }
}

struct Server {
    name: String,
    addr: SocketAddr,
    db_url: String,
    task: Option<JoinHandle<()>>,
}

struct Harness {
    api: FakeApiServer,
    /// The operator's admin endpoint.
    admin: SocketAddr,
    pg: LocalPg,
    servers: Vec<Server>,
    /// Presents a certificate of the operator for the database: what the servers answer.
    http: reqwest::Client,
    /// The operator's CA, kept across operator restarts as its Secret would keep it.
    pki: Arc<OperatorPki>,
    /// The database's CA, as the operator made it in `students-ca`.
    ca: Option<Ca>,
    config: Option<Config>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for s in &mut self.servers {
            if let Some(t) = s.task.take() {
                t.abort();
            }
        }
    }
}

impl Harness {
    /// Three servers, the controller and healer with short timeouts, and the database created.
    async fn start() -> Harness {
        Harness::start_with(3).await
    }

    /// As [`Harness::start`], with `servers` servers (`Server0`…) known by address, of which
    /// only the spec's three are served: the others play pods yet to be created, started later
    /// with [`Harness::restart`].
    async fn start_with(servers: usize) -> Harness {
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
        let endpoint = operator::k8s::admin::router(api.client(), Images::default())
            .into_make_service_with_connect_info::<TlsPeer>();
        let admin_listener = TlsListener::new(admin_listener, pki.admin_tls().server_config());
        tokio::spawn(async move { axum::serve(admin_listener, endpoint).await.unwrap() });
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
        };
        let mut listeners = Vec::new();
        for i in 0..servers {
            let db = format!("server{i}");
            h.pg.create_database(&db).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            h.servers.push(Server { name: format!("Server{i}"), addr, db_url: h.pg.url(&db), task: None });
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

        let db: ShardedDatabase = serde_json::from_value(json!({
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
                "servers": 3
            }
        }))
        .unwrap();
        Api::<ShardedDatabase>::namespaced(h.api.client(), NS).create(&PostParams::default(), &db).await.unwrap();

        // The servers' pods start once their certificates exist, as a pod waits for its Secret.
        assert!(h.api.wait_for(WAIT, |api| secret(api, "students-ca", "ca.key").is_some()).await, "the CA is made");
        let ca_pem = secret(&h.api, "students-ca", "ca.crt").unwrap();
        let ca = Ca::from_pem(&ca_pem, &secret(&h.api, "students-ca", "ca.key").unwrap()).unwrap();
        h.http = credentials(&ca, Identity::operator(students()).unwrap()).http_client(Duration::from_secs(30));
        h.ca = Some(ca);
        for (i, l) in listeners.into_iter().enumerate().take(3) {
            h.serve(i, l).await;
        }
        h
    }

    /// A client presenting the routers' certificate, from the Secret the operator made for them,
    /// and checking the admin endpoint against the operator's CA given there: what a router does.
    fn router_http(&self) -> reqwest::Client {
        let key = |k: &str| secret(&self.api, "students-router-tls", k).expect("the routers' Secret");
        let pem = Pem { cert: key("tls.crt"), key: key("tls.key"), ca: key("operator-ca.crt") };
        Credentials::Tls(TlsSource::from_pem(pem).unwrap()).http_client(Duration::from_secs(30))
    }

    /// Starts the controller and its healer: a fresh operator process, with nothing in memory.
    fn start_operator(&mut self) {
        let mut registry = prometheus_client::registry::Registry::default();
        let config = self.config.clone().expect("configured");
        let ctx = Context::with_pki(self.api.client(), config, Metrics::new(&mut registry), self.pki.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.operator = Some(tokio::spawn(run(ctx, async move {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
    }

    /// Stops the operator gracefully and waits until it has.
    async fn stop_operator(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.operator.take() {
            task.await.unwrap();
        }
    }

    /// Serves server `i` over its current database, following the topology ConfigMap.
    async fn serve(&mut self, i: usize, listener: TcpListener) {
        let s = &mut self.servers[i];
        let db = Db::connect_patiently(&s.db_url, 8, Duration::from_secs(60)).await.unwrap();
        let config = NodeConfig {
            name: s.name.clone(),
            peer_timeout: Duration::from_secs(10),
            body_limit: 1 << 20,
            lease: NodeConfig::DEFAULT_LEASE,
            lease_renew: NodeConfig::DEFAULT_LEASE_RENEW,
            cache_rows: NodeConfig::DEFAULT_CACHE_ROWS,
            cache_bytes: NodeConfig::DEFAULT_CACHE_BYTES,
            body_timeout: Duration::from_secs(60),
            credentials: credentials(
                self.ca.as_ref().expect("the database's CA"),
                Identity::new(students(), Component::Server, &s.name).unwrap(),
            ),
        };
        let Credentials::Tls(tls) = &config.credentials else { unreachable!() };
        let listener = TlsListener::new(listener, tls.server_config());
        let node = Node::new(config, db, watch_configmap(self.api.client(), NS, CONFIGMAP));
        node.start().await.unwrap();
        let app = shard_server::app(node).into_make_service_with_connect_info::<TlsPeer>();
        s.task = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
    }

    /// Stops server `i`: its port stops answering, its database stays.
    async fn kill(&mut self, i: usize) {
        if let Some(t) = self.servers[i].task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Starts server `i` again on the same port, over a brand-new empty database when
    /// `lose_volume` (a pod rescheduled without its volume).
    async fn restart(&mut self, i: usize, lose_volume: bool) {
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
    async fn admin(&self, method: reqwest::Method, verb: &str, body: Value) -> (u16, Value) {
        let router = self.api.get("deployments", NS, "students-router").expect("the router Deployment");
        let args = router["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().clone();
        let at = args.iter().position(|a| a == "--control-url").expect("the router has a control URL");
        let control = args[at + 1].as_str().unwrap();
        assert_eq!(control, format!("https://{}/databases/{NS}/students", self.admin));
        self.admin_at(method, &format!("{control}/{verb}"), body).await
    }

    async fn admin_at(&self, method: reqwest::Method, url: &str, body: Value) -> (u16, Value) {
        let response = self.router_http().request(method, url).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The resource's spec and generation (which moves with every spec write; the status is
    /// written meanwhile, so the resourceVersion may move on its own).
    fn resource(&self) -> (Value, Value) {
        let db = self.api.get("shardeddatabases", NS, "students").unwrap();
        (db["spec"].clone(), db["metadata"]["generation"].clone())
    }

    /// Asserts every ready copy of every shard holds the same rows (count and checksum), and
    /// returns the row count of each shard.
    async fn assert_ready_copies_equal(&self) -> BTreeMap<String, i64> {
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

    fn index(&self, server: &str) -> usize {
        self.servers.iter().position(|s| s.name == server).unwrap()
    }

    fn client(&self, i: usize) -> ShardClient {
        ShardClient::new(self.http.clone(), format!("https://{}", self.servers[i].addr))
    }

    fn topology(&self) -> Option<Topology> {
        let cm = self.api.get("configmaps", NS, CONFIGMAP)?;
        Topology::parse(cm["data"]["topology.json"].as_str()?.as_bytes()).ok()
    }

    fn status(&self) -> Value {
        self.api.get("shardeddatabases", NS, "students").map(|d| d["status"].clone()).unwrap_or(Value::Null)
    }

    fn condition(&self, type_: &str) -> Option<(String, String)> {
        let status = self.status();
        let c = status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
        Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
    }

    fn shard_status(&self, shard: &str) -> Value {
        let status = self.status();
        status["shards"].as_array().and_then(|a| a.iter().find(|s| s["id"] == shard).cloned()).unwrap_or(Value::Null)
    }

    fn events(&self, reason: &str) -> Vec<String> {
        self.api
            .list("events.events.k8s.io", NS)
            .iter()
            .filter(|e| e["reason"] == reason && e["regarding"]["name"] == "students")
            .filter_map(|e| e["note"].as_str().map(str::to_owned))
            .collect()
    }

    /// Plays the kubelet and the workload controllers: every StatefulSet and Deployment is ready.
    fn mark_workloads_ready(&self) {
        for kind in ["statefulsets", "deployments"] {
            for mut o in self.api.list(kind, NS) {
                let replicas = o["spec"]["replicas"].clone();
                o["status"] = json!({ "replicas": replicas, "readyReplicas": replicas });
                self.api.upsert(o).unwrap();
            }
        }
    }

    /// Waits for the first rollout: every copy's identity recorded and the database Ready.
    async fn wait_ready(&self) {
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
        println!("rollout: ready after {:?}", started.elapsed());
    }

    /// Writes rows `keys` through the shard's primary server `i`.
    async fn write(&self, i: usize, shard: &str, keys: std::ops::Range<i64>) {
        let ops = keys
            .map(|k| Op::Insert { row: Row(vec![Cell::Int(k), Cell::Text(format!("n{k}")), Cell::Int(k % 100)]) })
            .collect();
        self.client(i).write(shard, &WriteRequest { epoch: None, ops, dry_run: false }).await.unwrap();
    }

    /// (rows, checksum) of `shard` on server `i`.
    async fn contents(&self, i: usize, shard: &str) -> (i64, Option<String>) {
        let s = &self.client(i).status(true).await.unwrap().shards[shard];
        (s.rows, s.checksum.clone())
    }
}

fn students() -> DatabaseId {
    DatabaseId::new(NS, "students")
}

/// A Secret's key, decoded.
fn secret(api: &FakeApiServer, name: &str, key: &str) -> Option<String> {
    let o = api.get("secrets", NS, name)?;
    let bytes: k8s_openapi::ByteString = serde_json::from_value(o["data"][key].clone()).ok()?;
    String::from_utf8(bytes.0).ok()
}

/// Credentials of `identity` from the database's CA, serving on the loopback address (the test's
/// servers are reached at 127.0.0.1 rather than their pods' DNS names).
fn credentials(ca: &Ca, identity: Identity) -> Credentials {
    let issued = ca.issue(&LeafRequest::new(identity).on_loopback(), std::time::SystemTime::now()).unwrap();
    let pem = Pem { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() };
    Credentials::Tls(TlsSource::from_pem(pem).unwrap())
}

fn state(t: &Topology, shard: &str, server: &str) -> Option<String> {
    let state = t.shard(shard)?.replicas.get(server)?;
    Some(serde_json::to_value(state).ok()?.as_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_volume_heals_back_to_ready_and_a_quiet_cluster_is_left_alone() {
    let mut h = Harness::start().await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..50).await;
    let before = h.topology().unwrap();
    let old_copy = before.shard("sh1").unwrap().copies["Server1"].clone();

    // Nothing changes: several healer rounds and a forced reconcile later, nothing was written to
    // the ConfigMap.
    h.api.clear_writes();
    let mut db = h.api.get("shardeddatabases", NS, "students").unwrap();
    db["metadata"]["annotations"] = json!({ "poke": "1" });
    h.api.upsert(db).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rewrites: Vec<_> = h.api.writes().into_iter().filter(|w| w.changed && w.resource == "configmaps").collect();
    assert!(rewrites.is_empty(), "the topology is not rewritten when nothing changed: {rewrites:?}");
    assert_eq!(h.topology(), Some(before.clone()));

    // Server1 comes back empty, as a pod rescheduled without its volume.
    let lost = Instant::now();
    h.kill(1).await;
    h.restart(1, true).await;
    let healed = |t: &Topology| {
        let sh1 = t.shard("sh1").unwrap();
        state(t, "sh1", "Server1").as_deref() == Some("ready") && sh1.copies.get("Server1") != Some(&old_copy)
    };
    assert!(
        h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| healed(&t))).await,
        "Server1's copy of sh1 recovered and ready again: {:?}",
        h.topology()
    );
    println!("lost volume: ready again after {:?}", lost.elapsed());
    let after = h.topology().unwrap();
    assert!(after.epoch >= before.epoch + 2, "demoted, then ready: {} → {}", before.epoch, after.epoch);
    assert_eq!(after.shard("sh1").unwrap().primary, "Server0", "the primary stayed");
    assert_eq!(h.contents(1, "sh1").await, h.contents(0, "sh1").await, "the recovered copy equals the primary's");
    assert_eq!(h.contents(1, "sh1").await.0, 50);
    let demoted = |h: &Harness| h.events("Demoted").iter().any(|n| n.contains("sh1 on Server1 lost its data"));
    assert!(h.api.wait_for(WAIT, |_| demoted(&h)).await, "{:?}", h.events("Demoted"));
    let ready = |h: &Harness| h.events("ReplicaReady").iter().any(|n| n.contains("sh1 on Server1 is ready"));
    assert!(h.api.wait_for(WAIT, |_| ready(&h)).await, "{:?}", h.events("ReplicaReady"));
    // The status follows the ConfigMap a reconcile later: wait for the one of this topology (an
    // AllReady from before the volume was lost would satisfy the condition alone).
    let current = |h: &Harness| {
        h.condition("Ready") == Some(("True".into(), "AllReady".into()))
            && h.status()["topologyEpoch"] == json!(after.epoch)
    };
    assert!(h.api.wait_for(WAIT, |_| current(&h)).await, "ready again: {}", h.status());
    assert_eq!(h.shard_status("sh1")["readyReplicas"], json!(["Server0", "Server1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_is_gone_fails_over_and_the_status_shows_the_degraded_shard() {
    let mut h = Harness::start().await;
    h.wait_ready().await;
    h.write(2, "sh2", 4096..4146).await;
    let before = h.topology().unwrap();
    assert_eq!(before.shard("sh2").unwrap().primary, "Server2");

    let gone = Instant::now();
    h.kill(2).await;
    let failed_over = |t: &Topology| t.shard("sh2").is_some_and(|s| s.primary == "Server0");
    assert!(h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| failed_over(&t))).await, "Server0 promoted");
    println!("failover: new primary after {:?}", gone.elapsed());
    let after = h.topology().unwrap();
    assert!(after.epoch > before.epoch, "epoch bumped: {} → {}", before.epoch, after.epoch);
    assert_eq!(state(&after, "sh2", "Server2").as_deref(), Some("recovering"), "the old primary must start over");
    assert_eq!(after.shard("sh1"), before.shard("sh1"), "sh1 did not involve Server2");
    let promoted = |h: &Harness| {
        h.events("Promoted").iter().any(|n| n.contains("Server0 is the primary of sh2, replacing Server2"))
    };
    assert!(h.api.wait_for(WAIT, |_| promoted(&h)).await, "{:?}", h.events("Promoted"));

    // The status shows the degraded shard while Server2 is away.
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Degraded") == Some(("True".into(), "CopiesRecovering".into()))).await,
        "degraded: {}",
        h.status()
    );
    assert!(h.api.wait_for(WAIT, |_| h.shard_status("sh2")["primary"] == "Server0").await, "{}", h.status());
    let sh2 = h.shard_status("sh2");
    assert_eq!(sh2["readyReplicas"], json!(["Server0"]));
    assert_eq!(sh2["recoveringReplicas"], json!(["Server2"]));
    assert_eq!(h.condition("Ready"), Some(("False".into(), "ServersNotReady".into())), "{}", h.status());
    let message =
        h.status()["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap()["message"]
            .clone();
    assert!(message.as_str().unwrap().contains("unreachable: Server2"), "{message}");
    assert!(message.as_str().unwrap().contains("recovering: sh2 on Server2"), "{message}");

    // Acknowledged writes survived on the new primary, which takes new ones.
    assert_eq!(h.contents(0, "sh2").await.0, 50);
    h.write(0, "sh2", 4146..4150).await;

    // The operator restarts while the old primary is away; the new one knows nothing but the
    // ConfigMap. The old primary comes back with its data, and is recovered from the new primary
    // all the same.
    h.stop_operator().await;
    h.start_operator();
    h.restart(2, false).await;
    assert!(
        h.api
            .wait_for(WAIT, |_| h.topology().is_some_and(|t| state(&t, "sh2", "Server2").as_deref() == Some("ready")))
            .await,
        "Server2 ready again"
    );
    println!("failover: old primary ready again after {:?}", gone.elapsed());
    assert_eq!(h.topology().unwrap().shard("sh2").unwrap().primary, "Server0", "no flapping back");
    assert_eq!(h.contents(2, "sh2").await, h.contents(0, "sh2").await);
    assert_eq!(h.contents(2, "sh2").await.0, 54);
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready again: {}",
        h.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_through_the_admin_endpoint_changes_the_resource_and_fills_the_new_server_from_replicas() {
    let mut h = Harness::start_with(4).await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;

    let added = Instant::now();
    let body = json!({ "n": 1, "new_shards": [], "servers": { "Server3": ["sh1", "sh2"] } });
    let (status, answer) = h.admin(reqwest::Method::POST, "add", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "N": 4, "message": "Add Server:3", "status": "successful" }));
    let (spec, _) = h.resource();
    assert_eq!(spec["servers"], 4);
    assert_eq!(spec["placement"]["Server3"], json!(["sh1", "sh2"]), "{spec}");

    assert!(
        h.api.wait_for(WAIT, |api| api.get("statefulsets", NS, "students-server3").is_some()).await,
        "the new server's pod is asked for"
    );
    // Its pod is not up yet: several healer rounds later it has been given nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.topology().unwrap().servers.contains_key("Server3"), "Server3 joins only once it answers");
    assert!(h.events("RecoverFailed").is_empty(), "{:?}", h.events("RecoverFailed"));
    h.restart(3, false).await;
    h.mark_workloads_ready();
    let filled = |t: &Topology| {
        state(t, "sh1", "Server3").as_deref() == Some("ready") && state(t, "sh2", "Server3").as_deref() == Some("ready")
    };
    assert!(
        h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| filled(&t))).await,
        "Server3 holds ready copies of sh1 and sh2: {:?}",
        h.topology()
    );
    println!("add: Server3 filled after {:?}", added.elapsed());
    let t = h.topology().unwrap();
    assert_eq!(t.shard("sh1").unwrap().primary, "Server0", "no needless handover");
    assert_eq!(t.shard("sh2").unwrap().primary, "Server2");
    let rows = h.assert_ready_copies_equal().await;
    assert_eq!(rows, BTreeMap::from([("sh1".to_owned(), 40), ("sh2".to_owned(), 30)]));
    let joined = |h: &Harness| h.events("ReplicaAdded").iter().any(|n| n.contains("sh1 gets a copy on Server3"));
    assert!(h.api.wait_for(WAIT, |_| joined(&h)).await, "{:?}", h.events("ReplicaAdded"));
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready with four servers: {}",
        h.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_drains_a_server_before_its_statefulset_goes_and_refused_requests_change_nothing() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;

    // Refused requests answer 4xx and leave the resource as it was.
    let before = h.resource();
    assert!(before.1.is_number(), "the resource has a generation");
    let refused = [
        (reqwest::Method::DELETE, "rm", json!({ "n": 1, "servers": ["Server9"] }), 400, "unknown server Server9"),
        (reqwest::Method::DELETE, "rm", json!({ "n": 3, "servers": [] }), 400, "last replica"),
        (reqwest::Method::DELETE, "rm", json!({ "n": 0, "servers": ["Server1"] }), 400, "more than removable"),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 2, "new_shards": [], "servers": { "Server5": ["sh1"] } }),
            400,
            "greater than",
        ),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 1, "new_shards": [], "servers": { "Server1": ["sh1"] } }),
            400,
            "already exists",
        ),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 1, "new_shards": [], "servers": { "Server5": ["sh9"] } }),
            400,
            "sh9",
        ),
    ];
    for (method, verb, body, code, says) in refused {
        let (status, answer) = h.admin(method, verb, body.clone()).await;
        assert_eq!(status, code, "{verb} {body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(says), "{verb} {body}: {answer}");
        assert_eq!(h.resource(), before, "{verb} {body} changed nothing");
    }
    let init = json!({ "n": 1, "schema": { "columns": ["a"], "dtypes": ["Number"] }, "shards": [], "servers": null });
    let (status, answer) = h.admin(reqwest::Method::POST, "init", init).await;
    assert_eq!(status, 409, "the resource is the configuration: {answer}");
    assert_eq!(h.resource(), before);
    // A database's router speaks for that database alone.
    let elsewhere = format!("https://{}/databases/{NS}/nosuch/rm", h.admin);
    let (status, answer) = h.admin_at(reqwest::Method::DELETE, &elsewhere, json!({ "n": 1, "servers": [] })).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("only the routers of default/nosuch"), "{answer}");

    // Server2 is sh2's primary: its copy moves to Server1 and the primary hands over first.
    let removed = Instant::now();
    let (status, answer) = h.admin(reqwest::Method::DELETE, "rm", json!({ "n": 1, "servers": ["Server2"] })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "message": { "N": 2, "servers": ["Server2"] }, "status": "successful" }));
    assert!(h.resource().0["placement"].get("Server2").is_none());

    // Until the StatefulSet is gone: whenever Server2 is in the topology its StatefulSet exists,
    // and every shard keeps a ready primary.
    let mut observed = 0;
    loop {
        let sts = h.api.get("statefulsets", NS, "students-server2").is_some();
        let t = h.topology().unwrap();
        for shard in &t.shards {
            assert_eq!(
                shard.replicas.get(&shard.primary).and_then(|s| serde_json::to_value(s).ok()),
                Some(json!("ready")),
                "{} keeps a ready primary (epoch {}): {shard:?}",
                shard.id,
                t.epoch
            );
        }
        if t.servers.contains_key("Server2") {
            assert!(sts, "Server2's StatefulSet stays while it is in the topology (epoch {})", t.epoch);
        } else if !sts {
            break;
        }
        observed += 1;
        assert!(removed.elapsed() < WAIT, "Server2 drained and removed: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rm: Server2 drained and its StatefulSet deleted after {:?} ({observed} looks)", removed.elapsed());
    let t = h.topology().unwrap();
    assert!(!t.servers.contains_key("Server2"));
    let sh2 = t.shard("sh2").unwrap();
    assert_ne!(sh2.primary, "Server2");
    assert_eq!(sh2.replicas.keys().collect::<Vec<_>>(), ["Server0", "Server1"]);
    let rows = h.assert_ready_copies_equal().await;
    assert_eq!(rows, BTreeMap::from([("sh1".to_owned(), 40), ("sh2".to_owned(), 30)]), "no write lost");
    let drained = |h: &Harness| h.events("ServerDrained").iter().any(|n| n.contains("Server2 holds nothing"));
    assert!(h.api.wait_for(WAIT, |_| drained(&h)).await, "{:?}", h.events("ServerDrained"));
    h.mark_workloads_ready();
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready with two servers: {}",
        h.status()
    );
}

/// The operator's admin endpoint answers the routers of the database named in the path alone:
/// no certificate, another component's, another database's (even under the same CA) or another
/// CA's are refused, and the resource is unchanged; the database's router is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_answers_only_the_routers_of_the_database_in_its_path() {
    let h = Harness::start().await;
    assert!(h.api.wait_for(WAIT, |api| secret(api, "students-router-tls", "tls.crt").is_some()).await);
    let before = h.resource();
    let url = format!("https://{}/databases/{NS}/students/add", h.admin);
    let body = json!({ "n": 1, "new_shards": [], "servers": { "Server3": ["sh1"] } });
    let operator_ca = secret(&h.api, "students-router-tls", "operator-ca.crt").unwrap();
    let ca = h.ca.as_ref().unwrap();
    // A client presenting `identity` signed by `signer`, trusting the admin endpoint's CA.
    let client = |signer: &Ca, identity: Identity| {
        let issued = signer.issue(&LeafRequest::new(identity), std::time::SystemTime::now()).unwrap();
        let pem = Pem { cert: issued.cert_pem, key: issued.key_pem, ca: operator_ca.clone() };
        Credentials::Tls(TlsSource::from_pem(pem).unwrap()).http_client(Duration::from_secs(10))
    };
    let attempt = |http: reqwest::Client| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            match http.post(url).json(&body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    Some((status, body["code"].as_str().map(str::to_owned)))
                }
                Err(_) => None,
            }
        }
    };
    // Trusts the endpoint, presents nothing.
    let anonymous = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(operator_ca.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        reqwest::Client::builder().tls_backend_preconfigured(config).build().unwrap()
    };
    assert_eq!(attempt(anonymous).await, Some((401, Some("unauthenticated".into()))));
    let forbidden = Some((403, Some("forbidden".into())));
    let server = Identity::server(students(), "Server0").unwrap();
    assert_eq!(attempt(client(ca, server)).await, forbidden, "a server of the database");
    let teachers = Identity::router(DatabaseId::new(NS, "teachers")).unwrap();
    assert_eq!(attempt(client(ca, teachers)).await, forbidden, "another database's router, same CA");
    let elsewhere = Identity::router(DatabaseId::new("other", "students")).unwrap();
    assert_eq!(attempt(client(ca, elsewhere)).await, forbidden, "a namesake in another namespace");
    let stranger =
        Ca::generate("stranger", std::time::SystemTime::now(), shard_server::tls::issue::CA_VALIDITY).unwrap();
    assert_eq!(
        attempt(client(&stranger, Identity::router(students()).unwrap())).await,
        None,
        "another CA's certificate gets no handshake"
    );
    assert_eq!(h.resource(), before, "nothing changed");

    // The routers' own certificate is answered.
    assert_eq!(attempt(h.router_http()).await.map(|a| a.0), Some(200));
    assert_eq!(h.resource().0["servers"], 4);
}
