//! The topology ConfigMap (key `topology.json`) that routers and shard servers watch. Pure.
//!
//! The reconcile creates the document when it is missing and otherwise only carries forward what
//! the spec changed: each shard whose range and holders are unchanged keeps its primary, the
//! state of each copy and their recorded identities ([`carry_over`]), since those belong to the
//! healer. The epoch moves only when the content changes: the document is built with the epoch of
//! the one currently published, and if it differs in anything else the epoch is bumped. So a
//! reconcile that changes nothing produces the identical document (and writes nothing), and
//! every real change reaches readers as a newer epoch, which is all they accept.

use super::{Owner, names};
use crate::brain::placement::Placement;
use crate::brain::topology::{TopologyBuildError, carry_over, fresh_topology};
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::core::v1::ConfigMap;
use shard_server::topology::Topology;
use std::collections::BTreeMap;

/// The topology the database should publish, given the one published now (if any). `url` gives
/// each server's base URL (see `k8s::topology::ServerUrls`).
pub fn desired_topology(
    db: &ValidatedDb,
    placement: &Placement,
    url: impl Fn(&str) -> String,
    published: Option<&Topology>,
) -> Result<Topology, TopologyBuildError> {
    let urls: BTreeMap<String, String> = placement.servers.iter().map(|s| (s.clone(), url(s))).collect();
    let current_epoch = published.map_or(0, |t| t.epoch);
    let fresh = fresh_topology(db, placement, &urls, current_epoch)?;
    let mut topology = match published {
        Some(previous) => carry_over(fresh, previous),
        None => fresh,
    };
    if published != Some(&topology) {
        topology.epoch = current_epoch + 1;
    }
    Ok(topology)
}

pub fn topology_configmap(owner: &Owner, topology: &Topology) -> ConfigMap {
    ConfigMap {
        metadata: owner.meta(names::topology_configmap(&owner.name), BTreeMap::new()),
        data: Some(BTreeMap::from([(names::TOPOLOGY_KEY.to_owned(), topology.to_json_pretty())])),
        ..ConfigMap::default()
    }
}

/// The topology held by a ConfigMap; `None` if it has none or it does not parse (then the next
/// publish starts again from epoch 1 — readers that hold a newer one ignore it until it passes).
pub fn published_topology(cm: &ConfigMap) -> Option<Topology> {
    let json = cm.data.as_ref()?.get(names::TOPOLOGY_KEY)?;
    Topology::parse(json.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::placement::place;
    use crate::k8s::build::testing::{assert_child_meta, db, owner};
    use shard_server::topology::ReplicaState;

    fn url(server: &str) -> String {
        names::server_url("students", "prod", server)
    }

    #[test]
    fn first_publish_is_epoch_one_with_headless_service_urls() {
        let db = db();
        let t = desired_topology(&db, &place(&db), url, None).unwrap();
        assert_eq!(t.epoch, 1);
        assert_eq!(t.servers["Server0"].url, "http://students-server0-0.students-servers.prod.svc:5000");
        let cm = topology_configmap(&owner(), &t);
        assert_child_meta(&cm.metadata, "students-topology");
        assert_eq!(published_topology(&cm), Some(t));
    }

    #[test]
    fn the_epoch_moves_only_on_change() {
        let db1 = db();
        let t1 = desired_topology(&db1, &place(&db1), url, None).unwrap();
        let again = desired_topology(&db1, &place(&db1), url, Some(&t1)).unwrap();
        assert_eq!(again, t1, "unchanged spec, unchanged document");
        let mut db2 = db1.clone();
        db2.shards.pop();
        let t2 = desired_topology(&db2, &place(&db2), url, Some(&t1)).unwrap();
        assert_eq!(t2.epoch, 2);
        assert_eq!(t2.shards.len(), 3);
    }

    #[test]
    fn garbage_in_the_configmap_reads_as_nothing_published() {
        let mut cm = topology_configmap(&owner(), &desired_topology(&db(), &place(&db()), url, None).unwrap());
        cm.data.as_mut().unwrap().insert("topology.json".into(), "{".into());
        assert_eq!(published_topology(&cm), None);
    }

    #[test]
    fn what_the_healer_recorded_is_kept_and_a_spec_change_still_applies() {
        let db1 = db();
        let mut healed = desired_topology(&db1, &place(&db1), url, None).unwrap();
        let sh1 = &mut healed.shards[0];
        let old_primary = sh1.primary.clone();
        let other = sh1.replicas.keys().find(|r| **r != old_primary).unwrap().clone();
        sh1.primary = other.clone();
        sh1.replicas.insert(old_primary.clone(), ReplicaState::Recovering);
        sh1.copies.insert(other.clone(), "c7".into());
        healed.epoch = 5;
        let again = desired_topology(&db1, &place(&db1), url, Some(&healed)).unwrap();
        assert_eq!(again, healed, "an unchanged spec leaves the healer's document alone");

        let mut db2 = db1.clone();
        db2.shards.pop();
        let t = desired_topology(&db2, &place(&db2), url, Some(&healed)).unwrap();
        assert_eq!((t.epoch, t.shards.len()), (6, 3));
        assert_eq!(t.shards[0].primary, other, "the failover is kept");
        assert_eq!(t.shards[0].replicas[&old_primary], ReplicaState::Recovering);
    }
}
