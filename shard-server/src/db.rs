//! All SQL of the shard server. One table per shard (`shard_<id>`), plus two bookkeeping tables:
//! `sharddb_shards` (per shard: the last applied sequence number, its schema, whether it is a
//! standalone shard configured by `/config`) and `sharddb_log` (recent replication entries, so a
//! lagging replica can catch up even after this server restarts). Data changes, the sequence number
//! and the log entry commit in one transaction, so they can never disagree. Identifiers are checked
//! by [`crate::schema::check_ident`] and quoted; values are always bound.

use crate::api::{Entry, SnapshotEnd, SnapshotHeader};
use crate::schema::{DType, Row, Schema, SchemaSpec, Value, quote};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row as _, SqlSafeStr, SqlStr, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("shard {shard} exists with schema {existing} but {wanted} was asked for")]
    SchemaMismatch { shard: String, existing: String, wanted: String },
    #[error("shard {shard}: expected applied seq {expected}, found another writer's change")]
    SeqRace { shard: String, expected: u64 },
    #[error("stored log entry of shard {shard} is unreadable: {source}")]
    BadLog {
        shard: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

impl DbError {
    /// Postgres refused a value itself (a data exception, SQLSTATE class 22, or a program limit,
    /// class 54), as opposed to failing: its message, which names the problem with the caller's
    /// data. Our own guard (22012, see [`Db::apply`]) is not such a refusal.
    pub fn refused_value(&self) -> Option<String> {
        match self {
            DbError::Sql(sqlx::Error::Database(e)) => {
                let code = e.code()?;
                let refused = (code.starts_with("22") && code != "22012") || code.starts_with("54");
                refused.then(|| e.message().to_owned())
            }
            _ => None,
        }
    }
}

/// The connection pool to this server's Postgres database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
}

/// A shard's table with its statements prepared as text once (sqlx caches the prepared form per
/// connection, keyed by this text).
#[derive(Debug)]
pub struct ShardTable {
    pub shard: String,
    pub schema: Schema,
    create: SqlStr,
    select_keys: SqlStr,
    all_rows: SqlStr,
    /// `COPY ... FROM STDIN` in the binary format (see [`crate::pgcopy`]), for installs.
    copy_in: String,
    /// Row count and [`crate::api::SnapshotEnd::digest`] of the table.
    digest: SqlStr,
    /// One replication entry as one statement: see [`Db::apply`].
    apply: SqlStr,
    read_ranges: SqlStr,
    /// Applied seq, copy id, history hash and row count in one statement (one snapshot, one round
    /// trip).
    position: SqlStr,
    truncate: SqlStr,
    stats: SqlStr,
    snapshot: SqlStr,
    objects: SqlStr,
}

/// The one place dynamic SQL is admitted: every identifier in it passed `check_ident` and is
/// quoted, and every value is a bind parameter. Shared (`Arc`) so each use is a cheap clone.
fn trusted(sql: String) -> SqlStr {
    AssertSqlSafe(std::sync::Arc::<str>::from(sql)).into_sql_str()
}

