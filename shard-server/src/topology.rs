//! The topology document: the one JSON document the operator writes and routers and shard servers
//! follow (a file in local mode, a ConfigMap in Kubernetes). Types, parsing and validation; pure.
//!
//! Contract: `version` names the document format; `epoch` increases on every change and fences
//! deposed primaries. Readers ignore a document whose epoch is not newer than the one they hold.
//!
//! Versions (see [`crate::api`], versions, for the rules of the whole contract): routers and
//! servers of release N−1 read what an operator of release N writes, and the reverse. A field
//! added to the document is optional with a default meaning what the previous release did, and
//! readers ignore fields they do not know, so `version` stays 1 through such changes. It moves
//! only for a change an older reader must not follow (it then keeps the document it has, and
//! says why); an operator writes such a document only once no reader of the previous version
//! is left.

use crate::schema::{Schema, SchemaError, SchemaSpec, check_ident};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The document format this build reads and writes.
pub const TOPOLOGY_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub version: u32,
    pub epoch: u64,
    pub schema: SchemaSpec,
    #[serde(default)]
    pub ring: RingSpec,
    /// Server name → where to reach it.
    pub servers: BTreeMap<String, ServerEntry>,
    /// Shards ordered by `low`.
    pub shards: Vec<ShardEntry>,
    /// What a router does with a written row whose key is in no shard. Absent means `reject`.
    #[serde(default, skip_serializing_if = "UnroutedKeys::is_reject")]
    pub unrouted_keys: UnroutedKeys,
}

/// What a router does with a written row whose key lies in no shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnroutedKeys {
    /// The whole write is refused (400) and nothing is written.
    #[default]
    Reject,
    /// The rows that belong to a shard are written; the others are skipped, and the answer says
    /// how many and which keys. The seed's behaviour, which its clients depend on.
    Skip,
}

impl UnroutedKeys {
    pub fn is_reject(&self) -> bool {
        *self == UnroutedKeys::Reject
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Stable numeric id (the seed ring hashes it).
    pub id: u32,
    /// Base URL, e.g. `http://127.0.0.1:7001`.
    pub url: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub id: String,
    /// Lowest key of the half-open range `[low, low + size)`.
    pub low: i64,
    pub size: i64,
    /// The server that accepts writes for this shard.
    pub primary: String,
    /// Every server holding a copy (the primary included) and the state of its copy.
    pub replicas: BTreeMap<String, ReplicaState>,
    /// Server → the `copy_id` its copy reported when it was last known complete. Written by the
    /// operator so that a copy which started over empty (lost volume) is recognised even after an
    /// operator restart; servers and routers ignore it. Absent in older documents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub copies: BTreeMap<String, String>,
}

impl ShardEntry {
    /// One past the highest key (`low + size`; validated not to overflow).
    pub fn high_exclusive(&self) -> i64 {
        self.low + self.size
    }
    pub fn contains(&self, key: i64) -> bool {
        key >= self.low && key < self.high_exclusive()
    }
    /// Servers whose copy serves reads, in name order.
    pub fn ready_replicas(&self) -> impl Iterator<Item = &str> {
        self.replicas.iter().filter(|(_, s)| **s == ReplicaState::Ready).map(|(n, _)| n.as_str())
    }
}

/// The state of one copy of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Complete and kept in step: serves reads; every write waits for it.
    Ready,
    /// Being filled from the primary: receives writes, serves no reads, holds up no acknowledgement.
    Recovering,
    /// Being drained before removal: receives writes, serves no reads.
    Leaving,
}

/// How routers choose a replica for a read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSpec {
    #[serde(default)]
    pub kind: RingKind,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RingKind {
    /// A hash ring with many virtual nodes per server: spreads reads evenly.
    #[default]
    Hash,
    /// The original system's 512-slot quadratic ring, kept for compatibility.
    Seed,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("topology version {0} is not supported (this build reads {TOPOLOGY_VERSION})")]
    Version(u32),
    #[error("topology schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("topology: {0}")]
    Invalid(String),
}

impl Topology {
    /// Parses and validates a document.
    pub fn parse(bytes: &[u8]) -> Result<Topology, TopologyError> {
        let t: Topology = serde_json::from_slice(bytes)?;
        t.validate()?;
        Ok(t)
    }

