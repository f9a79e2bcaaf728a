//! Primary-based replication against a real Postgres: acknowledgement only after every ready
//! replica applied, catch-up after a replica comes back, epoch fencing, sequence gaps, group commit
//! under concurrency, and streamed snapshots.

mod common;

use common::Cluster;
use futures::StreamExt;
use shard_server::api::{
    BatchOutcome, Change, Confirmed, Entry, ErrorCode, Op, ReplicateRequest, SnapshotEnd, SnapshotHeader,
    WriteBatchesRequest, WriteRequest,
};
use shard_server::node::NodeConfig;
use shard_server::schema::{Row, Value};
use shard_server::topology::ReplicaState;

fn row(k: i64, name: &str) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(k % 100)])
}

fn inserts(keys: impl IntoIterator<Item = i64>) -> Vec<Op> {
    keys.into_iter().map(|k| Op::Insert { row: row(k, "n") }).collect()
}

fn write(epoch: u64, ops: Vec<Op>) -> WriteRequest {
    WriteRequest { epoch: Some(epoch), ops, dry_run: false }
}

/// Asserts that every listed server holds shard `sh1` at the same seq, row count and checksum.
async fn assert_converged(c: &Cluster, servers: &[usize], rows: i64) {
    let mut seen = Vec::new();
    for &i in servers {
        let st = c.client(i).status(true).await.unwrap();
        let s = &st.shards["sh1"];
        seen.push((s.applied_seq, s.rows, s.checksum.clone()));
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "replicas differ: {seen:?}");
    assert_eq!(seen[0].1, rows);
}

#[tokio::test]
async fn acknowledged_writes_are_on_every_ready_replica() {
    let c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    let r = c.client(0).write("sh1", &write(1, inserts(0..50))).await.unwrap();
    assert_eq!((r.seq, r.inserted), (1, 50));
    // Read straight from each replica, right after the acknowledgement.
    for i in 1..3 {
        let data = c.client(i).read("sh1", "Stud_id", shard_server::api::KeyRange { low: 0, high: 999 }).await.unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_str(data.get()).unwrap();
        assert_eq!(rows.len(), 50, "replica {i}");
        assert_eq!(rows[49]["Stud_id"], 49);
    }
    let r = c
        .client(0)
        .write("sh1", &write(1, vec![Op::Delete { key: 3 }, Op::Update { key: 4, row: row(4, "changed") }]))
        .await
        .unwrap();
    assert_eq!((r.seq, r.deleted, r.updated), (2, 1, 1));
    assert_converged(&c, &[0, 1, 2], 49).await;
}

#[tokio::test]
async fn batches_sent_together_keep_their_own_outcomes() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts([1]))).await.unwrap();
    let req = WriteBatchesRequest {
        epoch: Some(1),
        batches: vec![
            inserts([2, 3]),
            // Conflicts with the stored row 1: this batch alone fails, and writes nothing (not 4).
            vec![Op::Insert { row: row(4, "n") }, Op::Insert { row: row(1, "other") }],
            // Key 2 is inserted by the first batch; the same row again is a no-op.
            inserts([2, 5]),
            // Outside the shard: refused alone.
            inserts([5000]),
            vec![Op::Delete { key: 777 }],
        ],
        dry_run: false,
    };
    let r = c.client(0).write_batches("sh1", &req).await.unwrap();
    let summary: Vec<String> = r
        .results
        .iter()
        .map(|o| match o {
            BatchOutcome::Ok(w) => format!("ok {} inserted {} unchanged", w.inserted, w.unchanged),
            BatchOutcome::Err { status, error } => format!("{status} {:?} {:?}", error.code, error.keys),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "ok 2 inserted 0 unchanged",
            "409 Conflict [1]",
            "ok 1 inserted 1 unchanged",
            "400 BadRequest []",
            "404 NotFound [777]",
        ]
    );
    // Keys 1, 2, 3, 5 on both copies; 4 was never written.
    assert_converged(&c, &[0, 1], 4).await;
    // The request as a whole is refused by a server that is not the primary: per batch.
    let r = c.client(1).write_batches("sh1", &req).await.unwrap();
    assert!(
        r.results.iter().all(|o| matches!(o, BatchOutcome::Err { error, .. } if error.code == ErrorCode::NotPrimary))
    );
}

