//! Slow and stalled clients against a real shard server served with short limits: unfinished or
//! trickled headers, a body that stalls or never arrives, an idle keep-alive connection, and more
//! connections than the cap. Each must end (or wait) as `shard_server::serve` documents, and a
//! well-behaved client must still be served. Raw HTTP/1.1 bytes inside a TLS connection made with
//! the operator's certificate (what every internal caller presents), since HTTP clients cannot
//! misbehave.
//! The router is served by the same module; `router/tests/http.rs` checks its body timeout.

mod common;

use common::Cluster;
use shard_server::serve::ServeLimits;
use shard_server::tls::{Component, Credentials};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connection to a shard server, past its TLS handshake.
type Conn = TlsStream<TcpStream>;

const SH1: common::ShardDef = ("sh1", 0, 4096, 0, &[0]);

fn limits() -> ServeLimits {
    ServeLimits {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(1),
        max_connections: 4,
    }
}

/// Reads until the server closes the connection (or `limit` passes); returns what was read and
/// when the connection ended, `None` if it did not within `limit`.
async fn until_closed(tcp: &mut Conn, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), Some(start.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

async fn connect(c: &Cluster) -> Conn {
    let Credentials::Tls(source) = c.pki.credentials(Component::Operator, "operator") else { unreachable!() };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(source.client_config()));
    let tcp = TcpStream::connect(c.servers[0].addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn unfinished_and_trickled_headers_end_at_the_header_timeout() {
    let c = Cluster::start_with_serve_limits(1, &[SH1], limits()).await;

    let mut unfinished = connect(&c).await;
    unfinished.write_all(b"POST /v1/lease HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Trickled: one header line every 300 ms, so bytes keep moving (the idle timeout never fires).
    let mut trickled = connect(&c).await;
    trickled.write_all(b"POST /v1/lease HTTP/1.1\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        let start = Instant::now();
        for i in 0.. {
            if trickled.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        let (_, closed) = until_closed(&mut trickled, Duration::from_secs(1)).await;
        (start.elapsed(), closed.is_some())
    });

    let (_, closed) = until_closed(&mut unfinished, Duration::from_secs(8)).await;
    let closed = closed.expect("a connection with unfinished headers stays open");
    assert!(closed >= Duration::from_millis(900), "closed before the timeouts: {closed:?}");
    let (trickled_for, ended) = trickle.await.unwrap();
    assert!(ended, "the trickling connection was not closed");
    assert!(trickled_for < Duration::from_secs(8), "headers trickled for {trickled_for:?}");

    // A well-behaved client is served meanwhile and after.
    let (st, _) = c.send(reqwest::Method::GET, 0, "/heartbeat", "").await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn a_stalled_or_missing_body_is_answered_408_at_the_body_timeout() {
    let c = Cluster::start_with_serve_limits(1, &[SH1], limits()).await;
    let requests: [&[u8]; 2] = [
        // Content-Length promises 100 bytes; 10 come.
        b"POST /v1/lease HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"replica\"",
        // A chunked body that stops after its first chunk.
        b"POST /v1/lease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"rep\r\n",
    ];
    for request in requests {
        let mut tcp = connect(&c).await;
        tcp.write_all(request).await.unwrap();
        let started = Instant::now();
        let (answer, closed) = until_closed(&mut tcp, Duration::from_secs(8)).await;
        assert!(closed.is_some(), "the stalled request was never answered: {answer:?}");
        assert!(started.elapsed() >= Duration::from_millis(1900), "answered before the body timeout");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert_eq!(json["code"], "request_timeout", "{json}");
        assert_eq!(json["status"], "failure");
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let mut l = limits();
    l.header_timeout = Duration::from_secs(6);
    let c = Cluster::start_with_serve_limits(1, &[SH1], l).await;
    let mut tcp = connect(&c).await;
    tcp.write_all(b"GET /heartbeat HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: closed by the idle timeout (1 s), well before the header timeout (6 s).
    let (_, closed) = until_closed(&mut tcp, Duration::from_secs(5)).await;
    let closed = closed.expect("an idle connection stays open");
    assert!(closed >= Duration::from_millis(900) && closed < Duration::from_secs(5), "closed after {closed:?}");
}

#[tokio::test]
async fn past_the_connection_cap_a_client_waits_until_a_connection_ends() {
    let c = Cluster::start_with_serve_limits(1, &[SH1], limits()).await;
    // The harness's lease granter keeps a pooled connection: stop it and let the idle timeout (1 s)
    // close that connection, so the four below are the only ones (each waits for its TLS
    // handshake, so one left over would hold the fourth back until the first three time out).
    c.granting.store(false, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Four connections (the cap) each in the middle of a request whose body never comes: they are
    // busy, so only the body timeout (2 s) ends them.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = connect(&c).await;
        tcp.write_all(b"POST /v1/lease HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{").await.unwrap();
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fifth is not even accepted (so its handshake waits) until a held one ends.
    let fifth = async {
        let mut fifth = connect(&c).await;
        fifth.write_all(b"GET /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        until_closed(&mut fifth, Duration::from_secs(8)).await
    };
    let mut fifth = std::pin::pin!(fifth);
    let early = tokio::time::timeout(Duration::from_millis(1000), fifth.as_mut()).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    // Once the held requests time out, the waiting client is served.
    let (answer, closed) = fifth.await;
    assert!(closed.is_some(), "never served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for mut tcp in held {
        let (answer, _) = until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}
