//! Builds the topology document (the routing table routers and shard servers follow) from a
//! validated spec and a placement. Pure: the body supplies the server URLs and the epoch.

use super::placement::Placement;
use super::validate::ValidatedDb;
use shard_server::topology::{ReplicaState, RingSpec, ServerEntry, ShardEntry, TOPOLOGY_VERSION, Topology};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyBuildError {
    #[error("no URL for server {0}")]
    MissingUrl(String),
}

/// The document of a fresh cluster: every copy `ready`, server ids in placement order (`Server0`
/// has id 0). `urls` maps every server name to its base URL.
pub fn fresh_topology(
    db: &ValidatedDb,
    placement: &Placement,
    urls: &BTreeMap<String, String>,
    epoch: u64,
) -> Result<Topology, TopologyBuildError> {
    let servers = placement
        .servers
        .iter()
        .enumerate()
        .map(|(id, name)| {
            let url = urls.get(name).ok_or_else(|| TopologyBuildError::MissingUrl(name.clone()))?;
            let id = u32::try_from(id).expect("fewer than 2^32 servers");
            Ok((name.clone(), ServerEntry { id, url: url.clone() }))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let ranges = db.shards.iter().map(|s| (s.id.as_str(), s)).collect::<BTreeMap<_, _>>();
    let mut shards: Vec<ShardEntry> = placement
        .shards
        .iter()
        .map(|p| {
            let range = ranges[p.id.as_str()];
            ShardEntry {
                id: p.id.clone(),
                low: range.low,
                size: range.size,
                primary: p.primary.clone(),
                replicas: p.replicas.iter().map(|r| (r.clone(), ReplicaState::Ready)).collect(),
                copies: BTreeMap::new(),
            }
        })
        .collect();
    shards.sort_by_key(|s| s.low);
    Ok(Topology {
        version: TOPOLOGY_VERSION,
        epoch,
        schema: db.schema.to_spec(),
        ring: RingSpec::default(),
        servers,
        shards,
        unrouted_keys: db.unrouted_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::placement::place;
    use crate::brain::validate::{tests::students, validate};

    fn urls(p: &Placement) -> BTreeMap<String, String> {
        p.servers.iter().enumerate().map(|(i, s)| (s.clone(), format!("http://127.0.0.1:{}", 7000 + i))).collect()
    }

    #[test]
    fn the_seed_default_document_is_valid_and_routes_keys() {
        let db = validate(&students()).unwrap();
        let p = place(&db);
        let t = fresh_topology(&db, &p, &urls(&p), 1).unwrap();
        t.validate().unwrap();
        assert_eq!(Topology::parse(t.to_json_pretty().as_bytes()).unwrap(), t, "round-trips");
        assert_eq!((t.version, t.epoch), (TOPOLOGY_VERSION, 1));
        assert_eq!(t.servers["Server0"], ServerEntry { id: 0, url: "http://127.0.0.1:7000".into() });
        assert_eq!(t.servers["Server5"].id, 5);
        assert_eq!(t.schema.columns, ["Stud_id", "Stud_name", "Stud_marks"]);
        for (key, shard) in [(0, "sh1"), (4095, "sh1"), (4096, "sh2"), (9000, "sh3"), (16383, "sh4")] {
            assert_eq!(t.shard_for_key(key).unwrap().id, shard, "key {key}");
        }
        assert!(t.shard_for_key(16384).is_none());
        assert!(t.shard_for_key(-1).is_none());
        let sh2 = t.shard("sh2").unwrap();
        assert_eq!(sh2.primary, "Server3");
        assert_eq!(sh2.ready_replicas().collect::<Vec<_>>(), ["Server3", "Server4", "Server5"]);
    }

    #[test]
    fn shards_are_ordered_by_low_and_gaps_are_allowed() {
        let mut spec = students();
        spec.shards[0].low = -100;
        spec.shards[0].size = 50;
        spec.shards.swap(0, 3);
        let db = validate(&spec).unwrap();
        let p = place(&db);
        let t = fresh_topology(&db, &p, &urls(&p), 7).unwrap();
        t.validate().unwrap();
        assert_eq!(t.shards.iter().map(|s| s.low).collect::<Vec<_>>(), [-100, 4096, 8192, 12288]);
        assert_eq!(t.shard_for_key(-51).unwrap().id, "sh1");
        assert!(t.shard_for_key(-50).is_none(), "gap between shards");
    }

    #[test]
    fn a_missing_url_is_an_error() {
        let db = validate(&students()).unwrap();
        let p = place(&db);
        let mut u = urls(&p);
        u.remove("Server4");
        assert_eq!(fresh_topology(&db, &p, &u, 1), Err(TopologyBuildError::MissingUrl("Server4".into())));
    }
}
