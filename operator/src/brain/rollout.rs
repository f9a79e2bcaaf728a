//! Rolling restarts: when servers must restart to run something new (an image, a binary, a
//! changed pod template), the order and the preparation that keep every shard served and lose
//! nothing, as CloudNativePG updates the primary last. Pure; a body says which servers are
//! outdated, carries out the [`Step`]s (a document change with [`apply`], or a restart) and
//! holds back the heal plan's recovers of the server about to restart ([`hold_recovers`]).
//!
//! Rules, checked every round against the current document and observations, so that an operator
//! restart resumes where the cluster is:
//! - **One server at a time.** Nothing happens unless every server in the document other than the
//!   one being restarted answers at the current epoch and every copy on them is `ready`: the
//!   previous server is back and caught up (its copies recovered and verified by the heal plan),
//!   and no fault is being healed.
//! - **Replicas before primaries.** The next server is an outdated one that is the primary of no
//!   shard, in name order; then the primaries. Handovers move primaries around, so the order is
//!   taken afresh each round.
//! - **Drain, then restart.** Before a server restarts, each shard it is the primary of is handed
//!   over to the ready copy with the highest applied sequence number that answers with its
//!   recorded copy (an updated server among equals, so a primary is not handed over twice), and
//!   its other copies become `recovering`: writes stop waiting for it and reads go elsewhere, so
//!   its restart fails no request (a write in flight at the old primary is fenced by the new
//!   epoch and retried by the router). It restarts once every other server follows that
//!   document. Its copies come back `recovering` and the heal plan copies, catches up and
//!   verifies them before they serve again.
//! - **A shard with one copy** cannot be drained: its server restarts holding it, and the shard
//!   is unavailable meanwhile. That is the price of one copy, not a reason to stop the rollout.
//! - "Unknown" (not probed yet) counts as not serving: it delays the rollout, never advances it.
//! - **A restart runs to its end.** A server being replaced (in Kubernetes: its pod is gone or
//!   terminating) may still answer, as a pod's process does through its termination grace period.
//!   Until it is back, nothing else moves: no other server is drained, and its copies are not
//!   recovered (the restart would throw them away, and a copy marked ready on a server about to
//!   stop undoes the drain; a later drain could even hand it a primary).

use super::observe::{Health, Observations};
use super::validate::natural_key;
use crate::brain::plan::Action;
use shard_server::topology::{ReplicaState, ShardEntry, Topology};
use std::collections::BTreeSet;

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No server is outdated.
    Done,
    /// Nothing may happen yet; why, for logs and the status.
    Wait(String),
    /// Take `server`'s copies out of service before its restart; a change of the document.
    Drain { server: String, changes: Vec<Change> },
    /// Restart `server` now: it serves nothing the others need.
    Restart { server: String },
}

/// One change of the document that prepares a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `to` becomes the primary of `shard`; the copy on `from` becomes `recovering`.
    HandOver { shard: String, from: String, to: String },
    /// The copy of `shard` on `server` becomes `recovering`.
    Demote { shard: String, server: String },
}

/// The step toward every server in `outdated` running what it should, while the servers in
/// `replacing` restart (their old process may still answer).
pub fn plan_rollout(
    topology: &Topology,
    outdated: &BTreeSet<String>,
    replacing: &BTreeSet<String>,
    seen: &Observations,
) -> Step {
    if outdated.is_empty() {
        return Step::Done;
    }
    if let Some(server) = replacing.iter().next() {
        return Step::Wait(format!("{server} is restarting and not back yet"));
    }
    let next = next_restart(topology, outdated);
    for name in topology.servers.keys().filter(|s| Some(*s) != next.as_ref()) {
        match seen.health(name) {
            Health::Up { epoch, .. } if *epoch >= topology.epoch => {}
            _ => return Step::Wait(format!("{name} does not serve at epoch {} yet", topology.epoch)),
        }
    }
    for shard in &topology.shards {
        let waiting =
            shard.replicas.iter().find(|(s, state)| Some(*s) != next.as_ref() && **state != ReplicaState::Ready);
        if let Some((server, state)) = waiting {
            return Step::Wait(format!("{} on {server} is {} yet", shard.id, state_name(*state)));
        }
    }
    if let Some(server) = next {
        return Step::Restart { server };
    }
    let server = order(topology, outdated).into_iter().next().expect("outdated is not empty");
    let mut changes = Vec::new();
    for (shard, _) in topology.shards_of(&server).filter(|(_, state)| *state == ReplicaState::Ready) {
        if shard.primary != server {
            changes.push(Change::Demote { shard: shard.id.clone(), server: server.clone() });
        } else if let Some(to) = successor(shard, outdated, seen) {
            changes.push(Change::HandOver { shard: shard.id.clone(), from: server.clone(), to });
        } else if shard.ready_replicas().count() > 1 {
            // Another copy is ready but has not answered with its recorded copy: wait for it
            // rather than restart a primary that could have been handed over.
            return Step::Wait(format!("no copy of {} answers to take it over from {server}", shard.id));
        }
    }
    Step::Drain { server, changes }
}

