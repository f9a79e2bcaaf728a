//! What the operator last saw of each server: reachable (with each copy's position and identity),
//! unreachable since a given moment, or not yet known; and, per copy, the last few (sequence
//! number, history hash, checksum) it reported, to compare copies at equal sequence numbers. Pure:
//! a body probes the servers and feeds the outcomes in; the planner reads them.

use shard_server::api::ServerStatus;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// Samples kept per copy for [`Observations::differs`].
const SAMPLES: usize = 16;

/// What one copy reported at one sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sample {
    seq: u64,
    hash: Option<String>,
    checksum: Option<String>,
}

/// One copy of a shard as its server reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySeen {
    pub applied_seq: u64,
    pub copy_id: String,
    /// A ready replica that has not caught up with its primary since it became ready (it may miss
    /// acknowledged writes, so it must not be promoted) says `false`; everything else `true`.
    pub caught_up: bool,
}

/// The last known state of one server.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Health {
    /// Not probed yet. Never a reason for a destructive action.
    #[default]
    Unknown,
    /// Answered the last probe.
    Up {
        /// The topology epoch it follows.
        epoch: u64,
        /// Shard id → its copy there. A shard missing here is unknown, not lost.
        copies: BTreeMap<String, CopySeen>,
    },
    /// Has not answered any probe since `since` (the first failed one).
    Down { since: Instant },
}

/// The outcome of probing one server.
#[derive(Clone, Debug)]
pub enum Probe {
    Answered(ServerStatus),
    /// No answer, or an error answer: a server whose database is down cannot serve either.
    Failed,
}

/// Every server's last known state. Lives in memory only: after a restart everything starts as
/// `Unknown`, and timeouts count again from the first failed probe, which only delays actions.
///
/// Bodies probe in rounds: every probe of a round is recorded with one `now`, taken before any of
/// them was sent, and a round starts only once the previous one's probes all returned. So an
/// answer recorded in an earlier round arrived before any probe of a later round left, which is
/// what [`Observations::reached_before`] relies on: answers of one round are unordered (under load
/// one server may answer a second after another), so comparing two of them says nothing about
/// which state came first.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    servers: BTreeMap<String, Health>,
    /// The protocol each server said it speaks when it last answered.
    protocols: BTreeMap<String, u32>,
    /// The round (its `now`) of each server's latest answer.
    answered_in: BTreeMap<String, Instant>,
    /// Per shard, the highest sequence number any copy reported.
    positions: BTreeMap<String, Position>,
    /// (server, shard) → the copy's identity and its last samples, newest last.
    samples: BTreeMap<(String, String), (String, VecDeque<Sample>)>,
}

/// The highest sequence number reported for a shard, and the highest reported confirmed, split
/// by round.
#[derive(Clone, Copy, Debug, Default)]
struct Position {
    /// The highest reported in any round before `round`.
    before: u64,
    /// The latest round with a report, and the highest reported in it.
    round: Option<Instant>,
    in_round: u64,
    /// As `before` and `in_round`, for the confirmed sequence numbers copies reported.
    confirmed_before: u64,
    confirmed_in_round: u64,
    /// Whether any copy ever reported its confirmed sequence number (older servers do not).
    confirmed_known: bool,
}

