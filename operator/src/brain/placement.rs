//! Which servers hold which shard, and which copy is the primary. Pure and deterministic: the same
//! validated spec always gives the same placement, so every operator replica and every restart
//! agrees without coordination.
//!
//! Count mode stripes copies round-robin: shard `i`'s copies go to servers `i*r .. i*r + r` (mod
//! `n`). Consecutive slots land on consecutive servers, so loads differ by at most one shard and a
//! shard's `r ≤ n` copies are on distinct servers. Primaries are then chosen per shard, in key
//! order, as the holder with the fewest primaries so far, which spreads write load.

use super::validate::{ServerLayout, ValidatedDb};

/// Where every copy of every shard lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Server names; a server's position is its stable numeric id.
    pub servers: Vec<String>,
    /// In key order (the order of `ValidatedDb::shards`).
    pub shards: Vec<ShardPlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlacement {
    pub id: String,
    /// The copy that accepts writes; one of `replicas`.
    pub primary: String,
    /// Every server holding a copy, the primary included, in server id order.
    pub replicas: Vec<String>,
}

/// The name of server `i` in count mode.
pub fn server_name(i: usize) -> String {
    format!("Server{i}")
}

impl Placement {
    /// Shard ids held by `server`, in key order.
    pub fn shards_of<'a>(&'a self, server: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.shards.iter().filter(move |s| s.replicas.iter().any(|r| r == server)).map(|s| s.id.as_str())
    }
}

