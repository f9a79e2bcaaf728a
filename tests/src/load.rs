//! A recording load generator and the checkers of what it recorded, for the fault-injection suite.
//!
//! Writers each own a disjoint set of keys and insert, update and delete them, one operation at a
//! time; readers (separate clients, on their own connections) read single keys and small ranges
//! of every writer's keys. Every operation is recorded with its start and end (microseconds on
//! one monotonic clock shared by all tasks of the test process) and its outcome.
//!
//! Writers retry an operation after a 5xx or transport error (every operation here is safe to
//! retry) until it gets a definite answer or [`LoadConfig::op_deadline`] passes; the recorded
//! interval spans every attempt. An operation given up on is *unknown*: it may take effect at any
//! later time, so its writer never touches that key again, and the checkers accept either state.
//!
//! The checkers, each asserted by the suite:
//! - [`History::linearizability`]: each key's history, as a register (reads of a range count as
//!   one read of each key in it), is linearizable, decided by the search of [`crate::linearizable`].
//!   This is the claim the database makes for single-key operations; the checks below are weaker
//!   and stay because their messages name a violation more plainly.
//! - [`History::check_reads`]: no read returned a state older than the last write of its key
//!   acknowledged before it started, nor a value never written. Because each key has exactly one
//!   writer issuing one operation at a time, the writes of a key are totally ordered, and every
//!   value written is unique (`Stud_marks` encodes writer and version), so this check is exact.
//! - [`History::non_monotonic_reads`]: no read returned an older write than a read that ended
//!   before it started (a value seen by one client and then not by the next, as a read of a
//!   primary's unconfirmed state would show).
//! - [`History::rejected_writes`]: no write was refused in a way that contradicts the history.
//!
//! Pure bookkeeping apart from the HTTP calls in [`Load`].

use crate::linearizable::{self, Action, Operation, Verdict};
use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Microseconds since the load started, on a clock every task of the test shares.
pub type Micros = u64;

#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Micros {
        self.0.elapsed().as_micros() as Micros
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What a write asked for: the key's new `Stud_marks`, or its removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Put(i64),
    Delete,
}

