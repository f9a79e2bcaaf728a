//! What readers may see, against a real Postgres: a write's effect shows nowhere before it is
//! confirmed (every ready replica holds it), reads of other keys are not held up meanwhile, and
//! primaries serve reads only under the operator's lease, which also bounds their replicas'.

mod common;

use common::Cluster;
use shard_server::api::{ErrorCode, KeyRange, Op, PrimaryLeaseRequest, WriteRequest};
use shard_server::schema::{Row, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn row(k: i64, name: &str) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(k % 100)])
}

fn write(ops: Vec<Op>) -> WriteRequest {
    WriteRequest { epoch: Some(1), ops, dry_run: false }
}

/// The name stored for key `k` on server `i`, or the error code of the read.
async fn name_at(c: &Cluster, i: usize, k: i64) -> Result<Option<String>, Option<ErrorCode>> {
    let data = c.client(i).read("sh1", "Stud_id", KeyRange { low: k, high: k }).await.map_err(|e| e.code())?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(data.get()).unwrap();
    Ok(rows.first().map(|r| r["Stud_name"].as_str().unwrap().to_owned()))
}

/// The primary commits an entry its replica cannot apply (its table is locked): the write is not
/// acknowledged, and the entry's key shows its old value on neither copy (readers of it wait, then
/// are told to try elsewhere), while other keys are read as usual. Once the replica applies, the
/// new value shows everywhere.
#[tokio::test]
async fn a_write_not_confirmed_shows_nowhere_and_holds_up_only_its_keys() {
    use sqlx::Connection;
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0)
        .write("sh1", &write(vec![Op::Insert { row: row(1, "old") }, Op::Insert { row: row(2, "b") }]))
        .await
        .unwrap();
    let mut lock = sqlx::PgConnection::connect(&c.servers[1].db_url).await.unwrap();
    let mut tx = lock.begin().await.unwrap();
    sqlx::query(r#"LOCK TABLE "shard_sh1" IN EXCLUSIVE MODE"#).execute(&mut *tx).await.unwrap();

    let e = c.client(0).write("sh1", &write(vec![Op::Update { key: 1, row: row(1, "new") }])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "not confirmed by the replica: {e}");
    // Committed on the primary, pending there: neither the new value nor the old one is shown.
    assert_eq!(name_at(&c, 0, 1).await, Err(Some(ErrorCode::NotReady)));
    assert_eq!(name_at(&c, 0, 2).await, Ok(Some("b".into())), "another key is read as usual");
    assert_eq!(name_at(&c, 1, 1).await, Ok(Some("old".into())), "the replica has not applied it");

    // The replica applies again: the next attempt (or the primary's own retry) confirms it.
    tx.rollback().await.unwrap();
    c.client(0).write("sh1", &write(vec![Op::Update { key: 1, row: row(1, "new") }])).await.unwrap();
    for i in 0..2 {
        assert_eq!(name_at(&c, i, 1).await, Ok(Some("new".into())), "server {i}");
    }
}

