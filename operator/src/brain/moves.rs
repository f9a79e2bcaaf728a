//! Placement changes: from the topology (what holds each shard now) and the desired placement
//! (`placement::place` on the declared spec), the steps that lead from one to the other without
//! ever serving reads from an incomplete copy or dropping the last good one. Pure; a body carries
//! the steps out with [`apply`] (each is a plain change of the document) and acts on what changed
//! (starts servers before they are desired, stops them once they left the document).
//!
//! Rules, checked every round against the current document, so that an operator restart resumes
//! where the document says:
//! - A desired server the body has started (it has a URL) and the document lacks is added,
//!   holding nothing.
//! - A declared shard the document lacks is added once all its holders are in the document, every
//!   copy `ready` and the placement's primary: a new shard is empty, there is nothing to copy.
//! - A desired holder without a copy gets one as `recovering`; the heal plan (`plan::plan`) then
//!   copies it from the primary, verifies it and marks it `ready`. Heals come first, removals last.
//! - A copy no longer desired is removed only once every desired holder of its shard is `ready`,
//!   so at least one ready copy always remains and the new copies hold every acknowledged write.
//!   A primary that is no longer desired first hands over to the desired holder with the highest
//!   applied sequence number that answers with its recorded copy; the old primary's copy becomes
//!   `recovering` (it may hold a write nobody acknowledged, as in a failover) and is removed in a
//!   later round. With no such candidate nothing happens: the shard waits.
//! - A server no longer desired leaves the document once it holds no copy; the body then stops it
//!   and deletes its data.
//! - The declared handling of written keys in no shard (`unroutedKeys`) is copied into the
//!   document when it differs; routers follow it with the next document.
//! - Nothing else moves: a primary that is still desired stays primary (no needless handover),
//!   shards the declared spec no longer lists are left alone, and so is a shard whose range in the
//!   document differs from the declared one.

use super::observe::Observations;
use super::placement::Placement;
use super::validate::ValidatedDb;
use shard_server::topology::{ReplicaState, ServerEntry, ShardEntry, Topology, UnroutedKeys};
use std::collections::{BTreeMap, BTreeSet};

/// One step of a placement change; each is a plain change of the topology document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// A started server enters the document, holding nothing yet.
    AddServer { server: String, url: String },
    /// A new (empty) shard, every copy `ready`.
    AddShard { shard: String, low: i64, size: i64, primary: String, replicas: Vec<String> },
    /// A new copy of an existing shard, `recovering` until healed.
    AddReplica { shard: String, server: String },
    /// The leaving primary `from` hands the shard to `to`; `from` becomes `recovering`.
    HandOver { shard: String, from: String, to: String },
    /// A copy no longer desired leaves (never the primary, never the last ready copy).
    RemoveReplica { shard: String, server: String },
    /// A server no longer desired, holding no copy, leaves the document.
    RemoveServer { server: String },
    /// The declared handling of written keys in no shard (`spec.unroutedKeys`) changed.
    SetUnroutedKeys { policy: UnroutedKeys },
}

