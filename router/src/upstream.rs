//! Calls to shard servers under the router's failure policy: writes to a shard's primary and reads
//! from one of its ready replicas, retried, failed over or re-routed on a newer topology as the
//! failure calls for. Does I/O.
//!
//! Policy (timings in [`RetryPolicy`](crate::config::RetryPolicy)):
//! - `stale_epoch` / `not_primary` / `not_found` without keys (the server does not hold the
//!   shard): our topology is behind the shard server's. Wait (up to `topology_wait`) for a newer
//!   routing table and retry against the shard's primary in it; if none arrives, 503.
//! - transport errors, `unavailable`, `not_ready`, `epoch_ahead` (the server is behind us and
//!   catching up) and 5xx answers without an error body: retry with doubling backoff until
//!   `deadline`, re-reading the routing table before each attempt (a failover may have
//!   happened), then 503.
//! - `conflict`, `not_found`, `bad_request`: final; the caller's request was the problem.
//! - anything else (`internal`, an unreadable answer): final 500.
//! - a code this build does not know (a newer shard server's, during an upgrade) is handled as
//!   the code its HTTP status stands for (`ClientError::code`): a 503 is retried, a 421 rerouted,
//!   another 4xx is final.
//!
//! Reads move on quickly from a copy that does not answer: while another ready copy of the shard
//! is still untried in this pass, an attempt may take only `read_attempt` (a server answers a read
//! within its own wait for pending confirmations, one second, unless it is unreachable or stalled);
//! the last copy of the pass gets the whole upstream timeout, so a merely slow shard is still read.
//! A copy that timed out or could not be reached is *suspect* for [`SUSPECT_FOR`]: later reads try
//! it last, so one cut-off copy (a router partitioned from a primary) costs one short wait, not
//! the upstream timeout on every read of its shard. Writes have one destination, the primary, and
//! get no such treatment.
//!
//! Writes are safe to repeat: inserting an identical row is a no-op on the primary and an update
//! sets the same final value. A delete whose earlier attempt may have been applied (its answer was
//! lost) and whose retry finds the key gone counts as done.

use crate::config::RetryPolicy;
use crate::metrics::Metrics;
use crate::state::{Routing, RoutingTable};
use serde_json::value::RawValue;
use shard_server::api::{BatchOutcome, ClientError, ErrorCode, KeyRange, Op, WriteBatchesRequest, WriteResponse};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a copy that timed out or could not be reached is tried last for reads.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// What calls to shard servers need: the current routing table (re-read after a failure), the
/// retry policy and the metrics they record. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    table: Arc<RoutingTable>,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    /// Servers whose last read attempt timed out or failed in transport, with until when they
    /// are tried last. At most one entry per server name the topology gave.
    suspects: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Upstream {
    pub fn new(table: Arc<RoutingTable>, retry: RetryPolicy, metrics: Arc<Metrics>) -> Upstream {
        Upstream { table, retry, metrics, suspects: Arc::default() }
    }

    fn suspect(&self, server: &str) {
        let now = Instant::now();
        let mut s = self.suspects.lock().expect("suspects lock");
        s.retain(|_, until| *until > now);
        s.insert(server.to_owned(), now + SUSPECT_FOR);
    }

    fn is_suspect(&self, server: &str, now: Instant) -> bool {
        self.suspects.lock().expect("suspects lock").get(server).is_some_and(|until| *until > now)
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }
}

/// How a shard-server call ended when it did not succeed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Keys already hold different rows.
    #[error("conflict on keys {keys:?}")]
    Conflict { keys: Vec<i64> },
    /// The primary has no row for a key the request names.
    #[error("not found: {message}")]
    NotFound { message: String },
    /// The shard server found the request invalid (its message, without the `<Error>` prefix).
    #[error("bad request: {message}")]
    BadRequest { message: String },
    /// The shard server refused the body as too large.
    #[error("shard {shard}: request body too large")]
    TooLarge { shard: String },
    /// Could not get an answer within the retry budget.
    #[error("{0}")]
    Unavailable(String),
    /// An answer that should not happen.
    #[error("{0}")]
    Internal(String),
}

/// What to do after a failed call.
/// `why` is the failure, for the message if retrying runs out.
#[derive(Clone)]
enum Next {
    /// Repeat after a pause; `maybe_applied` when the server may have acted before failing.
    Retry {
        reason: &'static str,
        maybe_applied: bool,
        why: String,
    },
    /// Wait for a newer topology, then repeat.
    Reroute(String),
    Stop(UpstreamError),
}

