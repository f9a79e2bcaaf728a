//! The Kubernetes body of the rolling restart (`brain::rollout`): which server pods run an older
//! revision of their StatefulSet's template, and restarting a server by evicting its pod (its
//! StatefulSet, `OnDelete`, then creates it from the current template). Does I/O.
//!
//! - A server's pod is **outdated** when its `controller-revision-hash` label differs from its
//!   StatefulSet's `status.updateRevision`.
//! - A pod that is gone or terminating is **being replaced**: not outdated (its replacement is
//!   built from the current template), and not serving either, so the rollout waits for it.
//! - While a StatefulSet controller has not caught up with a change of its spec
//!   (`status.observedGeneration` behind `metadata.generation`), or a StatefulSet is not created
//!   yet, that server's revision is **unknown** and the rollout waits: unknown never advances it.
//! - The eviction API is used rather than a delete, so PodDisruptionBudgets hold: an eviction
//!   refused because another server pod is down (a node drain, say) is tried again next round.

use super::apply::ApplyError;
use super::build::{Owner, names};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, EvictParams};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};

/// The pod label naming the revision of the StatefulSet template a pod was built from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The revisions of a database's server pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revisions {
    /// Servers whose pod runs an older revision than its StatefulSet's current one.
    pub outdated: BTreeSet<String>,
    /// Servers whose pod is gone or terminating.
    pub replacing: BTreeSet<String>,
    /// Servers whose current revision is not known yet.
    pub unknown: BTreeSet<String>,
    /// Each known server's current revision (the one its pod should run).
    pub current: BTreeMap<String, String>,
}

/// Reads the StatefulSets and pods of `servers` (two list calls).
pub async fn observe(client: &Client, owner: &Owner, servers: &BTreeSet<String>) -> Result<Revisions, ApplyError> {
    let ns = &owner.namespace;
    let selector = names::selector_string(&names::servers_selector(&owner.name));
    let sets: BTreeMap<String, StatefulSet> = super::apply::list::<StatefulSet>(client, ns, &selector)
        .await?
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let pods: BTreeMap<String, Pod> =
        super::apply::list::<Pod>(client, ns, &selector).await?.into_iter().map(|p| (p.name_any(), p)).collect();
    Ok(revisions(&owner.name, servers, &sets, &pods))
}

/// [`observe`] on what was read. Pure.
fn revisions(
    db: &str,
    servers: &BTreeSet<String>,
    sets: &BTreeMap<String, StatefulSet>,
    pods: &BTreeMap<String, Pod>,
) -> Revisions {
    let mut r = Revisions::default();
    for server in servers {
        let set = sets.get(&names::server_statefulset(db, server));
        let status = set.and_then(|s| s.status.as_ref());
        let observed = status.and_then(|s| s.observed_generation) >= set.and_then(|s| s.metadata.generation);
        let Some(current) = status.and_then(|s| s.update_revision.clone()).filter(|_| observed && set.is_some()) else {
            r.unknown.insert(server.clone());
            continue;
        };
        match pods.get(&names::server_pod(db, server)) {
            Some(pod) if pod.metadata.deletion_timestamp.is_none() => {
                if pod.labels().get(REVISION_LABEL) != Some(&current) {
                    r.outdated.insert(server.clone());
                }
            }
            _ => {
                r.replacing.insert(server.clone());
            }
        }
        r.current.insert(server.clone(), current);
    }
    r
}

/// A reference to `server`'s pod, for the Events about it.
pub fn pod_reference(owner: &Owner, server: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(names::server_pod(&owner.name, server)),
        namespace: Some(owner.namespace.clone()),
        ..Default::default()
    }
}

/// How an eviction went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evicted {
    Done,
    /// A PodDisruptionBudget does not allow it now (429), or the pod is already gone.
    NotNow(String),
}

/// Evicts `server`'s pod.
pub async fn evict(client: &Client, owner: &Owner, server: &str) -> Result<Evicted, ApplyError> {
    let pod = names::server_pod(&owner.name, server);
    let api: Api<Pod> = Api::namespaced(client.clone(), &owner.namespace);
    match api.evict(&pod, &EvictParams::default()).await {
        Ok(_) => Ok(Evicted::Done),
        Err(kube::Error::Api(s)) if s.code == 429 || s.is_not_found() => Ok(Evicted::NotNow(s.message)),
        Err(source) => Err(ApplyError::Apply { kind: "Pod eviction", name: pod, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn set(server: &str, generation: i64, observed: i64, update: &str) -> (String, StatefulSet) {
        let name = names::server_statefulset("students", server);
        let sts = StatefulSet {
            metadata: ObjectMeta { name: Some(name.clone()), generation: Some(generation), ..ObjectMeta::default() },
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                update_revision: Some(update.into()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        };
        (name, sts)
    }

    fn pod(server: &str, revision: &str, terminating: bool) -> (String, Pod) {
        let name = names::server_pod("students", server);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(REVISION_LABEL.to_owned(), revision.to_owned())].into()),
                deletion_timestamp: terminating.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        (name, pod)
    }

    #[test]
    fn pods_behind_their_statefulsets_revision_are_outdated() {
        let servers: BTreeSet<String> =
            ["Server0", "Server1", "Server2", "Server3", "Server4"].map(String::from).into();
        let sets = [
            set("Server0", 2, 2, "r2"),
            set("Server1", 2, 2, "r2"),
            set("Server2", 2, 2, "r2"),
            set("Server3", 3, 2, "r2"), // its controller has not seen generation 3 yet
        ]
        .into();
        let pods = [
            pod("Server0", "r2", false),
            pod("Server1", "r1", false),
            pod("Server2", "r1", true),
            pod("Server3", "r1", false),
        ]
        .into();
        let r = revisions("students", &servers, &sets, &pods);
        assert_eq!(r.outdated, ["Server1".to_owned()].into());
        assert_eq!(r.replacing, ["Server2".to_owned()].into(), "terminating: its replacement is current");
        assert_eq!(r.unknown, ["Server3".to_owned(), "Server4".to_owned()].into(), "not observed, or no StatefulSet");
        assert_eq!(r.current.get("Server0").map(String::as_str), Some("r2"));
        let mut pods = pods;
        pods.remove(&names::server_pod("students", "Server0"));
        assert!(revisions("students", &servers, &sets, &pods).replacing.contains("Server0"), "a missing pod");
    }
}
