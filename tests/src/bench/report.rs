//! The benchmark report: one JSON document (machine, parameters, one row per measured phase with
//! sharddb, plain Postgres (the anchor) and the same SQL one transaction per request (the
//! baseline) side by side, the cold start, heals, memory per cluster) and the targets checked
//! against it. Types and pure functions only.

use crate::bench::anchor::Measured;
use crate::bench::load::LoadOutcome;
use crate::bench::procstat::CpuUsage;
use serde::{Deserialize, Serialize};
use shard_server::api::RecoverTimings;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub generated: String,
    /// `git describe` of the measured tree, when known.
    pub commit: Option<String>,
    pub machine: Machine,
    pub params: Params,
    pub results: Vec<ResultRow>,
    /// The first seconds of a cluster that was just started (`cold` workload).
    #[serde(default)]
    pub cold_start: Option<ColdStart>,
    /// Heals of a wiped copy, one per size (`heal` workload).
    #[serde(default)]
    pub heals: Vec<HealResult>,
    pub memory: Vec<ClusterMemory>,
    pub targets: Vec<TargetCheck>,
    /// Failed operations over every phase, router and baseline.
    pub errors_total: u64,
    /// Workloads that could not run at all, with why.
    pub failed_workloads: Vec<Failure>,
    /// Warnings and errors the cluster's processes logged during a workload.
    pub log_warnings: Vec<LogWarnings>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: Option<String>,
    /// The 1-minute load average when the run started (other work on the machine skews results).
    pub loadavg_at_start: Option<f64>,
    /// The 1-minute load average when the run ended (it includes the run's own load).
    #[serde(default)]
    pub loadavg_at_end: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Params {
    /// `local` (clusters started by the benchmark) or `router` (an existing router).
    pub mode: String,
    pub workloads: Vec<String>,
    pub ops: usize,
    pub concurrency: usize,
    pub copy_rows: usize,
    pub quick: bool,
    /// The build profile of the binaries under test (`release`, `debug`), when known.
    pub binaries: String,
    pub baseline: bool,
    /// Whether plain Postgres was measured beside sharddb (`--no-anchor` turns it off).
    #[serde(default)]
    pub anchor: bool,
    /// Untimed operations before each timed phase, on every side.
    #[serde(default)]
    pub warmup: usize,
    /// Rows of the copies the heal workload wipes and heals.
    #[serde(default)]
    pub heal_rows: Vec<usize>,
    /// Flags given to every local cluster (`--local-arg`).
    #[serde(default)]
    pub local_args: Vec<String>,
    /// Variants run beside the default (`--variant NAME=FLAGS`): name and flags.
    #[serde(default)]
    pub variants: Vec<(String, Vec<String>)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub workload: String,
    pub error: String,
}

/// What one process logged at WARN or ERROR during a workload.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogWarnings {
    pub workload: String,
    pub process: String,
    pub count: u64,
    /// The first few lines, timestamps and colours removed.
    pub samples: Vec<String>,
}

/// One measured phase: sharddb (through the router), plain Postgres (`anchor_*`) and the same SQL
/// one transaction per request (`baseline_*`) doing the same operations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResultRow {
    /// Short id, e.g. `a1-write`.
    pub workload: String,
    /// For people, e.g. `A-1 single-row writes`.
    pub title: String,
    /// The cluster it ran on.
    pub cluster: String,
    /// Operations (requests; rows for `copy`).
    pub ops: u64,
    pub rows_per_op: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub duration_s: f64,
    pub ops_per_s: f64,
    pub rows_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub baseline_ops: Option<u64>,
    pub baseline_errors: u64,
    pub baseline_error_samples: Vec<String>,
    pub baseline_ops_per_s: Option<f64>,
    pub baseline_p50_ms: Option<f64>,
    pub baseline_p99_ms: Option<f64>,
    pub baseline_p999_ms: Option<f64>,
    /// `ops_per_s / baseline_ops_per_s`.
    pub ratio: Option<f64>,
    /// What `pgbench` ran on plain Postgres for this workload (see `anchor`), when measured.
    pub anchor_script: Option<String>,
    pub anchor_ops: Option<u64>,
    pub anchor_errors: u64,
    pub anchor_ops_per_s: Option<f64>,
    pub anchor_p50_ms: Option<f64>,
    pub anchor_p99_ms: Option<f64>,
    pub anchor_p999_ms: Option<f64>,
    /// `ops_per_s / anchor_ops_per_s`: sharddb against one plain Postgres.
    pub anchor_ratio: Option<f64>,
    /// CPU seconds of the plain Postgres per 1,000 transactions.
    pub anchor_cpu_s_per_1k_ops: Option<f64>,
    /// Untimed operations run before the timed phase, on each side.
    pub warmup_ops: u64,
    /// The variant this row ran under (`--variant`), if not the default.
    pub variant: Option<String>,
    /// CPU seconds of router + shard servers + their Postgres per 1,000 operations.
    pub cpu_s_per_1k_ops: Option<f64>,
    /// The same for the baseline (its Postgres work; router and servers idle).
    pub baseline_cpu_s_per_1k_ops: Option<f64>,
    /// Busy CPU seconds of the whole machine per 1,000 operations (load generator included).
    pub machine_cpu_s_per_1k_ops: f64,
    pub baseline_machine_cpu_s_per_1k_ops: Option<f64>,
    pub cpu: CpuUsage,
    pub baseline_cpu: Option<CpuUsage>,
    pub notes: Vec<String>,
}