fn strip(message: &str) -> String {
    message.strip_prefix("<Error> ").unwrap_or(message).to_owned()
}

fn classify(shard: &str, err: &ClientError) -> Next {
    let retry = |reason, maybe_applied| Next::Retry { reason, maybe_applied, why: err.to_string() };
    match err {
        // A connect error means the request never left; anything later may have been applied.
        ClientError::Transport { source, .. } => retry("transport", !source.is_connect()),
        ClientError::Api { body, .. } => match err.code().unwrap_or(body.code) {
            ErrorCode::Conflict => Next::Stop(UpstreamError::Conflict { keys: body.keys.clone() }),
            // Without keys, the shard (not a row) is missing there: that server no longer or not
            // yet holds it, so our topology is out of date.
            ErrorCode::NotFound if body.keys.is_empty() => Next::Reroute(err.to_string()),
            ErrorCode::NotFound => Next::Stop(UpstreamError::NotFound { message: strip(&body.message) }),
            ErrorCode::BadRequest => Next::Stop(UpstreamError::BadRequest { message: strip(&body.message) }),
            ErrorCode::PayloadTooLarge => Next::Stop(UpstreamError::TooLarge { shard: shard.to_owned() }),
            ErrorCode::StaleEpoch | ErrorCode::NotPrimary => Next::Reroute(err.to_string()),
            ErrorCode::EpochAhead | ErrorCode::NotReady => retry("unavailable", false),
            ErrorCode::Unavailable => retry("unavailable", true),
            // `internal` and codes that belong to replication (`seq_gap`, ...): nothing the router
            // can fix by retrying, so a 500 with the detail in the log.
            _ => Next::Stop(UpstreamError::Internal(format!("shard {shard}: {err}"))),
        },
        // A proxy or a crashing server answering without our error body.
        ClientError::Unexpected { status, .. } if *status >= 500 => retry("unavailable", true),
        ClientError::Unexpected { .. } => Next::Stop(UpstreamError::Internal(format!("shard {shard}: {err}"))),
    }
}

/// Doubling pauses bounded by a deadline.
struct Backoff {
    next: Duration,
    max: Duration,
    until: Instant,
}

impl Backoff {
    fn new(p: &RetryPolicy) -> Backoff {
        Backoff { next: p.backoff_min, max: p.backoff_max, until: Instant::now() + p.deadline }
    }

