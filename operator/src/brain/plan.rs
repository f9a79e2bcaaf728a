//! Heal and failover plans: from the topology (what should hold each shard) and the observations
//! (what was last seen), the actions that bring the two together. Pure; the bodies carry the
//! actions out and call [`apply`] to get the next topology document.
//!
//! Rules, per shard:
//! - A primary unreachable past `failover_after`, or answering with a copy that is not the one
//!   recorded (it lost its data), is replaced by the `ready` replica with the highest applied
//!   sequence number among those answering with their recorded copy and caught up with their
//!   primary since they became ready. The body publishes it only once the old primary's lease
//!   has run out (`brain::lease`). Its own copy becomes
//!   `recovering`: it may hold entries nobody acknowledged, so it must start over from a snapshot.
//!   With no such candidate nothing happens: the shard waits (writes fail) rather than lose data.
//! - A `ready` replica unreachable past `demote_after`, or answering with another copy, becomes
//!   `recovering`, so writes stop waiting for it and reads stop using it; so does one that, at a
//!   sequence number where it and its primary both reported, had another history hash or rows
//!   checksum (a scrub: the copy differs where it should equal the primary's, and is copied afresh).
//! - A `recovering` replica is recovered from the primary once both answer and follow the current
//!   epoch (the replica refuses a recover until its topology says `recovering`). A server that
//!   comes back with its data intact is recovered too: simpler than proving its copy a prefix of
//!   the primary's, and always safe.
//! - A `ready` copy whose identity was never recorded (a fresh cluster) gets it recorded.
//!
//! "Unknown" (not yet probed) never leads to an action, and nothing here removes a copy.

use super::observe::{Health, Observations};
use shard_server::topology::{ReplicaState, Topology};
use std::time::{Duration, Instant};

/// Timeouts of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long a primary may be unreachable before another replica takes over.
    pub failover_after: Duration,
    /// How long a ready replica may be unreachable before writes stop waiting for it (until then
    /// writes to its shards fail).
    pub demote_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { failover_after: Duration::from_secs(3), demote_after: Duration::from_secs(3) }
    }
}

/// Why a copy stopped counting as ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Unreachable,
    /// Its server answers with a copy other than the recorded one: it started over empty.
    LostData,
    /// At a sequence number where it and its primary both reported, its history hash or its rows'
    /// checksum differed from the primary's.
    Diverged,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Unreachable => "unreachable",
            Reason::LostData => "lost its data",
            Reason::Diverged => "differs from its primary at an equal sequence number",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record the identity of a ready copy seen for the first time.
    RecordCopy { shard: String, server: String, copy_id: String },
    /// The copy no longer serves reads nor holds up writes.
    MarkRecovering { shard: String, server: String, reason: Reason },
    /// `to` becomes the primary; the copy on `from` becomes `recovering`.
    Promote { shard: String, from: String, to: String, reason: Reason },
    /// I/O for the body: have `server` replace its copy from `primary` (which the server finds in
    /// its own topology) and verify it; on success the body applies [`Action::MarkReady`].
    /// Changes no document itself.
    Recover { shard: String, server: String, primary: String },
    /// A verified recover finished: the copy serves again, under its new identity.
    MarkReady { shard: String, server: String, copy_id: String },
}

impl Action {
    pub fn shard(&self) -> &str {
        match self {
            Action::RecordCopy { shard, .. }
            | Action::MarkRecovering { shard, .. }
            | Action::Promote { shard, .. }
            | Action::Recover { shard, .. }
            | Action::MarkReady { shard, .. } => shard,
        }
    }

    /// Whether the action changes the topology document.
    pub fn changes_topology(&self) -> bool {
        !matches!(self, Action::Recover { .. })
    }
}

