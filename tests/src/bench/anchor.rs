//! The anchor: one plain Postgres, configured as the shard servers' are (fsync on), driven by
//! `pgbench` doing what each workload does through sharddb — single-row inserts of distinct keys,
//! point selects, 100-row inserts, range selects, an 80/20 mix — at the same concurrency, after a
//! warm-up. It answers "what would one Postgres on this machine do instead", which the baseline
//! (the same SQL as the shard servers, one transaction per request) does not: Postgres groups the
//! commits of concurrent clients by itself. Does I/O (a Postgres server, `pgbench` processes).

use crate::bench::procstat::{CpuUsage, Watched};
use anyhow::{Context, Result, bail, ensure};
use localpg::{LocalPg, Options};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// The database the anchor's table lives in.
const DB: &str = "anchor";
/// Keys the table holds at least before any select runs (more than the widest range read).
const MIN_KEYS: i64 = 50_000;

/// One kind of transaction `pgbench` runs, matching a sharddb workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// `INSERT` of one row with a new key.
    Insert,
    /// `SELECT` of one row by key.
    Select,
    /// `INSERT` of 100 rows with new consecutive keys, one statement.
    Insert100,
    /// `SELECT` of a range of `span` keys.
    Range { span: i64 },
    /// 80% `Select`, 20% `Insert`.
    Mixed,
}

impl Kind {
    /// What `pgbench` ran, for the report.
    pub fn describe(self) -> String {
        match self {
            Kind::Insert => "INSERT of one row with a new key".into(),
            Kind::Select => "SELECT of one row by key".into(),
            Kind::Insert100 => "INSERT of 100 rows with new keys, one statement".into(),
            Kind::Range { span } => format!("SELECT of {span} consecutive keys"),
            Kind::Mixed => "80% one-row SELECT, 20% one-row INSERT".into(),
        }
    }

    fn writes(self) -> bool {
        matches!(self, Kind::Insert | Kind::Insert100)
    }
}

/// `pgbench` scripts: keys come from a sequence, so every insert's keys are new and the table's
/// keys stay consecutive (selects draw from `1..=:n`).
fn script(kind: Kind) -> Vec<(&'static str, String, u32)> {
    let insert = "INSERT INTO rows (\"Stud_id\", \"Stud_name\", \"Stud_marks\") \
                  SELECT k, 's' || k, k % 100 FROM (SELECT nextval('keys') AS k) s;\n"
        .to_owned();
    let select = "\\set k random(1, :n)\n\
                  SELECT \"Stud_id\", \"Stud_name\", \"Stud_marks\" FROM rows WHERE \"Stud_id\" = :k;\n"
        .to_owned();
    match kind {
        Kind::Insert => vec![("insert", insert, 1)],
        Kind::Select => vec![("select", select, 1)],
        Kind::Insert100 => vec![(
            "insert100",
            "INSERT INTO rows (\"Stud_id\", \"Stud_name\", \"Stud_marks\") \
             SELECT k, 's' || k, k % 100 FROM (SELECT nextval('keys') AS k FROM generate_series(1, 100)) s;\n"
                .into(),
            1,
        )],
        Kind::Range { span } => vec![(
            "range",
            format!(
                "\\set k random(1, :n - {last})\n\
                 SELECT \"Stud_id\", \"Stud_name\", \"Stud_marks\" FROM rows \
                 WHERE \"Stud_id\" BETWEEN :k AND :k + {last} ORDER BY \"Stud_id\";\n",
                last = span.max(1) - 1
            ),
            1,
        )],
        Kind::Mixed => vec![("select", select, 80), ("insert", insert, 20)],
    }
}

/// What one `pgbench` run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    /// What ran (see [`Kind::describe`]).
    pub script: String,
    pub clients: usize,
    /// Transactions timed (the warm-up excluded).
    pub ops: u64,
    /// Failed transactions.
    pub errors: u64,
    pub ops_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// CPU seconds of the Postgres server (all its processes) per 1,000 transactions.
    pub cpu_s_per_1k_ops: Option<f64>,
    pub cpu: CpuUsage,
}