impl ShardTable {
    /// `shard` must have passed `check_ident` (the topology and `/config` check it).
    pub fn new(shard: &str, schema: Schema) -> Self {
        let table = quote(&format!("shard_{shard}"));
        let cols: Vec<String> = schema.columns().iter().map(|c| quote(c)).collect();
        let col_list = cols.join(", ");
        let key = quote(schema.key_name());
        let defs: Vec<String> = schema
            .columns()
            .iter()
            .zip(schema.dtypes())
            .enumerate()
            .map(|(i, (c, d))| {
                let pk = if i == schema.key_index() { " PRIMARY KEY" } else { " NOT NULL" };
                format!("{} {}{pk}", quote(c), d.sql_type())
            })
            .collect();
        // One array parameter per column, numbered from `$first`.
        let unnest = |first: usize| {
            schema
                .dtypes()
                .iter()
                .enumerate()
                .map(|(i, d)| format!("${}::{}[]", i + first, d.sql_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != schema.key_index())
            .map(|(_, c)| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let on_conflict = if sets.is_empty() {
            format!("ON CONFLICT ({key}) DO NOTHING")
        } else {
            format!("ON CONFLICT ({key}) DO UPDATE SET {}", sets.join(", "))
        };
        let n = schema.columns().len();
        ShardTable {
            shard: shard.to_owned(),
            create: trusted(format!("CREATE TABLE IF NOT EXISTS {table} ({})", defs.join(", "))),
            select_keys: trusted(format!("SELECT {col_list} FROM {table} WHERE {key} = ANY($1)")),
            all_rows: trusted(format!("SELECT {col_list} FROM {table} LIMIT $1")),
            copy_in: format!("COPY {table} ({col_list}) FROM STDIN (FORMAT binary)"),
            digest: trusted(format!(
                "SELECT count(*), coalesce(bit_xor(hashtextextended(t::text, 0)), 0) \
                 FROM (SELECT {col_list} FROM {table}) t"
            )),
            // $1: keys to delete; $2..=$n+1: one array per column of the rows to write; then the
            // shard, the entry's seq, its epoch, its changes as JSON and its history hash (or
            // NULL). Sub-statements of one statement run on one snapshot and commit together; the
            // last line turns a failed sequence guard (no row updated) into a division by zero,
            // which aborts all of them.
            apply: trusted(format!(
                "WITH del AS (DELETE FROM {table} WHERE {key} = ANY($1::BIGINT[])), \
                 ups AS (INSERT INTO {table} ({col_list}) SELECT * FROM UNNEST({unnest_shifted}) {on_conflict}), \
                 seq AS (UPDATE sharddb_shards SET applied_seq = ${s}, applied_hash = ${h} \
                         WHERE shard = ${sh} AND applied_seq = ${s} - 1 RETURNING 1), \
                 log AS (INSERT INTO sharddb_log (shard, seq, epoch, changes, hash) \
                         VALUES (${sh}, ${s}, ${e}, ${c}::jsonb, ${h})) \
                 SELECT 1 / (SELECT count(*)::INT FROM seq)",
                unnest_shifted = unnest(2),
                sh = n + 2,
                s = n + 3,
                e = n + 4,
                c = n + 5,
                h = n + 6,
            )),
            position: trusted(format!(
                "SELECT s.applied_seq, s.copy_id, s.applied_hash, (SELECT count(*) FROM {table}) \
                 FROM sharddb_shards s WHERE s.shard = $1"
            )),
            truncate: trusted(format!("TRUNCATE {table}")),
            // One JSON array per (low, high) pair, in the order given.
            read_ranges: trusted(format!(
                "SELECT (SELECT coalesce(json_agg(t ORDER BY {key}), '[]'::json)::text \
                         FROM (SELECT {col_list} FROM {table} WHERE {key} BETWEEN r.low AND r.high) t) \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[]) WITH ORDINALITY AS r(low, high, i) ORDER BY r.i"
            )),
            // Order-independent: the sum of a 60-bit hash of each row's JSON text.
            stats: trusted(format!(
                "SELECT count(*), coalesce(sum(('x' || substr(md5(row_to_json(t)::text), 1, 15))::bit(60)::bigint), 0)::text \
                 FROM (SELECT {col_list} FROM {table}) t"
            )),
            // Each row with its share of the digest (the same expression as `digest`).
            snapshot: trusted(format!(
                "SELECT json_build_array({col_list})::text, hashtextextended(t::text, 0) \
                 FROM (SELECT {col_list} FROM {table}) t ORDER BY {key}"
            )),
            objects: trusted(format!(
                "SELECT row_to_json(t)::text FROM (SELECT {col_list} FROM {table} ORDER BY {key}) t"
            )),
            schema,
        }
    }

    fn decode(&self, r: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
        let mut values = Vec::with_capacity(self.schema.columns().len());
        for (i, d) in self.schema.dtypes().iter().enumerate() {
            values.push(match d {
                DType::Number => Value::Int(r.try_get(i)?),
                DType::String => Value::Text(r.try_get(i)?),
            });
        }
        Ok(Row(values))
    }
}

/// A shard as recorded in `sharddb_shards`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredShard {
    pub shard: String,
    pub applied_seq: u64,
    pub schema: SchemaSpec,
    pub standalone: bool,
}

/// Row count and checksum of a shard at one sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStats {
    pub applied_seq: u64,
    /// The running hash of the copy's history at `applied_seq`, when known (see
    /// `replication::divergence`).
    pub hash: Option<String>,
    pub rows: i64,
    pub checksum: Option<String>,
    /// Identity of this copy: new whenever the copy starts empty (a fresh table, a lost volume,
    /// an installed snapshot), so the operator can tell a copy that lost its data from one behind.
    pub copy_id: String,
}

fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).expect("sequence numbers stay below 2^63")
}

