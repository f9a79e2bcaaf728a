//! Each workload's steps: start (or reach) the system, prepare keys and request bodies, run the
//! router phase and then the baseline phase under the same load (each after an untimed warm-up),
//! measure plain Postgres doing the same (`anchor`), and record the rows. The cold start and the
//! heal are in `startup`. Does I/O.

use crate::bench::anchor::{self, Anchor};
use crate::bench::baseline::Baseline;
use crate::bench::client;
use crate::bench::client::Expect;
use crate::bench::layout::Layout;
use crate::bench::load::{LoadOutcome, drive};
use crate::bench::procstat::CpuUsage;
use crate::bench::report::{Report, ResultRow, Side};
use crate::bench::specs::Shape;
use crate::bench::target::Target;
use crate::bench::{Options, Variant, Workload};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Rows per request in the batch workload.
const BATCH_ROWS: usize = 100;
/// Rows per request when loading data before a timed phase.
const LOAD_ROWS: usize = 500;
/// Tries per request when loading (set-up, not measured).
const LOAD_ATTEMPTS: u32 = 8;
/// Load requests in flight at once.
const LOAD_CONCURRENCY: usize = 4;
/// Snapshot streams timed in the copy workload (the median is reported).
const COPY_RUNS: usize = 3;

pub struct Ctx {
    pub(super) opts: Options,
    pub(super) http: reqwest::Client,
    pub postgres_version: Option<String>,
    /// Plain Postgres, started when a workload first needs it (`None` once closed or failed).
    anchor: Option<Anchor>,
    /// Why the anchor could not be measured, once it failed: later workloads go without.
    anchor_failed: Option<String>,
    /// The variant the workloads now run under (`--variant`), if any.
    variant: Option<Variant>,
}

impl Ctx {
    pub fn new(opts: Options) -> Ctx {
        Ctx {
            opts,
            http: shard_server::api::http_client(Duration::from_secs(120)),
            postgres_version: None,
            anchor: None,
            anchor_failed: None,
            variant: None,
        }
    }

    pub(super) fn local(&self) -> bool {
        self.opts.router.is_none()
    }

    /// Flags for the local clusters: `--local-arg`s, then the current variant's.
    pub(super) fn local_args(&self) -> Vec<String> {
        let mut args = self.opts.local_args.clone();
        args.extend(self.variant.iter().flat_map(|v| v.args.iter().cloned()));
        args
    }

    /// Runs A-1 again under `v` and tags its rows with the variant's name.
    pub async fn variant(&mut self, v: &Variant, report: &mut Report) -> Result<()> {
        let (rows, memory) = (report.results.len(), report.memory.len());
        self.variant = Some(v.clone());
        let shape = Shape::a1().with_capacity(self.opts.ops + self.opts.warmup);
        let done = self.seed(Some(shape), "a1", report).await;
        self.variant = None;
        for row in &mut report.results[rows..] {
            row.workload = format!("{}@{}", row.workload, v.name);
            row.title = format!("{} [{}]", row.title, v.name);
            row.variant = Some(v.name.clone());
        }
        for m in &mut report.memory[memory..] {
            m.workload = format!("{}@{}", m.workload, v.name);
        }
        done
    }