#[tokio::test]
async fn writes_go_to_the_primary_only_and_dry_runs_write_nothing() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    let e = c.client(1).write("sh1", &write(1, inserts([1]))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotPrimary), "{e}");
    let dry = WriteRequest { epoch: Some(1), ops: inserts([1, 2]), dry_run: true };
    assert_eq!(c.client(0).write("sh1", &dry).await.unwrap().inserted, 2);
    assert_converged(&c, &[0, 1], 0).await;
    // A dry run reports conflicts as the real write would.
    c.client(0).write("sh1", &write(1, inserts([1]))).await.unwrap();
    let dry = WriteRequest { epoch: Some(1), ops: vec![Op::Insert { row: row(1, "other") }], dry_run: true };
    let e = c.client(0).write("sh1", &dry).await.unwrap_err();
    assert_eq!(e.body().unwrap().keys, vec![1]);
}

#[tokio::test]
async fn a_lost_replica_fails_writes_until_it_is_back_then_catches_up() {
    let mut c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    c.client(0).write("sh1", &write(1, inserts(0..10))).await.unwrap();
    c.kill(2).await;

    // The primary commits locally but cannot reach a ready replica: the write is not acknowledged.
    let e = c.client(0).write("sh1", &write(1, inserts(10..20))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    assert!(e.to_string().contains("Server2"), "names the replica: {e}");
    let e = c.client(0).write("sh1", &write(1, inserts(20..30))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable));

    c.restart(2).await;
    // Retrying the same batch is safe: a no-op on the primary that still waits for Server2 to
    // catch up on everything it missed before acknowledging.
    let r = c.client(0).write("sh1", &write(1, inserts(10..20))).await.unwrap();
    assert_eq!((r.inserted, r.unchanged), (0, 10));
    assert_converged(&c, &[0, 1, 2], 30).await;
}

#[tokio::test]
async fn a_restarted_primary_catches_replicas_up_from_its_durable_log() {
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.kill(1).await;
    for k in 0..5 {
        assert!(c.client(0).write("sh1", &write(1, inserts([k]))).await.is_err());
    }
    // The primary restarts too: its in-memory cache is gone, the log table is not.
    c.kill(0).await;
    c.restart(0).await;
    c.restart(1).await;
    c.client(0).write("sh1", &write(1, inserts([100]))).await.unwrap();
    assert_converged(&c, &[0, 1], 6).await;
}

#[tokio::test]
async fn a_recovering_replica_never_holds_up_an_acknowledgement() {
    let mut c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    c.publish(|t| {
        t.shards[0].replicas.insert("Server2".into(), ReplicaState::Recovering);
    })
    .await;
    c.kill(2).await;
    let r = c.client(0).write("sh1", &write(2, inserts(0..5))).await.unwrap();
    assert_eq!(r.inserted, 5);
    // And it serves no reads.
    c.restart(2).await;
    let e = c.client(2).read("sh1", "Stud_id", shard_server::api::KeyRange { low: 0, high: 10 }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady));
}

#[tokio::test]
async fn epochs_fence_stale_senders() {
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.publish(|_| {}).await; // epoch 2
    let e = c.client(0).write("sh1", &write(1, inserts([1]))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StaleEpoch));
    assert_eq!(e.body().unwrap().epoch, Some(2));
    let e = c.client(0).write("sh1", &write(3, inserts([1]))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::EpochAhead));

    // A deposed primary (older epoch) cannot push entries to a replica.
    let stale = ReplicateRequest {
        epoch: 1,
        primary: "Server0".into(),
        entries: vec![Entry { seq: 1, epoch: 1, changes: vec![Change { key: 1, row: Some(row(1, "x")) }], hash: None }],
        prev_epoch: None,
        confirmed: None,
    };
    let e = c.client(1).replicate("sh1", &stale).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StaleEpoch));
    // Nor can anyone replicate into the primary.
    let to_primary = ReplicateRequest { epoch: 2, ..stale.clone() };
    assert!(c.client(0).replicate("sh1", &to_primary).await.is_err());
    assert_converged(&c, &[0, 1], 0).await;
}

