//! The baseline: the same SQL the shard servers run, sent straight to the same Postgres databases
//! from sqlx pools, with no HTTP, router or shard server in between. It uses its own tables
//! (`bench_baseline_<server>_<shard>`, `bench_baseline_shards`, `bench_baseline_log`) beside the
//! system's, so the two never touch each other's rows; naming the copy after its server keeps the
//! copies apart even when several servers share one database (`--baseline-db` with `--router`). A write to a shard with r replicas commits the row upsert,
//! the bookkeeping update and the log insert in one transaction on the primary's database, then the
//! same transaction on the other r−1 databases in parallel, as the primary replicates. Does I/O.

use crate::bench::client::{Expect, KeyOnly, check_rows};
use crate::bench::layout::{Layout, row_marks, row_name};
use anyhow::{Context, Result, bail};
use futures::TryStreamExt as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Connections per database at most: each server's Postgres allows 100, and its shard server keeps
/// up to 16 of them.
pub const MAX_POOL: u32 = 80;

/// Only identifiers from a validated topology are spliced in, quoted; values are always bound.
fn sql(text: String) -> SqlStr {
    AssertSqlSafe(std::sync::Arc::<str>::from(text)).into_sql_str()
}

fn quote(ident: &str) -> Result<String> {
    shard_server::schema::check_ident("shard", ident)?;
    Ok(format!("\"{ident}\""))
}

/// The statements of one server's copy of one shard.
struct Statements {
    table: String,
    upsert: SqlStr,
    read: SqlStr,
}

/// One write's values, bound in every replica's transaction.
struct Batch<'a> {
    shard: usize,
    keys: &'a [i64],
    names: &'a [String],
    marks: &'a [i64],
    changes: &'a str,
}

/// Baseline tables and pools over a layout's databases.
pub struct Baseline {
    layout: Layout,
    /// By database URL (servers may share one).
    pools: BTreeMap<String, PgPool>,
    /// Server name → database URL.
    urls: BTreeMap<String, String>,
    /// By (shard index, server).
    statements: BTreeMap<(usize, String), Statements>,
    /// The snapshot SELECT on the system's own table, by shard index.
    snapshots: Vec<SqlStr>,
}

impl Baseline {
    /// Connects to every server's database (pools of `min(concurrency, MAX_POOL)`) and creates
    /// fresh baseline tables for the shards each holds.
    pub async fn connect(layout: &Layout, concurrency: usize) -> Result<Baseline> {
        let size = (concurrency as u32).clamp(1, MAX_POOL);
        let mut pools = BTreeMap::new();
        let mut urls = BTreeMap::new();
        for (name, s) in &layout.servers {
            let Some(url) = &s.pg_url else { bail!("server {name} has no database URL for the baseline") };
            urls.insert(name.clone(), url.clone());
            if pools.contains_key(url) {
                continue;
            }
            let opts = PgConnectOptions::from_str(url)?.application_name("sharddb-bench-baseline");
            let pool = PgPoolOptions::new()
                .max_connections(size)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(opts)
                .await
                .with_context(|| format!("connecting to the database of {name}"))?;
            pools.insert(url.clone(), pool);
        }
        let mut statements = BTreeMap::new();
        let mut snapshots = Vec::new();
        for (i, sh) in layout.shards.iter().enumerate() {
            for server in &sh.replicas {
                let table = quote(&format!("bench_baseline_{server}_{}", sh.id))?;
                let st = Statements {
                    upsert: sql(format!(
                        "INSERT INTO {table} (\"Stud_id\", \"Stud_name\", \"Stud_marks\") \
                         SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[]) \
                         ON CONFLICT (\"Stud_id\") DO UPDATE SET \"Stud_name\" = EXCLUDED.\"Stud_name\", \
                         \"Stud_marks\" = EXCLUDED.\"Stud_marks\""
                    )),
                    read: sql(format!(
                        "SELECT coalesce(json_agg(t ORDER BY \"Stud_id\"), '[]'::json)::text FROM \
                         (SELECT \"Stud_id\", \"Stud_name\", \"Stud_marks\" FROM {table} \
                         WHERE \"Stud_id\" BETWEEN $1 AND $2) t"
                    )),
                    table,
                };
                statements.insert((i, server.clone()), st);
            }
            let own = quote(&format!("shard_{}", sh.id))?;
            snapshots.push(sql(format!(
                "SELECT json_build_array(\"Stud_id\", \"Stud_name\", \"Stud_marks\")::text FROM {own} \
                 ORDER BY \"Stud_id\""
            )));
        }
        let b = Baseline { layout: layout.clone(), pools, urls, statements, snapshots };
        b.reset().await?;
        Ok(b)
    }

