//! Test harness: shard servers served in-process on real TCP ports, each over its own database in
//! one throwaway Postgres cluster, each following its own topology file (so a test can let one
//! server lag behind a topology change, as a slow ConfigMap watch would). They serve mutual TLS
//! under a CA of the test (`pki`), each with its own certificate, as in production; the test
//! speaks to them with the operator's certificate unless it asks for another.

#![allow(dead_code)]

use localpg::LocalPg;
use shard_server::api::{PrimaryLeaseRequest, ShardClient, install_crypto_provider};
use shard_server::db::Db;
use shard_server::node::{Node, NodeConfig};
use shard_server::schema::{DType, SchemaSpec};
use shard_server::serve::{ServeLimits, serve_migrate, serve_tls};
use shard_server::tls::testing::TestPki;
use shard_server::tls::{Component, Credentials, Identity, InternalAuth};
use shard_server::topology::{ReplicaState, ServerEntry, ShardEntry, TOPOLOGY_VERSION, Topology};
use shard_server::topology_source::{watch_file, write_atomic};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The limits of the production defaults, with a connection cap fit for tests.
pub fn test_limits() -> ServeLimits {
    ServeLimits {
        header_timeout: ServeLimits::DEFAULT_HEADER_TIMEOUT,
        body_timeout: ServeLimits::DEFAULT_BODY_TIMEOUT,
        idle_timeout: ServeLimits::DEFAULT_IDLE_TIMEOUT,
        max_connections: 1024,
    }
}