#[tokio::test]
async fn replicas_refuse_gaps_and_skip_replays() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    let entry = |seq: u64, k: i64| Entry {
        seq,
        epoch: 1,
        changes: vec![Change { key: k, row: Some(row(k, "r")) }],
        hash: None,
    };
    let req =
        |entries| ReplicateRequest { epoch: 1, primary: "Server0".into(), entries, prev_epoch: None, confirmed: None };
    let e = c.client(1).replicate("sh1", &req(vec![entry(2, 2)])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SeqGap));
    assert_eq!(e.body().unwrap().applied, Some(0));
    assert_eq!(c.client(1).replicate("sh1", &req(vec![entry(1, 1), entry(2, 2)])).await.unwrap().applied, 2);
    // Replaying 1..2 and adding 3 applies only 3.
    assert_eq!(
        c.client(1).replicate("sh1", &req(vec![entry(1, 1), entry(2, 2), entry(3, 3)])).await.unwrap().applied,
        3
    );
    let st = c.client(1).status(true).await.unwrap();
    assert_eq!((st.shards["sh1"].applied_seq, st.shards["sh1"].rows), (3, 3));
    // A malformed row is refused, not half-applied.
    let bad =
        Entry { seq: 4, epoch: 1, changes: vec![Change { key: 9, row: Some(Row(vec![Value::Int(9)])) }], hash: None };
    let e = c.client(1).replicate("sh1", &req(vec![bad])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    assert_eq!(c.client(1).status(false).await.unwrap().shards["sh1"].applied_seq, 3);
}

/// A replica holding an entry its primary lacks (sent by an earlier primary during a handover,
/// never acknowledged) must not take the primary's own entry of that number for a replay.
#[tokio::test]
async fn a_replica_holding_an_entry_its_primary_lacks_gives_up_its_copy() {
    let c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    let entry = |seq: u64, epoch: u64, k: i64, name: &str| Entry {
        seq,
        epoch,
        changes: vec![Change { key: k, row: Some(row(k, name)) }],
        hash: None,
    };
    let req = |entries, prev_epoch| ReplicateRequest {
        epoch: 1,
        primary: "Server0".into(),
        entries,
        prev_epoch,
        confirmed: None,
    };
    let all = shard_server::api::KeyRange { low: 0, high: 999 };
    for i in [1, 2] {
        c.client(i).replicate("sh1", &req(vec![entry(1, 1, 1, "a")], None)).await.unwrap();
    }
    // Replica 1 got the old primary's entry 2 (epoch 1); replica 2 the new primary's (epoch 2).
    c.client(1).replicate("sh1", &req(vec![entry(2, 1, 2, "old")], Some(1))).await.unwrap();
    assert_eq!(c.client(2).replicate("sh1", &req(vec![entry(2, 2, 2, "new")], Some(1))).await.unwrap().applied, 2);
    // Replays with the same epochs are fine.
    assert_eq!(c.client(2).replicate("sh1", &req(vec![entry(2, 2, 2, "new")], Some(1))).await.unwrap().applied, 2);
    // Once the sender confirms its entry 2 (the old one, to replica 1), replica 1 shows it.
    let confirm = ReplicateRequest { confirmed: Some(Confirmed { seq: 2, epoch: 1, hash: None }), ..req(vec![], None) };
    c.client(1).replicate("sh1", &confirm).await.unwrap();
    assert!(c.client(1).read("sh1", "Stud_id", all).await.unwrap().get().contains("old"));
    let before = c.client(1).status(false).await.unwrap().shards["sh1"].copy_id.clone();

    // Replica 1 meets the new primary's entry 2: it gives up its copy instead of skipping it.
    let e = c.client(1).replicate("sh1", &req(vec![entry(2, 2, 2, "new")], Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Diverged), "{e}");
    let st = c.client(1).status(false).await.unwrap();
    assert_ne!(st.shards["sh1"].copy_id, before, "a new identity, so the operator copies it afresh");
    let e = c.client(1).read("sh1", "Stud_id", all).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    let e = c.client(1).replicate("sh1", &req(vec![entry(3, 2, 3, "c")], Some(2))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    assert_eq!(c.client(1).status(false).await.unwrap().shards["sh1"].applied_seq, 2);

    // Replica 2 is told the entry before the new one is of another epoch than its own entry 2.
    let before = c.client(2).status(false).await.unwrap().shards["sh1"].copy_id.clone();
    let e = c.client(2).replicate("sh1", &req(vec![entry(3, 3, 3, "c")], Some(1))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Diverged), "{e}");
    let st = c.client(2).status(false).await.unwrap();
    assert_ne!(st.shards["sh1"].copy_id, before);
    assert_eq!(st.shards["sh1"].applied_seq, 2, "nothing appended");
}