impl Change {
    /// The state of the key once this change is applied (`None`: absent).
    pub fn state(self) -> Option<i64> {
        match self {
            Change::Put(v) => Some(v),
            Change::Delete => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A definite success.
    Acked,
    /// No definite answer before the deadline: it may or may not take effect.
    Unknown,
    /// A definite 4xx that contradicts the history (an update of a key that must exist answered
    /// 404, ...). Always a violation; the key is treated as unknown from then on.
    Rejected(String),
}

#[derive(Clone, Debug)]
pub struct WriteOp {
    pub key: i64,
    pub change: Change,
    pub start: Micros,
    pub end: Micros,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub struct ReadOp {
    pub low: i64,
    pub high: i64,
    pub start: Micros,
    pub end: Micros,
    /// The rows returned (`Stud_id` → `Stud_marks`); `None` when the read failed.
    pub rows: Option<BTreeMap<i64, i64>>,
}

/// Everything the load did.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub writes: Vec<WriteOp>,
    pub reads: Vec<ReadOp>,
    /// Every client-visible error (5xx or transport failure), with when it was seen and what.
    pub errors: Vec<(Micros, String)>,
    /// Every key any writer owned.
    pub keys: BTreeSet<i64>,
}

impl History {
    /// Each key's writes, in the order its writer issued them.
    fn writes_by_key(&self) -> BTreeMap<i64, Vec<&WriteOp>> {
        let mut by_key: BTreeMap<i64, Vec<&WriteOp>> = self.keys.iter().map(|k| (*k, Vec::new())).collect();
        for w in &self.writes {
            by_key.entry(w.key).or_default().push(w);
        }
        for ops in by_key.values_mut() {
            ops.sort_by_key(|w| w.start);
        }
        by_key
    }

    pub fn acked_writes(&self) -> usize {
        self.writes.iter().filter(|w| w.outcome == Outcome::Acked).count()
    }

    pub fn successful_reads(&self) -> usize {
        self.reads.iter().filter(|r| r.rows.is_some()).count()
    }

    /// Client-visible errors seen in `[from, to]` (microseconds on the load's clock).
    pub fn errors_between(&self, from: Micros, to: Micros) -> usize {
        self.errors.iter().filter(|(at, _)| (from..=to).contains(at)).count()
    }

    /// Writes answered in a way that contradicts the history.
    pub fn rejected_writes(&self) -> Vec<String> {
        self.writes
            .iter()
            .filter_map(|w| match &w.outcome {
                Outcome::Rejected(why) => Some(format!("key {} {:?}: {why}", w.key, w.change)),
                _ => None,
            })
            .collect()
    }

    /// The states each key may be in once the load has stopped: the last acknowledged write's
    /// state, and that of any write after it whose outcome is not known.
    pub fn final_states(&self) -> BTreeMap<i64, BTreeSet<Option<i64>>> {
        self.writes_by_key()
            .into_iter()
            .map(|(key, ops)| {
                let last_acked = ops.iter().rposition(|w| w.outcome == Outcome::Acked);
                let mut states = BTreeSet::new();
                states.insert(last_acked.and_then(|i| ops[i].change.state()));
                for w in &ops[last_acked.map_or(0, |i| i + 1)..] {
                    states.insert(w.change.state());
                }
                (key, states)
            })
            .collect()
    }

    /// Stale or invented reads. For every key a successful read covered, with `L` the last write
    /// of that key acknowledged before the read started, the read must show the state left by `L`
    /// (or the initial absence when there is none) or by a later write of the key that had started
    /// before the read ended. Rows for keys nobody wrote are invented. Each violation is described.
    pub fn check_reads(&self) -> Vec<String> {
        let by_key = self.writes_by_key();
        let mut violations = Vec::new();
        for read in &self.reads {
            let Some(rows) = &read.rows else { continue };
            for key in rows.keys() {
                if !self.keys.contains(key) {
                    violations
                        .push(format!("read [{}, {}] returned key {key}, which nobody wrote", read.low, read.high));
                }
            }
            for (key, ops) in by_key.range(read.low..=read.high) {
                let seen = rows.get(key).copied();
                let floor = ops.iter().rposition(|w| w.outcome == Outcome::Acked && w.end < read.start);
                let mut allowed: Vec<Option<i64>> = Vec::new();
                if floor.is_none() {
                    allowed.push(None);
                }
                for w in &ops[floor.unwrap_or(0)..] {
                    if w.start < read.end {
                        allowed.push(w.change.state());
                    }
                }
                if !allowed.contains(&seen) {
                    let latest = floor.map(|i| ops[i].change.state());
                    violations.push(format!(
                        "key {key}: a read during [{}, {}] µs returned {seen:?}, but {latest:?} was acknowledged \
                         before it started (allowed: {allowed:?})",
                        read.start, read.end
                    ));
                }
            }
        }
        violations
    }
}

impl History {
    /// Reads that went back in time relative to another client's read: read `A` ended before read
    /// `B` started, yet `B` returned an older write of the key than `A` did. Stronger than
    /// [`History::check_reads`]: it also catches a write seen before it was acknowledged and then
    /// not seen again (a value read from a primary before its replicas confirmed it). Only reads
    /// that returned a row are compared: a value names exactly one write, an absence does not.
    /// [`History::linearizability`] catches these too; this names them more plainly.
    pub fn non_monotonic_reads(&self) -> Vec<String> {
        let by_key = self.writes_by_key();
        let mut seen: BTreeMap<i64, Vec<(Micros, Micros, usize)>> = BTreeMap::new();
        for read in &self.reads {
            let Some(rows) = &read.rows else { continue };
            for (key, v) in rows {
                let Some(ops) = by_key.get(key) else { continue };
                if let Some(i) = ops.iter().position(|w| w.change == Change::Put(*v)) {
                    seen.entry(*key).or_default().push((read.start, read.end, i));
                }
            }
        }
        let mut violations = Vec::new();
        for (key, reads) in &mut seen {
            reads.sort_unstable();
            for b in reads.iter() {
                if let Some(a) = reads.iter().filter(|a| a.1 < b.0).max_by_key(|a| a.2)
                    && a.2 > b.2
                {
                    violations.push(format!(
                        "key {key}: a read during [{}, {}] µs saw write #{}, a later one during [{}, {}] µs the older #{}",
                        a.0, a.1, a.2, b.0, b.1, b.2
                    ));
                }
            }
        }
        violations
    }
}

/// Configurations the linearizability search may explore per key before it gives up (undecided,
/// which fails the check). The bound of [`crate::linearizable`] for a key with `n` operations and
/// the suite's three readers is `n · 32 · 6`: this covers about 50,000 operations on one key,
/// far more than a run makes, and caps the memory of one search at about 100 MiB.
pub const CONFIGURATIONS_PER_KEY: usize = 2_000_000;

/// What [`History::linearizability`] found.
#[derive(Clone, Debug, Default)]
pub struct Linearizability {
    pub keys: usize,
    pub operations: usize,
    /// Configurations explored, over all keys and at most for one key.
    pub explored: usize,
    pub explored_max: usize,
    /// The most operations of one key overlapping at one instant (`c` of the cost bound).
    pub overlap_max: usize,
    /// One description per key whose history is not linearizable, or could not be decided.
    pub violations: Vec<String>,
    /// Each violation's key and when the operation that could not take effect was called (for an
    /// undecided key, its first operation): which fault it happened under.
    pub violated_at: Vec<(i64, Micros)>,
    pub elapsed: Duration,
}

impl std::fmt::Display for Linearizability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} keys, {} operations: {} configurations explored (at most {} for one key; at most {} operations \
             of one key overlapping) in {} ms; {}",
            self.keys,
            self.operations,
            self.explored,
            self.explored_max,
            self.overlap_max,
            self.elapsed.as_millis(),
            if self.violations.is_empty() {
                "linearizable".to_owned()
            } else {
                format!("{} keys NOT linearizable", self.violations.len())
            }
        )
    }
}

