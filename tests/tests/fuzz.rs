//! Generated bad requests against the router and a shard server of a running local cluster: a
//! corpus drawn from a fixed seed (so a failure replays), a few hundred requests per target. Each
//! answer must come within a bound (no hang), never be a 5xx, and be the JSON error shape when it
//! is an error. Rows written before the run must read back exactly afterwards, and every copy of
//! every shard must agree (same sequence number, row count and checksum).
//!
//! The generators mutate valid requests (types, NUL characters, out-of-range and huge numbers,
//! missing and extra fields, lists past the limits, broken JSON, wrong methods and paths). Keys
//! they name are kept apart from the rows written first, and admin verbs only ever get bodies the
//! router refuses, so the run changes nothing it should not.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use shard_server::topology::Topology;
use std::time::{Duration, Instant};
use tests::LocalCluster;

const REQUESTS_PER_TARGET: usize = 300;
/// Keys of the rows written before the run; the generators never name them.
const KEPT: std::ops::Range<i64> = 0..50;
/// Generous: a bad request is answered at once; only a hang would take this long.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

fn kept_row(k: i64) -> Value {
    json!({"Stud_id": k, "Stud_name": format!("kept{k}"), "Stud_marks": k})
}

/// A value of any JSON type, sometimes nasty.
fn value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => json!(null),
        1 => json!(true),
        2 => json!(rng.random_range(-5i64..5)),
        3 => json!(i64::MAX),
        4 => json!(u64::MAX),
        5 => json!(1.5e300),
        6 => json!("a\u{0}b"),
        7 => json!("ok"),
        8 => json!([1, 2, 3]),
        9 => json!({"low": 1}),
        10 => json!("x".repeat(rng.random_range(0..2000))),
        _ => json!(-0.5),
    }
}

/// A key away from the kept rows, or not a key at all.
fn key(rng: &mut StdRng) -> Value {
    match rng.random_range(0..6) {
        0 => json!(rng.random_range(1000i64..30_000)),
        1 => json!(rng.random_range(-100i64..-1)),
        2 => json!(i64::MIN),
        _ => value(rng),
    }
}

fn row(rng: &mut StdRng) -> Value {
    let mut r = json!({"Stud_id": key(rng), "Stud_name": value(rng), "Stud_marks": value(rng)});
    let obj = r.as_object_mut().unwrap();
    match rng.random_range(0..5) {
        0 => {
            obj.remove(["Stud_id", "Stud_name", "Stud_marks"].choose(rng).unwrap().to_owned());
        }
        1 => {
            obj.insert("extra".into(), value(rng));
        }
        _ => {}
    }
    r
}

/// The body text of a request: usually a mutated valid shape, sometimes broken JSON.
fn text(rng: &mut StdRng, body: Value) -> String {
    match rng.random_range(0..10) {
        0 => "{".into(),
        1 => String::new(),
        2 => "[".repeat(rng.random_range(1..5000)),
        3 => {
            let s = body.to_string();
            s[..rng.random_range(0..=s.len())].to_owned()
        }
        _ => body.to_string(),
    }
}

fn router_request(rng: &mut StdRng) -> (Method, String, String) {
    let range = || json!({"low": 1000, "high": 2000});
    let (method, path, body) = match rng.random_range(0..11) {
        0 => {
            (Method::POST, "/write", json!({"data": (0..rng.random_range(0..4)).map(|_| row(rng)).collect::<Vec<_>>()}))
        }
        1 => (Method::POST, "/write", json!({"data": vec![json!(1); 100_001]})),
        2 => (Method::GET, "/read", json!({"Stud_id": {"low": key(rng), "high": key(rng)}})),
        3 => (Method::POST, "/read", json!({"Stud_id": value(rng), "x": range()})),
        4 => (Method::PUT, "/update", json!({"Stud_id": key(rng), "data": row(rng)})),
        5 => (Method::DELETE, "/del", json!({"Stud_id": key(rng)})),
        // Admin verbs: only bodies the router refuses (the database is configured already).
        6 => (Method::POST, "/init", json!({"N": u32::MAX, "schema": value(rng), "shards": value(rng)})),
        7 => (Method::POST, "/add", json!({"n": value(rng), "new_shards": value(rng), "servers": [1]})),
        8 => (Method::DELETE, "/rm", json!({"n": u32::MAX, "servers": value(rng)})),
        9 => ([Method::PATCH, Method::PUT, Method::DELETE][rng.random_range(0..3)].clone(), "/read", json!({})),
        _ => (Method::GET, ["/nowhere", "/write/x", "/status/../etc"][rng.random_range(0..3)], json!(null)),
    };
    let t = text(rng, body);
    (method, path.to_owned(), t)
}