/// What to do now.
pub fn plan(topology: &Topology, seen: &Observations, now: Instant, settings: &Settings) -> Vec<Action> {
    let mut actions = Vec::new();
    let down_past = |server: &str, limit: Duration| matches!(seen.health(server), Health::Down { since } if now.saturating_duration_since(*since) >= limit);
    // Whether `server`'s copy is known to have lost data: it answers with a copy other than the
    // recorded one, or, never recorded (so ready since its shard was created: a copy made ready
    // later is recorded then), it answers below a sequence number some copy of the shard had
    // reported confirmed in an earlier round of probes, so before this server was asked. A
    // confirmed entry was held by every ready replica of its primary before it was confirmed, so
    // an intact copy that was ready all along holds it; one that lags holds at least that much
    // and is only behind by entries in flight, which are not confirmed yet. Answers of the same
    // round prove nothing: they are unordered, so a confirmation reported in one may have come
    // after another server answered. From servers that report no confirmed number (an older
    // release) the rule is coarser: a copy at 0 although some copy reported more in an earlier
    // round (a replica whose very first entry is still in flight a round later may then be sent
    // to a recover it did not need; that is safe). Recording a wiped copy would make an empty
    // primary's next entries look like replays to its replicas, or let an empty replica stand
    // for a full one.
    let lost_data = |shard: &shard_server::topology::ShardEntry, server: &str| match (
        shard.copies.get(server),
        seen.copy(server, &shard.id),
    ) {
        (Some(recorded), Some(copy)) => *recorded != copy.copy_id,
        (None, Some(copy)) => match seen.confirmed_before(&shard.id, server) {
            Some(confirmed) => copy.applied_seq < confirmed,
            None => copy.applied_seq == 0 && seen.reached_before(&shard.id, server) > 0,
        },
        _ => false,
    };
    for shard in &topology.shards {
        let mut changes = Vec::new();
        let primary = shard.primary.as_str();
        let primary_failed = if down_past(primary, settings.failover_after) {
            Some(Reason::Unreachable)
        } else if lost_data(shard, primary) {
            Some(Reason::LostData)
        } else {
            None
        };
        let mut new_primary = None;
        if let Some(reason) = primary_failed {
            // A ready replica that has not caught up since it became ready may miss writes its
            // primary acknowledged before it followed that topology: never a candidate.
            let candidate = shard
                .ready_replicas()
                .filter(|r| *r != primary && !lost_data(shard, r) && seen.differs(r, primary, &shard.id).is_none())
                .filter_map(|r| seen.copy(r, &shard.id).filter(|c| c.caught_up).map(|c| (r, c.applied_seq)))
                // Highest sequence number; among equals the first name, so the choice is stable.
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)));
            if let Some((to, _)) = candidate {
                new_primary = Some(to);
                changes.push(Action::Promote { shard: shard.id.clone(), from: primary.into(), to: to.into(), reason });
            }
        }
        for (server, state) in &shard.replicas {
            let server = server.as_str();
            let is_primary = server == primary;
            match state {
                ReplicaState::Ready if !is_primary && Some(server) != new_primary => {
                    let reason = if lost_data(shard, server) {
                        Some(Reason::LostData)
                    } else if down_past(server, settings.demote_after) {
                        Some(Reason::Unreachable)
                    } else if primary_failed.is_none() && seen.differs(server, primary, &shard.id).is_some() {
                        // The primary is the reference: its entries define the history.
                        Some(Reason::Diverged)
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        changes.push(Action::MarkRecovering { shard: shard.id.clone(), server: server.into(), reason });
                    }
                }
                _ => {}
            }
            // A copy at 0 while the shard is known to be ahead is recorded only once a later
            // round settles whether it lags or lost its data.
            if *state == ReplicaState::Ready
                && !shard.copies.contains_key(server)
                && let Some(copy) = seen.copy(server, &shard.id)
                && !(copy.applied_seq == 0 && seen.highest(&shard.id) > 0)
                && !(is_primary && primary_failed.is_some())
                && !lost_data(shard, server)
            {
                changes.push(Action::RecordCopy {
                    shard: shard.id.clone(),
                    server: server.into(),
                    copy_id: copy.copy_id.clone(),
                });
            }
        }
        // Recover only against a settled shard: after this round's changes are published, the
        // next round sees the replica's new state and the new primary.
        if changes.is_empty() && primary_failed.is_none() {
            let current = |s: &str| matches!(seen.health(s), Health::Up { epoch, .. } if *epoch >= topology.epoch);
            for server in shard.replicas.iter().filter(|(_, s)| **s == ReplicaState::Recovering).map(|(n, _)| n) {
                if current(server) && current(primary) && topology.servers.contains_key(primary) {
                    actions.push(Action::Recover {
                        shard: shard.id.clone(),
                        server: server.clone(),
                        primary: primary.into(),
                    });
                }
            }
        }
        actions.extend(changes);
    }
    actions
}