/// Places every shard of `db`.
pub fn place(db: &ValidatedDb) -> Placement {
    let (servers, holders): (Vec<String>, Vec<Vec<usize>>) = match &db.servers {
        ServerLayout::Count { servers, replicas } => {
            let (n, r) = (*servers as usize, *replicas as usize);
            let holders = (0..db.shards.len()).map(|i| (0..r).map(|j| (i * r + j) % n).collect()).collect();
            ((0..n).map(server_name).collect(), holders)
        }
        ServerLayout::Explicit(list) => {
            let holders = db
                .shards
                .iter()
                .map(|shard| {
                    list.iter().enumerate().filter(|(_, (_, held))| held.contains(&shard.id)).map(|(i, _)| i).collect()
                })
                .collect();
            (list.iter().map(|(name, _)| name.clone()).collect(), holders)
        }
    };
    let mut primaries = vec![0usize; servers.len()];
    let shards = db
        .shards
        .iter()
        .zip(holders)
        .map(|(shard, mut held)| {
            // `min_by_key` keeps the first of equals: the first holder in stripe or server order.
            let primary = *held.iter().min_by_key(|&&s| primaries[s]).expect("validated: every shard has a holder");
            primaries[primary] += 1;
            held.sort_unstable();
            ShardPlacement {
                id: shard.id.clone(),
                primary: servers[primary].clone(),
                replicas: held.into_iter().map(|s| servers[s].clone()).collect(),
            }
        })
        .collect();
    Placement { servers, shards }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::validate::{ShardRange, tests::students, validate};
    use std::collections::BTreeMap;

    fn db(shards: usize, replicas: u32, servers: u32) -> ValidatedDb {
        let mut db = validate(&students()).unwrap();
        db.shards =
            (0..shards).map(|i| ShardRange { id: format!("sh{}", i + 1), low: i as i64 * 10, size: 10 }).collect();
        db.servers = ServerLayout::Count { servers, replicas };
        db
    }

    fn counts(p: &Placement) -> (BTreeMap<&str, usize>, BTreeMap<&str, usize>) {
        let mut load: BTreeMap<&str, usize> = p.servers.iter().map(|s| (s.as_str(), 0)).collect();
        let mut prim = load.clone();
        for s in &p.shards {
            for r in &s.replicas {
                *load.get_mut(r.as_str()).unwrap() += 1;
            }
            *prim.get_mut(s.primary.as_str()).unwrap() += 1;
        }
        (load, prim)
    }

    fn spread(m: &BTreeMap<&str, usize>) -> usize {
        m.values().max().unwrap() - m.values().min().unwrap()
    }

    #[test]
    fn the_seed_default_gives_every_server_two_shards() {
        let p = place(&validate(&students()).unwrap());
        assert_eq!(p.servers, ["Server0", "Server1", "Server2", "Server3", "Server4", "Server5"]);
        let (load, prim) = counts(&p);
        assert!(load.values().all(|&l| l == 2), "{load:?}");
        assert!(prim.values().all(|&c| c <= 1), "{prim:?}");
        let table: Vec<(&str, &str, Vec<&str>)> = p
            .shards
            .iter()
            .map(|s| (s.id.as_str(), s.primary.as_str(), s.replicas.iter().map(|r| r.as_str()).collect()))
            .collect();
        assert_eq!(
            table,
            [
                ("sh1", "Server0", vec!["Server0", "Server1", "Server2"]),
                ("sh2", "Server3", vec!["Server3", "Server4", "Server5"]),
                ("sh3", "Server1", vec!["Server0", "Server1", "Server2"]),
                ("sh4", "Server4", vec!["Server3", "Server4", "Server5"]),
            ]
        );
        assert_eq!(p.shards_of("Server1").collect::<Vec<_>>(), ["sh1", "sh3"]);
    }

    #[test]
    fn count_mode_is_balanced_for_every_small_shape() {
        for shards in 1..=12 {
            for servers in 1..=9u32 {
                for replicas in 1..=servers {
                    let p = place(&db(shards, replicas, servers));
                    let shape = format!("{shards} shards x {replicas} on {servers}");
                    for s in &p.shards {
                        assert_eq!(s.replicas.len(), replicas as usize, "{shape}");
                        let mut distinct = s.replicas.clone();
                        distinct.dedup();
                        assert_eq!(distinct.len(), s.replicas.len(), "{shape}: distinct servers");
                        assert!(s.replicas.contains(&s.primary), "{shape}: primary holds a copy");
                    }
                    let (load, prim) = counts(&p);
                    assert!(spread(&load) <= 1, "{shape}: loads {load:?}");
                    assert!(spread(&prim) <= 1, "{shape}: primaries {prim:?}");
                }
            }
        }
    }

    #[test]
    fn placement_is_deterministic() {
        assert_eq!(place(&db(7, 3, 5)), place(&db(7, 3, 5)));
    }

    #[test]
    fn explicit_maps_are_used_as_given() {
        let mut spec = students();
        spec.replicas = None;
        spec.servers = 3;
        spec.placement = Some(
            [
                ("Server0", vec!["sh1", "sh2"]),
                ("Server1", vec!["sh3", "sh4", "sh1"]),
                ("Server2", vec!["sh2", "sh3", "sh4"]),
            ]
            .into_iter()
            .map(|(s, h)| (s.to_string(), h.into_iter().map(String::from).collect()))
            .collect(),
        );
        let p = place(&validate(&spec).unwrap());
        let table: Vec<(&str, &str, Vec<&str>)> = p
            .shards
            .iter()
            .map(|s| (s.id.as_str(), s.primary.as_str(), s.replicas.iter().map(|r| r.as_str()).collect()))
            .collect();
        assert_eq!(
            table,
            [
                ("sh1", "Server0", vec!["Server0", "Server1"]),
                ("sh2", "Server2", vec!["Server0", "Server2"]),
                ("sh3", "Server1", vec!["Server1", "Server2"]),
                // Every holder has one primary by now: the first in server order wins.
                ("sh4", "Server1", vec!["Server1", "Server2"]),
            ]
        );
    }

    #[test]
    fn explicit_maps_may_give_shards_different_copy_counts() {
        let mut spec = students();
        spec.replicas = None;
        spec.servers = 2;
        spec.placement = Some(
            [("b", vec!["sh1", "sh2", "sh3", "sh4"]), ("a", vec!["sh1"])]
                .into_iter()
                .map(|(s, h)| (s.to_string(), h.into_iter().map(String::from).collect()))
                .collect(),
        );
        let p = place(&validate(&spec).unwrap());
        assert_eq!(p.servers, ["a", "b"]);
        assert_eq!(p.shards[0].replicas, ["a", "b"]);
        assert_eq!(p.shards[0].primary, "a");
        assert!(p.shards[1..].iter().all(|s| s.replicas == ["b"] && s.primary == "b"));
    }
}
