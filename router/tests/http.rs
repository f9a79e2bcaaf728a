//! Router-only behaviours over HTTP, against in-process stub shard servers: error bodies for bad
//! requests, replica failover, topology-change retries, dry-run conflicts and retry budgets. The
//! data path against real shard servers and Postgres is covered by the end-to-end suites.

mod common;

use axum::http::StatusCode;
use common::{Call, Router, dead_url, error, healthy_stub, ok, spawn_slow_stub, spawn_stub, test_config, topology};
use reqwest::Method;
use serde_json::json;
use shard_server::api::{ErrorCode, Op};
use shard_server::schema::Value;
use shard_server::topology::UnroutedKeys;
use shard_server::topology_source::offer;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const READY: &str = "ready";

fn row(k: i64) -> serde_json::Value {
    json!({"Stud_id": k, "Stud_name": format!("s{k}"), "Stud_marks": 1})
}

#[tokio::test]
async fn before_any_topology_data_endpoints_answer_503() {
    let r = Router::start(None, test_config()).await;
    for (method, path, body) in [
        (Method::POST, "/read", json!({"Stud_id": {"low": 0, "high": 5}})),
        (Method::POST, "/write", json!({"data": [row(1)]})),
        (Method::PUT, "/update", json!({"Stud_id": 1, "data": row(1)})),
        (Method::DELETE, "/del", json!({"Stud_id": 1})),
        (Method::GET, "/readyz", json!(null)),
    ] {
        let (status, body) = r.json(method, path, body).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["status"], "failure");
        assert_eq!(body["code"], "unavailable");
        assert_eq!(body["message"], "<Error> no topology is loaded yet; retry shortly", "{path}");
    }
    let (status, body) = r.json(Method::GET, "/healthz", json!(null)).await;
    assert_eq!((status, body), (200, json!({"status": "success", "epoch": null})));
    // The seed's load balancer answered /status before /init with an empty configuration.
    let (status, body) = r.json(Method::GET, "/status", json!(null)).await;
    assert_eq!(
        (status, body),
        (200, json!({"N": 0, "schema": {"columns": [], "dtypes": []}, "shards": [], "servers": {}, "epoch": 0}))
    );
}

