//! End to end through the local mode: the seed's admin verbs. A cluster started with no spec
//! waits for `/init` and then serves the seed client's sequence; `/add` brings a server up and
//! fills it from the replicas; `/rm` under a light write load drains servers before stopping them
//! and loses no acknowledged write; refused requests answer 400/409 and change nothing. Real
//! processes, real Postgres, real HTTP.

use anyhow::{Context, Result, ensure};
use reqwest::Method;
use serde_json::{Value, json};
use shard_server::api::ShardClient;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::LocalCluster;

/// How long a cluster may take to carry out a placement change (servers start, copies heal).
const SETTLE: Duration = Duration::from_secs(180);

fn row(id: i64, name: &str, marks: i64) -> Value {
    json!({"Stud_id": id, "Stud_name": name, "Stud_marks": marks})
}

/// A row as stored and read back: `Stud_marks` is declared a String, so a number sent for it
/// comes back as its decimal text.
fn stored_row(id: i64, name: &str, marks: i64) -> Value {
    json!({"Stud_id": id, "Stud_name": name, "Stud_marks": marks.to_string()})
}

fn shards_json() -> Value {
    json!([
        {"Stud_id_low": 0, "Shard_id": "sh1", "Shard_size": 4096},
        {"Stud_id_low": 4096, "Shard_id": "sh2", "Shard_size": 4096},
        {"Stud_id_low": 8192, "Shard_id": "sh3", "Shard_size": 4096},
        {"Stud_id_low": 12288, "Shard_id": "sh4", "Shard_size": 4096}
    ])
}

fn schema_json() -> Value {
    // As the seed's own client declares it: Stud_marks a String it then sends numbers for.
    json!({"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "String"]})
}

async fn status(c: &LocalCluster) -> Result<Value> {
    let (st, body) = c.send(Method::GET, "/status", "").await?;
    ensure!(st == 200, "/status answered {st}: {body}");
    Ok(body)
}

/// Shard id → (server → state), from the router's `/status`.
fn replicas(status: &Value) -> BTreeMap<String, BTreeMap<String, String>> {
    status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let states = s["replicas"].as_object().unwrap();
            let states = states.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
            (s["Shard_id"].as_str().unwrap().to_owned(), states)
        })
        .collect()
}

/// Whether every copy in `/status` is ready, the holders are exactly `want`, and no other server
/// is listed.
fn placed_as(status: &Value, want: &BTreeMap<&str, Vec<&str>>) -> bool {
    let got = replicas(status);
    let servers: std::collections::BTreeSet<&str> = want.values().flatten().copied().collect();
    let listed = status["servers"].as_object().map(|m| m.keys().map(String::as_str).collect::<Vec<_>>());
    listed.is_some_and(|l| l.into_iter().eq(servers.iter().copied()))
        && got.len() == want.len()
        && want.iter().all(|(shard, holders)| {
            got.get(*shard).is_some_and(|states| {
                states.keys().map(String::as_str).eq(holders.iter().copied()) && states.values().all(|s| s == "ready")
            })
        })
}

/// For every shard, each ready copy's (applied seq, rows, checksum) from its own server.
async fn copies(c: &LocalCluster) -> Result<BTreeMap<String, BTreeMap<String, (u64, i64, String)>>> {
    let st = status(c).await?;
    let file = c.cluster_file()?;
    let http = file.operator_credentials()?.http_client(Duration::from_secs(10));
    let mut out: BTreeMap<String, BTreeMap<String, (u64, i64, String)>> = BTreeMap::new();
    for (shard, states) in replicas(&st) {
        for (server, state) in states {
            ensure!(state == "ready", "{shard} on {server} is {state}");
            let url = &file.servers.iter().find(|s| s.name == server).context("server in cluster.json")?.url;
            let stats = ShardClient::new(http.clone(), url.as_str()).stats(&shard).await?;
            out.entry(shard.clone()).or_default().insert(server, (stats.applied_seq, stats.rows, stats.checksum));
        }
    }
    Ok(out)
}

