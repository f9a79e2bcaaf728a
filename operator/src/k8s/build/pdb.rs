//! The PodDisruptionBudgets of the server and router pods. Pure.
//!
//! At most one server down for voluntary disruptions (drains, upgrades): with every shard on
//! `replicas` distinct servers, losing one leaves every shard with a copy as long as replicas ≥ 2.
//! At most one router down too: with two or more routers the service stays up through a drain.
//! A single router may still be evicted — `minAvailable: 1` would block every drain forever.

use super::{Owner, names};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

pub fn server_pdb(owner: &Owner) -> PodDisruptionBudget {
    one_down(owner, names::server_pdb(&owner.name), names::COMPONENT_SERVER, names::servers_selector(&owner.name))
}

pub fn router_pdb(owner: &Owner) -> PodDisruptionBudget {
    one_down(owner, names::router_pdb(&owner.name), names::COMPONENT_ROUTER, names::router_selector(&owner.name))
}

/// A budget letting one pod matching `selector` be disrupted at a time.
fn one_down(owner: &Owner, name: String, component: &str, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), component.to_owned())]);
    PodDisruptionBudget {
        metadata: owner.meta(name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};

    #[test]
    fn allows_one_server_down() {
        let pdb = server_pdb(&owner());
        assert_child_meta(&pdb.metadata, "students-servers");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.selector.unwrap().match_labels.unwrap(), names::servers_selector("students"));
    }

    #[test]
    fn allows_one_router_down() {
        let pdb = router_pdb(&owner());
        assert_child_meta(&pdb.metadata, "students-router");
        assert_eq!(pdb.metadata.labels.as_ref().unwrap()[names::LABEL_COMPONENT], "router");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.selector.unwrap().match_labels.unwrap(), names::router_selector("students"));
    }
}
