//! Only the database's own components may replicate, lease, recover, snapshot, configure or write:
//! forged requests (no certificate, another database's certificate, another CA's, the wrong role,
//! a server speaking for another) are refused with 401/403 or at the handshake, and nothing they
//! asked for happens: every copy's sequence number, rows, checksum and identity, and the tables
//! in Postgres, are the same afterwards. Each check would fail if its protection were removed: a
//! forged replicate would land a row, a forged `/config` would create a table, a forged recover
//! would replace a copy.

mod common;

use common::Cluster;
use reqwest::Method;
use serde_json::{Value, json};
use shard_server::api::{ErrorCode, Op, RecoverRequest, WriteRequest};
use shard_server::schema::{Row, Value as Cell};
use shard_server::tls::testing::TestPki;
use shard_server::tls::{Component, Credentials, DatabaseId, Identity, TlsSource};
use shard_server::topology::ReplicaState;
use std::collections::BTreeMap;
use std::time::Duration;

fn row(k: i64, name: &str) -> Row {
    Row(vec![Cell::Int(k), Cell::Text(name.into()), Cell::Int(k % 100)])
}

fn write(ops: Vec<Op>) -> WriteRequest {
    WriteRequest { epoch: Some(1), ops, dry_run: false }
}

/// What a server holds: per shard (role, applied seq, rows, checksum, copy id).
type Held = BTreeMap<String, (String, u64, i64, Option<String>, String)>;

/// Everything a forged request could have changed: each server's copies, and the tables each
/// server's database has.
async fn state(c: &Cluster) -> Vec<(Held, String)> {
    let mut out = Vec::new();
    for i in 0..c.servers.len() {
        let st = c.client(i).status(true).await.unwrap();
        let held = st
            .shards
            .into_iter()
            .map(|(id, s)| (id, (format!("{:?}", s.role), s.applied_seq, s.rows, s.checksum, s.copy_id)))
            .collect();
        let tables =
            c.pg.psql(
                &format!("server{i}"),
                "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
            )
            .unwrap();
        out.push((held, tables));
    }
    out
}

/// How a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// An HTTP answer with this status and error code.
    Answered(u16, Option<String>),
    /// No HTTP answer: the connection or the TLS handshake was refused.
    NoAnswer,
}

async fn attempt(http: &reqwest::Client, method: Method, url: String, body: &Value) -> Outcome {
    match http.request(method, url).json(body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            Outcome::Answered(status, body["code"].as_str().map(str::to_owned))
        }
        Err(_) => Outcome::NoAnswer,
    }
}

/// Every internal endpoint with a request that, if accepted, would change the database (or hand
/// out its rows): (method, server index, path, body).
fn forgeries(applied: u64) -> Vec<(Method, usize, &'static str, Value)> {
    let evil = json!([999, "forged", 1]);
    vec![
        (
            Method::POST,
            1,
            "/v1/shards/sh1/replicate",
            json!({"epoch": 1, "primary": "Server0", "entries": [
                {"seq": applied + 1, "epoch": 1, "changes": [{"key": 999, "row": evil}]}
            ]}),
        ),
        // At an old epoch: had it been answered, the replica would throw its copy away and be
        // copied again (a new copy id).
        (
            Method::POST,
            1,
            "/v1/shards/sh1/replicate",
            json!({"epoch": 0, "primary": "Server0", "entries": [
                {"seq": applied + 1, "epoch": 0, "changes": [{"key": 999, "row": evil}]}
            ]}),
        ),
        (Method::POST, 0, "/v1/lease", json!({"replica": "Server1", "shards": ["sh1"]})),
        // Had it been answered, a primary cut off from the operator could keep serving reads.
        (
            Method::POST,
            0,
            "/v1/primary_lease",
            json!({"token": {"boot": 1, "at_us": 0}, "epoch": 0, "shards": ["sh1"], "lease_ms": 60000}),
        ),
        (Method::POST, 1, "/v1/shards/sh1/recover", json!({"primary": "Server0"})),
        (Method::GET, 0, "/v1/shards/sh1/snapshot", Value::Null),
        (Method::GET, 0, "/v1/shards/sh1/log?from=1&to=1", Value::Null),
        (Method::GET, 0, "/v1/shards/sh1/stats", Value::Null),
        (
            Method::POST,
            0,
            "/config",
            json!({"schema": {"columns": ["a", "b"], "dtypes": ["Number", "String"]}, "shards": ["evil1"]}),
        ),
        (
            Method::POST,
            0,
            "/write",
            json!({"shard": "sh1", "curr_idx": 0, "data": [{"Stud_id": 998, "Stud_name": "x", "Stud_marks": 1}]}),
        ),
        (
            Method::PUT,
            0,
            "/update",
            json!({"shard": "sh1", "Stud_id": 1, "data": {"Stud_id": 1, "Stud_name": "x", "Stud_marks": 1}}),
        ),
        (Method::DELETE, 0, "/del", json!({"shard": "sh1", "Stud_id": 2})),
        (Method::POST, 0, "/v1/shards/sh1/write", json!({"ops": [{"op": "insert", "row": evil}]})),
        (Method::POST, 0, "/v1/shards/sh1/write_batches", json!({"batches": [[{"op": "delete", "key": 3}]]})),
        (Method::POST, 1, "/read", json!({"shard": "sh1", "Stud_id": {"low": 0, "high": 999}})),
        (Method::POST, 1, "/v1/shards/sh1/read_ranges", json!({"ranges": [{"low": 0, "high": 999}]})),
        (Method::GET, 1, "/copy", json!({"shards": ["sh1"]})),
        (Method::GET, 1, "/status", Value::Null),
    ]
}

