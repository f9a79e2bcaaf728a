//! Where the data lives in the system under test: shards (key ranges, primary, replicas) and
//! servers (URL, Postgres URL, pids), read from a local cluster's files or from a router's
//! `/status`. Also the rows the benchmark writes. Does I/O only in the two constructors.

use crate::ClusterFile;
use crate::bench::procstat::Watched;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use shard_server::topology::{ReplicaState, Topology};
use std::collections::BTreeMap;

/// The student table's columns, which every benchmark row follows.
pub const COLUMNS: [&str; 3] = ["Stud_id", "Stud_name", "Stud_marks"];
pub const KEY: &str = "Stud_id";

#[derive(Clone, Debug)]
pub struct ShardPlace {
    pub id: String,
    pub low: i64,
    pub size: i64,
    /// The primary first, then the other ready replicas in name order.
    pub replicas: Vec<String>,
}

impl ShardPlace {
    pub fn high_exclusive(&self) -> i64 {
        self.low + self.size
    }
}

#[derive(Clone, Debug, Default)]
pub struct ServerPlace {
    pub url: Option<String>,
    /// The server's Postgres database (for the baseline).
    pub pg_url: Option<String>,
    pub pid: Option<u32>,
    pub pg_pid: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Layout {
    /// Ordered by `low`.
    pub shards: Vec<ShardPlace>,
    pub servers: BTreeMap<String, ServerPlace>,
    pub router_pid: Option<u32>,
}

/// One benchmark row: `{"Stud_id": k, "Stud_name": "s<k>", "Stud_marks": k % 100}`. Deterministic,
/// so a rerun against the same data writes identical rows (a no-op success, never a conflict).
pub fn row_name(key: i64) -> String {
    format!("s{key}")
}
pub fn row_marks(key: i64) -> i64 {
    key % 100
}

impl Layout {
    /// From a local cluster's `cluster.json` and topology file.
    pub fn from_cluster(file: &ClusterFile) -> Result<Layout> {
        let bytes = std::fs::read(&file.topology).with_context(|| format!("reading {}", file.topology.display()))?;
        let topology = Topology::parse(&bytes)?;
        let mut servers = BTreeMap::new();
        for s in &file.servers {
            servers.insert(
                s.name.clone(),
                ServerPlace {
                    url: Some(s.url.clone()),
                    pg_url: Some(s.postgres.connect_url()?),
                    pid: s.pid,
                    pg_pid: s.postgres.pid,
                },
            );
        }
        let shards = topology
            .shards
            .iter()
            .map(|sh| {
                let mut replicas = vec![sh.primary.clone()];
                replicas.extend(
                    sh.replicas
                        .iter()
                        .filter(|(n, st)| **st == ReplicaState::Ready && **n != sh.primary)
                        .map(|(n, _)| n.clone()),
                );
                ShardPlace { id: sh.id.clone(), low: sh.low, size: sh.size, replicas }
            })
            .collect();
        let layout = Layout { shards, servers, router_pid: file.router.pid };
        layout.check_schema(&topology.schema.columns)?;
        Ok(layout)
    }

    /// From a router's `GET /status`; server `i` (in name order) gets baseline database
    /// `baseline_dbs[i % len]`.
    pub async fn from_router(http: &reqwest::Client, router: &str, baseline_dbs: &[String]) -> Result<Layout> {
        #[derive(Deserialize)]
        struct Status {
            schema: Schema,
            shards: Vec<serde_json::Map<String, serde_json::Value>>,
            servers: BTreeMap<String, Vec<String>>,
        }
        #[derive(Deserialize)]
        struct Schema {
            columns: Vec<String>,
        }
        let url = format!("{}/status", router.trim_end_matches('/'));
        let status: Status = http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .error_for_status()?
            .json()
            .await
            .with_context(|| format!("{url} is not a sharddb /status answer"))?;
        let mut shards = Vec::new();
        for m in &status.shards {
            let get_i = |k: &str| m.get(k).and_then(|v| v.as_i64()).with_context(|| format!("/status shard lacks {k}"));
            let id = m.get("Shard_id").and_then(|v| v.as_str()).context("/status shard lacks Shard_id")?.to_owned();
            let primary = m.get("primary").and_then(|v| v.as_str()).map(str::to_owned);
            let ready: Vec<String> = match m.get("replicas").and_then(|v| v.as_object()) {
                Some(r) => r.iter().filter(|(_, st)| st.as_str() == Some("ready")).map(|(n, _)| n.clone()).collect(),
                None => status.servers.iter().filter(|(_, s)| s.contains(&id)).map(|(n, _)| n.clone()).collect(),
            };
            let primary = primary.or_else(|| ready.first().cloned()).context("/status shard has no replica")?;
            let mut replicas = vec![primary.clone()];
            replicas.extend(ready.into_iter().filter(|n| *n != primary));
            shards.push(ShardPlace { id, low: get_i(&format!("{KEY}_low"))?, size: get_i("Shard_size")?, replicas });
        }
        shards.sort_by_key(|s| s.low);
        let servers = status
            .servers
            .keys()
            .enumerate()
            .map(|(i, name)| {
                let pg_url = (!baseline_dbs.is_empty()).then(|| baseline_dbs[i % baseline_dbs.len()].clone());
                (name.clone(), ServerPlace { pg_url, ..ServerPlace::default() })
            })
            .collect();
        let layout = Layout { shards, servers, router_pid: None };
        layout.check_schema(&status.schema.columns)?;
        Ok(layout)
    }

    fn check_schema(&self, columns: &[String]) -> Result<()> {
        if columns != COLUMNS {
            bail!("the benchmark writes the seed's student table ({COLUMNS:?}); this database has {columns:?}");
        }
        if self.shards.is_empty() {
            bail!("the database has no shards");
        }
        Ok(())
    }

    /// The index of the shard holding `key`.
    pub fn shard_of(&self, key: i64) -> Option<usize> {
        self.shards.iter().position(|s| key >= s.low && key < s.high_exclusive())
    }

    /// Every key of every shard, in order.
    pub fn all_keys(&self) -> impl Iterator<Item = i64> + '_ {
        self.shards.iter().flat_map(|s| s.low..s.high_exclusive())
    }

    pub fn key_space(&self) -> i64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    /// The pids whose CPU time counts as the system's.
    pub fn watched(&self) -> Watched {
        Watched {
            router: self.router_pid,
            shard_servers: self.servers.values().filter_map(|s| s.pid).collect(),
            postgres: self.servers.values().filter_map(|s| s.pg_pid).collect(),
        }
    }

    /// The mean number of copies of a shard.
    pub fn mean_replicas(&self) -> f64 {
        self.shards.iter().map(|s| s.replicas.len()).sum::<usize>() as f64 / self.shards.len().max(1) as f64
    }
}
