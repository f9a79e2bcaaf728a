//! The shard server's SQL against a real throwaway Postgres: applying replication entries (one
//! statement each) and its guard against a second writer.

use localpg::LocalPg;
use shard_server::api::{Change, Entry};
use shard_server::db::{Db, DbError, ShardTable};
use shard_server::schema::{DType, Row, Schema, Value};

fn row(k: i64, name: &str) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(k % 100)])
}

fn entry(seq: u64, changes: Vec<(i64, Option<&str>)>) -> Entry {
    Entry {
        seq,
        epoch: 7,
        changes: changes.into_iter().map(|(key, name)| Change { key, row: name.map(|n| row(key, n)) }).collect(),
        hash: None,
    }
}

#[tokio::test]
async fn entries_apply_in_sequence_and_a_second_writer_changes_nothing() {
    let pg = tokio::task::spawn_blocking(LocalPg::temporary).await.unwrap().expect("throwaway postgres");
    pg.create_database("db").unwrap();
    let db = Db::connect(&pg.url("db"), 2).await.unwrap();
    let schema = Schema::new(
        vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
        vec![DType::Number, DType::String, DType::Number],
        None,
    )
    .unwrap();
    let t = ShardTable::new("sh1", schema);
    assert_eq!(db.ensure_shard(&t, false).await.unwrap().0, 0);

    db.apply(&t, &entry(1, vec![(1, Some("a")), (2, Some("b")), (3, Some("c"))])).await.unwrap();
    // Deletes and upserts (an insert and a replacement) of one entry land together.
    db.apply(&t, &entry(2, vec![(1, None), (2, Some("b2")), (4, Some("d"))])).await.unwrap();
    let rows = db.fetch_rows(&t, &[1, 2, 3, 4]).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[&2], row(2, "b2"));
    assert_eq!(rows[&4], row(4, "d"));
    let stats = db.stats(&t, false).await.unwrap();
    assert_eq!((stats.applied_seq, stats.rows), (2, 3));
    let log = db.log_entries("sh1", 1, 2).await.unwrap();
    assert_eq!(
        log,
        vec![
            entry(1, vec![(1, Some("a")), (2, Some("b")), (3, Some("c"))]),
            entry(2, vec![(1, None), (2, Some("b2")), (4, Some("d"))])
        ]
    );

    // A writer that missed seq 2 (replays seq 2) or skips ahead (seq 4) is refused, and none of
    // its changes is kept: not the rows, not the sequence number, not the log.
    for stale in [entry(2, vec![(3, None), (9, Some("x"))]), entry(4, vec![(3, None), (9, Some("x"))])] {
        let err = db.apply(&t, &stale).await.unwrap_err();
        assert!(matches!(err, DbError::SeqRace { .. }), "seq {}: {err}", stale.seq);
    }
    let rows = db.fetch_rows(&t, &[3, 9]).await.unwrap();
    assert_eq!(rows.len(), 1, "key 3 kept, key 9 never written: {rows:?}");
    assert_eq!(db.stats(&t, false).await.unwrap().applied_seq, 2);
    assert_eq!(db.log_entries("sh1", 1, 4).await.unwrap().len(), 2);
}

/// The pool opens all its connections up front, in the background, so no request waits for one
/// being opened (a SCRAM exchange with a password-protected Postgres is costly): a pool that grew
/// on demand made the operator's `/status` probes queue behind the first burst of writes.
#[tokio::test]
async fn the_pool_opens_every_connection_before_any_request_needs_one() {
    let pg = tokio::task::spawn_blocking(LocalPg::temporary).await.unwrap().expect("throwaway postgres");
    pg.create_database("db").unwrap();
    let _db = Db::connect(&pg.url("db"), 4).await.unwrap();
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sharddb-shard-server'";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let open: u32 = pg.psql("db", count).unwrap().trim().parse().unwrap();
        if open == 4 {
            break;
        }
        assert!(open < 4 && std::time::Instant::now() < deadline, "{open} connections open, want the pool's 4");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
