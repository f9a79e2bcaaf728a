//! What readers may see of a shard copy: the state at its *visible* sequence number, which only
//! ever covers *confirmed* entries, never one still pending. Holds the pending entries beside the
//! row cache and makes reads of keys they change wait. Pure bookkeeping plus the read path, which
//! does I/O (Postgres, when the row cache is off).
//!
//! **Why.** A copy applies an entry to its table as soon as it has it: the primary when it commits
//! a group, a replica when the primary sends it. Showing that state at once lets readers see a
//! write that may yet be lost (the primary dies before every replica has it, and the new primary
//! is one that lacks it), and lets one reader see a write that a later reader, on a copy that has
//! not applied it yet, does not: both break linearizability even when the write then succeeds.
//!
//! **Confirmed.** An entry is confirmed once every copy the primary waits for holds it: the moment
//! the primary acknowledges its group (every ready replica applied it, and every demoted replica
//! that may still hold a read lease applied it or saw its lease run out; see `writer.rs`). A
//! confirmed entry survives any failover: the operator promotes only a ready copy, and every ready
//! copy holds it. The primary confirms its own entries then; replicas learn of confirmations with
//! the next entries the primary sends, from its lease answers, and, when no write follows, from a
//! message sent after the acknowledgement. A replica takes a confirmation only for an entry it
//! holds itself and that is the same entry (sequence number and creating epoch), so a copy that
//! holds a different history never shows it.
//!
//! **Visible.** The row cache (when on) holds the table's rows at the visible sequence number;
//! entries applied after it are *pending*, kept here with the set of keys they change. Confirming
//! moves pending entries, oldest first, into the cache. A read is served only when the visible
//! state is confirmed (after a restart or a reload the table's state is visible but may not be
//! confirmed yet) and no key it asks for has a pending change; otherwise it waits for the next
//! confirmation, up to [`READ_WAIT`], then answers `not_ready` so the router tries another copy.
//! Once the oldest pending entry has waited that long for its confirmation (its write failed, or
//! the primary is cut off), reads of its keys fail at once instead of waiting again: a router
//! sends concurrent clients' reads of a shard together, and a read held up would hold up theirs.
//! With the cache off, the read goes to Postgres, which holds the pending entries too: it is
//! served only if no entry applied while it ran changes a key it asked for (else it waits and reads
//! again).
//!
//! **Why that is linearizable.** A read returns, for each key, a value that was confirmed when it
//! was served, so it never shows a write that can still be lost, and never one older than the
//! newest confirmed write of that key: a write acknowledged before the read started was applied on
//! this copy before its acknowledgement (every copy that serves reads is waited for), so here it is
//! either visible or pending, and pending keys wait. And a value seen by one reader is never undone
//! for a later one: any copy that serves reads holds that value's entry (it was confirmed, so every
//! such copy applied it), visibly or pending.
//!
//! **Decisions.** The primary decides writes against the latest state, pending entries included
//! (`latest`), since its next entry follows them.

use super::Shard;
use crate::api::{Confirmed, Entry};
use crate::db::Db;
use crate::error::ApiError;
use crate::schema::Row;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest a read waits for pending entries of its keys to be confirmed before it gives up with
/// `not_ready` (and the router tries another copy).
pub const READ_WAIT: Duration = Duration::from_secs(1);

/// The visible state's bookkeeping. Lock order: this, then the row cache.
#[derive(Debug, Default)]
pub(super) struct VisState {
    /// The sequence number whose table state readers see (the row cache holds it when on).
    visible: u64,
    /// The highest entry known confirmed here. Readers are served only while `confirmed >= visible`.
    confirmed: u64,
    /// Entries applied after `visible`, ascending and consecutive, with when each was applied.
    pending: VecDeque<(Instant, Arc<Entry>)>,
    /// Keys those entries change, with how many of them change each.
    keys: BTreeMap<i64, usize>,
}

impl VisState {
    /// The last applied sequence number, as far as this bookkeeping knows.
    fn latest(&self) -> u64 {
        self.pending.back().map_or(self.visible, |(_, e)| e.seq)
    }

    /// Whether the oldest pending entry has waited for its confirmation longer than a read would.
    fn stuck(&self) -> bool {
        self.pending.front().is_some_and(|(at, _)| at.elapsed() > READ_WAIT)
    }