    /// Checks the invariants every reader relies on.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(m));
        if self.version != TOPOLOGY_VERSION {
            return Err(TopologyError::Version(self.version));
        }
        self.schema()?;
        let mut ids = std::collections::BTreeSet::new();
        for (name, s) in &self.servers {
            check_ident("server", name).map_err(|e| TopologyError::Invalid(e.to_string()))?;
            if !ids.insert(s.id) {
                return bad(format!("server id {} is used twice", s.id));
            }
        }
        let mut prev: Option<&ShardEntry> = None;
        for sh in &self.shards {
            check_ident("shard", &sh.id).map_err(|e| TopologyError::Invalid(e.to_string()))?;
            if sh.size <= 0 || sh.low.checked_add(sh.size).is_none() {
                return bad(format!("shard {} has an invalid range", sh.id));
            }
            if let Some(p) = prev
                && p.high_exclusive() > sh.low
            {
                return bad(format!("shards {} and {} overlap or are out of order", p.id, sh.id));
            }
            if self.shards.iter().filter(|o| o.id == sh.id).count() > 1 {
                return bad(format!("shard id {} appears twice", sh.id));
            }
            for server in sh.replicas.keys().chain(sh.copies.keys()) {
                if !self.servers.contains_key(server) {
                    return bad(format!("shard {} names unknown server {server}", sh.id));
                }
            }
            if sh.replicas.get(&sh.primary) != Some(&ReplicaState::Ready) {
                return bad(format!("shard {}: primary {} is not a ready replica", sh.id, sh.primary));
            }
            prev = Some(sh);
        }
        Ok(())
    }

    pub fn schema(&self) -> Result<Schema, SchemaError> {
        Schema::try_from(self.schema.clone())
    }

    pub fn shard(&self, id: &str) -> Option<&ShardEntry> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The shard whose range holds `key` (binary search over the ordered ranges).
    pub fn shard_for_key(&self, key: i64) -> Option<&ShardEntry> {
        let i = self.shards.partition_point(|s| s.high_exclusive() <= key);
        self.shards.get(i).filter(|s| s.contains(key))
    }

    /// Shards held by `server`, with the state of its copy.
    pub fn shards_of<'a>(&'a self, server: &'a str) -> impl Iterator<Item = (&'a ShardEntry, ReplicaState)> + 'a {
        self.shards.iter().filter_map(move |s| s.replicas.get(server).map(|st| (s, *st)))
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("topology serialises")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Topology {
        let doc = r#"{
          "version": 1, "epoch": 3,
          "schema": {"columns": ["Stud_id","Stud_name","Stud_marks"], "dtypes": ["Number","String","Number"]},
          "servers": {"Server0": {"id": 0, "url": "http://127.0.0.1:1"},
                      "Server1": {"id": 1, "url": "http://127.0.0.1:2"}},
          "shards": [
            {"id": "sh1", "low": 0, "size": 4096, "primary": "Server0",
             "replicas": {"Server0": "ready", "Server1": "recovering"}},
            {"id": "sh2", "low": 4096, "size": 4096, "primary": "Server1",
             "replicas": {"Server0": "ready", "Server1": "ready"}}
          ]
        }"#;
        Topology::parse(doc.as_bytes()).unwrap()
    }

    #[test]
    fn parses_and_answers_routing_questions() {
        let t = sample();
        assert_eq!(t.ring.kind, RingKind::Hash, "hash ring is the default");
        assert_eq!(t.shard_for_key(0).unwrap().id, "sh1");
        assert_eq!(t.shard_for_key(4095).unwrap().id, "sh1");
        assert_eq!(t.shard_for_key(4096).unwrap().id, "sh2");
        assert_eq!(t.shard_for_key(8191).unwrap().id, "sh2");
        assert!(t.shard_for_key(8192).is_none());
        assert!(t.shard_for_key(-1).is_none());
        assert_eq!(t.shard("sh1").unwrap().ready_replicas().collect::<Vec<_>>(), ["Server0"]);
        let held: Vec<_> = t.shards_of("Server1").map(|(s, st)| (s.id.as_str(), st)).collect();
        assert_eq!(held, [("sh1", ReplicaState::Recovering), ("sh2", ReplicaState::Ready)]);
    }

    #[test]
    fn round_trips_through_json() {
        let mut t = sample();
        assert!(!t.to_json_pretty().contains("copies"), "an empty map is left out");
        assert_eq!(Topology::parse(t.to_json_pretty().as_bytes()).unwrap(), t);
        t.shards[0].copies.insert("Server0".into(), "c-0".into());
        assert_eq!(Topology::parse(t.to_json_pretty().as_bytes()).unwrap(), t);
        assert_eq!(t.unrouted_keys, UnroutedKeys::Reject, "absent means reject");
        assert!(!t.to_json_pretty().contains("unrouted_keys"), "the default is left out");
        t.unrouted_keys = UnroutedKeys::Skip;
        assert!(t.to_json_pretty().contains(r#""unrouted_keys": "skip""#));
        assert_eq!(Topology::parse(t.to_json_pretty().as_bytes()).unwrap(), t);
    }

    #[test]
    fn a_newer_operators_additions_are_ignored() {
        let mut doc: serde_json::Value = serde_json::from_str(&sample().to_json_pretty()).unwrap();
        doc["rollout"] = serde_json::json!({"server": "Server1"});
        doc["servers"]["Server0"]["zone"] = "a".into();
        doc["shards"][0]["weight"] = 2.into();
        let t = Topology::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(t, sample(), "the same document to this build");
    }

    #[test]
    fn rejects_broken_documents() {
        let broken = |f: &dyn Fn(&mut Topology)| {
            let mut t = sample();
            f(&mut t);
            t.validate().unwrap_err().to_string()
        };
        assert!(broken(&|t| t.version = 9).contains("version 9"));
        assert!(broken(&|t| t.shards[1].low = 100).contains("overlap"));
        assert!(broken(&|t| t.shards[0].size = 0).contains("invalid range"));
        assert!(broken(&|t| t.shards[0].low = i64::MAX).contains("invalid range"));
        assert!(broken(&|t| t.shards[0].primary = "Server1".into()).contains("not a ready replica"));
        assert!(
            broken(&|t| {
                t.shards[0].replicas.insert("Ghost".into(), ReplicaState::Ready);
            })
            .contains("unknown server Ghost")
        );
        assert!(
            broken(&|t| {
                t.shards[0].copies.insert("Ghost".into(), "c".into());
            })
            .contains("unknown server Ghost")
        );
        assert!(broken(&|t| t.servers.get_mut("Server1").unwrap().id = 0).contains("used twice"));
        assert!(broken(&|t| t.shards[1].id = "sh1".into()).contains("appears twice"));
        assert!(broken(&|t| t.shards[0].id = "sh 1".into()).contains("not a valid identifier"));
        assert!(matches!(Topology::parse(b"{"), Err(TopologyError::Json(_))));
    }
}
