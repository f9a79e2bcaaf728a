//! Installing a snapshot (`POST /v1/shards/{shard}/recover`) against a real Postgres: rows of every
//! kind of text survive the binary `COPY` exactly (checked with the md5 checksum, independent of
//! the digest the install verifies with), and an install that cannot be verified — a digest that
//! differs, a stream cut short, a row of the wrong type, two rows with one key — leaves the
//! previous copy as it was, primary key included. A source from before snapshots carried a digest
//! is still verified, against its checksum.
//!
//! A recover copies from the primary the replica's topology names (never from a URL in the
//! request), so a crafted source is put in the topology as the primary's address, serving with the
//! primary's certificate.

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::Cluster;
use shard_server::api::{ErrorCode, Op, RecoverRequest, RecoverResponse, WriteRequest};
use shard_server::schema::{Row, Value};
use shard_server::tls::{Component, Credentials, TlsListener, TlsPeer};
use shard_server::topology::ReplicaState;
use sqlx::Connection;

fn write(epoch: u64, rows: Vec<Row>) -> WriteRequest {
    WriteRequest { epoch: Some(epoch), ops: rows.into_iter().map(|row| Op::Insert { row }).collect(), dry_run: false }
}

fn row(k: i64, name: &str, marks: i64) -> Row {
    Row(vec![Value::Int(k), Value::Text(name.into()), Value::Int(marks)])
}

/// Texts that the `COPY` text format would have to escape, or that record output quotes.
fn awkward_rows() -> Vec<Row> {
    let texts = [
        "",
        "plain",
        "tab\there",
        "new\nline",
        "carriage\rreturn",
        "back\\slash",
        "\\N",
        "\\.",
        "\"quoted\", (parenthesised)",
        "é ü ß 中文 🚀",
        "  leading and trailing  ",
    ];
    let mut rows: Vec<Row> = texts.iter().enumerate().map(|(i, t)| row(i as i64, t, -(i as i64))).collect();
    rows.push(row(100, &"long ".repeat(4000), i64::MAX));
    rows.push(row(101, "min", i64::MIN));
    rows
}

/// Two servers holding `sh1` (Server0 primary), `rows` written, Server1 then marked recovering.
async fn recovering_replica(rows: Vec<Row>) -> Cluster {
    let mut c = Cluster::start(2, &[("sh1", 0, 1_000_000, 0, &[0, 1])]).await;
    c.client(0).write("sh1", &write(1, rows)).await.unwrap();
    c.publish(|t| {
        t.shards[0].replicas.insert("Server1".into(), ReplicaState::Recovering);
    })
    .await;
    c
}

/// (applied seq, rows, md5 checksum) of `sh1` on server `i`.
async fn state(c: &Cluster, i: usize) -> (u64, i64, Option<String>) {
    let st = c.client(i).status(true).await.unwrap();
    let s = &st.shards["sh1"];
    (s.applied_seq, s.rows, s.checksum.clone())
}

async fn has_primary_key(c: &Cluster, i: usize) -> bool {
    let mut conn = sqlx::PgConnection::connect(&c.servers[i].db_url).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = '\"shard_sh1\"'::regclass AND contype = 'p'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    n == 1
}

/// A source that answers `/v1/shards/sh1/snapshot` with what `snapshot` makes of the real
/// primary's stream, and passes every other request to the primary unchanged; it serves over TLS
/// with Server0's certificate, and reads from the primary as the operator.
async fn fake_source(c: &Cluster, snapshot: fn(String) -> Response) -> String {
    let primary = c.servers[0].url();
    #[derive(Clone)]
    struct Fake {
        primary: String,
        snapshot: fn(String) -> Response,
        http: reqwest::Client,
    }
    async fn snap(State(f): State<Fake>) -> Response {
        let text =
            f.http.get(format!("{}/v1/shards/sh1/snapshot", f.primary)).send().await.unwrap().text().await.unwrap();
        (f.snapshot)(text)
    }
    async fn pass(State(f): State<Fake>, uri: axum::http::Uri) -> Response {
        let r = f.http.get(format!("{}{uri}", f.primary)).send().await.unwrap();
        let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
        (status, [("content-type", "application/json")], r.bytes().await.unwrap()).into_response()
    }
    let fake = Fake { primary, snapshot, http: c.http.clone() };
    let app = Router::new().route("/v1/shards/sh1/snapshot", get(snap)).fallback(pass).with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let Credentials::Tls(tls) = c.pki.credentials(Component::Server, "Server0") else { unreachable!() };
    let listener = TlsListener::new(listener, tls.server_config());
    tokio::spawn(
        async move { axum::serve(listener, app.into_make_service_with_connect_info::<TlsPeer>()).await.unwrap() },
    );
    url
}

