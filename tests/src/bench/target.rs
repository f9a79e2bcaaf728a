//! The system under test for one workload: a local cluster started from a generated spec (or a
//! given router), where its data lives, the baseline over the same databases, and the cluster's
//! memory and idle CPU. Does I/O.

use crate::bench::Options;
use crate::bench::baseline::Baseline;
use crate::bench::client::Router;
use crate::bench::layout::Layout;
use crate::bench::procstat;
use crate::bench::report::{ClusterMemory, LogWarnings};
use crate::bench::specs::Shape;
use crate::{Launch, LocalCluster};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long the idle system is watched before the first phase.
const IDLE_SAMPLE: Duration = Duration::from_secs(3);

/// The system under test for one workload.
pub struct Target {
    pub router: Router,
    pub layout: Layout,
    pub baseline: Option<Arc<Baseline>>,
    /// Describes the cluster for the report.
    pub cluster_name: String,
    cluster: Option<LocalCluster>,
    /// Local clusters only.
    memory: Option<ClusterMemory>,
    /// Holds the generated spec for as long as the cluster runs.
    _spec_dir: Option<tempfile::TempDir>,
}

impl Target {
    /// A client the shard servers of a local cluster answer (the operator's credentials).
    pub fn server_http(&self) -> Option<&reqwest::Client> {
        self.cluster.as_ref().map(|c| &c.http)
    }

    /// The local cluster's data directory (its `control/`, `events.log`), if the target is local.
    pub fn cluster_dir(&self) -> Option<&Path> {
        self.cluster.as_ref().map(|c| c.dir.path())
    }

    /// Starts a local cluster of `shape` with `args` for the local mode (or reaches
    /// `opts.router`), waits until it serves, takes its memory and idle CPU at rest, and prepares
    /// the baseline over its databases.
    pub async fn open(
        opts: &Options,
        args: &[String],
        http: &reqwest::Client,
        workload: &str,
        shape: Option<Shape>,
    ) -> Result<Target> {
        let local = opts.router.is_none();
        let (router_url, cluster, layout, cluster_name, spec_dir) = match (&opts.router, shape) {
            (Some(url), _) => {
                let layout = Layout::from_router(http, url, &opts.baseline_dbs).await?;
                let name = format!("{url} ({} shards)", layout.shards.len());
                (url.clone(), None, layout, name, None)
            }
            (None, Some(shape)) => {
                let dir = tempfile::Builder::new().prefix("sharddb-bench-spec-").tempdir()?;
                let spec = dir.path().join(format!("{workload}.yaml"));
                std::fs::write(&spec, shape.yaml())?;
                let launch = launch_for(args);
                let cluster = tokio::task::spawn_blocking(move || LocalCluster::start_as(Some(&spec), &launch))
                    .await
                    .context("starting the local cluster")??;
                let layout = Layout::from_cluster(&cluster.cluster_file()?)?;
                (cluster.router.clone(), Some(cluster), layout, shape.describe(), Some(dir))
            }
            (None, None) => bail!("a local run needs a cluster shape"),
        };
        let router = Router::new(http.clone(), &router_url)?;
        router.wait_ready(Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let watched = layout.watched();
        let before = watched.sample();
        tokio::time::sleep(IDLE_SAMPLE).await;
        let idle = before.until(&watched.sample());
        let memory = ClusterMemory {
            workload: workload.into(),
            cluster: cluster_name.clone(),
            shard_server_rest_mib: max_mem(
                &layout,
                |l| l.servers.values().filter_map(|s| s.pid).collect(),
                |m| m.rss_mib,
            ),
            router_rest_mib: layout.router_pid.and_then(procstat::memory).map(|m| m.rss_mib),
            idle_cpu_cores: Some(idle.system_s() / idle.wall_s),
            idle_cpu_split: Some([idle.router_s, idle.shard_servers_s, idle.postgres_s].map(|c| c / idle.wall_s)),
            ..ClusterMemory::default()
        };
        let baseline = if layout.servers.values().all(|s| s.pg_url.is_some()) {
            let b = Baseline::connect(&layout, opts.concurrency).await.context("preparing the baseline")?;
            Some(Arc::new(b))
        } else {
            None
        };
        Ok(Target {
            router,
            layout,
            baseline,
            cluster,
            cluster_name,
            memory: local.then_some(memory),
            _spec_dir: spec_dir,
        })
    }

    /// Takes peak memory (for a local cluster), closes the baseline, stops the cluster and reads
    /// what its processes logged at WARN or ERROR.
    pub async fn close(mut self) -> Result<(Option<ClusterMemory>, Vec<LogWarnings>)> {
        let t = &mut self;
        if let Some(m) = &mut t.memory {
            m.shard_server_peak_mib =
                max_mem(&t.layout, |l| l.servers.values().filter_map(|s| s.pid).collect(), |m| m.peak_mib);
            m.router_peak_mib = t.layout.router_pid.and_then(procstat::memory).map(|m| m.peak_mib);
            m.postgres_process_peak_mib = max_mem(
                &t.layout,
                |l| {
                    l.servers
                        .values()
                        .filter_map(|s| s.pg_pid)
                        .flat_map(|p| std::iter::once(p).chain(procstat::children(p)))
                        .collect()
                },
                |m| m.peak_mib,
            );
        }
        if let Some(b) = t.baseline.take().and_then(Arc::into_inner) {
            b.close().await;
        }
        let mut warnings = Vec::new();
        if let Some(c) = t.cluster.take() {
            let dir = c.dir.path().join("logs");
            tokio::task::spawn_blocking(move || drop(c)).await?;
            warnings = log_warnings(&dir, t.memory.as_ref().map_or("", |m| m.workload.as_str()));
        }
        Ok((self.memory.take(), warnings))
    }
}

/// Lines logged at WARN or ERROR by each process (`<name>.log` in `dir`; Postgres logs skipped).
fn log_warnings(dir: &Path, workload: &str) -> Vec<LogWarnings> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(process) = name.strip_suffix(".log").filter(|p| !p.ends_with(".postgres")) else { continue };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest).trim().to_owned())
            .collect();
        if !lines.is_empty() {
            out.push(LogWarnings {
                workload: workload.into(),
                process: process.into(),
                count: lines.len() as u64,
                samples: lines.into_iter().take(3).map(|l| l.chars().take(400).collect()).collect(),
            });
        }
    }
    out
}