/// The server the rollout restarts next, once drained: the first in rollout order that is
/// outdated and serves nothing the others need (no ready copy, bar a shard's only one). Its
/// recovers are held back until it restarted ([`hold_recovers`]).
pub fn next_restart(topology: &Topology, outdated: &BTreeSet<String>) -> Option<String> {
    order(topology, outdated).into_iter().find(|s| drained(topology, s))
}

/// The servers whose copies must not be recovered now: the one about to restart
/// ([`next_restart`]) and those restarting (`replacing`). A copy recovered on them would be thrown
/// away by the restart, and marking it ready would undo the drain.
pub fn held(topology: &Topology, outdated: &BTreeSet<String>, replacing: &BTreeSet<String>) -> BTreeSet<String> {
    replacing.iter().cloned().chain(next_restart(topology, outdated)).collect()
}

/// Drops the heal plan's recovers onto the servers in `held` ([`held`]).
pub fn hold_recovers(actions: &mut Vec<Action>, held: &BTreeSet<String>) {
    actions.retain(|a| !matches!(a, Action::Recover { server, .. } if held.contains(server)));
}

/// The document after `changes` (epoch + 1), or `None` when none applies any more.
pub fn apply(topology: &Topology, changes: &[Change]) -> Option<Topology> {
    let mut next = topology.clone();
    let mut changed = false;
    for change in changes {
        let shard_id = match change {
            Change::HandOver { shard, .. } | Change::Demote { shard, .. } => shard,
        };
        let Some(shard) = next.shards.iter_mut().find(|s| s.id == *shard_id) else { continue };
        match change {
            Change::HandOver { from, to, .. } => {
                if shard.primary == *from && to != from && shard.replicas.get(to) == Some(&ReplicaState::Ready) {
                    shard.primary = to.clone();
                    shard.replicas.insert(from.clone(), ReplicaState::Recovering);
                    changed = true;
                }
            }
            Change::Demote { server, .. } => {
                if shard.primary != *server && shard.replicas.get(server) == Some(&ReplicaState::Ready) {
                    shard.replicas.insert(server.clone(), ReplicaState::Recovering);
                    changed = true;
                }
            }
        }
    }
    changed.then(|| {
        next.epoch += 1;
        next
    })
}

/// Outdated servers in the order they restart: those that are the primary of no shard, then the
/// primaries; each group in natural name order.
fn order(topology: &Topology, outdated: &BTreeSet<String>) -> Vec<String> {
    let mut servers: Vec<&String> = outdated.iter().collect();
    servers.sort_by_key(|s| (topology.shards.iter().any(|sh| sh.primary == **s), natural_key(s)));
    servers.into_iter().cloned().collect()
}

/// Whether `server` holds no ready copy, except a shard's only one.
fn drained(topology: &Topology, server: &str) -> bool {
    topology.shards_of(server).all(|(shard, state)| {
        state != ReplicaState::Ready || (shard.primary == server && shard.ready_replicas().count() == 1)
    })
}

/// The copy to take `shard` over from its primary: ready, answering with the copy the document
/// recorded for it (or any, when none is recorded), highest applied sequence number (its log is
/// the longest, so no other copy holds an entry it lacks); among equals one already updated, then
/// the first name.
fn successor(shard: &ShardEntry, outdated: &BTreeSet<String>, seen: &Observations) -> Option<String> {
    shard
        .ready_replicas()
        .filter(|r| *r != shard.primary)
        .filter_map(|r| {
            let copy = seen.copy(r, &shard.id)?;
            let intact = shard.copies.get(r).is_none_or(|recorded| *recorded == copy.copy_id);
            intact.then_some((r, copy.applied_seq))
        })
        .max_by(|a, b| a.1.cmp(&b.1).then(outdated.contains(b.0).cmp(&outdated.contains(a.0))).then(b.0.cmp(a.0)))
        .map(|(r, _)| r.to_owned())
}