    /// Sleeps before the next attempt; `false` when the deadline leaves no room for one.
    async fn pause(&mut self) -> bool {
        if Instant::now() + self.next > self.until {
            return false;
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
        true
    }
}

/// The shard `shard_id` in `routing`, provided every key of the part still belongs to it (a newer
/// topology may have moved ranges; then the part cannot be sent as one batch any more).
fn locate(routing: &Routing, shard_id: &str, keys: &[i64]) -> Result<usize, UpstreamError> {
    let moved =
        || UpstreamError::Unavailable(format!("shard {shard_id} changed in topology epoch {}", routing.epoch()));
    let shard = routing.shard_index(shard_id).ok_or_else(moved)?;
    if keys.iter().any(|&k| routing.ranges.shard_for_key(k) != Some(shard)) {
        return Err(moved());
    }
    Ok(shard)
}

/// One client's part for one shard: its ops and the keys they touch (to re-check the shard after a
/// topology change).
#[derive(Debug)]
pub struct Batch {
    pub keys: Vec<i64>,
    pub ops: Vec<Op>,
}

/// A batch still waiting for its outcome.
struct Open {
    index: usize,
    batch: Batch,
    /// An earlier attempt may have applied it (its answer was lost).
    maybe_applied: bool,
}

/// Sends independent batches for one shard to its primary, one request per attempt, and returns
/// each batch's outcome (aligned with `batches`). Each batch follows the policy above on its own: a
/// batch with a final answer is done, the others are sent again together after a pause or a
/// topology change, until the deadline.
pub async fn write_batches(
    up: &Upstream,
    mut routing: Arc<Routing>,
    shard_id: &str,
    batches: Vec<Batch>,
    dry_run: bool,
) -> Vec<Result<WriteResponse, UpstreamError>> {
    let op = if dry_run { "dry_run" } else { "write" };
    let topology_wait = up.retry.topology_wait;
    let mut backoff = Backoff::new(&up.retry);
    // Topology waits stretch the deadline once, so a failover that needs both still fits.
    let give_up = backoff.until + topology_wait;
    let mut results: Vec<Option<Result<WriteResponse, UpstreamError>>> = batches.iter().map(|_| None).collect();
    let mut open: Vec<Open> =
        batches.into_iter().enumerate().map(|(index, batch)| Open { index, batch, maybe_applied: false }).collect();
    up.metrics.write_batches(open.len());
    while !open.is_empty() {
        // A batch whose keys a newer topology moved elsewhere cannot be sent here any more.
        let mut shard = None;
        open.retain(|o| match locate(&routing, shard_id, &o.batch.keys) {
            Ok(i) => {
                shard = Some(i);
                true
            }
            Err(e) => {
                results[o.index] = Some(Err(e));
                false
            }
        });
        let Some(shard) = shard else { break };
        let primary = routing.primary(shard);
        let mut req = WriteBatchesRequest {
            epoch: Some(routing.epoch()),
            batches: open.iter_mut().map(|o| std::mem::take(&mut o.batch.ops)).collect(),
            dry_run,
        };
        let answer = primary.client.write_batches(shard_id, &req).await;
        for (o, ops) in open.iter_mut().zip(req.batches.drain(..)) {
            o.batch.ops = ops;
        }
        let outcomes: Vec<Result<WriteResponse, Next>> = match answer {
            Ok(resp) if resp.results.len() == open.len() => resp
                .results
                .into_iter()
                .map(|r| match r {
                    BatchOutcome::Ok(done) => Ok(done),
                    BatchOutcome::Err { status, error } => {
                        let err = ClientError::Api { url: primary.client.base().to_owned(), status, body: error };
                        tracing::debug!(shard = shard_id, primary = %primary.name, error = %err, "batch failed");
                        Err(classify(shard_id, &err))
                    }
                })
                .collect(),
            Ok(resp) => {
                let e = UpstreamError::Internal(format!(
                    "shard {shard_id}: {} answered {} outcomes for {} batches",
                    primary.name,
                    resp.results.len(),
                    open.len()
                ));
                open.iter().map(|_| Err(Next::Stop(e.clone()))).collect()
            }
            Err(err) => {
                tracing::debug!(shard = shard_id, primary = %primary.name, error = %err, "write attempt failed");
                let next = classify(shard_id, &err);
                open.iter().map(|_| Err(next.clone())).collect()
            }
        };
        let mut reroute = false;
        let mut retry = None;
        let mut still_open = Vec::new();
        for (mut o, outcome) in open.into_iter().zip(outcomes) {
            let done = match outcome {
                Ok(done) => Ok(done),
                Err(Next::Stop(UpstreamError::NotFound { .. }))
                    if o.maybe_applied && !dry_run && o.batch.ops.iter().all(|op| matches!(op, Op::Delete { .. })) =>
                {
                    // An earlier attempt may have removed these rows before its answer was lost;
                    // the keys are gone either way, which is what the caller asked for.
                    Ok(WriteResponse { deleted: o.batch.ops.len(), ..WriteResponse::default() })
                }
                Err(Next::Stop(e)) => Err(e),
                Err(Next::Reroute(why)) => {
                    reroute = true;
                    retry.get_or_insert(("topology", why));
                    still_open.push(o);
                    continue;
                }
                Err(Next::Retry { reason, maybe_applied, why }) => {
                    o.maybe_applied |= maybe_applied;
                    retry.get_or_insert((reason, why));
                    still_open.push(o);
                    continue;
                }
            };
            results[o.index] = Some(done);
        }
        open = still_open;
        if open.is_empty() {
            break;
        }
        let (reason, why) = retry.expect("an open batch has a reason");
        let failure = if reroute {
            up.metrics.retry(op, "topology");
            let wait = topology_wait.min(give_up.saturating_duration_since(Instant::now()));
            match up.table.wait_newer(routing.epoch(), wait).await {
                Some(newer) => {
                    routing = newer;
                    None
                }
                None => Some(format!(
                    "shard {shard_id}: {why}; no newer topology than epoch {} within {wait:?}",
                    routing.epoch()
                )),
            }
        } else if backoff.pause().await {
            up.metrics.retry(op, reason);
            if let Some(current) = up.table.current() {
                routing = current;
            }
            None
        } else {
            Some(format!("shard {shard_id}: gave up retrying: {why}"))
        };
        if let Some(message) = failure {
            for o in open.drain(..) {
                results[o.index] = Some(Err(UpstreamError::Unavailable(message.clone())));
            }
        }
    }
    results.into_iter().map(|r| r.expect("every batch has an outcome")).collect()
}

/// Reads `ranges` (already clipped to the shard) from one ready replica of `shard_id`, chosen by
/// the ring for `request`, in one request; on failure tries the shard's other ready replicas, then
/// starts over after a pause (with the newest routing table) until the deadline. One JSON array
/// of rows per range, in order.
pub async fn read_ranges(
    up: &Upstream,
    mut routing: Arc<Routing>,
    shard_id: &str,
    ranges: &[KeyRange],
    request: u64,
) -> Result<Vec<Box<RawValue>>, UpstreamError> {
    up.metrics.read_ranges(ranges.len());
    let mut backoff = Backoff::new(&up.retry);
    let mut attempts = 0u32;
    loop {
        let shard = routing.shard_index(shard_id).ok_or_else(|| {
            UpstreamError::Unavailable(format!("shard {shard_id} left topology epoch {}", routing.epoch()))
        })?;
        let mut last = None;
        let now = Instant::now();
        let mut candidates: Vec<_> = routing.read_candidates(shard, request).collect();
        // Suspects last; otherwise the ring's order (a stable sort keeps it).
        candidates.sort_by_key(|s| up.is_suspect(&s.name, now));
        let count = candidates.len();
        for (i, server) in candidates.into_iter().enumerate() {
            if attempts > 0 {
                up.metrics.retry("read", "replica_failed");
            }
            attempts += 1;
            let read = server.client.read_ranges(shard_id, ranges);
            let answer = if i + 1 < count {
                match tokio::time::timeout(up.retry.read_attempt, read).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        tracing::warn!(shard = shard_id, replica = %server.name, "replica read timed out; trying another");
                        up.suspect(&server.name);
                        continue;
                    }
                }
            } else {
                read.await
            };
            if matches!(answer, Err(ClientError::Transport { .. })) {
                up.suspect(&server.name);
            }
            match answer {
                Ok(parts) if parts.len() == ranges.len() => return Ok(parts),
                Ok(parts) => {
                    return Err(UpstreamError::Internal(format!(
                        "shard {shard_id}: {} answered {} parts for {} ranges",
                        server.name,
                        parts.len(),
                        ranges.len()
                    )));
                }
                // We built the request; a replica refusing it is our bug, not worth a retry.
                Err(e) if e.code() == Some(ErrorCode::BadRequest) => {
                    return Err(UpstreamError::Internal(format!("shard {shard_id}: {e}")));
                }
                Err(e) => {
                    tracing::warn!(shard = shard_id, replica = %server.name, error = %e, "replica read failed; trying another");
                    last = Some(e);
                }
            }
        }
        let detail = last.map_or_else(|| "no ready replica".to_owned(), |e| e.to_string());
        if !backoff.pause().await {
            return Err(UpstreamError::Unavailable(format!("shard {shard_id}: every ready replica failed: {detail}")));
        }
        if let Some(current) = up.table.current() {
            routing = current;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shard_server::api::ErrorBody;

    /// An answer of a newer shard server, whose code this build does not know.
    fn newer(status: u16) -> ClientError {
        let body = r#"{"message":"<Error> something new","status":"failure","code":"brand_new_code"}"#;
        let body: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
        ClientError::Api { url: "http://s".into(), status, body }
    }

    #[test]
    fn an_unknown_code_is_handled_as_its_status_says() {
        assert!(matches!(classify("sh1", &newer(503)), Next::Retry { maybe_applied: true, .. }), "503: retried");
        assert!(matches!(classify("sh1", &newer(421)), Next::Reroute(_)), "421: routed again");
        assert!(
            matches!(classify("sh1", &newer(422)), Next::Stop(UpstreamError::BadRequest { ref message }) if message == "something new"),
            "another 4xx: final, with the server's message"
        );
        assert!(matches!(classify("sh1", &newer(500)), Next::Stop(UpstreamError::Internal(_))), "500: final");
        // A known code is taken as it is, whatever the status.
        let mut known = newer(503);
        if let ClientError::Api { body, .. } = &mut known {
            body.code = ErrorCode::Conflict;
        }
        assert!(matches!(classify("sh1", &known), Next::Stop(UpstreamError::Conflict { .. })));
    }
}
