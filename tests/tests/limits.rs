//! Huge counts against real processes: every count that sizes an allocation is refused at once
//! with a 400 naming its limit, and the process it was sent to neither takes long nor grows. The
//! bounds are generous behaviour checks (an answer within seconds, a peak RSS far below what the
//! unbounded requests used to take: the operator grew past 12 GB on `/init` with `N` 2^32-1), not
//! benchmarks; the measured times and peaks are printed.

use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tests::LocalCluster;
use tests::bench::procstat::memory;

/// An answer to a refused huge request comes within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// No process's peak resident memory may pass this.
const PEAK_MIB: f64 = 200.0;

async fn refused(c: &LocalCluster, url: &str, method: Method, body: String, needle: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (st, answer) = tests::send(&c.http, method, url, &body).await?;
    let took = started.elapsed();
    assert_eq!(st, 400, "{url}: {answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{url}: {message:?} should contain {needle:?}");
    assert!(took < ANSWER_WITHIN, "{url}: refused after {took:?}");
    Ok(took)
}

fn peak(name: &str, pid: u32) -> f64 {
    let m = memory(pid).unwrap_or_else(|| panic!("{name} (pid {pid}) is gone"));
    println!("{name}: peak RSS {:.1} MiB, now {:.1} MiB", m.peak_mib, m.rss_mib);
    assert!(m.peak_mib < PEAK_MIB, "{name} peaked at {:.1} MiB", m.peak_mib);
    m.peak_mib
}

#[tokio::test]
async fn huge_counts_are_refused_at_once_without_growing_anyone() -> anyhow::Result<()> {
    let c = LocalCluster::empty()?;
    let router_pid = c.cluster_file()?.router.pid.expect("the router runs");
    let schema = json!({"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"]});
    let shard = json!({"Stud_id_low": 0, "Shard_id": "sh1", "Shard_size": 1000});

    // The router: N, shards and servers of /init, n of /rm, rows of /write.
    let init = c.url("/init");
    let huge_n = json!({"N": u32::MAX, "schema": schema, "shards": [shard]}).to_string();
    let t = refused(&c, &init, Method::POST, huge_n, "at most 256 servers").await?;
    println!("/init N=4294967295: {t:?}");
    let many_shards = json!({"N": 1, "schema": schema, "shards": vec![shard.clone(); 250_000]}).to_string();
    let size = many_shards.len();
    let t = refused(&c, &init, Method::POST, many_shards, "more than 1024 items").await?;
    println!("/init with 250,000 shards ({size} bytes): {t:?}");
    let servers: serde_json::Map<String, Value> = (0..100_000).map(|i| (format!("S{i}"), json!(["sh1"]))).collect();
    let many_servers = json!({"N": 1, "schema": schema, "shards": [shard], "servers": servers}).to_string();
    refused(&c, &init, Method::POST, many_servers, "more than 256 entries").await?;
    refused(&c, &c.url("/rm"), Method::DELETE, json!({"n": u32::MAX}).to_string(), "at most 256 servers").await?;

    // A database of one shard on one server, then rows and the shard server's own lists.
    let (st, body) =
        c.send(Method::POST, "/init", &json!({"N": 1, "schema": schema, "shards": [shard]}).to_string()).await?;
    assert_eq!(st, 200, "{body}");
    let rows = format!("{{\"data\": [{}1]}}", "1,".repeat(5_000_000));
    let t = refused(&c, &c.url("/write"), Method::POST, rows, "more than 100000 items").await?;
    println!("/write of 5,000,000 rows (10 MB): {t:?}");

    let file = c.cluster_file()?;
    let server = &file.servers[0];
    let ranges = json!({"ranges": vec![json!({"low": 0, "high": 1}); 1_000_000]}).to_string();
    let t = refused(&c, &format!("{}/v1/shards/sh1/read_ranges", server.url), Method::POST, ranges, "more than 4096")
        .await?;
    println!("read_ranges of 1,000,000 ranges: {t:?}");
    let batches = json!({"epoch": 1, "batches": vec![json!([]); 1_000_000]}).to_string();
    let t = refused(
        &c,
        &format!("{}/v1/shards/sh1/write_batches", server.url),
        Method::POST,
        batches,
        "more than 4096 batches",
    )
    .await?;
    println!("write_batches of 1,000,000 batches: {t:?}");
    let config = json!({"schema": schema, "shards": vec!["s"; 2_000_000]}).to_string();
    refused(&c, &format!("{}/config", server.url), Method::POST, config, "more than 1024 items").await?;

    // The row cache: 24 MB of large rows (past the 16 MiB byte budget, far below the row budget)
    // turn the shard's cache off instead of growing the server.
    let name = "x".repeat(100_000);
    for batch in 0..24 {
        let rows: Vec<Value> =
            (0..10).map(|i| json!({"Stud_id": batch * 10 + i, "Stud_name": name, "Stud_marks": 1})).collect();
        let (st, body) = c.send(Method::POST, "/write", &json!({"data": rows}).to_string()).await?;
        assert_eq!(st, 200, "{body}");
    }
    let status = shard_server::api::ShardClient::new(c.http.clone(), server.url.as_str()).status(false).await?;
    assert!(!status.shards["sh1"].cached, "24 MB of rows stayed in a 16 MiB cache");
    assert_eq!(status.shards["sh1"].rows, 240);

    peak("operator", c.operator_pid());
    peak("router", router_pid);
    peak("shard server", server.pid.expect("the server runs"));
    Ok(())
}
