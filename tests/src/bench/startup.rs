//! The two workloads about a cluster's life rather than its steady state: the cold start (writes
//! sent the moment a new cluster answers, each timed from when it was sent) and the heal (a copy of
//! a large shard wiped, its server started again, and the operator's recover timed, beside the
//! snapshot stream alone). Does I/O.

use crate::LocalCluster;
use crate::bench::client::{self, Router};
use crate::bench::layout::Layout;
use crate::bench::report::{ColdStart, HealResult, Report};
use crate::bench::specs::Shape;
use crate::bench::workloads::Ctx;
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde::Deserialize;
use shard_server::api::RecoverResponse;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Distinct keys the cold start may write (far more than a few seconds take).
const COLD_KEYS: usize = 200_000;
/// How long the cold start's writes are sent for.
const COLD_WINDOW: Duration = Duration::from_secs(5);
const COLD_WINDOW_QUICK: Duration = Duration::from_secs(2);
/// Rows per request when loading a shard to heal.
const HEAL_LOAD_ROWS: usize = 5_000;
/// How long a wipe, a demotion or a heal may take before the workload gives up.
const HEAL_LIMIT: Duration = Duration::from_secs(600);

/// One write of the cold start: when it was sent (after the cluster answered), how long it took,
/// and its error.
struct Sent {
    at: Duration,
    took: Duration,
    error: Option<String>,
}

impl Ctx {
    /// Starts a fresh A-1 cluster and writes new keys at full concurrency from the moment it
    /// answers, for a few seconds.
    pub(super) async fn cold(&mut self, report: &mut Report) -> Result<()> {
        if !self.local() {
            report.notes.push("cold skipped: it starts its own cluster, which only the local mode can".into());
            return Ok(());
        }
        let shape = Shape::a1().with_capacity(COLD_KEYS);
        let dir = tempfile::Builder::new().prefix("sharddb-bench-spec-").tempdir()?;
        let spec = dir.path().join("cold.yaml");
        std::fs::write(&spec, shape.yaml())?;
        // Every request is ready before the cluster starts, so the first is sent the moment it
        // answers: distinct keys taken from each shard in turn.
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            (0..COLD_KEYS as i64)
                .map(|i| {
                    let shards = shape.shards as i64;
                    client::write_body(&[(i % shards) * shape.shard_size + i / shards])
                })
                .collect(),
        );
        let args = self.local_args();
        let launched = Instant::now();
        let cluster = tokio::task::spawn_blocking(move || LocalCluster::start_with(&spec, &args))
            .await
            .context("starting the local cluster")??;
        let ready = Instant::now();
        let start_s = (ready - launched).as_secs_f64();
        let result = async {
            let router = Router::new(self.http.clone(), &cluster.router)?;
            let window = if self.opts.quick { COLD_WINDOW_QUICK } else { COLD_WINDOW };
            let sent = send_for(&router, bodies, ready, window, self.opts.concurrency).await;
            let layout = Layout::from_cluster(&cluster.cluster_file()?)?;
            let skipped =
                layout.servers.values().filter_map(|s| s.pid).map(|pid| cmdline(pid).contains(" --no-predecessor"));
            let skipped: Vec<bool> = skipped.collect();
            let mut c = cold_start(&sent, window);
            c.cluster = shape.describe();
            c.start_s = start_s;
            c.lease_wait_skipped = (!skipped.is_empty()).then(|| skipped.iter().all(|s| *s));
            anyhow::Ok(c)
        }
        .await;
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
        report.cold_start = Some(result?);
        Ok(())
    }

    /// For each size: a cluster of one shard on two servers, loaded, streamed once, then its
    /// replica wiped and healed by the operator.
    pub(super) async fn heal(&mut self, report: &mut Report) -> Result<()> {
        if !self.local() {
            report.notes.push("heal skipped: it wipes a server, which only the local mode can".into());
            return Ok(());
        }
        for rows in self.opts.heal_rows.clone() {
            eprintln!("bench: heal of {rows} rows");
            let shape = Shape::heal(rows.max(1));
            let t = self.open("heal", Some(shape.clone())).await?;
            let mut notes = Vec::new();
            let result = self.heal_once(&t, rows.max(1), &mut notes).await;
            let closed = t.close().await;
            report.notes.extend(notes);
            let mut h =
                result.unwrap_or_else(|e| HealResult { error: Some(format!("{e:#}")), ..HealResult::default() });
            h.rows = rows as u64;
            h.cluster = shape.describe();
            report.heals.push(h);
            let (memory, warnings) = closed?;
            report.memory.extend(memory);
            report.log_warnings.extend(warnings);
        }
        Ok(())
    }

    async fn heal_once(
        &self,
        t: &crate::bench::target::Target,
        rows: usize,
        notes: &mut Vec<String>,
    ) -> Result<HealResult> {
        let shard = t.layout.shards[0].clone();
        let keys: Vec<i64> = (shard.low..).take(rows).collect();
        let loaded = self.load_in(t, &keys, HEAL_LOAD_ROWS, false, "heal", notes).await?;
        notes.push(format!(
            "heal of {rows} rows: loaded through the router in batches of {HEAL_LOAD_ROWS} at {:.0} rows/s",
            rows as f64 / loaded.elapsed.as_secs_f64()
        ));
        let primary = t.layout.servers[&shard.replicas[0]].url.clone().context("primary has no URL")?;
        // With the cluster's own credentials: a shard server serves its snapshot to its peers only.
        let http = t.server_http().context("a local cluster")?;
        let stream = client::snapshot(http, &primary, &shard.id).await.context("streaming the snapshot")?;
        ensure!(stream.rows == rows as u64, "the snapshot streamed {} rows, {rows} were loaded", stream.rows);
        let replica = shard.replicas.get(1).context("the shard has no replica to wipe")?.clone();
        let dir = t.cluster_dir().context("a local cluster")?;

        let wiped = unix_ms();
        control(dir, "wipe", &replica).await?;
        wait_event(dir, wiped, |e| e.event == "demote" && e.server == replica)
            .await
            .context("the wiped copy's demotion")?;
        let started = unix_ms();
        control(dir, "start", &replica).await?;
        let ready = wait_event(dir, started, |e| e.event == "ready" && e.server == replica && e.recover.is_some())
            .await
            .context("the wiped copy's heal")?;
        let recovered = ready.recover.context("a ready event without its recover")?;
        let r = &recovered.response;
        ensure!(
            r.snapshot_rows == rows as u64 && r.rows == rows as i64,
            "the heal installed {} rows and verified {}, {rows} were loaded",
            r.snapshot_rows,
            r.rows
        );
        let recover_s = recovered.took_ms as f64 / 1000.0;
        Ok(HealResult {
            stream_rows_per_s: Some(stream.rows as f64 / stream.elapsed.as_secs_f64().max(1e-9)),
            recover_s: Some(recover_s),
            heal_rows_per_s: Some(rows as f64 / recover_s.max(1e-3)),
            restart_to_ready_s: Some(ready.at_ms.saturating_sub(started) as f64 / 1000.0),
            timings: r.timings.clone(),
            ..HealResult::default()
        })
    }
}