#[tokio::test]
async fn a_replica_appends_entries_that_continue_its_own() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    let entry = |seq: u64, epoch: u64| Entry {
        seq,
        epoch,
        changes: vec![Change { key: seq as i64, row: Some(row(seq as i64, "r")) }],
        hash: None,
    };
    let req = |entries, prev_epoch| ReplicateRequest {
        epoch: 1,
        primary: "Server0".into(),
        entries,
        prev_epoch,
        confirmed: None,
    };
    assert_eq!(c.client(1).replicate("sh1", &req(vec![entry(1, 1)], None)).await.unwrap().applied, 1);
    // A new primary's first entry after an old primary's: same seq chain, matching prev epoch.
    assert_eq!(c.client(1).replicate("sh1", &req(vec![entry(2, 3)], Some(1))).await.unwrap().applied, 2);
    assert_eq!(c.client(1).replicate("sh1", &req(vec![entry(2, 3), entry(3, 3)], Some(1))).await.unwrap().applied, 3);
    // A sender that no longer knows the epoch before its first entry is taken at its word.
    assert_eq!(c.client(1).replicate("sh1", &req(vec![entry(4, 3)], None)).await.unwrap().applied, 4);
    let st = c.client(1).status(true).await.unwrap();
    assert_eq!((st.shards["sh1"].applied_seq, st.shards["sh1"].rows), (4, 4));
}