/// The plain Postgres server and what has been measured on it in this run.
pub struct Anchor {
    pg: LocalPg,
    /// Holds `pgbench`'s scripts and logs.
    work: tempfile::TempDir,
    clients: usize,
    /// Cached per kind: every workload of the same kind shares one measurement.
    measured: BTreeMap<Kind, Measured>,
    pub postgres_version: Option<String>,
}

impl Anchor {
    /// Starts a plain Postgres in a temporary directory (fsync on) with room for `clients`
    /// connections, and creates the table and the key sequence.
    pub fn start(clients: usize) -> Result<Anchor> {
        let dir = tempfile::Builder::new()
            .prefix("sharddb-bench-anchor-")
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()?;
        let mut opts = Options::new(dir.path().join("pgdata"));
        opts.max_connections = (clients as u32 + 10).max(100);
        let mut pg = LocalPg::new(opts).context("preparing the plain Postgres")?;
        pg.start().context("starting the plain Postgres")?;
        pg.create_database(DB)?;
        pg.psql(
            DB,
            "CREATE TABLE rows (\"Stud_id\" BIGINT PRIMARY KEY, \"Stud_name\" TEXT NOT NULL, \
             \"Stud_marks\" BIGINT NOT NULL); CREATE SEQUENCE keys;",
        )?;
        let postgres_version = pg.psql(DB, "SHOW server_version").ok();
        Ok(Anchor { pg, work: dir, clients: clients.max(1), measured: BTreeMap::new(), postgres_version })
    }

    /// Runs `kind` with `ops` transactions at the anchor's concurrency after `warmup` untimed
    /// ones, or returns the earlier measurement of the same kind.
    pub fn measure(&mut self, kind: Kind, ops: usize, warmup: usize) -> Result<Measured> {
        if let Some(m) = self.measured.get(&kind) {
            return Ok(m.clone());
        }
        if !kind.writes() {
            self.top_up()?;
        }
        let keys = self.keys()?;
        if warmup > 0 {
            self.pgbench(kind, warmup, keys, "warmup").context("pgbench warm-up")?;
        }
        let keys = self.keys()?;
        let m = self.pgbench(kind, ops, keys, "timed")?;
        self.measured.insert(kind, m.clone());
        Ok(m)
    }

    /// The keys the table holds: `1..=n`.
    fn keys(&self) -> Result<i64> {
        let n = self.pg.psql(DB, "SELECT coalesce(max(\"Stud_id\"), 0) FROM rows")?;
        n.trim().parse().with_context(|| format!("max key {n:?}"))
    }

    /// Fills the table to at least [`MIN_KEYS`] consecutive keys, so selects find what they ask.
    fn top_up(&self) -> Result<()> {
        self.pg.psql(
            DB,
            &format!(
                "INSERT INTO rows SELECT k, 's' || k, k % 100 FROM \
                 (SELECT nextval('keys') AS k FROM generate_series(1, greatest(0, {MIN_KEYS} - \
                 (SELECT count(*) FROM rows)))) s"
            ),
        )?;
        // Its own command: VACUUM cannot run inside the transaction a multi-statement `-c` is.
        self.pg.psql(DB, "VACUUM ANALYZE rows")?;
        Ok(())
    }

