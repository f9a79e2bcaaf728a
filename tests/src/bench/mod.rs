//! The benchmark program's library: runs the workloads (the seed's, batch writes, range
//! reads, a mixed load, the shard copy stream, the heal of a wiped copy and the cold start) against
//! the router, beside one plain Postgres doing the same work (`pgbench`) and the same SQL sent
//! straight to the servers' Postgres one transaction per request, and writes a JSON report plus its
//! Markdown and SVG rendering. Does I/O.
//!
//! Module map: `specs` (cluster shapes, pure), `layout` (where shards live), `client` (router and
//! snapshot requests, checked), `anchor` (plain Postgres and `pgbench`), `baseline` (the same SQL,
//! one transaction per request), `load` (the load generator), `procstat` (CPU and memory from
//! `/proc`), `target` (the system under test), `workloads` (each workload's steps; `startup` the
//! cold start and the heal), `report` (the JSON document and the targets, pure), `render`
//! (Markdown, pure), `chart` (SVG, pure).

pub mod anchor;
pub mod baseline;
pub mod chart;
pub mod client;
pub mod http1;
pub mod layout;
pub mod load;
pub mod procstat;
pub mod render;
pub mod report;
pub mod specs;
pub mod startup;
pub mod target;
pub mod workloads;

use anyhow::{Context, Result};
use report::{Failure, Machine, Params, Report};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A workload of the benchmark (`--workloads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    A1,
    A2,
    A3,
    Batch,
    Range,
    Mixed,
    Copy,
    Heal,
    Cold,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::A1,
        Workload::A2,
        Workload::A3,
        Workload::Batch,
        Workload::Range,
        Workload::Mixed,
        Workload::Copy,
        Workload::Heal,
        Workload::Cold,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::A1 => "a1",
            Workload::A2 => "a2",
            Workload::A3 => "a3",
            Workload::Batch => "batch",
            Workload::Range => "range",
            Workload::Mixed => "mixed",
            Workload::Copy => "copy",
            Workload::Heal => "heal",
            Workload::Cold => "cold",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Workload, String> {
        Workload::ALL.into_iter().find(|w| w.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            format!("unknown workload {s:?}; choose from {}", Workload::ALL.map(Workload::name).join(","))
        })
    }
}

/// What to run; the binary's flags parse into this.
#[derive(Clone, Debug)]
pub struct Options {
    pub workloads: Vec<Workload>,
    /// Operations per phase (the seed's 10,000).
    pub ops: usize,
    /// Requests in flight at once (the seed's client allowed 100).
    pub concurrency: usize,
    /// Rows loaded into the shard the copy workload streams.
    pub copy_rows: usize,
    /// An existing router to target instead of starting local clusters.
    pub router: Option<String>,
    /// With `router`: the Postgres databases for the baseline (server i uses `[i % len]`).
    pub baseline_dbs: Vec<String>,
    pub quick: bool,
    /// Untimed operations before each timed phase, on every side.
    pub warmup: usize,
    /// Measure plain Postgres (`pgbench`) beside sharddb.
    pub anchor: bool,
    /// Rows of each copy the heal workload wipes and heals.
    pub heal_rows: Vec<usize>,
    /// Flags given to every local cluster (`sharddb-operator local ... FLAGS`).
    pub local_args: Vec<String>,
    /// Variants: A-1 again on clusters started with these extra flags, reported beside the default.
    pub variants: Vec<Variant>,
}

/// A1 run again with extra flags for the local mode (e.g. internal TLS off), or on another
/// release's binaries (`--bin-dir=DIR`, see [`target::launch_for`]), so what a feature costs
/// shows up as a number in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub args: Vec<String>,
}

impl FromStr for Variant {
    type Err = String;
    /// `NAME=FLAGS`, flags separated by spaces: `tls-off=--internal-tls=false`.
    fn from_str(s: &str) -> Result<Variant, String> {
        let (name, flags) = s.split_once('=').ok_or_else(|| format!("variant {s:?} is not NAME=FLAGS"))?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("variant name {name:?}: letters, digits, - and _ only"));
        }
        let args: Vec<String> = flags.split_whitespace().map(str::to_owned).collect();
        if args.is_empty() {
            return Err(format!("variant {name} has no flags"));
        }
        Ok(Variant { name: name.to_owned(), args })
    }
}

impl Options {
    pub fn new(workloads: Vec<Workload>) -> Options {
        Options {
            workloads,
            ops: 10_000,
            concurrency: 100,
            copy_rows: 200_000,
            router: None,
            baseline_dbs: Vec::new(),
            quick: false,
            warmup: 1_000,
            anchor: true,
            heal_rows: vec![100_000, 1_000_000],
            local_args: Vec::new(),
            variants: Vec::new(),
        }
    }
}

/// Runs every selected workload and returns the report (targets evaluated). A workload that
/// cannot run is recorded in `failed_workloads` and the others still run.
pub async fn run(opts: &Options) -> Result<Report> {
    crate::install_crypto_provider();
    let mut ctx = workloads::Ctx::new(opts.clone());
    let mut report = Report {
        generated: utc_now(),
        commit: git_commit(),
        machine: machine(),
        params: Params {
            mode: if opts.router.is_some() { "router" } else { "local" }.into(),
            workloads: opts.workloads.iter().map(|w| w.name().to_owned()).collect(),
            ops: opts.ops,
            concurrency: opts.concurrency,
            copy_rows: opts.copy_rows,
            quick: opts.quick,
            binaries: if opts.router.is_some() { "unknown".into() } else { binaries_profile() },
            baseline: opts.router.is_none() || !opts.baseline_dbs.is_empty(),
            anchor: opts.anchor,
            warmup: opts.warmup,
            heal_rows: if opts.workloads.contains(&Workload::Heal) { opts.heal_rows.clone() } else { Vec::new() },
            local_args: opts.local_args.clone(),
            variants: opts.variants.iter().map(|v| (v.name.clone(), v.args.clone())).collect(),
        },
        ..Report::default()
    };
    let mut seed_done = false;
    for w in &opts.workloads {
        if opts.router.is_some() && matches!(w, Workload::A1 | Workload::A2 | Workload::A3) {
            // Against one given router the three layouts are the same run.
            if seed_done {
                continue;
            }
            seed_done = true;
        }
        eprintln!("bench: workload {}", w.name());
        match ctx.run(*w, &mut report).await {
            Ok(()) => {}
            Err(e) => {
                eprintln!("bench: workload {} failed: {e:#}", w.name());
                report.failed_workloads.push(Failure { workload: w.name().into(), error: format!("{e:#}") });
            }
        }
    }
    for v in &opts.variants {
        eprintln!("bench: variant {}", v.name);
        if let Err(e) = ctx.variant(v, &mut report).await {
            eprintln!("bench: variant {} failed: {e:#}", v.name);
            report.failed_workloads.push(Failure { workload: format!("a1@{}", v.name), error: format!("{e:#}") });
        }
    }
    ctx.close_anchor();
    if report.machine.postgres.is_none() {
        report.machine.postgres = ctx.postgres_version.take();
    }
    if opts.router.is_some() && opts.baseline_dbs.is_empty() {
        report.notes.push("No `--baseline-db` was given: the baseline was skipped.".into());
    }
    report.errors_total = report.results.iter().map(|r| r.errors + r.baseline_errors + r.anchor_errors).sum::<u64>()
        + report.cold_start.as_ref().map_or(0, |c| c.errors);
    report.targets = report::evaluate_targets(&report.results, &report.memory, &report.heals);
    report.machine.loadavg_at_end = loadavg();
    Ok(report)
}

/// Writes `benchmarks.json`, `benchmarks.svg` and `benchmarks.md` into `dir`, keeping the
/// hand-written analysis section of an existing `benchmarks.md`.
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("benchmarks.json");
    let svg = dir.join("benchmarks.svg");
    let md = dir.join("benchmarks.md");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")?;
    std::fs::write(&svg, chart::svg(report))?;
    let kept = std::fs::read_to_string(&md).ok().and_then(|old| render::kept_analysis(&old));
    std::fs::write(&md, render::markdown(report, "benchmarks.svg", kept.as_deref()))?;
    Ok(vec![json, svg, md])
}

/// The profile directory the binaries under test come from (`release`, `debug`).
fn binaries_profile() -> String {
    crate::bin_dir().file_name().and_then(|n| n.to_str()).unwrap_or("unknown").to_owned()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".into(), |m| m.trim().to_owned()),
        memory_gib: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        postgres: None,
        loadavg_at_start: loadavg(),
        loadavg_at_end: None,
    }
}

/// The 1-minute load average.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::repo_root())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Now, UTC, as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse() {
        assert_eq!("a1".parse::<Workload>(), Ok(Workload::A1));
        assert_eq!(" Copy".parse::<Workload>(), Ok(Workload::Copy));
        assert!("a4".parse::<Workload>().unwrap_err().contains("a1,a2,a3,batch,range,mixed,copy,heal,cold"));
    }

    #[test]
    fn variants_parse() {
        let v: Variant = "tls-off=--internal-tls=false --x".parse().unwrap();
        assert_eq!((v.name.as_str(), v.args), ("tls-off", vec!["--internal-tls=false".to_owned(), "--x".to_owned()]));
        assert!("tls off=--x".parse::<Variant>().is_err());
        assert!("tls-off=".parse::<Variant>().is_err());
        assert!("--x".parse::<Variant>().is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
