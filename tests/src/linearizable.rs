//! A linearizability checker for one register (one key): Wing and Gong's search for a
//! linearization, with Lowe's memoisation of the configurations already explored, as Porcupine
//! implements it. Pure; [`crate::load::History::linearizability`] splits a history per key (a
//! register history is linearizable exactly when each key's is: linearizability is compositional)
//! and calls [`check`] once per key.
//!
//! **Model.** The register holds `Option<i64>` (`None`: the key is absent). A write sets it (a
//! delete writes `None`); a read must return what it holds. Operations are intervals of one clock:
//! each took effect at one instant between its call and its return, and the history is
//! linearizable when such instants exist for all of them that make every read return the value of
//! the last write before it.
//!
//! **Unknown outcomes.** An operation without a return (a write the client gave up on: it may take
//! effect at any later time, or never) is concurrent with everything called after it. The search
//! may place it anywhere after its call, including after every other operation, which is the same
//! as never taking effect.
//!
//! **Ties.** An operation that returned in the same microsecond another was called is taken as
//! concurrent with it: the order inside one tick of the clock is unknown. This can only accept
//! more histories, never reject a good one.
//!
//! **Search.** Calls and returns form one list in time order. The search repeatedly takes a call
//! that comes before every remaining return (an operation nothing still pending must precede),
//! applies it to the register if the model allows it, and removes it with its return; when it meets
//! a return instead, no pending operation can be placed next, and it backtracks. A configuration is
//! the set of operations placed plus the register's value; each is explored at most once (the
//! memo), which is what keeps the search polynomial in the length of the history.
//!
//! **Cost.** Only operations whose call precedes every remaining return can be placed, so every
//! set placed is closed under "returned before it was called". With at most `c` operations
//! overlapping at any instant, there are at most `n · 2^c` such sets for `n` operations, and the
//! register's value in each is that of one of at most `c + 1` candidate writes, so the search
//! explores at most `n · 2^c · (c + 1)` configurations, each with a scan of at most `c` list
//! entries. In the fault suite one writer owns a key and issues one operation at a time, so `c` is
//! at most the number of readers plus two (the writer's current operation and one unknown write):
//! with three readers, `n · 32 · 6`. [`check`] also takes a budget of configurations and answers
//! [`Verdict::Undecided`] past it, so a check can never run away; undecided is never a pass.
//!
//! **Memo keys.** A configuration is remembered by a 128-bit Zobrist hash (a random key per
//! operation, XORed in and out as it is placed and taken back, mixed with the value), so a step
//! costs O(1) instead of copying a set. Two configurations sharing a hash (odds below 2^-80 at any
//! budget used here) could only make the search skip one, which can make a good history look bad,
//! never a bad one look good: a pass is always a complete linearization checked step by step.

use std::collections::HashSet;

/// Microseconds on the clock every operation of a history was timed with.
pub type Micros = u64;

/// What an operation did to the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the value (`None`: delete the key).
    Write(Option<i64>),
    /// Returned this value.
    Read(Option<i64>),
}

/// One operation: its call and, when it is known to have finished, its return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    pub action: Action,
    pub call: Micros,
    /// `None`: the outcome is unknown (it may take effect at any time after its call, or never).
    pub ret: Option<Micros>,
}

/// The outcome of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable {
        explored: usize,
    },
    /// No linearization exists. `placed` operations could be linearized at most (the deepest the
    /// search got), after which `stuck` (an index into the operations) could not take effect
    /// before its return, the register holding `value`.
    Violation {
        explored: usize,
        placed: usize,
        stuck: usize,
        value: Option<i64>,
    },
    /// The budget of configurations ran out before the search decided.
    Undecided {
        explored: usize,
    },
}