    fn blocks(&self, ranges: &[(i64, i64)]) -> bool {
        self.confirmed < self.visible || ranges.iter().any(|&(l, h)| l <= h && self.keys.range(l..=h).next().is_some())
    }
}

/// The visibility of one shard copy: its bookkeeping and a channel that wakes waiting readers.
#[derive(Debug)]
pub(super) struct Visibility {
    state: RwLock<VisState>,
    changed: watch::Sender<u64>,
}

impl Visibility {
    pub(super) fn new(applied: u64) -> Visibility {
        // What a copy holds when it opens is not known to be confirmed: it waits for its primary.
        let state = VisState { visible: applied, ..VisState::default() };
        Visibility { state: RwLock::new(state), changed: watch::channel(0).0 }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Shard {
    /// Right after an entry committed, under `applied`: it is pending until confirmed.
    pub(super) fn entry_applied(&self, entry: Arc<Entry>) {
        let mut st = self.visibility.state.write().expect("lock");
        for c in &entry.changes {
            *st.keys.entry(c.key).or_default() += 1;
        }
        st.pending.push_back((Instant::now(), entry));
    }

    /// The table was (re)read into the row cache at `applied` (under `applied`, with this lock
    /// held by the caller around the load): that state is now the visible one, not necessarily
    /// confirmed. `new_copy`: the table holds another copy than before (a snapshot was installed),
    /// so earlier confirmations say nothing about it.
    pub(super) fn reset_visible(st: &mut VisState, applied: u64, new_copy: bool) {
        st.visible = applied;
        st.pending.clear();
        st.keys.clear();
        if new_copy {
            st.confirmed = 0;
        }
    }

    pub(super) fn visibility_write(&self) -> std::sync::RwLockWriteGuard<'_, VisState> {
        self.visibility.state.write().expect("lock")
    }

    /// Confirms this copy's entries up to `seq` (the primary's own, once its group is
    /// acknowledged) and shows them.
    pub(super) fn confirm_own(&self, seq: u64) {
        self.advance_confirmed(seq);
    }

    /// A confirmation from the primary: taken only if this copy holds the same entry at that
    /// number (the same epoch and, where both are known, the same history hash, which names the
    /// whole history up to it: see `divergence.rs`). This copy's last entry is also known by its
    /// history hash alone (a snapshot's number, which its log does not name); an older entry no
    /// longer kept here cannot be checked: a confirmation of a later entry will come.
    pub async fn confirm_from_primary(&self, node: &crate::node::Node, c: Confirmed) {
        let latest = self.visibility.state.read().expect("lock").latest();
        if c.seq == 0 || c.seq > latest {
            return;
        }
        match self.identity_at(node, c.seq).await {
            Ok(Some((epoch, hash))) => {
                let same_hash = match (&hash, &c.hash) {
                    (Some(ours), Some(theirs)) => ours == theirs,
                    _ => true,
                };
                if epoch == c.epoch && same_hash {
                    self.advance_confirmed(c.seq);
                } else {
                    tracing::warn!(
                        shard = self.id(),
                        seq = c.seq,
                        ours = epoch,
                        theirs = c.epoch,
                        "a confirmation names another entry"
                    );
                }
            }
            // Not in the log: this copy's last entry may still be known by its history hash (a
            // snapshot's number, which no log row here names).
            Ok(None) if c.seq == latest => {
                let theirs = c.hash.as_deref().and_then(super::divergence::from_hex);
                match (self.history_hash(), theirs) {
                    (Some(ours), Some(theirs)) if ours == theirs => self.advance_confirmed(c.seq),
                    // A history from before hashes, on both sides: nothing tells them apart.
                    (None, None) => self.advance_confirmed(c.seq),
                    _ => tracing::warn!(shard = self.id(), seq = c.seq, "a confirmation names another history"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(shard = self.id(), error = %e, "cannot check a confirmation"),
        }
    }

    fn advance_confirmed(&self, seq: u64) {
        let mut st = self.visibility.state.write().expect("lock");
        if seq <= st.confirmed {
            return;
        }
        st.confirmed = seq;
        while st.pending.front().is_some_and(|(_, e)| e.seq <= seq) {
            let (_, entry) = st.pending.pop_front().expect("a front entry");
            for c in &entry.changes {
                if let Some(n) = st.keys.get_mut(&c.key) {
                    *n -= 1;
                    if *n == 0 {
                        st.keys.remove(&c.key);
                    }
                }
            }
            self.rows.apply(&entry.changes);
            st.visible = entry.seq;
        }
        drop(st);
        self.visibility.notify();
    }

    /// The last entry confirmed here, with its creating epoch, to pass on to replicas.
    pub async fn confirmed(&self, node: &crate::node::Node) -> Option<Confirmed> {
        let seq = self.visibility.state.read().expect("lock").confirmed;
        if seq == 0 {
            return None;
        }
        match self.identity_at(node, seq).await {
            Ok(Some((epoch, hash))) => Some(Confirmed { seq, epoch, hash }),
            _ => None,
        }
    }

    /// The highest sequence number known confirmed here (0: none yet).
    pub fn confirmed_seq(&self) -> u64 {
        self.visibility.state.read().expect("lock").confirmed
    }

    /// The last entry applied here, pending or visible.
    pub(super) fn latest_applied(&self) -> u64 {
        self.visibility.state.read().expect("lock").latest()
    }

    /// Whether some applied entry is not confirmed yet.
    pub fn unconfirmed(&self) -> bool {
        let st = self.visibility.state.read().expect("lock");
        st.confirmed < st.latest()
    }

    /// The latest stored rows of `keys`, pending entries included, from the row cache; `None` when
    /// the cache is off (the table holds the latest state then).
    pub(super) fn latest_cached(&self, keys: &[i64]) -> Option<HashMap<i64, Row>> {
        let st = self.visibility.state.read().expect("lock");
        let mut rows = self.rows.rows(keys)?;
        for key in keys {
            if !st.keys.contains_key(key) {
                continue;
            }
            let change = st.pending.iter().rev().find_map(|(_, e)| e.changes.iter().find(|c| c.key == *key));
            match change.and_then(|c| c.row.clone()) {
                Some(row) => rows.insert(*key, row),
                None => rows.remove(key),
            };
        }
        Some(rows)
    }

    /// The rows of each inclusive range as a JSON array text, sorted by key, as of a confirmed
    /// state (see the module documentation): from the row cache, or from Postgres when it is off.
    /// Waits while a key asked for has a pending change, up to [`READ_WAIT`].
    pub async fn read_ranges_json(&self, db: &Db, ranges: &[(i64, i64)]) -> Result<Vec<String>, ApiError> {
        let deadline = tokio::time::Instant::now() + READ_WAIT;
        loop {
            let mut changed = self.visibility.changed.subscribe();
            let mark = {
                let st = self.visibility.state.read().expect("lock");
                if st.blocks(ranges) {
                    if st.stuck() {
                        return Err(self.not_confirmed());
                    }
                    None
                } else if let Some(parts) = self.rows.ranges_json(ranges) {
                    return Ok(parts);
                } else {
                    Some(st.latest())
                }
            };
            if let Some(mark) = mark {
                let parts = db.read_ranges_json(&self.table, ranges).await.map_err(ApiError::from)?;
                // Entries applied while Postgres answered may show in its answer: only pending
                // ones matter (confirmed ones may be seen).
                let st = self.visibility.state.read().expect("lock");
                let touched = st
                    .pending
                    .iter()
                    .filter(|(_, e)| e.seq > mark)
                    .any(|(_, e)| e.changes.iter().any(|c| ranges.iter().any(|&(l, h)| (l..=h).contains(&c.key))));
                if !touched && !st.blocks(ranges) {
                    return Ok(parts);
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(self.not_confirmed());
            }
        }
    }

    fn not_confirmed(&self) -> ApiError {
        ApiError::NotReady(format!(
            "shard {}: the keys asked for have changes not confirmed within {} ms; try another copy",
            self.id(),
            READ_WAIT.as_millis()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Change;
    use crate::db::ShardTable;
    use crate::replication::testing::{row, schema};

    /// A copy opened at `applied` with rows 1 and 2 cached.
    fn shard(applied: u64) -> Arc<Shard> {
        let s = Shard::spawn(
            ShardTable::new("sh1", schema()),
            applied,
            None,
            "c".into(),
            false,
            crate::rowcache::Budget::new(100, 1 << 20),
        );
        s.rows.load(&schema(), vec![row(1, "a"), row(2, "b")]);
        s
    }

    fn entry(seq: u64, changes: Vec<(i64, Option<&str>)>) -> Arc<Entry> {
        let changes = changes.into_iter().map(|(k, v)| Change { key: k, row: v.map(|v| row(k, v)) }).collect();
        Arc::new(Entry { seq, epoch: 1, changes, hash: None })
    }

    fn visible(s: &Shard, ranges: &[(i64, i64)]) -> Option<Vec<String>> {
        let st = s.visibility.state.read().unwrap();
        if st.blocks(ranges) { None } else { s.rows.ranges_json(ranges) }
    }

    #[test]
    fn pending_entries_are_hidden_and_block_only_their_keys() {
        let s = shard(0);
        assert!(visible(&s, &[(1, 1)]).is_some(), "a fresh copy (nothing applied) has nothing to confirm");
        s.entry_applied(entry(1, vec![(1, Some("a1")), (3, Some("c1"))]));
        s.entry_applied(entry(2, vec![(1, None)]));
        assert!(s.unconfirmed());
        assert_eq!(visible(&s, &[(1, 1)]), None, "key 1 has pending changes");
        assert_eq!(visible(&s, &[(0, 5)]), None, "so has any range over it");
        assert_eq!(visible(&s, &[(2, 2)]).unwrap(), [r#"[{"k":2,"v":"b"}]"#], "key 2 does not");
        // The writer decides on the latest state.
        let latest = s.latest_cached(&[1, 2, 3]).unwrap();
        assert_eq!(latest, HashMap::from([(2, row(2, "b")), (3, row(3, "c1"))]));

        s.confirm_own(1);
        assert_eq!(visible(&s, &[(3, 3)]).unwrap(), [r#"[{"k":3,"v":"c1"}]"#], "entry 1 shows");
        assert_eq!(visible(&s, &[(1, 1)]), None, "entry 2 still pends on key 1");
        s.confirm_own(2);
        assert_eq!(visible(&s, &[(0, 5)]).unwrap(), [r#"[{"k":2,"v":"b"},{"k":3,"v":"c1"}]"#]);
        assert!(!s.unconfirmed());
    }

    #[test]
    fn an_opened_or_reloaded_state_waits_for_a_confirmation_and_a_new_copy_forgets_old_ones() {
        let s = shard(4);
        assert_eq!(visible(&s, &[(5, 5)]), None, "what a copy holds when it opens is not known confirmed");
        s.confirm_own(4);
        assert!(visible(&s, &[(5, 5)]).is_some());
        s.entry_applied(entry(5, vec![(2, Some("y"))]));
        {
            let mut st = s.visibility_write();
            Shard::reset_visible(&mut st, 5, false);
        }
        assert_eq!(visible(&s, &[(7, 7)]), None, "the table's state at 5 is not confirmed");
        s.confirm_own(5);
        assert!(visible(&s, &[(7, 7)]).is_some());
        {
            let mut st = s.visibility_write();
            Shard::reset_visible(&mut st, 3, true);
        }
        assert_eq!(visible(&s, &[(7, 7)]), None, "a snapshot's state waits for its own confirmation");
    }

    #[tokio::test]
    async fn a_waiting_read_is_served_once_confirmed_and_gives_up_after_a_while() {
        let s = shard(0);
        s.entry_applied(entry(1, vec![(1, Some("new"))]));
        let reader = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.read_ranges_json(&Db::unconnected(), &[(1, 1)]).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "waits for the pending entry");
        s.confirm_own(1);
        let parts = reader.await.unwrap().unwrap();
        assert_eq!(parts, [r#"[{"k":1,"v":"new"}]"#]);

        s.entry_applied(entry(2, vec![(1, Some("newer"))]));
        let started = std::time::Instant::now();
        let e = s.read_ranges_json(&Db::unconnected(), &[(1, 1)]).await.unwrap_err();
        assert!(matches!(e, ApiError::NotReady(_)), "{e}");
        assert!(started.elapsed() >= READ_WAIT, "it waited for a confirmation first");
        // Pending for longer than a read waits: the next read of its key fails at once.
        let started = std::time::Instant::now();
        let e = s.read_ranges_json(&Db::unconnected(), &[(1, 1)]).await.unwrap_err();
        assert!(matches!(e, ApiError::NotReady(_)), "{e}");
        assert!(started.elapsed() < READ_WAIT, "no second wait");
        assert!(s.read_ranges_json(&Db::unconnected(), &[(2, 2)]).await.is_ok(), "another key is read as usual");
    }
}