    /// Drops and recreates the baseline tables, empty.
    pub async fn reset(&self) -> Result<()> {
        for (url, pool) in &self.pools {
            let mut tx = pool.begin().await?;
            sqlx::query("DROP TABLE IF EXISTS bench_baseline_shards, bench_baseline_log").execute(&mut *tx).await?;
            sqlx::query(
                "CREATE TABLE bench_baseline_shards (server TEXT NOT NULL, shard TEXT NOT NULL, \
                 applied_seq BIGINT NOT NULL, PRIMARY KEY (server, shard))",
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "CREATE TABLE bench_baseline_log (server TEXT NOT NULL, shard TEXT NOT NULL, seq BIGINT NOT NULL, \
                 epoch BIGINT NOT NULL, changes JSONB NOT NULL, PRIMARY KEY (server, shard, seq))",
            )
            .execute(&mut *tx)
            .await?;
            for ((i, server), st) in self.statements.iter().filter(|((_, s), _)| self.urls.get(s) == Some(url)) {
                let table = &st.table;
                sqlx::query(sql(format!("DROP TABLE IF EXISTS {table}"))).execute(&mut *tx).await?;
                sqlx::query(sql(format!(
                    "CREATE TABLE {table} (\"Stud_id\" BIGINT PRIMARY KEY, \"Stud_name\" TEXT NOT NULL, \
                     \"Stud_marks\" BIGINT NOT NULL)"
                )))
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO bench_baseline_shards (server, shard, applied_seq) VALUES ($1, $2, 0)")
                    .bind(server)
                    .bind(&self.layout.shards[*i].id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Opens `min(n, pool size)` connections in every pool, so the timed phase does not pay for
    /// connection start-up (the shard servers' pools are warm too).
    pub async fn warm(&self, n: usize) -> Result<()> {
        for pool in self.pools.values() {
            let want = n.min(pool.options().get_max_connections() as usize);
            let conns = futures::future::try_join_all((0..want).map(|_| pool.acquire())).await?;
            drop(conns);
        }
        Ok(())
    }

    fn pool(&self, server: &str) -> Result<&PgPool> {
        self.urls.get(server).and_then(|u| self.pools.get(u)).with_context(|| format!("no pool for server {server}"))
    }

    fn statements(&self, shard: usize, server: &str) -> Result<&Statements> {
        self.statements
            .get(&(shard, server.to_owned()))
            .with_context(|| format!("server {server} holds no copy of shard {shard}"))
    }

    /// Writes `keys` (all in shard `shard`) as one batch: the primary's transaction, then the
    /// replicas' in parallel.
    pub async fn write(&self, shard: usize, keys: &[i64]) -> Result<()> {
        let sh = &self.layout.shards[shard];
        let names: Vec<String> = keys.iter().map(|k| row_name(*k)).collect();
        let marks: Vec<i64> = keys.iter().map(|k| row_marks(*k)).collect();
        let changes = serde_json::to_string(
            &keys
                .iter()
                .zip(&names)
                .zip(&marks)
                .map(|((k, n), m)| serde_json::json!({"key": k, "row": [k, n, m]}))
                .collect::<Vec<_>>(),
        )?;
        let batch = Batch { shard, keys, names: &names, marks: &marks, changes: &changes };
        let seq =
            self.apply(&batch, &sh.replicas[0], None).await.context("baseline write on the primary's database")?;
        futures::future::try_join_all(sh.replicas[1..].iter().map(|r| self.apply(&batch, r, Some(seq))))
            .await
            .context("baseline write on a replica's database")?;
        Ok(())
    }

    /// One server's transaction for a batch: the upsert, the sequence number (the next one on the
    /// primary, `seq` on a replica) and the log entry. Returns the sequence number.
    async fn apply(&self, b: &Batch<'_>, server: &str, seq: Option<i64>) -> Result<i64> {
        let shard = &self.layout.shards[b.shard].id;
        let st = self.statements(b.shard, server)?;
        let mut tx = self.pool(server)?.begin().await?;
        sqlx::query(st.upsert.clone()).bind(b.keys).bind(b.names).bind(b.marks).execute(&mut *tx).await?;
        let seq: i64 = match seq {
            None => {
                sqlx::query_scalar(
                    "UPDATE bench_baseline_shards SET applied_seq = applied_seq + 1 \
                     WHERE server = $1 AND shard = $2 RETURNING applied_seq",
                )
                .bind(server)
                .bind(shard)
                .fetch_one(&mut *tx)
                .await?
            }
            Some(seq) => {
                sqlx::query(
                    "UPDATE bench_baseline_shards SET applied_seq = GREATEST(applied_seq, $3) \
                     WHERE server = $1 AND shard = $2",
                )
                .bind(server)
                .bind(shard)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
                seq
            }
        };
        sqlx::query(
            "INSERT INTO bench_baseline_log (server, shard, seq, epoch, changes) VALUES ($1, $2, $3, 1, $4::jsonb)",
        )
        .bind(server)
        .bind(shard)
        .bind(seq)
        .bind(b.changes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Reads `[low, high]` the way the router does: the same SELECT on one replica of every shard
    /// it touches (`pick` chooses which), in parallel, rows merged in key order; checked.
    pub async fn read(&self, low: i64, high: i64, pick: usize, expect: Expect) -> Result<()> {
        let parts = self.layout.shards.iter().enumerate().filter(|(_, s)| s.low <= high && s.high_exclusive() > low);
        let texts = futures::future::try_join_all(parts.map(|(i, sh)| {
            let server = &sh.replicas[pick % sh.replicas.len()];
            let (lo, hi) = (low.max(sh.low), high.min(sh.high_exclusive() - 1));
            async move {
                let q = self.statements(i, server)?.read.clone();
                let text: String = sqlx::query_scalar(q).bind(lo).bind(hi).fetch_one(self.pool(server)?).await?;
                anyhow::Ok(text)
            }
        }))
        .await?;
        let mut rows: Vec<KeyOnly> = Vec::new();
        for t in texts {
            rows.extend(serde_json::from_str::<Vec<KeyOnly>>(&t)?);
        }
        check_rows(&rows, expect)
    }

    /// Fills the baseline tables of every replica with `keys` (untimed set-up, no bookkeeping).
    pub async fn preload(&self, keys: &[i64]) -> Result<()> {
        let mut by_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for k in keys {
            let s = self.layout.shard_of(*k).with_context(|| format!("key {k} is in no shard"))?;
            by_shard.entry(s).or_default().push(*k);
        }
        for (shard, keys) in by_shard {
            for server in &self.layout.shards[shard].replicas {
                for chunk in keys.chunks(5000) {
                    let names: Vec<String> = chunk.iter().map(|k| row_name(*k)).collect();
                    let marks: Vec<i64> = chunk.iter().map(|k| row_marks(*k)).collect();
                    sqlx::query(self.statements(shard, server)?.upsert.clone())
                        .bind(chunk)
                        .bind(names)
                        .bind(marks)
                        .execute(self.pool(server)?)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Streams the system's own table of `shard` from its primary's database with the snapshot's
    /// SELECT (read-only): the rate Postgres alone delivers rows at. Returns rows, bytes and time.
    pub async fn stream_shard(&self, shard: usize) -> Result<(u64, u64, Duration)> {
        let pool = self.pool(&self.layout.shards[shard].replicas[0])?;
        let start = Instant::now();
        let mut rows = sqlx::query_scalar::<_, String>(self.snapshots[shard].clone()).fetch(pool);
        let (mut n, mut bytes) = (0u64, 0u64);
        while let Some(r) = rows.try_next().await? {
            n += 1;
            bytes += r.len() as u64 + 1;
        }
        Ok((n, bytes, start.elapsed()))
    }

    /// `server_version` of the first database.
    pub async fn postgres_version(&self) -> Option<String> {
        let pool = self.pools.values().next()?;
        sqlx::query_scalar("SHOW server_version").fetch_one(pool).await.ok()
    }

    pub async fn close(self) {
        for p in self.pools.values() {
            p.close().await;
        }
    }
}
