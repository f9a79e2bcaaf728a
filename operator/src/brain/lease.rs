//! The operator's side of primary leases: which primary may be granted one, when each was last
//! granted, and whether a change of primary may be published yet. Pure bookkeeping; a body probes
//! the servers and sends the grants (`exec::grant_primary_leases`), and asks [`LeaseBook::fence`]
//! before it publishes a topology.
//!
//! A primary serves reads only while it holds a lease from the operator (see the shard server's
//! `replication::lease`), measured on the server from a moment it named before the operator
//! recorded its grant. So once `granted + lease` (plus a margin for the clocks' rates: the
//! primary's and, for the replicas whose leases it bounds, theirs) has passed on the operator's
//! clock, neither that primary nor any replica whose lease came from it serves a read. A topology
//! in which a shard gets another primary (a failover or a handover) is published only then, and
//! from the moment the operator decides to change a shard's primary it grants the old one nothing
//! more, so the wait ends. Grants an earlier run of the operator made are unknown: nothing is
//! published that changes a primary before `lease` after this book was made.
//!
//! Why this is enough for linearizable reads across a change of primary: the new primary
//! acknowledges writes (and shows them) only after the old primary, which may still be alive and
//! reachable by routers, and every replica leased by it, have stopped serving reads; until then
//! any of them may answer only what was confirmed before, which the new primary holds too.

use shard_server::topology::Topology;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Default primary lease: long enough that a few missed grants (one every half second) do not
/// stop reads, short enough that it adds little to a failover, which waits for an unreachable
/// primary longer than this anyway.
pub const DEFAULT_PRIMARY_LEASE: Duration = Duration::from_secs(2);

/// When a lease granted at `t` has surely run out everywhere: `t + lease` plus 2%, a margin for
/// the primary's clock and a replica's (whose lease its primary bounds) running slower than ours.
pub fn lease_bound(lease: Duration) -> Duration {
    lease + lease / 50
}

/// The leases of one database.
#[derive(Clone, Debug)]
pub struct LeaseBook {
    lease: Duration,
    /// Grants made before this moment by an earlier run are unknown.
    started: Instant,
    /// The topology grants are decided on: the last one this operator published or read.
    topology: Option<Topology>,
    /// (shard, server) → when a lease was last granted (recorded before it was sent).
    granted: BTreeMap<(String, String), Instant>,
    /// (shard, server) pairs granted nothing more, with the round that last asked for it.
    withheld: BTreeMap<(String, String), u64>,
    round: u64,
}

/// One server's grant, decided: the shards and the epoch of the topology they were decided on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub server: String,
    pub url: String,
    pub epoch: u64,
    pub shards: Vec<String>,
}

