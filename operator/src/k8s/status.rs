//! The status of a `ShardedDatabase` as a function of the validated spec, what was observed and
//! the previous status (only to keep `lastTransitionTime` of unchanged conditions). Pure.
//!
//! Conditions follow the Kubernetes convention. `Ready`: every server and at least one router is
//! ready. `Progressing`: the children are converging on the spec. `Degraded`: the database was
//! ready and lost a server or its routers — a first rollout is progress, not degradation.

use crate::brain::placement::Placement;
use crate::crd::{Condition, ConditionStatus, ShardStatus, ShardedDatabaseStatus};
use std::collections::BTreeSet;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

/// What the reconcile saw of the running children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Topology names of the servers whose pod is ready.
    pub ready_servers: BTreeSet<String>,
    pub ready_routers: u32,
    /// The epoch of the topology published in the ConfigMap.
    pub topology_epoch: u64,
}

/// The status of a database whose spec validated and whose children were applied.
pub fn healthy_or_converging(
    generation: Option<i64>,
    placement: &Placement,
    observed: &Observed,
    previous: Option<&ShardedDatabaseStatus>,
    now: &str,
) -> ShardedDatabaseStatus {
    let total = placement.servers.len();
    let ready_servers = placement.servers.iter().filter(|s| observed.ready_servers.contains(*s)).count();
    let all_ready = ready_servers == total && observed.ready_routers > 0;
    let was_ready = previous.is_some_and(|p| {
        condition_is(p, READY, ConditionStatus::True) || condition_is(p, DEGRADED, ConditionStatus::True)
    });
    let summary = format!("{ready_servers}/{total} servers and {} routers ready", observed.ready_routers);
    let conditions = if all_ready {
        vec![
            (READY, ConditionStatus::True, "AllReady", summary.clone()),
            (PROGRESSING, ConditionStatus::False, "UpToDate", summary.clone()),
            (DEGRADED, ConditionStatus::False, "AllReady", summary),
        ]
    } else {
        let degraded = if was_ready {
            (DEGRADED, ConditionStatus::True, "ServersUnavailable", summary.clone())
        } else {
            (DEGRADED, ConditionStatus::False, "RollingOut", summary.clone())
        };
        vec![
            (READY, ConditionStatus::False, "ServersNotReady", summary.clone()),
            (PROGRESSING, ConditionStatus::True, "RollingOut", summary),
            degraded,
        ]
    };
    let shards = placement
        .shards
        .iter()
        .map(|s| ShardStatus {
            id: s.id.clone(),
            primary: Some(s.primary.clone()),
            ready_replicas: s.replicas.iter().filter(|r| observed.ready_servers.contains(*r)).cloned().collect(),
        })
        .collect();
    ShardedDatabaseStatus {
        observed_generation: generation,
        conditions: build_conditions(conditions, generation, previous, now),
        ready_servers: u32::try_from(ready_servers).unwrap_or(u32::MAX),
        shards,
        topology_epoch: Some(observed.topology_epoch),
    }
}

/// The status of a database whose spec is invalid: `Ready=False, reason=InvalidSpec`; what was
/// observed before (shards, epoch, ready servers) is kept, since the children were left alone.
pub fn invalid_spec(
    generation: Option<i64>,
    message: &str,
    previous: Option<&ShardedDatabaseStatus>,
    now: &str,
) -> ShardedDatabaseStatus {
    let conditions = vec![
        (READY, ConditionStatus::False, REASON_INVALID_SPEC, message.to_owned()),
        (PROGRESSING, ConditionStatus::False, REASON_INVALID_SPEC, message.to_owned()),
        (DEGRADED, ConditionStatus::False, REASON_INVALID_SPEC, message.to_owned()),
    ];
    let base = previous.cloned().unwrap_or_default();
    ShardedDatabaseStatus {
        observed_generation: generation,
        conditions: build_conditions(conditions, generation, previous, now),
        ..base
    }
}

pub fn condition<'a>(status: &'a ShardedDatabaseStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn condition_is(status: &ShardedDatabaseStatus, type_: &str, value: ConditionStatus) -> bool {
    condition(status, type_).is_some_and(|c| c.status == value)
}