#[tokio::test]
async fn concurrent_writers_are_group_committed_without_loss() {
    let c = Cluster::start(3, &[("sh1", 0, 100_000, 0, &[0, 1, 2])]).await;
    let client = c.client(0);
    let results = futures::stream::iter(0..300i64)
        .map(|k| {
            let client = client.clone();
            async move {
                // Every 10th writer also races a second, conflicting writer for the same key.
                let first = client.write("sh1", &write(1, inserts([k]))).await;
                let clash = if k % 10 == 0 {
                    Some(client.write("sh1", &write(1, vec![Op::Insert { row: row(k, "clash") }])).await)
                } else {
                    None
                };
                (first, clash)
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await;
    for (first, clash) in &results {
        assert!(first.is_ok(), "{first:?}");
        if let Some(clash) = clash {
            assert_eq!(clash.as_ref().unwrap_err().code(), Some(ErrorCode::Conflict));
        }
    }
    assert_converged(&c, &[0, 1, 2], 300).await;
    let seq = c.client(0).status(false).await.unwrap().shards["sh1"].applied_seq;
    assert!(seq <= 300, "at most one entry per write");
}

#[tokio::test]
async fn snapshots_stream_a_consistent_copy() {
    let c = Cluster::start(1, &[("sh1", 0, 1_000_000, 0, &[0])]).await;
    for chunk in (0..20_000i64).collect::<Vec<_>>().chunks(2000) {
        c.client(0).write("sh1", &write(1, inserts(chunk.iter().copied()))).await.unwrap();
    }
    let resp = c.http.get(c.url(0, "/v1/shards/sh1/snapshot")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let mut lines = text.lines();
    let header: SnapshotHeader = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!((header.shard.as_str(), header.seq), ("sh1", 10));
    let all: Vec<&str> = lines.collect();
    let end: SnapshotEnd = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!((end.end, end.rows), (true, 20_000));
    assert!(end.digest.is_some(), "{end:?}");
    let rows: Vec<Row> = all[..all.len() - 1].iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 20_000);
    assert_eq!(rows[0], row(0, "n"));
    assert!(rows.windows(2).all(|w| w[0].0[0] != w[1].0[0]), "no duplicates");
}

#[tokio::test]
async fn a_replica_that_lost_its_data_recovers_from_a_snapshot_under_load() {
    use shard_server::api::RecoverRequest;
    let mut c = Cluster::start(3, &[("sh1", 0, 1_000_000, 0, &[0, 1, 2])]).await;
    for chunk in (0..6000i64).collect::<Vec<_>>().chunks(1000) {
        c.client(0).write("sh1", &write(1, inserts(chunk.iter().copied()))).await.unwrap();
    }
    // Server2 comes back with nothing; the operator marks it recovering before anything else.
    c.kill(2).await;
    c.publish(|t| {
        t.shards[0].replicas.insert("Server2".into(), ReplicaState::Recovering);
    })
    .await;
    c.restart_with_empty_database(2, 1).await;

    // A ready replica is never replaced.
    let source = RecoverRequest { primary: "Server0".into() };
    let e = c.client(1).recover("sh1", &source).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");

    // Writes keep being acknowledged while Server2 copies, and it verifies at one sequence number.
    let writer = {
        let client = c.client(0);
        tokio::spawn(async move {
            for k in 6000..6100i64 {
                client.write("sh1", &write(2, inserts([k]))).await.unwrap();
            }
        })
    };
    let done = c.client(2).recover("sh1", &source).await.unwrap();
    assert!(done.snapshot_rows >= 6000, "{done:?}");
    assert!(done.verified_seq >= done.snapshot_seq);
    writer.await.unwrap();

    c.publish(|t| {
        t.shards[0].replicas.insert("Server2".into(), ReplicaState::Ready);
    })
    .await;
    c.client(0).write("sh1", &write(3, inserts([7000]))).await.unwrap();
    assert_converged(&c, &[0, 1, 2], 6101).await;
}

#[tokio::test]
async fn a_failed_recovery_leaves_the_previous_copy_intact() {
    use shard_server::api::RecoverRequest;
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts(0..10))).await.unwrap();
    c.publish(|t| {
        t.shards[0].replicas.insert("Server1".into(), ReplicaState::Recovering);
    })
    .await;
    // A request naming another primary than the topology's is refused before anything is copied.
    let elsewhere = RecoverRequest { primary: "Server1".into() };
    let e = c.client(1).recover("sh1", &elsewhere).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");
    // The primary is down: the copy cannot be made.
    c.kill(0).await;
    let e = c.client(1).recover("sh1", &RecoverRequest { primary: "Server0".into() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    let st = c.client(1).status(true).await.unwrap();
    assert_eq!((st.shards["sh1"].rows, st.shards["sh1"].applied_seq), (10, 1));
}

#[tokio::test]
async fn a_copy_that_lost_its_data_reports_a_new_identity() {
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts(0..3))).await.unwrap();
    let before = c.client(1).status(false).await.unwrap().shards["sh1"].copy_id.clone();
    assert!(!before.is_empty());
    // A restart keeps the identity; a lost volume does not.
    c.kill(1).await;
    c.restart(1).await;
    assert_eq!(c.client(1).status(false).await.unwrap().shards["sh1"].copy_id, before);
    // The primary is down too, so the empty copy cannot catch up from its log meanwhile.
    c.kill(0).await;
    c.kill(1).await;
    c.restart_with_empty_database(1, 1).await;
    let after = c.client(1).status(false).await.unwrap().shards["sh1"].clone();
    assert_ne!(after.copy_id, before);
    assert_eq!(after.applied_seq, 0);
}

#[tokio::test]
async fn a_primary_that_lost_its_data_refuses_writes_until_healed() {
    // Without this guard a wiped primary would number new writes from 1 again and its replicas,
    // already past those numbers, would skip them as replays: acknowledged, yet on one copy only.
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts(0..5))).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(c.client(i).status(false).await.unwrap().shards["sh1"].copy_id.clone());
    }
    c.publish(|t| {
        t.shards[0].copies.insert("Server0".into(), ids[0].clone());
        t.shards[0].copies.insert("Server1".into(), ids[1].clone());
    })
    .await;
    c.kill(0).await;
    c.restart_with_empty_database(0, 1).await;
    let e = c.client(0).write("sh1", &write(2, inserts([100]))).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    let e = c.client(0).read("sh1", "Stud_id", shard_server::api::KeyRange { low: 0, high: 999 }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    // The replica still holds everything acknowledged, untouched.
    let st = c.client(1).status(false).await.unwrap();
    assert_eq!((st.shards["sh1"].rows, st.shards["sh1"].applied_seq), (5, 1));
}

