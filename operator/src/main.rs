//! `sharddb-operator`: runs the Kubernetes operator (`run`), runs a ShardedDatabase locally
//! (`local`), or prints the CRD (`crd`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use operator::local::{LocalOptions, run_local};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "sharddb-operator", version, about = "The sharddb control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a ShardedDatabase on this machine: one throwaway Postgres and one shard server per
    /// server, and a router. Prints the router URL; stops everything on Ctrl-C or SIGTERM.
    Local {
        /// The ShardedDatabase resource (YAML, as given to kubectl apply).
        spec: PathBuf,
        /// Where data, logs, topology.json and cluster.json go; a new temporary directory (kept)
        /// when absent. An existing directory's data is reused.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The router's port on 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// Directory holding sharddb-shard-server and sharddb-router; default: this program's own.
        #[arg(long, env = "SHARDDB_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Directory holding the PostgreSQL binaries (initdb, pg_ctl); default: initdb on PATH, else
        /// the newest /usr/lib/postgresql/*/bin.
        #[arg(long, env = "SHARDDB_PG_BIN")]
        pg_bin: Option<PathBuf>,
    },
    /// Print the ShardedDatabase CustomResourceDefinition as YAML.
    Crd,
    /// Run the Kubernetes operator: reconcile every ShardedDatabase in the cluster (kubeconfig or
    /// in-cluster configuration) until SIGTERM or Ctrl-C.
    Run {
        /// Where `/metrics` (Prometheus) and `/healthz` are served.
        #[arg(long, env = "SHARDDB_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    shard_server::api::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", operator::crd::crd_yaml().context("failed to render the CRD")?);
            Ok(())
        }
        Command::Run { metrics_addr } => {
            let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            runtime.block_on(run_operator(metrics_addr))
        }
        Command::Local { spec, data_dir, port, bin_dir, pg_bin } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .context("cannot find this program's path; pass --bin-dir")?
                    .parent()
                    .context("this program has no directory; pass --bin-dir")?
                    .to_owned(),
            };
            let opts = LocalOptions { spec, data_dir, port, bin_dir, pg_bin };
            let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            runtime.block_on(run_local(opts))?;
            Ok(())
        }
    }
}

async fn run_operator(metrics_addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use operator::crd::ShardedDatabase;
    use operator::k8s::controller::{Context, Metrics, run};
    use std::sync::Arc;

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration found (neither a kubeconfig nor an in-cluster service account)")?;
    // Fail fast and say what to do, rather than watching a resource the server does not serve.
    let dbs: kube::Api<ShardedDatabase> = kube::Api::all(client.clone());
    match dbs.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => anyhow::bail!(
            "the ShardedDatabase CRD is not installed; install it with `sharddb-operator crd | kubectl apply -f -`"
        ),
        Err(e) => return Err(e).context("cannot list ShardedDatabases"),
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let ctx = Context::new(client, Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" })).route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (axum::http::StatusCode::OK, body),
                    Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr}"))?;
    tracing::info!(%metrics_addr, "serving metrics");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics_stop = stop_rx.clone();
    let metrics = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = metrics_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut controller_stop = stop_rx;
    let controller = run(ctx, async move {
        let _ = controller_stop.wait_for(|s| *s).await;
    });
    tokio::pin!(controller);
    tokio::select! {
        () = &mut controller => {}
        () = shutdown_signal() => {
            tracing::info!("stopping: finishing reconciles in flight");
            let _ = stop_tx.send(true);
            controller.await;
        }
    }
    let _ = stop_tx.send(true);
    metrics.await.context("metrics server task failed")?.context("metrics server failed")?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (how Kubernetes stops a pod).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
