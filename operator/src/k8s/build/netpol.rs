//! The NetworkPolicy that closes a database's shard servers to everything but the database's own
//! components: its routers, its other servers, and the operator. Pure.
//!
//! It selects the server pods and admits TCP to their port from those pods only; every other
//! pod, in any namespace, is dropped by a CNI that enforces NetworkPolicies (Calico, Cilium,
//! Antrea, kube-router…; kindnet and flannel alone do not). Probes from the kubelet come from the
//! node and are admitted by those CNIs regardless. Policies add up: a Prometheus in another
//! namespace scraping `/metrics` needs a policy of its own. Mutual TLS is the protection that
//! does not depend on the CNI; the policy keeps everyone else from even reaching the port.

use super::{Owner, names};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// The label every namespace carries with its own name (set by the API server since 1.21).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Where the operator's pods run, so its probes and recovers are admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPods {
    pub namespace: String,
    /// Labels selecting the operator's pods (the chart's selector labels).
    pub labels: BTreeMap<String, String>,
}

fn pods(labels: BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector { match_labels: Some(labels), ..LabelSelector::default() }),
        ..NetworkPolicyPeer::default()
    }
}

/// `<db>-servers`: ingress to the servers' port from the database's routers and servers (its
/// own namespace) and from the operator's pods (its namespace); nothing else.
pub fn servers_network_policy(owner: &Owner, operator: &OperatorPods) -> NetworkPolicy {
    let operator_peer = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), operator.namespace.clone())])),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector { match_labels: Some(operator.labels.clone()), ..LabelSelector::default() }),
        ..NetworkPolicyPeer::default()
    };
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), names::COMPONENT_SERVER.to_owned())]);
    NetworkPolicy {
        metadata: owner.meta(names::servers_network_policy(&owner.name), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names::servers_selector(&owner.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    pods(names::router_selector(&owner.name)),
                    pods(names::servers_selector(&owner.name)),
                    operator_peer,
                ]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(names::HTTP_PORT)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};

    fn operator() -> OperatorPods {
        OperatorPods {
            namespace: "sharddb-system".into(),
            labels: BTreeMap::from([("app.kubernetes.io/name".into(), "sharddb-operator".into())]),
        }
    }

    #[test]
    fn servers_admit_only_their_routers_their_servers_and_the_operator() {
        let p = servers_network_policy(&owner(), &operator());
        assert_child_meta(&p.metadata, "students-servers");
        let spec = p.spec.unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap(), names::servers_selector("students"));
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 1, "one rule: no other source is admitted");
        let from = rules[0].from.as_ref().unwrap();
        let selector = |peer: &NetworkPolicyPeer| peer.pod_selector.as_ref().unwrap().match_labels.clone().unwrap();
        assert_eq!(selector(&from[0]), names::router_selector("students"));
        assert!(from[0].namespace_selector.is_none(), "the routers of this namespace only");
        assert_eq!(selector(&from[1]), names::servers_selector("students"));
        assert!(from[1].namespace_selector.is_none());
        assert_eq!(selector(&from[2]), operator().labels);
        let ns = from[2].namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(ns[NAMESPACE_NAME_LABEL], "sharddb-system");
        assert_eq!(from.len(), 3);
        let ports = rules[0].ports.as_ref().unwrap();
        assert_eq!(ports[0].port, Some(IntOrString::Int(5000)));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    }
}