/// Sends the write `bodies` in turn at `concurrency` until `window` has passed since `since` (or
/// they run out), timing each.
async fn send_for(
    router: &Router,
    bodies: Arc<Vec<Bytes>>,
    since: Instant,
    window: Duration,
    concurrency: usize,
) -> Vec<Sent> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (router, bodies, next) = (router.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                while since.elapsed() < window {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let at = since.elapsed();
                    let clock = Instant::now();
                    let error = router.write(body.clone()).await.err().map(|e| format!("{e:#}"));
                    sent.push(Sent { at, took: clock.elapsed(), error });
                }
                sent
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(s) => all.extend(s),
            Err(e) => all.push(Sent { at: Duration::ZERO, took: Duration::ZERO, error: Some(format!("task: {e}")) }),
        }
    }
    all
}

/// What the cold start's writes show. Pure.
fn cold_start(sent: &[Sent], window: Duration) -> ColdStart {
    let ok: Vec<&Sent> = sent.iter().filter(|s| s.error.is_none()).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let quantiles = |xs: &[&Sent]| {
        let mut l: Vec<f64> = xs.iter().map(|s| ms(s.took)).collect();
        l.sort_by(f64::total_cmp);
        let q = |q: f64| (!l.is_empty()).then(|| l[((l.len() - 1) as f64 * q).round() as usize]);
        (q(0.5), q(0.99), l.last().copied())
    };
    let (p50, p99, max) = quantiles(&ok);
    let first: Vec<&Sent> = ok.iter().copied().filter(|s| s.at < Duration::from_secs(1)).collect();
    let (f50, f99, _) = quantiles(&first);
    ColdStart {
        window_s: window.as_secs_f64(),
        ops: sent.len() as u64,
        errors: (sent.len() - ok.len()) as u64,
        error_samples: sent.iter().filter_map(|s| s.error.clone()).take(3).collect(),
        first_ack_ms: ok.iter().map(|s| ms(s.at + s.took)).min_by(f64::total_cmp),
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        first_second_ops: sent.iter().filter(|s| s.at < Duration::from_secs(1)).count() as u64,
        first_second_p50_ms: f50,
        first_second_p99_ms: f99,
        ..ColdStart::default()
    }
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One line of the local mode's `events.log` (see `operator::local::healer`).
#[derive(Debug, Deserialize)]
struct Event {
    at_ms: u64,
    event: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    recover: Option<Recovered>,
}

#[derive(Debug, Deserialize)]
struct Recovered {
    took_ms: u64,
    response: RecoverResponse,
}

/// Asks the local mode's healer for a fault verb and waits until it has carried it out.
async fn control(dir: &Path, verb: &str, server: &str) -> Result<()> {
    let path = dir.join("control").join(format!("{verb}.{server}"));
    std::fs::write(&path, b"")?;
    let start = Instant::now();
    while path.exists() {
        if start.elapsed() > HEAL_LIMIT {
            bail!("control {verb} {server} not carried out within {HEAL_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The first event at or after `since` (unix ms) that `matches`.
async fn wait_event(dir: &Path, since: u64, matches: impl Fn(&Event) -> bool) -> Result<Event> {
    let start = Instant::now();
    while start.elapsed() < HEAL_LIMIT {
        let text = std::fs::read_to_string(dir.join("events.log")).unwrap_or_default();
        let found =
            text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()).find(|e| e.at_ms >= since && matches(e));
        if let Some(e) = found {
            return Ok(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "no such event within {HEAL_LIMIT:?}; events.log:\n{}",
        std::fs::read_to_string(dir.join("events.log")).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(at_ms: u64, took_ms: u64, ok: bool) -> Sent {
        Sent {
            at: Duration::from_millis(at_ms),
            took: Duration::from_millis(took_ms),
            error: (!ok).then(|| "503".to_owned()),
        }
    }

    #[test]
    fn the_cold_start_is_read_from_when_writes_were_sent() {
        let all =
            [sent(0, 1900, true), sent(5, 1890, true), sent(10, 30, false), sent(1500, 10, true), sent(1600, 12, true)];
        let c = cold_start(&all, Duration::from_secs(2));
        assert_eq!((c.ops, c.errors, c.first_second_ops), (5, 1, 3));
        assert_eq!(c.first_ack_ms, Some(1510.0));
        assert_eq!(c.max_ms, Some(1900.0));
        assert_eq!(c.first_second_p50_ms, Some(1900.0));
        assert_eq!(c.error_samples, ["503"]);
        let none = cold_start(&[], Duration::from_secs(1));
        assert_eq!((none.first_ack_ms, none.p99_ms), (None, None));
    }

    #[test]
    fn heal_events_carry_the_recover() {
        let line = r#"{"at_ms":5,"event":"ready","shard":"heal1","server":"Server1","epoch":4,"detail":"x",
            "recover":{"took_ms":420,"response":{"snapshot_seq":3,"snapshot_rows":100,"verified_seq":3,"rows":100,
            "checksum":"7","timings":{"prepare_us":1,"copy_us":2,"stream_wait_us":0,"parse_us":0,"copy_wait_us":0,
            "index_us":0,"verify_us":0,"commit_us":0,"catch_up_us":0,"cache_us":0,"total_us":9}}}}"#;
        let e: Event = serde_json::from_str(&line.replace('\n', "")).unwrap();
        let r = e.recover.unwrap();
        assert_eq!((r.took_ms, r.response.rows, r.response.timings.unwrap().total_us), (420, 100, 9));
        let plain: Event = serde_json::from_str(r#"{"at_ms":1,"event":"demote","server":"Server1"}"#).unwrap();
        assert!(plain.recover.is_none());
    }
}
