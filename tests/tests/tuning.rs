//! The knobs of a `ShardedDatabase` in local mode: the row cache, the worker threads and the
//! allow-listed Postgres settings reach the processes the operator starts, and a refused setting
//! stops the operator before it starts anything, naming the setting and why. Real processes, real
//! Postgres.

use anyhow::{Context, Result, ensure};
use shard_server::api::ShardClient;
use sqlx::Connection;
use std::process::Command;
use tests::LocalCluster;

const SPEC: &str = "apiVersion: sharddb.io/v1alpha1
kind: ShardedDatabase
metadata:
  name: tuned
spec:
  schema:
    columns: [Stud_id, Stud_name, Stud_marks]
    dtypes: [Number, String, Number]
  shards:
    - { id: sh1, low: 0, size: 4096 }
    - { id: sh2, low: 4096, size: 4096 }
  replicas: 2
  servers: 2
  shardServer:
    cacheRows: 0
    workerThreads: 1
  postgres:
    parameters:
      work_mem: 8MB
      log_lock_waits: \"on\"
";

/// The command line of a running process, split into its arguments.
fn cmdline(pid: u32) -> Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

#[tokio::test]
async fn knobs_reach_the_shard_servers_and_their_postgres() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("tuned.yaml");
    std::fs::write(&spec, SPEC)?;
    let c = LocalCluster::start(&spec)?;
    // A row in each shard: with no room in the cache, a copy holding a row is read from Postgres.
    let rows =
        r#"{"data":[{"Stud_id":1,"Stud_name":"a","Stud_marks":1},{"Stud_id":5000,"Stud_name":"b","Stud_marks":2}]}"#;
    let (st, body) = c.send(reqwest::Method::POST, "/write", rows).await?;
    ensure!(st == 200, "{st} {body}");
    let file = c.cluster_file()?;
    ensure!(file.servers.len() == 2, "{:?}", file.servers);
    for s in &file.servers {
        let args = cmdline(s.pid.context("server pid")?)?;
        let after = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        ensure!(after("--cache-rows").as_deref() == Some("0"), "{}: {args:?}", s.name);
        ensure!(after("--worker-threads").as_deref() == Some("1"), "{}: {args:?}", s.name);
        // The cache has no room: no copy is held in memory.
        let status = ShardClient::new(c.http.clone(), s.url.clone()).status(false).await?;
        ensure!(!status.shards.is_empty(), "{} holds copies", s.name);
        ensure!(status.shards.values().all(|sh| !sh.cached), "{}: {:?}", s.name, status.shards);
        let mut pg = sqlx::PgConnection::connect(&s.postgres.connect_url()?).await?;
        let (work_mem,): (String,) = sqlx::query_as("SHOW work_mem").fetch_one(&mut pg).await?;
        let (lock_waits,): (String,) = sqlx::query_as("SHOW log_lock_waits").fetch_one(&mut pg).await?;
        ensure!((work_mem.as_str(), lock_waits.as_str()) == ("8MB", "on"), "{}: {work_mem}, {lock_waits}", s.name);
    }
    Ok(())
}

#[test]
fn a_refused_postgres_setting_stops_the_operator_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("unsafe.yaml");
    std::fs::write(&spec, SPEC.replace("work_mem: 8MB", "fsync: \"off\""))?;
    let out = Command::new(tests::bin_dir().join("sharddb-operator"))
        .arg("local")
        .arg(&spec)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--port", "0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the operator ran with fsync off: {stderr}");
    ensure!(
        stderr.contains("spec.postgres.parameters.fsync: not settable: an acknowledged write must survive a crash"),
        "{stderr}"
    );
    ensure!(!dir.path().join("data/servers").exists(), "nothing was started");
    Ok(())
}