/// Replaces the last line (the end line) of a snapshot.
fn with_end(text: &str, end: &str) -> Response {
    let body = text.trim_end().rsplit_once('\n').map_or(String::new(), |(rows, _)| format!("{rows}\n{end}\n"));
    Response::new(Body::from(body))
}

/// Server1 recovers `sh1` from its primary, Server0, reached at `source` (the topology says so).
async fn recover(c: &mut Cluster, source: String) -> Result<RecoverResponse, shard_server::api::ClientError> {
    c.publish(|t| t.servers.get_mut("Server0").expect("Server0 is in the topology").url = source).await;
    c.client(1).recover("sh1", &RecoverRequest { primary: "Server0".into() }).await
}

#[tokio::test]
async fn every_kind_of_text_survives_the_install_exactly() {
    let rows = awkward_rows();
    let n = rows.len() as i64;
    let mut c = recovering_replica(rows).await;
    let url = c.servers[0].url();
    let done = recover(&mut c, url).await.unwrap();
    assert_eq!((done.snapshot_rows, done.verified_seq, done.rows), (n as u64, 1, n), "{done:?}");
    let t = done.timings.expect("timings");
    assert!(t.total_us >= t.copy_us && t.copy_us > 0, "{t:?}");
    // The md5 checksum over row_to_json, not the digest the install checked itself with.
    assert_eq!(state(&c, 1).await, state(&c, 0).await);
    assert!(has_primary_key(&c, 1).await);
}

#[tokio::test]
async fn an_install_that_cannot_be_verified_leaves_the_previous_copy() {
    let mut c = recovering_replica((0..50).map(|k| row(k, "n", k)).collect()).await;
    let before = state(&c, 1).await;
    assert_eq!(before.0, 1);
    type Craft = fn(String) -> Response;
    let cases: [(&str, Craft); 4] = [
        ("a digest that differs", |text| with_end(&text, r#"{"end":true,"rows":50,"digest":"12345"}"#)),
        ("a stream cut short", |text| {
            let cut: Vec<&str> = text.lines().take(20).collect();
            Response::new(Body::from(cut.join("\n") + "\n"))
        }),
        ("a row of the wrong type", |text| {
            Response::new(Body::from(text.replacen(r#"[7, "n", 7]"#, r#"[7, "n", "seven"]"#, 1)))
        }),
        ("two rows with one key", |text| {
            Response::new(Body::from(text.replacen(r#"[7, "n", 7]"#, r#"[6, "m", 7]"#, 1)))
        }),
    ];
    for (what, snapshot) in cases {
        let source = fake_source(&c, snapshot).await;
        let e = recover(&mut c, source).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{what}: {e}");
        assert!(e.to_string().contains("recovery failed"), "{what}: {e}");
        assert_eq!(state(&c, 1).await, before, "{what}: the previous copy changed");
        assert!(has_primary_key(&c, 1).await, "{what}: the primary key is gone");
    }
    // The real thing still installs over it.
    let url = c.servers[0].url();
    recover(&mut c, url).await.unwrap();
    assert_eq!(state(&c, 1).await, state(&c, 0).await);
}

#[tokio::test]
async fn a_source_without_a_digest_is_verified_against_its_checksum() {
    let mut c = recovering_replica((0..50).map(|k| row(k, "n", k)).collect()).await;
    let source = fake_source(&c, |text| with_end(&text, r#"{"end":true,"rows":50}"#)).await;
    let done = recover(&mut c, source).await.unwrap();
    let primary = state(&c, 0).await;
    assert_eq!(Some(done.checksum.clone()), primary.2, "verified with the md5 checksum: {done:?}");
    assert_eq!(state(&c, 1).await, primary);
}
