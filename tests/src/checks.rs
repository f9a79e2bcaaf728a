//! What the local-mode suites check and wait for, shared by them: the published topology, the
//! local mode's `events.log`, "every copy ready", and the checker of a recorded load against the
//! copies every server holds. Does I/O (files, HTTP).

use crate::LocalCluster;
use crate::load::{History, Micros, parse_rows};
use anyhow::{Context, Result, bail, ensure};
use reqwest::Method;
use serde_json::json;
use shard_server::api::ShardClient;
use shard_server::topology::{ReplicaState, Topology};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Bounds on waits; generous, since a shared 2-core machine can be slow. Never timing assertions.
pub const EVENT_LIMIT: Duration = Duration::from_secs(45);
pub const HEAL_LIMIT: Duration = Duration::from_secs(90);

/// The topology the local mode published.
pub fn topology(c: &LocalCluster) -> Result<Topology> {
    let file = c.cluster_file()?;
    Ok(Topology::parse(&std::fs::read(&file.topology)?)?)
}

/// One line of the local mode's `events.log`.
#[derive(Debug, serde::Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub event: String,
    pub shard: String,
    pub server: String,
    #[serde(default)]
    pub detail: String,
}

pub fn events(dir: &Path) -> Vec<Event> {
    std::fs::read_to_string(dir.join("events.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn events_text(c: &LocalCluster) -> String {
    std::fs::read_to_string(c.dir.path().join("events.log")).unwrap_or_default()
}

/// Calls `check` every `every` until it yields a value, for at most `limit`; `None` when it did
/// not. An error from `check` ends the wait at once.
pub async fn poll<T, F, Fut>(limit: Duration, every: Duration, mut check: F) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(found) = check().await? {
            return Ok(Some(found));
        }
        tokio::time::sleep(every).await;
    }
    Ok(None)
}