/// The (first) forgery of [`forgeries`] at `path`.
fn forgery(applied: u64, path: &str) -> (Method, usize, &'static str, Value) {
    forgeries(applied).into_iter().find(|f| f.2 == path).unwrap_or_else(|| panic!("no forgery for {path}"))
}

#[tokio::test]
async fn forged_internal_calls_are_refused_and_change_nothing() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    let done =
        c.client(0).write("sh1", &write((0..20).map(|k| Op::Insert { row: row(k, "n") }).collect())).await.unwrap();
    let before = state(&c).await;
    assert_eq!(before[0].0["sh1"].2, 20);

    let timeout = Duration::from_secs(10);
    let other_database = DatabaseId::new("test", "teachers");
    // The callers that must be refused, and how.
    let anonymous = c.pki.anonymous_http(timeout);
    // Another database under the same CA (a CA shared between databases): named, refused.
    let same_ca_other_db =
        c.pki.credentials_of(Identity::server(other_database.clone(), "Server0").unwrap()).http_client(timeout);
    // Another database with its own CA (the default): its certificate does not even get a
    // handshake. (The client trusts our servers' CA, so the refusal is the server's.)
    let other = TestPki::new("test", "teachers");
    let mut pem = other.issue(other.identity(Component::Server, "Server0"));
    pem.ca.push_str(c.pki.ca.cert_pem());
    let other_ca = Credentials::Tls(TlsSource::from_pem(pem).unwrap()).http_client(timeout);
    type Refused = fn(&Outcome) -> bool;
    let callers: [(&str, &reqwest::Client, Refused); 3] = [
        ("no certificate", &anonymous, |o| *o == Outcome::Answered(401, Some("unauthenticated".into()))),
        ("another database's certificate", &same_ca_other_db, |o| {
            *o == Outcome::Answered(403, Some("forbidden".into()))
        }),
        ("another CA's certificate", &other_ca, |o| *o == Outcome::NoAnswer),
    ];
    for (who, http, refused) in callers {
        for (method, server, path, body) in forgeries(done.seq) {
            let outcome = attempt(http, method.clone(), c.url(server, path), &body).await;
            assert!(refused(&outcome), "{method} {path} on Server{server} with {who}: {outcome:?}");
        }
    }
    assert_eq!(state(&c).await, before, "nothing changed");

    // The primary's next entry carries the sequence number the forged replicate tried to take:
    // the copy applies it (it was not taken by the forgery) and both copies agree.
    let next = c.client(0).write("sh1", &write(vec![Op::Insert { row: row(999, "real") }])).await.unwrap();
    assert_eq!(next.seq, done.seq + 1);
    let after = state(&c).await;
    let (primary, copy) = (&after[0].0["sh1"], &after[1].0["sh1"]);
    assert_eq!((primary.1, primary.2), (next.seq, 21));
    assert!(primary.3.is_some(), "a checksum to compare");
    assert_eq!((copy.1, copy.2, &copy.3), (primary.1, primary.2, &primary.3), "the copies agree");
    let before = after;

    // The same requests from the operator do take effect: what stopped them was the caller check.
    let operator = &c.http;
    let (method, server, path, body) = forgery(done.seq, "/config");
    let outcome = attempt(operator, method, c.url(server, path), &body).await;
    assert_eq!(outcome, Outcome::Answered(200, None));
    assert_ne!(state(&c).await[0].1, before[0].1, "the operator's /config creates a table");
}

