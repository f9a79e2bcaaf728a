//! Replica choice for reads: consistent-hash rings mapping a request id to one of a shard's ready
//! replicas, and the order in which the others are tried when that one fails. Pure; no I/O.
//!
//! Members are identified by their topology server id (`ServerEntry.id`); every answer is an index
//! into the member slice the ring was built from, so callers keep their own server table.
//!
//! The request id is a per-router counter, not a hash of the key: consecutive requests land on
//! unrelated ring positions, so even one hot key spreads over every ready replica. Reads need no
//! affinity (every ready replica holds every acknowledged write), so nothing is lost by that.

use shard_server::topology::RingKind;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// A ring over the ready replicas of one shard.
#[derive(Clone, Debug)]
pub enum Ring {
    Seed(SeedRing),
    Hash(HashRing),
}

impl Ring {
    /// Builds the ring of `kind` over servers with the given ids (distinct, as the topology
    /// guarantees).
    pub fn new(kind: RingKind, ids: &[u32]) -> Ring {
        match kind {
            RingKind::Seed => Ring::Seed(SeedRing::new(ids)),
            RingKind::Hash => Ring::Hash(HashRing::new(ids)),
        }
    }

    /// The member that serves `request`; `None` only for a ring without members.
    pub fn pick(&self, request: u64) -> Option<usize> {
        match self {
            Ring::Seed(r) => r.pick(request),
            Ring::Hash(r) => r.pick(request),
        }
    }

    /// Every member once, in the order to try them for `request`: the ring's choice first, then the
    /// others as met walking clockwise from the request's position.
    pub fn candidates(&self, request: u64) -> Vec<usize> {
        match self {
            Ring::Seed(r) => r.candidates(request),
            Ring::Hash(r) => r.candidates(request),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The seed ring

/// Slots of the seed ring.
pub const SEED_SLOTS: usize = 512;
/// Virtual nodes per server on the seed ring.
pub const SEED_VNODES: u32 = 9;

/// The original system's ring, kept bit-for-bit: 512 slots, 9 virtual nodes per server at
/// `Φ(i, j) = i² + j² + 2j + 25 mod 512`, collisions resolved by linear probing, request `r` at
/// `H(r) = r² + 2r + 17 mod 512`, served by the first occupied slot at or after it.
///
/// Servers are placed in ascending id order, all nine virtual nodes of one server before the next,
/// as the original added servers one by one; that order decides who wins a collision. A ring with
/// more than 56 servers (more virtual nodes than slots) keeps the first 512 virtual nodes.
#[derive(Clone, Debug)]
pub struct SeedRing {
    slots: Box<[Option<u16>; SEED_SLOTS]>,
}

/// `r² + 2r + 17 mod 512`. Arithmetic wraps modulo 2⁶⁴, which 512 divides, so the result is the
/// exact residue for every `r`.
pub fn seed_request_slot(r: u64) -> usize {
    let v = r.wrapping_mul(r).wrapping_add(r.wrapping_mul(2)).wrapping_add(17);
    (v % SEED_SLOTS as u64) as usize
}

/// `i² + j² + 2j + 25 mod 512` (before probing), exact for every `i` for the same reason.
pub fn seed_vnode_slot(i: u32, j: u32) -> usize {
    let (i, j) = (u64::from(i), u64::from(j));
    let v = i.wrapping_mul(i).wrapping_add(j * j).wrapping_add(2 * j).wrapping_add(25);
    (v % SEED_SLOTS as u64) as usize
}

impl SeedRing {
    pub fn new(ids: &[u32]) -> SeedRing {
        let mut slots = Box::new([None; SEED_SLOTS]);
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&m| ids[m]);
        let mut used = 0;
        'place: for m in order {
            for j in 0..SEED_VNODES {
                if used == SEED_SLOTS {
                    break 'place;
                }
                let mut s = seed_vnode_slot(ids[m], j);
                while slots[s].is_some() {
                    s = (s + 1) % SEED_SLOTS;
                }
                slots[s] = Some(member_index(m));
                used += 1;
            }
        }
        SeedRing { slots }
    }

    /// The slot a virtual node landed on, after probing (for tests and diagnostics).
    pub fn slot_of(&self, member: usize, vnode_rank: usize) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, m)| m.map(usize::from) == Some(member))
            .map(|(s, _)| s)
            .nth(vnode_rank)
    }

    /// The member occupying `slot`.
    pub fn owner_of_slot(&self, slot: usize) -> Option<usize> {
        self.slots.get(slot).copied().flatten().map(usize::from)
    }

    pub fn pick(&self, request: u64) -> Option<usize> {
        self.clockwise(seed_request_slot(request)).next()
    }

    pub fn candidates(&self, request: u64) -> Vec<usize> {
        distinct(self.clockwise(seed_request_slot(request)))
    }

    /// Members of the occupied slots from `start` clockwise, once around the ring.
    fn clockwise(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        (0..SEED_SLOTS).filter_map(move |k| self.slots[(start + k) % SEED_SLOTS]).map(usize::from)
    }
}

