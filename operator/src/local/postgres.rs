//! Each local server's own Postgres: one throwaway cluster (localpg) per server, the way each
//! Kubernetes pod has its own database and volume, so a fault (a stopped Postgres, a lost data
//! directory) can be injected into one server alone. Does I/O; the blocking localpg calls run on
//! the blocking pool.

use localpg::{LocalPg, Options, PgError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The database every shard server uses inside its own cluster.
pub const DATABASE: &str = "sharddb";

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("failed to {action} postgres for {server}")]
    Pg {
        action: &'static str,
        server: String,
        #[source]
        source: PgError,
    },
    #[error("the postgres task for {server} panicked")]
    Panicked { server: String },
}

/// What `cluster.json` says about a server's Postgres.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresInfo {
    pub port: u16,
    /// The postmaster's pid; `null` while stopped.
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    /// Without the password: see `password_file`.
    pub url: String,
    pub log: PathBuf,
    /// The file holding the password (`scram-sha-256`), readable by the operator's user alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// One server's Postgres. Clones share the cluster; the last one dropped stops it.
#[derive(Clone, Debug)]
pub struct ServerPostgres {
    server: String,
    pg: Arc<Mutex<LocalPg>>,
    /// Where the password is kept, when there is one.
    password_file: Option<PathBuf>,
}

/// How every server's Postgres of a cluster is made: where the binaries are, and the superuser's
/// password (kept in `file`, 0600) that each authenticates with (`scram-sha-256`).
#[derive(Clone, Debug, Default)]
pub struct PgSettings {
    pub bin: Option<PathBuf>,
    pub password: Option<(String, PathBuf)>,
    /// Make a cluster that still trusts local connections (one a release from before the trust
    /// layer created) require the password when it is opened ([`LocalPg::require_password`]).
    /// Only once no previous release's shard server can connect to it, as those send no
    /// password: in internal-auth `strict` or `migrate`, never in `none`.
    pub require_password: bool,
}

/// How a server's Postgres runs, beyond where.
#[derive(Clone, Copy, Debug)]
pub struct Serving<'a> {
    /// The spec's allow-listed `postgres.parameters`.
    pub settings: &'a BTreeMap<String, String>,
    /// The shard server connects through a socket in the data directory (it runs in a network
    /// namespace of its own and cannot reach this machine's 127.0.0.1).
    pub unix_socket: bool,
}

impl ServerPostgres {
    /// Creates the cluster if `data_dir` holds none (as a copy of `template` when given, keeping an
    /// existing one and its data), starts it on `port` as `serving` says and makes sure the
    /// `sharddb` database exists.
    pub async fn open(
        server: &str,
        data_dir: &Path,
        log: &Path,
        port: u16,
        settings: &PgSettings,
        template: Option<&Path>,
        serving: Serving<'_>,
    ) -> Result<Self, PostgresError> {
        let mut opts = Options::new(data_dir);
        opts.log_file = Some(log.to_owned());
        opts.port = Some(port);
        opts.bin_dir = settings.bin.clone();
        opts.template = template.map(Path::to_owned);
        opts.password = settings.password.as_ref().map(|(p, _)| p.clone());
        opts.settings = serving.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        opts.unix_socket = serving.unix_socket;
        let name = server.to_owned();
        let name_for_log = name.clone();
        let require_password = settings.require_password;
        let pg = tokio::task::spawn_blocking(move || -> Result<LocalPg, (&'static str, PgError)> {
            let mut pg = LocalPg::new(opts).map_err(|e| ("initialise", e))?;
            pg.start().map_err(|e| ("start", e))?;
            pg.create_database(DATABASE).map_err(|e| ("create the database of", e))?;
            if require_password && pg.require_password().map_err(|e| ("require a password of", e))? {
                tracing::warn!(server = %name_for_log, "postgres trusted local connections (made by an earlier release); it now requires the cluster's password");
            }
            Ok(pg)
        })
        .await
        .map_err(|_| PostgresError::Panicked { server: name.clone() })?
        .map_err(|(action, source)| PostgresError::Pg { action, server: name.clone(), source })?;
        tracing::info!(server, port, data_dir = %data_dir.display(), "postgres ready");
        let password_file = settings.password.as_ref().map(|(_, f)| f.clone());
        Ok(ServerPostgres { server: name, pg: Arc::new(Mutex::new(pg)), password_file })
    }

    /// Runs `initdb` in `data_dir` (unless it holds a cluster) without starting a server: a
    /// template for [`ServerPostgres::open`].
    pub async fn init_template(data_dir: &Path, settings: &PgSettings) -> Result<(), PostgresError> {
        let mut opts = Options::new(data_dir);
        opts.bin_dir = settings.bin.clone();
        opts.password = settings.password.as_ref().map(|(p, _)| p.clone());
        let template = || data_dir.display().to_string();
        tokio::task::spawn_blocking(move || LocalPg::new(opts).map(drop))
            .await
            .map_err(|_| PostgresError::Panicked { server: template() })?
            .map_err(|source| PostgresError::Pg { action: "initialise the template", server: template(), source })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// The URL the shard server connects to (without the password): through the Unix socket
    /// when there is one.
    pub fn database_url(&self) -> String {
        let pg = self.lock();
        pg.socket_url(DATABASE).unwrap_or_else(|| pg.url(DATABASE))
    }

    /// The file holding the password the shard server adds to [`ServerPostgres::database_url`].
    pub fn password_file(&self) -> Option<&Path> {
        self.password_file.as_deref()
    }

    pub fn info(&self) -> PostgresInfo {
        let pg = self.lock();
        PostgresInfo {
            port: pg.port(),
            pid: pg.pid(),
            data_dir: pg.data_dir().to_owned(),
            url: pg.url(DATABASE),
            log: pg.log_file().to_owned(),
            password_file: self.password_file.clone(),
        }
    }

    /// Starts a stopped Postgres on the same port and data directory (re-creating the database if
    /// the data was wiped).
    pub async fn start(&self) -> Result<(), PostgresError> {
        self.blocking("start", |pg| {
            pg.start()?;
            pg.create_database(DATABASE)
        })
        .await
    }

    /// Stops Postgres (`pg_ctl stop -m fast`); the data stays.
    pub async fn stop(&self) -> Result<(), PostgresError> {
        self.blocking("stop", LocalPg::stop).await
    }

    /// Stops Postgres and replaces its data directory with an empty cluster (left stopped): the
    /// loss of a pod's volume.
    pub async fn wipe(&self) -> Result<(), PostgresError> {
        self.blocking("wipe", LocalPg::wipe).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalPg> {
        // A panic while holding the lock leaves the LocalPg itself consistent (its state is the
        // files on disk), so a poisoned lock is still usable.
        self.pg.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn blocking(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut LocalPg) -> Result<(), PgError> + Send + 'static,
    ) -> Result<(), PostgresError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&mut me.lock()))
            .await
            .map_err(|_| PostgresError::Panicked { server: self.server.clone() })?
            .map_err(|source| PostgresError::Pg { action, server: self.server.clone(), source })
    }
}