#[tokio::test]
async fn shapes_other_seed_clients_send_are_accepted() {
    let s = healthy_stub().await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    // GET /read with a JSON body, as the assignment's figure lists it.
    let (status, body) = r.json(Method::GET, "/read", json!({"Stud_id": {"low": 0, "high": 5}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["shards_queried"], json!(["sh1"]));
    // An empty batch: 200, nothing sent anywhere.
    let (status, body) = r.json(Method::POST, "/write", json!({"data": []})).await;
    assert_eq!((status, body), (200, json!({"message": "0 Data entries added", "status": "success"})));
    assert!(s.calls().iter().all(|c| matches!(c, Call::Read { .. })), "{:?}", s.calls());
}

#[tokio::test]
async fn a_database_that_skips_unrouted_keys_stores_the_rest_and_says_which_were_skipped() {
    let s = healthy_stub().await;
    let mut t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    t.unrouted_keys = UnroutedKeys::Skip;
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(150), row(1), row(-3)]})).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"message": "1 Data entries added; 2 skipped (Stud_id 150, -3 are in no shard)", "status": "success"})
        )
    );
    let written: Vec<Vec<Op>> = s
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Write { req, .. } => Some(req.ops),
            Call::Read { .. } => None,
        })
        .collect();
    assert_eq!(written.len(), 1, "only the routed row was sent");
    assert!(matches!(&written[0][..], [Op::Insert { row }] if row.0[0] == Value::Int(1)), "{written:?}");
    // Nothing routed: nothing sent, and the answer claims nothing.
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(500)]})).await;
    assert_eq!(body["message"], "0 Data entries added; 1 skipped (Stud_id 500 is in no shard)");
    assert_eq!(status, 200);
    assert_eq!(s.calls().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_json_errors_naming_the_problem() {
    let s = healthy_stub().await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;

    let (status, body) = r.json(Method::GET, "/nope", json!(null)).await;
    assert_eq!(status, 404);
    assert_eq!(body["message"], "<Error> no endpoint GET /nope");
    assert_eq!(body["code"], "not_found");

    let (status, body) = r.json(Method::GET, "/write", json!(null)).await;
    assert_eq!(status, 405);
    assert_eq!(body["message"], "<Error> method GET is not allowed on /write");
    assert_eq!(body["code"], "method_not_allowed");

    let (status, body) = r.send(Method::POST, "/write", r#"{"data": [1,"#, "application/json").await;
    assert_eq!(status, 400);
    let msg = body["message"].as_str().unwrap();
    assert!(msg.starts_with("<Error> malformed JSON body: EOF while parsing"), "{msg}");

    let (status, body) = r.json(Method::POST, "/write", json!({"rows": []})).await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("missing field `data`"), "{body}");

    let big = json!({"data": (0..200).map(row).collect::<Vec<_>>()}).to_string();
    assert!(big.len() > test_config().body_limit);
    let (status, body) = r.send(Method::POST, "/write", &big, "application/json").await;
    assert_eq!(status, 413);
    assert_eq!(body["message"], "<Error> request body is larger than the limit of 4096 bytes");
    assert_eq!(body["code"], "payload_too_large");

    let (status, body) = r.json(Method::POST, "/read", json!({"Stud_id": {"low": 9, "high": 2}})).await;
    assert_eq!(
        (status, body["message"].as_str().unwrap()),
        (400, "<Error> Stud_id.low (9) is greater than Stud_id.high (2)")
    );

    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(1), row(150)]})).await;
    assert_eq!(
        (status, body["message"].as_str().unwrap()),
        (400, "<Error> data[1]: Stud_id 150 is in no shard; nothing was written")
    );
    assert!(s.calls().is_empty(), "nothing reached a shard server: {:?}", s.calls());
}

#[tokio::test]
async fn seed_clients_sending_form_content_type_are_understood() {
    let s = healthy_stub().await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let form = "application/x-www-form-urlencoded";
    let (status, body) =
        r.send(Method::POST, "/write", &json!({"data": [row(1), row(2), row(3)]}).to_string(), form).await;
    assert_eq!((status, body), (200, json!({"message": "3 Data entries added", "status": "success"})));
    let (status, body) = r.send(Method::PUT, "/update", &json!({"Stud_id": 2, "data": row(2)}).to_string(), form).await;
    assert_eq!((status, body), (200, json!({"message": "Data entry for Stud_id: 2 updated", "status": "success"})));
    let (status, body) = r.send(Method::DELETE, "/del", r#"{"Stud_id": 2}"#, form).await;
    assert_eq!(
        (status, body),
        (200, json!({"message": "Data entry with Stud_id:2 removed from all replicas", "status": "success"}))
    );

    let writes: Vec<(String, Option<u64>, Vec<Op>)> = s
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Write { shard, req } => Some((shard, req.epoch, req.ops)),
            Call::Read { .. } => None,
        })
        .collect();
    assert_eq!(writes.len(), 3);
    assert!(writes.iter().all(|(shard, epoch, _)| shard == "sh1" && *epoch == Some(1)), "{writes:?}");
    assert!(matches!(writes[0].2[..], [Op::Insert { .. }, Op::Insert { .. }, Op::Insert { .. }]));
    assert!(matches!(writes[1].2[..], [Op::Update { key: 2, .. }]));
    assert_eq!(writes[2].2, [Op::Delete { key: 2 }]);
}

