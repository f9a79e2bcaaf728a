//! `sharddb-shard-server`: parses flags, connects to Postgres, follows the topology, serves HTTP.

use clap::Parser;
use shard_server::db::Db;
use shard_server::node::{Node, NodeConfig};
use shard_server::serve::ServeArgs;
use shard_server::tls::{Component, CredentialArgs, Credentials, InternalAuth};
use shard_server::{api, app, topology_source};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "sharddb-shard-server", version, about = "sharddb data node: HTTP over one Postgres database")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SHARDDB_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// This server's name, as the topology knows it (e.g. Server0).
    #[arg(long, env = "SHARDDB_SERVER_NAME")]
    name: String,
    /// Postgres database holding this server's shards.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// A file holding the Postgres password, added to --database-url (so it is in neither the
    /// command line nor the environment, which other users may read).
    #[arg(long, env = "SHARDDB_DATABASE_PASSWORD_FILE")]
    database_password_file: Option<PathBuf>,
    /// Topology document to follow (local mode). Without it the server only serves shards
    /// configured with POST /config.
    #[arg(long, env = "SHARDDB_TOPOLOGY_FILE", conflicts_with = "topology_configmap")]
    topology_file: Option<PathBuf>,
    /// Topology ConfigMap to follow through the Kubernetes API, as NAMESPACE/NAME.
    #[arg(long, env = "SHARDDB_TOPOLOGY_CONFIGMAP", value_parser = topology_source::parse_configmap_ref, conflicts_with = "topology_url")]
    topology_configmap: Option<(String, String)>,
    /// Topology document served over HTTP by the local mode's operator (`GET URL?after=EPOCH`,
    /// long-polled), for a server in a network namespace of its own.
    #[arg(long, env = "SHARDDB_TOPOLOGY_URL", conflicts_with = "topology_file")]
    topology_url: Option<String>,
    /// Postgres connections in the pool.
    #[arg(long, env = "SHARDDB_DB_CONNECTIONS", default_value_t = 16)]
    db_connections: u32,
    /// Timeout of one replication call to a peer, in milliseconds.
    #[arg(long, env = "SHARDDB_PEER_TIMEOUT_MS", default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// Read lease of a replica, in milliseconds (see the replication module documentation). Every
    /// server of a cluster must use the same value.
    #[arg(long, env = "SHARDDB_LEASE_MS", default_value_t = NodeConfig::DEFAULT_LEASE.as_millis() as u64)]
    lease_ms: u64,
    /// How often a replica renews its read leases, in milliseconds (well below the lease).
    #[arg(long, env = "SHARDDB_LEASE_RENEW_MS", default_value_t = NodeConfig::DEFAULT_LEASE_RENEW.as_millis() as u64)]
    lease_renew_ms: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "SHARDDB_BODY_LIMIT", default_value_t = 64 * 1024 * 1024)]
    body_limit: usize,
    /// Rows kept in memory across this server's shards, so reads and a primary's decisions skip
    /// Postgres; a shard that does not fit is read from Postgres. 0 turns the cache off.
    #[arg(long, env = "SHARDDB_CACHE_ROWS", default_value_t = NodeConfig::DEFAULT_CACHE_ROWS)]
    cache_rows: usize,
    /// Bytes (estimated: cell sizes plus a per-row overhead) the cached rows may take together;
    /// a shard whose rows do not fit is read from Postgres.
    #[arg(long, env = "SHARDDB_CACHE_BYTES", default_value_t = NodeConfig::DEFAULT_CACHE_BYTES)]
    cache_bytes: usize,
    /// Timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    serve: ServeArgs,
    /// Threads running requests. Default: one per CPU this process may use (its cgroup's quota
    /// included). Servers sharing a machine do better with fewer: local mode gives each its share.
    #[arg(long, env = "SHARDDB_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// Who this server is to the database's other components: `--tls-dir` (serve HTTPS, mutual
    /// TLS) or, with TLS off, `--internal-token-file` and `--database`. One is required: every
    /// endpoint but /heartbeat and /metrics answers only the database's own components.
    #[command(flatten)]
    credentials: CredentialArgs,
    /// No earlier process ever ran under this server's name in this database: acknowledge writes
    /// at once instead of waiting one read lease for leases a predecessor may have granted. Only
    /// for whoever starts the process and knows it is the first of its name (the local mode, for
    /// a cluster it creates); never on a restart, so no environment variable.
    #[arg(long)]
    no_predecessor: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.into());
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    api::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let credentials = args.credentials.load(Component::Server, &args.name)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no credentials: pass --tls-dir (a directory with tls.crt, tls.key and ca.crt) or, with TLS off, \
             --internal-token-file and --database"
        )
    })?;
    let database_url = match &args.database_password_file {
        Some(file) => {
            let password = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read the database password file {}: {e}", file.display()))?;
            with_password(&args.database_url, password.trim())?
        }
        None => args.database_url.clone(),
    };
    let db = Db::connect_patiently(&database_url, args.db_connections, Duration::from_secs(60)).await?;
    let topology = match (&args.topology_file, &args.topology_configmap, &args.topology_url) {
        (Some(p), _, _) => topology_source::watch_file(p.clone()),
        (None, Some((namespace, name)), _) => {
            let client = kube::Client::try_default().await?;
            topology_source::watch_configmap(client, namespace, name)
        }
        (None, None, Some(url)) => {
            topology_source::watch_url(url.clone(), credentials.http_client(topology_source::URL_POLL_TIMEOUT))
        }
        (None, None, None) => topology_source::fixed(None),
    };
    let config = NodeConfig {
        name: args.name.clone(),
        peer_timeout: Duration::from_millis(args.peer_timeout_ms),
        body_limit: args.body_limit,
        cache_rows: args.cache_rows,
        cache_bytes: args.cache_bytes,
        body_timeout: args.serve.body_timeout,
        lease: Duration::from_millis(args.lease_ms),
        lease_renew: Duration::from_millis(args.lease_renew_ms),
        credentials: credentials.clone(),
        internal_auth: args.credentials.internal_auth,
    };
    anyhow::ensure!(
        args.lease_renew_ms > 0 && args.lease_renew_ms < args.lease_ms,
        "--lease-renew-ms must be positive and below --lease-ms"
    );
    let node = Node::new(config, db, topology);
    if args.no_predecessor {
        node.declare_no_predecessor();
    }
    node.start().await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let limits = args.serve.limits();
    let mode = args.credentials.internal_auth;
    tracing::info!(addr = %listener.local_addr()?, name = %args.name, scheme = credentials.scheme(), internal_auth = %mode, ?limits, "shard server listening");
    let warn = mode.weakness().map(|open| tokio::spawn(warn_every_minute(mode, open)));
    match credentials {
        Credentials::Tls(source) if mode == InternalAuth::Migrate => {
            shard_server::serve::serve_migrate(listener, app(node), limits, source.server_config(), shutdown()).await?
        }
        Credentials::Tls(source) => {
            shard_server::serve::serve_tls(listener, app(node), limits, source.server_config(), shutdown()).await?
        }
        Credentials::Token { .. } | Credentials::Plain => {
            shard_server::serve::serve(listener, app(node), limits, shutdown()).await?
        }
    }
    if let Some(w) = warn {
        w.abort();
    }
    Ok(())
}

/// `url` with `password` set (percent-encoded as a URL needs).
fn with_password(url: &str, password: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(url).map_err(|e| anyhow::anyhow!("--database-url is not a URL: {e}"))?;
    url.set_password(Some(password)).map_err(|()| anyhow::anyhow!("--database-url cannot hold a password"))?;
    Ok(url.into())
}

/// Says what `--internal-auth` leaves open, at start and every minute after, so it is not
/// forgotten in a log scrolled past.
async fn warn_every_minute(mode: InternalAuth, open: &'static str) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        tracing::warn!(internal_auth = %mode, "{open}");
    }
}

async fn shutdown() {
    shard_server::serve::shutdown_signal().await;
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_password_is_added_encoded() {
        let url = super::with_password("postgres://postgres@127.0.0.1:5432/sharddb", "a/b@c d").unwrap();
        assert_eq!(url, "postgres://postgres:a%2Fb%40c%20d@127.0.0.1:5432/sharddb");
    }
}
