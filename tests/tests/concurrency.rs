//! 200 clients write distinct keys at once through the router, 100 of them into one shard; then
//! every replica of every shard holds exactly the rows written to it.

use futures::StreamExt;
use reqwest::Method;
use serde_json::json;
use shard_server::topology::Topology;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tests::LocalCluster;

#[tokio::test]
async fn concurrent_writers_land_on_every_replica() -> anyhow::Result<()> {
    let c = LocalCluster::students()?;
    // 100 keys in sh1 ([0, 4096)), 100 spread over the other shards.
    let keys: Vec<i64> = (0..100).map(|i| i * 37).chain((0..100).map(|i| 4096 + i * 121)).collect();
    let results = futures::stream::iter(keys.clone())
        .map(|k| {
            let c = &c;
            async move {
                let body = json!({"data": [{"Stud_id": k, "Stud_name": format!("n{k}"), "Stud_marks": k % 100}]});
                c.send(Method::POST, "/write", &body.to_string()).await
            }
        })
        .buffer_unordered(200)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        let (st, body) = r?;
        assert_eq!(st, 200, "{body}");
    }

    let file = c.cluster_file()?;
    let topology = Topology::parse(&std::fs::read(&file.topology)?)?;
    for shard in &topology.shards {
        let expected: BTreeSet<i64> = keys.iter().copied().filter(|k| shard.contains(*k)).collect();
        assert_eq!(shard.replicas.len(), 3);
        for server in shard.replicas.keys() {
            let url = &topology.servers[server].url;
            let req = json!({"shard": shard.id, "Stud_id": {"low": shard.low, "high": shard.high_exclusive() - 1}});
            // A replica serves reads only while it holds its primary's read lease (reads are
            // linearizable); right after a burst on a loaded machine it may be between two.
            let deadline = Instant::now() + Duration::from_secs(30);
            let (st, body) = loop {
                let (st, body) = tests::send(&c.http, Method::POST, &format!("{url}/read"), &req.to_string()).await?;
                if st != 503 || body["code"] != "not_ready" || Instant::now() > deadline {
                    break (st, body);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(st, 200, "{body}");
            let got: BTreeSet<i64> =
                body["data"].as_array().unwrap().iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect();
            assert_eq!(got, expected, "replica {server} of {}", shard.id);
        }
    }
    Ok(())
}
