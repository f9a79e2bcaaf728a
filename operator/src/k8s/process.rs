//! The `sharddb-operator run` process, in the order it comes up: connect to the API server (and
//! check the CRD is installed), load the operator's CA, serve health and metrics and the admin
//! endpoint, keep trusting every database's routers, then lead (with leader election, only once
//! the Lease is held) until a signal or the loss of leadership. Does I/O.
//!
//! What every replica serves, leading or not, is [`Background`]: the health and metrics port
//! (`/readyz` is ready only while this replica reconciles), the admin endpoint (a request there
//! only writes a spec at a version, safe from a follower) and the routers' trust. Stopping is the
//! reverse: the controller first (finishing reconciles in flight while the Lease is still
//! renewed), then the Lease released, then the background.

use super::controller::{Config, Context, Metrics, run};
use super::leader::{LeaderElector, LeaseConfig};
use super::pki::OperatorPki;
use crate::crd::ShardedDatabase;
use anyhow::Context as _;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the process listens.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// Health (`/healthz`, `/readyz`) and `/metrics`.
    pub metrics: SocketAddr,
    /// The admin endpoint the routers forward `/init`, `/add` and `/rm` to.
    pub admin: SocketAddr,
}

/// Runs the operator until SIGTERM or Ctrl-C (`Ok`) or until leadership is lost (`Err`, so that
/// Kubernetes restarts the pod as a follower). `ca_secret`: the namespace and name of the Secret
/// keeping the operator's CA; without it the CA lives in memory.
pub async fn run_operator(
    listen: Listen,
    config: Config,
    lease: Option<LeaseConfig>,
    ca_secret: Option<(String, String)>,
) -> anyhow::Result<()> {
    let client = connect(&config).await?;
    let pki = load_pki(&client, ca_secret.as_ref(), config.admin_url.as_deref()).await?;
    let mut registry = Registry::default();
    let trust_scope = config.namespaces.clone();
    let admin = super::admin::router(client.clone(), config.default_images.clone(), pki.clone());
    let ctx = Context::with_pki(client.clone(), config, Metrics::new(&mut registry), pki.clone());
    // True while the controller runs: after the Lease is acquired, when leader election is on.
    let reconciling = Arc::new(AtomicBool::new(false));
    let background = Background::start(listen, Arc::new(registry), reconciling.clone(), admin, &pki).await?;
    tokio::spawn(super::identities::trust_databases(
        client.clone(),
        pki,
        trust_scope,
        Duration::from_secs(10),
        background.stopped(),
    ));
    lead(ctx, lease.map(|lease| LeaderElector::new(client, lease)), background, reconciling).await
}

/// A client of the API server that serves the CRD: fails fast, saying what to do, rather than
/// watching a resource the server does not serve.
async fn connect(config: &Config) -> anyhow::Result<kube::Client> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration found (neither a kubeconfig nor an in-cluster service account)")?;
    let dbs: kube::Api<ShardedDatabase> = match config.namespaces.as_ref().and_then(|n| n.first()) {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    };
    match dbs.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(client),
        Err(kube::Error::Api(s)) if s.is_not_found() => anyhow::bail!(
            "the ShardedDatabase CRD is not installed; install it with `sharddb-operator crd | kubectl apply -f -`"
        ),
        Err(e) => Err(e).context("cannot list ShardedDatabases"),
    }
}

/// The operator's CA: kept in the Secret `ca_secret` (made there on first start), or in memory.
async fn load_pki(
    client: &kube::Client,
    ca_secret: Option<&(String, String)>,
    admin_url: Option<&str>,
) -> anyhow::Result<Arc<OperatorPki>> {
    match ca_secret {
        Some((namespace, name)) => {
            OperatorPki::load(client, namespace, name, admin_url).await.context("cannot load the operator's CA")
        }
        None => {
            tracing::warn!("no --operator-ca-secret: the operator's CA lives in memory and changes on restart");
            Ok(OperatorPki::ephemeral(admin_url))
        }
    }
}

/// What every replica serves, leading or not, until [`Background::stop`].
struct Background {
    stop: watch::Sender<bool>,
    metrics: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
}

