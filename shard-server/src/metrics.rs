//! Prometheus metrics of the shard server (text format at `/metrics`). No I/O.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RequestLabels, Histogram>,
    /// Replication entries committed here (as primary or replica).
    pub entries_applied: Counter,
    /// Groups whose acknowledgement failed because a ready replica did not confirm.
    pub replication_failures: Counter,
    /// Batches committed together per group.
    pub group_size: Histogram,
    /// Times a copy here found its history differs from its primary's and gave it up (see
    /// `replication::divergence`).
    pub copies_diverged: Counter,
    /// Internal requests served over plain HTTP (`--internal-auth` `none` or `migrate`): the
    /// climb to `strict` waits for it to stay still. Named alike in every sharddb process.
    pub plain_internal_requests: Counter,
    registry: Registry,
    /// Metrics named without the shard server's prefix.
    common: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0002, 2.0, 16))
        });
        let entries_applied = Counter::default();
        let replication_failures = Counter::default();
        let group_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let copies_diverged = Counter::default();
        let mut registry = Registry::with_prefix("sharddb_shard");
        registry.register("http_requests", "HTTP requests by route and status", requests.clone());
        registry.register("http_request_seconds", "HTTP request latency", latency.clone());
        registry.register("entries_applied", "replication entries committed", entries_applied.clone());
        registry.register("replication_failures", "write groups failed by a replica", replication_failures.clone());
        registry.register("group_batches", "batches per group commit", group_size.clone());
        registry.register(
            "copies_diverged",
            "copies that found their history differs from their primary's and gave it up",
            copies_diverged.clone(),
        );
        let plain_internal_requests = Counter::default();
        let mut common = Registry::with_prefix("sharddb");
        common.register(
            "plain_internal_requests",
            "internal requests served over plain HTTP without a credential (--internal-auth none or migrate)",
            plain_internal_requests.clone(),
        );
        Metrics {
            requests,
            latency,
            entries_applied,
            replication_failures,
            group_size,
            copies_diverged,
            plain_internal_requests,
            registry,
            common,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).expect("encoding to a String");
        prometheus_client::encoding::text::encode_registry(&mut out, &self.common).expect("encoding to a String");
        prometheus_client::encoding::text::encode_eof(&mut out).expect("encoding to a String");
        out
    }
}
