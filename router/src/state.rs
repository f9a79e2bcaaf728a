//! The routing state: the routing table derived from one topology document (ordered ranges, a
//! ring per shard over its ready replicas, one client per server) and the [`RoutingTable`] that
//! holds the current one, swapped atomically when a newer document is built. Plain data that the
//! request path (`upstream`, `coalesce`, the handlers) reads; it knows none of them. Building is
//! pure; [`RoutingTable::wait_newer`] only awaits a change.

use crate::ring::Ring;
use crate::routing::Ranges;
use arc_swap::ArcSwapOption;
use shard_server::api::ShardClient;
use shard_server::schema::{Schema, SchemaError};
use shard_server::topology::Topology;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Everything needed to route one request, derived from one topology document. Immutable: a new
/// document produces a new `Routing`.
#[derive(Debug)]
pub struct Routing {
    pub topology: Arc<Topology>,
    pub schema: Schema,
    pub ranges: Ranges,
    /// In topology (key) order, aligned with `ranges`.
    pub shards: Vec<ShardRoute>,
    pub servers: Vec<ServerRoute>,
}

#[derive(Debug)]
pub struct ShardRoute {
    pub id: String,
    /// Index into `Routing::servers`.
    pub primary: usize,
    /// Ready replicas (indices into `Routing::servers`), in server-name order; the ring's member
    /// indices point into this list.
    pub ready: Vec<usize>,
    pub ring: Arc<Ring>,
}

#[derive(Debug)]
pub struct ServerRoute {
    pub name: String,
    pub client: ShardClient,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("topology epoch {epoch}: schema: {source}")]
    Schema {
        epoch: u64,
        #[source]
        source: SchemaError,
    },
    #[error("topology epoch {epoch}: shard {shard} names unknown server {server}")]
    UnknownServer { epoch: u64, shard: String, server: String },
}

impl Routing {
    /// Derives the routing table. `http` is shared by every server's client (one connection pool).
    pub fn build(topology: Arc<Topology>, http: &reqwest::Client) -> Result<Routing, BuildError> {
        let epoch = topology.epoch;
        let schema = topology.schema().map_err(|source| BuildError::Schema { epoch, source })?;
        let servers: Vec<ServerRoute> = topology
            .servers
            .iter()
            .map(|(name, s)| ServerRoute { name: name.clone(), client: ShardClient::new(http.clone(), s.url.as_str()) })
            .collect();
        let index: HashMap<&str, usize> = topology.servers.keys().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let server_index = |shard: &str, name: &str| {
            index.get(name).copied().ok_or_else(|| BuildError::UnknownServer {
                epoch,
                shard: shard.to_owned(),
                server: name.to_owned(),
            })
        };
        // Shards with the same ready set share one ring (rings with many virtual nodes are not free).
        let mut rings: BTreeMap<Vec<usize>, Arc<Ring>> = BTreeMap::new();
        let mut shards = Vec::with_capacity(topology.shards.len());
        for sh in &topology.shards {
            let primary = server_index(&sh.id, &sh.primary)?;
            let ready = sh.ready_replicas().map(|n| server_index(&sh.id, n)).collect::<Result<Vec<_>, _>>()?;
            let ring = rings
                .entry(ready.clone())
                .or_insert_with(|| {
                    let ids: Vec<u32> = ready.iter().map(|&i| topology.servers[&servers[i].name].id).collect();
                    Arc::new(Ring::new(topology.ring.kind, &ids))
                })
                .clone();
            shards.push(ShardRoute { id: sh.id.clone(), primary, ready, ring });
        }
        Ok(Routing { ranges: Ranges::from_shards(&topology.shards), topology, schema, shards, servers })
    }

    pub fn epoch(&self) -> u64 {
        self.topology.epoch
    }

    pub fn shard_index(&self, id: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.id == id)
    }

    pub fn primary(&self, shard: usize) -> &ServerRoute {
        &self.servers[self.shards[shard].primary]
    }

    /// The ready replicas of `shard` in the order to try them for `request` (ring choice first).
    pub fn read_candidates(&self, shard: usize, request: u64) -> impl Iterator<Item = &ServerRoute> {
        let sh = &self.shards[shard];
        sh.ring.candidates(request).into_iter().map(move |m| &self.servers[sh.ready[m]])
    }
}

/// The current routing table: lock-free reads on the request path, atomic swaps on change, and a
/// way to wait for a newer one.
pub struct RoutingTable {
    current: ArcSwapOption<Routing>,
    epoch: watch::Sender<u64>,
}