/// One side of a row as measured.
pub struct Side {
    pub ops: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Indexes of the failed operations.
    pub failed: Vec<usize>,
    pub duration_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub cpu: CpuUsage,
    /// Untimed operations run before the timed ones.
    pub warmup: u64,
}

impl Side {
    pub fn from_load(out: &LoadOutcome, cpu: CpuUsage) -> Side {
        Side {
            ops: out.ops,
            errors: out.errors,
            error_samples: out.error_samples.clone(),
            failed: out.failed.clone(),
            duration_s: out.elapsed.as_secs_f64(),
            p50_ms: out.quantile_ms(0.50),
            p99_ms: out.quantile_ms(0.99),
            p999_ms: out.quantile_ms(0.999),
            cpu,
            warmup: 0,
        }
    }
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.duration_s.max(1e-9)
    }
}

fn per_1k(cpu_s: f64, ops: u64) -> f64 {
    cpu_s * 1000.0 / (ops.max(1) as f64)
}

impl ResultRow {
    pub fn new(
        workload: &str,
        title: &str,
        cluster: &str,
        rows_per_op: f64,
        router: Side,
        baseline: Option<Side>,
    ) -> ResultRow {
        let ops_per_s = router.ops_per_s();
        let baseline_ops_per_s = baseline.as_ref().map(Side::ops_per_s);
        ResultRow {
            workload: workload.into(),
            title: title.into(),
            cluster: cluster.into(),
            ops: router.ops,
            rows_per_op,
            errors: router.errors,
            error_samples: router.error_samples,
            duration_s: router.duration_s,
            ops_per_s,
            rows_per_s: ops_per_s * rows_per_op,
            p50_ms: router.p50_ms,
            p99_ms: router.p99_ms,
            p999_ms: router.p999_ms,
            baseline_ops: baseline.as_ref().map(|b| b.ops),
            baseline_errors: baseline.as_ref().map_or(0, |b| b.errors),
            baseline_error_samples: baseline.as_ref().map(|b| b.error_samples.clone()).unwrap_or_default(),
            baseline_ops_per_s,
            baseline_p50_ms: baseline.as_ref().and_then(|b| b.p50_ms),
            baseline_p99_ms: baseline.as_ref().and_then(|b| b.p99_ms),
            baseline_p999_ms: baseline.as_ref().and_then(|b| b.p999_ms),
            ratio: baseline_ops_per_s.filter(|b| *b > 0.0).map(|b| ops_per_s / b),
            cpu_s_per_1k_ops: (router.cpu.system_s() > 0.0).then(|| per_1k(router.cpu.system_s(), router.ops)),
            baseline_cpu_s_per_1k_ops: baseline
                .as_ref()
                .filter(|b| b.cpu.system_s() > 0.0)
                .map(|b| per_1k(b.cpu.system_s(), b.ops)),
            machine_cpu_s_per_1k_ops: per_1k(router.cpu.machine_s, router.ops),
            baseline_machine_cpu_s_per_1k_ops: baseline.as_ref().map(|b| per_1k(b.cpu.machine_s, b.ops)),
            warmup_ops: router.warmup,
            cpu: router.cpu,
            baseline_cpu: baseline.map(|b| b.cpu),
            notes: Vec::new(),
            ..ResultRow::default()
        }
    }

    /// Adds plain Postgres's figures for the same workload.
    pub fn with_anchor(mut self, m: &Measured) -> ResultRow {
        self.anchor_script = Some(m.script.clone());
        self.anchor_ops = Some(m.ops);
        self.anchor_errors = m.errors;
        self.anchor_ops_per_s = Some(m.ops_per_s);
        self.anchor_p50_ms = m.p50_ms;
        self.anchor_p99_ms = m.p99_ms;
        self.anchor_p999_ms = m.p999_ms;
        self.anchor_ratio = (m.ops_per_s > 0.0).then(|| self.ops_per_s / m.ops_per_s);
        self.anchor_cpu_s_per_1k_ops = m.cpu_s_per_1k_ops;
        self
    }
}

