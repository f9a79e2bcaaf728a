//! The PodDisruptionBudget of the server pods. Pure.
//!
//! At most one server down for voluntary disruptions (drains, upgrades): with every shard on
//! `replicas` distinct servers, losing one leaves every shard with a copy as long as replicas ≥ 2.

use super::{Owner, names};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

pub fn server_pdb(owner: &Owner) -> PodDisruptionBudget {
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), names::COMPONENT_SERVER.to_owned())]);
    PodDisruptionBudget {
        metadata: owner.meta(names::server_pdb(&owner.name), component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names::servers_selector(&owner.name)),
                ..LabelSelector::default()
            }),
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
}