impl Observations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds in one probe made at `now`.
    pub fn record(&mut self, server: &str, probe: Probe, now: Instant) {
        if let Probe::Answered(status) = &probe {
            self.protocols.insert(server.to_owned(), status.protocol);
            self.answered_in.insert(server.to_owned(), now);
            for (shard, s) in &status.shards {
                let p = self.positions.entry(shard.clone()).or_default();
                if p.round != Some(now) {
                    p.before = p.before.max(p.in_round);
                    p.confirmed_before = p.confirmed_before.max(p.confirmed_in_round);
                    p.round = Some(now);
                    p.in_round = 0;
                    p.confirmed_in_round = 0;
                }
                p.in_round = p.in_round.max(s.applied_seq);
                if let Some(confirmed) = s.confirmed_seq {
                    p.confirmed_known = true;
                    p.confirmed_in_round = p.confirmed_in_round.max(confirmed);
                }
                let key = (server.to_owned(), shard.clone());
                let (copy, samples) = self.samples.entry(key).or_insert_with(|| (s.copy_id.clone(), VecDeque::new()));
                if *copy != s.copy_id {
                    // Another copy now: what the old one reported says nothing about it.
                    *copy = s.copy_id.clone();
                    samples.clear();
                }
                samples.push_back(Sample { seq: s.applied_seq, hash: s.hash.clone(), checksum: s.checksum.clone() });
                if samples.len() > SAMPLES {
                    samples.pop_front();
                }
            }
        }
        let next = match probe {
            Probe::Answered(status) => Health::Up {
                epoch: status.epoch,
                copies: status
                    .shards
                    .into_iter()
                    .map(|(id, s)| {
                        let caught_up = s.caught_up != Some(false);
                        (id, CopySeen { applied_seq: s.applied_seq, copy_id: s.copy_id, caught_up })
                    })
                    .collect(),
            },
            Probe::Failed => match self.servers.get(server) {
                Some(Health::Down { since }) => Health::Down { since: *since },
                _ => Health::Down { since: now },
            },
        };
        self.servers.insert(server.to_owned(), next);
    }

    /// Sets a server's state directly (tests, and bodies that learn it some other way). Such a
    /// state has no round, so it is never compared with others in [`Observations::reached_before`].
    pub fn set(&mut self, server: &str, health: Health) {
        self.answered_in.remove(server);
        self.servers.insert(server.to_owned(), health);
    }

    /// The highest sequence number any copy of `shard` has reported.
    pub fn highest(&self, shard: &str) -> u64 {
        self.positions.get(shard).map_or(0, |p| p.before.max(p.in_round))
    }

    /// The highest sequence number any copy of `shard` reported in a round before the one of
    /// `server`'s latest answer: a position the shard had certainly reached before `server` was
    /// last asked. 0 when nothing is known to have come first.
    pub fn reached_before(&self, shard: &str, server: &str) -> u64 {
        match (self.answered_in.get(server), self.positions.get(shard)) {
            (Some(asked), Some(p)) if p.round == Some(*asked) => p.before,
            _ => 0,
        }
    }

    /// As [`Observations::reached_before`], for confirmed sequence numbers: the highest any copy
    /// of `shard` reported confirmed in a round before the one of `server`'s latest answer. An
    /// entry is confirmed only once every ready replica of its primary held it, so a copy that
    /// has been ready since the shard was created and lost nothing holds at least this much.
    /// `None` when no copy of the shard ever reported a confirmed number (older servers).
    pub fn confirmed_before(&self, shard: &str, server: &str) -> Option<u64> {
        let p = self.positions.get(shard).filter(|p| p.confirmed_known)?;
        Some(match self.answered_in.get(server) {
            Some(asked) if p.round == Some(*asked) => p.confirmed_before,
            _ => 0,
        })
    }

    pub fn health(&self, server: &str) -> &Health {
        static UNKNOWN: Health = Health::Unknown;
        self.servers.get(server).unwrap_or(&UNKNOWN)
    }

    /// The wire protocol `server` said it speaks when it last answered (1: a release from before
    /// versions were advertised); `None` if it never answered.
    pub fn protocol(&self, server: &str) -> Option<u32> {
        self.protocols.get(server).copied()
    }

    /// A sequence number at which the copies of `shard` on `a` and `b` both reported their history
    /// hash or their rows' checksum, and these differ: the copies hold different histories or
    /// different rows where they should be equal. `None` when no sample tells them apart.
    pub fn differs(&self, a: &str, b: &str, shard: &str) -> Option<u64> {
        let (_, ours) = self.samples.get(&(a.to_owned(), shard.to_owned()))?;
        let (_, theirs) = self.samples.get(&(b.to_owned(), shard.to_owned()))?;
        let differ = |x: &Option<String>, y: &Option<String>| matches!((x, y), (Some(x), Some(y)) if x != y);
        ours.iter().find_map(|o| {
            theirs
                .iter()
                .any(|t| t.seq == o.seq && (differ(&t.hash, &o.hash) || differ(&t.checksum, &o.checksum)))
                .then_some(o.seq)
        })
    }

    /// The copy of `shard` on `server`, if the server is up and reported it.
    pub fn copy(&self, server: &str, shard: &str) -> Option<&CopySeen> {
        match self.health(server) {
            Health::Up { copies, .. } => copies.get(shard),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shard_server::api::{Role, ShardStatus};
    use std::time::Duration;

    fn status(seq: u64, copy: &str) -> ServerStatus {
        let shard = ShardStatus {
            role: Role::Replica,
            applied_seq: seq,
            rows: 0,
            checksum: None,
            copy_id: copy.into(),
            cached: false,
            caught_up: None,
            hash: None,
            confirmed_seq: None,
        };
        ServerStatus {
            server: "S".into(),
            protocol: 2,
            epoch: 4,
            shards: [("sh1".to_owned(), shard)].into(),
            lease_token: None,
            internal_auth: None,
        }
    }

    #[test]
    fn down_counts_from_the_first_failed_probe_and_an_answer_resets_it() {
        let t0 = Instant::now();
        let mut o = Observations::new();
        assert_eq!(o.health("S"), &Health::Unknown);
        o.record("S", Probe::Failed, t0);
        o.record("S", Probe::Failed, t0 + Duration::from_secs(1));
        assert_eq!(o.health("S"), &Health::Down { since: t0 });
        assert_eq!(o.copy("S", "sh1"), None);
        o.record("S", Probe::Answered(status(7, "c1")), t0 + Duration::from_secs(2));
        assert_eq!(o.copy("S", "sh1"), Some(&CopySeen { applied_seq: 7, copy_id: "c1".into(), caught_up: true }));
        assert!(matches!(o.health("S"), Health::Up { epoch: 4, .. }));
        assert_eq!(o.protocol("S"), Some(2));
        let t3 = t0 + Duration::from_secs(3);
        o.record("S", Probe::Failed, t3);
        assert_eq!(o.health("S"), &Health::Down { since: t3 });
    }

    fn of(server: &str, seq: u64) -> Probe {
        Probe::Answered(ServerStatus { server: server.into(), ..status(seq, &server.to_lowercase()) })
    }

    #[test]
    fn only_positions_reported_in_an_earlier_round_count_as_reached_before() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        let mut o = Observations::new();
        // Answers of one round are unordered: T's 5 may describe a later moment than P's 0.
        o.record("P", of("P", 0), t0);
        o.record("T", of("T", 5), t0);
        assert_eq!(o.reached_before("sh1", "P"), 0);
        assert_eq!(o.highest("sh1"), 5);
        // In the next round P is asked after T's 5 arrived.
        o.record("T", of("T", 6), t1);
        o.record("P", of("P", 0), t1);
        assert_eq!(o.reached_before("sh1", "P"), 5);
        assert_eq!(o.reached_before("sh1", "T"), 5, "its own earlier answers count too");
        // A server whose latest answer is older than the shard's latest round compares with nothing.
        o.record("T", of("T", 7), t2);
        assert_eq!(o.reached_before("sh1", "P"), 0);
        assert_eq!(o.reached_before("sh1", "T"), 6);
        // A state set by hand has no round.
        o.set("T", Health::Unknown);
        assert_eq!(o.reached_before("sh1", "T"), 0);
        assert_eq!(o.reached_before("sh2", "T"), 0);
    }

    fn confirmed(server: &str, seq: u64, confirmed: u64) -> Probe {
        let Probe::Answered(mut st) = of(server, seq) else { unreachable!() };
        st.shards.get_mut("sh1").unwrap().confirmed_seq = Some(confirmed);
        Probe::Answered(st)
    }

    #[test]
    fn only_confirmations_reported_in_an_earlier_round_count_as_confirmed_before() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        let mut o = Observations::new();
        o.record("P", of("P", 5), t0);
        assert_eq!(o.confirmed_before("sh1", "P"), None, "no copy reported a confirmed number");
        o.record("P", confirmed("P", 5, 3), t1);
        o.record("R", confirmed("R", 0, 0), t1);
        assert_eq!(o.confirmed_before("sh1", "R"), Some(0), "P's 3 may have come after R answered");
        o.record("P", confirmed("P", 6, 6), t2);
        o.record("R", confirmed("R", 0, 0), t2);
        assert_eq!(o.confirmed_before("sh1", "R"), Some(3));
        assert_eq!(o.confirmed_before("sh1", "P"), Some(3));
        assert_eq!(o.highest("sh1"), 6);
    }

    fn sampled(seq: u64, copy: &str, hash: Option<&str>, checksum: Option<&str>) -> Probe {
        let Probe::Answered(mut st) = Probe::Answered(status(seq, copy)) else { unreachable!() };
        let s = st.shards.get_mut("sh1").unwrap();
        s.hash = hash.map(str::to_owned);
        s.checksum = checksum.map(str::to_owned);
        Probe::Answered(st)
    }

    #[test]
    fn copies_differ_only_where_both_reported_at_one_sequence_number() {
        let now = Instant::now();
        let mut o = Observations::new();
        o.record("P", sampled(5, "p", Some("h5"), None), now);
        o.record("R", sampled(4, "r", Some("x4"), None), now);
        assert_eq!(o.differs("R", "P", "sh1"), None, "no common sequence number");
        o.record("R", sampled(5, "r", Some("h5"), None), now);
        assert_eq!(o.differs("R", "P", "sh1"), None, "same history");
        o.record("P", sampled(7, "p", Some("h7"), Some("c7")), now);
        o.record("R", sampled(7, "r", Some("h7"), Some("forged")), now);
        assert_eq!(o.differs("R", "P", "sh1"), Some(7), "same history, other rows");
        o.record("R", sampled(8, "r2", None, None), now);
        assert_eq!(o.differs("R", "P", "sh1"), None, "a new copy forgets the old one's samples");
        o.record("R", sampled(5, "r2", Some("other"), None), now);
        assert_eq!(o.differs("R", "P", "sh1"), Some(5));
        assert_eq!(o.differs("R", "Q", "sh1"), None, "nothing known of Q");
    }
}