pub struct Cluster {
    pub pg: LocalPg,
    pub dir: tempfile::TempDir,
    pub topology: Topology,
    /// Read lease and renewal interval of every server (restarts included).
    pub lease: (Duration, Duration),
    /// Row cache budget of every server (restarts included).
    pub cache_rows: usize,
    /// The HTTP limits every server is served with (restarts included).
    pub serve_limits: ServeLimits,
    /// How servers (re)started from now on authenticate internal callers (default `strict`).
    pub internal_auth: InternalAuth,
    pub servers: Vec<Server>,
    /// The operator's client: accepted by every internal endpoint.
    pub http: reqwest::Client,
    /// The database's CA.
    pub pki: TestPki,
    /// Whether the harness keeps granting primary leases (a test of their running out turns it off).
    pub granting: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Server {
    pub name: String,
    pub topology_path: PathBuf,
    pub addr: std::net::SocketAddr,
    pub db_url: String,
    pub node: Option<Arc<Node>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

pub fn students() -> SchemaSpec {
    SchemaSpec {
        columns: vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
        dtypes: vec![DType::Number, DType::String, DType::Number],
        key: None,
    }
}

/// A shard of the test topology: id, low, size, primary index, replica indexes.
pub type ShardDef<'a> = (&'a str, i64, i64, usize, &'a [usize]);

impl Cluster {
    pub async fn start(n: usize, shards: &[ShardDef<'_>]) -> Cluster {
        Cluster::start_with_lease(n, shards, NodeConfig::DEFAULT_LEASE, NodeConfig::DEFAULT_LEASE_RENEW).await
    }

    pub async fn start_with_lease(n: usize, shards: &[ShardDef<'_>], lease: Duration, renew: Duration) -> Cluster {
        Cluster::start_with(n, shards, lease, renew, NodeConfig::DEFAULT_CACHE_ROWS).await
    }

    /// Servers with no row cache: every read and decision goes to Postgres.
    pub async fn start_without_cache(n: usize, shards: &[ShardDef<'_>]) -> Cluster {
        Cluster::start_with(n, shards, NodeConfig::DEFAULT_LEASE, NodeConfig::DEFAULT_LEASE_RENEW, 0).await
    }

    /// Servers served with `limits` (timeouts, connection cap).
    pub async fn start_with_serve_limits(n: usize, shards: &[ShardDef<'_>], limits: ServeLimits) -> Cluster {
        let (lease, renew) = (NodeConfig::DEFAULT_LEASE, NodeConfig::DEFAULT_LEASE_RENEW);
        Cluster::start_full(n, shards, lease, renew, NodeConfig::DEFAULT_CACHE_ROWS, limits).await
    }

    pub async fn start_with(
        n: usize,
        shards: &[ShardDef<'_>],
        lease: Duration,
        renew: Duration,
        cache_rows: usize,
    ) -> Cluster {
        Cluster::start_full(n, shards, lease, renew, cache_rows, test_limits()).await
    }

    async fn start_full(
        n: usize,
        shards: &[ShardDef<'_>],
        lease: Duration,
        renew: Duration,
        cache_rows: usize,
        serve_limits: ServeLimits,
    ) -> Cluster {
        install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .try_init();
        let pg = tokio::task::spawn_blocking(LocalPg::temporary).await.unwrap().expect("throwaway postgres");
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut listeners = Vec::new();
        for i in 0..n {
            let name = format!("Server{i}");
            let db = format!("server{i}");
            pg.create_database(&db).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            servers.push(Server {
                name,
                topology_path: dir.path().join(format!("topology{i}.json")),
                addr: listener.local_addr().unwrap(),
                db_url: pg.url(&db),
                node: None,
                task: None,
            });
            listeners.push(listener);
        }
        let topology = Topology {
            version: TOPOLOGY_VERSION,
            epoch: 1,
            schema: students(),
            ring: Default::default(),
            servers: servers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.clone(), ServerEntry { id: i as u32, url: s.url() }))
                .collect(),
            shards: shards
                .iter()
                .map(|(id, low, size, primary, replicas)| ShardEntry {
                    id: id.to_string(),
                    low: *low,
                    size: *size,
                    primary: format!("Server{primary}"),
                    replicas: replicas
                        .iter()
                        .map(|r| (format!("Server{r}"), ReplicaState::Ready))
                        .collect::<BTreeMap<_, _>>(),
                    copies: BTreeMap::new(),
                })
                .collect(),
            unrouted_keys: Default::default(),
        };
        topology.validate().unwrap();
        for s in &servers {
            write_atomic(&s.topology_path, &topology).unwrap();
        }
        let pki = TestPki::new("test", "students");
        let mut c = Cluster {
            pg,
            dir,
            topology,
            lease: (lease, renew),
            cache_rows,
            serve_limits,
            internal_auth: InternalAuth::Strict,
            servers,
            http: pki.credentials(Component::Operator, "operator").http_client(Duration::from_secs(30)),
            pki,
            granting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.serve(i, l).await;
        }
        c.keep_granting_primary_leases().await;
        c
    }

    /// The harness's stand-in for the operator's primary leases (see [`Granter`]).
    fn granter(&self) -> Granter {
        Granter {
            http: self.http.clone(),
            servers: self.servers.iter().map(|s| s.url()).collect(),
            on: Arc::clone(&self.granting),
        }
    }

    /// Grants every primary its lease now, and every 300 ms in the background; returns once every
    /// ready replica holds a read lease from its primary (which it can only get once its primary
    /// has a lease of its own), so a test may read from any copy at once.
    async fn keep_granting_primary_leases(&self) {
        let granter = self.granter();
        granter.round().await;
        tokio::spawn({
            let granter = granter.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    granter.round().await;
                }
            }
        });
        let leased = |node: &Node| {
            self.topology.shards_of(node.name()).all(|(entry, state)| {
                state != ReplicaState::Ready
                    || entry.primary == node.name()
                    || node.shards().iter().any(|s| s.id() == entry.id && s.holds_lease(&entry.primary))
            })
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while !self.servers.iter().filter_map(|s| s.node.as_deref()).all(leased) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every ready replica gets a read lease");
    }

    async fn serve(&mut self, i: usize, listener: TcpListener) {
        let s = &mut self.servers[i];
        let db = Db::connect_patiently(&s.db_url, 8, Duration::from_secs(60)).await.unwrap();
        let config = NodeConfig {
            name: s.name.clone(),
            peer_timeout: Duration::from_secs(10),
            body_limit: 1 << 20,
            lease: self.lease.0,
            lease_renew: self.lease.1,
            cache_rows: self.cache_rows,
            cache_bytes: NodeConfig::DEFAULT_CACHE_BYTES,
            body_timeout: self.serve_limits.body_timeout,
            credentials: self.pki.credentials(Component::Server, &s.name),
            internal_auth: self.internal_auth,
        };
        let Credentials::Tls(tls) = &config.credentials else { unreachable!("test servers use TLS") };
        let tls = tls.server_config();
        let node = Node::new(config, db, watch_file(s.topology_path.clone()));
        node.start().await.unwrap();
        let app = shard_server::app(Arc::clone(&node));
        let limits = self.serve_limits;
        let migrate = self.internal_auth == InternalAuth::Migrate;
        s.task = Some(tokio::spawn(async move {
            if migrate {
                serve_migrate(listener, app, limits, tls, std::future::pending()).await.unwrap();
            } else {
                serve_tls(listener, app, limits, tls, std::future::pending()).await.unwrap();
            }
        }));
        s.node = Some(node);
    }

    /// Stops server `i` (its port stops answering; its database stays).
    pub async fn kill(&mut self, i: usize) {
        let s = &mut self.servers[i];
        if let Some(t) = s.task.take() {
            t.abort();
            let _ = t.await;
        }
        s.node = None;
    }

    /// Starts server `i` again on the same port and database (and grants it its primary leases).
    pub async fn restart(&mut self, i: usize) {
        let listener = TcpListener::bind(self.servers[i].addr).await.unwrap();
        self.serve(i, listener).await;
        // Its leases come from the background granter within 300 ms: a test of a restarted server
        // waits for what it needs.
    }

    /// Starts server `i` again on the same port over a brand-new empty database, as a pod
    /// rescheduled without its volume would.
    pub async fn restart_with_empty_database(&mut self, i: usize, generation: u32) {
        let db = format!("server{i}_gen{generation}");
        self.pg.create_database(&db).unwrap();
        self.servers[i].db_url = self.pg.url(&db);
        self.restart(i).await;
    }

    /// Publishes a changed topology with the next epoch and waits until every live server has it.
    pub async fn publish(&mut self, change: impl FnOnce(&mut Topology)) {
        let all: Vec<usize> = (0..self.servers.len()).collect();
        self.publish_to(&all, change).await;
    }

    /// Publishes a changed topology with the next epoch to the listed servers only, and waits until
    /// each of them that is live has it; the others keep following what they had.
    pub async fn publish_to(&mut self, to: &[usize], change: impl FnOnce(&mut Topology)) {
        change(&mut self.topology);
        self.topology.epoch += 1;
        self.topology.validate().unwrap();
        for &i in to {
            let s = &self.servers[i];
            write_atomic(&s.topology_path, &self.topology).unwrap();
            if let Some(node) = &s.node {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while node.epoch() < self.topology.epoch {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .expect("server follows the new topology");
            }
        }
    }

    pub fn client(&self, i: usize) -> ShardClient {
        ShardClient::new(self.http.clone(), self.servers[i].url())
    }

    /// A client of server `i` presenting a certificate of this database's CA for `identity`.
    pub fn client_as(&self, i: usize, identity: Identity) -> ShardClient {
        let http = self.pki.credentials_of(identity).http_client(Duration::from_secs(30));
        ShardClient::new(http, self.servers[i].url())
    }

    /// A client of server `i` presenting no certificate at all (it still checks the server's).
    pub fn anonymous_client(&self, i: usize) -> ShardClient {
        ShardClient::new(self.pki.anonymous_http(Duration::from_secs(30)), self.servers[i].url())
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.servers[i].url())
    }

    /// Sends `body` as raw text with a form content type (as `curl -d` does), so malformed JSON
    /// can be sent too; returns the status and the JSON body (Null when empty).
    pub async fn send(&self, method: reqwest::Method, i: usize, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .request(method, self.url(i, path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        (status, json)
    }
}

/// Plays the operator's part in primary leases (see the server's `replication::lease`): each
/// server gets a lease for the shards it is the primary of in its own topology, measured from a
/// token it just handed out.
#[derive(Clone)]
struct Granter {
    http: reqwest::Client,
    servers: Vec<String>,
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl Granter {
    async fn round(&self) {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        for url in &self.servers {
            let client = ShardClient::new(self.http.clone(), url.clone());
            let Ok(status) = client.status(false).await else { continue };
            let Some(token) = status.lease_token else { continue };
            let shards: Vec<String> = status
                .shards
                .iter()
                .filter(|(_, s)| s.role == shard_server::api::Role::Primary)
                .map(|(id, _)| id.clone())
                .collect();
            let req = PrimaryLeaseRequest { token, epoch: 0, shards, lease_ms: 2000 };
            let _ = client.primary_lease(&req).await;
        }
    }
}
