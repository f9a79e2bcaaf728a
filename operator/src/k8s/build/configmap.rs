//! The topology ConfigMap (key `topology.json`) that routers and shard servers watch. Pure.
//!
//! The epoch moves only when the routing content changes: the document is built with the epoch
//! of the one currently published, and if it differs in anything else the epoch is bumped. So a
//! reconcile that changes nothing republishes the identical document (a no-op apply), and every
//! real change reaches readers as a newer epoch, which is all they accept.

use super::{Owner, names};
use crate::brain::placement::Placement;
use crate::brain::topology::{TopologyBuildError, fresh_topology};
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::core::v1::ConfigMap;
use shard_server::topology::Topology;
use std::collections::BTreeMap;

/// The topology the database should publish, given the one published now (if any).
pub fn desired_topology(
    db: &ValidatedDb,
    placement: &Placement,
    owner: &Owner,
    published: Option<&Topology>,
) -> Result<Topology, TopologyBuildError> {
    let urls: BTreeMap<String, String> =
        placement.servers.iter().map(|s| (s.clone(), names::server_url(&owner.name, &owner.namespace, s))).collect();
    let current_epoch = published.map_or(0, |t| t.epoch);
    let mut topology = fresh_topology(db, placement, &urls, current_epoch)?;
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

    #[test]
    fn first_publish_is_epoch_one_with_headless_service_urls() {
        let db = db();
        let t = desired_topology(&db, &place(&db), &owner(), None).unwrap();
        assert_eq!(t.epoch, 1);
        assert_eq!(t.servers["Server0"].url, "http://students-server0-0.students-servers.prod.svc:5000");
        let cm = topology_configmap(&owner(), &t);
        assert_child_meta(&cm.metadata, "students-topology");
        assert_eq!(published_topology(&cm), Some(t));
    }

    #[test]
    fn the_epoch_moves_only_on_change() {
        let db1 = db();
        let t1 = desired_topology(&db1, &place(&db1), &owner(), None).unwrap();
        let again = desired_topology(&db1, &place(&db1), &owner(), Some(&t1)).unwrap();
        assert_eq!(again, t1, "unchanged spec, unchanged document");
        let mut db2 = db1.clone();
        db2.shards.pop();
        let t2 = desired_topology(&db2, &place(&db2), &owner(), Some(&t1)).unwrap();
        assert_eq!(t2.epoch, 2);
        assert_eq!(t2.shards.len(), 3);
    }

    #[test]
    fn garbage_in_the_configmap_reads_as_nothing_published() {
        let mut cm = topology_configmap(&owner(), &desired_topology(&db(), &place(&db()), &owner(), None).unwrap());
        cm.data.as_mut().unwrap().insert("topology.json".into(), "{".into());
        assert_eq!(published_topology(&cm), None);
    }
}