/// The most operations overlapping at one instant (`c` in the cost bound of the module
/// documentation); an operation without a return overlaps everything after its call.
pub fn max_overlap(ops: &[Operation]) -> usize {
    let mut events: Vec<(Micros, u8)> = Vec::with_capacity(ops.len() * 2);
    for op in ops {
        events.push((op.call, 0));
        events.push((op.ret.unwrap_or(Micros::MAX), 1));
    }
    // At equal times calls come first: such operations count as concurrent (see "Ties").
    events.sort_unstable();
    let (mut open, mut most) = (0usize, 0usize);
    for (_, kind) in events {
        if kind == 0 {
            open += 1;
            most = most.max(open);
        } else {
            open -= 1;
        }
    }
    most
}

/// Decides whether `ops`, applied to a register that starts at `initial`, are linearizable,
/// exploring at most `budget` configurations.
pub fn check(initial: Option<i64>, ops: &[Operation], budget: usize) -> Verdict {
    let mut list = List::new(ops);
    let keys = zobrist_keys(ops.len());
    let mut memo: HashSet<u128> = HashSet::new();
    // The operations placed, with the register's value before each.
    let mut placed: Vec<(usize, Option<i64>)> = Vec::new();
    let mut value = initial;
    let mut hash = 0u128;
    let mut deepest = (0usize, 0usize, initial);
    let mut entry = list.first();
    while !list.is_empty() {
        let node = list.nodes[entry];
        if node.is_call {
            let op = node.op;
            let next_value = match ops[op].action {
                Action::Write(v) => Some(v),
                Action::Read(v) => (v == value).then_some(value),
            };
            if let Some(next_value) = next_value {
                let next_hash = hash ^ keys[op];
                if memo.insert(next_hash ^ value_key(next_value)) {
                    if memo.len() > budget {
                        return Verdict::Undecided { explored: memo.len() };
                    }
                    placed.push((entry, value));
                    value = next_value;
                    hash = next_hash;
                    list.lift(entry);
                    entry = list.first();
                    continue;
                }
            }
            entry = node.next;
        } else {
            // A return before any call that can be placed: the operation it ends cannot take
            // effect in time on this path.
            if placed.len() >= deepest.0 {
                deepest = (placed.len(), node.op, value);
            }
            let Some((call, before)) = placed.pop() else {
                return Verdict::Violation {
                    explored: memo.len(),
                    placed: deepest.0,
                    stuck: deepest.1,
                    value: deepest.2,
                };
            };
            list.unlift(call);
            hash ^= keys[list.nodes[call].op];
            value = before;
            entry = list.nodes[call].next;
        }
    }
    Verdict::Linearizable { explored: memo.len() }
}

/// One call or return in the time-ordered list.
#[derive(Clone, Copy, Debug)]
struct Node {
    op: usize,
    is_call: bool,
    /// The call's return, or the return's call.
    partner: usize,
    prev: usize,
    next: usize,
}

/// Calls and returns in time order, as a doubly linked list over a vector with sentinels at both
/// ends, so that an operation is taken out and put back in O(1) (in reverse order of removal).
struct List {
    nodes: Vec<Node>,
}

const HEAD: usize = 0;

impl List {
    fn new(ops: &[Operation]) -> List {
        // (time, 0 for a call and 1 for a return, operation): calls first at equal times.
        let mut events: Vec<(Micros, u8, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, 0, i));
            events.push((op.ret.unwrap_or(Micros::MAX), 1, i));
        }
        events.sort_unstable();
        let tail = events.len() + 1;
        let sentinel = Node { op: usize::MAX, is_call: false, partner: usize::MAX, prev: HEAD, next: tail };
        let mut nodes = vec![sentinel; events.len() + 2];
        let mut call_at = vec![0usize; ops.len()];
        for (pos, &(_, kind, op)) in events.iter().enumerate() {
            let at = pos + 1;
            nodes[at] = Node { op, is_call: kind == 0, partner: usize::MAX, prev: at - 1, next: at + 1 };
            if kind == 0 {
                call_at[op] = at;
            } else {
                nodes[at].partner = call_at[op];
                nodes[call_at[op]].partner = at;
            }
        }
        nodes[HEAD].next = 1;
        nodes[tail].prev = tail - 1;
        List { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn is_empty(&self) -> bool {
        self.first() == self.nodes.len() - 1
    }

    fn unlink(&mut self, at: usize) {
        let Node { prev, next, .. } = self.nodes[at];
        self.nodes[prev].next = next;
        self.nodes[next].prev = prev;
    }

    fn relink(&mut self, at: usize) {
        let Node { prev, next, .. } = self.nodes[at];
        self.nodes[prev].next = at;
        self.nodes[next].prev = at;
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].partner);
    }

    /// Puts back what [`List::lift`] took out (the last lifted first).
    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].partner);
        self.relink(call);
    }
}