/// The first seconds of a freshly started cluster: writes sent from the moment the local mode
/// reports every process healthy, each timed from when it was sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ColdStart {
    pub cluster: String,
    /// From launching the local mode to its router line (every process healthy).
    pub start_s: f64,
    /// How long writes were sent for.
    pub window_s: f64,
    pub ops: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// From the router line to the first acknowledged write.
    pub first_ack_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The writes sent in the first second only.
    pub first_second_ops: u64,
    pub first_second_p50_ms: Option<f64>,
    pub first_second_p99_ms: Option<f64>,
    /// Whether the servers were started with `--no-predecessor` (no start-up lease wait).
    pub lease_wait_skipped: Option<bool>,
}

/// One heal: a copy of `rows` rows wiped and restarted, healed by the operator.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HealResult {
    pub rows: u64,
    pub cluster: String,
    /// One full snapshot stream from the primary, read and checked by the benchmark.
    pub stream_rows_per_s: Option<f64>,
    /// The recover as the healer timed it (request to verified answer).
    pub recover_s: Option<f64>,
    /// `rows / recover_s`: the heal's throughput end to end.
    pub heal_rows_per_s: Option<f64>,
    /// From the restarted (empty) server's start to the copy marked ready.
    pub restart_to_ready_s: Option<f64>,
    /// Where the server says the recover's time went.
    pub timings: Option<RecoverTimings>,
    pub error: Option<String>,
}

/// Memory of one cluster's processes (MiB).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterMemory {
    pub workload: String,
    pub cluster: String,
    /// The largest `VmRSS` of a shard server once the cluster was up, before any load.
    pub shard_server_rest_mib: Option<f64>,
    /// The largest `VmHWM` (peak RSS) of a shard server at the end of the workload.
    pub shard_server_peak_mib: Option<f64>,
    pub router_rest_mib: Option<f64>,
    pub router_peak_mib: Option<f64>,
    /// The largest `VmHWM` of one Postgres process (shared buffers count in every one).
    pub postgres_process_peak_mib: Option<f64>,
    /// CPU cores the router, shard servers and Postgres keep busy with no load at all (sampled
    /// for a few seconds before the first phase).
    pub idle_cpu_cores: Option<f64>,
    /// The same split by role: router, shard servers (all), Postgres (all).
    pub idle_cpu_split: Option<[f64; 3]>,
}

/// A target from the issue, measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetCheck {
    pub name: String,
    /// e.g. `≥ 5,470 ops/s`.
    pub goal: String,
    pub target: f64,
    pub measured: Option<f64>,
    pub unit: String,
    /// `None`: not measured in this run.
    pub pass: Option<bool>,
    pub detail: String,
}

/// The seed's own figures for its benchmark (4 shards × 3 replicas on 6 servers).
pub const SEED_WRITES_PER_S: f64 = 547.0;
pub const SEED_READS_PER_S: f64 = 1417.0;