impl History {
    /// Each key's operations as a register history: writes (an acknowledged one ends when it was
    /// acknowledged; one given up on, or refused against the history, has no end: it may take
    /// effect at any later time), and for every successful read covering the key, a read of the
    /// key's row (`None` when the read returned none). Failed reads are left out: they observed
    /// nothing. Keys nobody wrote are left out too ([`History::check_reads`] flags rows for them).
    pub fn register_histories(&self) -> BTreeMap<i64, Vec<Operation>> {
        let mut by_key: BTreeMap<i64, Vec<Operation>> = self.keys.iter().map(|k| (*k, Vec::new())).collect();
        for w in &self.writes {
            let ret = (w.outcome == Outcome::Acked).then_some(w.end);
            by_key.entry(w.key).or_default().push(Operation {
                action: Action::Write(w.change.state()),
                call: w.start,
                ret,
            });
        }
        for read in &self.reads {
            let Some(rows) = &read.rows else { continue };
            for (key, ops) in by_key.range_mut(read.low..=read.high) {
                ops.push(Operation {
                    action: Action::Read(rows.get(key).copied()),
                    call: read.start,
                    ret: Some(read.end),
                });
            }
        }
        by_key
    }

    /// Checks every key's register history for linearizability (see [`crate::linearizable`]);
    /// every key starts absent.
    pub fn linearizability(&self) -> Linearizability {
        self.linearizability_of(self.register_histories().into_iter().map(|(k, ops)| (k, None, ops)))
    }