/// `lastTransitionTime` moves only when a condition's status changes.
fn build_conditions(
    wanted: Vec<(&str, ConditionStatus, &str, String)>,
    generation: Option<i64>,
    previous: Option<&ShardedDatabaseStatus>,
    now: &str,
) -> Vec<Condition> {
    wanted
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let last_transition_time = previous
                .and_then(|p| condition(p, type_))
                .filter(|c| c.status == status)
                .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::placement::place;
    use crate::k8s::build::testing::db;

    fn observed(ready: &[&str], routers: u32) -> Observed {
        Observed {
            ready_servers: ready.iter().map(|s| s.to_string()).collect(),
            ready_routers: routers,
            topology_epoch: 4,
        }
    }

    fn status_of(s: &ShardedDatabaseStatus, t: &str) -> (ConditionStatus, String) {
        let c = condition(s, t).unwrap();
        (c.status, c.reason.clone())
    }

    #[test]
    fn a_first_rollout_is_progressing_not_degraded() {
        let p = place(&db());
        let s = healthy_or_converging(Some(1), &p, &observed(&["Server0"], 0), None, "t0");
        assert_eq!(status_of(&s, READY), (ConditionStatus::False, "ServersNotReady".into()));
        assert_eq!(status_of(&s, PROGRESSING).0, ConditionStatus::True);
        assert_eq!(status_of(&s, DEGRADED).0, ConditionStatus::False);
        assert_eq!(s.ready_servers, 1);
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(1) && c.last_transition_time == "t0"));
        assert_eq!(s.shards[0].ready_replicas, ["Server0"]);
        assert_eq!(s.topology_epoch, Some(4));
    }

    #[test]
    fn all_ready_then_losing_a_server_is_degraded_and_times_move_only_on_transitions() {
        let p = place(&db());
        let all: Vec<&str> = p.servers.iter().map(String::as_str).collect();
        let ready = healthy_or_converging(Some(1), &p, &observed(&all, 2), None, "t0");
        assert_eq!(status_of(&ready, READY), (ConditionStatus::True, "AllReady".into()));
        assert_eq!(status_of(&ready, PROGRESSING).0, ConditionStatus::False);
        assert_eq!(ready.shards[1].primary.as_deref(), Some("Server3"));
        assert_eq!(ready.shards[1].ready_replicas, ["Server3", "Server4", "Server5"]);

        let same = healthy_or_converging(Some(1), &p, &observed(&all, 2), Some(&ready), "t1");
        assert_eq!(same, ready, "nothing changed, so the status is identical and is not written");

        let lost = healthy_or_converging(Some(1), &p, &observed(&all[1..], 2), Some(&ready), "t2");
        assert_eq!(status_of(&lost, DEGRADED), (ConditionStatus::True, "ServersUnavailable".into()));
        assert_eq!(status_of(&lost, READY).0, ConditionStatus::False);
        assert_eq!(condition(&lost, READY).unwrap().last_transition_time, "t2");
        assert_eq!(condition(&lost, DEGRADED).unwrap().last_transition_time, "t2");
        assert_eq!(lost.ready_servers, 5);
    }

    #[test]
    fn an_invalid_spec_keeps_what_was_observed() {
        let p = place(&db());
        let before = healthy_or_converging(Some(1), &p, &observed(&["Server0"], 1), None, "t0");
        let s = invalid_spec(Some(2), "spec.replicas (7) exceeds spec.servers (6)", Some(&before), "t1");
        assert_eq!(status_of(&s, READY), (ConditionStatus::False, "InvalidSpec".into()));
        assert_eq!(condition(&s, READY).unwrap().message, "spec.replicas (7) exceeds spec.servers (6)");
        assert_eq!(condition(&s, READY).unwrap().last_transition_time, "t0", "Ready was already False");
        assert_eq!(condition(&s, PROGRESSING).unwrap().last_transition_time, "t1");
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!((s.ready_servers, s.topology_epoch), (1, Some(4)));
    }
}