#[tokio::test]
async fn each_component_may_only_do_its_own_part() {
    let c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    let done =
        c.client(0).write("sh1", &write((0..5).map(|k| Op::Insert { row: row(k, "n") }).collect())).await.unwrap();
    let before = state(&c).await;
    let timeout = Duration::from_secs(10);
    let as_ = |component, name: &str| c.pki.credentials(component, name).http_client(timeout);
    let router = as_(Component::Router, "router");
    let server0 = as_(Component::Server, "Server0");
    let server1 = as_(Component::Server, "Server1");

    let forbidden = Outcome::Answered(403, Some("forbidden".into()));
    let by_path = |path: &str| forgery(done.seq, path);
    // A router replicates, leases, recovers, streams, and configures nothing.
    for path in [
        "/v1/shards/sh1/replicate",
        "/v1/lease",
        "/v1/primary_lease",
        "/v1/shards/sh1/recover",
        "/v1/shards/sh1/snapshot",
        "/v1/shards/sh1/log?from=1&to=1",
        "/config",
    ] {
        let (method, server, path, body) = by_path(path);
        assert_eq!(attempt(&router, method, c.url(server, path), &body).await, forbidden, "router: {path}");
    }
    // A server writes no data through another server's client API, and configures nothing.
    for path in [
        "/write",
        "/update",
        "/del",
        "/v1/shards/sh1/write",
        "/v1/shards/sh1/write_batches",
        "/config",
        "/v1/shards/sh1/recover",
        "/v1/primary_lease",
    ] {
        let (method, server, path, body) = by_path(path);
        assert_eq!(attempt(&server1, method, c.url(server, path), &body).await, forbidden, "server: {path}");
    }
    // A server speaks only as itself: Server1 cannot send entries as the primary Server0, nor as
    // itself while the topology names Server0 the primary; Server0 cannot ask leases for Server1.
    let (method, _, path, body) = by_path("/v1/shards/sh1/replicate");
    assert_eq!(attempt(&server1, method.clone(), c.url(0, path), &body).await, forbidden, "impersonating");
    let mut as_itself = body.clone();
    as_itself["primary"] = json!("Server1");
    assert_eq!(attempt(&server0, method.clone(), c.url(1, path), &as_itself).await, forbidden, "naming another");
    let mut own_name_not_primary = body.clone();
    own_name_not_primary["primary"] = json!("Server1");
    assert_eq!(attempt(&server1, method, c.url(1, path), &own_name_not_primary).await, forbidden, "not the primary");
    let (method, server, path, body) = by_path("/v1/lease");
    assert_eq!(attempt(&server0, method, c.url(server, path), &body).await, forbidden, "lease for another");
    assert_eq!(state(&c).await, before, "nothing changed");

    // What each may do still works: the router writes, Server1 asks its own lease.
    let ok = attempt(
        &router,
        Method::POST,
        c.url(0, "/v1/shards/sh1/write"),
        &json!({"epoch": 1, "ops": [{"op": "insert", "row": [500, "r", 0]}]}),
    )
    .await;
    assert_eq!(ok, Outcome::Answered(200, None));
    let ok =
        attempt(&server1, Method::POST, c.url(0, "/v1/lease"), &json!({"replica": "Server1", "shards": ["sh1"]})).await;
    assert_eq!(ok, Outcome::Answered(200, None));
    // Liveness and metrics stay open to probes and scrapers.
    let anonymous = c.pki.anonymous_http(timeout);
    for path in ["/heartbeat", "/metrics"] {
        assert_eq!(anonymous.get(c.url(0, path)).send().await.unwrap().status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_recover_copies_only_from_the_primary_its_topology_names() {
    let mut c = Cluster::start(3, &[("sh1", 0, 1000, 0, &[0, 1, 2])]).await;
    c.client(0).write("sh1", &write((0..10).map(|k| Op::Insert { row: row(k, "n") }).collect())).await.unwrap();
    c.publish(|t| {
        t.shards[0].replicas.insert("Server2".into(), ReplicaState::Recovering);
    })
    .await;
    let before = state(&c).await;
    // The request names no address at all; one naming another server than the topology's
    // primary is refused, and a request carrying an address is malformed.
    let e = c.client(2).recover("sh1", &RecoverRequest { primary: "Server1".into() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");
    let url = c.url(2, "/v1/shards/sh1/recover");
    let attempt = attempt(&c.http, Method::POST, url, &json!({"source": c.servers[1].url()})).await;
    assert_eq!(attempt, Outcome::Answered(400, Some("bad_request".into())));
    // A recover from someone who is not the operator replaces nothing either.
    let router = c.client_as(2, c.pki.identity(Component::Router, "router"));
    let e = router.recover("sh1", &RecoverRequest { primary: "Server0".into() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    let e = c.anonymous_client(2).recover("sh1", &RecoverRequest { primary: "Server0".into() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e}");
    assert_eq!(state(&c).await, before);

    // The operator's recover from the named primary does replace the copy.
    let done = c.client(2).recover("sh1", &RecoverRequest { primary: "Server0".into() }).await.unwrap();
    assert_eq!(done.rows, 10);
    let after = state(&c).await;
    assert_ne!(after[2].0["sh1"].4, before[2].0["sh1"].4, "a recovered copy has a new identity");
}

/// `--internal-auth=migrate`, the rung between a release without internal authentication and
/// `strict`: the same port answers plain HTTP callers (as that release did; each counted in
/// `sharddb_plain_internal_requests_total`) and TLS callers, who are still checked by role. Back
/// in `strict`, a plain caller gets no answer at all and every forgery is refused again.
#[tokio::test]
async fn migrate_serves_plain_callers_counted_and_still_checks_tls_callers_by_role() {
    let mut c = Cluster::start(2, &[("sh1", 0, 1000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write((0..5).map(|k| Op::Insert { row: row(k, "n") }).collect())).await.unwrap();
    let timeout = Duration::from_secs(10);
    let plain = shard_server::api::http_client(timeout);
    let plain_url = |c: &Cluster, i: usize, path: &str| c.url(i, path).replacen("https://", "http://", 1);
    let plain_count = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("sharddb_plain_internal_requests_total "))
            .map(|v| v.trim().parse::<u64>().unwrap())
    };
    let metrics = |c: &Cluster, i: usize| {
        let (http, url) = (c.http.clone(), c.url(i, "/metrics"));
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(plain_count(&metrics(&c, 0).await), Some(0), "strict counts nothing");
    let (method, server, path, body) = forgery(5, "/v1/shards/sh1/stats");
    assert_eq!(
        attempt(&plain, method, plain_url(&c, server, path), &body).await,
        Outcome::NoAnswer,
        "strict: no plain"
    );
    assert_eq!(c.client(0).status(false).await.unwrap().internal_auth, Some(shard_server::tls::InternalAuth::Strict));

    c.internal_auth = shard_server::tls::InternalAuth::Migrate;
    for i in 0..2 {
        c.kill(i).await;
        c.restart(i).await;
    }
    assert_eq!(c.client(0).status(false).await.unwrap().internal_auth, Some(shard_server::tls::InternalAuth::Migrate));
    // Plain callers are served, as the previous release served them, and counted.
    let (method, server, path, body) = forgery(5, "/v1/shards/sh1/stats");
    assert!(matches!(attempt(&plain, method, plain_url(&c, server, path), &body).await, Outcome::Answered(200, _)));
    let st: Value = plain.get(plain_url(&c, 1, "/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["internal_auth"], "migrate");
    assert_eq!(plain_count(&metrics(&c, 0).await), Some(1));
    assert_eq!(plain_count(&metrics(&c, 1).await), Some(1));
    // TLS callers are checked as in strict: no certificate, or the wrong role, is refused.
    let anonymous = c.pki.anonymous_http(timeout);
    let router = c.pki.credentials(Component::Router, "router").http_client(timeout);
    let before = state(&c).await;
    for (method, server, path, body) in forgeries(5) {
        let outcome = attempt(&anonymous, method, c.url(server, path), &body).await;
        assert_eq!(outcome, Outcome::Answered(401, Some("unauthenticated".into())), "{path} without a certificate");
    }
    let (method, server, path, body) = forgery(5, "/v1/shards/sh1/replicate");
    let outcome = attempt(&router, method, c.url(server, path), &body).await;
    assert_eq!(outcome, Outcome::Answered(403, Some("forbidden".into())), "a router may not replicate");
    assert_eq!(state(&c).await, before, "nothing changed");
    assert_eq!(plain_count(&metrics(&c, 0).await), Some(1), "TLS callers are not counted as plain");
    // Replication between the servers (TLS) goes on.
    c.client(0).write("sh1", &write(vec![Op::Insert { row: row(7, "m") }])).await.unwrap();

    // Back to strict: plain callers get nothing.
    c.internal_auth = shard_server::tls::InternalAuth::Strict;
    for i in 0..2 {
        c.kill(i).await;
        c.restart(i).await;
    }
    let (method, server, path, body) = forgery(5, "/v1/shards/sh1/stats");
    assert_eq!(attempt(&plain, method, plain_url(&c, server, path), &body).await, Outcome::NoAnswer);
}
