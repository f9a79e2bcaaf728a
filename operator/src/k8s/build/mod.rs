//! Pure builders of every child object of a `ShardedDatabase`, one module per kind. No client, no
//! I/O: each takes the validated spec and the [`Owner`] and returns the object to apply.

pub mod configmap;
pub mod names;
pub mod netpol;
pub mod pdb;
pub mod rbac;
pub mod router;
pub mod secret;
pub mod service;
pub mod statefulset;
pub mod tls;

use crate::crd::{ContainerResources, ShardedDatabase};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// The database the children belong to: its name, namespace and the owner reference every child
/// carries (so deleting the database garbage-collects them, and their events wake the controller).
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub name: String,
    pub namespace: String,
    pub reference: OwnerReference,
}

impl Owner {
    /// `None` for an object the API server has not stored yet (no namespace or uid).
    pub fn of(db: &ShardedDatabase) -> Option<Owner> {
        Some(Owner { name: db.name_any(), namespace: db.namespace()?, reference: db.controller_owner_ref(&())? })
    }

    /// Metadata of a child: name, namespace, the common labels plus `extra`, and the owner.
    pub fn meta(&self, name: String, extra: BTreeMap<String, String>) -> ObjectMeta {
        let mut labels = names::common_labels(&self.name);
        labels.extend(extra);
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Requests and limits of a container; `None` when the spec sets neither.
fn resources(spec: Option<&ContainerResources>) -> Option<ResourceRequirements> {
    let spec = spec.filter(|r| !r.requests.is_empty() || !r.limits.is_empty())?;
    let quantities = |m: &BTreeMap<String, String>| {
        (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), Quantity(v.clone()))).collect())
    };
    Some(ResourceRequirements {
        requests: quantities(&spec.requests),
        limits: quantities(&spec.limits),
        ..ResourceRequirements::default()
    })
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Owner;
    use crate::brain::validate::{Images, ValidatedDb, tests::students, validate, validate_with_defaults};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    pub fn owner() -> Owner {
        Owner {
            name: "students".into(),
            namespace: "prod".into(),
            reference: OwnerReference {
                api_version: "sharddb.io/v1alpha1".into(),
                kind: "ShardedDatabase".into(),
                name: "students".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
        }
    }

    pub fn db() -> ValidatedDb {
        validate(&students()).unwrap()
    }

    /// Images an operator might be configured with instead of the release's defaults.
    pub fn mirror_images() -> Images {
        Images {
            shard_server: "mirror.example/sharddb-shard-server:9".into(),
            router: "mirror.example/sharddb-router:9".into(),
            postgres: "mirror.example/postgres:17".into(),
        }
    }

    /// [`db`] validated by an operator configured with [`mirror_images`].
    pub fn db_with_mirror_images() -> ValidatedDb {
        validate_with_defaults(&students(), &mirror_images()).unwrap()
    }

    /// The metadata every child must carry.
    pub fn assert_child_meta(meta: &ObjectMeta, name: &str) {
        assert_eq!(meta.name.as_deref(), Some(name));
        assert_eq!(meta.namespace.as_deref(), Some("prod"));
        assert_eq!(meta.owner_references.as_deref(), Some(&[owner().reference][..]), "{name} is owned");
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/instance"], "students");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "sharddb-operator");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_omitted_unless_set() {
        assert_eq!(resources(None), None);
        assert_eq!(resources(Some(&ContainerResources::default())), None);
        let r = resources(Some(&ContainerResources {
            requests: BTreeMap::from([("cpu".into(), "250m".into())]),
            limits: BTreeMap::new(),
        }))
        .unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("250m".into()));
        assert_eq!(r.limits, None);
    }
}