/// A primary stays readable only while the operator keeps granting its lease; a replica's lease
/// never outlasts its primary's, so both stop, and both come back with the next grant.
#[tokio::test]
async fn reads_stop_when_the_primary_lease_runs_out_and_resume_with_the_next_grant() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(1, "a") }])).await.unwrap();
    assert_eq!(name_at(&c, 0, 1).await, Ok(Some("a".into())));
    assert_eq!(name_at(&c, 1, 1).await, Ok(Some("a".into())));

    c.granting.store(false, Ordering::Relaxed);
    // The harness grants 2 s leases: both copies stop within that (and the replica's renewals).
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..2 {
        loop {
            match name_at(&c, i, 1).await {
                Err(Some(ErrorCode::NotReady)) => break,
                other => {
                    assert!(Instant::now() < deadline, "server {i} still serves reads: {other:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Writes need no lease: a deposed primary cannot get them acknowledged anyway (its replicas
    // follow the new primary), and this one is not deposed.
    c.client(0).write("sh1", &write(vec![Op::Update { key: 1, row: row(1, "b") }])).await.unwrap();

    c.granting.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..2 {
        loop {
            match name_at(&c, i, 1).await {
                Ok(name) => {
                    assert_eq!(name.as_deref(), Some("b"), "server {i}");
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "server {i} serves no reads again: {e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A lease is measured from a token the server handed out; a token from an earlier start of the
/// server names nothing and is refused, and a lease that would be measured from it grants nothing.
#[tokio::test]
async fn a_token_of_an_earlier_start_is_refused() {
    let mut c = Cluster::start(1, &[("sh1", 0, 1000, 0, &[0])]).await;
    let token = c.client(0).status(false).await.unwrap().lease_token.expect("a token");
    let req = PrimaryLeaseRequest { token, epoch: 1, shards: vec!["sh1".into()], lease_ms: 2000 };
    let granted = c.client(0).primary_lease(&req).await.unwrap();
    assert_eq!(granted.granted, ["sh1"]);
    assert!(granted.next_token.at_us >= token.at_us);
    let newer_epoch = PrimaryLeaseRequest { epoch: 2, ..req.clone() };
    assert!(c.client(0).primary_lease(&newer_epoch).await.unwrap().granted.is_empty(), "a topology not seen yet");

    c.kill(0).await;
    c.restart(0).await;
    let e = c.client(0).primary_lease(&req).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");
    let bad = PrimaryLeaseRequest { lease_ms: 0, ..req };
    let e = c.client(0).primary_lease(&bad).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
}

/// A primary whose newest entry is not in its own log (its state came from a snapshot, which
/// leaves no log rows, or the log was trimmed past it) restarts: its state is visible but not
/// confirmed, and only an empty group can confirm it. That group cannot send the replica the
/// entry it lacks; it asks the replica's position instead and compares their histories, so
/// reads are served again without any write coming along.
#[tokio::test]
async fn a_restarted_primary_whose_log_lacks_its_newest_entry_confirms_its_state_without_a_write() {
    use sqlx::Connection;
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(1, "a") }])).await.unwrap();
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(2, "b") }])).await.unwrap();
    c.kill(0).await;
    let mut conn = sqlx::PgConnection::connect(&c.servers[0].db_url).await.unwrap();
    let gone = sqlx::query("DELETE FROM sharddb_log WHERE shard = 'sh1'").execute(&mut conn).await.unwrap();
    assert_eq!(gone.rows_affected(), 2, "the primary's log held both entries");
    c.restart(0).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while Instant::now() < deadline {
        last = Some(name_at(&c, 0, 1).await);
        if last == Some(Ok(Some("a".into()))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, Some(Ok(Some("a".into()))), "the restarted primary serves its confirmed state again");
    assert_eq!(name_at(&c, 1, 2).await, Ok(Some("b".into())), "and so does its replica");
    // Writes go on from there: the replica is sent the next entry as usual.
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(3, "c") }])).await.unwrap();
    assert_eq!(name_at(&c, 1, 3).await, Ok(Some("c".into())));
}

/// The same primary, but its replica's history at that number is another one (its stored history
/// hash differs): nothing confirms the primary's state, so neither copy serves it. Watched for
/// longer than the primary above needed to serve again.
#[tokio::test]
async fn a_primary_whose_log_lacks_its_newest_entry_confirms_nothing_against_another_history() {
    use sqlx::Connection;
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(1, "a") }])).await.unwrap();
    c.kill(0).await;
    c.kill(1).await;
    let mut primary = sqlx::PgConnection::connect(&c.servers[0].db_url).await.unwrap();
    sqlx::query("DELETE FROM sharddb_log WHERE shard = 'sh1'").execute(&mut primary).await.unwrap();
    let mut replica = sqlx::PgConnection::connect(&c.servers[1].db_url).await.unwrap();
    let other = "0123456789abcdef0123456789abcdef";
    let changed = sqlx::query("UPDATE sharddb_shards SET applied_hash = $1 WHERE shard = 'sh1' AND applied_hash <> $1")
        .bind(other)
        .execute(&mut replica)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1, "the replica's history now reads as another one");
    c.restart(1).await;
    c.restart(0).await;

    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert_eq!(name_at(&c, 0, 1).await, Err(Some(ErrorCode::NotReady)), "the primary's state stays unconfirmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