    fn pgbench(&self, kind: Kind, ops: usize, keys: i64, phase: &str) -> Result<Measured> {
        let clients = self.clients.min(ops.max(1));
        let per_client = ops.div_ceil(clients).max(1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(clients);
        let logs = self.work.path().join(format!("{phase}-{kind:?}").replace([' ', '{', '}', ':'], ""));
        std::fs::create_dir_all(&logs)?;
        let mut cmd = Command::new(self.pg.binaries().program("pgbench"));
        cmd.current_dir(&logs).args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.pg.port().to_string(),
            "-U",
            localpg::SUPERUSER,
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &threads.to_string(),
            "-t",
            &per_client.to_string(),
            "-D",
            &format!("n={}", keys.max(1)),
            "-l",
            "--log-prefix=tx",
        ]);
        for (name, text, weight) in script(kind) {
            let file = logs.join(format!("{name}.sql"));
            std::fs::write(&file, text)?;
            cmd.arg("-f").arg(format!("{}@{weight}", file.display()));
        }
        cmd.arg(DB);
        let watched = Watched { postgres: self.pg.pid().into_iter().collect(), ..Watched::default() };
        let before = watched.sample();
        let out = cmd.output().context("running pgbench")?;
        let cpu = before.until(&watched.sample());
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("pgbench failed ({}): {}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
        }
        let ops_per_s = parse_tps(&stdout).with_context(|| format!("no tps in pgbench's output:\n{stdout}"))?;
        let (latencies, errors) = read_logs(&logs)?;
        ensure!(!latencies.is_empty() || errors > 0, "pgbench logged no transaction in {}", logs.display());
        let ops = latencies.len() as u64 + errors;
        let (p50, p99, p999) = quantiles_ms(&latencies);
        Ok(Measured {
            script: kind.describe(),
            clients,
            ops,
            errors,
            ops_per_s,
            p50_ms: p50,
            p99_ms: p99,
            p999_ms: p999,
            cpu_s_per_1k_ops: (cpu.postgres_s > 0.0).then(|| cpu.postgres_s * 1000.0 / ops.max(1) as f64),
            cpu,
        })
    }
}

/// p50, p99 and p999 of latencies given in µs, in ms.
fn quantiles_ms(latencies_us: &[u64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    for us in latencies_us {
        h.saturating_record((*us).clamp(1, 600_000_000));
    }
    let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
    (q(0.5), q(0.99), q(0.999))
}

/// `tps = 17075.123456 (without initial connection time)`.
fn parse_tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Per-transaction latencies (µs) from `pgbench -l` logs in `dir` (one file per thread), and the
/// count of failed transactions. A line is `client_id transaction_no time script_no time_epoch
/// time_us ...`, where `time` is the latency in µs or a word for a failed transaction.
fn read_logs(dir: &Path) -> Result<(Vec<u64>, u64)> {
    let mut latencies = Vec::new();
    let mut errors = 0;
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let is_log = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tx."));
        if !is_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            match line.split_whitespace().nth(2).map(str::parse::<u64>) {
                Some(Ok(us)) => latencies.push(us),
                Some(Err(_)) => errors += 1,
                None => {}
            }
        }
    }
    Ok((latencies, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_output_and_logs_are_read() {
        let out = "transaction type: multiple scripts\nscaling factor: 1\n\
                   latency average = 5.857 ms\ninitial connection time = 40.049 ms\n\
                   tps = 17075.123456 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(17075.123456));
        assert_eq!(parse_tps("nothing"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tx.123"), "0 1 250 0 1700000000 1\n0 2 750 0 1700000000 5\n").unwrap();
        std::fs::write(dir.path().join("tx.123.1"), "1 1 failed 0 1700000000 9\n").unwrap();
        std::fs::write(dir.path().join("insert.sql"), "INSERT 1 2 3\n").unwrap();
        let (mut lat, errors) = read_logs(dir.path()).unwrap();
        lat.sort();
        assert_eq!((lat, errors), (vec![250, 750], 1));
    }

    #[test]
    fn scripts_draw_keys_inside_the_table() {
        let range = &script(Kind::Range { span: 100 })[0].1;
        assert!(range.contains("random(1, :n - 99)") && range.contains(":k + 99"), "{range}");
        let mixed = script(Kind::Mixed);
        assert_eq!(mixed.iter().map(|s| s.2).sum::<u32>(), 100);
        assert!(script(Kind::Insert)[0].1.contains("nextval('keys')"));
    }
}
