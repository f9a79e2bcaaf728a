//! The headless Service giving each server pod a stable DNS name, and the router's Service. Pure.

use super::{Owner, names};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

fn http_port() -> ServicePort {
    ServicePort {
        name: Some(names::HTTP_PORT_NAME.into()),
        port: names::HTTP_PORT,
        target_port: Some(IntOrString::String(names::HTTP_PORT_NAME.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Headless, and publishing not-ready pods: a server must be reachable by its peers (replication,
/// recovery) before it reports ready.
pub fn headless_service(owner: &Owner) -> Service {
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), names::COMPONENT_SERVER.to_owned())]);
    Service {
        metadata: owner.meta(names::headless_service(&owner.name), component),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names::servers_selector(&owner.name)),
            ports: Some(vec![http_port()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The front door clients use: a ClusterIP Service over the ready routers.
pub fn router_service(owner: &Owner) -> Service {
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), names::COMPONENT_ROUTER.to_owned())]);
    Service {
        metadata: owner.meta(names::router(&owner.name), component),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(names::router_selector(&owner.name)),
            ports: Some(vec![http_port()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};

    #[test]
    fn headless_service_selects_every_server_and_publishes_unready_pods() {
        let s = headless_service(&owner());
        assert_child_meta(&s.metadata, "students-servers");
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap(), names::servers_selector("students"));
        assert_eq!(spec.ports.unwrap()[0].port, 5000);
    }

    #[test]
    fn router_service_selects_routers_only() {
        let s = router_service(&owner());
        assert_child_meta(&s.metadata, "students-router");
        let spec = s.spec.unwrap();
        assert_eq!(spec.selector.unwrap()["app.kubernetes.io/component"], "router");
        assert_eq!(spec.cluster_ip, None, "not headless");
    }
}
