//! What the operator last saw of each server: reachable (with each copy's position and identity),
//! unreachable since a given moment, or not yet known. Pure: a body probes the servers and feeds
//! the outcomes in; the planner reads them.

use shard_server::api::ServerStatus;
use std::collections::BTreeMap;
use std::time::Instant;

/// One copy of a shard as its server reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySeen {
    pub applied_seq: u64,
    pub copy_id: String,
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
#[derive(Clone, Debug, Default)]
pub struct Observations {
    servers: BTreeMap<String, Health>,
}

impl Observations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds in one probe made at `now`.
    pub fn record(&mut self, server: &str, probe: Probe, now: Instant) {
        let next = match probe {
            Probe::Answered(status) => Health::Up {
                epoch: status.epoch,
                copies: status
                    .shards
                    .into_iter()
                    .map(|(id, s)| (id, CopySeen { applied_seq: s.applied_seq, copy_id: s.copy_id }))
                    .collect(),
            },
            Probe::Failed => match self.servers.get(server) {
                Some(Health::Down { since }) => Health::Down { since: *since },
                _ => Health::Down { since: now },
            },
        };
        self.servers.insert(server.to_owned(), next);
    }

    /// Sets a server's state directly (tests, and bodies that learn it some other way).
    pub fn set(&mut self, server: &str, health: Health) {
        self.servers.insert(server.to_owned(), health);
    }

    pub fn health(&self, server: &str) -> &Health {
        static UNKNOWN: Health = Health::Unknown;
        self.servers.get(server).unwrap_or(&UNKNOWN)
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
        };
        ServerStatus { server: "S".into(), epoch: 4, shards: [("sh1".to_owned(), shard)].into() }
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
        assert_eq!(o.copy("S", "sh1"), Some(&CopySeen { applied_seq: 7, copy_id: "c1".into() }));
        assert!(matches!(o.health("S"), Health::Up { epoch: 4, .. }));
        let t3 = t0 + Duration::from_secs(3);
        o.record("S", Probe::Failed, t3);
        assert_eq!(o.health("S"), &Health::Down { since: t3 });
    }
}
