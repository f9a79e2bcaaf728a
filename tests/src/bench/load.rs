//! The load generator: `concurrency` tokio tasks pull operation indexes from a shared counter until
//! `n` are done, time each one into an HDR histogram and check its outcome. Errors are counted (and
//! a few kept verbatim), never hidden. Does I/O through the operation it is given.

use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How many error messages a phase keeps for the report.
const KEPT_ERRORS: usize = 5;

/// What one phase of load measured.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Operations attempted.
    pub ops: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Indexes of the operations that failed, in no particular order.
    pub failed: Vec<usize>,
    pub elapsed: Duration,
    /// Latency of successful operations, in microseconds.
    pub latency_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds are valid")
}

impl LoadOutcome {
    /// Completed operations per second (failed ones included: they took their time too).
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `q` (0..1), in milliseconds; `None` when nothing succeeded.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.latency_us.is_empty()).then(|| self.latency_us.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// Runs `op(0)`..`op(n-1)` with at most `concurrency` in flight and returns what was measured.
pub async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> LoadOutcome
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
        .map(|_| {
            let op = op.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut failed = Vec::new();
                let mut samples = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t = Instant::now();
                    match op(i).await {
                        Ok(()) => {
                            let us = t.elapsed().as_micros().clamp(1, 600_000_000) as u64;
                            hist.saturating_record(us);
                        }
                        Err(e) => {
                            failed.push(i);
                            if samples.len() < KEPT_ERRORS {
                                samples.push(format!("{e:#}"));
                            }
                        }
                    }
                }
                (hist, failed, samples)
            })
        })
        .collect();
    let mut latency_us = histogram();
    let mut errors = 0;
    let mut failed = Vec::new();
    let mut error_samples = Vec::new();
    for t in tasks {
        match t.await {
            Ok((h, f, s)) => {
                latency_us.add(&h).expect("histograms share their bounds");
                errors += f.len() as u64;
                failed.extend(f);
                error_samples.extend(s);
            }
            Err(e) => {
                errors += 1;
                error_samples.push(format!("load task panicked: {e}"));
            }
        }
    }
    let elapsed = start.elapsed();
    error_samples.truncate(KEPT_ERRORS);
    LoadOutcome { ops: n as u64, errors, error_samples, failed, elapsed, latency_us }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_index_runs_once_and_errors_are_counted() {
        let seen = Arc::new(std::sync::Mutex::new(vec![0u32; 1000]));
        let s = seen.clone();
        let out = drive(1000, 7, move |i| {
            let s = s.clone();
            async move {
                s.lock().unwrap()[i] += 1;
                if i % 100 == 0 { anyhow::bail!("op {i} failed") } else { Ok(()) }
            }
        })
        .await;
        assert!(seen.lock().unwrap().iter().all(|c| *c == 1));
        assert_eq!(out.ops, 1000);
        assert_eq!(out.errors, 10);
        let mut failed = out.failed.clone();
        failed.sort();
        assert_eq!(failed, (0..10).map(|i| i * 100).collect::<Vec<_>>());
        assert_eq!(out.error_samples.len(), KEPT_ERRORS);
        assert_eq!(out.latency_us.len(), 990);
        assert!(out.quantile_ms(0.5).is_some());
    }
}