/// A copy that takes the connection but never answers (a router cut from it by a partition
/// that drops packets) costs a read one short attempt, and later reads try it last: no read of
/// the shard waits for the upstream timeout.
#[tokio::test]
async fn a_replica_that_never_answers_is_left_quickly_and_then_tried_last() {
    let silent = spawn_slow_stub(ok, Duration::from_secs(120)).await;
    let healthy = healthy_stub().await;
    let t = topology(
        1,
        &[("Server0", &silent.url), ("Server1", &healthy.url)],
        &[("sh1", 0, 100, "Server1", &[("Server0", READY), ("Server1", READY)])],
    );
    let mut config = test_config();
    config.upstream_timeout = Duration::from_secs(60);
    let r = Router::start(Some(t), config).await;
    // Bounds a failure: without the short attempt, a read sent to the silent copy first would
    // wait the whole 60 s upstream timeout.
    tokio::time::timeout(Duration::from_secs(30), async {
        for i in 0..12 {
            let (status, body) = r.json(Method::POST, "/read", json!({"Stud_id": {"low": i, "high": i}})).await;
            assert_eq!(status, 200, "read {i}: {body}");
            assert_eq!(body["status"], "success");
        }
    })
    .await
    .expect("12 reads within 30 s although the upstream timeout is 60 s");
    assert_eq!(healthy.calls().len(), 12, "every read ended on the copy that answers");
    assert_eq!(silent.read_requests(), 1, "the silent copy was tried once, then last");
}

#[tokio::test]
async fn reads_fail_over_to_another_ready_replica_and_merge_in_key_order() {
    // sh1: Server0 refuses connections, Server1 is healthy, Server2 is recovering (never read).
    // sh2: Server1 answers 500, Server2 is healthy.
    let dead = dead_url().await;
    let healthy = healthy_stub().await;
    let failing = spawn_stub(|c| match c {
        Call::Read { .. } => error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, vec![]),
        other => ok(other),
    })
    .await;
    let healthy2 = healthy_stub().await;
    let t = topology(
        1,
        &[("Server0", &dead), ("Server1", &healthy.url), ("Server2", &healthy2.url), ("Server3", &failing.url)],
        &[
            ("sh1", 0, 100, "Server1", &[("Server0", READY), ("Server1", READY), ("Server2", "recovering")]),
            ("sh2", 100, 100, "Server2", &[("Server2", READY), ("Server3", READY)]),
        ],
    );
    let r = Router::start(Some(t), test_config()).await;
    for _ in 0..12 {
        let (status, body) = r.json(Method::POST, "/read", json!({"Stud_id": {"low": 50, "high": 150}})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["shards_queried"], json!(["sh1", "sh2"]));
        let keys: Vec<i64> = body["data"].as_array().unwrap().iter().map(|r| r["Stud_id"].as_i64().unwrap()).collect();
        assert_eq!(keys, [50, 99, 100, 150], "clipped per shard, merged in key order");
        assert_eq!(body["status"], "success");
    }
    let sh1_reads = healthy
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Read { shard, low: 50, high: 99 } if shard == "sh1"))
        .count();
    assert_eq!(sh1_reads, 12, "every sh1 read ended on the live replica");
    assert!(
        healthy2.calls().iter().all(|c| matches!(c, Call::Read { shard, .. } if shard == "sh2")),
        "recovering replica never read"
    );
    assert_eq!(healthy2.calls().len(), 12);
    let first_on_failing = failing.calls().len();
    assert!(
        first_on_failing > 0 && first_on_failing < 12,
        "the ring sent some, not all, sh2 reads to the failing replica first: {first_on_failing}"
    );

    let (status, body) = r.json(Method::POST, "/read", json!({"Stud_id": {"low": 300, "high": 400}})).await;
    assert_eq!((status, body), (200, json!({"shards_queried": [], "data": [], "status": "success"})));
}

