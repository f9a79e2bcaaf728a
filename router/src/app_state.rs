//! [`AppState`]: the handle every request handler shares (configuration, the routing table, the
//! coalescing lanes, the control plane, metrics and the request-id counter), and [`follow`], which
//! keeps the routing table in step with the topology. Does I/O only in `follow` (it awaits
//! topology changes).
//!
//! Any topology source (the file watcher, the ConfigMap watch) feeds the router through the same
//! `watch` channel of `shard_server::topology_source`, so the router does not care where
//! documents come from.

use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::control::ControlPlane;
use crate::error::RouterError;
use crate::metrics::Metrics;
use crate::state::{Routing, RoutingTable};
use crate::upstream::Upstream;
use shard_server::api::http_client;
use shard_server::topology_source::TopologyRx;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::task::JoinHandle;

/// Follows `topology`, rebuilding and publishing the routing table on every newer document. Builds
/// run on the blocking pool so request handling never waits on them; requests keep using the old
/// table until the new one is swapped in.
pub fn follow(
    table: Arc<RoutingTable>,
    mut topology: TopologyRx,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let doc = topology.borrow_and_update().clone();
            if let Some(doc) = doc {
                let newer = table.current().is_none_or(|r| r.epoch() < doc.epoch);
                if newer {
                    let http = http.clone();
                    match tokio::task::spawn_blocking(move || Routing::build(doc, &http)).await {
                        Ok(Ok(routing)) => install(&table, &metrics, routing),
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot route with this topology; keeping the previous one")
                        }
                        Err(e) => tracing::error!(error = %e, "routing table build panicked"),
                    }
                }
            }
            if topology.changed().await.is_err() {
                tracing::warn!("topology source closed; keeping the current routing table");
                return;
            }
        }
    })
}

fn install(table: &RoutingTable, metrics: &Metrics, routing: Routing) {
    let epoch = routing.epoch();
    let shards = routing.shards.len();
    if table.publish(routing) {
        metrics.set_epoch(epoch);
        tracing::info!(epoch, shards, "routing table updated");
    }
}

/// Handle to everything request handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Config,
    coalescer: Coalescer,
    control: ControlPlane,
    routing: Arc<RoutingTable>,
    metrics: Arc<Metrics>,
    request_ids: AtomicU64,
    follower: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl AppState {
    /// Starts following `topology` (must run inside a Tokio runtime). A document already in the
    /// channel is routed before this returns, so the first request does not race the first build.
    pub fn new(config: Config, topology: TopologyRx) -> AppState {
        let http = match &config.credentials {
            Some(credentials) => credentials.http_client(config.upstream_timeout),
            None => http_client(config.upstream_timeout),
        };
        let routing = Arc::new(RoutingTable::default());
        let metrics = Arc::new(Metrics::new());
        let initial = topology.borrow().clone();
        if let Some(doc) = initial {
            match Routing::build(doc, &http) {
                Ok(r) => install(&routing, &metrics, r),
                Err(e) => tracing::error!(error = %e, "cannot route with the initial topology"),
            }
        }
        let follower = follow(routing.clone(), topology, http, metrics.clone());
        let control = ControlPlane::from_url(config.control_url.as_deref(), config.control_credentials());
        let upstream = Upstream::new(routing.clone(), config.retry.clone(), metrics.clone());
        AppState(Arc::new(Inner {
            config,
            coalescer: Coalescer::new(upstream),
            control,
            routing,
            metrics,
            request_ids: AtomicU64::new(0),
            follower,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// Where the admin verbs (`/init`, `/add`, `/rm`) go.
    pub fn control(&self) -> &ControlPlane {
        &self.0.control
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Calls to shard servers, through the per-shard lanes (see [`crate::coalesce`]).
    pub fn coalescer(&self) -> &Coalescer {
        &self.0.coalescer
    }

    pub fn table(&self) -> &RoutingTable {
        &self.0.routing
    }

    /// The routing table, or 503 before the first topology.
    pub fn routing(&self) -> Result<Arc<Routing>, RouterError> {
        self.0.routing.current().ok_or(RouterError::NoTopology)
    }

    /// A fresh request id for replica choice (see `ring`: a counter spreads even a hot key).
    pub fn next_request_id(&self) -> u64 {
        self.0.request_ids.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::topology;
    use std::time::Duration;
    use tokio::sync::watch;

    #[tokio::test]
    async fn state_follows_a_topology_file_without_restart() {
        use shard_server::topology_source::{watch_file, write_atomic};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        let state = AppState::new(Config::default(), watch_file(path.clone()));
        assert!(matches!(state.routing(), Err(RouterError::NoTopology)), "no file yet");
        write_atomic(&path, &topology(3)).unwrap();
        let r = state.table().wait_newer(0, Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.epoch(), 3);
        let mut next = topology(4);
        next.shards[0].primary = "Server1".into();
        write_atomic(&path, &next).unwrap();
        let r = state.table().wait_newer(3, Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.primary(0).name, "Server1");
    }

    #[tokio::test]
    async fn state_follows_the_topology_channel() {
        let (tx, rx) = watch::channel(None);
        let state = AppState::new(Config::default(), rx);
        assert!(matches!(state.routing(), Err(RouterError::NoTopology)));
        shard_server::topology_source::offer(&tx, topology(2));
        let r = state.table().wait_newer(0, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.epoch(), 2);
        assert_eq!(state.routing().unwrap().epoch(), 2);
        assert_eq!(state.next_request_id() + 1, state.next_request_id());
    }
}
