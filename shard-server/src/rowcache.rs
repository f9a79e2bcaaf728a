//! A shard copy's rows in memory, so reads and a primary's decisions need no Postgres round trip.
//! Pure (no I/O): [`crate::replication`] fills and updates it.
//!
//! **Coherence.** The cache is all or nothing: it holds every row of the table (so a key missing
//! from it is absent from the table too) or it is off and everything goes to Postgres. Only the
//! code that changes the table changes the cache, right after its Postgres commit and under the
//! shard's `applied` lock, the same lock every table change takes: applying an entry (primary or
//! replica) updates it with the entry's final row states; installing a snapshot turns it off
//! first and loads it again from the table after. So the cache always equals the table at the
//! shard's applied sequence number. A reader may see it just before or just after a commit,
//! which is fine: nothing is acknowledged before the commit *and* the cache update.
//!
//! **Memory.** Rows count against one budget per server (`--cache-rows`): a shard whose rows do
//! not fit when it is loaded, or that grows past what is left, turns its cache off for good (until
//! it is loaded again after a snapshot install or a restart) and gives its rows back.

use crate::api::Change;
use crate::schema::{Row, Schema, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// Rows the caches of one server may hold together.
#[derive(Debug)]
pub struct Budget {
    left: AtomicI64,
}

impl Budget {
    pub fn new(rows: usize) -> Arc<Budget> {
        Arc::new(Budget { left: AtomicI64::new(i64::try_from(rows).unwrap_or(i64::MAX)) })
    }

    /// Takes `n` rows from the budget, or nothing when fewer are left.
    fn take(&self, n: usize) -> bool {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.left.fetch_sub(n, Ordering::AcqRel) >= n {
            return true;
        }
        self.left.fetch_add(n, Ordering::AcqRel);
        false
    }

    fn give(&self, n: usize) {
        self.left.fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    pub fn left(&self) -> i64 {
        self.left.load(Ordering::Acquire)
    }
}

/// The rows of one shard copy, or off.
#[derive(Debug)]
pub struct RowCache {
    rows: RwLock<Option<BTreeMap<i64, Row>>>,
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
    /// turns the cache off. The caller holds the shard's `applied` lock.
    pub fn load(&self, schema: &Schema, rows: Vec<Row>) {
        self.turn_off();
        if !self.budget.take(rows.len()) {
            return;
        }
        let map = rows.into_iter().map(|r| (r.key(schema), r)).collect();
        *self.rows.write().expect("lock") = Some(map);
    }

    /// Turns the cache off and gives its rows back to the budget.
    pub fn turn_off(&self) {
        if let Some(map) = self.rows.write().expect("lock").take() {
            self.budget.give(map.len());
        }
    }

    /// Applies an entry's final row states, after they committed. The caller holds the shard's
    /// `applied` lock.
    pub fn apply(&self, changes: &[Change]) {
        let mut guard = self.rows.write().expect("lock");
        let Some(map) = guard.as_mut() else { return };
        let grows = changes.iter().filter(|c| c.row.is_some() && !map.contains_key(&c.key)).count();
        if grows > 0 && !self.budget.take(grows) {
            let held = map.len();
            *guard = None;
            self.budget.give(held);
            tracing::info!(rows = held, "row cache over its budget; reading from Postgres from now on");
            return;
        }
        let mut shrinks = 0;
        for c in changes {
            match &c.row {
                Some(row) => {
                    map.insert(c.key, row.clone());
                }
                None => shrinks += usize::from(map.remove(&c.key).is_some()),
            }
        }
        self.budget.give(shrinks);
    }

    /// The stored rows of `keys` (absent keys are missing from the map), or `None` when off.
    pub fn rows(&self, keys: &[i64]) -> Option<HashMap<i64, Row>> {
        let guard = self.rows.read().expect("lock");
        let map = guard.as_ref()?;
        Some(keys.iter().filter_map(|k| map.get(k).map(|r| (*k, r.clone()))).collect())
    }

    /// The rows of each inclusive range as a JSON array of seed-format objects, sorted by key (the
    /// same JSON values Postgres's `json_agg` gives), or `None` when off.
    pub fn ranges_json(&self, ranges: &[(i64, i64)]) -> Option<Vec<String>> {
        let guard = self.rows.read().expect("lock");
        let map = guard.as_ref()?;
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
        let budget = Budget::new(100);
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
        let budget = Budget::new(3);
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
    }
}