/// A random 128-bit key per operation, from a fixed seed (the search is deterministic).
fn zobrist_keys(n: usize) -> Vec<u128> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..n).map(|_| (u128::from(splitmix(&mut state)) << 64) | u128::from(splitmix(&mut state))).collect()
}

/// The register's value mixed into a configuration's key.
fn value_key(v: Option<i64>) -> u128 {
    let mut state = match v {
        None => 0x5555_5555_5555_5555,
        Some(v) => v as u64 ^ 0x2545_f491_4f6c_dd1d,
    };
    (u128::from(splitmix(&mut state)) << 64) | u128::from(splitmix(&mut state))
}

/// SplitMix64: a small, well-mixed generator (Steele, Lea and Flood).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: usize = 1_000_000;

    fn w(v: i64, call: Micros, ret: Micros) -> Operation {
        Operation { action: Action::Write(Some(v)), call, ret: Some(ret) }
    }
    fn del(call: Micros, ret: Micros) -> Operation {
        Operation { action: Action::Write(None), call, ret: Some(ret) }
    }
    fn unknown(v: i64, call: Micros) -> Operation {
        Operation { action: Action::Write(Some(v)), call, ret: None }
    }
    fn r(v: Option<i64>, call: Micros, ret: Micros) -> Operation {
        Operation { action: Action::Read(v), call, ret: Some(ret) }
    }

    fn ok(ops: &[Operation]) -> bool {
        match check(None, ops, BUDGET) {
            Verdict::Linearizable { .. } => true,
            Verdict::Violation { .. } => false,
            Verdict::Undecided { .. } => panic!("undecided: {ops:?}"),
        }
    }

    #[test]
    fn known_good_histories_pass() {
        let good: Vec<(&str, Vec<Operation>)> = vec![
            ("nothing at all", vec![]),
            ("a read of the initial absence", vec![r(None, 0, 1)]),
            (
                "sequential",
                vec![w(1, 0, 1), r(Some(1), 2, 3), w(2, 4, 5), r(Some(2), 6, 7), del(8, 9), r(None, 10, 11)],
            ),
            ("a read overlapping a write sees the old value", vec![w(1, 0, 1), w(2, 2, 10), r(Some(1), 3, 4)]),
            ("or the new one", vec![w(1, 0, 1), w(2, 2, 10), r(Some(2), 3, 4)]),
            (
                "the new value seen, then old by a read still overlapping the first",
                vec![w(1, 0, 1), w(2, 2, 10), r(Some(2), 3, 6), r(Some(1), 4, 5)],
            ),
            ("concurrent writes in either order", vec![w(1, 0, 10), w(2, 0, 10), r(Some(1), 11, 12)]),
            ("an unknown write that never took effect", vec![w(1, 0, 1), unknown(2, 2), r(Some(1), 5, 6)]),
            ("an unknown write that took effect later", vec![unknown(2, 2), r(None, 5, 6), r(Some(2), 7, 8)]),
            ("a return and a call in the same microsecond overlap", vec![w(1, 0, 5), r(None, 5, 6)]),
        ];
        for (name, ops) in good {
            assert!(ok(&ops), "{name}: {ops:?}");
        }
    }

    #[test]
    fn known_bad_histories_fail() {
        let bad: Vec<(&str, Vec<Operation>)> = vec![
            ("a value never written", vec![r(Some(7), 0, 1)]),
            ("a stale read after an acknowledged write", vec![w(1, 0, 1), w(2, 2, 3), r(Some(1), 4, 5)]),
            ("a read of a write not called yet", vec![r(Some(1), 0, 1), w(1, 2, 3)]),
            ("a deleted key read back", vec![w(1, 0, 1), del(2, 3), r(Some(1), 4, 5)]),
            (
                // The anomaly of an unconfirmed read: one reader saw the new value, a later one the old.
                "a read going back in time while the write is in flight",
                vec![w(1, 0, 1), w(2, 2, 100), r(Some(2), 3, 4), r(Some(1), 5, 6)],
            ),
            (
                "the same, with the write's outcome unknown",
                vec![w(1, 0, 1), unknown(2, 2), r(Some(2), 3, 4), r(Some(1), 5, 6)],
            ),
            (
                "an unknown write seen, then gone, then seen again",
                vec![unknown(2, 0), r(Some(2), 1, 2), r(None, 3, 4), r(Some(2), 5, 6)],
            ),
            (
                "two sequential reads disagree on the order of concurrent writes",
                vec![w(1, 0, 10), w(2, 0, 10), r(Some(1), 11, 12), r(Some(2), 13, 14), r(Some(1), 15, 16)],
            ),
        ];
        for (name, ops) in bad {
            assert!(!ok(&ops), "{name}: {ops:?}");
        }
    }

    #[test]
    fn a_violation_names_the_operation_that_could_not_take_effect() {
        let ops = [w(1, 0, 1), w(2, 2, 3), r(Some(2), 4, 5), r(Some(1), 6, 7)];
        match check(None, &ops, BUDGET) {
            Verdict::Violation { placed, stuck, value, .. } => {
                assert_eq!((placed, stuck, value), (3, 3, Some(2)), "the last read, after three placed");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let ops: Vec<Operation> = (0..50).map(|i| r(None, i, i + 1)).collect();
        assert_eq!(check(None, &ops, 10), Verdict::Undecided { explored: 11 });
        assert!(matches!(check(None, &ops, BUDGET), Verdict::Linearizable { explored: 50 }));
    }

    #[test]
    fn overlap_counts_unknown_operations_to_the_end() {
        assert_eq!(max_overlap(&[]), 0);
        assert_eq!(max_overlap(&[w(1, 0, 1), w(2, 2, 3)]), 1);
        assert_eq!(max_overlap(&[w(1, 0, 1), r(None, 1, 2)]), 2, "same microsecond");
        assert_eq!(max_overlap(&[unknown(1, 0), w(2, 2, 3), r(None, 4, 5), r(None, 4, 6)]), 3);
    }

    /// A long history shaped like the fault suite's (one writer issuing one operation at a time,
    /// three readers, values unique) that is linearizable by construction: every operation takes
    /// effect at a random instant of its interval, and reads return what the register held there.
    fn long_history(rng: &mut rand::rngs::StdRng, writes: usize) -> Vec<Operation> {
        use rand::Rng;
        let mut timed: Vec<(Micros, Operation)> = Vec::new();
        let mut t = 0;
        for i in 0..writes {
            let (call, ret) = (t, t + rng.random_range(1..40));
            let action = Action::Write(if i % 4 == 3 { None } else { Some(i as i64) });
            timed.push((rng.random_range(call..=ret), Operation { action, call, ret: Some(ret) }));
            t = ret + rng.random_range(1..10);
        }
        for _reader in 0..3 {
            let mut t = 0;
            while t < timed.last().map_or(0, |w| w.1.call) {
                let (call, ret) = (t, t + rng.random_range(1..25));
                timed.push((
                    rng.random_range(call..=ret),
                    Operation { action: Action::Read(None), call, ret: Some(ret) },
                ));
                t = ret + rng.random_range(0..5);
            }
        }
        timed.sort_by_key(|(at, op)| (*at, matches!(op.action, Action::Read(_))));
        let mut value = None;
        for (_, op) in &mut timed {
            match &mut op.action {
                Action::Write(v) => value = *v,
                Action::Read(v) => *v = value,
            }
        }
        timed.into_iter().map(|(_, op)| op).collect()
    }

    #[test]
    fn long_histories_are_decided_within_the_bound() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..5 {
            let mut ops = long_history(&mut rng, 500);
            let (n, c) = (ops.len(), max_overlap(&ops));
            let bound = n * (1 << c) * (c + 1);
            match check(None, &ops, BUDGET) {
                Verdict::Linearizable { explored } => assert!(explored <= bound, "{explored} > {bound}"),
                other => panic!("a linearizable history: {other:?}"),
            }
            // A read after everything that returns the first value: stale. The search has to rule
            // out every configuration before it says so, which is the worst case.
            let end = ops.iter().filter_map(|o| o.ret).max().unwrap();
            ops.push(r(Some(0), end + 1, end + 2));
            let (n, c) = (ops.len(), max_overlap(&ops));
            let bound = n * (1 << c) * (c + 1);
            match check(None, &ops, BUDGET) {
                Verdict::Violation { explored, stuck, .. } => {
                    assert!(explored <= bound, "{explored} > {bound}");
                    assert_eq!(stuck, ops.len() - 1, "the stale read is named");
                }
                other => panic!("a stale read at the end: {other:?}"),
            }
        }
    }

    /// The definition itself, for tiny histories: some order of all operations (each unknown one
    /// either placed or left out) respects real time and the register.
    fn brute_force(ops: &[Operation]) -> bool {
        let n = ops.len();
        let precedes = |a: &Operation, b: &Operation| a.ret.is_some_and(|ret| ret < b.call);
        fn search(
            ops: &[Operation],
            used: &mut Vec<bool>,
            value: Option<i64>,
            precedes: &dyn Fn(&Operation, &Operation) -> bool,
        ) -> bool {
            let remaining: Vec<usize> = (0..ops.len()).filter(|i| !used[*i]).collect();
            // Done when every operation left has an unknown outcome: those never took effect.
            if remaining.iter().all(|&i| ops[i].ret.is_none()) {
                return true;
            }
            for &i in &remaining {
                if remaining.iter().any(|&j| j != i && precedes(&ops[j], &ops[i])) {
                    continue;
                }
                let next = match ops[i].action {
                    Action::Write(v) => v,
                    Action::Read(v) if v == value => value,
                    Action::Read(_) => continue,
                };
                used[i] = true;
                let found = search(ops, used, next, precedes);
                used[i] = false;
                if found {
                    return true;
                }
            }
            false
        }
        search(ops, &mut vec![false; n], None, &precedes)
    }

    /// Random tiny histories (few values, so reads often match) checked against the definition.
    #[test]
    fn agrees_with_the_definition_on_random_histories() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let (mut good, mut bad) = (0, 0);
        for _ in 0..4000 {
            let n = rng.random_range(1..=7);
            let ops: Vec<Operation> = (0..n)
                .map(|_| {
                    let call = rng.random_range(0..20);
                    let ret = (rng.random_range(0..10) > 0).then(|| call + rng.random_range(0..8));
                    let value = [None, Some(1), Some(2)][rng.random_range(0..3)];
                    match (rng.random_range(0..2), ret) {
                        (0, Some(ret)) => Operation { action: Action::Read(value), call, ret: Some(ret) },
                        _ => Operation { action: Action::Write(value), call, ret },
                    }
                })
                .collect();
            let expected = brute_force(&ops);
            assert_eq!(ok(&ops), expected, "{ops:?}");
            if expected { good += 1 } else { bad += 1 }
        }
        assert!(good > 500 && bad > 500, "both kinds are exercised: {good} good, {bad} bad");
    }
}