#[tokio::test]
async fn a_shard_with_no_working_replica_answers_a_generic_503() {
    let dead = dead_url().await;
    let t = topology(1, &[("Server0", &dead)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let started = Instant::now();
    let (status, body) = r.json(Method::POST, "/read", json!({"Stud_id": {"low": 0, "high": 5}})).await;
    assert_eq!(status, 503);
    assert_eq!(body["message"], "<Error> the database is temporarily unavailable; retry shortly");
    assert!(!body.to_string().contains("127.0.0.1"), "no upstream detail in the body: {body}");
    assert!(started.elapsed() >= Duration::from_millis(500), "retried within the deadline before giving up");
}

/// The old primary refuses with `refusal`; 300 ms later a topology naming a new primary arrives.
/// The router must wait for it and send the write there, carrying the new epoch.
async fn write_follows_a_topology_change_after(status: StatusCode, code: ErrorCode) {
    let old = spawn_stub(move |c| match c {
        Call::Write { .. } => {
            let (s, mut b) = error(status, code, vec![]);
            b["epoch"] = json!(5);
            (s, b)
        }
        other => ok(other),
    })
    .await;
    let new = healthy_stub().await;
    let servers = [("Server0", old.url.as_str()), ("Server1", new.url.as_str())];
    let both = [("Server0", READY), ("Server1", READY)];
    let r = Router::start(Some(topology(4, &servers, &[("sh1", 0, 100, "Server0", &both)])), test_config()).await;

    let tx = r.topology.clone();
    let next = topology(5, &servers, &[("sh1", 0, 100, "Server1", &both)]);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        offer(&tx, next);
    });
    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 7, "data": row(7)})).await;
    assert_eq!(status, 200, "{code:?}: {body}");
    let epochs = |s: &common::Stub| {
        s.calls()
            .iter()
            .filter_map(|c| if let Call::Write { req, .. } = c { req.epoch } else { None })
            .collect::<Vec<_>>()
    };
    assert_eq!(epochs(&old), [4], "{code:?}: the deposed primary was asked once, with the old epoch");
    assert_eq!(epochs(&new), [5], "{code:?}: the new primary got the write with the new epoch");

    let (_, status) = r.json(Method::GET, "/status", json!(null)).await;
    assert_eq!(status["epoch"], 5);
    assert_eq!(status["shards"][0]["primary"], "Server1");
}

#[tokio::test]
async fn stale_epoch_waits_for_the_new_topology_and_writes_to_the_new_primary() {
    write_follows_a_topology_change_after(StatusCode::CONFLICT, ErrorCode::StaleEpoch).await;
}

#[tokio::test]
async fn not_primary_waits_for_the_new_topology_and_writes_to_the_new_primary() {
    write_follows_a_topology_change_after(StatusCode::MISDIRECTED_REQUEST, ErrorCode::NotPrimary).await;
}

#[tokio::test]
async fn a_server_not_holding_the_shard_waits_for_the_new_topology() {
    // 404 without keys: the shard, not a row, is missing there.
    write_follows_a_topology_change_after(StatusCode::NOT_FOUND, ErrorCode::NotFound).await;
}

#[tokio::test]
async fn not_primary_without_a_newer_topology_gives_up_with_503() {
    let s = spawn_stub(|_| error(StatusCode::MISDIRECTED_REQUEST, ErrorCode::NotPrimary, vec![])).await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let mut config = test_config();
    config.retry.topology_wait = Duration::from_millis(300);
    let r = Router::start(Some(t), config).await;
    let started = Instant::now();
    let (status, body) = r.json(Method::DELETE, "/del", json!({"Stud_id": 3})).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(s.calls().len(), 1);
}

#[tokio::test]
async fn a_conflict_found_by_any_dry_run_writes_nothing() {
    // sh1 [0,100) on Server0, sh2 [100,200) on Server1; 150 and 160 already hold other rows.
    let s0 = healthy_stub().await;
    let s1 = spawn_stub(|c| match c {
        Call::Write { .. } => error(StatusCode::CONFLICT, ErrorCode::Conflict, vec![160, 150]),
        other => ok(other),
    })
    .await;
    let t = topology(
        1,
        &[("Server0", &s0.url), ("Server1", &s1.url)],
        &[("sh1", 0, 100, "Server0", &[("Server0", READY)]), ("sh2", 100, 100, "Server1", &[("Server1", READY)])],
    );
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(1), row(150), row(2), row(160)]})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["keys"], json!([150, 160]));
    assert_eq!(body["code"], "conflict");
    assert_eq!(body["message"], "<Error> a different row already exists for Stud_id 150, 160; nothing was written");
    let (c0, c1) = (s0.calls(), s1.calls());
    assert_eq!(c0.len(), 1, "{c0:?}");
    assert_eq!(c1.len(), 1, "{c1:?}");
    assert!(c0[0].is_dry_run() && c1[0].is_dry_run(), "only dry runs were sent");
    if let Call::Write { req, .. } = &c0[0] {
        assert_eq!(req.ops.len(), 2, "each shard's dry run carries its own rows");
    }
}