fn server_request(rng: &mut StdRng) -> (Method, String, String) {
    let shard = ["sh1", "sh9", "a b", "x".repeat(60).as_str()].choose(rng).unwrap().to_string();
    let op = || json!({"op": "insert", "row": [7000, "a\u{0}", 1]});
    let (method, path, body) = match rng.random_range(0..12) {
        0 => (Method::POST, "/write".to_owned(), json!({"shard": shard, "data": [row(rng)], "curr_idx": value(rng)})),
        1 => (Method::POST, "/read".to_owned(), json!({"shard": shard, "Stud_id": value(rng)})),
        2 => (Method::PUT, "/update".to_owned(), json!({"shard": shard, "Stud_id": key(rng), "data": row(rng)})),
        3 => (Method::GET, "/copy".to_owned(), json!({"shards": [value(rng)]})),
        4 => (Method::POST, "/config".to_owned(), json!({"schema": value(rng), "shards": [shard]})),
        5 => {
            (Method::POST, format!("/v1/shards/{shard}/write"), json!({"epoch": value(rng), "ops": [op(), value(rng)]}))
        }
        6 => (Method::POST, "/v1/shards/sh1/write_batches".to_owned(), json!({"batches": vec![json!([op()]); 5000]})),
        7 => (Method::POST, "/v1/shards/sh1/read_ranges".to_owned(), json!({"ranges": [{"low": key(rng), "high": 1}]})),
        8 => (Method::GET, format!("/v1/shards/sh1/log?from={}&to=x", rng.random_range(0..3)), json!(null)),
        9 => (Method::GET, "/status?checksums=perhaps".to_owned(), json!(null)),
        // Replication and recovery: only malformed bodies (a valid one would be a peer's).
        10 => (Method::POST, "/v1/shards/sh1/replicate".to_owned(), json!({"epoch": "x", "entries": value(rng)})),
        _ => (Method::POST, "/v1/lease".to_owned(), json!({"replica": value(rng), "shards": vec!["s"; 2000]})),
    };
    (method, path, text(rng, body))
}

/// Sends one request; checks it is answered in time, never 5xx, and in the error shape if an error.
async fn check(http: &reqwest::Client, base: &str, (method, path, body): (Method, String, String)) {
    let what = format!("{method} {path} {}", &body[..body.len().min(200)]);
    let sent =
        http.request(method, format!("{base}{path}")).header("content-type", "application/json").body(body).send();
    let started = Instant::now();
    let resp = tokio::time::timeout(ANSWER_WITHIN, sent)
        .await
        .unwrap_or_else(|_| panic!("no answer within {ANSWER_WITHIN:?}: {what}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert!(status < 500, "{what} answered {status} after {:?}: {text}", started.elapsed());
    if status >= 400 {
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {status} not JSON ({e}): {text:?}"));
        assert_eq!(v["status"], "failure", "{what}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| m.starts_with("<Error> ")), "{what}: {v}");
        assert!(v["code"].is_string(), "{what}: {v}");
    }
}

#[tokio::test]
async fn generated_bad_requests_hurt_no_one() -> anyhow::Result<()> {
    let c = LocalCluster::students()?;
    let kept: Vec<Value> = KEPT.map(kept_row).collect();
    let (st, body) = c.send(Method::POST, "/write", &json!({"data": kept}).to_string()).await?;
    assert_eq!(st, 200, "{body}");

    let file = c.cluster_file()?;
    let topology = Topology::parse(&std::fs::read(&file.topology)?)?;
    let primary = &topology.servers[&topology.shards[0].primary].url;

    let mut rng = StdRng::seed_from_u64(13);
    for _ in 0..REQUESTS_PER_TARGET {
        check(&c.http, &c.router, router_request(&mut rng)).await;
    }
    for _ in 0..REQUESTS_PER_TARGET {
        check(&c.http, primary, server_request(&mut rng)).await;
    }

    // The rows written before read back exactly.
    let (st, body) = c
        .send(Method::POST, "/read", &json!({"Stud_id": {"low": KEPT.start, "high": KEPT.end - 1}}).to_string())
        .await?;
    assert_eq!(st, 200);
    assert_eq!(body["data"], json!(kept));
    // Every copy of every shard agrees.
    for shard in &topology.shards {
        let mut seen = Vec::new();
        for server in shard.replicas.keys() {
            let client = shard_server::api::ShardClient::new(c.http.clone(), topology.servers[server].url.as_str());
            let st = client.status(true).await?;
            let s = &st.shards[&shard.id];
            seen.push((server.clone(), s.applied_seq, s.rows, s.checksum.clone()));
        }
        assert!(
            seen.windows(2).all(|w| (w[0].1, w[0].2, &w[0].3) == (w[1].1, w[1].2, &w[1].3)),
            "{}: {seen:?}",
            shard.id
        );
    }
    Ok(())
}