/// Waits until every ready copy of every shard holds the same rows (and returns the row counts).
async fn converged(c: &LocalCluster) -> Result<BTreeMap<String, i64>> {
    let start = Instant::now();
    loop {
        let all = copies(c).await?;
        let equal = all.values().all(|by_server| {
            let mut values = by_server.values();
            let first = values.next();
            values.all(|v| Some(v) == first)
        });
        if equal {
            return Ok(all
                .iter()
                .map(|(shard, by_server)| (shard.clone(), by_server.values().next().unwrap().1))
                .collect());
        }
        ensure!(start.elapsed() < SETTLE, "copies never converged: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_placed(c: &LocalCluster, what: &str, want: &BTreeMap<&str, Vec<&str>>) -> Result<Duration> {
    let start = Instant::now();
    let placed =
        LocalCluster::eventually(what, SETTLE, || async { status(c).await.is_ok_and(|s| placed_as(&s, want)) }).await;
    if let Err(e) = placed {
        // What the operator did and said, to tell a stuck move from a slow one.
        let tail = |name: &str| {
            let text = std::fs::read_to_string(c.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        let now = status(c).await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let logs =
            format!("/status: {now}\nevents.log:\n{}\noperator.log:\n{}", tail("events.log"), tail("operator.log"));
        return Err(e.context(logs));
    }
    Ok(start.elapsed())
}

#[tokio::test]
async fn an_empty_cluster_waits_for_init_then_serves_the_seed_client() -> Result<()> {
    let c = LocalCluster::empty()?;

    // Nothing configured: /status shows the empty configuration (as the seed's load balancer
    // did), /add and /rm are refused until /init.
    let (st, body) = c.send(Method::GET, "/status", "").await?;
    assert_eq!((st, &body["N"], &body["shards"]), (200, &json!(0), &json!([])), "{body}");
    let (st, body) = c.send(Method::POST, "/add", r#"{"n":1,"servers":{"Server9":["sh1"]}}"#).await?;
    assert_eq!(st, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("POST /init first"), "{body}");
    let (st, body) = c.send(Method::DELETE, "/rm", r#"{"n":1,"servers":[]}"#).await?;
    assert_eq!(st, 409, "{body}");

    // Refused /init requests: the reason named, nothing configured.
    let servers =
        json!({"Server0": ["sh1", "sh2"], "Server1": ["sh3", "sh4"], "Server[5]": ["sh1", "sh2", "sh3", "sh4"]});
    let bad = [
        (
            json!({"N": 1, "schema": schema_json(), "shards": shards_json(), "servers": {"Server0": ["sh1", "sh9"]}}),
            "servers.Server0: unknown shard sh9",
        ),
        (
            json!({"N": 1, "schema": schema_json(), "shards": [{"Stud_id_low": 0, "Shard_id": "sh1"}]}),
            "shards[0]: missing Shard_size",
        ),
        (
            json!({"N": 2, "schema": schema_json(), "shards": [
                {"Stud_id_low": 0, "Shard_id": "a", "Shard_size": 10}, {"Stud_id_low": 5, "Shard_id": "b", "Shard_size": 10}]}),
            "shards[1] (b) overlaps a",
        ),
    ];
    for (body, want) in bad {
        let (st, answer) = c.send(Method::POST, "/init", &body.to_string()).await?;
        assert_eq!(st, 400, "{body} → {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.starts_with("<Error> ") && message.contains(want), "{message:?} should name {want:?}");
        assert_eq!(answer["status"], "failure");
    }
    let (st, body) = c.send(Method::GET, "/status", "").await?;
    assert_eq!((st, &body["N"], &body["shards"]), (200, &json!(0), &json!([])), "still nothing configured: {body}");

    // The seed client's sequence: /init, then writes and reads at once. `N` is informational
    // when `servers` is given (the seed's load balancer never read it): 2 here for 3 servers.
    let init = json!({"N": 2, "schema": schema_json(), "shards": shards_json(), "servers": servers});
    let t0 = Instant::now();
    let (st, body) = c.send(Method::POST, "/init", &init.to_string()).await?;
    assert_eq!((st, body), (200, json!({"message": "Configured Database", "status": "success"})));
    println!("/init answered after {:?}", t0.elapsed());
    let batch = json!({"data": [row(1, "A", 10), row(5000, "B", 20), row(9000, "C", 30), row(13000, "D", 40)]});
    let (st, body) = c.send(Method::POST, "/write", &batch.to_string()).await?;
    assert_eq!((st, body), (200, json!({"message": "4 Data entries added", "status": "success"})));
    let (st, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":0,"high":16383}}"#).await?;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["shards_queried"], json!(["sh1", "sh2", "sh3", "sh4"]));
    assert_eq!(
        body["data"],
        json!([
            stored_row(1, "A", 10),
            stored_row(5000, "B", 20),
            stored_row(9000, "C", 30),
            stored_row(13000, "D", 40)
        ])
    );

    let st = status(&c).await?;
    assert_eq!(st["N"], 3);
    assert_eq!(
        st["servers"],
        json!({"Server0": ["sh1", "sh2"], "Server1": ["sh3", "sh4"], "Server2": ["sh1", "sh2", "sh3", "sh4"]}),
        "Server[5] got the first free name"
    );

    // A second /init is refused and changes nothing.
    let (st, body) = c.send(Method::POST, "/init", &init.to_string()).await?;
    assert_eq!(st, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("already configured"), "{body}");
    assert!(c.dir.path().join("declared.json").is_file(), "the declared configuration is kept for a restart");
    Ok(())
}

#[tokio::test]
async fn add_fills_a_new_server_and_rm_drains_without_losing_a_write() -> Result<()> {
    let c = LocalCluster::empty()?;
    // Three servers, every shard on all three (3 copies by default).
    let init = json!({"N": 3, "schema": schema_json(), "shards": shards_json()});
    let (st, body) = c.send(Method::POST, "/init", &init.to_string()).await?;
    assert_eq!(st, 200, "{body}");
    let rows: Vec<Value> = (0..400).map(|i| row(i * 41, &format!("n{i}"), i)).collect();
    for chunk in rows.chunks(100) {
        let (st, body) = c.send(Method::POST, "/write", &json!({"data": chunk}).to_string()).await?;
        assert_eq!(st, 200, "{body}");
    }

    // /add: a new server (generated name) with two existing shards and a new one.
    let add = json!({
        "n": 1,
        "new_shards": [{"Stud_id_low": 16384, "Shard_id": "sh5", "Shard_size": 4096}],
        "servers": {"Server[9]": ["sh1", "sh2", "sh5"]}
    });
    let t0 = Instant::now();
    let (st, body) = c.send(Method::POST, "/add", &add.to_string()).await?;
    assert_eq!((st, body), (200, json!({"N": 4, "message": "Add Server:3", "status": "successful"})));
    let all = vec!["Server0", "Server1", "Server2", "Server3"];
    let three = vec!["Server0", "Server1", "Server2"];
    let want: BTreeMap<&str, Vec<&str>> =
        [("sh1", all.clone()), ("sh2", all.clone()), ("sh3", three.clone()), ("sh4", three), ("sh5", vec!["Server3"])]
            .into();
    let took = wait_placed(&c, "Server3 holds ready copies of sh1, sh2 and sh5", &want).await?;
    println!("/add: Server3 started and filled in {:?} (after the answer: {took:?})", t0.elapsed());
    let counts = converged(&c).await?;
    assert_eq!(counts.values().sum::<i64>(), 400, "every row on every ready copy: {counts:?}");
    assert_eq!(counts["sh1"], 100);
    let (st, body) = c.send(Method::POST, "/write", &json!({"data": [row(20000, "new", 1)]}).to_string()).await?;
    assert_eq!(st, 200, "the new shard takes writes: {body}");

    // Refused admin requests change nothing.
    let before = std::fs::read(c.dir.path().join("declared.json"))?;
    let refused: &[(Method, &str, Value, &str)] = &[
        (
            Method::POST,
            "/add",
            json!({"n": 2, "servers": {"Server7": ["sh1"]}}),
            "<Error> Number of new servers (n) is greater than newly added instances",
        ),
        (
            Method::POST,
            "/add",
            json!({"n": 1, "servers": {"Server1": ["sh1"]}}),
            "<Error> server Server1 already exists",
        ),
        (
            Method::POST,
            "/add",
            json!({"n": 1, "servers": {"Server7": ["sh8"]}}),
            "<Error> servers.Server7: unknown shard sh8",
        ),
        (
            Method::DELETE,
            "/rm",
            json!({"n": 1, "servers": ["Server1", "Server2"]}),
            "<Error> Length of server list is more than removable instances",
        ),
        (Method::DELETE, "/rm", json!({"n": 1, "servers": ["Server8"]}), "<Error> unknown server Server8"),
        (
            Method::DELETE,
            "/rm",
            json!({"n": 4, "servers": []}),
            "<Error> removing these servers would remove the last replica of shard sh1",
        ),
    ];
    for (method, path, body, want) in refused {
        let (st, answer) = c.send(method.clone(), path, &body.to_string()).await?;
        assert_eq!((st, answer["message"].as_str().unwrap()), (400, *want), "{path} {body}");
    }
    assert_eq!(std::fs::read(c.dir.path().join("declared.json"))?, before, "nothing declared changed");
    assert!(placed_as(&status(&c).await?, &want), "nothing moved");

    // /rm under a light write load: Server0 is the primary of sh1 and sh4, so they hand over; its
    // copy of sh3 and sh4 moves to Server3, which lacks them.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, url, stop) = (c.http.clone(), c.url("/write"), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0usize);
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let key = 1 + (i * 7919) % 16383; // distinct keys over all four shards, none written before
                let key = if key % 41 == 0 { key + 1 } else { key };
                let body = json!({"data": [row(key, "load", i)]}).to_string();
                match tests::send(&http, Method::POST, &url, &body).await {
                    Ok((200, _)) => acked.push((key, i)),
                    _ => failed += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let (st, body) = c.send(Method::DELETE, "/rm", r#"{"n":1,"servers":["Server0"]}"#).await?;
    assert_eq!((st, body), (200, json!({"message": {"N": 3, "servers": ["Server0"]}, "status": "successful"})));
    let rest = vec!["Server1", "Server2", "Server3"];
    let want: BTreeMap<&str, Vec<&str>> = [
        ("sh1", rest.clone()),
        ("sh2", rest.clone()),
        ("sh3", rest.clone()),
        ("sh4", rest.clone()),
        ("sh5", vec!["Server3"]),
    ]
    .into();
    let took = wait_placed(&c, "Server0 drained and gone from /status", &want).await?;
    println!("/rm: Server0 drained in {took:?}");
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await?;
    println!("writes during /rm: {} acknowledged, {failed} failed", acked.len());
    assert!(!acked.is_empty());

    let st = status(&c).await?;
    assert_eq!(st["N"], 3);
    assert!(st["servers"].get("Server0").is_none(), "{st}");
    for shard in st["shards"].as_array().unwrap() {
        assert!(shard["primary"] != "Server0", "{shard}");
    }
    LocalCluster::eventually("Server0's process stopped and left cluster.json", SETTLE, || async {
        c.cluster_file().is_ok_and(|f| f.servers.iter().all(|s| s.name != "Server0"))
    })
    .await?;
    println!("Server0 left cluster.json {:?} after /rm", t0.elapsed());

    // No acknowledged write lost, and every ready copy holds the same rows.
    let (st, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":0,"high":20479}}"#).await?;
    assert_eq!(st, 200, "{body}");
    let stored: BTreeMap<i64, Value> =
        body["data"].as_array().unwrap().iter().map(|r| (r["Stud_id"].as_i64().unwrap(), r.clone())).collect();
    for (key, i) in &acked {
        assert_eq!(stored.get(key), Some(&stored_row(*key, "load", *i)), "acknowledged write of key {key} is missing");
    }
    for i in 0..400 {
        assert_eq!(stored.get(&(i * 41)), Some(&stored_row(i * 41, &format!("n{i}"), i)));
    }
    let counts = converged(&c).await?;
    assert_eq!(counts.values().sum::<i64>() as usize, stored.len(), "{counts:?}");
    Ok(())
}

/// The operator keeps no state of its own: stopped right after `/add` and right after `/rm` were
/// accepted, and started again on its data directory with no spec file, it resumes the declared
/// configuration and finishes filling the new server and draining the removed one.
#[tokio::test]
async fn a_restarted_operator_resumes_an_add_and_a_drain() -> Result<()> {
    let mut c = LocalCluster::empty()?;
    let init = json!({"N": 3, "schema": schema_json(), "shards": shards_json()});
    let (st, body) = c.send(Method::POST, "/init", &init.to_string()).await?;
    assert_eq!(st, 200, "{body}");
    let rows: Vec<Value> = (0..200).map(|i| row(i * 80, &format!("r{i}"), i)).collect();
    let (st, body) = c.send(Method::POST, "/write", &json!({"data": rows}).to_string()).await?;
    assert_eq!(st, 200, "{body}");

    let add = json!({"n": 1, "servers": {"Server[1]": ["sh1", "sh2", "sh3", "sh4"]}});
    let (st, body) = c.send(Method::POST, "/add", &add.to_string()).await?;
    assert_eq!((st, body), (200, json!({"N": 4, "message": "Add Server:3", "status": "successful"})));
    c.restart()?;
    let all = vec!["Server0", "Server1", "Server2", "Server3"];
    let want: BTreeMap<&str, Vec<&str>> = ["sh1", "sh2", "sh3", "sh4"].into_iter().map(|s| (s, all.clone())).collect();
    let took = wait_placed(&c, "after a restart, Server3 holds ready copies of every shard", &want).await?;
    println!("/add resumed after a restart: placed {took:?} after the new router answered");

    let (st, body) = c.send(Method::DELETE, "/rm", r#"{"n":1,"servers":["Server0"]}"#).await?;
    assert_eq!((st, body), (200, json!({"message": {"N": 3, "servers": ["Server0"]}, "status": "successful"})));
    c.restart()?;
    let rest = vec!["Server1", "Server2", "Server3"];
    let want: BTreeMap<&str, Vec<&str>> = ["sh1", "sh2", "sh3", "sh4"].into_iter().map(|s| (s, rest.clone())).collect();
    let took = wait_placed(&c, "after a restart, Server0 drained and gone", &want).await?;
    println!("/rm resumed after a restart: drained {took:?} after the new router answered");

    let (st, body) = c.send(Method::POST, "/read", r#"{"Stud_id":{"low":0,"high":16383}}"#).await?;
    assert_eq!(st, 200, "{body}");
    let expected: Vec<Value> = (0..200).map(|i| stored_row(i * 80, &format!("r{i}"), i)).collect();
    assert_eq!(body["data"], json!(expected), "every row survived both restarts");
    let counts = converged(&c).await?;
    assert_eq!(counts.values().sum::<i64>(), 200, "{counts:?}");
    LocalCluster::eventually("Server0's data deleted", SETTLE, || async {
        !c.dir.path().join("servers/Server0").exists()
    })
    .await?;
    Ok(())
}

/// With `--admin-token`, the router's admin verbs answer only a request bearing the token kept in
/// the data directory; anything else is a 401 that configures nothing.
#[tokio::test]
async fn the_admin_verbs_can_require_a_token() -> Result<()> {
    let c = LocalCluster::empty_with(&["--admin-token"])?;
    let file = c.cluster_file()?.internal.admin_token_file.context("cluster.json names the token's file")?;
    let token = std::fs::read_to_string(&file)?.trim().to_owned();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o600);
    let init = json!({"N": 1, "schema": schema_json(), "shards": shards_json(), "servers": {"Server0": ["sh1", "sh2", "sh3", "sh4"]}});
    let send = |auth: Option<String>| {
        let mut req = c.http.post(c.url("/init")).body(init.to_string());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move {
            let r = req.send().await?;
            anyhow::Ok((r.status().as_u16(), r.headers().get("www-authenticate").is_some(), r.json::<Value>().await?))
        }
    };
    for auth in [None, Some("Bearer wrong".to_owned()), Some(token.clone())] {
        let (st, challenged, body) = send(auth.clone()).await?;
        assert_eq!((st, challenged, body["code"].as_str()), (401, true, Some("unauthenticated")), "{auth:?}: {body}");
    }
    let (st, body) = c.send(Method::GET, "/status", "").await?;
    assert_eq!((st, &body["N"], &body["shards"]), (200, &json!(0), &json!([])), "nothing configured: {body}");
    let (st, _, body) = send(Some(format!("Bearer {token}"))).await?;
    assert_eq!(st, 200, "{body}");
    let (st, body) = c.send(Method::DELETE, "/rm", r#"{"n":1,"servers":[]}"#).await?;
    assert_eq!(st, 401, "every admin verb: {body}");
    // Reads and writes stay open, as the seed's clients use them.
    let (st, body) =
        c.send(Method::POST, "/write", r#"{"data":[{"Stud_id":1,"Stud_name":"a","Stud_marks":1}]}"#).await?;
    assert_eq!(st, 200, "{body}");
    Ok(())
}