/// The steps to take now toward `desired` (the placement of `db`). `urls` has the base URL of
/// every server the body has started; `seen` is what the heal plan observed.
pub fn plan_moves(
    topology: &Topology,
    db: &ValidatedDb,
    desired: &Placement,
    urls: &BTreeMap<String, String>,
    seen: &Observations,
) -> Vec<Move> {
    let mut moves = Vec::new();
    if topology.unrouted_keys != db.unrouted_keys {
        moves.push(Move::SetUnroutedKeys { policy: db.unrouted_keys });
    }
    let mut present: BTreeSet<&str> = topology.servers.keys().map(String::as_str).collect();
    for server in &desired.servers {
        if !present.contains(server.as_str())
            && let Some(url) = urls.get(server)
        {
            moves.push(Move::AddServer { server: server.clone(), url: url.clone() });
            present.insert(server);
        }
    }
    for want in &desired.shards {
        let Some(range) = db.shards.iter().find(|s| s.id == want.id) else { continue };
        let Some(current) = topology.shard(&want.id) else {
            if want.replicas.iter().all(|r| present.contains(r.as_str())) {
                moves.push(Move::AddShard {
                    shard: want.id.clone(),
                    low: range.low,
                    size: range.size,
                    primary: want.primary.clone(),
                    replicas: want.replicas.clone(),
                });
            }
            continue;
        };
        if (current.low, current.size) != (range.low, range.size) {
            continue;
        }
        for server in &want.replicas {
            if !current.replicas.contains_key(server) && present.contains(server.as_str()) {
                moves.push(Move::AddReplica { shard: want.id.clone(), server: server.clone() });
            }
        }
        let settled = want.replicas.iter().all(|r| current.replicas.get(r) == Some(&ReplicaState::Ready));
        if !settled {
            continue;
        }
        for server in current.replicas.keys().filter(|s| !want.replicas.contains(s)) {
            if *server != current.primary {
                moves.push(Move::RemoveReplica { shard: want.id.clone(), server: server.clone() });
            } else if let Some(to) = successor(current, &want.replicas, seen) {
                moves.push(Move::HandOver { shard: want.id.clone(), from: server.clone(), to });
            }
        }
    }
    for server in topology.servers.keys() {
        if !desired.servers.contains(server) && topology.shards_of(server).next().is_none() {
            moves.push(Move::RemoveServer { server: server.clone() });
        }
    }
    moves
}

/// The desired holder to take over from a leaving primary: ready, answering with the copy the
/// document recorded for it (or any, when none is recorded yet), highest applied sequence
/// number; among equals the first name.
fn successor(shard: &ShardEntry, desired: &[String], seen: &Observations) -> Option<String> {
    desired
        .iter()
        .filter(|r| **r != shard.primary && shard.replicas.get(*r) == Some(&ReplicaState::Ready))
        .filter_map(|r| {
            let copy = seen.copy(r, &shard.id)?;
            let intact = shard.copies.get(r).is_none_or(|recorded| *recorded == copy.copy_id);
            intact.then_some((r, copy.applied_seq))
        })
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(r, _)| r.clone())
}

/// The next document after `moves` (epoch + 1), or `None` when none changes it. A step that no
/// longer fits the document (already done, or its preconditions gone) is skipped, so a body may
/// apply steps computed against an older document.
pub fn apply(topology: &Topology, moves: &[Move]) -> Option<Topology> {
    let mut next = topology.clone();
    let mut changed = false;
    for m in moves {
        changed |= apply_one(&mut next, m);
    }
    changed.then(|| {
        next.epoch += 1;
        next
    })
}