// ---------------------------------------------------------------------------------------------
// The hash ring (default)

/// Virtual nodes per server on the hash ring. A server's share of the ring is the sum of this many
/// random arcs, so its relative deviation from fair is about 1/√VNODES (≈2%). Rings are built once
/// per topology change and shared by shards with the same ready set, so the size is cheap.
pub const HASH_VNODES: u32 = 2048;

/// Fixed SipHash keys: positions must be identical in every router process and every release.
const HASH_KEYS: (u64, u64) = (0x7368_6172_6464_6231, 0x7269_6e67_2d76_3031);

/// Domain tags, so a virtual node and a request can never be hashed from the same bytes.
const TAG_VNODE: u8 = b'v';
const TAG_REQUEST: u8 = b'r';

/// A consistent-hash ring: [`HASH_VNODES`] points per server, positions from SipHash-1-3 with fixed
/// keys over little-endian bytes (stable across processes and platforms). Removing a server moves
/// only the requests that were on its arcs; everything else keeps its replica.
#[derive(Clone, Debug)]
pub struct HashRing {
    /// (position, member) sorted by position; ties (never seen in practice) by member.
    points: Vec<(u64, u16)>,
    members: usize,
}

fn sip(tag: u8, parts: &[&[u8]]) -> u64 {
    let mut h = SipHasher13::new_with_keys(HASH_KEYS.0, HASH_KEYS.1);
    h.write(&[tag]);
    for p in parts {
        h.write(p);
    }
    h.finish()
}

/// Ring position of virtual node `j` of server `id`.
pub fn hash_vnode_position(id: u32, j: u32) -> u64 {
    sip(TAG_VNODE, &[&id.to_le_bytes(), &j.to_le_bytes()])
}

/// Ring position of request `r`.
pub fn hash_request_position(r: u64) -> u64 {
    sip(TAG_REQUEST, &[&r.to_le_bytes()])
}

impl HashRing {
    pub fn new(ids: &[u32]) -> HashRing {
        let mut points = Vec::with_capacity(ids.len() * HASH_VNODES as usize);
        for (m, &id) in ids.iter().enumerate() {
            for j in 0..HASH_VNODES {
                points.push((hash_vnode_position(id, j), member_index(m)));
            }
        }
        // Sorting by (position, server id) makes the ring independent of the member order given.
        points.sort_unstable_by_key(|&(pos, m)| (pos, ids[usize::from(m)]));
        HashRing { points, members: ids.len() }
    }

    pub fn pick(&self, request: u64) -> Option<usize> {
        self.clockwise(hash_request_position(request)).next()
    }

    pub fn candidates(&self, request: u64) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.members);
        for m in self.clockwise(hash_request_position(request)) {
            if !out.contains(&m) {
                out.push(m);
                if out.len() == self.members {
                    break;
                }
            }
        }
        out
    }

    /// Members of the points at or after `pos`, once around the ring.
    fn clockwise(&self, pos: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|&(p, _)| p < pos);
        let n = self.points.len();
        (0..n).map(move |k| usize::from(self.points[(start + k) % n].1))
    }
}

fn member_index(m: usize) -> u16 {
    // A shard has a handful of replicas; a topology with 65536 of them is not a real input.
    u16::try_from(m).expect("fewer than 65536 replicas per shard")
}