impl LeaseBook {
    pub fn new(lease: Duration, started: Instant) -> LeaseBook {
        LeaseBook { lease, started, topology: None, granted: BTreeMap::new(), withheld: BTreeMap::new(), round: 0 }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Takes `topology` (just read, or about to be published after [`LeaseBook::fence`]) as the one
    /// grants are decided on, unless an older one.
    pub fn follow(&mut self, topology: &Topology) {
        if self.topology.as_ref().is_none_or(|t| t.epoch <= topology.epoch) {
            self.topology = Some(topology.clone());
        }
    }

    /// Starts a healer round: pairs withheld in an earlier round and not asked for since are
    /// released (the change of primary they were withheld for is no longer wanted).
    pub fn begin_round(&mut self) {
        self.round += 1;
        let round = self.round;
        self.withheld.retain(|_, asked| *asked + 1 >= round);
    }

    /// Every server that is the primary of some shard, with its URL: whom to probe for a token.
    pub fn primaries(&self) -> Vec<(String, String)> {
        let Some(t) = &self.topology else { return Vec::new() };
        let mut servers: Vec<(String, String)> = t
            .shards
            .iter()
            .filter_map(|s| t.servers.get(&s.primary).map(|e| (s.primary.clone(), e.url.clone())))
            .collect();
        servers.sort();
        servers.dedup();
        servers
    }

    /// The lease to grant `server` now (which just handed out a token): the shards it is the
    /// primary of and not withheld from. Their grant time is recorded as `now`, before anything is
    /// sent, so a grant on its way is always counted. `None`: nothing to grant.
    pub fn grant(&mut self, server: &str, now: Instant) -> Option<Grant> {
        let t = self.topology.as_ref()?;
        let url = t.servers.get(server)?.url.clone();
        let shards: Vec<String> = t
            .shards
            .iter()
            .filter(|s| s.primary == server && !self.withheld.contains_key(&(s.id.clone(), server.to_owned())))
            .map(|s| s.id.clone())
            .collect();
        if shards.is_empty() {
            return None;
        }
        for shard in &shards {
            self.granted.insert((shard.clone(), server.to_owned()), now);
        }
        Some(Grant { server: server.to_owned(), url, epoch: t.epoch, shards })
    }

    /// [`LeaseBook::grant`] for every primary (tests, and callers that probed them all).
    pub fn grants(&mut self, now: Instant) -> Vec<Grant> {
        self.primaries().into_iter().filter_map(|(server, _)| self.grant(&server, now)).collect()
    }

    /// When a lease of `server` for `shard` has surely run out (at the earliest `lease` after this
    /// book was made).
    pub fn lease_end(&self, shard: &str, server: &str) -> Instant {
        let floor = self.started + lease_bound(self.lease);
        match self.granted.get(&(shard.to_owned(), server.to_owned())) {
            Some(t) => (*t + lease_bound(self.lease)).max(floor),
            None => floor,
        }
    }

    /// Whether `next` may be published in place of `current` now: every shard whose primary it
    /// changes must have its old primary's lease surely run out. If not, those old primaries are
    /// granted nothing more for those shards (so the wait ends) and the earliest moment it may is
    /// returned as the error. On success `next` becomes the topology grants are decided on.
    pub fn fence(&mut self, current: &Topology, next: &Topology, now: Instant) -> Result<(), Instant> {
        let mut until = now;
        for shard in &current.shards {
            let changed = next.shard(&shard.id).is_some_and(|n| n.primary != shard.primary);
            if changed {
                let key = (shard.id.clone(), shard.primary.clone());
                self.withheld.insert(key, self.round);
                until = until.max(self.lease_end(&shard.id, &shard.primary));
            }
        }
        if until > now {
            return Err(until);
        }
        self.follow(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shard_server::topology::{ReplicaState, ServerEntry, ShardEntry, TOPOLOGY_VERSION};

    const LEASE: Duration = Duration::from_secs(2);

    fn topology(epoch: u64, primary_of_sh1: &str) -> Topology {
        let replicas = [("A", ReplicaState::Ready), ("B", ReplicaState::Ready)]
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s))
            .collect();
        let t = Topology {
            version: TOPOLOGY_VERSION,
            epoch,
            schema: serde_json::from_str(r#"{"columns": ["k", "v"], "dtypes": ["Number", "String"]}"#).unwrap(),
            ring: Default::default(),
            servers: ["A", "B"]
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), ServerEntry { id: i as u32, url: format!("http://{n}") }))
                .collect(),
            shards: vec![
                ShardEntry {
                    id: "sh1".into(),
                    low: 0,
                    size: 100,
                    primary: primary_of_sh1.into(),
                    replicas,
                    copies: Default::default(),
                },
                ShardEntry {
                    id: "sh2".into(),
                    low: 100,
                    size: 100,
                    primary: "B".into(),
                    replicas: [("B".to_owned(), ReplicaState::Ready)].into(),
                    copies: Default::default(),
                },
            ],
            unrouted_keys: Default::default(),
        };
        t.validate().unwrap();
        t
    }

    #[test]
    fn grants_go_to_each_primary_for_its_shards() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LEASE, t0);
        assert!(book.grants(t0).is_empty(), "no topology yet");
        book.follow(&topology(3, "A"));
        let grants = book.grants(t0);
        assert_eq!(
            grants,
            [
                Grant { server: "A".into(), url: "http://A".into(), epoch: 3, shards: vec!["sh1".into()] },
                Grant { server: "B".into(), url: "http://B".into(), epoch: 3, shards: vec!["sh2".into()] },
            ]
        );
        book.follow(&topology(2, "B"));
        assert_eq!(book.grants(t0)[0].epoch, 3, "an older topology is not followed");
    }

    #[test]
    fn a_new_primary_is_published_only_once_the_old_ones_lease_ran_out() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LEASE, t0);
        let (current, next) = (topology(3, "A"), topology(4, "B"));
        book.follow(&current);
        // Even without a grant, an earlier run of the operator may have granted one.
        assert_eq!(book.fence(&current, &next, t0), Err(t0 + lease_bound(LEASE)));

        let later = t0 + Duration::from_secs(10);
        book.begin_round();
        let granted = book.grants(later);
        assert_eq!(granted.len(), 1, "A is withheld for sh1 while the change is wanted: only B gets a grant");
        book.begin_round();
        book.begin_round();
        let granted = book.grants(later);
        assert_eq!(granted.len(), 2, "not asked for two rounds: A gets leases again");

        // A granted at `later`: the change waits for that lease, and A gets nothing more meanwhile.
        let end = later + lease_bound(LEASE);
        assert_eq!(book.fence(&current, &next, later + Duration::from_secs(1)), Err(end));
        assert!(book.grants(later + Duration::from_secs(1)).iter().all(|g| g.server != "A"));
        assert_eq!(book.fence(&current, &next, end), Ok(()));
        // From now on B is granted sh1.
        let g = book.grants(end);
        assert_eq!(
            g,
            [Grant { server: "B".into(), url: "http://B".into(), epoch: 4, shards: vec!["sh1".into(), "sh2".into()] }]
        );
    }

    #[test]
    fn a_topology_that_keeps_every_primary_is_never_held_back() {
        let t0 = Instant::now();
        let mut book = LeaseBook::new(LEASE, t0);
        let (current, mut next) = (topology(3, "A"), topology(3, "A"));
        next.epoch = 4;
        next.shards[0].replicas.insert("B".into(), ReplicaState::Recovering);
        assert_eq!(book.fence(&current, &next, t0), Ok(()));
        assert_eq!(book.grants(t0).len(), 2);
    }
}