/// The next topology document after `actions` (epoch + 1), or `None` when none changes it.
/// Actions that no longer fit the document (a copy that is gone, a promotion already made) are
/// skipped, so a body may apply an outcome computed against an older document.
pub fn apply(topology: &Topology, actions: &[Action]) -> Option<Topology> {
    let mut next = topology.clone();
    let mut changed = false;
    for action in actions {
        let Some(shard) = next.shards.iter_mut().find(|s| s.id == action.shard()) else { continue };
        match action {
            Action::RecordCopy { server, copy_id, .. } => {
                if shard.replicas.get(server) == Some(&ReplicaState::Ready) {
                    shard.copies.insert(server.clone(), copy_id.clone());
                    changed = true;
                }
            }
            Action::MarkRecovering { server, .. } => {
                if *server != shard.primary && shard.replicas.get(server) == Some(&ReplicaState::Ready) {
                    shard.replicas.insert(server.clone(), ReplicaState::Recovering);
                    changed = true;
                }
            }
            Action::Promote { from, to, .. } => {
                if shard.primary == *from && *to != *from && shard.replicas.get(to) == Some(&ReplicaState::Ready) {
                    shard.primary = to.clone();
                    shard.replicas.insert(from.clone(), ReplicaState::Recovering);
                    changed = true;
                }
            }
            Action::MarkReady { server, copy_id, .. } => {
                if shard.replicas.get(server) == Some(&ReplicaState::Recovering) {
                    shard.replicas.insert(server.clone(), ReplicaState::Ready);
                    shard.copies.insert(server.clone(), copy_id.clone());
                    changed = true;
                }
            }
            Action::Recover { .. } => {}
        }
    }
    changed.then(|| {
        next.epoch += 1;
        next
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::observe::{CopySeen, Probe};
    use shard_server::topology::{ServerEntry, ShardEntry, TOPOLOGY_VERSION};
    use std::collections::BTreeMap;

    const EPOCH: u64 = 5;

    /// One shard `sh1` on servers A (primary), B and C, each with the given state, copies
    /// recorded as `A0`, `B0`, `C0` for ready copies.
    fn topology(states: [ReplicaState; 3]) -> Topology {
        let names = ["A", "B", "C"];
        let replicas: BTreeMap<_, _> = names.iter().zip(states).map(|(n, s)| (n.to_string(), s)).collect();
        let copies = names
            .iter()
            .zip(states)
            .filter(|(_, s)| *s == ReplicaState::Ready)
            .map(|(n, _)| (n.to_string(), format!("{n}0")))
            .collect();
        let t = Topology {
            version: TOPOLOGY_VERSION,
            epoch: EPOCH,
            schema: serde_json::from_str(r#"{"columns": ["k", "v"], "dtypes": ["Number", "String"]}"#).unwrap(),
            ring: Default::default(),
            servers: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), ServerEntry { id: i as u32, url: format!("http://{n}") }))
                .collect(),
            shards: vec![ShardEntry { id: "sh1".into(), low: 0, size: 100, primary: "A".into(), replicas, copies }],
            unrouted_keys: Default::default(),
        };
        t.validate().unwrap();
        t
    }

    use ReplicaState::{Ready, Recovering};

    fn up(seq: u64, copy: &str) -> Health {
        up_at(EPOCH, seq, copy)
    }

    fn up_at(epoch: u64, seq: u64, copy: &str) -> Health {
        Health::Up {
            epoch,
            copies: [("sh1".to_owned(), CopySeen { applied_seq: seq, copy_id: copy.into(), caught_up: true })].into(),
        }
    }

    struct Case {
        name: &'static str,
        states: [ReplicaState; 3],
        /// Health of A, B, C; `Down` given as seconds of silence.
        seen: [Seen; 3],
        expect: Vec<Action>,
    }

    enum Seen {
        Unknown,
        Up(u64, &'static str),
        UpAt(u64, u64, &'static str),
        Down(u64),
        /// Answers, but reports no copy of the shard.
        UpEmpty,
        /// Answers as a ready replica that has not caught up with its primary yet.
        Behind(u64, &'static str),
    }

    fn rec(server: &str, reason: Reason) -> Action {
        Action::MarkRecovering { shard: "sh1".into(), server: server.into(), reason }
    }

    fn promote(from: &str, to: &str, reason: Reason) -> Action {
        Action::Promote { shard: "sh1".into(), from: from.into(), to: to.into(), reason }
    }

    fn recover(server: &str) -> Action {
        Action::Recover { shard: "sh1".into(), server: server.into(), primary: "A".into() }
    }

    #[test]
    fn plans_heals_and_failovers() {
        use Reason::{LostData, Unreachable};
        use Seen::{Behind, Down, Unknown, Up, UpAt, UpEmpty};
        let all_ready = [Ready, Ready, Ready];
        let cases = vec![
            Case { name: "all well", states: all_ready, seen: [Up(9, "A0"), Up(9, "B0"), Up(9, "C0")], expect: vec![] },
            Case { name: "nothing known yet", states: all_ready, seen: [Unknown, Unknown, Unknown], expect: vec![] },
            Case {
                name: "a replica down briefly is left alone",
                states: all_ready,
                seen: [Up(9, "A0"), Down(2), Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "a replica down past the timeout is demoted",
                states: all_ready,
                seen: [Up(9, "A0"), Down(3), Up(9, "C0")],
                expect: vec![rec("B", Unreachable)],
            },
            Case {
                name: "a replica back with another copy lost its data",
                states: all_ready,
                seen: [Up(9, "A0"), Up(0, "B1"), Up(9, "C0")],
                expect: vec![rec("B", LostData)],
            },
            Case {
                name: "a replica that reports no copy is unknown, not lost",
                states: all_ready,
                seen: [Up(9, "A0"), UpEmpty, Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "a recovering replica that answers is recovered",
                states: [Ready, Recovering, Ready],
                seen: [Up(9, "A0"), Up(3, "B1"), Up(9, "C0")],
                expect: vec![recover("B")],
            },
            Case {
                name: "not before it follows the current epoch",
                states: [Ready, Recovering, Ready],
                seen: [Up(9, "A0"), UpAt(EPOCH - 1, 3, "B1"), Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "nor while the primary lags the epoch",
                states: [Ready, Recovering, Ready],
                seen: [UpAt(EPOCH - 1, 9, "A0"), Up(3, "B1"), Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "a recovering replica still down waits",
                states: [Ready, Recovering, Ready],
                seen: [Up(9, "A0"), Down(60), Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "a primary down briefly is left alone",
                states: all_ready,
                seen: [Down(2), Up(9, "B0"), Up(9, "C0")],
                expect: vec![],
            },
            Case {
                name: "failover picks the highest applied sequence number",
                states: all_ready,
                seen: [Down(3), Up(8, "B0"), Up(9, "C0")],
                expect: vec![promote("A", "C", Unreachable)],
            },
            Case {
                name: "among equals the first name",
                states: all_ready,
                seen: [Down(3), Up(9, "B0"), Up(9, "C0")],
                expect: vec![promote("A", "B", Unreachable)],
            },
            Case {
                name: "only reachable ready replicas are candidates; the other down one is demoted",
                states: all_ready,
                seen: [Down(5), Down(5), Up(4, "C0")],
                expect: vec![promote("A", "C", Unreachable), rec("B", Unreachable)],
            },
            Case {
                name: "a recovering replica is never promoted",
                states: [Ready, Recovering, Ready],
                seen: [Down(5), Up(20, "B1"), Down(1)],
                expect: vec![],
            },
            Case {
                name: "a replica that has not caught up since it became ready is no candidate",
                states: all_ready,
                seen: [Down(5), Behind(20, "B0"), Up(9, "C0")],
                expect: vec![promote("A", "C", Unreachable)],
            },
            Case {
                name: "nor when it is the only one",
                states: all_ready,
                seen: [Down(5), Behind(20, "B0"), Down(5)],
                expect: vec![rec("C", Unreachable)],
            },
            Case {
                name: "no candidate known: no promotion",
                states: all_ready,
                seen: [Down(5), Unknown, UpEmpty],
                expect: vec![],
            },
            Case {
                name: "a replica that lost its data is no candidate",
                states: all_ready,
                seen: [Down(5), Up(0, "B1"), Up(7, "C0")],
                expect: vec![promote("A", "C", Unreachable), rec("B", LostData)],
            },
            Case {
                name: "a primary back without its data fails over at once",
                states: all_ready,
                seen: [Up(0, "A1"), Up(9, "B0"), Up(8, "C0")],
                expect: vec![promote("A", "B", LostData)],
            },
            Case {
                name: "no recover while the primary is failing",
                states: [Ready, Recovering, Ready],
                seen: [Down(1), Up(0, "B1"), Up(9, "C0")],
                expect: vec![],
            },
        ];
        let now = Instant::now() + Duration::from_secs(3600);
        for case in cases {
            let t = topology(case.states);
            let mut seen = Observations::new();
            for (name, s) in ["A", "B", "C"].iter().zip(case.seen) {
                let h = match s {
                    Seen::Unknown => Health::Unknown,
                    Seen::Up(seq, c) => up(seq, c),
                    Seen::UpAt(e, seq, c) => up_at(e, seq, c),
                    Seen::Down(secs) => Health::Down { since: now - Duration::from_secs(secs) },
                    Seen::UpEmpty => Health::Up { epoch: EPOCH, copies: BTreeMap::new() },
                    Seen::Behind(seq, c) => Health::Up {
                        epoch: EPOCH,
                        copies: [(
                            "sh1".to_owned(),
                            CopySeen { applied_seq: seq, copy_id: c.into(), caught_up: false },
                        )]
                        .into(),
                    },
                };
                seen.set(name, h);
            }
            let got = plan(&t, &seen, now, &Settings::default());
            assert_eq!(got, case.expect, "case: {}", case.name);
            // Whatever is planned leaves a valid document.
            if let Some(next) = apply(&t, &got) {
                next.validate().unwrap_or_else(|e| panic!("case {}: {e}", case.name));
                assert_eq!(next.epoch, EPOCH + 1, "case: {}", case.name);
            }
        }
    }

    #[test]
    fn a_replica_whose_history_or_rows_differ_from_the_primary_at_one_number_is_copied_afresh() {
        use crate::brain::observe::Probe;
        use shard_server::api::{Role, ServerStatus, ShardStatus};
        let t = topology([Ready, Ready, Ready]);
        let probe = |copy: &str, seq: u64, hash: &str| {
            let shard = ShardStatus {
                role: Role::Replica,
                applied_seq: seq,
                rows: 1,
                checksum: None,
                copy_id: copy.into(),
                cached: true,
                caught_up: Some(true),
                hash: Some(hash.into()),
                confirmed_seq: None,
            };
            Probe::Answered(ServerStatus {
                server: copy.into(),
                protocol: shard_server::api::PROTOCOL_VERSION,
                epoch: EPOCH,
                shards: [("sh1".to_owned(), shard)].into(),
                lease_token: None,
                internal_auth: None,
            })
        };
        let now = Instant::now();
        let mut seen = Observations::new();
        seen.record("A", probe("A0", 9, "h9"), now);
        seen.record("B", probe("B0", 9, "forged"), now);
        seen.record("C", probe("C0", 9, "h9"), now);
        assert_eq!(plan(&t, &seen, now, &Settings::default()), [rec("B", Reason::Diverged)]);
        // A failed primary is replaced by a copy that agrees with it, not by the one that differs
        // (first in name order among equals otherwise).
        let mut failing = seen.clone();
        failing.set("A", Health::Down { since: now - Duration::from_secs(5) });
        assert_eq!(plan(&t, &failing, now, &Settings::default()), [promote("A", "C", Reason::Unreachable)]);
    }

    #[test]
    fn copies_of_a_fresh_cluster_are_recorded_once() {
        let mut t = topology([Ready, Ready, Recovering]);
        t.shards[0].copies.clear();
        let mut seen = Observations::new();
        seen.set("A", up(1, "a"));
        seen.set("B", up(1, "b"));
        seen.set("C", up(1, "c"));
        let actions = plan(&t, &seen, Instant::now(), &Settings::default());
        let record = |s: &str, c: &str| Action::RecordCopy { shard: "sh1".into(), server: s.into(), copy_id: c.into() };
        assert_eq!(actions, [record("A", "a"), record("B", "b")], "a recovering copy's identity is not recorded");
        let next = apply(&t, &actions).unwrap();
        assert_eq!(next.shards[0].copies, [("A".to_owned(), "a".to_owned()), ("B".into(), "b".into())].into());
        assert_eq!(plan(&next, &seen, Instant::now(), &Settings::default()), [], "C waits for the new epoch");
        for (server, copy) in [("A", "a"), ("B", "b"), ("C", "c")] {
            seen.set(server, up_at(EPOCH + 1, 1, copy));
        }
        assert_eq!(plan(&next, &seen, Instant::now(), &Settings::default()), [recover("C")], "then C heals");
    }

    #[test]
    fn a_copy_wiped_before_it_was_recorded_is_not_recorded() {
        let mut t = topology([Ready, Ready, Ready]);
        t.shards[0].copies.clear();
        let record = |s: &str, c: &str| Action::RecordCopy { shard: "sh1".into(), server: s.into(), copy_id: c.into() };
        let t0 = Instant::now();
        let round = |i: u64| t0 + Duration::from_secs(i);
        let answer = |seq: u64, copy: &str| {
            let Health::Up { epoch, copies } = up(seq, copy) else { unreachable!() };
            let shards = copies
                .into_iter()
                .map(|(id, c)| {
                    let s = shard_server::api::ShardStatus {
                        role: shard_server::api::Role::Replica,
                        applied_seq: c.applied_seq,
                        rows: 0,
                        checksum: None,
                        copy_id: c.copy_id,
                        cached: false,
                        caught_up: None,
                        hash: None,
                        confirmed_seq: None,
                    };
                    (id, s)
                })
                .collect();
            Probe::Answered(shard_server::api::ServerStatus {
                server: String::new(),
                protocol: shard_server::api::PROTOCOL_VERSION,
                epoch,
                shards,
                lease_token: None,
                internal_auth: None,
            })
        };
        let probe = |seen: &mut Observations, i: u64, copies: [(&str, u64); 3]| {
            for (server, seq) in copies {
                seen.record(server, answer(seq, &server.to_lowercase()), round(i));
            }
        };
        let mut seen = Observations::new();
        // Within one round, a copy at 0 beside copies ahead proves nothing: the 0 may be the
        // older state (a fresh cluster's primary asked just before the first writes). It is
        // neither recovered nor recorded until a later round settles it.
        probe(&mut seen, 0, [("A", 0), ("B", 4), ("C", 4)]);
        assert_eq!(plan(&t, &seen, round(0), &Settings::default()), [record("B", "b"), record("C", "c")]);
        // A replica back empty a round after the others held entries: recovered, not recorded.
        probe(&mut seen, 1, [("A", 4), ("B", 0), ("C", 4)]);
        assert_eq!(
            plan(&t, &seen, round(1), &Settings::default()),
            [record("A", "a"), rec("B", Reason::LostData), record("C", "c")]
        );
        // The primary back empty: the most advanced replica takes over.
        probe(&mut seen, 2, [("A", 0), ("B", 3), ("C", 4)]);
        assert_eq!(
            plan(&t, &seen, round(2), &Settings::default()),
            [promote("A", "C", Reason::LostData), record("B", "b"), record("C", "c")]
        );
        // Every copy at 0, round after round, is a fresh shard; a copy behind but not empty
        // merely lags.
        let mut fresh = Observations::new();
        probe(&mut fresh, 0, [("A", 0), ("B", 0), ("C", 0)]);
        probe(&mut fresh, 1, [("A", 0), ("B", 0), ("C", 0)]);
        assert_eq!(
            plan(&t, &fresh, round(1), &Settings::default()),
            [record("A", "a"), record("B", "b"), record("C", "c")]
        );
        probe(&mut fresh, 2, [("A", 5), ("B", 2), ("C", 0)]);
        probe(&mut fresh, 3, [("A", 6), ("B", 3), ("C", 1)]);
        assert_eq!(plan(&t, &fresh, round(3), &Settings::default()).len(), 3, "all recorded");
    }

    #[test]
    fn an_unrecorded_copy_is_judged_by_what_was_confirmed_before_it_answered() {
        use shard_server::api::{Role, ServerStatus, ShardStatus};
        let mut t = topology([Ready, Ready, Ready]);
        t.shards[0].copies.clear();
        let record = |s: &str, c: &str| Action::RecordCopy { shard: "sh1".into(), server: s.into(), copy_id: c.into() };
        let t0 = Instant::now();
        let round = |i: u64| t0 + Duration::from_secs(i);
        // (server, applied, confirmed) per copy, answered in round `i`.
        let probe = |seen: &mut Observations, i: u64, copies: [(&str, u64, u64); 3]| {
            for (server, applied_seq, confirmed) in copies {
                let shard = ShardStatus {
                    role: if server == "A" { Role::Primary } else { Role::Replica },
                    applied_seq,
                    rows: 0,
                    checksum: None,
                    copy_id: server.to_lowercase(),
                    cached: false,
                    caught_up: None,
                    hash: None,
                    confirmed_seq: Some(confirmed),
                };
                let status = ServerStatus {
                    server: server.into(),
                    protocol: shard_server::api::PROTOCOL_VERSION,
                    epoch: EPOCH,
                    shards: [("sh1".to_owned(), shard)].into(),
                    lease_token: None,
                    internal_auth: None,
                };
                seen.record(server, Probe::Answered(status), round(i));
            }
        };
        // Right after a fresh cluster's first writes, B's first entries are still in flight for
        // a whole round: A applied 4, but confirmed nothing, since it waits for B. B merely
        // lags; it is neither demoted nor recorded while it is at 0.
        let mut seen = Observations::new();
        probe(&mut seen, 0, [("A", 4, 0), ("B", 0, 0), ("C", 4, 0)]);
        probe(&mut seen, 1, [("A", 4, 0), ("B", 0, 0), ("C", 4, 0)]);
        assert_eq!(plan(&t, &seen, round(1), &Settings::default()), [record("A", "a"), record("C", "c")]);
        // Once A confirmed 4, B held it; B back at 0 (or anywhere below) a round later lost it.
        probe(&mut seen, 2, [("A", 4, 4), ("B", 4, 4), ("C", 4, 4)]);
        probe(&mut seen, 3, [("A", 4, 4), ("B", 2, 0), ("C", 4, 4)]);
        assert_eq!(
            plan(&t, &seen, round(3), &Settings::default()),
            [record("A", "a"), rec("B", Reason::LostData), record("C", "c")]
        );
        // A primary back below what it had confirmed: the replicas hold it; one takes over.
        probe(&mut seen, 4, [("A", 0, 0), ("B", 4, 4), ("C", 4, 4)]);
        assert_eq!(
            plan(&t, &seen, round(4), &Settings::default()),
            [promote("A", "B", Reason::LostData), record("B", "b"), record("C", "c")]
        );
    }

    #[test]
    fn apply_promotes_marks_ready_and_skips_what_no_longer_fits() {
        let t = topology([Ready, Recovering, Ready]);
        assert_eq!(apply(&t, &[]), None);
        assert_eq!(apply(&t, &[recover("B")]), None, "a recover changes no document");

        let ready = |s: &str, c: &str| Action::MarkReady { shard: "sh1".into(), server: s.into(), copy_id: c.into() };
        let next = apply(&t, &[ready("B", "B7")]).unwrap();
        assert_eq!(next.shards[0].replicas["B"], Ready);
        assert_eq!(next.shards[0].copies["B"], "B7");
        assert_eq!(apply(&next, &[ready("B", "B8")]), None, "only a recovering copy becomes ready");

        let failed = apply(&next, &[promote("A", "C", Reason::Unreachable)]).unwrap();
        assert_eq!(failed.shards[0].primary, "C");
        assert_eq!(failed.shards[0].replicas["A"], Recovering);
        assert_eq!(failed.epoch, EPOCH + 2);
        failed.validate().unwrap();
        assert_eq!(apply(&failed, &[promote("A", "B", Reason::Unreachable)]), None, "A is no longer primary");
        assert_eq!(apply(&failed, &[rec("C", Reason::Unreachable)]), None, "the primary is never demoted");
        assert_eq!(apply(&t, &[promote("A", "B", Reason::Unreachable)]), None, "a recovering copy is never promoted");
    }
}