#[tokio::test]
async fn a_multi_shard_batch_dry_runs_everywhere_then_writes_and_a_single_shard_batch_writes_at_once() {
    let s0 = healthy_stub().await;
    let s1 = healthy_stub().await;
    let t = topology(
        1,
        &[("Server0", &s0.url), ("Server1", &s1.url)],
        &[("sh1", 0, 100, "Server0", &[("Server0", READY)]), ("sh2", 100, 100, "Server1", &[("Server1", READY)])],
    );
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(1), row(150)]})).await;
    assert_eq!((status, body["message"].as_str()), (200, Some("2 Data entries added")));
    for s in [&s0, &s1] {
        let c = s.calls();
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].is_dry_run() && c[1].is_real_write(), "dry run first, then the write: {c:?}");
    }
    let (status, _) = r.json(Method::POST, "/write", json!({"data": [row(5), row(6)]})).await;
    assert_eq!(status, 200);
    let c = s0.calls();
    assert_eq!(c.len(), 3, "one more call: {c:?}");
    assert!(c[2].is_real_write(), "a single-shard batch goes straight to the primary");
}

#[tokio::test]
async fn concurrent_writes_to_a_shard_share_requests_and_keep_their_own_outcomes() {
    // Even keys already hold another row: their inserts conflict, alone.
    let s0 = spawn_slow_stub(
        |call| match call {
            Call::Write { req, .. } => match &req.ops[..] {
                [Op::Insert { row }] => match row.0[0] {
                    Value::Int(key) if key % 2 == 0 => error(StatusCode::CONFLICT, ErrorCode::Conflict, vec![key]),
                    _ => ok(call),
                },
                _ => ok(call),
            },
            _ => ok(call),
        },
        Duration::from_millis(100),
    )
    .await;
    let t = topology(1, &[("Server0", &s0.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Arc::new(Router::start(Some(t), test_config()).await);
    let writers: Vec<_> = (0..40)
        .map(|k| {
            let r = r.clone();
            tokio::spawn(async move { (k, r.json(Method::POST, "/write", json!({"data": [row(k)]})).await.0) })
        })
        .collect();
    for w in writers {
        let (k, status) = w.await.unwrap();
        assert_eq!(status, if k % 2 == 0 { 409 } else { 200 }, "key {k}");
    }
    assert_eq!(s0.calls().len(), 40, "every client's batch reached the primary once");
    // One request is in flight per shard; the rest wait and go out together.
    assert!(s0.write_requests() < 20, "{} requests for 40 concurrent writes", s0.write_requests());
}

#[tokio::test]
async fn concurrent_reads_of_a_shard_share_requests_and_get_their_own_rows() {
    let s0 = spawn_slow_stub(ok, Duration::from_millis(100)).await;
    let s1 = spawn_slow_stub(ok, Duration::from_millis(100)).await;
    let t = topology(
        1,
        &[("Server0", &s0.url), ("Server1", &s1.url)],
        &[("sh1", 0, 100, "Server0", &[("Server0", READY), ("Server1", READY)])],
    );
    let r = Arc::new(Router::start(Some(t), test_config()).await);
    let readers: Vec<_> = (0..40)
        .map(|k| {
            let r = r.clone();
            tokio::spawn(
                async move { (k, r.json(Method::POST, "/read", json!({"Stud_id": {"low": k, "high": k}})).await) },
            )
        })
        .collect();
    for reader in readers {
        let (k, (status, body)) = reader.await.unwrap();
        assert_eq!(status, 200, "key {k}: {body}");
        assert_eq!(body["data"], json!(common::rows(k, k)), "key {k}");
        assert_eq!(body["shards_queried"], json!(["sh1"]));
    }
    assert_eq!(s0.calls().len() + s1.calls().len(), 40, "every client's range was read once");
    // One request is in flight per shard; the rest wait and go out together.
    let requests = s0.read_requests() + s1.read_requests();
    assert!(requests < 20, "{requests} requests for 40 concurrent reads");
}

#[tokio::test]
async fn unavailable_primaries_are_retried_within_the_deadline() {
    let failures = Arc::new(AtomicUsize::new(0));
    let f = failures.clone();
    let flaky = spawn_stub(move |c| {
        if f.fetch_add(1, Ordering::SeqCst) < 2 {
            error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, vec![])
        } else {
            ok(c)
        }
    })
    .await;
    let down = spawn_stub(|_| error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, vec![])).await;
    let t = topology(
        1,
        &[("Server0", &flaky.url), ("Server1", &down.url)],
        &[("sh1", 0, 100, "Server0", &[("Server0", READY)]), ("sh2", 100, 100, "Server1", &[("Server1", READY)])],
    );
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(1)]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(flaky.calls().len(), 3, "two refusals, then success");

    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 120, "data": row(120)})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["message"], "<Error> the database is temporarily unavailable; retry shortly");
    assert!(down.calls().len() > 2, "retried before giving up: {}", down.calls().len());

    let metrics = r.http.get(format!("{}/metrics", r.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"sharddb_router_upstream_retries_total{op="write",reason="unavailable"}"#), "{metrics}");
    assert!(
        metrics.contains(r#"sharddb_router_requests_total{endpoint="/update",method="PUT",status="503"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn absent_keys_and_conflicts_from_the_primary_map_to_404_and_409() {
    let s = spawn_stub(|c| match c {
        Call::Write { req, .. } => match req.ops[0] {
            Op::Delete { key } | Op::Update { key, .. } => error(StatusCode::NOT_FOUND, ErrorCode::NotFound, vec![key]),
            Op::Insert { .. } => error(StatusCode::CONFLICT, ErrorCode::Conflict, vec![5]),
        },
        other => ok(other),
    })
    .await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::DELETE, "/del", json!({"Stud_id": 9})).await;
    assert_eq!((status, body["message"].as_str().unwrap()), (404, "<Error> no row with Stud_id 9 exists"));
    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 9, "data": row(9)})).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (404, "not_found"));
    let (status, body) = r.json(Method::POST, "/write", json!({"data": [row(5), row(6)]})).await;
    assert_eq!(status, 409);
    assert_eq!(body["keys"], json!([5]));
    assert_eq!(body["message"], "<Error> a different row already exists for Stud_id 5; nothing was written");
    assert_eq!(s.calls().len(), 3, "a single-shard batch sends no dry run");
}