impl Background {
    async fn start(
        listen: Listen,
        registry: Arc<Registry>,
        reconciling: Arc<AtomicBool>,
        admin: axum::Router,
        pki: &OperatorPki,
    ) -> anyhow::Result<Background> {
        let (stop, _) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind(listen.metrics)
            .await
            .with_context(|| format!("cannot listen on {}", listen.metrics))?;
        tracing::info!(metrics_addr = %listen.metrics, "serving metrics");
        let app = health_and_metrics(registry, reconciling);
        let stop_metrics = stopped(&stop);
        let metrics =
            tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop_metrics).await });

        let listener = tokio::net::TcpListener::bind(listen.admin)
            .await
            .with_context(|| format!("cannot listen on {}", listen.admin))?;
        tracing::info!(admin_addr = %listen.admin, "serving the admin endpoint");
        // TLS with the operator's certificate, and plain HTTP for the routers of databases in
        // internal-auth `none`; only a database's routers get past `k8s::admin`. Bounded as the
        // servers' ports are; only a few routers per database ever call it.
        let limits = shard_server::serve::ServeLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: shard_server::serve::ServeLimits::DEFAULT_BODY_TIMEOUT,
            idle_timeout: shard_server::serve::ServeLimits::DEFAULT_IDLE_TIMEOUT,
            max_connections: 256,
        };
        let tls = pki.admin_tls().server_config();
        let stop_admin = stopped(&stop);
        let admin =
            tokio::spawn(
                async move { shard_server::serve::serve_migrate(listener, admin, limits, tls, stop_admin).await },
            );
        Ok(Background { stop, metrics, admin })
    }

    /// Resolves once [`Background::stop`] (or [`Background::signal_stop`]) was called.
    fn stopped(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        stopped(&self.stop)
    }

    /// Tells everything waiting on [`Background::stopped`] to stop, without waiting.
    fn signal_stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the servers and waits until they have.
    async fn stop(self) -> anyhow::Result<()> {
        self.signal_stop();
        self.metrics.await.context("metrics server task failed")?.context("metrics server failed")?;
        self.admin.await.context("admin endpoint task failed")?.context("admin endpoint failed")?;
        Ok(())
    }
}

/// Resolves once `stop` holds `true`.
fn stopped(stop: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// `/healthz`, `/readyz` (ready while `reconciling`) and `/metrics` from `registry`.
fn health_and_metrics(registry: Arc<Registry>, reconciling: Arc<AtomicBool>) -> axum::Router {
    use axum::http::StatusCode;
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = reconciling.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not reconciling (waiting for the Lease)")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (StatusCode::OK, body),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                    }
                }
            }),
        )
}

/// Waits for the Lease (when `elector`), runs the controller until a signal or the loss of
/// leadership, then stops in order (see the module's doc).
async fn lead(
    ctx: Arc<Context>,
    elector: Option<LeaderElector>,
    background: Background,
    reconciling: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let shutdown = shard_server::serve::shutdown_signal();
    tokio::pin!(shutdown);
    // A follower only waits; it does nothing that needs undoing when stopped.
    if let Some(elector) = &elector {
        let lease = elector.config();
        tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the Lease");
        tokio::select! {
            () = elector.acquire() => {}
            () = &mut shutdown => return background.stop().await,
        }
    }
    // Leadership lost is the one way `hold` ends; without an elector there is nothing to lose.
    let lost = async {
        match &elector {
            Some(elector) => elector.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost);

    // Boxed rather than pinned on the stack so that it can be dropped (cancelling every reconcile
    // in flight) the moment leadership is lost.
    let mut controller = Box::pin(run(ctx, background.stopped()));
    reconciling.store(true, Ordering::Relaxed);
    let outcome = tokio::select! {
        () = &mut controller => Ok(()),
        reason = &mut lost => {
            // Another replica may already be acting: stop at once, without finishing reconciles
            // in flight (dropping the controller cancels them), and exit non-zero so Kubernetes
            // restarts this pod as a follower.
            Err(anyhow::Error::new(reason).context("lost leadership; stopping"))
        }
        () = &mut shutdown => {
            tracing::info!("stopping: finishing reconciles in flight");
            background.signal_stop();
            // Keep renewing while reconciles finish, so nobody else starts meanwhile.
            tokio::select! {
                () = &mut controller => Ok(()),
                reason = &mut lost => Err(anyhow::Error::new(reason).context("lost leadership while stopping")),
            }
        }
    };
    drop(controller);
    reconciling.store(false, Ordering::Relaxed);
    if outcome.is_ok()
        && let Some(elector) = &elector
    {
        // Only after the controller stopped acting: a follower may take over right away.
        match elector.release().await {
            Ok(()) => tracing::info!("released the Lease"),
            Err(error) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(error)), "failed to release the Lease")
            }
        }
    }
    background.stop().await?;
    outcome
}