/// A delete retried after an attempt that timed out answers 404, which tells the client the row is
/// gone. That answer must mean what an acknowledgement means: gone on every replica that serves
/// reads. Before, the primary answered 404 from its own rows at once, while a ready replica that
/// had not yet applied the first attempt still served the row.
#[tokio::test]
async fn a_not_found_answer_waits_for_ready_replicas_like_an_acknowledgement() {
    use sqlx::Connection;
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts([1, 2]))).await.unwrap();
    // The replica keeps serving reads, but cannot apply anything: its table is locked against writes.
    let mut lock = sqlx::PgConnection::connect(&c.servers[1].db_url).await.unwrap();
    let mut tx = lock.begin().await.unwrap();
    sqlx::query(r#"LOCK TABLE "shard_sh1" IN EXCLUSIVE MODE"#).execute(&mut *tx).await.unwrap();

    let e = c.client(0).write("sh1", &write(1, vec![Op::Delete { key: 1 }])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "not confirmed by the replica: {e}");
    // The retry finds the row gone on the primary, but the replica still has it.
    let e = c.client(0).write("sh1", &write(1, vec![Op::Delete { key: 1 }])).await.unwrap_err();
    let on_replica = c.client(1).read("sh1", "Stud_id", shard_server::api::KeyRange { low: 1, high: 1 }).await.unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(on_replica.get()).unwrap();
    assert_eq!(rows.len(), 1, "the replica has not applied the delete yet");
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "a 404 now would claim a delete no reader can rely on: {e}");

    // Once the replica can apply again, the retry answers 404, and the row is gone everywhere.
    tx.rollback().await.unwrap();
    let e = c.client(0).write("sh1", &write(1, vec![Op::Delete { key: 1 }])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    let on_replica = c.client(1).read("sh1", "Stud_id", shard_server::api::KeyRange { low: 1, high: 1 }).await.unwrap();
    assert_eq!(on_replica.get(), "[]");
    assert_converged(&c, &[0, 1], 1).await;
}

// ---- Read leases -------------------------------------------------------------------------------

use shard_server::api::{ClientError, KeyRange};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys of shard `sh1` read straight from server `i`.
async fn read_keys(c: &Cluster, i: usize) -> Result<Vec<i64>, ClientError> {
    let data = c.client(i).read("sh1", "Stud_id", KeyRange { low: 0, high: 999 }).await?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(data.get()).unwrap();
    Ok(rows.iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect())
}

