//! The status of a `ShardedDatabase` as a function of the validated spec, what was observed and
//! the previous status (only to keep `lastTransitionTime` of unchanged conditions). Pure.
//!
//! Conditions follow the Kubernetes convention. `Ready`: every server is ready and reachable, at
//! least one router is ready, and every copy of every shard is ready. `Progressing`: the children
//! are converging on the spec, or copies are being healed. `Degraded`: a copy is recovering (it
//! lost its data, was unreachable, or was a deposed primary), or the database was ready and lost
//! a server or its routers — a first rollout is progress, not degradation.
//!
//! Per shard, the primary and the state of each copy come from the published topology (which the
//! healer maintains); a ready copy counts as ready here only while its pod is ready and the healer
//! reaches its server.
//!
//! During a rolling update (a server's pod runs an older revision of its StatefulSet's template),
//! `Progressing` is `True` with reason `RollingUpdate` and says how many servers are updated. The
//! rollout takes one server at a time out of service, so one server short (down, or its copies
//! recovering) is the rollout at work: `Degraded` stays `False` (reason `RollingUpdate`) and
//! `Ready` is `False` with that reason until the server is back. Two or more servers short is a
//! fault, reported as outside a rollout.

use crate::brain::placement::Placement;
use crate::crd::{Condition, ConditionStatus, ShardStatus, ShardedDatabaseStatus};
use shard_server::topology::{ReplicaState, Topology};
use std::collections::BTreeSet;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

/// What the reconcile saw of the running children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Topology names of the servers whose pod is ready.
    pub ready_servers: BTreeSet<String>,
    pub ready_routers: u32,
    /// The topology published in the ConfigMap.
    pub topology: Topology,
    /// Servers that did not answer the healer's last probe (none while healing is off).
    pub unreachable: BTreeSet<String>,
    /// Servers whose pod runs their StatefulSet's current revision.
    pub updated_servers: BTreeSet<String>,
    /// Whether some server's pod runs an older revision (a rolling update is under way).
    pub rolling: bool,
}

