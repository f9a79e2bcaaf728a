//! ServiceAccounts of the server and router pods and the least-privilege Role they share: read
//! (get, list, watch) the database's topology ConfigMap, by name, and nothing else. Pure.

use super::{Owner, names};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use std::collections::BTreeMap;

pub fn server_service_account(owner: &Owner) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(names::server_service_account(&owner.name), BTreeMap::new()),
        ..ServiceAccount::default()
    }
}

pub fn router_service_account(owner: &Owner) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(names::router_service_account(&owner.name), BTreeMap::new()),
        ..ServiceAccount::default()
    }
}

/// `list` and `watch` with `resourceNames` are allowed when the request selects that one name
/// (`fieldSelector=metadata.name=...`), which is how the topology watcher asks.
pub fn topology_reader_role(owner: &Owner) -> Role {
    Role {
        metadata: owner.meta(names::topology_reader(&owner.name), BTreeMap::new()),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![names::topology_configmap(&owner.name)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

pub fn topology_reader_binding(owner: &Owner) -> RoleBinding {
    let subject = |name: String| Subject {
        kind: "ServiceAccount".into(),
        name,
        namespace: Some(owner.namespace.clone()),
        ..Subject::default()
    };
    RoleBinding {
        metadata: owner.meta(names::topology_reader(&owner.name), BTreeMap::new()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: names::topology_reader(&owner.name),
        },
        subjects: Some(vec![
            subject(names::server_service_account(&owner.name)),
            subject(names::router_service_account(&owner.name)),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};

    #[test]
    fn the_role_reads_only_the_topology_configmap() {
        let role = topology_reader_role(&owner());
        assert_child_meta(&role.metadata, "students-topology-reader");
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].resources.as_deref(), Some(&["configmaps".to_string()][..]));
        assert_eq!(rules[0].resource_names.as_deref(), Some(&["students-topology".to_string()][..]));
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]), "core group only");
    }

    #[test]
    fn the_binding_grants_it_to_both_service_accounts() {
        let b = topology_reader_binding(&owner());
        assert_child_meta(&b.metadata, "students-topology-reader");
        assert_eq!(b.role_ref.name, "students-topology-reader");
        let subjects: Vec<_> = b.subjects.unwrap().into_iter().map(|s| (s.name, s.namespace)).collect();
        assert_eq!(
            subjects,
            [("students-server".into(), Some("prod".into())), ("students-router".into(), Some("prod".into()))]
        );
        assert_child_meta(&server_service_account(&owner()).metadata, "students-server");
        assert_child_meta(&router_service_account(&owner()).metadata, "students-router");
    }
}
