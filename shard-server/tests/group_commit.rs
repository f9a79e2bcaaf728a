//! The poison case against a real Postgres: a batch that Postgres refuses at commit shares a group
//! with valid batches, and only it fails. Validation refuses every value we know Postgres refuses
//! (a NUL in text), so the test makes Postgres refuse a valid-looking row itself: a CHECK
//! constraint on the primary's table stands for any refusal validation did not foresee.

mod common;

use common::Cluster;
use shard_server::api::{BatchOutcome, Op, WriteBatchesRequest, WriteRequest};
use shard_server::schema::{Row, Value};
use std::time::Duration;

const SH1: common::ShardDef = ("sh1", 0, 4096, 0, &[0, 1]);

fn row(k: i64, name: &str) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(k % 100)])
}

fn insert(k: i64, name: &str) -> Vec<Op> {
    vec![Op::Insert { row: row(k, name) }]
}

/// Makes the primary's Postgres refuse any row named `poison` at commit.
async fn poison_the_primary(c: &Cluster) {
    let pool = sqlx::PgPool::connect(&c.servers[0].db_url).await.unwrap();
    sqlx::query(r#"ALTER TABLE "shard_sh1" ADD CONSTRAINT poison CHECK ("Stud_name" <> 'poison')"#)
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_batch_postgres_refuses_fails_alone_and_its_group_still_commits() {
    let c = Cluster::start(2, &[SH1]).await;
    poison_the_primary(&c).await;
    let primary = c.client(0);

    // One request, so every batch is queued before the writer runs: one group, poison in the middle.
    let req = WriteBatchesRequest {
        epoch: Some(1),
        batches: vec![insert(1, "a"), insert(2, "poison"), insert(3, "c"), insert(1, "a")],
        dry_run: false,
    };
    let out = primary.write_batches("sh1", &req).await.unwrap().results;
    assert_eq!(out.len(), 4);
    assert!(matches!(&out[0], BatchOutcome::Ok(w) if w.inserted == 1), "{:?}", out[0]);
    match &out[1] {
        BatchOutcome::Err { status, error } => {
            assert_eq!(*status, 500, "{error:?}");
            assert_eq!(error.status, "failure");
        }
        other => panic!("the poison batch succeeded: {other:?}"),
    }
    assert!(matches!(&out[2], BatchOutcome::Ok(w) if w.inserted == 1), "{:?}", out[2]);
    // The repeat of batch 0 was decided again after it: an identical row, a no-op.
    assert!(matches!(&out[3], BatchOutcome::Ok(w) if w.unchanged == 1), "{:?}", out[3]);

    // Concurrent clients: valid writers beside poison writers, on the one shard.
    let mut tasks = Vec::new();
    for w in 0..8i64 {
        let client = c.client(0);
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..40i64 {
                let key = 100 + w * 100 + i;
                let poison = w % 2 == 1;
                let name = if poison { "poison" } else { "valid" };
                let r =
                    client.write("sh1", &WriteRequest { epoch: Some(1), ops: insert(key, name), dry_run: false }).await;
                answers.push((key, poison, r.map(|_| ()).map_err(|e| e.to_string())));
            }
            answers
        }));
    }
    let mut valid = vec![1, 3];
    for t in tasks {
        for (key, poison, answer) in t.await.unwrap() {
            if poison {
                assert!(answer.is_err(), "poison key {key} was acknowledged");
            } else {
                assert!(answer.is_ok(), "valid key {key} failed beside poison writers: {answer:?}");
                valid.push(key);
            }
        }
    }
    valid.sort_unstable();

    // Exactly the valid rows are stored, on the primary and its replica alike.
    for i in 0..2 {
        let rows = c.client(i).read_ranges("sh1", &[shard_server::api::KeyRange { low: 0, high: 4095 }]).await;
        let rows: Vec<serde_json::Value> = serde_json::from_str(rows.unwrap()[0].get()).unwrap();
        let keys: Vec<i64> = rows.iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect();
        assert_eq!(keys, valid, "server {i}");
        assert!(rows.iter().all(|r| r["Stud_name"] != "poison"));
    }
    let (a, b) = (c.client(0).status(true).await.unwrap(), c.client(1).status(true).await.unwrap());
    assert_eq!(
        (a.shards["sh1"].applied_seq, a.shards["sh1"].checksum.clone()),
        (b.shards["sh1"].applied_seq, b.shards["sh1"].checksum.clone())
    );
    // The shard keeps taking writes after the failures.
    tokio::time::timeout(
        Duration::from_secs(10),
        primary.write("sh1", &WriteRequest { epoch: Some(1), ops: insert(4000, "z"), dry_run: false }),
    )
    .await
    .unwrap()
    .unwrap();
}