#[tokio::test]
async fn a_delete_retried_after_an_ambiguous_failure_that_finds_the_key_gone_succeeds() {
    // The first answer is lost in a way that leaves open whether the delete was applied; the retry
    // finds the key absent. The key is gone as asked, so the router reports success.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let s = spawn_stub(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, vec![])
        } else {
            error(StatusCode::NOT_FOUND, ErrorCode::NotFound, vec![4])
        }
    })
    .await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::DELETE, "/del", json!({"Stud_id": 4})).await;
    assert_eq!((status, body["message"].as_str()), (200, Some("Data entry with Stud_id:4 removed from all replicas")));
    assert_eq!(s.calls().len(), 2);
    // Without an earlier ambiguous attempt, an absent key stays a 404.
    let (status, _) = r.json(Method::DELETE, "/del", json!({"Stud_id": 4})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_body_that_never_arrives_is_answered_408_in_the_error_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = healthy_stub().await;
    let t = topology(1, &[("Server0", &s.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let limits = shard_server::serve::ServeLimits {
        header_timeout: Duration::from_secs(5),
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        max_connections: 8,
    };
    let r = common::Router::start_with_limits(Some(t), test_config(), limits).await;
    let mut tcp = tokio::net::TcpStream::connect(r.url.trim_start_matches("http://")).await.unwrap();
    tcp.write_all(b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"data\": [").await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(started.elapsed() >= Duration::from_millis(900), "answered before the body timeout");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body: serde_json::Value = serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(body["code"], "request_timeout");
    assert!(s.calls().is_empty(), "nothing reached a shard server");
}

/// A newer shard server's error code this router does not know: handled by the HTTP status it
/// came with. A 421 waits for a newer topology as `not_primary` does; a 503 is retried as
/// `unavailable` is.
#[tokio::test]
async fn a_newer_servers_unknown_codes_are_handled_by_their_status() {
    let unknown = |status: StatusCode| {
        let (s, mut body) = error(status, ErrorCode::Internal, vec![]);
        body["code"] = json!("handed_over_for_an_upgrade");
        (s, body)
    };
    let old = spawn_stub(move |c| match c {
        Call::Write { .. } => unknown(StatusCode::MISDIRECTED_REQUEST),
        other => ok(other),
    })
    .await;
    let new = healthy_stub().await;
    let servers = [("Server0", old.url.as_str()), ("Server1", new.url.as_str())];
    let both = [("Server0", READY), ("Server1", READY)];
    let r = Router::start(Some(topology(4, &servers, &[("sh1", 0, 100, "Server0", &both)])), test_config()).await;
    let tx = r.topology.clone();
    let next = topology(5, &servers, &[("sh1", 0, 100, "Server1", &both)]);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        offer(&tx, next);
    });
    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 7, "data": row(7)})).await;
    assert_eq!(status, 200, "421 with an unknown code: routed again, {body}");
    assert_eq!(new.write_requests(), 1);

    let failures = Arc::new(AtomicUsize::new(0));
    let seen = failures.clone();
    let flaky = spawn_stub(move |c| match c {
        Call::Write { .. } if seen.fetch_add(1, Ordering::SeqCst) < 2 => unknown(StatusCode::SERVICE_UNAVAILABLE),
        other => ok(other),
    })
    .await;
    let t = topology(1, &[("Server0", &flaky.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 7, "data": row(7)})).await;
    assert_eq!(status, 200, "503 with an unknown code: retried, {body}");
    assert_eq!(failures.load(Ordering::SeqCst), 3, "two failures, then the write");

    let refusing = spawn_stub(move |c| match c {
        Call::Write { .. } => unknown(StatusCode::UNPROCESSABLE_ENTITY),
        other => ok(other),
    })
    .await;
    let t = topology(1, &[("Server0", &refusing.url)], &[("sh1", 0, 100, "Server0", &[("Server0", READY)])]);
    let r = Router::start(Some(t), test_config()).await;
    let (status, body) = r.json(Method::PUT, "/update", json!({"Stud_id": 7, "data": row(7)})).await;
    assert_eq!((status, body["code"].clone()), (400, json!("bad_request")), "another 4xx is final: {body}");
    assert_eq!(refusing.write_requests(), 1, "and not retried");
}

/// Every answer says the router's protocol version; a sender declaring one older than the
/// router works with is refused, and a seed client (no header) is served.
#[tokio::test]
async fn answers_carry_the_protocol_version_and_too_old_senders_are_refused() {
    use shard_server::api::{OLDEST_PROTOCOL_VERSION, PROTOCOL_HEADER, PROTOCOL_VERSION};
    let r = Router::start(None, test_config()).await;
    let plain = reqwest::Client::new();
    let answer = plain.get(format!("{}/healthz", r.url)).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()[PROTOCOL_HEADER], PROTOCOL_VERSION.to_string().as_str());
    let answer = plain
        .get(format!("{}/healthz", r.url))
        .header(PROTOCOL_HEADER, (OLDEST_PROTOCOL_VERSION - 1).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["code"], "unsupported_protocol", "{body}");
}