    /// Plain Postgres's figures for `kind` (measured once per kind, at the workloads'
    /// concurrency), added to `row`; a failure is noted once and later rows go without.
    pub(super) async fn anchored(
        &mut self,
        row: ResultRow,
        kind: anchor::Kind,
        (warmup, ops): (usize, usize),
        notes: &mut Vec<String>,
    ) -> ResultRow {
        if !self.opts.anchor || self.anchor_failed.is_some() {
            return row;
        }
        let concurrency = self.opts.concurrency;
        let anchor = self.anchor.take();
        let measured = tokio::task::spawn_blocking(move || {
            let mut anchor = match anchor {
                Some(a) => a,
                None => Anchor::start(concurrency)?,
            };
            let m = anchor.measure(kind, ops, warmup);
            anyhow::Ok((anchor, m))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match measured {
            Ok((anchor, Ok(m))) => {
                if self.postgres_version.is_none() {
                    self.postgres_version = anchor.postgres_version.clone();
                }
                self.anchor = Some(anchor);
                row.with_anchor(&m)
            }
            Ok((anchor, Err(e))) => {
                self.anchor = Some(anchor);
                self.anchor_failed = Some(format!("{e:#}"));
                notes.push(format!("plain Postgres ({}) could not be measured: {e:#}", kind.describe()));
                row
            }
            Err(e) => {
                self.anchor_failed = Some(format!("{e:#}"));
                notes.push(format!("plain Postgres could not be started: {e:#}"));
                row
            }
        }
    }

    /// Stops the plain Postgres.
    pub fn close_anchor(&mut self) {
        self.anchor = None;
    }

    pub async fn run(&mut self, w: Workload, report: &mut Report) -> Result<()> {
        let o = self.opts.clone();
        let keys = o.ops + o.warmup;
        match w {
            Workload::A1 | Workload::A2 | Workload::A3 if !self.local() => self.seed(None, "seed", report).await,
            Workload::A1 => self.seed(Some(Shape::a1().with_capacity(keys)), "a1", report).await,
            Workload::A2 => self.seed(Some(Shape::a2().with_capacity(keys)), "a2", report).await,
            Workload::A3 => self.seed(Some(Shape::a3().with_capacity(keys)), "a3", report).await,
            Workload::Batch => self.batch(report).await,
            Workload::Range => self.range(report).await,
            Workload::Mixed => self.mixed(report).await,
            Workload::Copy => self.copy(report).await,
            Workload::Heal => self.heal(report).await,
            Workload::Cold => self.cold(report).await,
        }
    }

    /// Starts a local cluster of `shape` (or reaches the given router) and the baseline over it.
    pub(super) async fn open(&mut self, workload: &str, shape: Option<Shape>) -> Result<Target> {
        let t = Target::open(&self.opts, &self.local_args(), &self.http, workload, shape).await?;
        if self.postgres_version.is_none()
            && let Some(b) = &t.baseline
        {
            self.postgres_version = b.postgres_version().await;
        }
        Ok(t)
    }

    /// Runs `op` on the router side and then `base` on the baseline side, with CPU accounted per
    /// side. Operations `0..warm` are the warm-up (untimed, each retried until it succeeds), then
    /// `warm..warm + n` are timed; the sides' failed indexes count from the first timed one.
    async fn phases<R, RF, B, BF>(
        &self,
        t: &Target,
        (warm, n): (usize, usize),
        concurrency: usize,
        op: R,
        base: B,
    ) -> Result<(Side, Option<Side>)>
    where
        R: Fn(usize) -> RF + Send + Sync + 'static,
        RF: Future<Output = Result<()>> + Send + 'static,
        B: Fn(Arc<Baseline>, usize) -> BF + Send + Sync + 'static,
        BF: Future<Output = Result<()>> + Send + 'static,
    {
        let op = Arc::new(op);
        let warm_op = op.clone();
        warm_up(warm, concurrency, move |i| warm_op(i)).await.context("warming up")?;
        let router = measure(&t.layout, drive(n, concurrency, move |i| op(warm + i))).await;
        let baseline = match &t.baseline {
            Some(b) => {
                b.warm(concurrency).await?;
                let base = Arc::new(base);
                let (b1, base1) = (b.clone(), base.clone());
                warm_up(warm, concurrency, move |i| base1(b1.clone(), i)).await.context("warming up the baseline")?;
                let b = b.clone();
                Some(measure(&t.layout, drive(n, concurrency, move |i| base(b.clone(), warm + i))).await)
            }
            None => None,
        };
        let (mut router, mut baseline) =
            (Side::from_load(&router.0, router.1), baseline.map(|(o, c)| Side::from_load(&o, c)));
        router.warmup = warm as u64;
        if let Some(b) = &mut baseline {
            b.warmup = warm as u64;
        }
        Ok((router, baseline))
    }

    /// The seed's benchmark: `ops` single-row writes, then `ops` single-key reads of those keys,
    /// each phase after `warmup` untimed operations of its kind (writes of other new keys).
    pub(super) async fn seed(&mut self, shape: Option<Shape>, id: &str, report: &mut Report) -> Result<()> {
        let label = shape.as_ref().map_or_else(|| "Seed".to_owned(), |s| s.name.clone());
        let t = self.open(id, shape).await?;
        let (n, warm) = (self.opts.ops, self.opts.warmup);
        let result = async {
            let mut rng = StdRng::seed_from_u64(1);
            let keys = Arc::new(spread_keys(&t.layout, warm + n, &mut rng)?);
            let shard_of: Arc<Vec<usize>> = Arc::new(keys.iter().map(|k| t.layout.shard_of(*k).unwrap_or(0)).collect());

            let bodies: Arc<Vec<Bytes>> = Arc::new(keys.iter().map(|k| client::write_body(&[*k])).collect());
            let r = t.router.clone();
            let (ks, ss) = (keys.clone(), shard_of.clone());
            let (router, baseline) = self
                .phases(
                    &t,
                    (warm, n),
                    self.opts.concurrency,
                    move |i| {
                        let (r, b) = (r.clone(), bodies[i].clone());
                        async move { r.write(b).await }
                    },
                    move |b, i| {
                        let (k, s) = (ks[i], ss[i]);
                        async move { b.write(s, &[k]).await }
                    },
                )
                .await?;
            let repaired = self
                .repair(&t, &keys[warm..], &shard_of[warm..], &router.failed, baseline.as_ref().map(|b| &b.failed))
                .await?;
            let mut write = ResultRow::new(
                &format!("{id}-write"),
                &format!("{label} single-row writes"),
                &t.cluster_name,
                1.0,
                router,
                baseline,
            );
            if repaired > 0 {
                write.notes.push(format!("{repaired} failed writes were redone, untimed, before the read phase"));
            }

            let mut order: Vec<i64> = keys.to_vec();
            order.shuffle(&mut rng);
            let order = Arc::new(order);
            let bodies: Arc<Vec<Bytes>> = Arc::new(order.iter().map(|k| client::read_body(*k, *k)).collect());
            let r = t.router.clone();
            let (o1, o2) = (order.clone(), order.clone());
            let (router, baseline) = self
                .phases(
                    &t,
                    (warm, n),
                    self.opts.concurrency,
                    move |i| {
                        let (r, b, k) = (r.clone(), bodies[i].clone(), o1[i]);
                        async move { r.read(b, Expect::full(k, k)).await }
                    },
                    move |b, i| {
                        let k = o2[i];
                        async move { b.read(k, k, i, Expect::full(k, k)).await }
                    },
                )
                .await?;
            let read = ResultRow::new(
                &format!("{id}-read"),
                &format!("{label} single-key reads"),
                &t.cluster_name,
                1.0,
                router,
                baseline,
            );
            let mut rows = vec![write, read];
            // The floor under every router workload: the same load generator and concurrency
            // against an endpoint the router answers from memory. No shard server, no Postgres:
            // what HTTP alone costs on this machine, so the other rows can be read against it.
            if id == "a1" && self.variant.is_none() {
                let r = t.router.clone();
                let floor = measure(
                    &t.layout,
                    drive(n, self.opts.concurrency, move |_| {
                        let r = r.clone();
                        async move { r.healthz().await }
                    }),
                )
                .await;
                let mut row = ResultRow::new(
                    "http-floor",
                    "HTTP floor: GET /healthz (router only)",
                    &t.cluster_name,
                    0.0,
                    Side::from_load(&floor.0, floor.1),
                    None,
                );
                row.notes.push(
                    "the router answers from memory: no shard server, no Postgres; an upper bound for any workload \
                     through the router with this load generator"
                        .into(),
                );
                rows.push(row);
            }
            anyhow::Ok(rows)
        }
        .await;
        let result = match result {
            Ok(mut rows) if rows.len() >= 2 => {
                let read = rows.remove(1);
                let write = rows.remove(0);
                let write = self.anchored(write, anchor::Kind::Insert, (warm, n), &mut report.notes).await;
                let read = self.anchored(read, anchor::Kind::Select, (warm, n), &mut report.notes).await;
                rows.splice(0..0, [write, read]);
                Ok(rows)
            }
            other => other,
        };
        self.finish(t, result, report).await
    }

    /// Redoes the failed writes of a phase (untimed, retried) so the read phase finds every key.
    async fn repair(
        &self,
        t: &Target,
        keys: &[i64],
        shard_of: &[usize],
        router_failed: &[usize],
        baseline_failed: Option<&Vec<usize>>,
    ) -> Result<usize> {
        for &i in router_failed {
            retried(|| t.router.write(client::write_body(&[keys[i]]))).await.context("redoing a failed write")?;
        }
        if let (Some(b), Some(failed)) = (&t.baseline, baseline_failed) {
            for &i in failed {
                retried(|| b.write(shard_of[i], std::slice::from_ref(&keys[i])))
                    .await
                    .context("redoing a failed baseline write")?;
            }
        }
        Ok(router_failed.len() + baseline_failed.map_or(0, Vec::len))
    }

    /// Batches of 100 consecutive keys, each batch inside one shard, shards taken in turn.
    async fn batch(&mut self, report: &mut Report) -> Result<()> {
        let (warm, batches) = (self.opts.warmup / 10, (self.opts.ops / 10).max(1));
        let total = warm + batches;
        let shape = Shape::a1();
        let per_shard = total.div_ceil(shape.shards) as i64;
        let shape = shape.with_min_shard_size(per_shard * BATCH_ROWS as i64);
        let t = self.open("batch", self.local().then_some(shape)).await?;
        let result = async {
            let shards = &t.layout.shards;
            let mut plan = Vec::with_capacity(total);
            for i in 0..total {
                let (s, j) = (i % shards.len(), (i / shards.len()) as i64);
                let low = shards[s].low + j * BATCH_ROWS as i64;
                ensure!(
                    low + BATCH_ROWS as i64 <= shards[s].high_exclusive(),
                    "shard {} is too small for {total} batches of {BATCH_ROWS}",
                    shards[s].id
                );
                plan.push((s, (low..low + BATCH_ROWS as i64).collect::<Vec<i64>>()));
            }
            let plan = Arc::new(plan);
            let bodies: Arc<Vec<Bytes>> = Arc::new(plan.iter().map(|(_, k)| client::write_body(k)).collect());
            let r = t.router.clone();
            let p = plan.clone();
            let (router, baseline) = self
                .phases(
                    &t,
                    (warm, batches),
                    self.opts.concurrency,
                    move |i| {
                        let (r, b) = (r.clone(), bodies[i].clone());
                        async move { r.write(b).await }
                    },
                    move |b, i| {
                        let p = p.clone();
                        async move { b.write(p[i].0, &p[i].1).await }
                    },
                )
                .await?;
            let mut row = ResultRow::new(
                "batch-write",
                &format!("Batch writes ({BATCH_ROWS} rows, one shard each)"),
                &t.cluster_name,
                BATCH_ROWS as f64,
                router,
                baseline,
            );
            row.notes.push(format!("{batches} requests of {BATCH_ROWS} consecutive keys; ops are requests"));
            anyhow::Ok(row)
        }
        .await;
        let result = match result {
            Ok(row) => Ok(vec![self.anchored(row, anchor::Kind::Insert100, (warm, batches), &mut report.notes).await]),
            Err(e) => Err(e),
        };
        self.finish(t, result, report).await
    }

    /// Range reads of 100 keys inside one shard, then ranges that cross three shards (the middle
    /// one whole), over fully populated shards.
    async fn range(&mut self, report: &mut Report) -> Result<()> {
        let t = self.open("range", self.local().then(Shape::a1)).await?;
        let result = async {
            ensure!(t.layout.key_space() <= 2_000_000, "range fills every shard; this key space is too large");
            let keys: Vec<i64> = t.layout.all_keys().collect();
            self.load(&t, &keys, true, "range", &mut report.notes).await?;
            let shards = Arc::new(t.layout.shards.clone());
            let mut rng = StdRng::seed_from_u64(2);
            let mut rows = Vec::new();

            let (warm1, n1) = (self.opts.warmup, self.opts.ops);
            let ranges: Vec<(i64, i64)> = (0..warm1 + n1)
                .map(|i| {
                    let sh = &shards[i % shards.len()];
                    let low = sh.low + rng.random_range(0..=(sh.size - 100).max(0));
                    (low, (low + 99).min(sh.high_exclusive() - 1))
                })
                .collect();
            rows.push(
                self.range_phase(&t, "range-1-shard", "Range reads, 1 shard (100 keys)", (warm1, n1), ranges).await?,
            );

            if shards.len() >= 3 {
                let (warm3, n3) = (self.opts.warmup / 20, (self.opts.ops / 20).max(10));
                let ranges: Vec<(i64, i64)> = (0..warm3 + n3)
                    .map(|i| {
                        let j = i % (shards.len() - 2);
                        let low = shards[j].high_exclusive() - rng.random_range(1..=100.min(shards[j].size));
                        let high = shards[j + 2].low + rng.random_range(1..=100.min(shards[j + 2].size)) - 1;
                        (low, high)
                    })
                    .collect();
                let title = "Range reads across 3 shards (~4,200 keys)";
                rows.push(self.range_phase(&t, "range-3-shards", title, (warm3, n3), ranges).await?);
            } else {
                report.notes.push("range-3-shards skipped: fewer than 3 shards".into());
            }
            anyhow::Ok(rows)
        }
        .await;
        let result = match result {
            Ok(rows) => {
                let mut anchored = Vec::new();
                for row in rows {
                    let span = row.rows_per_op.round().max(1.0) as i64;
                    let (warm, n) = (row.warmup_ops as usize, row.ops as usize);
                    let kind = anchor::Kind::Range { span };
                    anchored.push(self.anchored(row, kind, (warm, n), &mut report.notes).await);
                }
                Ok(anchored)
            }
            Err(e) => Err(e),
        };
        self.finish(t, result, report).await
    }

    /// `ranges` holds the warm-up's ranges first, then the `n` timed ones.
    async fn range_phase(
        &self,
        t: &Target,
        id: &str,
        title: &str,
        (warm, n): (usize, usize),
        ranges: Vec<(i64, i64)>,
    ) -> Result<ResultRow> {
        let mean_rows = ranges[warm..].iter().map(|(l, h)| (h - l + 1) as f64).sum::<f64>() / n.max(1) as f64;
        let ranges = Arc::new(ranges);
        let bodies: Arc<Vec<Bytes>> = Arc::new(ranges.iter().map(|(l, h)| client::read_body(*l, *h)).collect());
        let r = t.router.clone();
        let (r1, r2) = (ranges.clone(), ranges.clone());
        let (router, baseline) = self
            .phases(
                t,
                (warm, n),
                self.opts.concurrency,
                move |i| {
                    let (r, b, (l, h)) = (r.clone(), bodies[i].clone(), r1[i]);
                    async move { r.read(b, Expect::full(l, h)).await }
                },
                move |b, i| {
                    let (l, h) = r2[i];
                    async move { b.read(l, h, i, Expect::full(l, h)).await }
                },
            )
            .await?;
        let mut row = ResultRow::new(id, title, &t.cluster_name, mean_rows, router, baseline);
        row.notes.push(format!("{n} requests, {mean_rows:.0} rows each on average; every shard fully populated"));
        Ok(row)
    }

    /// 80% single-key reads of loaded keys, 20% single-row writes of new keys, interleaved.
    async fn mixed(&mut self, report: &mut Report) -> Result<()> {
        let (warm, n) = (self.opts.warmup, self.opts.ops);
        let writes = (warm + n).div_ceil(5);
        let shape = Shape::a1().with_capacity(n + writes);
        let t = self.open("mixed", self.local().then_some(shape)).await?;
        let result = async {
            let mut rng = StdRng::seed_from_u64(3);
            let keys = spread_keys(&t.layout, n + writes, &mut rng)?;
            let (loaded, fresh) = keys.split_at(n);
            self.load(&t, loaded, true, "mixed", &mut report.notes).await?;
            // Every fifth operation writes: an even 80/20 mix over time.
            let ops: Vec<(bool, i64, usize)> = (0..warm + n)
                .map(|i| {
                    if i % 5 == 4 {
                        let k = fresh[i / 5];
                        (true, k, t.layout.shard_of(k).unwrap_or(0))
                    } else {
                        let k = loaded[rng.random_range(0..loaded.len())];
                        (false, k, 0)
                    }
                })
                .collect();
            let ops = Arc::new(ops);
            let bodies: Arc<Vec<Bytes>> = Arc::new(
                ops.iter().map(|(w, k, _)| if *w { client::write_body(&[*k]) } else { client::read_body(*k, *k) }).collect(),
            );
            let r = t.router.clone();
            let (o1, o2) = (ops.clone(), ops.clone());
            let (router, baseline) = self
                .phases(
                    &t,
                    (warm, n),
                    self.opts.concurrency,
                    move |i| {
                        let (r, b, (w, k, _)) = (r.clone(), bodies[i].clone(), o1[i]);
                        async move { if w { r.write(b).await } else { r.read(b, Expect::full(k, k)).await } }
                    },
                    move |b, i| {
                        let (w, k, s) = o2[i];
                        async move { if w { b.write(s, &[k]).await } else { b.read(k, k, i, Expect::full(k, k)).await } }
                    },
                )
                .await?;
            let mut row = ResultRow::new("mixed-80-20", "Mixed 80% reads / 20% writes", &t.cluster_name, 1.0, router, baseline);
            row.notes.push(format!("{n} operations (one in five a write) over {n} loaded keys"));
            anyhow::Ok(row)
        }
        .await;
        let result = match result {
            Ok(row) => Ok(vec![self.anchored(row, anchor::Kind::Mixed, (warm, n), &mut report.notes).await]),
            Err(e) => Err(e),
        };
        self.finish(t, result, report).await
    }

    /// Loads `copy_rows` rows into one shard, then times full snapshot streams from its primary.
    async fn copy(&mut self, report: &mut Report) -> Result<()> {
        if !self.local() {
            report.notes.push("copy skipped: it needs a shard server's URL, which only a local cluster gives".into());
            return Ok(());
        }
        let rows = self.opts.copy_rows.max(1);
        let t = self.open("copy", Some(Shape::copy(rows))).await?;
        let result = async {
            let keys: Vec<i64> = (t.layout.shards[0].low..).take(rows).collect();
            // The baseline streams the system's own table: no baseline copy to load.
            let load = self.load(&t, &keys, false, "copy", &mut report.notes).await?;
            let shard = t.layout.shards[0].clone();
            let primary = t.layout.servers[&shard.replicas[0]].url.clone().context("primary has no URL")?;

            let before = t.layout.watched().sample();
            let mut runs = Vec::new();
            let mut errors = Vec::new();
            for _ in 0..COPY_RUNS {
                match client::snapshot(t.server_http().context("a local cluster")?, &primary, &shard.id).await {
                    Ok(s) if s.rows == rows as u64 => runs.push(s),
                    Ok(s) => errors.push(format!("snapshot streamed {} rows, {rows} were loaded", s.rows)),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            let cpu = before.until(&t.layout.watched().sample());
            runs.sort_by_key(|s| s.elapsed);
            let median = runs.get(runs.len() / 2).cloned();
            let streamed: u64 = runs.iter().map(|s| s.rows).sum::<u64>().max(1);
            let router = Side {
                ops: rows as u64,
                errors: errors.len() as u64,
                error_samples: errors,
                failed: Vec::new(),
                duration_s: median.as_ref().map_or(f64::INFINITY, |m| m.elapsed.as_secs_f64()),
                p50_ms: None,
                p99_ms: None,
                p999_ms: None,
                cpu: scale_cpu(cpu, rows as f64 / streamed as f64),
                warmup: 0,
            };

            let baseline = match &t.baseline {
                Some(b) => {
                    let before = t.layout.watched().sample();
                    let mut runs = Vec::new();
                    let mut errors = Vec::new();
                    for _ in 0..COPY_RUNS {
                        match b.stream_shard(0).await {
                            Ok((n, _, d)) if n == rows as u64 => runs.push(d),
                            Ok((n, _, _)) => errors.push(format!("baseline streamed {n} rows, {rows} were loaded")),
                            Err(e) => errors.push(format!("{e:#}")),
                        }
                    }
                    let cpu = before.until(&t.layout.watched().sample());
                    runs.sort();
                    let n_runs = runs.len().max(1) as f64;
                    Some(Side {
                        ops: rows as u64,
                        errors: errors.len() as u64,
                        error_samples: errors,
                        failed: Vec::new(),
                        duration_s: runs.get(runs.len() / 2).map_or(f64::INFINITY, |d| d.as_secs_f64()),
                        p50_ms: None,
                        p99_ms: None,
                        p999_ms: None,
                        cpu: scale_cpu(cpu, 1.0 / n_runs),
                        warmup: 0,
                    })
                }
                None => None,
            };
            let mut row = ResultRow::new(
                "copy",
                "Shard copy: full snapshot stream (rows/s)",
                &t.cluster_name,
                1.0,
                router,
                baseline,
            );
            if let Some(m) = &median {
                row.notes.push(format!(
                    "median of {COPY_RUNS} streams of {rows} rows ({:.1} MiB of NDJSON each, {:.2} s); ops are rows; \
                     this is the streaming rate alone (a whole heal, with install and verification, is timed by the fault suite)",
                    m.bytes as f64 / (1 << 20) as f64,
                    m.elapsed.as_secs_f64()
                ));
            }
            row.notes.push(format!(
                "loading the rows through the router in batches of {LOAD_ROWS}: {:.0} rows/s",
                rows as f64 / load.elapsed.as_secs_f64()
            ));
            row.notes.push("baseline: the snapshot's SELECT on the primary's Postgres, read by sqlx".into());
            anyhow::Ok(vec![row])
        }
        .await;
        self.finish(t, result, report).await
    }

    /// Writes `keys` through the router (batches of `LOAD_ROWS` per shard) and, with `baseline`,
    /// into the baseline tables; untimed set-up, but every request is checked.
    async fn load(
        &self,
        t: &Target,
        keys: &[i64],
        baseline: bool,
        workload: &str,
        notes: &mut Vec<String>,
    ) -> Result<LoadOutcome> {
        self.load_in(t, keys, LOAD_ROWS, baseline, workload, notes).await
    }

    /// [`Ctx::load`] in batches of `batch` rows.
    pub(super) async fn load_in(
        &self,
        t: &Target,
        keys: &[i64],
        batch: usize,
        baseline: bool,
        workload: &str,
        notes: &mut Vec<String>,
    ) -> Result<LoadOutcome> {
        let mut by_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for k in keys {
            by_shard
                .entry(t.layout.shard_of(*k).with_context(|| format!("key {k} in no shard"))?)
                .or_default()
                .push(*k);
        }
        let bodies: Arc<Vec<Bytes>> =
            Arc::new(by_shard.values().flat_map(|ks| ks.chunks(batch.max(1)).map(client::write_body)).collect());
        let r = t.router.clone();
        let n = bodies.len();
        let retries = Arc::new(AtomicU64::new(0));
        let counted = retries.clone();
        // Set-up only: a failed batch is retried (an identical rewrite is a no-op success), and
        // the retries are reported.
        let out = drive(n, LOAD_CONCURRENCY, move |i| {
            let (r, b, retries) = (r.clone(), bodies[i].clone(), counted.clone());
            async move {
                let mut attempt = 1;
                loop {
                    match r.write(b.clone()).await {
                        Err(_) if attempt < LOAD_ATTEMPTS => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                            attempt += 1;
                        }
                        done => return done,
                    }
                }
            }
        })
        .await;
        if out.errors > 0 {
            bail!(
                "loading {} rows failed {} times after {LOAD_ATTEMPTS} attempts each: {:?}",
                keys.len(),
                out.errors,
                out.error_samples
            );
        }
        let retries = retries.load(Ordering::Relaxed);
        if retries > 0 {
            notes.push(format!(
                "{workload}: loading {} rows before timing needed {retries} retried requests (of {n})",
                keys.len()
            ));
        }
        if let Some(b) = t.baseline.as_ref().filter(|_| baseline) {
            b.preload(keys).await.context("loading the baseline tables")?;
        }
        Ok(out)
    }

    /// Records a workload's rows (or its failure) and stops its cluster either way.
    async fn finish(&self, t: Target, result: Result<Vec<ResultRow>>, report: &mut Report) -> Result<()> {
        let closed = t.close().await;
        report.results.extend(result?);
        let (memory, warnings) = closed?;
        report.memory.extend(memory);
        report.log_warnings.extend(warnings);
        Ok(())
    }
}

/// Runs `op(0)`..`op(n-1)` untimed at `concurrency`, each retried until it succeeds
/// (`LOAD_ATTEMPTS` at most): a warm-up that must leave its writes in place.
async fn warm_up<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    if n == 0 {
        return Ok(());
    }
    let op = Arc::new(op);
    let out = drive(n, concurrency, move |i| {
        let op = op.clone();
        async move { retried(|| op(i)).await }
    })
    .await;
    ensure!(out.errors == 0, "{} of {n} warm-up operations failed: {:?}", out.errors, out.error_samples);
    Ok(())
}

/// Runs `op` until it succeeds, `LOAD_ATTEMPTS` times at most, with a growing pause.
pub(super) async fn retried<F, Fut>(op: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(_) if attempt < LOAD_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

pub(super) async fn measure(layout: &Layout, load: impl Future<Output = LoadOutcome>) -> (LoadOutcome, CpuUsage) {
    let w = layout.watched();
    let before = w.sample();
    let out = load.await;
    (out, before.until(&w.sample()))
}

fn scale_cpu(c: CpuUsage, f: f64) -> CpuUsage {
    CpuUsage {
        wall_s: c.wall_s * f,
        router_s: c.router_s * f,
        shard_servers_s: c.shard_servers_s * f,
        postgres_s: c.postgres_s * f,
        load_generator_s: c.load_generator_s * f,
        machine_s: c.machine_s * f,
        machine_utilisation: c.machine_utilisation,
    }
}

/// `n` distinct keys drawn evenly at random from every shard's range.
pub fn spread_keys(layout: &Layout, n: usize, rng: &mut StdRng) -> Result<Vec<i64>> {
    let space = layout.key_space();
    ensure!(n as i64 <= space, "{n} distinct keys do not fit the {space} keys of the shards");
    if space <= 4_000_000 {
        let mut all: Vec<i64> = layout.all_keys().collect();
        all.shuffle(rng);
        all.truncate(n);
        return Ok(all);
    }
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut off = rng.random_range(0..space);
        for s in &layout.shards {
            if off < s.size {
                let k = s.low + off;
                if seen.insert(k) {
                    out.push(k);
                }
                break;
            }
            off -= s.size;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::layout::ShardPlace;

    fn layout(shards: usize, size: i64) -> Layout {
        Layout {
            shards: (0..shards)
                .map(|i| ShardPlace { id: format!("sh{i}"), low: i as i64 * size, size, replicas: vec!["s".into()] })
                .collect(),
            servers: BTreeMap::new(),
            router_pid: None,
        }
    }

    #[test]
    fn keys_are_distinct_and_spread_over_every_shard() {
        let l = layout(4, 4096);
        let keys = spread_keys(&l, 10_000, &mut StdRng::seed_from_u64(1)).unwrap();
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), 10_000);
        for s in 0..4 {
            let n = keys.iter().filter(|k| l.shard_of(**k) == Some(s)).count();
            assert!((2_200..2_800).contains(&n), "shard {s} got {n}");
        }
        assert!(spread_keys(&l, 20_000, &mut StdRng::seed_from_u64(1)).is_err());
    }

    #[test]
    fn sparse_sampling_stays_in_range() {
        let l = layout(2, 10_000_000);
        let keys = spread_keys(&l, 1000, &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), 1000);
        assert!(keys.iter().all(|k| l.shard_of(*k).is_some()));
    }
}
