//! Fault injection under load, in local mode: real processes, real Postgres. Writers each own a
//! key space and record every operation with its outcome; faults are injected while they run
//! (through the local mode's `control/` requests, or signals); a checker then asserts that every
//! acknowledged write is on every ready replica, that no read returned an older value than one
//! acknowledged before it started, and that all replicas converge. Heal and failover times and
//! client-visible errors are printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use reqwest::Method;
use serde_json::{Value, json};
use shard_server::api::ShardClient;
use shard_server::topology::{ReplicaState, Topology};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tests::LocalCluster;

const WRITERS: i64 = 4;
const KEYS_PER_WRITER: i64 = 40;
/// How long one operation may be retried before the writer gives up on the test.
const OP_DEADLINE: Duration = Duration::from_secs(60);
const HEAL_LIMIT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Writer `w`'s keys: spread over every shard (0..16384), disjoint between writers.
fn keys_of(w: i64) -> Vec<i64> {
    (0..KEYS_PER_WRITER).map(|i| (i * 409 + w * 97) % 16384).collect()
}

/// The value a writer last had acknowledged for each of its keys: `Some(marks)` or absent.
type Model = BTreeMap<i64, Option<i64>>;

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    /// Attempts that failed in a way a client sees (5xx, transport errors); each was retried.
    errors: AtomicU64,
    reads: AtomicU64,
}

struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    writers: Vec<tokio::task::JoinHandle<Result<Model>>>,
}

impl Load {
    fn start(router: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let writers =
            (0..WRITERS).map(|w| tokio::spawn(writer(router.to_owned(), w, stop.clone(), counters.clone()))).collect();
        Load { stop, counters, writers }
    }

    fn errors(&self) -> u64 {
        self.counters.errors.load(Ordering::Relaxed)
    }

    async fn finish(self) -> Result<(Model, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Model::new();
        for w in self.writers {
            all.extend(w.await??);
        }
        let acked = self.counters.acked.load(Ordering::Relaxed);
        let reads = self.counters.reads.load(Ordering::Relaxed);
        let errors = self.counters.errors.load(Ordering::Relaxed);
        println!("load: {acked} acknowledged writes, {reads} checked reads, {errors} client-visible errors");
        ensure!(acked > 20, "the load made too little progress ({acked} writes) to prove anything");
        Ok((all, acked))
    }
}