/// The status of a database whose spec validated and whose children were applied.
pub fn healthy_or_converging(
    generation: Option<i64>,
    placement: &Placement,
    observed: &Observed,
    previous: Option<&ShardedDatabaseStatus>,
    now: &str,
) -> ShardedDatabaseStatus {
    let serving = |s: &str| observed.ready_servers.contains(s) && !observed.unreachable.contains(s);
    let total = placement.servers.len();
    let ready_servers = placement.servers.iter().filter(|s| serving(s)).count();
    let shards: Vec<ShardStatus> = observed
        .topology
        .shards
        .iter()
        .map(|s| ShardStatus {
            id: s.id.clone(),
            primary: Some(s.primary.clone()),
            ready_replicas: s.ready_replicas().filter(|r| serving(r)).map(str::to_owned).collect(),
            recovering_replicas: s
                .replicas
                .iter()
                .filter(|(_, state)| **state == ReplicaState::Recovering)
                .map(|(r, _)| r.clone())
                .collect(),
        })
        .collect();
    let recovering: Vec<String> =
        shards.iter().flat_map(|s| s.recovering_replicas.iter().map(move |r| format!("{} on {r}", s.id))).collect();
    let unreachable: Vec<&str> =
        placement.servers.iter().filter(|s| observed.unreachable.contains(*s)).map(String::as_str).collect();
    let servers_ready = ready_servers == total && observed.ready_routers > 0;
    let settled = settled(placement, &observed.topology);
    let all_ready = servers_ready && recovering.is_empty() && settled;
    let was_ready = previous.is_some_and(|p| {
        condition_is(p, READY, ConditionStatus::True) || condition_is(p, DEGRADED, ConditionStatus::True)
    });
    let mut summary = format!("{ready_servers}/{total} servers and {} routers ready", observed.ready_routers);
    if !unreachable.is_empty() {
        summary.push_str(&format!("; unreachable: {}", unreachable.join(", ")));
    }
    if !recovering.is_empty() {
        summary.push_str(&format!("; recovering: {}", recovering.join(", ")));
    }
    if !settled {
        summary.push_str("; moving copies to the declared placement");
    }
    let updated = placement.servers.iter().filter(|s| observed.updated_servers.contains(*s)).count();
    // Servers out of service: not serving, or holding a copy that is not ready.
    let short: BTreeSet<&str> = placement
        .servers
        .iter()
        .map(String::as_str)
        .filter(|s| !serving(s))
        .chain(shards.iter().flat_map(|sh| sh.recovering_replicas.iter().map(String::as_str)))
        .collect();
    let conditions = if observed.rolling {
        summary.push_str(&format!("; rolling update: {updated}/{total} servers updated"));
        let degraded = if short.len() <= 1 {
            (DEGRADED, ConditionStatus::False, "RollingUpdate", summary.clone())
        } else {
            (DEGRADED, ConditionStatus::True, "ServersUnavailable", summary.clone())
        };
        let ready =
            if all_ready { (ConditionStatus::True, "AllReady") } else { (ConditionStatus::False, "RollingUpdate") };
        vec![
            (READY, ready.0, ready.1, summary.clone()),
            (PROGRESSING, ConditionStatus::True, "RollingUpdate", summary),
            degraded,
        ]
    } else if all_ready {
        vec![
            (READY, ConditionStatus::True, "AllReady", summary.clone()),
            (PROGRESSING, ConditionStatus::False, "UpToDate", summary.clone()),
            (DEGRADED, ConditionStatus::False, "AllReady", summary),
        ]
    } else {
        let ready_reason = match (servers_ready, recovering.is_empty()) {
            (false, _) => "ServersNotReady",
            (true, false) => "CopiesRecovering",
            (true, true) => "PlacementChanging",
        };
        let (progress_reason, degraded) = if !recovering.is_empty() {
            ("Healing", (DEGRADED, ConditionStatus::True, "CopiesRecovering", summary.clone()))
        } else if servers_ready {
            ("Moving", (DEGRADED, ConditionStatus::False, "Moving", summary.clone()))
        } else if was_ready {
            ("RollingOut", (DEGRADED, ConditionStatus::True, "ServersUnavailable", summary.clone()))
        } else {
            ("RollingOut", (DEGRADED, ConditionStatus::False, "RollingOut", summary.clone()))
        };
        vec![
            (READY, ConditionStatus::False, ready_reason, summary.clone()),
            (PROGRESSING, ConditionStatus::True, progress_reason, summary),
            degraded,
        ]
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let copies = count(observed.topology.shards.iter().map(|s| s.replicas.len()).sum());
    let ready_copies = count(shards.iter().map(|s| s.ready_replicas.len()).sum());
    ShardedDatabaseStatus {
        observed_generation: generation,
        conditions: build_conditions(conditions, generation, previous, now),
        ready_servers: count(ready_servers),
        updated_servers: count(updated),
        shard_count: count(shards.len()),
        copies,
        ready_copies,
        copies_ready: format!("{ready_copies}/{copies}"),
        shards,
        topology_epoch: Some(observed.topology.epoch),
    }
}

/// Whether the document holds exactly the declared placement: the same servers, and each shard
/// on the same holders. Until then the healer is moving copies (a spec change in progress).
fn settled(placement: &Placement, topology: &Topology) -> bool {
    let servers: BTreeSet<&str> = placement.servers.iter().map(String::as_str).collect();
    servers.iter().copied().eq(topology.servers.keys().map(String::as_str))
        && topology.shards.len() == placement.shards.len()
        && placement.shards.iter().all(|want| {
            let holders: BTreeSet<&str> = want.replicas.iter().map(String::as_str).collect();
            topology.shard(&want.id).is_some_and(|s| holders.iter().copied().eq(s.replicas.keys().map(String::as_str)))
        })
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
    let mut built = build_conditions(conditions, generation, previous, now);
    // Conditions of the running database (the internal-auth mode) still hold: keep them.
    built.extend(
        base.conditions.iter().filter(|c| ![READY, PROGRESSING, DEGRADED].contains(&c.type_.as_str())).cloned(),
    );
    ShardedDatabaseStatus { observed_generation: generation, conditions: built, ..base }
}

/// `status` with the condition `type_` set (added or replaced); its `lastTransitionTime` moves
/// only when its status changes from `previous`.
pub fn with_condition(
    mut status: ShardedDatabaseStatus,
    (type_, value, reason, message): (&str, ConditionStatus, &str, String),
    previous: Option<&ShardedDatabaseStatus>,
    now: &str,
) -> ShardedDatabaseStatus {
    let generation = status.observed_generation;
    let built = build_conditions(vec![(type_, value, reason, message)], generation, previous, now);
    status.conditions.retain(|c| c.type_ != type_);
    status.conditions.extend(built);
    status
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
    use crate::k8s::build::names;
    use crate::k8s::build::{configmap::first_topology, testing::db};

    fn topology() -> Topology {
        let db = db();
        let mut t = first_topology(&db, &place(&db), |s| names::server_url("students", "prod", s)).unwrap();
        t.epoch = 4;
        t
    }

    fn observed(ready: &[&str], routers: u32) -> Observed {
        Observed {
            ready_servers: ready.iter().map(|s| s.to_string()).collect(),
            ready_routers: routers,
            topology: topology(),
            unreachable: BTreeSet::new(),
            updated_servers: ready.iter().map(|s| s.to_string()).collect(),
            rolling: false,
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
        // Four shards of three copies; Server0 holds two of them (sh1 and sh3 in count placement).
        assert_eq!((s.shard_count, s.copies, s.ready_copies), (4, 12, 2));
        assert_eq!(s.copies_ready, "2/12");
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
    fn a_topology_that_differs_from_the_spec_is_a_placement_change_not_ready() {
        let db = db();
        let p = place(&db);
        let all: Vec<&str> = p.servers.iter().map(String::as_str).collect();
        // The spec lost its last server; the topology still lists it (being drained).
        let mut fewer = p.clone();
        let leaving = fewer.servers.pop().unwrap();
        for shard in &mut fewer.shards {
            shard.replicas.retain(|r| *r != leaving);
        }
        let s = healthy_or_converging(Some(2), &fewer, &observed(&all, 2), None, "t0");
        assert_eq!(status_of(&s, READY), (ConditionStatus::False, "PlacementChanging".into()));
        assert_eq!(status_of(&s, PROGRESSING), (ConditionStatus::True, "Moving".into()));
        assert_eq!(status_of(&s, DEGRADED).0, ConditionStatus::False, "a move degrades nothing");
        assert!(condition(&s, READY).unwrap().message.contains("moving copies"));
        let settled = healthy_or_converging(Some(2), &p, &observed(&all, 2), None, "t0");
        assert_eq!(status_of(&settled, READY).0, ConditionStatus::True);
    }

    #[test]
    fn an_unreachable_server_is_not_ready_even_with_its_pod_ready() {
        let p = place(&db());
        let all: Vec<&str> = p.servers.iter().map(String::as_str).collect();
        let ready = healthy_or_converging(Some(1), &p, &observed(&all, 2), None, "t0");
        let mut o = observed(&all, 2);
        o.unreachable.insert("Server4".into());
        let s = healthy_or_converging(Some(1), &p, &o, Some(&ready), "t1");
        assert_eq!(status_of(&s, DEGRADED), (ConditionStatus::True, "ServersUnavailable".into()));
        assert_eq!(s.ready_servers, 5);
        assert_eq!(s.shards[1].ready_replicas, ["Server3", "Server5"]);
        assert!(condition(&s, READY).unwrap().message.contains("unreachable: Server4"));
    }

    #[test]
    fn a_recovering_copy_is_degraded_and_shows_the_topology_primary() {
        let p = place(&db());
        let all: Vec<&str> = p.servers.iter().map(String::as_str).collect();
        let mut o = observed(&all, 2);
        let sh2 = &mut o.topology.shards[1];
        sh2.primary = "Server4".into();
        sh2.replicas.insert("Server3".into(), ReplicaState::Recovering);
        // Even on a first look (no previous status): a recovering copy is a loss of redundancy.
        let s = healthy_or_converging(Some(1), &p, &o, None, "t0");
        assert_eq!(status_of(&s, READY), (ConditionStatus::False, "CopiesRecovering".into()));
        assert_eq!(status_of(&s, PROGRESSING), (ConditionStatus::True, "Healing".into()));
        assert_eq!(status_of(&s, DEGRADED), (ConditionStatus::True, "CopiesRecovering".into()));
        assert_eq!(s.shards[1].primary.as_deref(), Some("Server4"));
        assert_eq!(s.shards[1].ready_replicas, ["Server4", "Server5"]);
        assert_eq!(s.shards[1].recovering_replicas, ["Server3"]);
        assert_eq!(s.copies_ready, "11/12", "a recovering copy is a copy, not a ready one");
        assert!(condition(&s, DEGRADED).unwrap().message.contains("recovering: sh2 on Server3"));
    }

    #[test]
    fn a_rolling_update_is_progress_and_one_server_short_is_not_degraded() {
        let p = place(&db());
        let all: Vec<&str> = p.servers.iter().map(String::as_str).collect();
        let ready = healthy_or_converging(Some(1), &p, &observed(&all, 2), None, "t0");
        // Server2 was drained (its copies of sh1 and sh3 recover) and is restarting.
        let mut o = observed(&all, 2);
        o.rolling = true;
        o.updated_servers = ["Server5".to_owned()].into();
        o.ready_servers.remove("Server2");
        for shard in [0, 2] {
            o.topology.shards[shard].replicas.insert("Server2".into(), ReplicaState::Recovering);
        }
        let s = healthy_or_converging(Some(2), &p, &o, Some(&ready), "t1");
        assert_eq!(status_of(&s, PROGRESSING), (ConditionStatus::True, "RollingUpdate".into()));
        assert_eq!(status_of(&s, READY), (ConditionStatus::False, "RollingUpdate".into()));
        assert_eq!(status_of(&s, DEGRADED), (ConditionStatus::False, "RollingUpdate".into()));
        assert!(condition(&s, PROGRESSING).unwrap().message.contains("rolling update: 1/6 servers updated"));
        assert_eq!(s.updated_servers, 1);
        // A second server short during the rollout is a fault.
        o.unreachable.insert("Server4".into());
        let s = healthy_or_converging(Some(2), &p, &o, Some(&ready), "t2");
        assert_eq!(status_of(&s, DEGRADED), (ConditionStatus::True, "ServersUnavailable".into()));
        // Between two servers everything is ready: Ready, and still progressing.
        let mut o = observed(&all, 2);
        o.rolling = true;
        let s = healthy_or_converging(Some(2), &p, &o, Some(&ready), "t3");
        assert_eq!(status_of(&s, READY), (ConditionStatus::True, "AllReady".into()));
        assert_eq!(status_of(&s, PROGRESSING), (ConditionStatus::True, "RollingUpdate".into()));
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

    #[test]
    fn another_condition_is_set_beside_the_others_and_survives_an_invalid_spec() {
        let p = place(&db());
        let base = healthy_or_converging(Some(1), &p, &observed(&["Server0"], 1), None, "t0");
        let plain = ("InternalAuth", ConditionStatus::False, "None", "plain".to_owned());
        let s = with_condition(base.clone(), plain.clone(), None, "t0");
        assert_eq!(status_of(&s, "InternalAuth"), (ConditionStatus::False, "None".into()));
        assert_eq!(s.conditions.len(), base.conditions.len() + 1);
        let again = with_condition(base.clone(), plain, Some(&s), "t1");
        assert_eq!(condition(&again, "InternalAuth").unwrap().last_transition_time, "t0", "unchanged status");
        assert_eq!(again.conditions.len(), s.conditions.len(), "replaced, not added twice");
        let strict = ("InternalAuth", ConditionStatus::True, "Strict", "tls".to_owned());
        let climbed = with_condition(base, strict, Some(&s), "t2");
        assert_eq!(condition(&climbed, "InternalAuth").unwrap().last_transition_time, "t2");
        let invalid = invalid_spec(Some(2), "bad", Some(&s), "t3");
        assert_eq!(status_of(&invalid, "InternalAuth"), (ConditionStatus::False, "None".into()));
    }
}