fn distinct(it: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out = Vec::new();
    for m in it {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected seed-ring values below come from a separate transcription of the seed's formulas,
    // not from running this implementation.

    #[test]
    fn seed_formulas_match_the_original() {
        assert_eq!(seed_request_slot(0), 17);
        assert_eq!(seed_request_slot(1), 20);
        assert_eq!(seed_request_slot(7), 80);
        assert_eq!(seed_request_slot(100), 489);
        assert_eq!(seed_request_slot(12345), 308);
        // Large ids wrap instead of overflowing and still give the exact residue.
        assert_eq!(seed_request_slot(u64::MAX), 16);
        assert_eq!(seed_request_slot(1 << 63), 17);
        assert_eq!(seed_request_slot((1 << 32) + 5), 52);
        assert_eq!(seed_vnode_slot(0, 0), 25);
        assert_eq!(seed_vnode_slot(2, 8), 109);
        assert_eq!(seed_vnode_slot(22, 0), 509);
        assert_eq!(seed_vnode_slot(u32::MAX, 0), 26);
    }

    #[test]
    fn seed_ring_places_virtual_nodes_like_the_original() {
        // Members given out of id order: placement must still go by ascending id.
        let ids = [2, 0, 1];
        let ring = SeedRing::new(&ids);
        let slots = |member: usize| (0..9).map(|k| ring.slot_of(member, k).unwrap()).collect::<Vec<_>>();
        assert_eq!(slots(1), [25, 28, 33, 40, 49, 60, 73, 88, 105]); // id 0
        assert_eq!(slots(2), [26, 29, 34, 41, 50, 61, 74, 89, 106]); // id 1
        // Φ(2, 0) = 29 is taken by id 1's second node: probing moves it to 30.
        assert_eq!(slots(0), [30, 32, 37, 44, 53, 64, 77, 92, 109]); // id 2
        assert_eq!(ring.slots.iter().filter(|s| s.is_some()).count(), 27);
    }

    #[test]
    fn seed_ring_probing_wraps_past_the_last_slot() {
        // Φ = 509 for (22,0), (31,5), (106,0), (113,1): the later ones probe 510, 511, then wrap.
        let ids = [22, 31, 106, 113];
        let ring = SeedRing::new(&ids);
        assert_eq!(ring.owner_of_slot(509), Some(0));
        assert_eq!(ring.owner_of_slot(510), Some(1));
        assert_eq!(ring.owner_of_slot(511), Some(2));
        assert_eq!(ring.owner_of_slot(0), Some(0)); // (22,1): 484 + 28 = 512 ≡ 0
        assert_eq!(ring.owner_of_slot(1), Some(2)); // (106,1) found 0 taken
        assert_eq!(ring.owner_of_slot(2), Some(3)); // (113,1): 509 → 510 → 511 → 0 → 1 → 2
        assert_eq!(ring.owner_of_slot(506), Some(3)); // (113,0)
    }

    #[test]
    fn seed_ring_routes_requests_like_the_original() {
        let ring = SeedRing::new(&[0, 1, 2]);
        let id_of = |r: u64| [0, 1, 2][ring.pick(r).unwrap()];
        assert_eq!(id_of(0), 0); // H = 17 → slot 25
        assert_eq!(id_of(2), 0); // H = 25, exactly on a node
        assert_eq!(id_of(3), 2); // H = 32
        assert_eq!(id_of(7), 0); // H = 80 → 88
        assert_eq!(id_of(100), 0); // H = 489, wraps to 25
        assert_eq!(id_of((1 << 32) + 5), 2); // H = 52 → 53
        let ring = SeedRing::new(&[22, 31, 106, 113]);
        let id_of = |r: u64| [22, 31, 106, 113][ring.pick(r).unwrap()];
        assert_eq!(id_of(0), 113); // H = 17 → 18
        assert_eq!(id_of(1), 22); // H = 20 → 21
        assert_eq!(id_of(21), 113); // H = 500 → 506
        assert_eq!(id_of(23), 31); // H = 80 → 474
        let ring = SeedRing::new(&[u32::MAX, 7]);
        let id_of = |r: u64| [u32::MAX, 7][ring.pick(r).unwrap()];
        assert_eq!(id_of(4), u32::MAX); // H = 41, on a node
        assert_eq!(id_of(6), 7); // H = 65 → 74
        assert_eq!(id_of(1000), u32::MAX); // H = 33 → 34
    }

    #[test]
    fn candidates_list_every_member_once_choice_first() {
        for kind in [RingKind::Seed, RingKind::Hash] {
            let ring = Ring::new(kind, &[4, 9, 1, 6]);
            for r in 0..200 {
                let c = ring.candidates(r);
                assert_eq!(c[0], ring.pick(r).unwrap(), "{kind:?} r={r}");
                let mut sorted = c.clone();
                sorted.sort();
                assert_eq!(sorted, [0, 1, 2, 3], "{kind:?} r={r}");
            }
        }
        assert_eq!(Ring::new(RingKind::Hash, &[]).pick(1), None);
        assert_eq!(Ring::new(RingKind::Seed, &[]).candidates(1), Vec::<usize>::new());
    }

    fn shares(ring: &HashRing, n: usize, requests: u64) -> Vec<u64> {
        let mut counts = vec![0u64; n];
        for r in 0..requests {
            counts[ring.pick(r).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn hash_ring_spreads_reads_evenly() {
        // Within ±8% of 1/n for every member; the ring's own arcs deviate by at most ~3% here.
        const REQUESTS: u64 = 200_000;
        for ids in [vec![0, 1, 2], vec![0, 1, 2, 3, 4, 5, 6], vec![17, 3, 40], vec![11, 12, 13, 14, 15, 16, 1000]] {
            let n = ids.len();
            let counts = shares(&HashRing::new(&ids), n, REQUESTS);
            let fair = REQUESTS as f64 / n as f64;
            for (m, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - fair) / fair;
                assert!(
                    dev.abs() < 0.08,
                    "ids {ids:?}: member {m} got {c} of {REQUESTS} ({:+.1}% off fair)",
                    dev * 100.0
                );
            }
        }
    }

    #[test]
    fn hash_ring_removal_moves_only_the_removed_members_requests() {
        let before_ids = [0, 1, 2, 3, 4, 5, 6];
        let after_ids = [0, 1, 2, 4, 5, 6]; // id 3 removed
        let before = HashRing::new(&before_ids);
        let after = HashRing::new(&after_ids);
        let mut moved = 0;
        for r in 0..50_000 {
            let b = before_ids[before.pick(r).unwrap()];
            let a = after_ids[after.pick(r).unwrap()];
            if b == 3 {
                moved += 1;
            } else {
                assert_eq!(a, b, "request {r} moved from {b} to {a} though {b} stayed");
            }
            // The new owner is the one the old ring would have tried next.
            let next = before.candidates(r).into_iter().map(|m| before_ids[m]).find(|&id| id != 3).unwrap();
            assert_eq!(a, next, "request {r}");
        }
        assert!(moved > 0, "the removed member served some requests");
    }

    #[test]
    fn hash_ring_is_independent_of_member_order() {
        let a = HashRing::new(&[5, 8, 13]);
        let b = HashRing::new(&[13, 5, 8]);
        for r in 0..2000 {
            assert_eq!([5, 8, 13][a.pick(r).unwrap()], [13, 5, 8][b.pick(r).unwrap()]);
        }
    }

    #[test]
    fn hash_ring_golden_values() {
        // Computed with a separate SipHash-1-3 transcription, not with this code. A change here
        // re-routes every router's reads.
        assert_eq!(hash_request_position(0), 14_699_055_369_162_136_144);
        assert_eq!(hash_vnode_position(1, 2), 5_516_716_205_710_429_117);
        let ids = [0, 1, 2];
        let ring = HashRing::new(&ids);
        let owners: Vec<u32> = (0..12).map(|r| ids[ring.pick(r).unwrap()]).collect();
        assert_eq!(owners, [2, 1, 1, 0, 2, 2, 1, 1, 0, 0, 0, 2]);
        let owners: Vec<u32> = [1000, 123_456_789, u64::MAX].iter().map(|&r| ids[ring.pick(r).unwrap()]).collect();
        assert_eq!(owners, [0, 0, 1]);
    }
}
