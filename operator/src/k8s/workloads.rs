//! What the database's workloads show of a rollout, read from their status as the StatefulSet
//! and Deployment controllers report it: whether a server's pod runs its StatefulSet's current
//! revision, whether every router runs the Deployment's current template, and what the climb
//! between internal-auth modes (`k8s::internal_auth`) needs to know of them. Pure, but for
//! reading the clock.

use super::internal_auth;
use super::topology;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use shard_server::tls::InternalAuth;
use shard_server::topology::Topology;
use std::time::{Duration, Instant};

/// What the cluster shows for the climb between internal-auth modes (`k8s::internal_auth`), read
/// before anything is applied: the mode of every workload's template, whether every pod runs it,
/// the document's scheme, and whether every server has followed the document for the routers'
/// grace (and, when it has not for long enough yet, how long is left). Router pods are not
/// looked at one by one: their Deployment's status says whether every replica is updated and
/// none of an older template is left. `restarting`: the rollout is restarting a server (its
/// copies are not ready again yet); `followed`: which epoch every server follows, and since when.
pub(super) fn climb_seen(
    server_sets: &[StatefulSet],
    routers: Option<&Deployment>,
    document: Option<&Topology>,
    restarting: bool,
    followed: Option<(u64, Instant)>,
) -> (internal_auth::Seen, Option<Duration>) {
    let pod_spec = |t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>| t.and_then(|t| t.spec.clone());
    let mut templates: Vec<InternalAuth> = server_sets
        .iter()
        .filter_map(|sts| pod_spec(sts.spec.as_ref().map(|s| &s.template)))
        .map(|p| internal_auth::template_mode(&p))
        .collect();
    templates.extend(
        pod_spec(routers.and_then(|d| d.spec.as_ref()).map(|s| &s.template)).map(|p| internal_auth::template_mode(&p)),
    );
    let rolled = server_sets.iter().all(updated) && routers.is_some_and(deployment_rolled) && !restarting;
    let plain_urls = document.map(topology::lists_plain);
    let (followed, grace_left) = match (document, followed) {
        (Some(t), Some((epoch, since))) if epoch >= t.epoch => {
            let left = internal_auth::ROUTER_GRACE.saturating_sub(since.elapsed());
            (left.is_zero(), Some(left).filter(|l| !l.is_zero()))
        }
        _ => (false, None),
    };
    (internal_auth::Seen { templates, rolled, plain_urls, followed, climbing: false }, grace_left)
}

/// Whether every replica of a Deployment runs its current template and no older one is left.
pub(super) fn deployment_rolled(d: &Deployment) -> bool {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = d.status.as_ref() else { return false };
    status.observed_generation >= d.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.replicas.unwrap_or(0) <= status.updated_replicas.unwrap_or(0)
        && status.ready_replicas.unwrap_or(0) >= wanted
}

/// Whether a server's pod runs its StatefulSet's current revision, as its controller reports.
pub(super) fn updated(sts: &StatefulSet) -> bool {
    let status = sts.status.as_ref();
    let observed = status.and_then(|s| s.observed_generation) >= sts.metadata.generation;
    observed
        && status.and_then(|s| s.update_revision.as_ref()).is_some()
        && status.and_then(|s| s.current_revision.as_ref()) == status.and_then(|s| s.update_revision.as_ref())
}

/// Whether a server's pod runs an older revision than its StatefulSet's current one (known only
/// once its controller observed the current spec).
pub(super) fn outdated(sts: &StatefulSet) -> bool {
    let status = sts.status.as_ref();
    status.and_then(|s| s.update_revision.as_ref()).is_some() && !updated(sts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_are_rolled_once_every_replica_is_updated_ready_and_none_older_is_left() {
        use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
        let d = |generation: i64, observed: i64, replicas: i32, updated: i32, ready: i32| Deployment {
            metadata: kube::api::ObjectMeta { generation: Some(generation), ..Default::default() },
            spec: Some(DeploymentSpec { replicas: Some(2), ..Default::default() }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                ..Default::default()
            }),
        };
        assert!(deployment_rolled(&d(3, 3, 2, 2, 2)));
        assert!(!deployment_rolled(&d(3, 2, 2, 2, 2)), "the new template not observed yet");
        assert!(!deployment_rolled(&d(3, 3, 3, 2, 2)), "a replica of the old template is left (surge)");
        assert!(!deployment_rolled(&d(3, 3, 2, 1, 2)), "one replica not updated");
        assert!(!deployment_rolled(&d(3, 3, 2, 2, 1)), "one updated replica not ready");
        assert!(!deployment_rolled(&Deployment { status: None, ..d(3, 3, 2, 2, 2) }));
    }
}
