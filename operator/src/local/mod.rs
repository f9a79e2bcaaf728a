//! The local body: the whole database as processes on this machine. Each server is its own
//! Postgres cluster plus a shard-server process (together they model one Kubernetes pod); one
//! router sits in front. The operator writes the topology file, supervises the processes and
//! describes everything in `cluster.json`. Does I/O.
//!
//! Data directory layout:
//! ```text
//! DIR/declared.json              the declared configuration (a ShardedDatabase spec), changed by
//!                                `/init`, `/add` and `/rm`; what a restart resumes from
//! DIR/topology.json              the routing document the processes follow
//! DIR/cluster.json               pids, ports and paths, for people and scripts
//! DIR/events.log                 what the healer did (demote, promote, recover, ready), one JSON line each
//! DIR/control/<verb>.<server>    fault-injection requests for the healer (see `healer`)
//! DIR/servers/<name>/pgdata      each server's Postgres cluster (database `sharddb`)
//! DIR/logs/<name>.log            each process's stdout and stderr (`router.log` for the router)
//! DIR/logs/<name>.postgres.log   each server's Postgres log
//! DIR/tls/                       the cluster's CA and every process's certificate (`pki`)
//! DIR/admin-token                with `--admin-token`: the bearer token `/init`, `/add`, `/rm` need
//! DIR/postgres-password          the password every server's Postgres authenticates with
//!                                (`scram-sha-256`; generated, 0600)
//! ```
//! Internal traffic (router → servers, server → server, operator → servers, router → operator)
//! is mutual TLS under the cluster's CA by default (`pki`); the router's client port stays plain
//! HTTP, as the seed's clients expect.
//! Reusing a data directory keeps every server's data; the new topology is the one left behind
//! (primaries, copy states and identities, moves half done) with the servers' new URLs and a
//! higher epoch, so nothing that remembers the old epoch rejects it and healing and moves resume.
//! `declared.json` wins over a spec file given again: it holds the changes made since.
//!
//! Without a spec file (and no `declared.json`) the cluster starts empty: only the router, which
//! answers `/init` as the seed's load balancer did. The router passes `/init`, `/add` and `/rm` to
//! this process's admin endpoint (`admin`), which changes the declared configuration
//! (`brain::declare`, kept by `declared`); every round then starts the servers it names
//! (`membership`), the healer moves copies (`brain::moves`), and servers that left the topology
//! are stopped and their data deleted (`membership`).

pub mod admin;
pub mod declared;
pub mod healer;
pub mod hosts;
pub mod leases;
mod membership;
pub mod netns;
pub mod pki;
pub mod postgres;
pub mod spec;
pub mod supervisor;
mod upgrade;

use crate::brain::placement::Placement;
use crate::brain::topology::{TopologyBuildError, fresh_topology};
use crate::brain::validate::{SpecError, ValidatedDb, natural_key};
pub use declared::Declared;
use declared::initial_declaration;
use hosts::{Hosts, NetworkInfo, Place};
use netns::NetnsError;
use pki::{LocalPki, PkiError};
use postgres::{PgSettings, PostgresError, PostgresInfo, ServerPostgres, Serving};
use serde::{Deserialize, Serialize};
use shard_server::tls::{Component, Credentials, InternalAuth};
use shard_server::topology::Topology;
use shard_server::topology_source;
use spec::SpecFileError;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use supervisor::{BinaryId, ProcessSpec, Supervisor, SupervisorError};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

pub const SHARD_SERVER_BIN: &str = "sharddb-shard-server";
pub const ROUTER_BIN: &str = "sharddb-router";
/// The name of the router process (its log is `logs/router.log`).
pub const ROUTER: &str = "router";
/// The declared configuration's file in the data directory.
pub const DECLARED_FILE: &str = "declared.json";
/// The admin verbs' bearer token, with `--admin-token`.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The servers' Postgres password.
pub const POSTGRES_PASSWORD_FILE: &str = "postgres-password";
/// How often certificates are checked for renewal while running.
const RENEW_CHECK: Duration = Duration::from_secs(60);
/// How long a freshly started process may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How to run a local cluster (parsed once by `main`).
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The `ShardedDatabase` YAML; without it (and without a `declared.json` in the data
    /// directory) the cluster waits for `/init`.
    pub spec: Option<PathBuf>,
    /// Where everything lives; a fresh temporary directory (kept) when absent.
    pub data_dir: Option<PathBuf>,
    /// The router's port; 0 picks a free one.
    pub port: u16,
    /// Where `sharddb-shard-server` and `sharddb-router` are.
    pub bin_dir: PathBuf,
    /// Where the PostgreSQL binaries are; found automatically when absent.
    pub pg_bin: Option<PathBuf>,
    /// Run every process in a network namespace of its own, on a switch named by this id (see
    /// `hosts` and `netns`); `None`: everything on 127.0.0.1.
    pub netns: Option<String>,
    /// Mutual TLS between the cluster's processes (default); off, a per-cluster secret
    /// authenticates them without encryption (to measure what TLS costs).
    pub internal_tls: bool,
    /// The router's `/init`, `/add` and `/rm` need `Authorization: Bearer <DIR/admin-token>`.
    pub admin_token: bool,
    /// How every process authenticates internal traffic; when absent, `none` for a data directory
    /// a release from before internal authentication made (see [`internal_auth_for`]), else
    /// `strict`.
    pub internal_auth: Option<InternalAuth>,
}