/// Sends `body` until it gets a definite answer; returns the status and body. 5xx and transport
/// errors are counted and retried: every write here is safe to retry.
async fn definite(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: &Value,
    c: &Counters,
) -> Result<(u16, Value)> {
    let start = Instant::now();
    loop {
        match tests::send(http, method.clone(), url, &body.to_string()).await {
            Ok((st, v)) if st < 500 => return Ok((st, v)),
            Ok(_) | Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                if start.elapsed() > OP_DEADLINE {
                    bail!("{method} {url} {body}: no definite answer within {OP_DEADLINE:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes, updates and deletes its own keys, and after every acknowledged change reads a key of
/// its own back: with no other writer on it, the read must return exactly the last acknowledged
/// value (anything else is a stale or invented read).
async fn writer(router: String, w: i64, stop: Arc<AtomicBool>, c: Arc<Counters>) -> Result<Model> {
    let http = shard_server::api::http_client(Duration::from_secs(15));
    let keys = keys_of(w);
    let mut model: Model = keys.iter().map(|k| (*k, None)).collect();
    let mut version = 0i64;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let k = keys[(i * 7 + (i / KEYS_PER_WRITER as usize)) % keys.len()];
        version += 1;
        let row = json!({"Stud_id": k, "Stud_name": format!("w{w}v{version}"), "Stud_marks": version});
        let (value, ok) = match model[&k] {
            None => {
                let (st, body) =
                    definite(&http, Method::POST, &format!("{router}/write"), &json!({"data": [row]}), &c).await?;
                (Some(version), (st == 200).then_some(()).with_context(|| format!("write {k}: {st} {body}")))
            }
            Some(_) if version % 4 == 0 => {
                let (st, body) =
                    definite(&http, Method::DELETE, &format!("{router}/del"), &json!({"Stud_id": k}), &c).await?;
                // 404: an earlier attempt already deleted it (deletes are retried blindly).
                (None, (st == 200 || st == 404).then_some(()).with_context(|| format!("delete {k}: {st} {body}")))
            }
            Some(_) => {
                let body = json!({"Stud_id": k, "data": row});
                let (st, resp) = definite(&http, Method::PUT, &format!("{router}/update"), &body, &c).await?;
                (Some(version), (st == 200).then_some(()).with_context(|| format!("update {k}: {st} {resp}")))
            }
        };
        ok?;
        model.insert(k, value);
        c.acked.fetch_add(1, Ordering::Relaxed);

        let r = keys[(i * 13) % keys.len()];
        let (st, body) =
            definite(&http, Method::POST, &format!("{router}/read"), &json!({"Stud_id": {"low": r, "high": r}}), &c)
                .await?;
        ensure!(st == 200, "read {r}: {st} {body}");
        let got = body["data"].as_array().context("read data")?.first().map(|row| row["Stud_marks"].as_i64());
        let want = model[&r].map(Some);
        ensure!(got == want, "key {r}: a read returned {got:?} after {want:?} was acknowledged");
        c.reads.fetch_add(1, Ordering::Relaxed);
    }
    Ok(model)
}

fn topology(c: &LocalCluster) -> Result<Topology> {
    let file = c.cluster_file()?;
    Ok(Topology::parse(&std::fs::read(&file.topology)?)?)
}

/// Asks the local mode for a fault (or its repair) and waits until it is carried out.
async fn control(c: &LocalCluster, verb: &str, server: &str) -> Result<()> {
    let dir = c.dir.path().join("control");
    let path = dir.join(format!("{verb}.{server}"));
    std::fs::write(&path, b"")?;
    LocalCluster::eventually(&format!("control {verb} {server}"), Duration::from_secs(30), || {
        let gone = !path.exists();
        async move { gone }
    })
    .await
}

#[derive(Debug, serde::Deserialize)]
struct Event {
    at_ms: u64,
    event: String,
    shard: String,
    server: String,
}

fn events(dir: &Path) -> Vec<Event> {
    std::fs::read_to_string(dir.join("events.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Milliseconds from `since` to the first `event` on `server` after it.
fn took(c: &LocalCluster, since: u64, event: &str, server: &str) -> Option<u64> {
    events(c.dir.path())
        .iter()
        .find(|e| e.at_ms >= since && e.event == event && e.server == server)
        .map(|e| e.at_ms - since)
}

/// Waits until every copy of every shard is `ready` again.
async fn all_ready(c: &LocalCluster) -> Result<()> {
    LocalCluster::eventually("every copy ready", HEAL_LIMIT, || {
        let t = topology(c);
        async move { t.is_ok_and(|t| t.shards.iter().all(|s| s.replicas.values().all(|r| *r == ReplicaState::Ready))) }
    })
    .await
}

/// The first server holding a shard other than as its primary, and the primary of that shard.
fn a_replica_and_a_primary(t: &Topology) -> (String, String) {
    let sh = &t.shards[0];
    let replica = sh.replicas.keys().find(|r| **r != sh.primary).expect("a shard with two copies").clone();
    (replica, sh.primary.clone())
}

/// The checker: every ready copy holds exactly the acknowledged rows of its shard, and every copy
/// of a shard reports the same checksum.
async fn check(c: &LocalCluster, model: &Model) -> Result<()> {
    let t = topology(c)?;
    for shard in &t.shards {
        let want: BTreeMap<i64, i64> =
            model.iter().filter(|(k, _)| shard.contains(**k)).filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
        let mut sums = BTreeMap::new();
        for server in shard.ready_replicas() {
            let url = &t.servers[server].url;
            let req = json!({"shard": shard.id, "Stud_id": {"low": shard.low, "high": shard.high_exclusive() - 1}});
            let (st, body) = tests::send(&c.http, Method::POST, &format!("{url}/read"), &req.to_string()).await?;
            ensure!(st == 200, "{server} {}: {st} {body}", shard.id);
            let got: BTreeMap<i64, i64> = body["data"]
                .as_array()
                .context("data")?
                .iter()
                .map(|r| (r["Stud_id"].as_i64().unwrap(), r["Stud_marks"].as_i64().unwrap()))
                .collect();
            ensure!(got == want, "{server}'s copy of {} differs from the acknowledged writes", shard.id);
            let status = ShardClient::new(c.http.clone(), url.clone()).status(true).await?;
            let s = status.shards.get(&shard.id).context("shard in status")?;
            sums.insert(server.to_owned(), (s.applied_seq, s.checksum.clone()));
        }
        let distinct: std::collections::BTreeSet<_> = sums.values().map(|(_, c)| c.clone()).collect();
        ensure!(distinct.len() == 1, "copies of {} disagree: {sums:?}", shard.id);
    }
    Ok(())
}

fn report(fault: &str, what: &str, ms: Option<u64>, errors: u64) {
    let time = ms.map_or("not observed".to_owned(), |ms| format!("{ms} ms"));
    println!("FAULT {fault}: {what} {time}; client-visible errors during it: {errors}");
}

#[tokio::test]
async fn replica_faults_heal_under_load() -> Result<()> {
    let c = LocalCluster::students()?;
    let (replica, _) = a_replica_and_a_primary(&topology(&c)?);
    let load = Load::start(&c.router);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL: the supervisor restarts it at once with its data; nothing needs healing.
    let e0 = load.errors();
    let pid = c.cluster_file()?.servers.iter().find(|s| s.name == replica).and_then(|s| s.pid).context("pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    report("SIGKILL replica", "restarted by the supervisor", None, load.errors() - e0);

    // Its Postgres stops: demoted once past the timeout, recovered once Postgres is back.
    let e0 = load.errors();
    let t0 = now_ms();
    control(&c, "stop-postgres", &replica).await?;
    LocalCluster::eventually("demotion", Duration::from_secs(30), || {
        let d = took(&c, t0, "demote", &replica).is_some();
        async move { d }
    })
    .await?;
    let t1 = now_ms();
    control(&c, "start-postgres", &replica).await?;
    all_ready(&c).await?;
    report("stop replica Postgres", "demoted after", took(&c, t0, "demote", &replica), 0);
    report(
        "stop replica Postgres",
        "healed (Postgres back → ready) in",
        took(&c, t1, "ready", &replica),
        load.errors() - e0,
    );

    // Its volume is lost: it stays down until demoted, then comes back empty and is refilled.
    let e0 = load.errors();
    let t0 = now_ms();
    control(&c, "wipe", &replica).await?;
    LocalCluster::eventually("demotion", Duration::from_secs(30), || {
        let d = took(&c, t0, "demote", &replica).is_some();
        async move { d }
    })
    .await?;
    let t1 = now_ms();
    control(&c, "start", &replica).await?;
    all_ready(&c).await?;
    report("wipe replica", "healed (restart → ready) in", took(&c, t1, "ready", &replica), load.errors() - e0);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (model, _) = load.finish().await?;
    check(&c, &model).await
}

#[tokio::test]
async fn a_lost_primary_fails_over_under_load() -> Result<()> {
    let c = LocalCluster::students()?;
    let (_, primary) = a_replica_and_a_primary(&topology(&c)?);
    let load = Load::start(&c.router);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL and kept down: another copy takes over; once back, the old primary is refilled.
    let e0 = load.errors();
    let t0 = now_ms();
    control(&c, "kill", &primary).await?;
    LocalCluster::eventually("failover", Duration::from_secs(30), || {
        let d = events(c.dir.path()).iter().any(|e| e.at_ms >= t0 && e.event == "promote" && e.shard == "sh1");
        async move { d }
    })
    .await?;
    let promoted = topology(&c)?.shards[0].primary.clone();
    ensure!(promoted != primary, "sh1 still has its dead primary");
    report("SIGKILL primary", "failover in", took(&c, t0, "promote", &promoted), load.errors() - e0);
    let e0 = load.errors();
    let t1 = now_ms();
    control(&c, "start", &primary).await?;
    all_ready(&c).await?;
    report(
        "SIGKILL primary",
        "old primary healed (restart → ready) in",
        took(&c, t1, "ready", &primary),
        load.errors() - e0,
    );

    // A primary killed and restarted at once by the supervisor keeps its role.
    let e0 = load.errors();
    let pid = c.cluster_file()?.servers.iter().find(|s| s.name == promoted).and_then(|s| s.pid).context("pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    report("SIGKILL primary, restarted at once", "no failover needed", None, load.errors() - e0);

    // The router dies: the supervisor restarts it; clients see errors meanwhile.
    let e0 = load.errors();
    let pid = c.cluster_file()?.router.pid.context("router pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    report("SIGKILL router", "restarted by the supervisor", None, load.errors() - e0);

    all_ready(&c).await?;
    let (model, _) = load.finish().await?;
    check(&c, &model).await
}

/// The seed's own fault test: a server is killed; it comes back with its shards copied from the
/// other replicas, and the router's `/status` still shows every server.
#[tokio::test]
async fn a_killed_server_comes_back_with_its_shards() -> Result<()> {
    let c = LocalCluster::students()?;
    let (_, n_before) = c.send(Method::GET, "/status", "").await?;
    let victim = "Server2";
    let mut model = Model::new();
    let http = shard_server::api::http_client(Duration::from_secs(15));
    let counters = Counters::default();
    for k in (0..16384).step_by(64) {
        let body = json!({"data": [{"Stud_id": k, "Stud_name": format!("n{k}"), "Stud_marks": k % 97}]});
        let (st, resp) = definite(&http, Method::POST, &c.url("/write"), &body, &counters).await?;
        ensure!(st == 200, "{resp}");
        model.insert(k, Some(k % 97));
    }
    let t0 = now_ms();
    control(&c, "wipe", victim).await?;
    control(&c, "start", victim).await?;
    let held: Vec<String> = topology(&c)?.shards_of(victim).map(|(s, _)| s.id.clone()).collect();
    ensure!(!held.is_empty(), "{victim} holds no shard");
    // Each of its copies is noticed empty, then refilled from the other replicas.
    LocalCluster::eventually("every copy of the wiped server recovered", HEAL_LIMIT, || {
        let ev = events(c.dir.path());
        let recovered = |sh: &String| {
            ev.iter().any(|e| e.at_ms >= t0 && e.event == "ready" && e.server == victim && e.shard == *sh)
        };
        let done = held.iter().all(recovered);
        async move { done }
    })
    .await?;
    all_ready(&c).await?;
    report(
        "wipe a server (seed test)",
        "back to every copy ready in",
        Some(now_ms() - t0),
        counters.errors.into_inner(),
    );
    let (_, n_after) = c.send(Method::GET, "/status", "").await?;
    assert_eq!(n_after["N"], n_before["N"], "the router still shows every server");
    assert_eq!(n_after["servers"][victim], n_before["servers"][victim], "with the same shards");
    check(&c, &model).await
}
