//! The topology ConfigMap (key `topology.json`) that routers and shard servers watch. Pure.
//!
//! The reconcile only creates the first document ([`first_topology`]); from then on the document
//! belongs to the healer (`k8s::heal`), which carries out spec changes with the brain's placement
//! moves (`brain::moves`): new holders join `recovering` and are filled from a ready copy before
//! they serve reads, and a copy leaves only once the shard's wanted holders are ready. Rebuilding
//! the document from the spec would instead declare a new holder `ready` while it is empty.

use super::{Owner, names};
use crate::brain::placement::Placement;
use crate::brain::topology::{TopologyBuildError, fresh_topology};
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::core::v1::ConfigMap;
use shard_server::topology::Topology;
use std::collections::BTreeMap;

/// The first document of a database (epoch 1, every copy `ready`: a new database is empty).
/// `url` gives each server's base URL (see `k8s::topology::ServerUrls`).
pub fn first_topology(
    db: &ValidatedDb,
    placement: &Placement,
    url: impl Fn(&str) -> String,
) -> Result<Topology, TopologyBuildError> {
    let urls: BTreeMap<String, String> = placement.servers.iter().map(|s| (s.clone(), url(s))).collect();
    fresh_topology(db, placement, &urls, 1)
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

    fn url(server: &str) -> String {
        names::server_url("students", "prod", server)
    }

    #[test]
    fn first_publish_is_epoch_one_with_headless_service_urls() {
        let db = db();
        let t = first_topology(&db, &place(&db), url).unwrap();
        assert_eq!(t.epoch, 1);
        assert_eq!(t.servers["Server0"].url, "https://students-server0-0.students-servers.prod.svc:5000");
        let cm = topology_configmap(&owner(), &t);
        assert_child_meta(&cm.metadata, "students-topology");
        assert_eq!(published_topology(&cm), Some(t));
    }

    #[test]
    fn garbage_in_the_configmap_reads_as_nothing_published() {
        let mut cm = topology_configmap(&owner(), &first_topology(&db(), &place(&db()), url).unwrap());
        cm.data.as_mut().unwrap().insert("topology.json".into(), "{".into());
        assert_eq!(published_topology(&cm), None);
    }
}