fn state_name(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Ready => "ready",
        ReplicaState::Recovering => "recovering",
        ReplicaState::Leaving => "leaving",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::observe::CopySeen;
    use ReplicaState::{Ready, Recovering};
    use shard_server::topology::{ServerEntry, TOPOLOGY_VERSION};
    use std::collections::BTreeMap;

    const EPOCH: u64 = 7;

    /// A shard: id, primary, holders with their states.
    type ShardDef<'a> = (&'a str, &'a str, &'a [(&'a str, ReplicaState)]);

    /// Servers A, B, C, D, and `shards`.
    fn topology(shards: &[ShardDef]) -> Topology {
        let t = Topology {
            version: TOPOLOGY_VERSION,
            epoch: EPOCH,
            schema: serde_json::from_str(r#"{"columns": ["k", "v"], "dtypes": ["Number", "String"]}"#).unwrap(),
            ring: Default::default(),
            servers: ["A", "B", "C", "D"]
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), ServerEntry { id: i as u32, url: format!("http://{n}") }))
                .collect(),
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, (id, primary, holders))| ShardEntry {
                    id: id.to_string(),
                    low: i as i64 * 100,
                    size: 100,
                    primary: primary.to_string(),
                    replicas: holders.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
                    copies: holders.iter().map(|(n, _)| (n.to_string(), format!("{n}-{id}"))).collect(),
                })
                .collect(),
            unrouted_keys: Default::default(),
        };
        t.validate().unwrap();
        t
    }

    /// sh1 primary A on A, B, C; sh2 primary B on B, C, D: A and B are primaries, C and D not.
    fn two_shards() -> Topology {
        topology(&[
            ("sh1", "A", &[("A", Ready), ("B", Ready), ("C", Ready)]),
            ("sh2", "B", &[("B", Ready), ("C", Ready), ("D", Ready)]),
        ])
    }

    /// Every server answers at the topology's epoch, each copy at `seq` unless `seqs` says
    /// otherwise for (server, shard).
    fn seen(t: &Topology, seqs: &[(&str, &str, u64)]) -> Observations {
        let mut o = Observations::new();
        for name in t.servers.keys() {
            let copies: BTreeMap<String, CopySeen> = t
                .shards_of(name)
                .map(|(s, _)| {
                    let seq = seqs.iter().find(|(n, sh, _)| n == name && *sh == s.id).map_or(9, |(_, _, q)| *q);
                    (s.id.clone(), CopySeen { applied_seq: seq, copy_id: format!("{name}-{}", s.id), caught_up: true })
                })
                .collect();
            o.set(name, Health::Up { epoch: t.epoch, copies });
        }
        o
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn demote(shard: &str, server: &str) -> Change {
        Change::Demote { shard: shard.into(), server: server.into() }
    }

    fn hand_over(shard: &str, from: &str, to: &str) -> Change {
        Change::HandOver { shard: shard.into(), from: from.into(), to: to.into() }
    }

    #[test]
    fn nothing_outdated_is_done() {
        let t = two_shards();
        assert_eq!(plan_rollout(&t, &set(&[]), &set(&[]), &seen(&t, &[])), Step::Done);
    }

    #[test]
    fn replicas_drain_first_then_restart_once_drained() {
        let t = two_shards();
        let all = set(&["A", "B", "C", "D"]);
        let step = plan_rollout(&t, &all, &set(&[]), &seen(&t, &[]));
        assert_eq!(
            step,
            Step::Drain { server: "C".into(), changes: vec![demote("sh1", "C"), demote("sh2", "C")] },
            "C and D are primaries of nothing; C comes first by name"
        );
        let Step::Drain { changes, .. } = step else { unreachable!() };
        let drained = apply(&t, &changes).unwrap();
        assert_eq!(drained.epoch, EPOCH + 1);
        assert_eq!(next_restart(&drained, &all).as_deref(), Some("C"));
        // Until every other server follows the new document, C waits.
        let behind = seen(&t, &[]);
        assert!(matches!(plan_rollout(&drained, &all, &set(&[]), &behind), Step::Wait(w) if w.contains("epoch 8")));
        assert_eq!(plan_rollout(&drained, &all, &set(&[]), &seen(&drained, &[])), Step::Restart { server: "C".into() });
        // C is down (restarting): the others still serve, so C stays the one to restart; nothing
        // else starts while its copies recover.
        let mut o = seen(&drained, &[]);
        o.set("C", Health::Unknown);
        assert_eq!(plan_rollout(&drained, &all, &set(&[]), &o), Step::Restart { server: "C".into() });
        let updated = set(&["A", "B", "D"]);
        assert!(
            matches!(plan_rollout(&drained, &updated, &set(&[]), &o), Step::Wait(w) if w.contains("C does not serve")),
            "C runs the new version now but has not answered yet"
        );
        assert!(
            matches!(
                plan_rollout(&drained, &updated, &set(&[]), &seen(&drained, &[])),
                Step::Wait(w) if w == "sh1 on C is recovering yet"
            ),
            "its copies are recovered before the next server"
        );
    }

    #[test]
    fn primaries_hand_over_to_the_most_advanced_copy_preferring_updated_servers() {
        let t = two_shards();
        // Only the primaries are left. A: sh1 goes to B or C, both at 9; C is updated.
        let step = plan_rollout(&t, &set(&["A", "B"]), &set(&[]), &seen(&t, &[]));
        assert_eq!(step, Step::Drain { server: "A".into(), changes: vec![hand_over("sh1", "A", "C")] });
        // A copy further ahead wins over an updated one: no copy may hold an entry the new
        // primary lacks.
        let step = plan_rollout(&t, &set(&["A", "B"]), &set(&[]), &seen(&t, &[("B", "sh1", 10)]));
        assert_eq!(step, Step::Drain { server: "A".into(), changes: vec![hand_over("sh1", "A", "B")] });
        // B is the primary of sh2 and holds a copy of sh1: both leave it in one document.
        let step = plan_rollout(&t, &set(&["B"]), &set(&[]), &seen(&t, &[]));
        assert_eq!(
            step,
            Step::Drain { server: "B".into(), changes: vec![demote("sh1", "B"), hand_over("sh2", "B", "C")] }
        );
        let Step::Drain { changes, .. } = step else { unreachable!() };
        let next = apply(&t, &changes).unwrap();
        assert_eq!(next.shard("sh2").unwrap().primary, "C");
        assert_eq!(next.shard("sh2").unwrap().replicas["B"], Recovering);
        assert_eq!(next_restart(&next, &set(&["B"])).as_deref(), Some("B"));
    }

    #[test]
    fn a_copy_that_answers_with_another_identity_does_not_take_over() {
        let t = two_shards();
        let mut o = seen(&t, &[]);
        // B's copy of sh1 is not the recorded one (it lost its data); C is behind but intact.
        o.set(
            "B",
            Health::Up {
                epoch: EPOCH,
                copies: [("sh1".to_owned(), CopySeen { applied_seq: 50, copy_id: "other".into(), caught_up: true })]
                    .into(),
            },
        );
        let step = plan_rollout(&t, &set(&["A"]), &set(&[]), &o);
        assert_eq!(step, Step::Drain { server: "A".into(), changes: vec![hand_over("sh1", "A", "C")] });
        // No intact answer at all: wait rather than restart a primary that has copies.
        o.set("C", Health::Up { epoch: EPOCH, copies: BTreeMap::new() });
        assert!(
            matches!(plan_rollout(&t, &set(&["A"]), &set(&[]), &o), Step::Wait(w) if w.contains("take it over from A"))
        );
    }

    #[test]
    fn a_fault_elsewhere_pauses_the_rollout() {
        let t = topology(&[
            ("sh1", "A", &[("A", Ready), ("B", Ready), ("C", Recovering)]),
            ("sh2", "B", &[("B", Ready), ("C", Ready), ("D", Ready)]),
        ]);
        assert!(
            matches!(plan_rollout(&t, &set(&["D"]), &set(&[]), &seen(&t, &[])), Step::Wait(w) if w == "sh1 on C is recovering yet")
        );
        let t = two_shards();
        let mut o = seen(&t, &[]);
        o.set("A", Health::Down { since: std::time::Instant::now() });
        assert!(
            matches!(plan_rollout(&t, &set(&["D"]), &set(&[]), &o), Step::Wait(w) if w.contains("A does not serve"))
        );
        o.set("A", Health::Unknown);
        assert!(
            matches!(plan_rollout(&t, &set(&["D"]), &set(&[]), &o), Step::Wait(_)),
            "unknown never advances a rollout"
        );
    }

    #[test]
    fn a_shards_only_copy_restarts_with_its_server() {
        let t = topology(&[("sh1", "A", &[("A", Ready)]), ("sh2", "B", &[("B", Ready), ("C", Ready)])]);
        assert_eq!(next_restart(&t, &set(&["A"])).as_deref(), Some("A"), "nothing to drain: A is drained as it is");
        assert_eq!(plan_rollout(&t, &set(&["A"]), &set(&[]), &seen(&t, &[])), Step::Restart { server: "A".into() });
    }

    #[test]
    fn a_server_outside_the_document_restarts_at_once_and_recovers_are_held_only_for_the_next() {
        let t = two_shards();
        let mut outdated = set(&["E"]);
        assert_eq!(plan_rollout(&t, &outdated, &set(&[]), &seen(&t, &[])), Step::Restart { server: "E".into() });
        outdated.insert("C".into());
        let drained = apply(&t, &[demote("sh1", "C"), demote("sh2", "C")]).unwrap();
        assert_eq!(next_restart(&t, &outdated).as_deref(), Some("E"), "E holds nothing: the first one drained");
        // Once C is drained too, the drained servers go in rollout order.
        assert_eq!(next_restart(&drained, &outdated).as_deref(), Some("C"));
        let recover =
            |server: &str| Action::Recover { shard: "sh1".into(), server: server.into(), primary: "A".into() };
        let mut actions = vec![recover("C"), recover("D")];
        hold_recovers(&mut actions, &held(&drained, &outdated, &set(&[])));
        assert_eq!(actions, [recover("D")]);
    }

    #[test]
    fn nothing_moves_while_a_restarted_server_is_not_back() {
        // C was drained and its pod evicted; its old process may still answer (a pod through its
        // termination grace period). It is no longer outdated: its pod is gone.
        let t = apply(&two_shards(), &[demote("sh1", "C"), demote("sh2", "C")]).unwrap();
        let outdated = set(&["A", "B", "D"]);
        let replacing = set(&["C"]);
        // Its copies are not recovered until it is back.
        let recover =
            |server: &str| Action::Recover { shard: "sh1".into(), server: server.into(), primary: "A".into() };
        let mut actions = vec![recover("C")];
        hold_recovers(&mut actions, &held(&t, &outdated, &replacing));
        assert_eq!(actions, []);
        let mut actions = vec![recover("C")];
        hold_recovers(&mut actions, &held(&t, &outdated, &set(&[])));
        assert_eq!(actions, [recover("C")], "back: its copies are recovered");
        // Nor is the next server drained, even with every copy ready (as they would be had its
        // copies been recovered while its old process still answered).
        let ready = two_shards();
        assert!(
            matches!(plan_rollout(&ready, &outdated, &replacing, &seen(&ready, &[])), Step::Wait(w) if w == "C is restarting and not back yet")
        );
        assert!(
            matches!(plan_rollout(&ready, &outdated, &set(&[]), &seen(&ready, &[])), Step::Drain { server, .. } if server == "D"),
            "once back"
        );
        // Only the last server restarting: the rollout itself is done, its recovers still wait.
        assert_eq!(plan_rollout(&t, &set(&[]), &replacing, &seen(&t, &[])), Step::Done);
    }

    #[test]
    fn apply_skips_what_no_longer_fits() {
        let t = two_shards();
        assert_eq!(apply(&t, &[demote("sh1", "A")]), None, "the primary is handed over, never demoted");
        assert_eq!(apply(&t, &[hand_over("sh1", "B", "C")]), None, "B is not sh1's primary");
        assert_eq!(apply(&t, &[demote("sh9", "C")]), None);
        let once = apply(&t, &[demote("sh1", "C")]).unwrap();
        assert_eq!(apply(&once, &[demote("sh1", "C")]), None, "already recovering");
    }
}
