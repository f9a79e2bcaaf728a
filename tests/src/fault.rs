//! The fault-injection suites' fixtures (`tests/tests/faults.rs`, `tests/tests/partitions.rs`):
//! waiting on the local mode's events and heals, injecting process faults, the report of measured
//! figures and the windows of unavailability per fault; the checker they end with is in `checks`.
//! Does I/O (HTTP, files of the data directory, signals).

use crate::LocalCluster;
use crate::checks::{EVENT_LIMIT, Event, HEAL_LIMIT, all_ready, check, events, events_text, poll, topology};
use crate::load::{History, Load, Micros};
use anyhow::{Context, Result, ensure};
use shard_server::topology::{ShardEntry, Topology};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Acknowledged writes that prove the cluster serves writes again after a fault.
pub const PROGRESS: usize = 10;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Asks the local mode for a fault (or its repair) and waits until it is carried out.
pub async fn control(c: &LocalCluster, verb: &str, server: &str) -> Result<()> {
    let path = c.dir.path().join("control").join(format!("{verb}.{server}"));
    std::fs::write(&path, b"")?;
    LocalCluster::eventually(&format!("control {verb} {server}"), EVENT_LIMIT, || {
        let gone = !path.exists();
        async move { gone }
    })
    .await
}

/// The first event since `since` (unix ms) that `matches`.
pub fn first_event(c: &LocalCluster, since: u64, matches: impl Fn(&Event) -> bool) -> Option<Event> {
    events(c.dir.path()).into_iter().find(|e| e.at_ms >= since && matches(e))
}

/// Waits for the first event since `since` that `matches`; returns it.
pub async fn wait_event(c: &LocalCluster, what: &str, since: u64, matches: impl Fn(&Event) -> bool) -> Result<Event> {
    let found = poll(EVENT_LIMIT, Duration::from_millis(50), || async { Ok(first_event(c, since, &matches)) });
    found
        .await?
        .with_context(|| format!("{what}: no such event within {EVENT_LIMIT:?}; events.log:\n{}", events_text(c)))
}

pub fn pid_of(c: &LocalCluster, name: &str) -> Result<Option<u32>> {
    let file = c.cluster_file()?;
    if name == "router" {
        return Ok(file.router.pid);
    }
    Ok(file.servers.iter().find(|s| s.name == name).context("no such server")?.pid)
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
    Ok(())
}

pub fn sigkill(pid: u32) -> Result<()> {
    signal(pid, nix::sys::signal::Signal::SIGKILL)
}

/// SIGKILLs a process the supervisor keeps running and waits until its replacement answers its
/// health check; returns how long that took.
pub async fn kill_and_wait_restart(c: &LocalCluster, name: &str) -> Result<u64> {
    let old = pid_of(c, name)?.context("process not running")?;
    let url = if name == "router" {
        c.url("/healthz")
    } else {
        let t = topology(c)?;
        format!("{}/heartbeat", t.servers[name].url)
    };
    let t0 = now_ms();
    sigkill(old)?;
    let restarted = poll(EVENT_LIMIT, Duration::from_millis(50), || async {
        let new = pid_of(c, name)?.is_some_and(|pid| pid != old);
        Ok((new && c.http.get(&url).send().await.is_ok_and(|r| r.status().is_success())).then(|| now_ms() - t0))
    });
    restarted.await?.with_context(|| format!("{name} was not restarted within {EVENT_LIMIT:?}"))
}

/// The `n`-th shard's first non-primary copy, and its primary.
pub fn replica_and_primary(t: &Topology, n: usize) -> (String, String) {
    let sh = &t.shards[n % t.shards.len()];
    let replica = sh.replicas.keys().find(|r| **r != sh.primary).expect("a shard with two copies").clone();
    (replica, sh.primary.clone())
}

/// One line of the report.
pub struct Measured {
    pub fault: String,
    pub what: &'static str,
    pub ms: Option<u64>,
    pub errors: usize,
}

#[derive(Default)]
pub struct Report(Vec<Measured>);

impl Report {
    pub fn add(&mut self, fault: impl Into<String>, what: &'static str, ms: Option<u64>, errors: usize) {
        self.0.push(Measured { fault: fault.into(), what, ms, errors });
    }

    pub fn print(&self, title: &str) {
        println!("\n{title}");
        println!("{:<44} {:<40} {:>10} {:>14}", "fault", "measured", "ms", "client errors");
        for m in &self.0 {
            let ms = m.ms.map_or("-".to_owned(), |ms| ms.to_string());
            println!("{:<44} {:<40} {:>10} {:>14}", m.fault, m.what, ms, m.errors);
        }
        println!("(targets: failover under 10000 ms; heal of a 100,000-row shard under 30000 ms)\n");
    }
}