/// The mode a data directory is run in when none is given: a directory holding a cluster but no
/// `tls/` was made by a release from before internal authentication, whose processes may still
/// be running beside ours (a rolling upgrade), so ours must speak to them as they do: `none`.
/// Anything else (a new directory, or one of this release) is `strict`.
pub fn internal_auth_for(dir: &Path, given: Option<InternalAuth>) -> InternalAuth {
    let had_a_cluster = ["topology.json", DECLARED_FILE, "servers"].iter().any(|f| dir.join(f).exists());
    match given {
        Some(mode) => mode,
        None if had_a_cluster && !dir.join(pki::TLS_DIR).exists() => InternalAuth::None,
        None => InternalAuth::Strict,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Spec(#[from] SpecFileError),
    #[error("{} not found in {}: build it (`cargo build --workspace`) or point --bin-dir (SHARDDB_BIN_DIR) at it", name, dir.display())]
    MissingBinary { name: &'static str, dir: PathBuf },
    #[error("failed to {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("port {port} on 127.0.0.1 is in use: pass --port with another port, or --port 0 for any free one")]
    PortInUse {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("no free TCP port on 127.0.0.1")]
    NoFreePort(#[source] std::io::Error),
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("failed to build the topology")]
    Topology(#[from] TopologyBuildError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("{name} did not answer {url} within {}s; see {}", READY_TIMEOUT.as_secs(), log.display())]
    NotReady { name: String, url: String, log: PathBuf },
    #[error("{} is not a valid topology", path.display())]
    BadTopology {
        path: PathBuf,
        #[source]
        source: shard_server::topology::TopologyError,
    },
    #[error("{} is not a valid declared configuration", path.display())]
    BadDeclared {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} declares an invalid configuration", path.display())]
    InvalidDeclared {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
    #[error("unknown control verb {0:?} (kill, stop, start, wipe, stop-postgres, start-postgres, renew-certs)")]
    UnknownControl(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// `cluster.json`: where everything runs, for people and scripts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub data_dir: PathBuf,
    /// The operator process itself.
    pub operator: OperatorInfo,
    pub router: RouterInfo,
    /// The admin endpoint the router passes `/init`, `/add` and `/rm` to.
    pub control_url: String,
    /// The topology file.
    pub topology: PathBuf,
    /// In server id order.
    pub servers: Vec<ServerInfo>,
    /// The switch, when every process runs in a network namespace of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// How the processes authenticate each other (where the credentials are; never a secret).
    pub internal: InternalInfo,
}

/// `cluster.json`'s description of internal authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalInfo {
    /// Mutual TLS under the cluster's CA; false: a per-cluster secret, unencrypted (or nothing,
    /// in `none`).
    pub tls: bool,
    /// The mode every process runs in (`--internal-auth`).
    #[serde(default)]
    pub mode: InternalAuth,
    /// The CA certificate servers are checked against (with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The operator's certificate directory (`tls.crt`, `tls.key`, `ca.crt`): what a person or a
    /// test presents to call a shard server directly (with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_tls_dir: Option<PathBuf>,
    /// The file holding the per-cluster secret (TLS off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The database every identity names (`local/sharddb`).
    pub database: String,
    /// The file holding the admin verbs' bearer token, when the router requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterInfo {
    pub url: String,
    /// `null` while the process is down (e.g. between a crash and its restart).
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// Its network namespace, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub name: String,
    pub url: String,
    /// `null` while the process is down.
    pub pid: Option<u32>,
    pub log: PathBuf,
    pub postgres: PostgresInfo,
    /// Its network namespace, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// Runs a local cluster until SIGINT or SIGTERM, then stops everything and returns.
pub async fn run_local(opts: LocalOptions) -> Result<(), LocalError> {
    // Take over the signals first, so one arriving during startup leads to a clean stop.
    let mut signals = Signals::new();
    let bins = Binaries::locate(&opts.bin_dir)?;
    let dir = data_dir(opts.data_dir.as_deref())?;
    // Before anything is written to the directory: what it held decides (see `internal_auth_for`).
    let auth = internal_auth_for(&dir, opts.internal_auth);
    let declared = initial_declaration(&dir, opts.spec.as_deref())?;
    // Printed for people and scripts: this and the URL line are the command's output.
    println!("sharddb data directory: {}", dir.display());
    tracing::info!(dir = %dir.display(), configured = declared.is_some(), internal_tls = opts.internal_tls, "starting local cluster");
    if let Some(open) = auth.weakness() {
        tracing::warn!(internal_auth = %auth, "{open}");
    }
    let pki = LocalPki::open(&dir, opts.internal_tls, auth)?;
    let admin_token = if opts.admin_token { Some(pki::kept_secret(&dir, ADMIN_TOKEN_FILE)?.0) } else { None };
    let (pg_password_file, pg_password) = pki::kept_secret(&dir, POSTGRES_PASSWORD_FILE)?;
    let pg = PgSettings {
        bin: opts.pg_bin.clone(),
        password: Some((pg_password, pg_password_file)),
        require_password: auth != InternalAuth::None,
    };

    let mut hosts = Hosts::new(opts.netns.as_deref()).await?;
    // The control endpoint serves on the switch's gateway in namespaces: its certificate names it.
    pki.set_address(Component::Operator, "operator", hosts.control_address().into());
    let credentials = match pki.operator_credentials() {
        Ok(c) => c,
        Err(e) => {
            hosts.teardown().await;
            return Err(e.into());
        }
    };
    let admin_listener = match tokio::net::TcpListener::bind((hosts.control_address(), 0)).await {
        Ok(l) => l,
        Err(e) => {
            hosts.teardown().await;
            return Err(LocalError::NoFreePort(e));
        }
    };
    let control_url = format!("{}://{}", pki.scheme(), admin_listener.local_addr().map_err(LocalError::NoFreePort)?);
    let (admin_tx, mut admin_rx) = mpsc::channel(16);
    let topology_path = dir.join("topology.json");
    let admin_task = admin::serve(admin_listener, &credentials, admin_tx, topology_source::watch_file(topology_path));

    let mut cluster = LocalCluster::new(dir, bins, pg, control_url, hosts, pki, credentials);
    cluster.admin_token = admin_token;
    cluster.declared = declared;
    // A signal while starting is a request to stop like any other: undo what started, exit 0.
    let started = tokio::select! {
        r = cluster.start(opts.port) => r.map(|()| None),
        s = signals.next() => Ok(Some(s)),
    };
    match started {
        Ok(None) => {}
        Ok(Some(signal)) => {
            tracing::info!(signal, "interrupted while starting; stopping what started");
            admin_task.abort();
            cluster.shutdown().await;
            return Ok(());
        }
        Err(e) => {
            admin_task.abort();
            cluster.shutdown().await;
            return Err(e);
        }
    }
    // Primaries serve reads only with a lease: grant the first ones before anyone is told where to
    // send reads, then every half second.
    cluster.leases.grant_now(cluster.read_topology().as_ref()).await;
    let grant_task = cluster.leases.spawn();
    println!("sharddb router listening on {}", cluster.router_url());
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let book = std::sync::Arc::clone(cluster.leases.book());
    let healer =
        healer::Healer::new(&cluster.dir, cluster.topology_path(), &cluster.credentials, Default::default(), book);
    let mut healer = match healer {
        Ok(h) => h,
        Err(e) => {
            grant_task.abort();
            admin_task.abort();
            cluster.shutdown().await;
            return Err(e);
        }
    };
    let mut rounds = tokio::time::interval(healer::ROUND);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewals = tokio::time::interval(RENEW_CHECK);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = cluster.supervisor.changes();
    // A process may have been restarted between the first cluster.json and this subscription;
    // writing once now, after subscribing, means no pid change is ever missed.
    if let Err(e) = cluster.write_cluster_file() {
        tracing::error!(error = %e, "cannot update cluster.json");
    }
    let signal = loop {
        tokio::select! {
            s = signals.next() => break s,
            Some(call) = admin_rx.recv() => cluster.admin(call).await,
            _ = rounds.tick() => {
                cluster.reconcile().await;
                healer.round(&mut cluster).await;
            }
            _ = renewals.tick() => {
                if let Err(e) = cluster.renew_certificates(false) {
                    tracing::error!(error = %e, "cannot renew certificates; trying again in a minute");
                }
            }
            // A finished recover is marked ready at once, not a round later.
            Some(done) = healer.next_recovered() => healer.finish_recover(done),
            _ = changes.changed() => {
                if let Err(e) = cluster.write_cluster_file() {
                    tracing::error!(error = %e, "cannot update cluster.json");
                }
            }
        }
    };
    tracing::info!(signal, "shutting down");
    grant_task.abort();
    admin_task.abort();
    cluster.shutdown().await;
    Ok(())
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Self {
        let install = |kind| signal(kind).expect("signal handlers can be installed");
        Signals { term: install(SignalKind::terminate()), int: install(SignalKind::interrupt()) }
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The programs local mode runs, as the files were when located: a process started from
/// another file (an earlier build) is outdated, and the healer restarts it (`upgrade`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
    pub shard_server: PathBuf,
    pub router: PathBuf,
    pub shard_server_id: BinaryId,
    pub router_id: BinaryId,
}

impl Binaries {
    pub fn locate(dir: &Path) -> Result<Binaries, LocalError> {
        let find = |name: &'static str| {
            let p = dir.join(name);
            if p.is_file() { Ok(p) } else { Err(LocalError::MissingBinary { name, dir: dir.to_owned() }) }
        };
        let (shard_server, router) = (find(SHARD_SERVER_BIN)?, find(ROUTER_BIN)?);
        Ok(Binaries {
            dir: dir.to_owned(),
            shard_server_id: BinaryId::of(&shard_server),
            router_id: BinaryId::of(&router),
            shard_server,
            router,
        })
    }
}

/// The given directory (created if needed), or a fresh temporary one that outlives us.
fn data_dir(given: Option<&Path>) -> Result<PathBuf, LocalError> {
    let dir = match given {
        Some(d) => d.to_owned(),
        None => tempfile::Builder::new()
            .prefix("sharddb-")
            .tempdir()
            .map_err(|source| LocalError::Io { action: "create a directory in", path: std::env::temp_dir(), source })?
            .keep(),
    };
    make_dir(&dir)?;
    std::path::absolute(&dir).map_err(|source| LocalError::Io { action: "resolve", path: dir, source })
}

/// Creates a directory of ours (and its parents). When we are root, Postgres runs as `postgres`
/// and must pass through our directories to reach its cluster, so they get the traverse bit
/// (`o+x`: enter, not list) whatever the umask or `tempfile` chose. A directory above the data
/// directory that `postgres` cannot enter is not ours to change; localpg reports it by name.
fn make_dir(dir: &Path) -> Result<(), LocalError> {
    let io = |action| move |source| LocalError::Io { action, path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(io("create"))?;
    if nix::unistd::geteuid().is_root() {
        let mode = std::fs::metadata(dir).map_err(io("inspect"))?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(io("set permissions of"))?;
        }
    }
    Ok(())
}

/// Ports held open until the processes that will use them start, so that two picks cannot collide.
#[derive(Default)]
struct PortReservations(Vec<TcpListener>);

impl PortReservations {
    fn any(&mut self) -> Result<u16, LocalError> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(LocalError::NoFreePort)?;
        let port = l.local_addr().map_err(LocalError::NoFreePort)?.port();
        self.0.push(l);
        Ok(port)
    }

    fn exact(&mut self, port: u16) -> Result<u16, LocalError> {
        if port == 0 {
            return self.any();
        }
        let l = TcpListener::bind(("127.0.0.1", port)).map_err(|source| LocalError::PortInUse { port, source })?;
        self.0.push(l);
        Ok(port)
    }
}

/// One data server: its process and its Postgres.
#[derive(Clone, Debug)]
pub struct LocalServer {
    pub name: String,
    pub place: Place,
    pub port: u16,
    pub log: PathBuf,
    pub postgres: ServerPostgres,
    /// `https`, or `http` with internal TLS off.
    pub scheme: &'static str,
}

impl LocalServer {
    pub fn url(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.place.address, self.port)
    }
}

/// A running local cluster. Its methods are the verbs a controller needs (stop or start one
/// server or its Postgres, wipe a server's data); deciding *when* to use them is the brain's job.
pub struct LocalCluster {
    dir: PathBuf,
    bins: Binaries,
    /// How each server's Postgres is made (binaries, password).
    pg: PgSettings,
    supervisor: Supervisor,
    /// In server id order.
    servers: Vec<LocalServer>,
    router_port: u16,
    router_place: Place,
    /// Where processes listen (see `hosts`).
    hosts: Hosts,
    /// The admin endpoint the router is started with.
    control_url: String,
    /// `None` until `/init` (or a spec file) configures the database.
    declared: Option<Declared>,
    /// No shard server ever ran in this directory, so none can have granted a read lease in
    /// these names (see [`LocalCluster::start`]). Cleared when the first servers start.
    no_predecessor: bool,
    /// The primaries' leases (see `leases`).
    leases: leases::Leases,
    /// The cluster's CA and certificates (or its secret, with TLS off).
    pki: LocalPki,
    /// The operator's own credentials, which every call to a server presents.
    credentials: Credentials,
    /// With `--admin-token`: the file holding the router's admin token.
    admin_token: Option<PathBuf>,
    http: reqwest::Client,
}

impl LocalCluster {
    fn new(
        dir: PathBuf,
        bins: Binaries,
        pg: PgSettings,
        control_url: String,
        hosts: Hosts,
        pki: LocalPki,
        credentials: Credentials,
    ) -> Self {
        LocalCluster {
            dir,
            bins,
            pg,
            supervisor: Supervisor::new(),
            servers: Vec::new(),
            router_port: 0,
            router_place: Place::loopback(),
            hosts,
            control_url,
            declared: None,
            no_predecessor: false,
            leases: leases::Leases::new(&credentials),
            pki,
            http: credentials.http_client(Duration::from_secs(2)),
            credentials,
            admin_token: None,
        }
    }

    /// Issues again every certificate that is due (`force`: all of them); the processes pick
    /// them up from their files.
    pub fn renew_certificates(&self, force: bool) -> Result<Vec<String>, LocalError> {
        let renewed = self.pki.renew_due(self.servers.iter().map(|s| s.name.as_str()), force)?;
        if !renewed.is_empty() {
            tracing::info!(?renewed, "certificates renewed");
        }
        Ok(renewed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn topology_path(&self) -> PathBuf {
        self.dir.join("topology.json")
    }

    /// Where each shard server's directory (its Postgres cluster) lives.
    pub fn servers_dir(&self) -> PathBuf {
        self.dir.join("servers")
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    pub fn router_url(&self) -> String {
        format!("http://{}:{}", self.router_place.address, self.router_port)
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The primaries' leases, which the healer consults before it changes a primary.
    pub fn leases(&self) -> &leases::Leases {
        &self.leases
    }

    pub fn server(&self, name: &str) -> Option<&LocalServer> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// The declared configuration, once there is one.
    pub fn declared(&self) -> Option<&Declared> {
        self.declared.as_ref()
    }

    /// Every started server's base URL.
    pub fn urls(&self) -> BTreeMap<String, String> {
        self.servers.iter().map(|s| (s.name.clone(), s.url())).collect()
    }

    pub(super) fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Starts the servers of the declared configuration, if there is one, then the router, waits
    /// for it, and writes `cluster.json`.
    async fn start(&mut self, router_port: u16) -> Result<(), LocalError> {
        // A cluster with no predecessor: neither a topology nor the servers' directory exists
        // before this run makes it (a server's Postgres and process start only once it exists,
        // and nothing but removing the whole data directory deletes it). So no shard server ever
        // ran here and no replica anywhere holds a read lease granted in these names; the servers
        // this run starts first may acknowledge at once. Anything else (a resumed cluster, a
        // directory of unknown history) waits one lease at start. The argument is beside
        // `predecessor_grants_end` in the shard server's `replication::lease`.
        self.no_predecessor = !self.topology_path().exists() && !self.servers_dir().exists();
        for d in [self.logs_dir(), self.servers_dir()] {
            make_dir(&d)?;
        }
        let mut ports = PortReservations::default();
        self.router_port = match (&self.hosts, router_port) {
            (Hosts::Namespaces(_), 0) => hosts::NAMESPACED_PORT,
            (Hosts::Namespaces(_), port) => port,
            (Hosts::Loopback, port) => ports.exact(port)?,
        };
        self.router_place = self.hosts.place(ROUTER).await?;
        self.pki.ensure(Component::Router, ROUTER, false)?;
        if let Some(d) = self.declared.clone() {
            self.start_servers(&d.db, &d.placement).await?;
        }
        drop(ports);
        let router = self.router_process();
        self.supervisor.spawn(router.clone())?;
        wait_ready(&self.http, ROUTER, format!("{}/healthz", self.router_url()), &router.log).await?;
        self.write_cluster_file()?;
        Ok(())
    }

    /// Starts every Postgres (in parallel), writes the topology, starts the shard servers and waits
    /// for their heartbeats. The servers are those of `placement` and those of a topology left by
    /// an earlier run (a server being drained still holds copies that are needed).
    pub(super) async fn start_servers(&mut self, db: &ValidatedDb, placement: &Placement) -> Result<(), LocalError> {
        // Only the first servers of a directory without a predecessor skip the start-up wait
        // (see `start`); once any has been started, even by an `/init` that then failed and is
        // retried, every later start waits.
        let new_cluster = std::mem::take(&mut self.no_predecessor);
        let previous = self.read_topology();
        let mut names = placement.servers.clone();
        let mut leftover: Vec<String> =
            previous.iter().flat_map(|t| t.servers.keys()).filter(|n| !names.contains(n)).cloned().collect();
        leftover.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        names.extend(leftover);
        let mut ports = PortReservations::default();
        let mut planned = Vec::new();
        for name in &names {
            let port = self.hosts.port(|| ports.any())?;
            planned.push((name.clone(), port, ports.any()?));
        }
        let mut places = Vec::new();
        for name in &names {
            places.push(self.hosts.place(name).await?);
        }
        drop(ports);

        let pgdata = |name: &str| self.servers_dir().join(name).join("pgdata");
        for (name, _, _) in &planned {
            let d = self.servers_dir().join(name);
            make_dir(&d)?;
        }
        // initdb is the slow part of starting (seconds, with fsync); run it once and copy the
        // result (a tenth of a second) for every other server that has no cluster yet.
        let fresh: Vec<&str> =
            planned.iter().map(|(n, _, _)| n.as_str()).filter(|n| !pgdata(n).join("PG_VERSION").is_file()).collect();
        // The template is a cluster of its own: a server's cluster cannot be copied while it starts.
        let template = if fresh.len() > 1 {
            let t = self.servers_dir().join(".template");
            if t.exists() {
                // Left by a run interrupted while starting; it may be half made.
                std::fs::remove_dir_all(&t).map_err(|source| LocalError::Io {
                    action: "remove",
                    path: t.clone(),
                    source,
                })?;
            }
            make_dir(&t)?;
            ServerPostgres::init_template(&t.join("pgdata"), &self.pg).await?;
            Some(t)
        } else {
            None
        };
        let serving = Serving { settings: &db.tuning.postgres_parameters, unix_socket: self.hosts.namespaced() };
        let opening = planned.iter().map(|(name, _, pg_port)| {
            let log = self.logs_dir().join(format!("{name}.postgres.log"));
            let template = template.as_ref().map(|t| t.join("pgdata"));
            let (data_dir, settings) = (pgdata(name), &self.pg);
            async move {
                ServerPostgres::open(name, &data_dir, &log, *pg_port, settings, template.as_deref(), serving).await
            }
        });
        // Keep every cluster that did start, so a failure elsewhere still stops it on shutdown.
        let mut first_error = None;
        let opened = futures::future::join_all(opening).await;
        for (((name, port, _), opened), place) in planned.iter().zip(opened).zip(places) {
            match opened.map_err(LocalError::from) {
                Ok(postgres) => self.servers.push(LocalServer {
                    name: name.clone(),
                    place,
                    port: *port,
                    log: self.logs_dir().join(format!("{name}.log")),
                    postgres,
                    scheme: self.pki.scheme(),
                }),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(t) = template {
            // Off the startup path: removing a cluster's files takes a noticeable moment.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&t) {
                    tracing::warn!(path = %t.display(), error = %e, "cannot remove the template cluster");
                }
            });
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        self.write_topology(db, placement, previous)?;
        for s in &self.servers {
            self.pki.set_address(Component::Server, &s.name, s.place.address.into());
            self.pki.ensure(Component::Server, &s.name, false)?;
            let mut process = self.server_process(s);
            if new_cluster {
                // No read lease was ever granted in these names: see `--no-predecessor`.
                process.first_start_args.push("--no-predecessor".into());
            }
            self.supervisor.spawn(process)?;
        }
        let http = &self.http;
        let waits = self.servers.iter().map(|s| wait_ready(http, &s.name, format!("{}/heartbeat", s.url()), &s.log));
        futures::future::try_join_all(waits).await?;
        tracing::info!(servers = self.servers.len(), "every shard server answers its heartbeat");
        Ok(())
    }

    pub(super) fn read_topology(&self) -> Option<Topology> {
        std::fs::read(self.topology_path()).ok().and_then(|b| Topology::parse(&b).ok())
    }

    /// The shard-server process of `s`, with the declared configuration's knobs (probes and
    /// resources have no meaning here); its certificate must have been issued
    /// ([`LocalPki::ensure`]).
    pub(super) fn server_process(&self, s: &LocalServer) -> ProcessSpec {
        let tuning = self.declared.as_ref().map(|d| &d.db.tuning);
        let threads =
            tuning.and_then(|t| t.worker_threads).map_or_else(|| self.server_worker_threads(), |t| t as usize);
        let mut args = vec![
            "--listen".into(),
            format!("{}:{}", s.place.address, s.port),
            "--name".into(),
            s.name.clone(),
            "--database-url".into(),
            s.postgres.database_url(),
        ];
        args.extend(self.pki.process_args(Component::Server, &s.name));
        args.extend(self.topology_args());
        args.extend(["--worker-threads".into(), threads.to_string()]);
        if let Some(rows) = tuning.and_then(|t| t.cache_rows) {
            args.extend(["--cache-rows".into(), rows.to_string()]);
        }
        let mut spec = ProcessSpec::new(&s.name, &self.bins.shard_server, args, &s.log);
        spec.netns = s.place.netns_path();
        spec.env = self.pki.process_env();
        // The password file is named in the environment too: a previous release's server, which
        // knows no such flag and whose Postgres trusts local connections, starts all the same.
        if let Some(file) = s.postgres.password_file() {
            spec.env.push(("SHARDDB_DATABASE_PASSWORD_FILE".into(), file.display().to_string()));
        }
        spec
    }

    /// Where a process follows the topology from: the file, or, in a network namespace of its
    /// own, this operator's endpoint (see `hosts`).
    pub(super) fn topology_args(&self) -> [String; 2] {
        if self.hosts.namespaced() {
            ["--topology-url".into(), format!("{}/topology", self.control_url)]
        } else {
            ["--topology-file".into(), self.topology_path().display().to_string()]
        }
    }

    /// Every shard server of local mode shares this machine, so each gets its share of the CPUs
    /// (at least one thread) rather than one thread per CPU: on 2 cores, six servers with two
    /// threads each spent about a tenth more CPU per write, on waking and switching threads, than
    /// with one each (A-1 benchmark).
    fn server_worker_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        (cpus / self.servers.len().max(1)).max(1)
    }

    /// Writes the first topology of this run. A topology left by an earlier run may have been
    /// seen (and its epoch remembered) by the servers whose data we are reusing: it is kept as it
    /// was, with the servers' new URLs and the next epoch, and the healer moves it toward the
    /// declared placement from there (a move in progress resumes; nothing is declared ready that
    /// was not).
    pub(super) fn write_topology(
        &self,
        db: &ValidatedDb,
        placement: &Placement,
        previous: Option<Topology>,
    ) -> Result<Topology, LocalError> {
        let path = self.topology_path();
        let topology = match previous {
            Some(mut t) => {
                t.epoch += 1;
                for (name, entry) in &mut t.servers {
                    if let Some(s) = self.server(name) {
                        entry.url = s.url();
                    }
                }
                t
            }
            None => fresh_topology(db, placement, &self.urls(), 1)?,
        };
        let epoch = topology.epoch;
        shard_server::topology_source::write_atomic(&path, &topology).map_err(|source| LocalError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        tracing::info!(epoch, path = %path.display(), "topology written");
        Ok(topology)
    }

    /// Describes the cluster as it is now.
    pub fn cluster_info(&self) -> ClusterInfo {
        ClusterInfo {
            data_dir: self.dir.clone(),
            operator: OperatorInfo { pid: std::process::id() },
            router: RouterInfo {
                url: self.router_url(),
                pid: self.supervisor.pid(ROUTER),
                log: self.logs_dir().join(format!("{ROUTER}.log")),
                netns: self.router_place.namespace(),
            },
            control_url: self.control_url.clone(),
            topology: self.topology_path(),
            servers: self
                .servers
                .iter()
                .map(|s| ServerInfo {
                    name: s.name.clone(),
                    url: s.url(),
                    pid: self.supervisor.pid(&s.name),
                    log: s.log.clone(),
                    postgres: s.postgres.info(),
                    netns: s.place.namespace(),
                })
                .collect(),
            network: self.hosts.info(),
            internal: InternalInfo {
                tls: self.pki.tls(),
                mode: self.pki.internal_auth(),
                ca: self.pki.ca_file(),
                operator_tls_dir: self.pki.tls().then(|| self.pki.component_dir(Component::Operator, "operator")),
                token_file: self.pki.token_file(),
                database: self.pki.database().to_string(),
                admin_token_file: self.admin_token.clone(),
            },
        }
    }

    /// Writes `cluster.json` atomically (temporary file + rename), readable by our user alone: it
    /// holds no secret, but it maps every port of the cluster.
    pub fn write_cluster_file(&self) -> Result<(), LocalError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.cluster_file();
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_string_pretty(&self.cluster_info()).expect("cluster info serialises");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all((json + "\n").as_bytes()))
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| LocalError::Io { action: "write", path, source })
    }

    fn known(&self, name: &str) -> Result<&LocalServer, LocalError> {
        self.server(name).ok_or_else(|| SupervisorError::Unknown(name.to_owned()).into())
    }

    /// Stops a server's process (its Postgres keeps running).
    pub async fn stop_server(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?;
        Ok(self.supervisor.stop(name).await?)
    }

    /// Starts a stopped server's process again, on the same port with the same database.
    pub fn start_server(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?;
        Ok(self.supervisor.start(name)?)
    }

    /// Stops a server's Postgres (the server process keeps running and sees its database fail).
    pub async fn stop_postgres(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?.postgres.stop().await?;
        self.supervisor.announce();
        Ok(())
    }

    /// Starts a server's Postgres again on the same port and data directory.
    pub async fn start_postgres(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?.postgres.start().await?;
        self.supervisor.announce();
        Ok(())
    }

    /// A server loses its volume: its process and Postgres stop, the data directory is replaced
    /// by an empty cluster, and both start again (the server comes back holding nothing).
    pub async fn wipe_server(&self, name: &str) -> Result<(), LocalError> {
        let server = self.known(name)?;
        self.supervisor.stop(name).await?;
        server.postgres.wipe().await?;
        server.postgres.start().await?;
        self.supervisor.start(name)?;
        self.supervisor.announce();
        Ok(())
    }

    /// Stops every process (the router first, so no request finds a server gone), then every
    /// Postgres.
    pub async fn shutdown(&mut self) {
        if self.supervisor.names().iter().any(|n| n == ROUTER) {
            let _ = self.supervisor.remove(ROUTER).await;
        }
        self.supervisor.shutdown().await;
        let stops = self.servers.iter().map(|s| async move {
            if let Err(e) = s.postgres.stop().await {
                tracing::error!(server = %s.name, error = %e, "cannot stop postgres");
            }
        });
        futures::future::join_all(stops).await;
        self.hosts.teardown().await;
        tracing::info!("local cluster stopped");
    }
}

/// Polls `url` until it answers 2xx.
async fn wait_ready(http: &reqwest::Client, name: &str, url: String, log: &Path) -> Result<(), LocalError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
            tracing::info!(name, %url, "ready");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(LocalError::NotReady { name: name.to_owned(), url, log: log.to_owned() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Binaries::locate(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("sharddb-shard-server not found in"), "{e}");
        assert!(e.contains("--bin-dir"), "{e}");
    }

    #[test]
    fn as_root_our_directories_are_traversable() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = base.path().join("a/b");
        make_dir(&dir).unwrap();
        make_dir(&dir).unwrap(); // existing is fine
        let mode = std::fs::metadata(base.path()).unwrap().permissions().mode();
        if nix::unistd::geteuid().is_root() {
            let made = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(made & 0o001, 0o001, "{made:o}");
            // The temporary directory is the caller's: left as it was.
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
            assert_eq!(data_dir(Some(base.path())).unwrap(), base.path());
            let mode = std::fs::metadata(base.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o711, "a data directory of ours becomes traversable: {mode:o}");
        }
    }

    #[test]
    fn only_a_cluster_made_before_internal_authentication_runs_in_none_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(internal_auth_for(d, None), InternalAuth::Strict, "a new directory");
        std::fs::write(d.join(DECLARED_FILE), "{}").unwrap();
        assert_eq!(internal_auth_for(d, None), InternalAuth::None, "a cluster without tls/");
        assert_eq!(internal_auth_for(d, Some(InternalAuth::Strict)), InternalAuth::Strict, "unless told");
        std::fs::create_dir(d.join(pki::TLS_DIR)).unwrap();
        assert_eq!(internal_auth_for(d, None), InternalAuth::Strict, "a cluster of this release");
    }

    #[test]
    fn a_busy_port_is_reported() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut r = PortReservations::default();
        let e = r.exact(port).unwrap_err().to_string();
        assert!(e.starts_with(&format!("port {port} on 127.0.0.1 is in use")), "{e}");
        let a = r.exact(0).unwrap();
        let b = r.any().unwrap();
        assert_ne!(a, b);
    }
}
