//! The seed's own benchmark client, replayed unchanged against the local mode started empty (as
//! the seed's load balancer was): `POST /init` with the seed's layouts, then
//! 10,000 single-row writes with keys drawn from 1..24,574 (about a third in no shard on A-1 and
//! A-2, which cover 0..16,383; A-3 covers 0..24,575), then a single-key read of every key written. The client raises
//! on any answer but 200, so every answer must be 200; and every row stored reads back exactly,
//! while a skipped key reads back empty and its write said it was skipped.

use futures::StreamExt;
use rand::SeedableRng;
use reqwest::Method;
use serde_json::{Value, json};
use tests::LocalCluster;
use tests::bench::layout::{row_marks, row_name};
use tests::bench::specs::Shape;

/// The seed client's request count and key range.
const WRITES: usize = 10_000;
const MAX_KEY: usize = 24_574;
/// The seed's async client allowed up to 100 connections at once.
const CONCURRENCY: usize = 100;

fn row(key: i64) -> Value {
    // Stud_marks is declared String; the seed's client sends a number for it.
    json!({"Stud_id": key, "Stud_name": row_name(key), "Stud_marks": row_marks(key)})
}

async fn replay(shape: Shape) -> anyhow::Result<()> {
    let c = LocalCluster::empty()?;
    // Before /init the seed's load balancer answered /status with an empty configuration.
    let (st, body) = c.send(Method::GET, "/status", "").await?;
    assert_eq!((st, &body["shards"]), (200, &json!([])), "{body}");

    let (st, body) = c.send(Method::POST, "/init", &shape.init_body().to_string()).await?;
    assert_eq!((st, body), (200, json!({"message": "Configured Database", "status": "success"})), "{}", shape.name);
    let (st, status) = c.send(Method::GET, "/status", "").await?;
    assert_eq!((st, status["N"].as_u64()), (200, Some(shape.servers as u64)), "{status}");
    let high = shape.key_space();

    // Distinct keys (a repeated key with another row would be a conflict, not the point here).
    let mut rng = rand::rngs::StdRng::seed_from_u64(shape.servers as u64);
    let keys: Vec<i64> =
        rand::seq::index::sample(&mut rng, MAX_KEY, WRITES).into_iter().map(|i| i as i64 + 1).collect();
    let unrouted = keys.iter().filter(|&&k| k >= high).count();
    if high <= MAX_KEY as i64 {
        assert!(unrouted > WRITES / 5, "only {unrouted} keys in no shard");
    }

    let writes = futures::stream::iter(keys.iter().copied())
        .map(|k| {
            let c = &c;
            async move { (k, c.send(Method::POST, "/write", &json!({"data": [row(k)]}).to_string()).await) }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for (k, answer) in writes {
        let (st, body) = answer?;
        if st != 200 {
            panic!("{}: write of {k}: {st} {body}; warnings logged:\n{}", shape.name, warnings(&c));
        }
        let want = if k < high {
            "1 Data entries added".to_owned()
        } else {
            format!("0 Data entries added; 1 skipped (Stud_id {k} is in no shard)")
        };
        assert_eq!(body["message"], want.as_str(), "{}: write of {k}", shape.name);
    }

    // Half the reads as GET with a body (the assignment's figure), half as POST (its text).
    let reads = futures::stream::iter(keys.iter().copied().enumerate())
        .map(|(i, k)| {
            let c = &c;
            let method = if i % 2 == 0 { Method::GET } else { Method::POST };
            async move { (k, c.send(method, "/read", &json!({"Stud_id": {"low": k, "high": k}}).to_string()).await) }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for (k, answer) in reads {
        let (st, body) = answer?;
        assert_eq!(st, 200, "{}: read of {k}: {body}", shape.name);
        let want = if k < high {
            json!([{"Stud_id": k, "Stud_name": row_name(k), "Stud_marks": row_marks(k).to_string()}])
        } else {
            json!([])
        };
        if body["data"] != want {
            // Say which copies hold the row, and what a second read sees, before failing.
            let again = c.send(Method::POST, "/read", &json!({"Stud_id": {"low": k, "high": k}}).to_string()).await?;
            let shard = format!("sh{}", k / shape.shard_size + 1);
            let mut copies = Vec::new();
            for server in c.cluster_file()?.servers {
                let req = json!({"shard": shard, "Stud_id": {"low": k, "high": k}}).to_string();
                copies.push((
                    server.name,
                    tests::send(&c.http, Method::POST, &format!("{}/read", server.url), &req).await?,
                ));
            }
            panic!(
                "{}: read of {k} gave {body}, want {want}; read again: {again:?}; copies: {copies:?}; warnings \
                 logged:\n{}",
                shape.name,
                warnings(&c)
            );
        }
    }
    Ok(())
}

/// The warnings and errors the cluster's processes logged, for a failure's message.
fn warnings(c: &LocalCluster) -> String {
    let mut out = std::fs::read_to_string(c.dir.path().join("events.log")).unwrap_or_default();
    let logs = std::fs::read_dir(c.dir.path().join("logs")).into_iter().flatten().flatten();
    for entry in logs {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20) {
            out.push_str(&format!("{}: {line}\n", entry.file_name().to_string_lossy()));
        }
    }
    out
}

#[tokio::test]
async fn the_seed_client_runs_unchanged_on_a1() -> anyhow::Result<()> {
    replay(Shape::a1()).await
}

#[tokio::test]
async fn the_seed_client_runs_unchanged_on_a2() -> anyhow::Result<()> {
    replay(Shape::a2()).await
}

#[tokio::test]
async fn the_seed_client_runs_unchanged_on_a3() -> anyhow::Result<()> {
    replay(Shape::a3()).await
}