    /// [`History::linearizability`] of what happened from `since` on: each key's operations that
    /// did not end before `since`, from the state its last write before then left. A key whose
    /// writes before `since` did not all end acknowledged (one may still take effect) has no
    /// known state there and is left out ([`Linearizability::keys`] says how many were checked).
    /// Reads are taken only when they started at or after `since`.
    pub fn linearizability_since(&self, since: Micros) -> Linearizability {
        let mut keys = Vec::new();
        for (key, writes) in self.writes_by_key() {
            let (before, after): (Vec<&WriteOp>, Vec<&WriteOp>) = writes.into_iter().partition(|w| w.end < since);
            if before.iter().any(|w| w.outcome != Outcome::Acked) {
                continue;
            }
            let initial = before.last().and_then(|w| w.change.state());
            let mut ops: Vec<Operation> = after
                .iter()
                .map(|w| Operation {
                    action: Action::Write(w.change.state()),
                    call: w.start.max(since),
                    ret: (w.outcome == Outcome::Acked).then_some(w.end),
                })
                .collect();
            for read in self.reads.iter().filter(|r| r.start >= since && (r.low..=r.high).contains(&key)) {
                let Some(rows) = &read.rows else { continue };
                ops.push(Operation {
                    action: Action::Read(rows.get(&key).copied()),
                    call: read.start,
                    ret: Some(read.end),
                });
            }
            keys.push((key, initial, ops));
        }
        self.linearizability_of(keys.into_iter())
    }