/// Removes terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The largest of `pick(memory)` over the processes `pids(layout)` names.
fn max_mem(layout: &Layout, pids: impl Fn(&Layout) -> Vec<u32>, pick: impl Fn(procstat::Memory) -> f64) -> Option<f64> {
    pids(layout).into_iter().filter_map(procstat::memory).map(pick).max_by(f64::total_cmp)
}

/// How to start a local cluster with `args`: this build's binaries, or those of the directory a
/// `--bin-dir=DIR` among them names (another release's `sharddb-operator`, `sharddb-router` and
/// `sharddb-shard-server`, e.g. from `scripts/build-previous-release.sh --release`), which the
/// operator is then also taken from.
pub fn launch_for(args: &[String]) -> Launch {
    let mut launch = Launch::default();
    for a in args {
        match a.strip_prefix("--bin-dir=") {
            Some(dir) => {
                launch.bin_dir = PathBuf::from(dir);
                launch.operator = launch.bin_dir.join("sharddb-operator");
            }
            None => launch.args.push(a.clone()),
        }
    }
    launch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bin_dir_among_the_flags_picks_every_binary_and_is_not_passed_on() {
        let args: Vec<String> = ["--x", "--bin-dir=/opt/prev", "--y=1"].map(String::from).to_vec();
        let l = launch_for(&args);
        assert_eq!(l.bin_dir, PathBuf::from("/opt/prev"));
        assert_eq!(l.operator, PathBuf::from("/opt/prev/sharddb-operator"));
        assert_eq!(l.args, ["--x", "--y=1"]);
        let plain = launch_for(&args[..1]);
        assert_eq!(plain.bin_dir, Launch::default().bin_dir);
        assert_eq!(plain.args, ["--x"]);
    }

    #[test]
    fn warnings_are_read_from_process_logs_only() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        std::fs::write(
            logs.join("router.log"),
            "2026-01-01T00:00:00Z  INFO router: up\n\u{1b}[2m2026-01-01T00:00:01Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m router: request failed detail=timeout\n",
        )
        .unwrap();
        std::fs::write(logs.join("Server0.postgres.log"), "2026 WARN x\n").unwrap();
        std::fs::write(logs.join("Server0.log"), "2026 INFO fine\n").unwrap();
        let w = log_warnings(logs, "a1");
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].process.as_str(), w[0].count), ("router", 1));
        assert_eq!(w[0].samples, ["WARN router: request failed detail=timeout"]);
    }
}