fn apply_one(t: &mut Topology, m: &Move) -> bool {
    use ReplicaState::{Ready, Recovering};
    match m {
        Move::AddServer { server, url } => {
            if t.servers.contains_key(server) {
                return false;
            }
            let used: BTreeSet<u32> = t.servers.values().map(|s| s.id).collect();
            let id = (0..).find(|i| !used.contains(i)).expect("fewer than 2^32 servers");
            t.servers.insert(server.clone(), ServerEntry { id, url: url.clone() });
            true
        }
        Move::AddShard { shard, low, size, primary, replicas } => {
            let overlaps = t.shards.iter().any(|s| s.low < low.saturating_add(*size) && *low < s.high_exclusive());
            if t.shard(shard).is_some()
                || overlaps
                || *size <= 0
                || low.checked_add(*size).is_none()
                || !replicas.contains(primary)
                || !replicas.iter().all(|r| t.servers.contains_key(r))
            {
                return false;
            }
            t.shards.push(ShardEntry {
                id: shard.clone(),
                low: *low,
                size: *size,
                primary: primary.clone(),
                replicas: replicas.iter().map(|r| (r.clone(), Ready)).collect(),
                copies: BTreeMap::new(),
            });
            t.shards.sort_by_key(|s| s.low);
            true
        }
        Move::AddReplica { shard, server } => {
            let known = t.servers.contains_key(server);
            match t.shards.iter_mut().find(|s| s.id == *shard) {
                Some(s) if known && !s.replicas.contains_key(server) => {
                    s.replicas.insert(server.clone(), Recovering);
                    // A copy this server held once, long ago, is not the one it will be healed to.
                    s.copies.remove(server);
                    true
                }
                _ => false,
            }
        }
        Move::HandOver { shard, from, to } => match t.shards.iter_mut().find(|s| s.id == *shard) {
            Some(s) if s.primary == *from && to != from && s.replicas.get(to) == Some(&Ready) => {
                s.primary = to.clone();
                s.replicas.insert(from.clone(), Recovering);
                true
            }
            _ => false,
        },
        Move::RemoveReplica { shard, server } => match t.shards.iter_mut().find(|s| s.id == *shard) {
            Some(s) if s.primary != *server && s.replicas.contains_key(server) => {
                // The primary is ready (a document invariant), so a ready copy always remains.
                s.replicas.remove(server);
                s.copies.remove(server);
                true
            }
            _ => false,
        },
        Move::RemoveServer { server } => {
            if t.shards_of(server).next().is_some() || t.shards.iter().any(|s| s.copies.contains_key(server)) {
                return false;
            }
            t.servers.remove(server).is_some()
        }
        Move::SetUnroutedKeys { policy } => std::mem::replace(&mut t.unrouted_keys, *policy) != *policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::observe::{CopySeen, Health};
    use crate::brain::placement::ShardPlacement;
    use crate::brain::validate::{ShardRange, tests::students, validate};
    use ReplicaState::{Ready, Recovering};

    const EPOCH: u64 = 5;

    fn db(shards: &[(&str, i64, i64)]) -> ValidatedDb {
        let mut db = validate(&students()).unwrap();
        db.shards =
            shards.iter().map(|(id, low, size)| ShardRange { id: id.to_string(), low: *low, size: *size }).collect();
        db
    }

    /// A document with servers `servers` and shard `sh1` = [0, 100) held as `holders` (primary first).
    fn topology(servers: &[&str], holders: &[(&str, ReplicaState)]) -> Topology {
        let t = Topology {
            version: shard_server::topology::TOPOLOGY_VERSION,
            epoch: EPOCH,
            schema: serde_json::from_str(r#"{"columns": ["k", "v"], "dtypes": ["Number", "String"]}"#).unwrap(),
            ring: Default::default(),
            servers: servers
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), ServerEntry { id: i as u32, url: format!("http://{n}") }))
                .collect(),
            shards: vec![ShardEntry {
                id: "sh1".into(),
                low: 0,
                size: 100,
                primary: holders[0].0.into(),
                replicas: holders.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
                copies: holders
                    .iter()
                    .filter(|(_, s)| *s == Ready)
                    .map(|(n, _)| (n.to_string(), format!("{n}0")))
                    .collect(),
            }],
            unrouted_keys: Default::default(),
        };
        t.validate().unwrap();
        t
    }

    fn desired(servers: &[&str], shards: &[(&str, &str, &[&str])]) -> Placement {
        Placement {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            shards: shards
                .iter()
                .map(|(id, primary, r)| ShardPlacement {
                    id: id.to_string(),
                    primary: primary.to_string(),
                    replicas: r.iter().map(|x| x.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn urls(names: &[&str]) -> BTreeMap<String, String> {
        names.iter().map(|n| (n.to_string(), format!("http://{n}"))).collect()
    }

    /// Every server answers, its copy of sh1 at `seqs[server]` (default 9) with the recorded identity.
    fn seen(t: &Topology, seqs: &[(&str, u64)]) -> Observations {
        let mut o = Observations::new();
        for name in t.servers.keys() {
            let seq = seqs.iter().find(|(n, _)| n == name).map_or(9, |(_, s)| *s);
            let copies =
                [("sh1".to_owned(), CopySeen { applied_seq: seq, copy_id: format!("{name}0"), caught_up: true })]
                    .into();
            o.set(name, Health::Up { epoch: t.epoch, copies });
        }
        o
    }

    fn add_server(s: &str) -> Move {
        Move::AddServer { server: s.into(), url: format!("http://{s}") }
    }
    fn add_replica(s: &str) -> Move {
        Move::AddReplica { shard: "sh1".into(), server: s.into() }
    }
    fn remove_replica(s: &str) -> Move {
        Move::RemoveReplica { shard: "sh1".into(), server: s.into() }
    }
    fn hand_over(from: &str, to: &str) -> Move {
        Move::HandOver { shard: "sh1".into(), from: from.into(), to: to.into() }
    }
    fn remove_server(s: &str) -> Move {
        Move::RemoveServer { server: s.into() }
    }

    struct Case {
        name: &'static str,
        servers: &'static [&'static str],
        holders: &'static [(&'static str, ReplicaState)],
        desired_servers: &'static [&'static str],
        desired_holders: &'static [&'static str],
        started: &'static [&'static str],
        seqs: &'static [(&'static str, u64)],
        expect: Vec<Move>,
    }

    #[test]
    fn plans_placement_changes() {
        let abc: &[&str] = &["A", "B", "C"];
        let all_ready: &[(&str, ReplicaState)] = &[("A", Ready), ("B", Ready), ("C", Ready)];
        let cases = vec![
            Case {
                name: "nothing to change",
                servers: abc,
                holders: all_ready,
                desired_servers: abc,
                desired_holders: &["A", "B", "C"],
                started: abc,
                seqs: &[],
                expect: vec![],
            },
            Case {
                name: "a new server waits until the body has started it",
                servers: abc,
                holders: all_ready,
                desired_servers: &["A", "B", "C", "D"],
                desired_holders: &["A", "B", "C", "D"],
                started: abc,
                seqs: &[],
                expect: vec![],
            },
            Case {
                name: "a started server enters and gets a recovering copy",
                servers: abc,
                holders: all_ready,
                desired_servers: &["A", "B", "C", "D"],
                desired_holders: &["A", "B", "C", "D"],
                started: &["A", "B", "C", "D"],
                seqs: &[],
                expect: vec![add_server("D"), add_replica("D")],
            },
            Case {
                name: "a copy moving away stays while its replacement recovers",
                servers: &["A", "B", "C", "D"],
                holders: &[("A", Ready), ("B", Ready), ("C", Ready), ("D", Recovering)],
                desired_servers: &["A", "B", "D"],
                desired_holders: &["A", "B", "D"],
                started: &["A", "B", "C", "D"],
                seqs: &[],
                expect: vec![],
            },
            Case {
                name: "then leaves once every desired copy is ready",
                servers: &["A", "B", "C", "D"],
                holders: &[("A", Ready), ("B", Ready), ("C", Ready), ("D", Ready)],
                desired_servers: &["A", "B", "D"],
                desired_holders: &["A", "B", "D"],
                started: &["A", "B", "C", "D"],
                seqs: &[],
                expect: vec![remove_replica("C")],
            },
            Case {
                name: "a desired copy demoted by the heal plan holds removals back",
                servers: abc,
                holders: &[("A", Ready), ("B", Recovering), ("C", Ready)],
                desired_servers: &["A", "B"],
                desired_holders: &["A", "B"],
                started: abc,
                seqs: &[],
                expect: vec![],
            },
            Case {
                name: "a leaving primary hands over to the most advanced desired copy",
                servers: abc,
                holders: all_ready,
                desired_servers: &["B", "C"],
                desired_holders: &["B", "C"],
                started: abc,
                seqs: &[("B", 7), ("C", 8)],
                expect: vec![hand_over("A", "C")],
            },
            Case {
                name: "among equals the first name",
                servers: abc,
                holders: all_ready,
                desired_servers: &["B", "C"],
                desired_holders: &["B", "C"],
                started: abc,
                seqs: &[],
                expect: vec![hand_over("A", "B")],
            },
            Case {
                name: "a leaving copy that is not desired takes no part in the handover",
                servers: abc,
                holders: all_ready,
                desired_servers: &["A", "C"],
                desired_holders: &["C"],
                started: abc,
                seqs: &[("B", 50)],
                expect: vec![hand_over("A", "C"), remove_replica("B")],
            },
            Case {
                name: "a server that holds nothing and is not desired leaves",
                servers: &["A", "B", "C", "D"],
                holders: all_ready,
                desired_servers: abc,
                desired_holders: &["A", "B", "C"],
                started: &["A", "B", "C", "D"],
                seqs: &[],
                expect: vec![remove_server("D")],
            },
        ];
        let db = db(&[("sh1", 0, 100)]);
        for case in cases {
            let t = topology(case.servers, case.holders);
            let primary = case.desired_holders[0];
            let want = desired(case.desired_servers, &[("sh1", primary, case.desired_holders)]);
            let got = plan_moves(&t, &db, &want, &urls(case.started), &seen(&t, case.seqs));
            assert_eq!(got, case.expect, "case: {}", case.name);
            if let Some(next) = apply(&t, &got) {
                next.validate().unwrap_or_else(|e| panic!("case {}: {e}", case.name));
                assert_eq!(next.epoch, EPOCH + 1);
            }
        }
    }

    #[test]
    fn a_handover_needs_an_observed_intact_candidate() {
        let db = db(&[("sh1", 0, 100)]);
        let t = topology(&["A", "B", "C"], &[("A", Ready), ("B", Ready), ("C", Ready)]);
        let want = desired(&["B", "C"], &[("sh1", "B", &["B", "C"])]);
        let mut o = Observations::new();
        assert_eq!(plan_moves(&t, &db, &want, &urls(&["A", "B", "C"]), &o), [], "nothing known: no handover");
        let copy = |seq, id: &str| Health::Up {
            epoch: EPOCH,
            copies: [("sh1".to_owned(), CopySeen { applied_seq: seq, copy_id: id.into(), caught_up: true })].into(),
        };
        o.set("B", copy(90, "B-new"));
        o.set("C", copy(3, "C0"));
        assert_eq!(
            plan_moves(&t, &db, &want, &urls(&["A", "B", "C"]), &o),
            [hand_over("A", "C")],
            "B answers with another copy than the recorded one: it lost its data"
        );
    }

    #[test]
    fn new_shards_are_created_ready_once_their_holders_exist() {
        let db = db(&[("sh1", 0, 100), ("sh2", 100, 50)]);
        let t = topology(&["A", "B"], &[("A", Ready), ("B", Ready)]);
        let want = desired(&["A", "B", "C"], &[("sh1", "A", &["A", "B"]), ("sh2", "C", &["B", "C"])]);
        assert_eq!(plan_moves(&t, &db, &want, &urls(&["A", "B"]), &seen(&t, &[])), []);
        let moves = plan_moves(&t, &db, &want, &urls(&["A", "B", "C"]), &seen(&t, &[]));
        let add_shard = Move::AddShard {
            shard: "sh2".into(),
            low: 100,
            size: 50,
            primary: "C".into(),
            replicas: vec!["B".into(), "C".into()],
        };
        assert_eq!(moves, [add_server("C"), add_shard.clone()]);
        let next = apply(&t, &moves).unwrap();
        next.validate().unwrap();
        assert_eq!(next.servers["C"].id, 2);
        let sh2 = next.shard("sh2").unwrap();
        assert_eq!((sh2.primary.as_str(), sh2.ready_replicas().collect::<Vec<_>>()), ("C", vec!["B", "C"]));
        assert_eq!(apply(&next, &[add_shard]), None, "applied twice changes nothing");
        let overlapping =
            Move::AddShard { shard: "sh9".into(), low: 50, size: 10, primary: "A".into(), replicas: vec!["A".into()] };
        assert_eq!(apply(&next, &[overlapping]), None, "an overlapping range is never added");
    }

    #[test]
    fn the_declared_handling_of_unrouted_keys_reaches_the_document() {
        let mut db = db(&[("sh1", 0, 100)]);
        let t = topology(&["A", "B"], &[("A", Ready), ("B", Ready)]);
        let want = desired(&["A", "B"], &[("sh1", "A", &["A", "B"])]);
        assert_eq!(plan_moves(&t, &db, &want, &urls(&["A", "B"]), &seen(&t, &[])), [], "both reject");
        db.unrouted_keys = UnroutedKeys::Skip;
        let moves = plan_moves(&t, &db, &want, &urls(&["A", "B"]), &seen(&t, &[]));
        assert_eq!(moves, [Move::SetUnroutedKeys { policy: UnroutedKeys::Skip }]);
        let next = apply(&t, &moves).unwrap();
        assert_eq!((next.unrouted_keys, next.epoch), (UnroutedKeys::Skip, EPOCH + 1));
        assert_eq!(apply(&next, &moves), None, "applied twice changes nothing");
        assert_eq!(plan_moves(&next, &db, &want, &urls(&["A", "B"]), &seen(&next, &[])), []);
    }

    #[test]
    fn apply_never_removes_the_primary_or_a_server_that_holds_a_copy() {
        let t = topology(&["A", "B", "C"], &[("A", Ready), ("B", Ready)]);
        assert_eq!(apply(&t, &[remove_replica("A")]), None, "the primary stays");
        assert_eq!(apply(&t, &[remove_server("B")]), None, "B still holds sh1");
        assert_eq!(apply(&t, &[hand_over("A", "C")]), None, "C holds no copy");
        let t2 = apply(&t, &[hand_over("A", "B")]).unwrap();
        assert_eq!((t2.shards[0].primary.as_str(), t2.shards[0].replicas["A"]), ("B", Recovering));
        let t3 = apply(&t2, &[remove_replica("A"), remove_server("A")]).unwrap();
        assert_eq!(t3.shards[0].replicas.keys().collect::<Vec<_>>(), ["B"]);
        assert!(!t3.servers.contains_key("A"));
        assert!(!t3.shards[0].copies.contains_key("A"));
        t3.validate().unwrap();
    }

    /// Drives a whole change to its end, healing every recovering copy between rounds as the heal
    /// plan would, and checks after every step that each shard keeps a ready primary.
    #[test]
    fn a_whole_move_converges_and_always_keeps_a_ready_primary() {
        let db = db(&[("sh1", 0, 100)]);
        let mut t = topology(&["A", "B", "C"], &[("A", Ready), ("B", Ready), ("C", Ready)]);
        // A and B go, D and E come: every copy moves, the primary included.
        let want = desired(&["C", "D", "E"], &[("sh1", "D", &["C", "D", "E"])]);
        let started = urls(&["A", "B", "C", "D", "E"]);
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 20, "no convergence: {t:?}");
            let moves = plan_moves(&t, &db, &want, &started, &seen(&t, &[]));
            let Some(mut next) = apply(&t, &moves) else { break };
            next.validate().unwrap();
            // The heal plan: every recovering copy gets healed before the next round.
            for s in &mut next.shards {
                for state in s.replicas.values_mut() {
                    *state = Ready;
                }
            }
            for shard in &next.shards {
                assert!(shard.ready_replicas().count() >= 1);
            }
            t = next;
        }
        assert_eq!(t.servers.keys().collect::<Vec<_>>(), ["C", "D", "E"]);
        assert_eq!(t.shards[0].replicas.keys().collect::<Vec<_>>(), ["C", "D", "E"]);
        assert_eq!(t.shards[0].primary, "C", "the surviving copy with the highest seq (ties: first name) took over");
    }
}
