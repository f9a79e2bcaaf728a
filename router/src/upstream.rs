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
//!
//! Writes are safe to repeat: inserting an identical row is a no-op on the primary and an update
//! sets the same final value. A delete whose earlier attempt may have been applied (its answer was
//! lost) and whose retry finds the key gone counts as done.

use crate::state::{AppState, Routing};
use serde_json::value::RawValue;
use shard_server::api::{ClientError, ErrorCode, KeyRange, Op, WriteRequest, WriteResponse};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a shard-server call ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
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
enum Next {
    /// Repeat after a pause; `maybe_applied` when the server may have acted before failing.
    Retry {
        reason: &'static str,
        maybe_applied: bool,
    },
    /// Wait for a newer topology, then repeat.
    Reroute,
    Stop(UpstreamError),
}

fn strip(message: &str) -> String {
    message.strip_prefix("<Error> ").unwrap_or(message).to_owned()
}

fn classify(shard: &str, err: &ClientError) -> Next {
    match err {
        // A connect error means the request never left; anything later may have been applied.
        ClientError::Transport { source, .. } => {
            Next::Retry { reason: "transport", maybe_applied: !source.is_connect() }
        }
        ClientError::Api { body, .. } => match body.code {
            ErrorCode::Conflict => Next::Stop(UpstreamError::Conflict { keys: body.keys.clone() }),
            // Without keys, the shard (not a row) is missing there: that server no longer or not
            // yet holds it, so our topology is out of date.
            ErrorCode::NotFound if body.keys.is_empty() => Next::Reroute,
            ErrorCode::NotFound => Next::Stop(UpstreamError::NotFound { message: strip(&body.message) }),
            ErrorCode::BadRequest => Next::Stop(UpstreamError::BadRequest { message: strip(&body.message) }),
            ErrorCode::PayloadTooLarge => Next::Stop(UpstreamError::TooLarge { shard: shard.to_owned() }),
            ErrorCode::StaleEpoch | ErrorCode::NotPrimary => Next::Reroute,
            ErrorCode::EpochAhead | ErrorCode::NotReady => Next::Retry { reason: "unavailable", maybe_applied: false },
            ErrorCode::Unavailable => Next::Retry { reason: "unavailable", maybe_applied: true },
            // `internal`, codes that belong to replication (`seq_gap`, ...) and codes added later:
            // nothing the router can fix by retrying, so a 500 with the detail in the log.
            _ => Next::Stop(UpstreamError::Internal(format!("shard {shard}: {err}"))),
        },
        // A proxy or a crashing server answering without our error body.
        ClientError::Unexpected { status, .. } if *status >= 500 => {
            Next::Retry { reason: "unavailable", maybe_applied: true }
        }
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
    fn new(state: &AppState) -> Backoff {
        let p = &state.config().retry;
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

/// Sends one shard's part of a request to the shard's primary, carrying the routing table's epoch.
/// `keys` are the keys the ops touch (to re-check the shard after a topology change).
pub async fn write(
    state: &AppState,
    mut routing: Arc<Routing>,
    shard_id: &str,
    keys: &[i64],
    ops: Vec<Op>,
    dry_run: bool,
) -> Result<WriteResponse, UpstreamError> {
    let op = if dry_run { "dry_run" } else { "write" };
    let topology_wait = state.config().retry.topology_wait;
    let mut backoff = Backoff::new(state);
    // Topology waits stretch the deadline once, so a failover that needs both still fits.
    let give_up = backoff.until + topology_wait;
    let only_deletes = ops.iter().all(|o| matches!(o, Op::Delete { .. }));
    let mut maybe_applied = false;
    let mut req = WriteRequest { epoch: None, ops, dry_run };
    loop {
        let shard = locate(&routing, shard_id, keys)?;
        let primary = routing.primary(shard);
        req.epoch = Some(routing.epoch());
        let err = match primary.client.write(shard_id, &req).await {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        tracing::debug!(shard = shard_id, primary = %primary.name, error = %err, "write attempt failed");
        match classify(shard_id, &err) {
            Next::Stop(UpstreamError::NotFound { .. }) if maybe_applied && only_deletes && !dry_run => {
                // An earlier attempt may have removed these rows before its answer was lost; the
                // keys are gone either way, which is what the caller asked for.
                return Ok(WriteResponse { deleted: req.ops.len(), ..WriteResponse::default() });
            }
            Next::Stop(e) => return Err(e),
            Next::Reroute => {
                state.metrics().retry(op, "topology");
                let wait = topology_wait.min(give_up.saturating_duration_since(Instant::now()));
                match state.table().wait_newer(routing.epoch(), wait).await {
                    Some(newer) => routing = newer,
                    None => {
                        return Err(UpstreamError::Unavailable(format!(
                            "shard {shard_id}: {err}; no newer topology than epoch {} within {wait:?}",
                            routing.epoch()
                        )));
                    }
                }
            }
            Next::Retry { reason, maybe_applied: m } => {
                maybe_applied |= m;
                if !backoff.pause().await {
                    return Err(UpstreamError::Unavailable(format!("shard {shard_id}: gave up retrying: {err}")));
                }
                state.metrics().retry(op, reason);
                if let Some(current) = state.table().current() {
                    routing = current;
                }
            }
        }
    }
}

/// Reads `range` (already clipped to the shard) from one ready replica of `shard_id`, chosen by the
/// ring for `request`; on failure tries the shard's other ready replicas, then starts over after a
/// pause (with the newest routing table) until the deadline.
pub async fn read(
    state: &AppState,
    mut routing: Arc<Routing>,
    shard_id: &str,
    range: KeyRange,
    request: u64,
) -> Result<Box<RawValue>, UpstreamError> {
    let mut backoff = Backoff::new(state);
    let mut attempts = 0u32;
    loop {
        let shard = routing.shard_index(shard_id).ok_or_else(|| {
            UpstreamError::Unavailable(format!("shard {shard_id} left topology epoch {}", routing.epoch()))
        })?;
        let key_name = routing.schema.key_name();
        let mut last = None;
        for server in routing.read_candidates(shard, request) {
            if attempts > 0 {
                state.metrics().retry("read", "replica_failed");
            }
            attempts += 1;
            match server.client.read(shard_id, key_name, range).await {
                Ok(data) => return Ok(data),
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
        if let Some(current) = state.table().current() {
            routing = current;
        }
    }
}
