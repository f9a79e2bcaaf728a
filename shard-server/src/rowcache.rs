//! A shard copy's rows in memory, so reads and a primary's decisions need no Postgres round trip.
//! Pure (no I/O): [`crate::replication`] fills and updates it.
//!
//! **Coherence.** The cache is all or nothing: it holds every row of the table as of one sequence
//! number (so a key missing from it is absent there too) or it is off and everything goes to
//! Postgres. That number is the copy's *visible* one (see `replication::visibility`): entries
//! applied to the table after it are pending, kept beside the cache until confirmed, and a
//! confirmation applies them to the cache in order. A snapshot install or a reload turns it off and
//! loads it again from the table, together with the visibility bookkeeping. A reader may see it
//! just before or just after a confirmation, which is fine: both states are confirmed.
//!
//! **Memory.** Rows count against one budget per server, in rows (`--cache-rows`) and in bytes
//! (`--cache-bytes`, as [`row_bytes`] estimates them), so a few large rows cannot take the memory
//! many small ones were allowed: a shard whose rows do not fit when it is loaded, or that grows
//! past what is left, turns its cache off for good (until it is loaded again after a snapshot
//! install or a restart) and gives its rows back.

use crate::api::Change;
use crate::schema::{Row, Schema, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// What the caches of one server may hold together: rows, and bytes (as [`row_bytes`] estimates
/// them), so that a few large rows cannot take what many small ones were allowed.
#[derive(Debug)]
pub struct Budget {
    rows: AtomicI64,
    bytes: AtomicI64,
}

/// Memory a cached row costs beyond its cells: its map node, key and vector (an estimate).
const ROW_OVERHEAD: usize = 64;

/// The memory estimate of one cached row.
pub fn row_bytes(row: &Row) -> usize {
    ROW_OVERHEAD
        + row
            .0
            .iter()
            .map(|v| match v {
                Value::Int(_) => std::mem::size_of::<Value>(),
                Value::Text(s) => std::mem::size_of::<Value>() + s.len(),
            })
            .sum::<usize>()
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Budget {
    pub fn new(rows: usize, bytes: usize) -> Arc<Budget> {
        Arc::new(Budget { rows: AtomicI64::new(signed(rows)), bytes: AtomicI64::new(signed(bytes)) })
    }

    /// Takes `rows` rows and `bytes` bytes from the budget, or nothing when either is short.
    fn take(&self, rows: usize, bytes: usize) -> bool {
        let (rows, bytes) = (signed(rows), signed(bytes));
        let rows_ok = self.rows.fetch_sub(rows, Ordering::AcqRel) >= rows;
        let bytes_ok = self.bytes.fetch_sub(bytes, Ordering::AcqRel) >= bytes;
        if rows_ok && bytes_ok {
            return true;
        }
        self.rows.fetch_add(rows, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        false
    }

    fn give(&self, rows: usize, bytes: usize) {
        self.rows.fetch_add(signed(rows), Ordering::AcqRel);
        self.bytes.fetch_add(signed(bytes), Ordering::AcqRel);
    }

    /// Rows the budget still has room for.
    pub fn left(&self) -> i64 {
        self.rows.load(Ordering::Acquire)
    }

    /// Bytes the budget still has room for.
    pub fn bytes_left(&self) -> i64 {
        self.bytes.load(Ordering::Acquire)
    }
}

/// The rows a cache holds and their estimated bytes.
#[derive(Debug, Default)]
struct Held {
    map: BTreeMap<i64, Row>,
    bytes: usize,
}

/// The rows of one shard copy, or off.
#[derive(Debug)]
pub struct RowCache {
    rows: RwLock<Option<Held>>,
    budget: Arc<Budget>,
    /// `"<column>":` for each column, JSON-escaped once.
    prefixes: Vec<String>,
}

impl RowCache {
    /// An empty cache that is off until [`RowCache::load`].
    pub fn off(schema: &Schema, budget: Arc<Budget>) -> RowCache {
        let prefixes = schema
            .columns()
            .iter()
            .map(|c| format!("{}:", serde_json::to_string(c).expect("strings serialise")))
            .collect();
        RowCache { rows: RwLock::new(None), budget, prefixes }
    }

    /// Rows the server's budget still has room for.
    pub fn budget_left(&self) -> i64 {
        self.budget.left()
    }

    /// Whether the cache holds the whole shard.
    pub fn is_on(&self) -> bool {
        self.rows.read().expect("lock").is_some()
    }

    /// Replaces the contents with `rows` (every row of the table) if they fit the budget, else
    /// turns the cache off. The caller holds the shard's `applied` lock and its visibility lock.
    pub fn load(&self, schema: &Schema, rows: Vec<Row>) {
        self.turn_off();
        let bytes = rows.iter().map(row_bytes).sum();
        if !self.budget.take(rows.len(), bytes) {
            return;
        }
        let map = rows.into_iter().map(|r| (r.key(schema), r)).collect();
        *self.rows.write().expect("lock") = Some(Held { map, bytes });
    }

    /// Turns the cache off and gives its rows back to the budget.
    pub fn turn_off(&self) {
        if let Some(held) = self.rows.write().expect("lock").take() {
            self.budget.give(held.map.len(), held.bytes);
        }
    }

    /// Applies an entry's final row states, once confirmed (see `replication::visibility`, whose
    /// lock the caller holds).
    pub fn apply(&self, changes: &[Change]) {
        let mut guard = self.rows.write().expect("lock");
        let Some(held) = guard.as_mut() else { return };
        // What the entry adds and removes, in rows and bytes (a replaced row counts both ways).
        let (mut added, mut removed) = ((0usize, 0usize), (0usize, 0usize));
        for c in changes {
            if let Some(old) = held.map.get(&c.key) {
                removed = (removed.0 + 1, removed.1 + row_bytes(old));
            }
            if let Some(new) = &c.row {
                added = (added.0 + 1, added.1 + row_bytes(new));
            }
        }
        let grows = (added.0.saturating_sub(removed.0), added.1.saturating_sub(removed.1));
        if (grows.0 > 0 || grows.1 > 0) && !self.budget.take(grows.0, grows.1) {
            let held = guard.take().expect("the cache is on");
            self.budget.give(held.map.len(), held.bytes);
            tracing::info!(
                rows = held.map.len(),
                bytes = held.bytes,
                "row cache over its budget; reading from Postgres from now on"
            );
            return;
        }
        for c in changes {
            match &c.row {
                Some(row) => {
                    held.map.insert(c.key, row.clone());
                }
                None => {
                    held.map.remove(&c.key);
                }
            }
        }
        held.bytes = held.bytes + added.1 - removed.1;
        self.budget.give(removed.0.saturating_sub(added.0), removed.1.saturating_sub(added.1));
    }

    /// The stored rows of `keys` (absent keys are missing from the map), or `None` when off.
    pub fn rows(&self, keys: &[i64]) -> Option<HashMap<i64, Row>> {
        let guard = self.rows.read().expect("lock");
        let map = &guard.as_ref()?.map;
        Some(keys.iter().filter_map(|k| map.get(k).map(|r| (*k, r.clone()))).collect())
    }

    /// The rows of each inclusive range as a JSON array of seed-format objects, sorted by key (the
    /// same JSON values Postgres's `json_agg` gives), or `None` when off.
    pub fn ranges_json(&self, ranges: &[(i64, i64)]) -> Option<Vec<String>> {
        let guard = self.rows.read().expect("lock");
        let map = &guard.as_ref()?.map;
        Some(
            ranges
                .iter()
                .map(|&(low, high)| {
                    let mut out = String::from("[");
                    if low <= high {
                        for (i, row) in map.range(low..=high).map(|(_, r)| r).enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            self.object(row, &mut out);
                        }
                    }
                    out.push(']');
                    out
                })
                .collect(),
        )
    }

    fn object(&self, row: &Row, out: &mut String) {
        out.push('{');
        for (i, (prefix, value)) in self.prefixes.iter().zip(&row.0).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(prefix);
            match value {
                Value::Int(v) => {
                    let _ = write!(out, "{v}");
                }
                Value::Text(s) => out.push_str(&serde_json::to_string(s).expect("strings serialise")),
            }
        }
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::DType;

    fn schema() -> Schema {
        Schema::new(vec!["id".into(), "name".into()], vec![DType::Number, DType::String], None).unwrap()
    }
    fn row(k: i64, v: &str) -> Row {
        Row(vec![Value::Int(k), Value::Text(v.into())])
    }
    fn put(k: i64, v: &str) -> Change {
        Change { key: k, row: Some(row(k, v)) }
    }
    fn del(k: i64) -> Change {
        Change { key: k, row: None }
    }

    #[test]
    fn serves_what_was_applied_as_seed_json() {
        let budget = Budget::new(100, 1 << 20);
        let c = RowCache::off(&schema(), budget.clone());
        assert_eq!(c.rows(&[1]), None, "off until loaded");
        assert_eq!(c.ranges_json(&[(0, 9)]), None);
        c.load(&schema(), vec![row(1, "a"), row(5, "e")]);
        c.apply(&[put(3, "say \"hi\"\n"), del(5), put(1, "A")]);
        assert_eq!(c.rows(&[1, 2, 3, 5]).unwrap(), HashMap::from([(1, row(1, "A")), (3, row(3, "say \"hi\"\n"))]));
        assert_eq!(
            c.ranges_json(&[(0, 9), (2, 2), (3, 3), (9, 0)]).unwrap(),
            [
                r#"[{"id":1,"name":"A"},{"id":3,"name":"say \"hi\"\n"}]"#,
                "[]",
                r#"[{"id":3,"name":"say \"hi\"\n"}]"#,
                "[]",
            ]
        );
        assert_eq!(budget.left(), 98);
    }

    #[test]
    fn a_shard_that_outgrows_the_budget_turns_off_and_gives_its_rows_back() {
        let budget = Budget::new(3, 1 << 20);
        let big = RowCache::off(&schema(), budget.clone());
        big.load(&schema(), (0..4).map(|k| row(k, "x")).collect());
        assert!(!big.is_on(), "4 rows do not fit 3");
        assert_eq!(budget.left(), 3);

        let c = RowCache::off(&schema(), budget.clone());
        c.load(&schema(), vec![row(1, "a")]);
        c.apply(&[put(2, "b"), put(1, "a2")]);
        assert_eq!(budget.left(), 1);
        c.apply(&[del(2), put(3, "c")]);
        assert_eq!(budget.left(), 1, "one removed, one added");
        c.apply(&[put(4, "d"), put(5, "e")]);
        assert!(!c.is_on());
        assert_eq!(c.rows(&[1]), None, "off: everything goes to Postgres");
        assert_eq!(budget.left(), 3, "all rows given back");
        c.apply(&[put(6, "f")]);
        assert_eq!(budget.left(), 3, "an off cache takes nothing");
        assert_eq!(budget.bytes_left(), 1 << 20, "every byte given back");
    }

    #[test]
    fn large_rows_count_against_the_byte_budget() {
        let small = row_bytes(&row(1, "a"));
        let budget = Budget::new(1000, 10 * small);
        let c = RowCache::off(&schema(), budget.clone());
        c.load(&schema(), (0..5).map(|k| row(k, "a")).collect());
        assert!(c.is_on());
        assert_eq!(budget.bytes_left() as usize, 5 * small);
        // Replacing a row with a larger one takes only the difference.
        c.apply(&[put(1, "abcd")]);
        assert_eq!(budget.bytes_left() as usize, 5 * small - 3);
        c.apply(&[put(1, "a")]);
        assert_eq!(budget.bytes_left() as usize, 5 * small);
        // One row as large as the rest of the budget does not fit: the cache turns off.
        c.apply(&[put(9, &"x".repeat(5 * small))]);
        assert!(!c.is_on(), "far fewer rows than allowed, but too many bytes");
        assert_eq!((budget.left(), budget.bytes_left() as usize), (1000, 10 * small));
        let big = RowCache::off(&schema(), budget.clone());
        big.load(&schema(), vec![row(1, &"y".repeat(20 * small))]);
        assert!(!big.is_on(), "a load over the byte budget stays off");
    }
}