fn seq_from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A pooled connection idle this long is pinged before use (see [`Db::connect`]).
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

impl Db {
    /// Connects and creates the bookkeeping tables.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        let opts = PgConnectOptions::from_str(url)?.application_name("sharddb-shard-server");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A fixed-size pool, opened in the background from the start: a new connection to a
            // password-protected Postgres costs a SCRAM exchange (PBKDF2, 4096 rounds, which sqlx
            // computes in small steps between other tasks), so a pool that grew on demand made the
            // first burst of writes after /init wait for connections being opened, and the
            // operator's `/status` probes queued behind them until they timed out (the server
            // was then demoted as unreachable).
            .min_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings every connection it hands out by default: one more round trip to
            // Postgres per statement, which on the write path (one statement per replication
            // entry and copy) cost more CPU than the statement's own planning. A connection in
            // steady use proves itself on every statement, so only one that sat idle (across a
            // Postgres restart, say) is pinged; a statement that still meets a dead connection
            // fails like any Postgres error, and the pool drops that connection.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(opts)
            .await?;
        let db = Db { pool };
        db.init().await?;
        Ok(db)
    }

    /// A pool that never connects until used, for unit tests of code that must not reach it.
    #[cfg(test)]
    pub fn unconnected() -> Db {
        let opts = PgConnectOptions::new().host("127.0.0.1").port(1);
        Db { pool: PgPoolOptions::new().acquire_timeout(Duration::from_millis(100)).connect_lazy_with(opts) }
    }

    /// [`Db::connect`], retrying with backoff until `patience` runs out: in a pod the database
    /// container may start after the server, and a loaded machine may be slow to accept.
    pub async fn connect_patiently(url: &str, max_connections: u32, patience: Duration) -> Result<Db, DbError> {
        let mut wait = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Db::connect(url, max_connections).await {
                Ok(db) => return Ok(db),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "postgres not reachable yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn init(&self) -> Result<(), DbError> {
        // Two servers starting on one fresh database would race on CREATE; the advisory lock orders them.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(726354)").execute(&mut *tx).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS sharddb_shards (
                shard TEXT PRIMARY KEY,
                applied_seq BIGINT NOT NULL,
                schema JSONB NOT NULL,
                standalone BOOLEAN NOT NULL DEFAULT FALSE,
                copy_id TEXT NOT NULL DEFAULT gen_random_uuid()::text)",
        )
        .execute(&mut *tx)
        .await?;
        // Databases created before copies had an identity get one.
        sqlx::query(
            "ALTER TABLE sharddb_shards ADD COLUMN IF NOT EXISTS copy_id TEXT NOT NULL DEFAULT gen_random_uuid()::text",
        )
        .execute(&mut *tx)
        .await?;
        // Databases created before histories were hashed: the hash is unknown (NULL) until a
        // snapshot brings one.
        sqlx::query("ALTER TABLE sharddb_shards ADD COLUMN IF NOT EXISTS applied_hash TEXT").execute(&mut *tx).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS sharddb_log (
                shard TEXT NOT NULL,
                seq BIGINT NOT NULL,
                epoch BIGINT NOT NULL,
                changes JSONB NOT NULL,
                PRIMARY KEY (shard, seq))",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("ALTER TABLE sharddb_log ADD COLUMN IF NOT EXISTS hash TEXT").execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every shard recorded in this database.
    pub async fn stored_shards(&self) -> Result<Vec<StoredShard>, DbError> {
        let rows =
            sqlx::query("SELECT shard, applied_seq, schema::text, standalone FROM sharddb_shards ORDER BY shard")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|r| {
                let schema: String = r.try_get(2)?;
                let shard: String = r.try_get(0)?;
                let schema =
                    serde_json::from_str(&schema).map_err(|source| DbError::BadLog { shard: shard.clone(), source })?;
                Ok(StoredShard { shard, applied_seq: seq_from_sql(r.try_get(1)?), schema, standalone: r.try_get(3)? })
            })
            .collect()
    }

    /// Creates the shard's table and bookkeeping row if missing; returns its applied seq. A shard that
    /// exists with another schema is an error, never silently altered.
    /// Returns the applied seq and the copy's identity.
    pub async fn ensure_shard(
        &self,
        t: &ShardTable,
        standalone: bool,
    ) -> Result<(u64, String, Option<String>), DbError> {
        let spec = serde_json::to_string(&t.schema.to_spec()).expect("schema serialises");
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(726354)").execute(&mut *tx).await?;
        sqlx::query(t.create.clone()).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO sharddb_shards (shard, applied_seq, schema, standalone) VALUES ($1, 0, $2::jsonb, $3)
             ON CONFLICT (shard) DO NOTHING",
        )
        .bind(&t.shard)
        .bind(&spec)
        .bind(standalone)
        .execute(&mut *tx)
        .await?;
        let r =
            sqlx::query("SELECT applied_seq, schema::text, copy_id, applied_hash FROM sharddb_shards WHERE shard = $1")
                .bind(&t.shard)
                .fetch_one(&mut *tx)
                .await?;
        let existing: String = r.try_get(1)?;
        let existing_spec: SchemaSpec =
            serde_json::from_str(&existing).map_err(|source| DbError::BadLog { shard: t.shard.clone(), source })?;
        if Schema::try_from(existing_spec).ok().as_ref() != Some(&t.schema) {
            return Err(DbError::SchemaMismatch { shard: t.shard.clone(), existing, wanted: spec });
        }
        if standalone {
            sqlx::query("UPDATE sharddb_shards SET standalone = TRUE WHERE shard = $1")
                .bind(&t.shard)
                .execute(&mut *tx)
                .await?;
        }
        let applied = seq_from_sql(r.try_get(0)?);
        let copy_id: String = r.try_get(2)?;
        let hash: Option<String> = r.try_get(3)?;
        tx.commit().await?;
        Ok((applied, copy_id, hash))
    }

    /// The stored rows for `keys` (absent keys are simply missing from the map).
    pub async fn fetch_rows(&self, t: &ShardTable, keys: &[i64]) -> Result<HashMap<i64, Row>, DbError> {
        let rows = sqlx::query(t.select_keys.clone()).bind(keys).fetch_all(&self.pool).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in &rows {
            let row = t.decode(r)?;
            out.insert(row.key(&t.schema), row);
        }
        Ok(out)
    }

    /// Applies one replication entry: final row states, the new applied seq (which must follow
    /// `entry.seq - 1`, checked in SQL as a guard against a second writer) and the log entry, all in
    /// one statement, hence one transaction and one round trip (five before, which was most of the
    /// Postgres and shard-server CPU a write cost).
    pub async fn apply(&self, t: &ShardTable, entry: &Entry) -> Result<(), DbError> {
        let deletes: Vec<i64> = entry.changes.iter().filter(|c| c.row.is_none()).map(|c| c.key).collect();
        let rows: Vec<&Row> = entry.changes.iter().filter_map(|c| c.row.as_ref()).collect();
        let changes = serde_json::to_string(&entry.changes).expect("changes serialise");
        let q = bind_columns(sqlx::query(t.apply.clone()).bind(deletes), t, &rows)
            .bind(&t.shard)
            .bind(seq_to_sql(entry.seq))
            .bind(seq_to_sql(entry.epoch))
            .bind(changes)
            .bind(entry.hash.as_deref());
        match q.execute(&self.pool).await {
            Ok(_) => Ok(()),
            // The guard: another writer moved the shard's seq (division by zero), or already
            // logged this seq.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("22012") || e.constraint() == Some("sharddb_log_pkey") =>
            {
                Err(DbError::SeqRace { shard: t.shard.clone(), expected: entry.seq - 1 })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every row of the shard when it holds at most `limit`, else `None`.
    pub async fn all_rows(&self, t: &ShardTable, limit: usize) -> Result<Option<Vec<Row>>, DbError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX - 1);
        let rows = sqlx::query(t.all_rows.clone()).bind(limit + 1).fetch_all(&self.pool).await?;
        if rows.len() as i64 > limit {
            return Ok(None);
        }
        rows.iter().map(|r| t.decode(r).map_err(DbError::from)).collect::<Result<Vec<_>, _>>().map(Some)
    }

    /// Log entries `from..=to` that are still kept, in order.
    pub async fn log_entries(&self, shard: &str, from: u64, to: u64) -> Result<Vec<Entry>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, epoch, changes::text, hash FROM sharddb_log WHERE shard = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
        )
        .bind(shard)
        .bind(seq_to_sql(from))
        .bind(seq_to_sql(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let changes: String = r.try_get(2)?;
                Ok(Entry {
                    seq: seq_from_sql(r.try_get(0)?),
                    epoch: seq_from_sql(r.try_get(1)?),
                    changes: serde_json::from_str(&changes)
                        .map_err(|source| DbError::BadLog { shard: shard.to_owned(), source })?,
                    hash: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The epoch and history hash (when recorded) of log entry `seq`, if it is still kept.
    pub async fn log_identity(&self, shard: &str, seq: u64) -> Result<Option<(u64, Option<String>)>, DbError> {
        let row: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT epoch, hash FROM sharddb_log WHERE shard = $1 AND seq = $2")
                .bind(shard)
                .bind(seq_to_sql(seq))
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(epoch, hash)| (seq_from_sql(epoch), hash)))
    }

    /// Gives the shard's copy a new identity, so that the operator, which recorded the old one,
    /// treats it as a different copy: refused for reads and writes until copied afresh.
    pub async fn renew_copy_id(&self, shard: &str) -> Result<String, DbError> {
        Ok(sqlx::query_scalar(
            "UPDATE sharddb_shards SET copy_id = gen_random_uuid()::text WHERE shard = $1 RETURNING copy_id",
        )
        .bind(shard)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Forgets log entries older than `keep_from`.
    pub async fn trim_log(&self, shard: &str, keep_from: u64) -> Result<u64, DbError> {
        let r = sqlx::query("DELETE FROM sharddb_log WHERE shard = $1 AND seq < $2")
            .bind(shard)
            .bind(seq_to_sql(keep_from))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Starts replacing a shard's rows: empties the table, drops its primary key index (rebuilt by
    /// [`Installer::restore_key`] once every row is in: one sort instead of an index insertion per
    /// row) and forgets its log, in a transaction that [`Installer::finish`] commits.
    pub async fn begin_install(&self, t: &ShardTable) -> Result<Installer, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(t.truncate.clone()).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM sharddb_log WHERE shard = $1").bind(&t.shard).execute(&mut *tx).await?;
        let table = quote(&format!("shard_{}", t.shard));
        // The constraint's name is Postgres's choice (`shard_<id>_pkey` unless that was taken), so
        // it is read from the catalog, checked like any identifier, and the key is rebuilt under it.
        let key: Option<String> = sqlx::query_scalar(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'",
        )
        .bind(&table)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(name) = &key {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(DbError::Unexpected(format!("primary key of {table} is named {name:?}")));
            }
            sqlx::query(trusted(format!("ALTER TABLE {table} DROP CONSTRAINT {}", quote(name))))
                .execute(&mut *tx)
                .await?;
        }
        Ok(Installer { tx, table, key })
    }

    /// The rows of each range as one JSON array text per range (sorted by key), in the order
    /// given, from one statement.
    pub async fn read_ranges_json(&self, t: &ShardTable, ranges: &[(i64, i64)]) -> Result<Vec<String>, DbError> {
        let (lows, highs): (Vec<i64>, Vec<i64>) = ranges.iter().copied().unzip();
        Ok(sqlx::query_scalar(t.read_ranges.clone()).bind(lows).bind(highs).fetch_all(&self.pool).await?)
    }

    /// Applied seq, row count and (optionally) checksum, all from one snapshot.
    pub async fn stats(&self, t: &ShardTable, checksum: bool) -> Result<ShardStats, DbError> {
        if !checksum {
            // The operator probes every server's `/status` each second, also under heavy write
            // load: one statement (one snapshot) and one round trip, not a transaction of five.
            let (applied, copy_id, hash, rows): (i64, String, Option<String>, i64) =
                sqlx::query_as(t.position.clone()).bind(&t.shard).fetch_one(&self.pool).await?;
            return Ok(ShardStats { applied_seq: seq_from_sql(applied), hash, rows, checksum: None, copy_id });
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let (applied, copy_id, hash): (i64, String, Option<String>) =
            sqlx::query_as("SELECT applied_seq, copy_id, applied_hash FROM sharddb_shards WHERE shard = $1")
                .bind(&t.shard)
                .fetch_one(&mut *tx)
                .await?;
        let r = sqlx::query(t.stats.clone()).fetch_one(&mut *tx).await?;
        let (rows, sum) = (r.try_get::<i64, _>(0)?, r.try_get::<String, _>(1)?);
        tx.commit().await?;
        Ok(ShardStats { applied_seq: seq_from_sql(applied), hash, rows, checksum: Some(sum), copy_id })
    }

    /// Streams a consistent snapshot of the shard as newline-delimited JSON into `out`: a
    /// [`SnapshotHeader`], one positional row per line, a [`SnapshotEnd`]. Rows flow from Postgres
    /// to the channel as they arrive, so memory stays bounded by the channel, whatever the shard's size.
    pub async fn snapshot(&self, t: &ShardTable, out: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let (applied, hash): (i64, Option<String>) =
            sqlx::query_as("SELECT applied_seq, applied_hash FROM sharddb_shards WHERE shard = $1")
                .bind(&t.shard)
                .fetch_one(&mut *tx)
                .await?;
        let header =
            SnapshotHeader { shard: t.shard.clone(), seq: seq_from_sql(applied), schema: t.schema.to_spec(), hash };
        let mut line = serde_json::to_vec(&header).expect("header serialises");
        line.push(b'\n');
        if out.send(line.into()).await.is_err() {
            return Ok(());
        }
        let mut count = 0u64;
        let mut digest = 0i64;
        let mut buf = Vec::with_capacity(64 * 1024);
        {
            let mut rows = sqlx::query_as::<_, (String, i64)>(t.snapshot.clone()).fetch(&mut *tx);
            while let Some((row, hash)) = rows.try_next().await? {
                buf.extend_from_slice(row.as_bytes());
                buf.push(b'\n');
                count += 1;
                digest ^= hash;
                if buf.len() >= 60 * 1024 && out.send(std::mem::take(&mut buf).into()).await.is_err() {
                    return Ok(()); // the reader went away
                }
            }
        }
        tx.commit().await?;
        let end = SnapshotEnd { end: true, rows: count, digest: Some(digest.to_string()) };
        buf.extend_from_slice(&serde_json::to_vec(&end).expect("end serialises"));
        buf.push(b'\n');
        let _ = out.send(buf.into()).await;
        Ok(())
    }

    /// Streams every row of the shard as seed-format JSON objects (for `/copy`), comma-separated,
    /// into `out`. Same bounded-memory argument as [`Db::snapshot`].
    pub async fn stream_objects(
        &self,
        t: &ShardTable,
        out: &tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<bool, DbError> {
        let mut rows = sqlx::query_scalar::<_, String>(t.objects.clone()).fetch(&self.pool);
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut first = true;
        while let Some(row) = rows.try_next().await? {
            if !first {
                buf.push(b',');
            }
            first = false;
            buf.extend_from_slice(row.as_bytes());
            if buf.len() >= 60 * 1024 && out.send(std::mem::take(&mut buf).into()).await.is_err() {
                return Ok(false);
            }
        }
        Ok(buf.is_empty() || out.send(buf.into()).await.is_ok())
    }
}

/// Binds one array per schema column, holding `rows`' values in that column.
fn bind_columns<'q>(
    mut q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    t: &ShardTable,
    rows: &[&Row],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for (i, d) in t.schema.dtypes().iter().enumerate() {
        q = match d {
            DType::Number => q.bind(
                rows.iter()
                    .map(|r| match &r.0[i] {
                        Value::Int(v) => *v,
                        Value::Text(_) => unreachable!("rows are checked against the schema before they get here"),
                    })
                    .collect::<Vec<i64>>(),
            ),
            DType::String => q.bind(
                rows.iter()
                    .map(|r| match &r.0[i] {
                        Value::Text(v) => v.clone(),
                        Value::Int(_) => unreachable!("rows are checked against the schema before they get here"),
                    })
                    .collect::<Vec<String>>(),
            ),
        };
    }
    q
}

/// A snapshot being installed: the shard emptied and refilled inside one transaction, so a failure
/// half-way leaves the previous copy as it was. Steps, in order: [`Installer::copy_rows`],
/// [`Installer::restore_key`], [`Installer::digest`] (optional), [`Installer::finish`].
pub struct Installer {
    tx: Transaction<'static, Postgres>,
    /// The table, quoted.
    table: String,
    /// The name of the primary key constraint dropped by [`Db::begin_install`].
    key: Option<String>,
}

/// What [`Installer::copy_rows`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Copied {
    pub rows: u64,
    /// Time spent waiting for Postgres to take the data.
    pub wait: Duration,
}

impl Installer {
    /// Copies rows into the table with one `COPY ... FROM STDIN (FORMAT binary)`: `chunks` carries
    /// tuples encoded by [`crate::pgcopy::encode_row`], and the copy ends when its sender is
    /// dropped. A copy that ends early (the sender gave up) is still a valid copy of fewer rows;
    /// the caller compares the count with what it expected before finishing.
    pub async fn copy_rows(
        &mut self,
        t: &ShardTable,
        mut chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<Copied, DbError> {
        let mut copy = self.tx.copy_in_raw(&t.copy_in).await?;
        let mut wait = Duration::ZERO;
        copy.send(crate::pgcopy::HEADER).await?;
        while let Some(chunk) = chunks.recv().await {
            let sent = std::time::Instant::now();
            copy.send(chunk).await?;
            wait += sent.elapsed();
        }
        copy.send(crate::pgcopy::TRAILER).await?;
        let sent = std::time::Instant::now();
        let rows = copy.finish().await?;
        Ok(Copied { rows, wait: wait + sent.elapsed() })
    }

    /// Rebuilds the primary key dropped by [`Db::begin_install`]; fails if two rows share a key.
    pub async fn restore_key(&mut self, t: &ShardTable) -> Result<(), DbError> {
        let key = quote(t.schema.key_name());
        let named = self.key.as_deref().map_or_else(String::new, |n| format!("CONSTRAINT {} ", quote(n)));
        let table = &self.table;
        sqlx::query(trusted(format!("ALTER TABLE {table} ADD {named}PRIMARY KEY ({key})")))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Row count and digest of the rows installed so far (see [`crate::api::SnapshotEnd::digest`]).
    pub async fn digest(&mut self, t: &ShardTable) -> Result<(i64, String), DbError> {
        let (rows, digest): (i64, i64) = sqlx::query_as(t.digest.clone()).fetch_one(&mut *self.tx).await?;
        Ok((rows, digest.to_string()))
    }

    /// Records the snapshot's sequence number and commits.
    /// Records the snapshot's sequence number, gives the copy a new identity and commits; returns it.
    pub async fn finish(mut self, t: &ShardTable, seq: u64, hash: Option<&str>) -> Result<String, DbError> {
        let copy_id: String = sqlx::query_scalar(
            "UPDATE sharddb_shards SET applied_seq = $2, applied_hash = $3, copy_id = gen_random_uuid()::text \
             WHERE shard = $1 RETURNING copy_id",
        )
        .bind(&t.shard)
        .bind(seq_to_sql(seq))
        .bind(hash)
        .fetch_one(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(copy_id)
    }
}