/// Checks the targets against the measured rows and memory. Never asserts: a target with
/// nothing measured is `pass: None`, and a phase that had errors does not pass.
pub fn evaluate_targets(results: &[ResultRow], memory: &[ClusterMemory], heals: &[HealResult]) -> Vec<TargetCheck> {
    let row = |w: &str| results.iter().find(|r| r.workload == w);
    let at_least = |name: &str, w: &str, target: f64, unit: &str, seed: Option<f64>| {
        let r = row(w);
        let measured = r.map(|r| r.ops_per_s);
        let mut detail = match (r, seed) {
            (Some(r), Some(s)) => format!("{:.1}× the seed's {}", r.ops_per_s / s, fmt_num(s)),
            (Some(_), None) => String::new(),
            (None, _) => format!("`{w}` not run"),
        };
        let errors = r.map_or(0, |r| r.errors);
        if errors > 0 {
            detail = format!("{errors} errors; {detail}");
        }
        TargetCheck {
            name: name.into(),
            goal: format!("≥ {} {unit}", fmt_num(target)),
            target,
            measured,
            unit: unit.into(),
            pass: measured.map(|m| m >= target && errors == 0),
            detail,
        }
    };
    let mut out = vec![
        at_least("A-1 writes", "a1-write", SEED_WRITES_PER_S * 10.0, "ops/s", Some(SEED_WRITES_PER_S)),
        at_least("A-1 reads", "a1-read", SEED_READS_PER_S * 10.0, "ops/s", Some(SEED_READS_PER_S)),
    ];
    let worst = results.iter().filter_map(|r| r.ratio.map(|x| (x, r))).min_by(|a, b| a.0.total_cmp(&b.0));
    out.push(TargetCheck {
        name: "sharddb vs the same SQL one transaction per request (worst workload)".into(),
        goal: "≥ 0.50".into(),
        target: 0.5,
        measured: worst.map(|w| w.0),
        unit: "ratio".into(),
        pass: worst.map(|w| w.0 >= 0.5),
        detail: match worst {
            Some((_, r)) => format!(
                "worst: `{}`; {} of {} workloads at ≥ 0.50",
                r.workload,
                results.iter().filter(|r| r.ratio.is_some_and(|x| x >= 0.5)).count(),
                results.iter().filter(|r| r.ratio.is_some()).count()
            ),
            None => "no baseline measured".into(),
        },
    });
    let rest = memory.iter().filter_map(|m| m.shard_server_rest_mib).max_by(f64::total_cmp);
    out.push(TargetCheck {
        name: "Shard server RSS at rest (largest)".into(),
        goal: "< 50 MiB".into(),
        target: 50.0,
        measured: rest,
        unit: "MiB".into(),
        pass: rest.map(|m| m < 50.0),
        detail: if rest.is_some() { String::new() } else { "no local cluster measured".into() },
    });
    let mut copy = at_least("Shard copy (snapshot stream)", "copy", 100_000.0, "rows/s", None);
    if copy.measured.is_some() {
        copy.detail =
            "the snapshot stream alone; a whole heal (install, catch-up, verify) is timed by the fault suite".into();
    }
    out.push(copy);
    for h in heals {
        out.push(TargetCheck {
            name: format!("Heal of a wiped {}-row copy (recover, end to end)", fmt_int(h.rows)),
            goal: format!("≥ {} rows/s", fmt_num(HEAL_ROWS_PER_S)),
            target: HEAL_ROWS_PER_S,
            measured: h.heal_rows_per_s,
            unit: "rows/s".into(),
            pass: h.heal_rows_per_s.map(|v| v >= HEAL_ROWS_PER_S),
            detail: match (&h.error, h.stream_rows_per_s) {
                (Some(e), _) => format!("failed: {e}"),
                (None, Some(s)) => format!("the snapshot stream alone: {} rows/s", fmt_num(s)),
                (None, None) => String::new(),
            },
        });
    }
    out
}

/// The heal throughput the benchmark checks, end to end (stream, install, verify, catch-up).
pub const HEAL_ROWS_PER_S: f64 = 200_000.0;

/// `12345` → `12,345`.
pub fn fmt_int(v: u64) -> String {
    if v < 1000 { v.to_string() } else { fmt_num(v as f64) }
}

/// `12345.6` → `12,346`; small values keep a decimal.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v.abs() < 10.0 {
        return format!("{v:.2}");
    }
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(w: &str, ops_per_s: f64, ratio: Option<f64>, errors: u64) -> ResultRow {
        ResultRow { workload: w.into(), ops_per_s, ratio, errors, ..ResultRow::default() }
    }

    #[test]
    fn targets_pass_miss_and_unmeasured() {
        let results = [row("a1-write", 6000.0, Some(1.2), 0), row("a1-read", 9000.0, Some(0.4), 0)];
        let mem = [ClusterMemory { shard_server_rest_mib: Some(20.0), ..ClusterMemory::default() }];
        let heals = [HealResult { rows: 100_000, heal_rows_per_s: Some(150_000.0), ..HealResult::default() }];
        let t = evaluate_targets(&results, &mem, &heals);
        assert_eq!(t[0].pass, Some(true));
        assert!(t[0].detail.contains("11.0× the seed's 547"), "{}", t[0].detail);
        assert_eq!(t[1].pass, Some(false));
        assert_eq!((t[2].measured, t[2].pass), (Some(0.4), Some(false)));
        assert!(t[2].detail.contains("`a1-read`"));
        assert_eq!(t[3].pass, Some(true));
        assert_eq!(t[4].pass, None);
        assert_eq!(
            (t[5].name.as_str(), t[5].pass),
            ("Heal of a wiped 100,000-row copy (recover, end to end)", Some(false))
        );
    }

    #[test]
    fn a_phase_with_errors_does_not_pass() {
        let t = evaluate_targets(&[row("a1-write", 60_000.0, None, 3)], &[], &[]);
        assert_eq!(t[0].pass, Some(false));
        assert!(t[0].detail.starts_with("3 errors"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(5470.0), "5,470");
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(0.5), "0.50");
    }
}
