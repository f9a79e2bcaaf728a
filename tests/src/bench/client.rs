//! Requests to the router (the seed API, as its clients send them) and to a shard server's snapshot
//! stream, each with its outcome checked: status, `"status":"success"`, and for reads the rows
//! expected. Request bodies are built before the timed phase. Does I/O.

use crate::bench::http1::Http1;
use crate::bench::layout::{KEY, row_marks, row_name};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures::StreamExt as _;
use hyper::Method;
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

/// What a read must return: how many rows, and the first and last keys (rows come sorted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    pub rows: usize,
    pub first: i64,
    pub last: i64,
}

impl Expect {
    /// A fully populated key range `[low, high]`.
    pub fn full(low: i64, high: i64) -> Expect {
        Expect { rows: (high - low + 1) as usize, first: low, last: high }
    }
}

/// `{"data":[rows]}` for `/write`.
pub fn write_body(keys: &[i64]) -> Bytes {
    let rows: Vec<_> =
        keys.iter().map(|k| json!({"Stud_id": k, "Stud_name": row_name(*k), "Stud_marks": row_marks(*k)})).collect();
    Bytes::from(json!({ "data": rows }).to_string())
}

/// `{"Stud_id":{"low":..,"high":..}}` for `/read`.
pub fn read_body(low: i64, high: i64) -> Bytes {
    Bytes::from(json!({ KEY: {"low": low, "high": high} }).to_string())
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Vec<KeyOnly>>,
}

#[derive(Deserialize)]
pub struct KeyOnly {
    #[serde(rename = "Stud_id")]
    pub key: i64,
}

/// Checks decoded rows against `expect`.
pub fn check_rows(rows: &[KeyOnly], expect: Expect) -> Result<()> {
    ensure!(rows.len() == expect.rows, "read returned {} rows, expected {}", rows.len(), expect.rows);
    if let (Some(f), Some(l)) = (rows.first(), rows.last()) {
        ensure!(
            f.key == expect.first && l.key == expect.last,
            "read returned keys {}..{}, expected {}..{}",
            f.key,
            l.key,
            expect.first,
            expect.last
        );
    }
    Ok(())
}

/// The router's seed API.
#[derive(Clone, Debug)]
pub struct Router {
    pub http: reqwest::Client,
    /// The timed requests go through this (see [`Http1`]).
    load: Http1,
    pub base: String,
}

impl Router {
    /// `base` is the router's `http://host:port`.
    pub fn new(http: reqwest::Client, base: &str) -> Result<Router> {
        Ok(Router { http, load: Http1::new(base)?, base: base.trim_end_matches('/').to_owned() })
    }

    async fn post(&self, path: &str, body: Bytes) -> Result<Answer> {
        let (status, bytes) =
            self.load.request(Method::POST, path, Some(body)).await.with_context(|| format!("POST {path}"))?;
        if !status.is_success() {
            bail!("POST {path} answered {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]));
        }
        let answer: Answer = serde_json::from_slice(&bytes)
            .with_context(|| format!("POST {path}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)])))?;
        ensure!(answer.status == "success", "POST {path} answered status {:?}", answer.status);
        Ok(answer)
    }

    /// `POST /write` of a prepared body.
    pub async fn write(&self, body: Bytes) -> Result<()> {
        self.post("/write", body).await.map(drop)
    }

    /// `POST /read` of a prepared body, checked against `expect`.
    pub async fn read(&self, body: Bytes, expect: Expect) -> Result<()> {
        let answer = self.post("/read", body).await?;
        check_rows(&answer.data.context("read answer without data")?, expect)
    }

    /// `GET /healthz`: the router answers from memory, touching no shard server (the cost of
    /// HTTP alone, for the floor phase).
    pub async fn healthz(&self) -> Result<()> {
        let (status, bytes) = self.load.request(Method::GET, "/healthz", None).await.context("GET /healthz")?;
        ensure!(status.is_success(), "GET /healthz answered {status}");
        let answer: Answer = serde_json::from_slice(&bytes).context("GET /healthz: not JSON")?;
        ensure!(answer.status == "success", "GET /healthz answered status {:?}", answer.status);
        Ok(())
    }

    /// Waits until the router answers `/readyz` with 200.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("router {} not ready within {limit:?}", self.base);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What one full snapshot stream delivered.
#[derive(Clone, Debug)]
pub struct StreamOutcome {
    pub rows: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Reads `GET {server}/v1/shards/{shard}/snapshot` to its end and checks its framing: a header
/// line naming the shard, one line per row, and an end line whose count matches.
pub async fn snapshot(http: &reqwest::Client, server: &str, shard: &str) -> Result<StreamOutcome> {
    let url = format!("{}/v1/shards/{shard}/snapshot", server.trim_end_matches('/'));
    let start = Instant::now();
    let resp = http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("GET {url} answered {status}: {text}");
    }
    let mut lines = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<Vec<u8>> = None;
    let mut cur = Vec::new();
    let mut last = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("GET {url}: stream cut"))?;
        bytes += chunk.len() as u64;
        let mut rest: &[u8] = &chunk;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            cur.extend_from_slice(&rest[..i]);
            lines += 1;
            if first.is_none() {
                first = Some(cur.clone());
            }
            std::mem::swap(&mut cur, &mut last);
            cur.clear();
            rest = &rest[i + 1..];
        }
        cur.extend_from_slice(rest);
    }
    let elapsed = start.elapsed();
    ensure!(cur.is_empty(), "snapshot of {shard} ends without a newline");
    ensure!(lines >= 2, "snapshot of {shard} has {lines} lines; a header and an end line at least were expected");
    let header: serde_json::Value = serde_json::from_slice(first.as_deref().unwrap_or_default())
        .with_context(|| format!("snapshot header of {shard}"))?;
    ensure!(header["shard"] == shard, "snapshot header names {} instead of {shard}", header["shard"]);
    let end: shard_server::api::SnapshotEnd =
        serde_json::from_slice(&last).with_context(|| format!("snapshot of {shard} lacks its end line"))?;
    let rows = lines - 2;
    ensure!(end.end && end.rows == rows, "snapshot end line says {} rows, {rows} arrived", end.rows);
    Ok(StreamOutcome { rows, bytes, elapsed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_seed_format() {
        let parse = |b: Bytes| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        assert_eq!(parse(write_body(&[7])), json!({"data": [{"Stud_id": 7, "Stud_name": "s7", "Stud_marks": 7}]}));
        assert_eq!(parse(read_body(3, 9)), json!({"Stud_id": {"low": 3, "high": 9}}));
    }

    #[test]
    fn rows_are_checked() {
        let rows: Vec<KeyOnly> = serde_json::from_str(r#"[{"Stud_id":1,"x":2},{"Stud_id":2}]"#).unwrap();
        assert!(check_rows(&rows, Expect::full(1, 2)).is_ok());
        assert!(check_rows(&rows, Expect::full(1, 3)).is_err());
        assert!(check_rows(&rows, Expect { rows: 2, first: 0, last: 2 }).is_err());
    }
}