    fn linearizability_of(&self, keys: impl Iterator<Item = (i64, Option<i64>, Vec<Operation>)>) -> Linearizability {
        let started = Instant::now();
        let mut report = Linearizability::default();
        for (key, initial, ops) in keys {
            report.keys += 1;
            report.operations += ops.len();
            report.overlap_max = report.overlap_max.max(linearizable::max_overlap(&ops));
            let verdict = linearizable::check(initial, &ops, CONFIGURATIONS_PER_KEY);
            let explored = match &verdict {
                Verdict::Linearizable { explored }
                | Verdict::Violation { explored, .. }
                | Verdict::Undecided { explored } => *explored,
            };
            report.explored += explored;
            report.explored_max = report.explored_max.max(explored);
            match verdict {
                Verdict::Linearizable { .. } => {}
                Verdict::Violation { placed, stuck, value, .. } => {
                    let op = &ops[stuck];
                    report.violated_at.push((key, op.call));
                    let end = op.ret.map_or("no end".to_owned(), |r| format!("{r} µs"));
                    report.violations.push(format!(
                        "key {key}: not linearizable. At most {placed} of its {} operations can be linearized; \
                         then {:?} during [{} µs, {end}] cannot take effect in time (the key holds {value:?} there)",
                        ops.len(),
                        op.action,
                        op.call,
                    ));
                }
                Verdict::Undecided { explored } => {
                    report.violated_at.push((key, ops.iter().map(|o| o.call).min().unwrap_or(0)));
                    report.violations.push(format!(
                        "key {key}: undecided after exploring {explored} configurations of its {} operations",
                        ops.len()
                    ))
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }
}

impl History {
    /// The longest stretch of `[from, to]` in which no write of a key in `[low, high)` was
    /// acknowledged, and the longest in which no read covering such a key succeeded: how long that
    /// key range was unavailable to clients, as they saw it (in µs; a stretch is measured between
    /// the ends of successive successful operations, and from `from` and to `to`).
    pub fn longest_gaps(&self, low: i64, high: i64, from: Micros, to: Micros) -> (Micros, Micros) {
        fn gap(mut ends: Vec<Micros>, from: Micros, to: Micros) -> Micros {
            ends.retain(|e| (from..=to).contains(e));
            ends.extend([from, to]);
            ends.sort_unstable();
            ends.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
        }
        let writes = self
            .writes
            .iter()
            .filter(|w| w.outcome == Outcome::Acked && (low..high).contains(&w.key))
            .map(|w| w.end)
            .collect();
        let reads =
            self.reads.iter().filter(|r| r.rows.is_some() && r.low < high && r.high >= low).map(|r| r.end).collect();
        (gap(writes, from, to), gap(reads, from, to))
    }
}

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub writers: usize,
    pub readers: usize,
    pub keys_per_writer: usize,
    /// The keys are spread over `[first_key, first_key + key_space)`.
    pub first_key: i64,
    pub key_space: i64,
    /// How long a writer retries one operation before recording it as unknown.
    pub op_deadline: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            writers: 4,
            readers: 3,
            keys_per_writer: 40,
            first_key: 0,
            key_space: 16384,
            op_deadline: Duration::from_secs(45),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl LoadConfig {
    /// Writer `w`'s keys: spread evenly over the key space, disjoint between writers.
    pub fn keys_of(&self, w: usize) -> Vec<i64> {
        let total = (self.writers * self.keys_per_writer) as i64;
        let stride = (self.key_space / total).max(1);
        (0..self.keys_per_writer)
            .map(|i| self.first_key + ((i * self.writers + w) as i64 * stride) % self.key_space)
            .collect()
    }

    pub fn all_keys(&self) -> BTreeSet<i64> {
        (0..self.writers).flat_map(|w| self.keys_of(w)).collect()
    }
}

/// The recording shared by the load's tasks.
#[derive(Default)]
struct Recorder {
    writes: Mutex<Vec<WriteOp>>,
    reads: Mutex<Vec<ReadOp>>,
    errors: Mutex<Vec<(Micros, String)>>,
}

impl Recorder {
    fn error(&self, at: Micros, what: String) {
        self.errors.lock().expect("recorder lock").push((at, what));
    }
}

/// A running load against one router URL.
pub struct Load {
    config: LoadConfig,
    pub clock: Clock,
    stop: Arc<AtomicBool>,
    recorder: Arc<Recorder>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(router: &str, config: LoadConfig) -> Load {
        let clock = Clock::new();
        let stop = Arc::new(AtomicBool::new(false));
        let recorder = Arc::new(Recorder::default());
        let mut tasks = Vec::new();
        for w in 0..config.writers {
            let task = Writer {
                router: router.to_owned(),
                http: shard_server::api::http_client(config.request_timeout),
                id: w,
                keys: config.keys_of(w),
                config: config.clone(),
                clock,
                stop: stop.clone(),
                recorder: recorder.clone(),
            };
            tasks.push(tokio::spawn(task.run()));
        }
        let keys: Vec<i64> = config.all_keys().into_iter().collect();
        for r in 0..config.readers {
            let task = Reader {
                router: router.to_owned(),
                http: shard_server::api::http_client(config.request_timeout),
                keys: keys.clone(),
                seed: r as u64,
                clock,
                stop: stop.clone(),
                recorder: recorder.clone(),
            };
            tasks.push(tokio::spawn(task.run()));
        }
        Load { config, clock, stop, recorder, tasks }
    }

    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    /// Client-visible errors so far.
    pub fn errors(&self) -> usize {
        self.recorder.errors.lock().expect("recorder lock").len()
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> usize {
        self.recorder.writes.lock().expect("recorder lock").iter().filter(|w| w.outcome == Outcome::Acked).count()
    }

    /// Waits until `n` more writes have been acknowledged than now (or `limit` passes): proof the
    /// cluster serves writes again, without a fixed sleep.
    pub async fn progress(&self, n: usize, limit: Duration) -> bool {
        let target = self.acked() + n;
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.acked() >= target {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops every task after its current operation and returns what they did.
    pub async fn finish(self) -> Result<History> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.context("a load task panicked")?;
        }
        Ok(History {
            writes: take(&self.recorder.writes),
            reads: take(&self.recorder.reads),
            errors: take(&self.recorder.errors),
            keys: self.config.all_keys(),
        })
    }
}

fn take<T>(m: &Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(&mut *m.lock().expect("recorder lock"))
}

struct Writer {
    router: String,
    http: reqwest::Client,
    id: usize,
    keys: Vec<i64>,
    config: LoadConfig,
    clock: Clock,
    stop: Arc<AtomicBool>,
    recorder: Arc<Recorder>,
}

impl Writer {
    async fn run(self) {
        // What this writer knows of each key: `Some(state)`, or `None` once an outcome was unknown.
        let mut known: BTreeMap<i64, Option<Option<i64>>> = self.keys.iter().map(|k| (*k, Some(None))).collect();
        let mut version = 0i64;
        let mut i = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let usable: Vec<i64> = known.iter().filter(|(_, s)| s.is_some()).map(|(k, _)| *k).collect();
            if usable.is_empty() {
                return;
            }
            i += 1;
            let key = usable[(i * 7 + i / usable.len()) % usable.len()];
            let current = known[&key].expect("usable key");
            version += 1;
            let marks = (self.id as i64 + 1) * 1_000_000 + version;
            let row = json!({"Stud_id": key, "Stud_name": format!("w{}v{version}", self.id), "Stud_marks": marks});
            let (method, path, body, change) = match current {
                None => (Method::POST, "/write", json!({"data": [row]}), Change::Put(marks)),
                Some(_) if version % 4 == 0 => (Method::DELETE, "/del", json!({"Stud_id": key}), Change::Delete),
                Some(_) => (Method::PUT, "/update", json!({"Stud_id": key, "data": row}), Change::Put(marks)),
            };
            let start = self.clock.now();
            let outcome = self.until_definite(method, path, &body, change).await;
            let end = self.clock.now();
            let next = match &outcome {
                Outcome::Acked => Some(change.state()),
                Outcome::Unknown | Outcome::Rejected(_) => None,
            };
            known.insert(key, next);
            self.recorder.writes.lock().expect("recorder lock").push(WriteOp { key, change, start, end, outcome });
        }
    }

    /// Sends one operation until it gets a definite answer; retries are safe (an identical insert
    /// or update is a no-op success; a delete whose earlier attempt took effect answers 404).
    async fn until_definite(&self, method: Method, path: &str, body: &Value, change: Change) -> Outcome {
        let url = format!("{}{path}", self.router);
        let started = Instant::now();
        let mut uncertain = false;
        loop {
            let at = self.clock.now();
            match crate::send(&self.http, method.clone(), &url, &body.to_string()).await {
                Ok((200, _)) => return Outcome::Acked,
                Ok((404, _)) if change == Change::Delete && uncertain => return Outcome::Acked,
                Ok((st, resp)) if st < 500 => return Outcome::Rejected(format!("{method} {path} {body}: {st} {resp}")),
                Ok((st, resp)) => self.recorder.error(at, format!("{method} {path}: {st} {resp}")),
                Err(e) => self.recorder.error(at, format!("{method} {path}: {e:#}")),
            }
            uncertain = true;
            if started.elapsed() > self.config.op_deadline || self.stop.load(Ordering::Relaxed) {
                return Outcome::Unknown;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Reader {
    router: String,
    http: reqwest::Client,
    keys: Vec<i64>,
    seed: u64,
    clock: Clock,
    stop: Arc<AtomicBool>,
    recorder: Arc<Recorder>,
}

impl Reader {
    async fn run(self) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        while !self.stop.load(Ordering::Relaxed) {
            let a = self.keys[rng.random_range(0..self.keys.len())];
            // Mostly single keys; every fourth read a range spanning a few keys (and, near a shard
            // boundary, two shards).
            let (low, high) = if rng.random_range(0..4) == 0 { (a, a + 600) } else { (a, a) };
            let body = json!({"Stud_id": {"low": low, "high": high}}).to_string();
            let start = self.clock.now();
            let result = crate::send(&self.http, Method::POST, &format!("{}/read", self.router), &body).await;
            let end = self.clock.now();
            let rows = match result {
                Ok((200, v)) => match parse_rows(&v) {
                    Ok(rows) => Some(rows),
                    Err(e) => {
                        self.recorder.error(start, format!("read [{low}, {high}]: unreadable answer {v}: {e:#}"));
                        None
                    }
                },
                Ok((st, v)) => {
                    self.recorder.error(start, format!("read [{low}, {high}]: {st} {v}"));
                    None
                }
                Err(e) => {
                    self.recorder.error(start, format!("read [{low}, {high}]: {e:#}"));
                    None
                }
            };
            let failed = rows.is_none();
            self.recorder.reads.lock().expect("recorder lock").push(ReadOp { low, high, start, end, rows });
            if failed {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `Stud_id` → `Stud_marks` of a read's `data`.
pub fn parse_rows(body: &Value) -> Result<BTreeMap<i64, i64>> {
    body["data"]
        .as_array()
        .context("no data array")?
        .iter()
        .map(|r| {
            let id = r["Stud_id"].as_i64().context("Stud_id")?;
            let marks = r["Stud_marks"].as_i64().context("Stud_marks")?;
            Ok((id, marks))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: i64, change: Change, start: Micros, end: Micros, outcome: Outcome) -> WriteOp {
        WriteOp { key, change, start, end, outcome }
    }

    fn read(key: i64, start: Micros, end: Micros, seen: Option<i64>) -> ReadOp {
        ReadOp { low: key, high: key, start, end, rows: Some(seen.map(|v| (key, v)).into_iter().collect()) }
    }

    fn history(writes: Vec<WriteOp>, reads: Vec<ReadOp>) -> History {
        History { writes, reads, errors: Vec::new(), keys: [1, 2].into() }
    }

    /// Key 1: put 10 during [0, 10], put 20 during [20, 30], delete during [40, 50].
    fn three_writes() -> Vec<WriteOp> {
        vec![
            write(1, Change::Put(10), 0, 10, Outcome::Acked),
            write(1, Change::Put(20), 20, 30, Outcome::Acked),
            write(1, Change::Delete, 40, 50, Outcome::Acked),
        ]
    }

    #[test]
    fn reads_of_the_latest_acknowledged_or_a_concurrent_write_pass() {
        let reads = vec![
            read(1, 11, 15, Some(10)),
            read(1, 11, 25, Some(10)),
            read(1, 11, 25, Some(20)), // the write in flight may be visible
            read(1, 31, 35, Some(20)),
            read(1, 31, 45, None), // the delete in flight
            read(1, 51, 55, None),
            read(2, 0, 100, None), // nobody wrote key 2
        ];
        assert_eq!(history(three_writes(), reads).check_reads(), Vec::<String>::new());
    }

    #[test]
    fn a_read_older_than_an_acknowledged_write_is_stale() {
        for stale in [read(1, 31, 35, Some(10)), read(1, 51, 55, Some(20)), read(1, 11, 15, None)] {
            let v = history(three_writes(), vec![stale.clone()]).check_reads();
            assert_eq!(v.len(), 1, "{stale:?} passed");
        }
    }

    #[test]
    fn a_value_from_a_write_not_yet_started_or_never_written_is_invented() {
        let v = history(three_writes(), vec![read(1, 11, 15, Some(20)), read(1, 11, 15, Some(99))]).check_reads();
        assert_eq!(v.len(), 2);
        let v = history(three_writes(), vec![read(3, 0, 1, Some(1))]).check_reads();
        assert_eq!(v.len(), 1, "a row for a key nobody wrote");
    }

    #[test]
    fn an_unknown_write_may_or_may_not_be_visible() {
        let mut writes = three_writes();
        writes.push(write(1, Change::Put(30), 60, 70, Outcome::Unknown));
        let reads = vec![read(1, 80, 90, None), read(1, 80, 90, Some(30))];
        let h = history(writes, reads);
        assert_eq!(h.check_reads(), Vec::<String>::new());
        assert_eq!(h.final_states()[&1], [None, Some(30)].into());
        assert_eq!(h.final_states()[&2], [None].into());
    }

    #[test]
    fn range_reads_are_checked_per_key() {
        let r = ReadOp { low: 0, high: 5, start: 31, end: 35, rows: Some([(1, 20), (2, 7)].into()) };
        let v = history(three_writes(), vec![r]).check_reads();
        assert_eq!(v.len(), 1, "key 2 was never written: {v:?}");
        let r = ReadOp { low: 0, high: 5, start: 31, end: 35, rows: Some(BTreeMap::new()) };
        assert_eq!(history(three_writes(), vec![r]).check_reads().len(), 1, "key 1 missing from a range");
    }

    #[test]
    fn a_read_older_than_an_earlier_read_goes_back_in_time() {
        let mut writes = three_writes();
        writes[1].end = 100; // put 20 acknowledged late: both values are allowed for a while
        let ok = vec![read(1, 21, 25, Some(10)), read(1, 26, 28, Some(20)), read(1, 29, 31, Some(20))];
        assert_eq!(history(writes.clone(), ok).non_monotonic_reads(), Vec::<String>::new());
        let back = vec![read(1, 21, 25, Some(20)), read(1, 26, 28, Some(10))];
        let h = history(writes, back);
        assert_eq!(h.check_reads(), Vec::<String>::new(), "not stale: put 20 was not acknowledged yet");
        assert_eq!(h.non_monotonic_reads().len(), 1);
    }

    #[test]
    fn the_linearizability_check_splits_ranges_per_key_and_leaves_unknown_writes_open() {
        let mut writes = three_writes();
        writes.push(write(2, Change::Put(7), 0, 10, Outcome::Acked));
        writes.push(write(2, Change::Put(8), 20, 21, Outcome::Unknown));
        let range = |start, end, rows: &[(i64, i64)]| ReadOp {
            low: 0,
            high: 5,
            start,
            end,
            rows: Some(rows.iter().copied().collect()),
        };
        // Key 2's unknown write is not seen, then seen; key 1 follows its writes.
        let good = vec![range(11, 15, &[(1, 10), (2, 7)]), range(31, 35, &[(1, 20), (2, 7)]), range(60, 61, &[(2, 8)])];
        let h = history(writes.clone(), good);
        let report = h.linearizability();
        assert_eq!(report.violations, Vec::<String>::new());
        assert_eq!((report.keys, report.operations), (2, 11), "5 writes, 3 range reads of 2 keys");
        assert_eq!(h.register_histories()[&2][1].ret, None, "the unknown write has no end");

        // Key 2's unknown write seen, then not: only key 2 is reported.
        let bad = vec![range(31, 35, &[(1, 20), (2, 8)]), range(60, 61, &[(2, 7)])];
        let report = history(writes, bad).linearizability();
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert!(report.violations[0].starts_with("key 2: not linearizable"), "{}", report.violations[0]);
    }

    #[test]
    fn a_read_going_back_in_time_is_not_linearizable() {
        let mut writes = three_writes();
        writes[1].end = 100;
        let back = vec![read(1, 21, 25, Some(20)), read(1, 26, 28, Some(10))];
        assert_eq!(history(writes.clone(), back).linearizability().violations.len(), 1);
        let ok = vec![read(1, 21, 25, Some(10)), read(1, 26, 28, Some(20)), read(1, 29, 31, Some(20))];
        assert!(history(writes, ok).linearizability().violations.is_empty());
    }

    #[test]
    fn failed_reads_and_stale_reads() {
        let mut reads = vec![ReadOp { low: 1, high: 1, start: 31, end: 35, rows: None }];
        assert!(
            history(three_writes(), reads.clone()).linearizability().violations.is_empty(),
            "a failed read saw nothing"
        );
        reads.push(read(1, 51, 55, Some(20)));
        assert_eq!(history(three_writes(), reads).linearizability().violations.len(), 1, "stale after the delete");
    }

    #[test]
    fn gaps_are_measured_between_successes_of_the_range() {
        let mut writes = three_writes();
        writes.push(write(1, Change::Put(99), 60, 70, Outcome::Unknown));
        writes.push(write(9, Change::Put(5), 60, 65, Outcome::Acked));
        let reads = vec![
            read(1, 0, 12, Some(10)),
            ReadOp { low: 1, high: 1, start: 20, end: 25, rows: None },
            read(2, 0, 90, None),
        ];
        let h = history(writes, reads);
        // Acked writes of key 1 end at 10, 30, 50; the window is [0, 100]. Reads in the range end at
        // 12 and 90 (the failed one does not count).
        assert_eq!(h.longest_gaps(0, 5, 0, 100), (50, 78));
        // Key 9 is outside the range; inside [20, 40] the only acknowledgement is at 30.
        assert_eq!(h.longest_gaps(0, 5, 20, 40), (10, 20));
        assert_eq!(h.longest_gaps(9, 10, 0, 100), (65, 100));
    }

    #[test]
    fn keys_are_spread_and_disjoint() {
        let c = LoadConfig::default();
        let all: Vec<i64> = (0..c.writers).flat_map(|w| c.keys_of(w)).collect();
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len());
        assert!(all.iter().all(|k| (0..c.key_space).contains(k)));
        assert!(all.iter().any(|k| *k >= 12288), "the last shard gets keys too");
    }
}