/// Waits until every copy of every shard is `ready` and every server follows that topology.
pub async fn all_ready(c: &LocalCluster) -> Result<()> {
    let ready = poll(HEAL_LIMIT, Duration::from_millis(100), || async {
        let t = topology(c)?;
        if !t.shards.iter().all(|s| s.replicas.values().all(|r| *r == ReplicaState::Ready)) {
            return Ok(None);
        }
        for s in t.servers.values() {
            let st = ShardClient::new(c.http.clone(), s.url.clone()).status(false).await;
            if !st.is_ok_and(|st| st.epoch >= t.epoch) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    });
    ready.await?.with_context(|| format!("not every copy ready within {HEAL_LIMIT:?}; events.log:\n{}", events_text(c)))
}

/// Writes one row per key (`Stud_marks` = key mod 97) through the router in one batch, and
/// returns the rows as the checker's base (key → marks).
pub async fn write_rows(c: &LocalCluster, keys: impl IntoIterator<Item = i64>) -> Result<BTreeMap<i64, i64>> {
    let mut base = BTreeMap::new();
    let rows: Vec<_> = keys
        .into_iter()
        .map(|k| {
            base.insert(k, k % 97);
            json!({"Stud_id": k, "Stud_name": format!("n{k}"), "Stud_marks": k % 97})
        })
        .collect();
    let (st, resp) = c.send(Method::POST, "/write", &json!({ "data": rows }).to_string()).await?;
    ensure!(st == 200, "writing {} rows: {st} {resp}", base.len());
    Ok(base)
}

/// Waits until the operator has recorded the identity of every copy of every shard. A copy wiped
/// before its identity was recorded cannot be told from a fresh one: the healer does not demote
/// it, and it refills itself from its primary's log instead of being recovered (which is correct,
/// but not the path a wipe test means to exercise). Wipe tests wait for this first.
pub async fn all_recorded(c: &LocalCluster) -> Result<()> {
    let recorded = poll(HEAL_LIMIT, Duration::from_millis(100), || async {
        let t = topology(c)?;
        Ok(t.shards.iter().all(|s| s.replicas.keys().all(|server| s.copies.contains_key(server))).then_some(()))
    });
    recorded
        .await?
        .with_context(|| format!("not every copy recorded within {HEAL_LIMIT:?}; events.log:\n{}", events_text(c)))
}

/// The checker.
/// - Every key's history is linearizable ([`History::linearizability`]); no read was stale or
///   invented, none went back in time relative to an earlier read, and no write was answered in a
///   way that contradicts the history (see the documentation of `tests::load`).
/// - Every copy of every shard (all are expected `ready` by now) holds exactly the acknowledged
///   state of every key: `base` (rows loaded before the load ran, untouched by it) and the last
///   acknowledged write of each key the load wrote (or a later write of unknown outcome).
/// - The copies of a shard are identical, and `/status` reports equal row counts, checksums and
///   sequence numbers for them.
///
/// Every failure here counts as a safety finding, which a retry of the test cannot clear
/// (see `tests::safety`).
pub async fn check(c: &LocalCluster, h: &History, base: &BTreeMap<i64, i64>) -> Result<()> {
    check_history_and_copies(c, h, base, None).await.map_err(crate::safety::violation)
}

/// [`check`] for a run in which processes of the previous release served clients until `since`
/// (µs of the load's clock): that release does not promise linearizable reads (a replica showed
/// an entry before its primary's acknowledgement), so linearizability and the order of reads are
/// checked from `since` on ([`History::linearizability_since`]); everything else the previous
/// release did promise (no stale read of an acknowledged write, no lost write, identical copies)
/// is checked over the whole run.
pub async fn check_since(c: &LocalCluster, h: &History, base: &BTreeMap<i64, i64>, since: Micros) -> Result<()> {
    check_history_and_copies(c, h, base, Some(since)).await.map_err(crate::safety::violation)
}

pub async fn check_history_and_copies(
    c: &LocalCluster,
    h: &History,
    base: &BTreeMap<i64, i64>,
    since: Option<Micros>,
) -> Result<()> {
    let (linearizability, back) = match since {
        None => (h.linearizability(), h.non_monotonic_reads()),
        Some(since) => {
            let mut later = h.clone();
            later.reads.retain(|r| r.start >= since);
            (h.linearizability_since(since), later.non_monotonic_reads())
        }
    };
    match since {
        None => println!("linearizability: {linearizability}"),
        Some(since) => println!("linearizability from {since} µs on: {linearizability}"),
    }
    let mut violations = h.rejected_writes();
    violations.extend(h.check_reads());
    violations.extend(back);
    violations.extend(linearizability.violations.iter().cloned());
    if !violations.is_empty() {
        let shown: Vec<&String> = violations.iter().take(20).collect();
        bail!("{} violations in the history, the first ones:\n{shown:#?}", violations.len());
    }
    let finals = h.final_states();
    let t = topology(c)?;
    for shard in &t.shards {
        ensure!(
            shard.replicas.values().all(|s| *s == ReplicaState::Ready),
            "{} is not fully ready: {:?}",
            shard.id,
            shard.replicas
        );
        let mut copies: BTreeMap<&str, BTreeMap<i64, i64>> = BTreeMap::new();
        let mut stats = BTreeMap::new();
        for server in shard.ready_replicas() {
            let url = &t.servers[server].url;
            let req = json!({"shard": shard.id, "Stud_id": {"low": shard.low, "high": shard.high_exclusive() - 1}});
            // A copy that has just become ready serves reads once its first read lease arrives.
            let started = Instant::now();
            let (st, body) = loop {
                let (st, body) = crate::send(&c.http, Method::POST, &format!("{url}/read"), &req.to_string()).await?;
                if st != 503 || body["code"] != "not_ready" || started.elapsed() > EVENT_LIMIT {
                    break (st, body);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            ensure!(st == 200, "{server} {}: {st} {body}", shard.id);
            let got = parse_rows(&body)?;
            for (key, states) in finals.range(shard.low..shard.high_exclusive()) {
                let has = got.get(key).copied();
                ensure!(
                    states.contains(&has),
                    "{server}'s copy of {}: key {key} is {has:?}, but the acknowledged state is one of {states:?}",
                    shard.id
                );
            }
            for (key, v) in base.range(shard.low..shard.high_exclusive()) {
                ensure!(got.get(key) == Some(v), "{server}'s copy of {}: loaded row {key} is missing", shard.id);
            }
            let strays: Vec<&i64> = got.keys().filter(|k| !finals.contains_key(k) && !base.contains_key(k)).collect();
            ensure!(strays.is_empty(), "{server}'s copy of {} holds keys nobody wrote: {strays:?}", shard.id);
            let status = ShardClient::new(c.http.clone(), url.clone()).status(true).await?;
            let s = status.shards.get(&shard.id).context("shard in status")?;
            stats.insert(server, (s.applied_seq, s.rows, s.checksum.clone()));
            copies.insert(server, got);
        }
        let distinct: BTreeSet<_> = copies.values().collect();
        ensure!(distinct.len() == 1, "the copies of {} differ", shard.id);
        let distinct: BTreeSet<_> = stats.values().collect();
        ensure!(distinct.len() == 1, "the copies of {} report different states: {stats:?}", shard.id);
    }
    let from = since.map_or(String::new(), |since| format!(" from {since} µs on"));
    println!(
        "checked: {} acknowledged writes, {} successful reads, {} client-visible errors; linearizable{from}, no \
         stale read, no lost write, every copy identical",
        h.acked_writes(),
        h.successful_reads(),
        h.errors.len()
    );
    Ok(())
}