/// Reads from server `i` until it serves, for at most `bound`.
async fn read_when_served(c: &Cluster, i: usize, bound: Duration) -> Vec<i64> {
    let start = Instant::now();
    loop {
        match read_keys(c, i).await {
            Ok(keys) => return keys,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
                assert!(start.elapsed() < bound, "server {i} still serves no reads: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Makes every write to shard `sh1` on server `i` fail in Postgres, reads unaffected.
async fn refuse_applies(c: &Cluster, i: usize) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&c.servers[i].db_url).await.unwrap();
    for sql in [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        r#"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE OR DELETE ON "shard_sh1" FOR EACH STATEMENT EXECUTE FUNCTION refuse()"#,
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

#[tokio::test]
async fn a_replica_cut_off_from_its_primary_stops_serving_reads_until_renewals_resume() {
    let (lease, renew) = (Duration::from_millis(1000), Duration::from_millis(100));
    let mut c = Cluster::start_with_lease(2, &[("sh1", 0, 1000, 0, &[0, 1])], lease, renew).await;
    c.client(0).write("sh1", &write(1, inserts(0..10))).await.unwrap();
    assert_eq!(read_when_served(&c, 1, Duration::from_secs(20)).await, (0..10).collect::<Vec<_>>());

    // The primary goes away: nothing renews the replica's lease, which runs out.
    c.kill(0).await;
    let cut = Instant::now();
    let refused = loop {
        match read_keys(&c, 1).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(cut.elapsed() < Duration::from_secs(30), "the replica kept serving without its primary");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    println!("the replica stopped serving reads {:?} after its primary went away", cut.elapsed());
    assert_eq!(refused.code(), Some(ErrorCode::NotReady), "{refused}");
    assert!(refused.to_string().contains("lease"), "says why: {refused}");
    // It stays refused while the primary is away.
    for _ in 0..5 {
        tokio::time::sleep(renew).await;
        assert_eq!(read_keys(&c, 1).await.unwrap_err().code(), Some(ErrorCode::NotReady));
    }

    // The primary is back: renewals resume and so do reads.
    c.restart(0).await;
    let back = Instant::now();
    assert_eq!(read_when_served(&c, 1, Duration::from_secs(30)).await, (0..10).collect::<Vec<_>>());
    println!("the replica served again {:?} after its primary came back", back.elapsed());
}

#[tokio::test]
async fn a_write_acknowledged_after_a_demotion_is_never_missing_from_a_read_of_the_demoted_replica() {
    let (lease, renew) = (Duration::from_millis(1500), Duration::from_millis(100));
    let mut c = Cluster::start_with_lease(2, &[("sh1", 0, 1000, 0, &[0, 1])], lease, renew).await;
    c.client(0).write("sh1", &write(1, inserts(0..10))).await.unwrap();
    assert_eq!(read_when_served(&c, 1, Duration::from_secs(20)).await.len(), 10);

    // Server1 can no longer apply, and only its primary learns that it was demoted: Server1 (and
    // any router going by the old topology) still takes it for a ready replica.
    refuse_applies(&c, 1).await;
    c.publish_to(&[0], |t| {
        t.shards[0].replicas.insert("Server1".into(), ReplicaState::Recovering);
    })
    .await;
    assert_eq!(c.servers[1].node.as_ref().unwrap().epoch(), 1);

    // A reader keeps reading from Server1 while key 500 is written through the primary.
    type Outcome = (Instant, Result<Vec<i64>, ClientError>);
    let reads: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (reads, stop, client) = (Arc::clone(&reads), Arc::clone(&stop), c.client(1));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let began = Instant::now();
                let got = client.read("sh1", "Stud_id", KeyRange { low: 0, high: 999 }).await.map(|data| {
                    let rows: Vec<serde_json::Value> = serde_json::from_str(data.get()).unwrap();
                    rows.iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect()
                });
                reads.lock().unwrap().push((began, got));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let sent = Instant::now();
    let r = c.client(0).write("sh1", &write(2, inserts([500]))).await.unwrap();
    let acked = Instant::now();
    assert_eq!(r.inserted, 1);
    tokio::time::sleep(lease).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();

    let reads = std::mem::take(&mut *reads.lock().unwrap());
    let served_before = reads.iter().filter(|(b, r)| *b < acked && r.is_ok()).count();
    let after: Vec<_> = reads.iter().filter(|(b, _)| *b > acked).collect();
    println!(
        "ack took {:?}; Server1 served {served_before} reads before it, {} reads began after it",
        acked - sent,
        after.len()
    );
    assert!(!after.is_empty(), "the reader read after the acknowledgement");
    for (_, outcome) in after {
        match outcome {
            Ok(keys) => assert!(keys.contains(&500), "a read served after the ack misses the write: {keys:?}"),
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}"),
        }
    }
}

#[tokio::test]
async fn an_idle_cluster_keeps_serving_reads_from_replicas() {
    let (lease, renew) = (Duration::from_millis(800), Duration::from_millis(150));
    let c = Cluster::start_with_lease(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])], lease, renew).await;
    c.client(0).write("sh1", &write(1, inserts(0..5))).await.unwrap();
    let seq = c.client(0).status(false).await.unwrap().shards["sh1"].applied_seq;
    // Several lease periods without a single write: renewals alone keep the replicas serving.
    let mut refusals = 0;
    for _ in 0..5 {
        tokio::time::sleep(lease).await;
        for i in 1..3 {
            if read_keys(&c, i).await.is_err() {
                refusals += 1;
            }
            // A replica whose leases are not renewed would never serve again: this wait would fail.
            assert_eq!(read_when_served(&c, i, Duration::from_secs(20)).await, (0..5).collect::<Vec<_>>());
        }
    }
    println!("reads refused at the first try: {refusals} of 10");
    assert_eq!(c.client(0).status(false).await.unwrap().shards["sh1"].applied_seq, seq, "nothing was written");
}

#[tokio::test]
async fn read_ranges_answer_every_range_in_order_and_only_where_reads_are_served() {
    let c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    read_ranges_case(c, true).await;
}

#[tokio::test]
async fn read_ranges_answer_the_same_from_postgres_without_a_row_cache() {
    let c = Cluster::start_without_cache(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    read_ranges_case(c, false).await;
}

#[tokio::test]
async fn a_shard_outgrowing_the_row_cache_is_read_from_postgres() {
    let c = Cluster::start_with(
        2,
        &[("sh1", 0, 1000, 0, &[0, 1])],
        NodeConfig::DEFAULT_LEASE,
        NodeConfig::DEFAULT_LEASE_RENEW,
        30,
    )
    .await;
    c.client(0).write("sh1", &write(1, inserts(0..20))).await.unwrap();
    assert!(c.client(0).status(false).await.unwrap().shards["sh1"].cached, "20 rows fit 30");
    c.client(0).write("sh1", &write(1, inserts(20..50))).await.unwrap();
    c.client(0).write("sh1", &write(1, vec![Op::Delete { key: 7 }])).await.unwrap();
    for i in [0, 1] {
        assert!(!c.client(i).status(false).await.unwrap().shards["sh1"].cached, "server {i}: 50 rows do not fit");
        let keys = read_when_served(&c, i, Duration::from_secs(20)).await;
        assert_eq!(keys, (0..50).filter(|k| *k != 7).collect::<Vec<_>>(), "server {i}");
    }
    // Decisions still see every row: a different row at an existing key conflicts.
    let e = c.client(0).write("sh1", &write(1, vec![Op::Insert { row: row(40, "other") }])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");
}

/// Reads of several ranges at once, from the primary and a replica; `cached` says whether the
/// servers hold the rows in memory.
async fn read_ranges_case(mut c: Cluster, cached: bool) {
    c.client(0).write("sh1", &write(1, inserts(0..50))).await.unwrap();
    for i in 0..3 {
        assert_eq!(c.client(i).status(false).await.unwrap().shards["sh1"].cached, cached, "server {i}");
    }
    read_when_served(&c, 1, Duration::from_secs(20)).await;
    let ranges = [
        KeyRange { low: 10, high: 12 },
        KeyRange { low: 100, high: 200 },
        KeyRange { low: 49, high: 49 },
        KeyRange { low: 0, high: 1 },
        KeyRange { low: 11, high: 11 },
    ];
    let want: [&[i64]; 5] = [&[10, 11, 12], &[], &[49], &[0, 1], &[11]];
    for i in [0, 1] {
        let parts = c.client(i).read_ranges("sh1", &ranges).await.unwrap();
        let got: Vec<Vec<i64>> = parts
            .iter()
            .map(|p| {
                let rows: Vec<serde_json::Value> = serde_json::from_str(p.get()).unwrap();
                rows.iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect()
            })
            .collect();
        assert_eq!(got, want.map(<[i64]>::to_vec), "server {i}");
        let first: Vec<serde_json::Value> = serde_json::from_str(parts[0].get()).unwrap();
        assert_eq!(first[0], serde_json::json!({"Stud_id": 10, "Stud_name": "n", "Stud_marks": 10}));
    }
    // Bad requests name what is wrong.
    let (status, body) = c.send(reqwest::Method::POST, 0, "/v1/shards/sh1/read_ranges", r#"{"ranges":[]}"#).await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("1 to 4096 ranges, not 0"), "{body}");
    let (status, body) = c
        .send(
            reqwest::Method::POST,
            0,
            "/v1/shards/sh1/read_ranges",
            r#"{"ranges":[{"low":1,"high":2},{"low":5,"high":3}]}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("range 1: low 5 is greater than high 3"), "{body}");
    // A copy that may not serve reads refuses them, as `/read` does.
    c.publish(|t| {
        t.shards[0].replicas.insert("Server2".into(), ReplicaState::Recovering);
    })
    .await;
    let e = c.client(2).read_ranges("sh1", &ranges).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotReady), "{e}");
    let e = c.client(0).read_ranges("nope", &ranges).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_read_back_from_the_table() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, inserts(0..5))).await.unwrap();
    // Seq 2 commits on the primary's table without the primary hearing of it, as when the answer
    // to its own commit is lost.
    let db = shard_server::db::Db::connect(&c.servers[0].db_url, 1).await.unwrap();
    let schema = shard_server::schema::Schema::try_from(common::students()).unwrap();
    let table = shard_server::db::ShardTable::new("sh1", schema);
    let lost =
        Entry { seq: 2, epoch: 1, changes: vec![Change { key: 100, row: Some(row(100, "lost answer")) }], hash: None };
    db.apply(&table, &lost).await.unwrap();
    // The primary's next commit fails (the table is past what it knows); the writer then commits
    // the group's batches one by one, taking the table's state back first: the write lands after
    // seq 2, its rows are served, and the replica receives seq 2 from the durable log.
    let r = c.client(0).write("sh1", &write(1, inserts(5..6))).await.unwrap();
    assert_eq!(r.seq, 3);
    for i in [0, 1] {
        assert_eq!(read_when_served(&c, i, Duration::from_secs(20)).await, [0, 1, 2, 3, 4, 5, 100], "server {i}");
    }
    assert_converged(&c, &[0, 1], 7).await;
}
