//! End to end through the local mode: every router endpoint of SEED-API.md with the documented
//! shapes and decisions, success and failure, against real processes and real Postgres.

use reqwest::Method;
use serde_json::json;
use tests::LocalCluster;

fn row(id: i64, name: &str, marks: i64) -> serde_json::Value {
    json!({"Stud_id": id, "Stud_name": name, "Stud_marks": marks})
}

#[tokio::test]
async fn the_seed_api_works_end_to_end() -> anyhow::Result<()> {
    let c = LocalCluster::students()?;

    // GET /status: the seed's shape, shards ordered by low, 6 servers holding 2 shards each.
    let (st, status) = c.send(Method::GET, "/status", "").await?;
    assert_eq!(st, 200, "{status}");
    assert_eq!(status["N"], 6);
    assert_eq!(status["schema"]["columns"], json!(["Stud_id", "Stud_name", "Stud_marks"]));
    assert_eq!(status["schema"]["dtypes"], json!(["Number", "String", "Number"]));
    let shards = status["shards"].as_array().unwrap();
    let ids: Vec<_> = shards.iter().map(|s| s["Shard_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sh1", "sh2", "sh3", "sh4"]);
    assert_eq!(shards[1]["Stud_id_low"], 4096);
    assert_eq!(shards[1]["Shard_size"], 4096);
    let servers = status["servers"].as_object().unwrap();
    assert_eq!(servers.len(), 6);
    assert!(servers.values().all(|s| s.as_array().unwrap().len() == 2), "{servers:?}");

    // POST /write across shards.
    let batch = json!({"data": [row(1000, "A", 10), row(5000, "B", 20), row(9000, "C", 30), row(13000, "D", 40)]});
    let (st, body) = c.send(Method::POST, "/write", &batch.to_string()).await?;
    assert_eq!((st, body), (200, json!({"message": "4 Data entries added", "status": "success"})));

    // An identical retry is a success; a conflicting duplicate is a 409 and writes nothing.
    let (st, _) = c.send(Method::POST, "/write", &batch.to_string()).await?;
    assert_eq!(st, 200);
    let clash = json!({"data": [row(1001, "new", 1), row(5000, "B-changed", 20)]});
    let (st, body) = c.send(Method::POST, "/write", &clash.to_string()).await?;
    assert_eq!(st, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("5000"), "{body}");

    // POST /read across three shards: sorted by key, shards named.
    let (st, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":1000,"high":9000}}"#).await?;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["shards_queried"], json!(["sh1", "sh2", "sh3"]));
    assert_eq!(body["data"], json!([row(1000, "A", 10), row(5000, "B", 20), row(9000, "C", 30)]));
    assert_eq!(body["status"], "success");

    // PUT /update, then read it back.
    let upd = json!({"Stud_id": 5000, "data": row(5000, "B2", 99)});
    let (st, body) = c.send(Method::PUT, "/update", &upd.to_string()).await?;
    assert_eq!((st, body), (200, json!({"message": "Data entry for Stud_id: 5000 updated", "status": "success"})));
    let (_, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":5000,"high":5000}}"#).await?;
    assert_eq!(body["data"], json!([row(5000, "B2", 99)]));

    // DELETE /del.
    let (st, body) = c.send(Method::DELETE, "/del", r#"{"Stud_id":9000}"#).await?;
    assert_eq!(
        (st, body),
        (200, json!({"message": "Data entry with Stud_id:9000 removed from all replicas", "status": "success"}))
    );
    let (_, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":0,"high":16383}}"#).await?;
    assert_eq!(body["data"], json!([row(1000, "A", 10), row(5000, "B2", 99), row(13000, "D", 40)]));

    // Failure cases: a clear 4xx naming what was wrong, and nothing written.
    let cases: &[(Method, &str, &str, u16, &str)] = &[
        (Method::POST, "/write", r#"{"data":[{"Stud_id":20000,"Stud_name":"X","Stud_marks":1}]}"#, 400, "20000"),
        (
            Method::POST,
            "/write",
            r#"{"data":[{"Stud_id":1,"Stud_name":"X","Stud_marks":1},{"Stud_id":-5,"Stud_name":"X","Stud_marks":1}]}"#,
            400,
            "-5",
        ),
        (Method::POST, "/write", r#"{"data":[{"Stud_id":"7","Stud_name":"X","Stud_marks":1}]}"#, 400, "Stud_id"),
        (Method::POST, "/write", r#"{"data":[{"Stud_id":7,"Stud_name":"X","Stud_marks":1.5}]}"#, 400, "Stud_marks"),
        (Method::POST, "/write", r#"{"data":[{"Stud_id":7,"Stud_name":"X"}]}"#, 400, "Stud_marks"),
        (Method::POST, "/write", r#"{"data":[{"Stud_id":7,"Stud_name":"X","Stud_marks":1,"extra":2}]}"#, 400, "extra"),
        (
            Method::POST,
            "/write",
            r#"{"data":[{"Stud_id":7,"Stud_name":"X","Stud_marks":1},{"Stud_id":7,"Stud_name":"X","Stud_marks":1}]}"#,
            400,
            "7",
        ),
        (Method::POST, "/write", r#"{"data": [ {"Stud_id":7, "#, 400, "JSON"),
        (
            Method::PUT,
            "/update",
            r#"{"Stud_id":4242,"data":{"Stud_id":4242,"Stud_name":"X","Stud_marks":1}}"#,
            404,
            "4242",
        ),
        (
            Method::PUT,
            "/update",
            r#"{"Stud_id":1000,"data":{"Stud_id":1001,"Stud_name":"X","Stud_marks":1}}"#,
            400,
            "1001",
        ),
        (
            Method::PUT,
            "/update",
            r#"{"Stud_id":99999,"data":{"Stud_id":99999,"Stud_name":"X","Stud_marks":1}}"#,
            400,
            "99999",
        ),
        (Method::DELETE, "/del", r#"{"Stud_id":4242}"#, 404, "4242"),
        (Method::DELETE, "/del", r#"{"Stud_id":"x"}"#, 400, "Stud_id"),
        (Method::POST, "/read", r#"{"Stud_id":{"low":10,"high":1}}"#, 400, "low"),
        (Method::POST, "/read", r#"not json"#, 400, "JSON"),
        (Method::GET, "/write", "", 405, ""),
        (Method::POST, "/status", "", 405, ""),
    ];
    for (method, path, body, status, needle) in cases {
        let (st, got) = c.send(method.clone(), path, body).await?;
        assert_eq!(st, *status, "{method} {path} {body} -> {got}");
        assert_eq!(got["status"], "failure", "{method} {path}: {got}");
        let msg = got["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with("<Error>") && msg.contains(needle), "{method} {path}: {msg:?} lacks {needle:?}");
    }
    // A client that ran out of rows: the seed answered this, and writes nothing.
    let (st, body) = c.send(Method::POST, "/write", r#"{"data":[]}"#).await?;
    assert_eq!((st, body), (200, json!({"message": "0 Data entries added", "status": "success"})));
    let (_, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":0,"high":16383}}"#).await?;
    assert_eq!(body["data"], json!([row(1000, "A", 10), row(5000, "B2", 99), row(13000, "D", 40)]), "nothing written");
    Ok(())
}

#[tokio::test]
async fn local_mode_restarts_a_crashed_server_and_shuts_down_cleanly() -> anyhow::Result<()> {
    let mut c = LocalCluster::students()?;
    let before = c.cluster_file()?;
    assert_eq!(before.servers.len(), 6);
    let victim = before.servers[0].clone();
    let victim_pid = victim.pid.expect("server 0 runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim_pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    LocalCluster::eventually("the killed server is restarted", std::time::Duration::from_secs(30), || async {
        let Ok(now) = c.cluster_file() else { return false };
        let pid = now.servers[0].pid;
        pid != victim.pid
            && c.http.get(format!("{}/heartbeat", victim.url)).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await?;
    // Its data is still there and writes through it work.
    let (st, body) = c.send(Method::POST, "/write", &json!({"data": [row(1, "after", 1)]}).to_string()).await?;
    assert_eq!(st, 200, "{body}");

    let pids: Vec<u32> = c.cluster_file()?.servers.iter().filter_map(|s| s.pid).collect();
    assert_eq!(pids.len(), 6);
    assert!(c.stop()?, "local mode exits 0 on SIGTERM");
    for pid in pids {
        assert!(localpg::process_gone(pid), "server process {pid} is gone");
    }
    Ok(())
}

/// With `--internal-tls=false` (there to measure what TLS costs) the cluster serves the seed API
/// as before and its processes speak plain HTTP to each other, but a shard server still refuses
/// every caller without the per-cluster secret, and with it answers only as its role allows.
#[tokio::test]
async fn without_internal_tls_the_cluster_secret_still_keeps_strangers_out() -> anyhow::Result<()> {
    let c = LocalCluster::start_with(&tests::repo_root().join("examples/students.yaml"), &["--internal-tls=false"])?;
    let file = c.cluster_file()?;
    assert!(!file.internal.tls && file.internal.token_file.is_some() && file.internal.ca.is_none());
    let server = &file.servers[0].url;
    assert!(server.starts_with("http://127.0.0.1:"), "{server}");
    let (st, body) = c.send(Method::POST, "/write", &json!({"data": [row(7, "seven", 70)]}).to_string()).await?;
    assert_eq!(st, 200, "{body}");
    let (st, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":7,"high":7}}"#).await?;
    assert_eq!((st, body["data"][0]["Stud_name"].as_str()), (200, Some("seven")), "{body}");

    let stranger = shard_server::api::http_client(std::time::Duration::from_secs(10));
    let config = json!({"schema": {"columns": ["a", "b"], "dtypes": ["Number", "String"]}, "shards": ["evil1"]});
    let (st, body) = tests::send(&stranger, Method::POST, &format!("{server}/config"), &config.to_string()).await?;
    assert_eq!((st, body["code"].as_str()), (401, Some("unauthenticated")), "{body}");
    let (st, _) = tests::send(&stranger, Method::GET, &format!("{server}/status"), "").await?;
    assert_eq!(st, 401);
    // A wrong secret is no secret.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-sharddb-token", "not-the-secret".parse()?);
    headers.insert("x-sharddb-identity", "spiffe://sharddb.io/ns/local/db/sharddb/operator/operator".parse()?);
    let guesser = reqwest::Client::builder().default_headers(headers).build()?;
    let (st, _) = tests::send(&guesser, Method::POST, &format!("{server}/config"), &config.to_string()).await?;
    assert_eq!(st, 401);
    // The operator's secret and identity are answered.
    let (st, status) = tests::send(&c.http, Method::GET, &format!("{server}/status"), "").await?;
    assert_eq!(st, 200, "{status}");
    assert!(status["shards"].as_object().unwrap().keys().all(|k| k != "evil1"), "nothing was configured");
    Ok(())
}
