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
//!
//! Here: the options, the run itself and the cluster's state ([`LocalCluster`]). Beside it:
//! each server's Postgres and process (`servers`, `postgres`), `cluster.json` (`cluster_file`),
//! what the run needs of the machine (`setup`: binaries, directories, ports, signals), the
//! processes (`supervisor`), and where they listen (`hosts`, `netns`).

pub mod admin;
mod cluster_file;
pub mod declared;
pub mod healer;
pub mod hosts;
pub mod leases;
mod membership;
pub mod netns;
pub mod pki;
pub mod postgres;
mod servers;
mod setup;
pub mod spec;
pub mod supervisor;
mod upgrade;

use crate::brain::topology::TopologyBuildError;
use crate::brain::validate::SpecError;
pub use cluster_file::{ClusterInfo, InternalInfo, OperatorInfo, RouterInfo, ServerInfo};
pub use declared::Declared;
use declared::initial_declaration;
use hosts::{Hosts, Place};
use netns::NetnsError;
use pki::{LocalPki, PkiError};
use postgres::{PgSettings, PostgresError, ServerPostgres};
pub use setup::Binaries;
use setup::{PortReservations, Signals, data_dir, make_dir, wait_ready};
use shard_server::tls::{Component, Credentials, InternalAuth};
use shard_server::topology_source;
use spec::SpecFileError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use supervisor::{Supervisor, SupervisorError};
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
