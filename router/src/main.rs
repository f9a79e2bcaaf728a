//! `sharddb-router`: parses flags, follows the topology file, and serves the router's HTTP API
//! until SIGINT or SIGTERM. Does I/O.

use anyhow::Context;
use clap::Parser;
use router::config::Args;
use router::{AppState, app};
use shard_server::api::install_crypto_provider;
use shard_server::serve::{serve, serve_tls};
use shard_server::tls::{Component, Credentials, TlsFiles, TlsSource, source::RELOAD_EVERY};
use shard_server::topology_source::{watch_configmap, watch_file, watch_url};
use std::io::IsTerminal;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    install_crypto_provider();
    let args = Args::parse();
    if args.serve_tls && args.credentials.tls_dir.is_none() {
        anyhow::bail!("--serve-tls needs --tls-dir (the router's certificate)");
    }
    let mut config = args.config();
    let name = Component::Router.as_str();
    let credentials = args.credentials.load(Component::Router, name)?.context(
        "no credentials: pass --tls-dir (a directory with tls.crt, tls.key and ca.crt) or, with TLS off, \
         --internal-token-file and --database",
    )?;
    if let (Some(ca), Some(dir)) = (&args.control_ca, &args.credentials.tls_dir) {
        let source = TlsSource::open(TlsFiles { ca: ca.clone(), ..TlsFiles::in_dir(dir) })?;
        source.watch(RELOAD_EVERY);
        config.control_credentials = Some(Credentials::Tls(source));
    }
    config.credentials = Some(credentials.clone());
    let mode = args.credentials.internal_auth;
    if let Some(open) = mode.weakness() {
        tracing::warn!(internal_auth = %mode, "{open}");
    }
    tracing::info!(topology_file = ?args.topology_file, topology_configmap = ?args.topology_configmap, topology_url = ?args.topology_url, control_url = ?config.control_url, upstream_timeout = ?config.upstream_timeout, body_limit = config.body_limit, "starting");

    let topology = match (&args.topology_file, &args.topology_configmap, &args.topology_url) {
        (Some(path), _, _) => watch_file(path.clone()),
        (None, Some((namespace, name)), _) => {
            let client = kube::Client::try_default().await.context("no Kubernetes configuration found")?;
            watch_configmap(client, namespace, name)
        }
        (None, None, Some(url)) => {
            let control = config.control_credentials.as_ref().unwrap_or(&credentials);
            watch_url(url.clone(), control.http_client(shard_server::topology_source::URL_POLL_TIMEOUT))
        }
        (None, None, None) => {
            anyhow::bail!("one of --topology-file, --topology-configmap and --topology-url is required")
        }
    };
    let state = AppState::new(config, topology);
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let limits = args.serve_limits();
    tracing::info!(address = %listener.local_addr()?, tls = args.serve_tls, ?limits, "serving");
    match (&credentials, args.serve_tls) {
        (Credentials::Tls(source), true) => serve_tls(listener, app(state), limits, source.server_config(), shutdown())
            .await
            .context("server failed")?,
        _ => serve(listener, app(state), limits, shutdown()).await.context("server failed")?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM).
async fn shutdown() {
    shard_server::serve::shutdown_signal().await;
    tracing::info!("shutdown signal received; finishing requests in flight");
}