/// Stops the load, checks it made progress, and runs the checker.
pub async fn finish(c: &LocalCluster, load: Load, base: &BTreeMap<i64, i64>) -> Result<()> {
    finish_with_history(c, load, base).await.map(drop)
}

/// [`finish`], returning the history it checked.
pub async fn finish_with_history(c: &LocalCluster, load: Load, base: &BTreeMap<i64, i64>) -> Result<History> {
    let h = stop_load(c, load).await?;
    check(c, &h, base).await?;
    Ok(h)
}

/// Waits until every copy is ready, stops the load and checks it made enough progress to prove
/// anything; returns its history, for [`check`].
pub async fn stop_load(c: &LocalCluster, load: Load) -> Result<History> {
    all_ready(c).await?;
    let h = load.finish().await?;
    ensure!(h.acked_writes() > 50, "the load made too little progress ({} writes) to prove anything", h.acked_writes());
    ensure!(h.successful_reads() > 50, "too few successful reads ({}) to prove anything", h.successful_reads());
    Ok(h)
}

/// One injected fault, from its start until the cluster was whole again (on the load's clock),
/// and the key range it was aimed at.
#[derive(Clone, Debug)]
pub struct Window {
    pub fault: String,
    pub shard: String,
    pub low: i64,
    pub high: i64,
    pub from: Micros,
    pub to: Micros,
    /// Client-visible errors the load saw meanwhile (all shards).
    pub errors: usize,
}

/// A fault's window, opened when it is injected.
pub struct Opened {
    fault: String,
    shard: String,
    low: i64,
    high: i64,
    from: Micros,
    errors: usize,
}

/// Opens the window of `fault`, aimed at `shard`, now.
pub fn open_window(load: &Load, fault: impl Into<String>, shard: &ShardEntry) -> Opened {
    Opened {
        fault: fault.into(),
        shard: shard.id.clone(),
        low: shard.low,
        high: shard.high_exclusive(),
        from: load.now(),
        errors: load.errors(),
    }
}

impl Opened {
    /// Closes the window now (once the cluster is whole again).
    pub fn close(self, load: &Load) -> Window {
        Window {
            fault: self.fault,
            shard: self.shard,
            low: self.low,
            high: self.high,
            from: self.from,
            to: load.now(),
            errors: load.errors() - self.errors,
        }
    }
}

/// The `n`-th shard (round robin).
pub fn nth_shard(t: &Topology, n: usize) -> ShardEntry {
    t.shards[n % t.shards.len()].clone()
}

/// Stops the load, prints the table of `windows` (see [`windows_table`]) and runs the checker.
pub async fn finish_with_windows(
    c: &LocalCluster,
    load: Load,
    base: &BTreeMap<i64, i64>,
    title: &str,
    windows: &[Window],
) -> Result<()> {
    let h = stop_load(c, load).await?;
    println!("\n{title}\n{}", windows_table(&h, windows));
    check(c, &h, base).await
}

/// The report of a run's faults as a Markdown table: per fault, the client-visible errors, the
/// longest stretch without an acknowledged write and without a successful read of the shard it
/// was aimed at, and the checker's verdict on the operations called while it lasted (the whole
/// run's history is checked; a violation is attributed to the fault under which the operation
/// that could not take effect was called). Measured figures, never asserted.
pub fn windows_table(h: &History, windows: &[Window]) -> String {
    let lin = h.linearizability();
    let mut out = String::from(
        "| fault | shard | client-visible errors | longest write gap (ms) | longest read gap (ms) | checker |\n\
         |---|---|---|---|---|---|\n",
    );
    for w in windows {
        let (writes, reads) = h.longest_gaps(w.low, w.high, w.from, w.to);
        let bad = lin.violated_at.iter().filter(|(_, at)| (w.from..=w.to).contains(at)).count();
        let verdict = if bad == 0 { "linearizable".to_owned() } else { format!("{bad} keys NOT linearizable") };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {verdict} |\n",
            w.fault,
            w.shard,
            w.errors,
            writes / 1000,
            reads / 1000
        ));
    }
    out
}

/// Waits until the load has made progress again (writes acknowledged) after a fault.
pub async fn progress(load: &Load) -> Result<()> {
    ensure!(load.progress(PROGRESS, HEAL_LIMIT).await, "no write acknowledged within {HEAL_LIMIT:?} after a fault");
    Ok(())
}

/// Waits until the topology satisfies `done` and every copy is ready and followed.
pub async fn settled(c: &LocalCluster, what: &str, done: impl Fn(&Topology) -> bool) -> Result<()> {
    let reached = poll(HEAL_LIMIT, Duration::from_millis(100), || async {
        Ok(topology(c).is_ok_and(|t| done(&t)).then_some(()))
    });
    reached.await?.with_context(|| format!("{what}: not within {HEAL_LIMIT:?}; events.log:\n{}", events_text(c)))?;
    all_ready(c).await
}