impl Default for RoutingTable {
    fn default() -> Self {
        RoutingTable { current: ArcSwapOption::empty(), epoch: watch::channel(0).0 }
    }
}

impl RoutingTable {
    pub fn current(&self) -> Option<Arc<Routing>> {
        self.current.load_full()
    }

    /// Installs `routing` unless the table already holds the same or a newer epoch.
    pub fn publish(&self, routing: Routing) -> bool {
        let epoch = routing.epoch();
        if self.current.load().as_ref().is_some_and(|r| r.epoch() >= epoch) {
            return false;
        }
        self.current.store(Some(Arc::new(routing)));
        self.epoch.send_replace(epoch);
        true
    }

    /// Waits up to `timeout` for a routing table newer than `epoch`.
    pub async fn wait_newer(&self, epoch: u64, timeout: Duration) -> Option<Arc<Routing>> {
        let mut rx = self.epoch.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|&e| e > epoch)).await {
            Ok(Ok(_)) => self.current(),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shard_server::topology::ReplicaState;

    pub(crate) fn topology(epoch: u64) -> Topology {
        let doc = serde_json::json!({
            "version": 1, "epoch": epoch,
            "schema": {"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"]},
            "servers": {
                "Server0": {"id": 0, "url": "http://127.0.0.1:1"},
                "Server1": {"id": 1, "url": "http://127.0.0.1:2"},
                "Server2": {"id": 2, "url": "http://127.0.0.1:3"}
            },
            "shards": [
                {"id": "sh1", "low": 0, "size": 4096, "primary": "Server0",
                 "replicas": {"Server0": "ready", "Server1": "ready", "Server2": "recovering"}},
                {"id": "sh2", "low": 4096, "size": 4096, "primary": "Server1",
                 "replicas": {"Server0": "ready", "Server1": "ready", "Server2": "leaving"}},
                {"id": "sh3", "low": 10000, "size": 100, "primary": "Server2",
                 "replicas": {"Server2": "ready"}}
            ]
        });
        Topology::parse(doc.to_string().as_bytes()).unwrap()
    }

    fn http() -> reqwest::Client {
        shard_server::api::install_crypto_provider();
        shard_server::api::http_client(Duration::from_secs(1))
    }

    #[test]
    fn routing_reads_only_ready_replicas_and_writes_to_the_primary() {
        let r = Routing::build(Arc::new(topology(4)), &http()).unwrap();
        assert_eq!(r.epoch(), 4);
        assert_eq!(r.shards.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["sh1", "sh2", "sh3"]);
        assert_eq!(r.primary(1).name, "Server1");
        assert_eq!(r.primary(1).client.base(), "http://127.0.0.1:2");
        for req in 0..50 {
            let names: Vec<&str> = r.read_candidates(0, req).map(|s| s.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(sorted, ["Server0", "Server1"], "recovering replicas serve no reads");
        }
        assert_eq!(r.read_candidates(2, 9).map(|s| s.name.as_str()).collect::<Vec<_>>(), ["Server2"]);
        assert!(Arc::ptr_eq(&r.shards[0].ring, &r.shards[1].ring), "same ready set, one ring");
        assert_eq!(r.ranges.shard_for_key(10050), Some(2));
        assert_eq!(r.shard_index("sh3"), Some(2));
        assert_eq!(r.shard_index("nope"), None);
    }

    #[tokio::test]
    async fn the_table_only_moves_forward_and_wakes_waiters() {
        let table = Arc::new(RoutingTable::default());
        assert!(table.current().is_none());
        assert!(table.publish(Routing::build(Arc::new(topology(5)), &http()).unwrap()));
        assert!(!table.publish(Routing::build(Arc::new(topology(4)), &http()).unwrap()), "older epoch ignored");
        assert!(!table.publish(Routing::build(Arc::new(topology(5)), &http()).unwrap()), "same epoch ignored");
        assert_eq!(table.current().unwrap().epoch(), 5);
        assert!(table.wait_newer(5, Duration::from_millis(50)).await.is_none(), "times out without a change");
        let t2 = table.clone();
        let waiter = tokio::spawn(async move { t2.wait_newer(5, Duration::from_secs(5)).await.map(|r| r.epoch()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut doc = topology(6);
        doc.shards[0].replicas.insert("Server2".into(), ReplicaState::Ready);
        table.publish(Routing::build(Arc::new(doc), &http()).unwrap());
        assert_eq!(waiter.await.unwrap(), Some(6));
    }
}
