//! Divergence detection by history hash, against a real Postgres: a replica whose history differs
//! from its primary's gives up its copy at the first entry that shows it, also where no epoch tells
//! the histories apart and where its log no longer names the entries before (a snapshot install).

mod common;

use common::Cluster;
use shard_server::api::{Change, Entry, ErrorCode, KeyRange, Op, ReplicateRequest, WriteRequest};
use shard_server::replication::divergence::{entry_hash, from_hex, to_hex};
use shard_server::schema::{Row, Value};
use shard_server::topology::ReplicaState;

fn row(k: i64, name: &str) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(k % 100)])
}

fn write(epoch: u64, k: i64, name: &str) -> WriteRequest {
    WriteRequest { epoch: Some(epoch), ops: vec![Op::Insert { row: row(k, name) }], dry_run: false }
}

/// Server `i`'s applied sequence number and history hash of `sh1`.
async fn position(c: &Cluster, i: usize) -> (u64, u128) {
    let st = c.client(i).status(false).await.unwrap();
    let s = &st.shards["sh1"];
    (s.applied_seq, from_hex(s.hash.as_deref().expect("a hash")).expect("32 hex digits"))
}

/// Entry `seq` of epoch `epoch` setting key `k`, hashed as following a history hashing to `prev`.
fn entry(seq: u64, epoch: u64, k: i64, name: &str, prev: u128) -> Entry {
    let mut e = Entry { seq, epoch, changes: vec![Change { key: k, row: Some(row(k, name)) }], hash: None };
    e.hash = Some(to_hex(entry_hash(prev, &e)));
    e
}

fn replicate(epoch: u64, entries: Vec<Entry>, prev_epoch: Option<u64>) -> ReplicateRequest {
    ReplicateRequest { epoch, primary: "Server0".into(), entries, prev_epoch, confirmed: None }
}

/// Every copy carries the same history hash as its primary at the same number, and the hash of
/// each entry follows the one before.
#[tokio::test]
async fn copies_agree_on_the_history_hash() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    for k in 0..3 {
        c.client(0).write("sh1", &write(1, k, "a")).await.unwrap();
    }
    let (seq, hash) = position(&c, 0).await;
    assert_eq!(seq, 3);
    assert_eq!(position(&c, 1).await, (seq, hash));
    let log = c.client(0).log("sh1", 1, 3).await.unwrap().entries;
    let mut prev = 0;
    for e in &log {
        prev = entry_hash(prev, e);
        assert_eq!(e.hash.as_deref(), Some(to_hex(prev).as_str()), "entry {}", e.seq);
    }
    assert_eq!(prev, hash);
}

/// Two histories the epochs cannot tell apart (same numbers, same epochs, other rows): the replica
/// holding the other one gives up its copy at the primary's next entry, whether it arrives as a
/// replay of a number it holds or as the next one to append.
#[tokio::test]
async fn a_history_that_differs_where_epochs_agree_is_given_up() {
    let c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    c.client(0).write("sh1", &write(1, 1, "a")).await.unwrap();
    let (seq, hash) = position(&c, 0).await;
    let forged = entry(seq + 1, 1, 2, "forged", hash);
    let real = entry(seq + 1, 1, 2, "real", hash);

    // Replica 1 holds a forged entry 2; the real one arrives as a replay.
    c.client(1).replicate("sh1", &replicate(1, vec![forged.clone()], Some(1))).await.unwrap();
    let before = c.client(1).status(false).await.unwrap().shards["sh1"].copy_id.clone();
    let e = c.client(1).replicate("sh1", &replicate(1, vec![real.clone()], Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Diverged), "{e}");
    assert_ne!(c.client(1).status(false).await.unwrap().shards["sh1"].copy_id, before, "gave up its copy");

    // Replica 2 holds the forged entry 2 too; the primary's entry 3 (following the real 2, with
    // the same prev epoch) arrives to be appended.
    c.client(2).replicate("sh1", &replicate(1, vec![forged], Some(1))).await.unwrap();
    let next = entry(seq + 2, 1, 3, "c", entry_hash(hash, &real));
    let e = c.client(2).replicate("sh1", &replicate(1, vec![next], Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Diverged), "{e}");
    let st = c.client(2).status(false).await.unwrap();
    assert_eq!(st.shards["sh1"].applied_seq, seq + 1, "nothing appended");
    let metrics = c.http.get(c.url(2, "/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sharddb_shard_copies_diverged_total 1"), "{metrics}");
}

/// A copy installed from a snapshot keeps no log of the entries before it, so no epoch could be
/// compared there; its history hash still tells whether the next entry continues it.
#[tokio::test]
async fn a_recovered_copy_still_checks_the_entry_after_its_snapshot() {
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    for k in 0..3 {
        c.client(0).write("sh1", &write(1, k, "a")).await.unwrap();
    }
    c.publish(|t| {
        t.shards[0].replicas.insert("Server1".into(), ReplicaState::Recovering);
    })
    .await;
    let primary = c.servers[0].name.clone();
    let done = c.client(1).recover("sh1", &shard_server::api::RecoverRequest { primary }).await.unwrap();
    assert_eq!(done.snapshot_seq, 3);
    let (seq, hash) = position(&c, 1).await;
    assert_eq!((seq, hash), position(&c, 0).await, "the snapshot carried the source's hash");
    assert!(c.client(1).log("sh1", 3, 3).await.is_err(), "the snapshot left no log of its entries");

    // An entry with the right number and prev epoch, hashed on another history.
    let other = entry(seq + 1, 2, 9, "x", hash ^ 1);
    let e = c.client(1).replicate("sh1", &replicate(2, vec![other], Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Diverged), "{e}");
    // The primary's own next entry would have been taken.
    let data = c.client(0).read("sh1", "Stud_id", KeyRange { low: 0, high: 999 }).await.unwrap();
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(data.get()).unwrap().len(), 3);
}
