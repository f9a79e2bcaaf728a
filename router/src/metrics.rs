//! Prometheus metrics of the router (requests by endpoint and status, latency, upstream retries,
//! topology epoch) and the middleware that records every request. No I/O; `/metrics` renders them.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (`/read`), or `unmatched`: keeps the label set bounded.
    pub endpoint: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `read` or `write`.
    pub op: &'static str,
    /// Why the call was repeated: `transport`, `unavailable`, `topology`, `replica_failed`.
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    retries: Family<RetryLabels, Counter>,
    write_batches: Histogram,
    read_ranges: Histogram,
    epoch: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sharddb_router");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let retries = Family::<RetryLabels, Counter>::default();
        let epoch = Gauge::default();
        let write_batches = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let read_ranges = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("requests", "HTTP requests answered, by endpoint, method and status", requests.clone());
        registry.register("request_duration_seconds", "Time to answer an HTTP request", latency.clone());
        registry.register("upstream_retries", "Calls to shard servers repeated after a failure", retries.clone());
        registry.register(
            "upstream_write_batches",
            "Client batches per write request to a shard server (coalescing)",
            write_batches.clone(),
        );
        registry.register(
            "upstream_read_ranges",
            "Client ranges per read request to a shard server (coalescing)",
            read_ranges.clone(),
        );
        registry.register("topology_epoch", "Epoch of the routing table in use (0: none yet)", epoch.clone());
        Metrics { registry, requests, latency, retries, write_batches, read_ranges, epoch }
    }

    /// Records one write request to a shard server carrying `batches` client batches.
    pub fn write_batches(&self, batches: usize) {
        self.write_batches.observe(batches as f64);
    }

    /// Records one read request to a shard server carrying `ranges` client ranges.
    pub fn read_ranges(&self, ranges: usize) {
        self.read_ranges.observe(ranges as f64);
    }

    pub fn retry(&self, op: &'static str, reason: &'static str) {
        self.retries.get_or_create(&RetryLabels { op, reason }).inc();
    }

    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    fn observe(&self, endpoint: String, method: String, status: u16, seconds: f64) {
        self.latency.get_or_create(&EndpointLabels { endpoint: endpoint.clone() }).observe(seconds);
        self.requests.get_or_create(&RequestLabels { endpoint, method, status }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Middleware: counts and times every request, including 404/405/413 answers.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let endpoint =
        req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics.observe(endpoint, method, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

/// The `/metrics` answer.
pub fn response(metrics: &Metrics) -> Response {
    ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_latency_and_retries() {
        let m = Metrics::new();
        m.observe("/read".into(), "POST".into(), 200, 0.002);
        m.observe("/read".into(), "POST".into(), 200, 0.004);
        m.retry("read", "replica_failed");
        m.set_epoch(7);
        let text = m.render();
        assert!(
            text.contains(r#"sharddb_router_requests_total{endpoint="/read",method="POST",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"sharddb_router_request_duration_seconds_count{endpoint="/read"} 2"#), "{text}");
        assert!(
            text.contains(r#"sharddb_router_upstream_retries_total{op="read",reason="replica_failed"} 1"#),
            "{text}"
        );
        assert!(text.contains("sharddb_router_topology_epoch 7"), "{text}");
    }
}
