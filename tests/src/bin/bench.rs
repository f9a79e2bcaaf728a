//! `bench`: the benchmark program. Starts a local cluster per workload (or targets `--router`),
//! measures sharddb beside one plain Postgres doing the same work (`pgbench`) and beside the same
//! SQL sent straight to the servers' Postgres one transaction per request, times the cold start and
//! the heal of a wiped copy, and writes `benchmarks.json`, `benchmarks.svg` and `benchmarks.md`.
//! Reports; never asserts a timing.

use anyhow::{Result, bail};
use clap::Parser;
use std::path::PathBuf;
use tests::bench::{self, Options, Workload};

/// sharddb benchmark: the seed's workloads and more, beside plain Postgres and the same SQL.
///
/// Local mode (the default) needs the release binaries: run `cargo build --release --bins` first
/// (or point SHARDDB_BIN_DIR at a directory holding sharddb-operator, sharddb-router and
/// sharddb-shard-server) and the PostgreSQL server binaries (initdb, pg_ctl).
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
struct Args {
    /// Workloads to run, comma-separated: a1, a2, a3 (the seed's 4×3 on 6, 4×7 on 7, 6×8 on 10
    /// servers), batch (100-row writes), range (1- and 3-shard range reads), mixed (80/20
    /// reads/writes), copy (full shard snapshot stream), heal (a wiped copy healed, per
    /// --heal-rows), cold (writes from the moment a new cluster answers).
    #[arg(long, value_delimiter = ',', default_value = "a1,a2,a3,batch,range,mixed,copy,heal,cold")]
    workloads: Vec<Workload>,
    /// Operations per phase [default: 10000; 500 with --quick].
    #[arg(long)]
    ops: Option<usize>,
    /// Requests in flight at once [default: 100; 20 with --quick].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Rows loaded into the shard that the copy workload streams [default: 200000; 20000 with --quick].
    #[arg(long)]
    copy_rows: Option<usize>,
    /// Untimed operations before each timed phase, on every side [default: 1000; 50 with --quick].
    #[arg(long)]
    warmup: Option<usize>,
    /// Sizes of the copies the heal workload wipes and heals, comma-separated [default:
    /// 100000,1000000; 20000 with --quick].
    #[arg(long, value_delimiter = ',')]
    heal_rows: Vec<usize>,
    /// Skip plain Postgres (pgbench) beside sharddb.
    #[arg(long)]
    no_anchor: bool,
    /// A flag for every local cluster (`sharddb-operator local ... FLAG`); repeat for more.
    #[arg(long = "local-arg", allow_hyphen_values = true)]
    local_args: Vec<String>,
    /// Also run A-1 on clusters started with extra flags, reported beside the default run:
    /// `NAME=FLAGS`, e.g. `--variant 'tls-off=--internal-tls=false'`; repeatable. A flag
    /// `--bin-dir=DIR` runs that variant on the binaries in DIR instead (the previous release's:
    /// `--variant "previous=--bin-dir=$(scripts/build-previous-release.sh --release)"`).
    #[arg(long = "variant", allow_hyphen_values = true)]
    variants: Vec<bench::Variant>,
    /// Where to write benchmarks.{json,svg,md} [default: docs/ of this repository; a temporary
    /// directory with --quick].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A small smoke run (fewer operations, lower concurrency); its report says so.
    #[arg(long)]
    quick: bool,
    /// Benchmark this running router (`http://host:port`) instead of starting local clusters (a1/a2/a3 then run once,
    /// as `seed`; copy is skipped). Rows are deterministic, so rerunning rewrites identical rows.
    #[arg(long)]
    router: Option<String>,
    /// With --router: Postgres URLs for the baseline (server i of the router's /status uses URL
    /// i mod count). Without them the baseline is skipped.
    #[arg(long = "baseline-db", num_args = 1.., value_delimiter = ',')]
    baseline_db: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tests::install_crypto_provider();
    let args = Args::parse();
    if args.workloads.is_empty() {
        bail!("--workloads is empty");
    }
    let mut workloads: Vec<Workload> = Vec::new();
    for w in &args.workloads {
        if !workloads.contains(w) {
            workloads.push(*w);
        }
    }
    let mut opts = Options::new(workloads);
    opts.quick = args.quick;
    opts.ops = args.ops.unwrap_or(if args.quick { 500 } else { 10_000 }).max(1);
    opts.concurrency = args.concurrency.unwrap_or(if args.quick { 20 } else { 100 }).max(1);
    opts.copy_rows = args.copy_rows.unwrap_or(if args.quick { 20_000 } else { 200_000 }).max(1);
    opts.router = args.router.clone();
    opts.baseline_dbs = args.baseline_db.clone();
    opts.warmup = args.warmup.unwrap_or(if args.quick { 50 } else { 1_000 });
    opts.anchor = !args.no_anchor;
    if !args.heal_rows.is_empty() {
        opts.heal_rows = args.heal_rows.iter().map(|r| (*r).max(1)).collect();
    } else if args.quick {
        opts.heal_rows = vec![20_000];
    }
    opts.local_args = args.local_args.clone();
    opts.variants = args.variants.clone();

    if opts.router.is_none() {
        let dir = tests::bin_dir();
        let missing: Vec<&str> = ["sharddb-operator", "sharddb-router", "sharddb-shard-server"]
            .into_iter()
            .filter(|b| !dir.join(b).exists())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} missing from {}: run `cargo build --release --bins` first (or set SHARDDB_BIN_DIR)",
                missing.join(", "),
                dir.display()
            );
        }
        if dir.ends_with("debug") {
            eprintln!("bench: warning: measuring debug binaries from {}; numbers will be far off", dir.display());
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("bench: warning: the load generator is a debug build; run it with `cargo run --release`");
    }

    let out = match (&args.out, args.quick) {
        (Some(o), _) => o.clone(),
        (None, true) => std::env::temp_dir().join("sharddb-bench-quick"),
        (None, false) => tests::repo_root().join("docs"),
    };
    let report = bench::run(&opts).await?;
    for path in bench::write_outputs(&report, &out)? {
        eprintln!("bench: wrote {}", path.display());
    }
    for t in &report.targets {
        let verdict = match t.pass {
            Some(true) => "pass",
            Some(false) => "MISS",
            None => "not measured",
        };
        eprintln!(
            "bench: {:<40} {:<16} {:>14}  {verdict}",
            t.name,
            t.goal,
            t.measured.map_or("–".into(), |v| format!("{v:.2}"))
        );
    }
    if report.errors_total > 0 || !report.failed_workloads.is_empty() {
        eprintln!(
            "bench: the run had {} failed operations and {} workloads that did not run; the report says which",
            report.errors_total,
            report.failed_workloads.len()
        );
        std::process::exit(2);
    }
    Ok(())
}
