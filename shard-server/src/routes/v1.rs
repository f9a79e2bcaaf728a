//! Our own endpoints: writes through the primary, replication between servers, snapshots, status
//! and metrics.

use super::{check_ops, check_readable, check_routed_write};
use crate::api::{
    BatchOutcome, LeaseRequest, LeaseResponse, PrimaryLeaseRequest, PrimaryLeaseResponse, ReadRangesRequest,
    WriteBatchesRequest, WriteBatchesResponse,
};
use crate::api::{
    LogResponse, RecoverRequest, RecoverResponse, ReplicateRequest, ReplicateResponse, Role, ServerStatus, ShardStats,
    ShardStatus, WriteRequest, WriteResponse,
};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::{JsonBody, PathParam, Query};
use crate::limits::{MAX_PRIMARY_LEASE_MS, MAX_READ_RANGES};
use crate::node::{Node, ShardRole};
use crate::tls::Component;
use crate::topology::ReplicaState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;

/// `POST /v1/shards/{shard}/write`: a batch applied atomically by this shard's primary.
#[tracing::instrument(level = "debug", skip_all, fields(shard = %id))]
pub async fn write(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
    JsonBody(req): JsonBody<WriteRequest>,
) -> Result<Json<WriteResponse>, ApiError> {
    let (shard, role) = node.shard(&id).await?;
    check_routed_write(&node, &id, &role, req.epoch)?;
    check_ops(&id, &shard.table.schema, &role, &req.ops)?;
    Ok(Json(shard.submit(&node, req.ops, req.epoch, req.dry_run).await?))
}

/// `POST /v1/shards/{shard}/write_batches`: independent batches, each applied atomically on its own.
/// A failure that concerns the whole request (unknown shard, unreadable body) is the request's
/// answer; everything else, including a batch that breaks the rules, is that batch's outcome.
#[tracing::instrument(level = "debug", skip_all, fields(shard = %id))]
pub async fn write_batches(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
    JsonBody(req): JsonBody<WriteBatchesRequest>,
) -> Result<Json<WriteBatchesResponse>, ApiError> {
    let (shard, role) = node.shard(&id).await?;
    let WriteBatchesRequest { epoch, batches, dry_run } = req;
    if batches.is_empty() {
        return Err(ApiError::bad_request("no batches"));
    }
    check_routed_write(&node, &id, &role, epoch)?;
    // Every batch is queued before any is awaited, so they all land in the same group commit.
    let outcomes = batches.into_iter().map(|ops| {
        let checked = check_ops(&id, &shard.table.schema, &role, &ops);
        let (shard, node) = (Arc::clone(&shard), Arc::clone(&node));
        async move {
            checked?;
            shard.submit(&node, ops, epoch, dry_run).await
        }
    });
    let results = futures::future::join_all(outcomes)
        .await
        .into_iter()
        .map(|r| match r {
            Ok(done) => BatchOutcome::Ok(done),
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(shard = %id, error = %e, "batch failed");
                }
                BatchOutcome::Err { status: e.status().as_u16(), error: e.body() }
            }
        })
        .collect();
    Ok(Json(WriteBatchesResponse { results }))
}

/// `POST /v1/shards/{shard}/read_ranges`: several ranges of one shard, one JSON array of rows per
/// range, in the order asked. Served by the same copies as the seed `/read`.
#[tracing::instrument(level = "debug", skip_all, fields(shard = %id))]
pub async fn read_ranges(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
    JsonBody(req): JsonBody<ReadRangesRequest>,
) -> Result<Response, ApiError> {
    let (shard, role) = node.shard(&id).await?;
    check_readable(&id, &role)?;
    if req.ranges.is_empty() || req.ranges.len() > MAX_READ_RANGES {
        return Err(ApiError::bad_request(format!(
            "ranges must hold 1 to {MAX_READ_RANGES} ranges, not {}",
            req.ranges.len()
        )));
    }
    if let Some((i, r)) = req.ranges.iter().enumerate().find(|(_, r)| r.low > r.high) {
        return Err(ApiError::bad_request(format!("range {i}: low {} is greater than high {}", r.low, r.high)));
    }
    let ranges: Vec<(i64, i64)> = req.ranges.iter().map(|r| (r.low, r.high)).collect();
    let parts = super::read_confirmed(&node, &shard, &role, &ranges).await?;
    // Postgres wrote each part as a JSON array; they are passed through as they are.
    let mut body = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 16);
    body.push_str("{\"data\":[");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(part);
    }
    body.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `POST /v1/shards/{shard}/replicate`: entries from the shard's primary. A server may only send
/// as itself (`primary` must be the name in its certificate), and at our own epoch only as the
/// primary our topology names: at a newer epoch we cannot tell yet, and the primary's entries are
/// checked against ours as always (see [`crate::replication`]).
#[tracing::instrument(level = "debug", skip_all, fields(shard = %id, from = %req.primary))]
pub async fn replicate(
    State(node): State<Arc<Node>>,
    Extension(Caller(caller)): Extension<Caller>,
    PathParam(id): PathParam<String>,
    JsonBody(req): JsonBody<ReplicateRequest>,
) -> Result<Json<ReplicateResponse>, ApiError> {
    speaks_as(&caller, &req.primary, "primary")?;
    let ours = node.epoch();
    if req.epoch < ours {
        return Err(ApiError::StaleEpoch { got: req.epoch, ours });
    }
    if req.epoch == ours
        && caller.component == Component::Server
        && let Some(entry) = node.topology().as_ref().and_then(|t| t.shard(&id).cloned())
        && entry.primary != caller.name
    {
        return Err(ApiError::Forbidden(format!(
            "{} is not the primary of shard {id} at epoch {ours} ({} is); it may not replicate to it",
            caller.name, entry.primary
        )));
    }
    let (shard, role) = match node.shard(&id).await {
        Ok(x) => x,
        // A newer topology may give us this shard; we have not seen it yet.
        Err(ApiError::NotFound { .. }) if req.epoch > ours => {
            return Err(ApiError::EpochAhead { got: req.epoch, ours });
        }
        Err(e) => return Err(e),
    };
    match role {
        ShardRole::Replica { .. } => {}
        ShardRole::Primary { .. } if req.epoch > ours => return Err(ApiError::EpochAhead { got: req.epoch, ours }),
        ShardRole::Primary { .. } | ShardRole::Standalone => {
            return Err(ApiError::Conflict {
                message: format!("{} is itself the primary of shard {id}; it accepts no replication", node.name()),
                keys: vec![],
            });
        }
    }
    // Applying runs to completion even if the primary gives up and drops this request: a
    // transaction cut off mid-way must never be left on a pooled connection.
    let (applied, hash) = tokio::spawn(async move { shard.replicate(&node, req).await })
        .await
        .map_err(|e| ApiError::Internal(format!("replication task: {e}")))??;
    Ok(Json(ReplicateResponse { applied, hash: hash.map(crate::replication::divergence::to_hex) }))
}

/// `GET /v1/shards/{shard}/snapshot`: the shard at one sequence number, streamed as
/// newline-delimited JSON (header, positional rows, end marker).
#[tracing::instrument(skip_all, fields(shard = %id))]
pub async fn snapshot(State(node): State<Arc<Node>>, PathParam(id): PathParam<String>) -> Result<Response, ApiError> {
    let (shard, role) = node.shard(&id).await?;
    check_readable(&id, &role)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    tokio::spawn(async move {
        if let Err(e) = node.db.snapshot(&shard.table, tx).await {
            tracing::error!(shard = shard.id(), error = %e, "snapshot failed mid-stream");
        }
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, std::io::Error>));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `GET /v1/shards/{shard}/stats`: row count and checksum at one sequence number.
#[tracing::instrument(skip_all, fields(shard = %id))]
pub async fn stats(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
) -> Result<Json<ShardStats>, ApiError> {
    let (shard, _) = node.shard(&id).await?;
    Ok(Json(shard.stats_locked(&node).await?))
}

#[derive(serde::Deserialize)]
pub struct LogQuery {
    from: u64,
    to: u64,
}

/// `GET /v1/shards/{shard}/log?from=&to=`: kept log entries, for a replica catching up.
#[tracing::instrument(skip_all, fields(shard = %id))]
pub async fn log(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
    Query(q): Query<LogQuery>,
) -> Result<Json<LogResponse>, ApiError> {
    let (shard, _) = node.shard(&id).await?;
    Ok(Json(LogResponse { entries: shard.log_range(&node, q.from, q.to).await? }))
}

/// `POST /v1/shards/{shard}/recover`: replace this copy from a snapshot of the shard's primary and
/// verify it. Only a copy the topology marks `recovering` may be replaced: nothing here ever wipes
/// a copy that serves. The source is the primary our own topology names, at the address it gives;
/// a request naming another primary (the operator's view is newer or older than ours) is a 409
/// and the operator asks again.
#[tracing::instrument(skip_all, fields(shard = %id, primary = %req.primary))]
pub async fn recover(
    State(node): State<Arc<Node>>,
    PathParam(id): PathParam<String>,
    JsonBody(req): JsonBody<RecoverRequest>,
) -> Result<Json<RecoverResponse>, ApiError> {
    let (shard, role) = node.shard(&id).await?;
    let primary = match role {
        ShardRole::Replica { state: ReplicaState::Recovering, primary, .. } => primary,
        other => {
            return Err(ApiError::Conflict {
                message: format!("this copy of shard {id} is not recovering ({other:?}); it is not replaced"),
                keys: vec![],
            });
        }
    };
    if primary != req.primary {
        return Err(ApiError::Conflict {
            message: format!(
                "the primary of shard {id} is {primary} in this server's topology (epoch {}), not {}",
                node.epoch(),
                req.primary
            ),
            keys: vec![],
        });
    }
    let url = node
        .topology()
        .and_then(|t| t.servers.get(&primary).map(|s| s.url.clone()))
        .ok_or_else(|| ApiError::Internal(format!("the topology lists no address of {primary}")))?;
    let source = node.streaming_peer(&url);
    // Runs to completion even if the caller goes away: the install is one transaction either way.
    let done = tokio::spawn(async move { shard.recover(&node, &source).await })
        .await
        .map_err(|e| ApiError::Internal(format!("recovery task: {e}")))??;
    Ok(Json(done))
}

/// A server may only speak as itself: the name a body gives must be its certificate's. The
/// operator may name any server (it could issue itself that server's certificate anyway).
fn speaks_as(caller: &crate::tls::Identity, named: &str, field: &str) -> Result<(), ApiError> {
    if caller.component == Component::Server && caller.name != named {
        return Err(ApiError::Forbidden(format!(
            "{field} is {named}, but the caller's certificate is that of {}",
            caller.name
        )));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
pub struct StatusQuery {
    /// Compute row checksums (reads every row); default true.
    #[serde(default = "yes")]
    checksums: bool,
}

fn yes() -> bool {
    true
}

/// `GET /status`: shards held, role, applied seq, row count and checksum.
#[tracing::instrument(skip_all)]
pub async fn status(
    State(node): State<Arc<Node>>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<ServerStatus>, ApiError> {
    // Every shard the topology gives us is reported, opened now if the start-up task has not yet.
    if let Some(t) = node.topology() {
        for (entry, _) in t.shards_of(node.name()) {
            node.shard(&entry.id).await?;
        }
    }
    let mut shards = BTreeMap::new();
    for shard in node.shards() {
        let (role, caught_up) = match node.shard(shard.id()).await {
            Ok((_, ShardRole::Primary { .. })) => (Role::Primary, None),
            Ok((_, ShardRole::Replica { state: ReplicaState::Ready, .. })) => {
                (Role::Replica, Some(!shard.read_gate_closed()))
            }
            Ok((_, ShardRole::Replica { .. })) => (Role::Replica, None),
            Ok((_, ShardRole::Standalone)) => (Role::Standalone, None),
            Err(_) => continue, // no longer ours
        };
        let stats = node.db.stats(&shard.table, q.checksums).await?;
        shards.insert(
            shard.id().to_owned(),
            ShardStatus {
                role,
                applied_seq: stats.applied_seq,
                rows: stats.rows,
                checksum: stats.checksum,
                copy_id: stats.copy_id,
                cached: shard.rows_cached(),
                caught_up,
                hash: stats.hash,
                confirmed_seq: Some(shard.confirmed_seq()),
            },
        );
    }
    let protocol = crate::api::PROTOCOL_VERSION;
    let lease_token = Some(node.lease_token());
    let internal_auth = Some(node.config.internal_auth);
    Ok(Json(ServerStatus {
        server: node.name().to_owned(),
        protocol,
        epoch: node.epoch(),
        shards,
        lease_token,
        internal_auth,
    }))
}

/// `POST /v1/lease`: grants read leases to a ready replica, for the shards this server is the
/// primary of and lists the replica as ready for (see [`crate::replication`]).
#[tracing::instrument(level = "debug", skip_all, fields(replica = %req.replica))]
pub async fn lease(
    State(node): State<Arc<Node>>,
    Extension(Caller(caller)): Extension<Caller>,
    JsonBody(req): JsonBody<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    if req.replica.is_empty() {
        return Err(ApiError::bad_request("replica is empty"));
    }
    speaks_as(&caller, &req.replica, "replica")?;
    let mut granted = Vec::new();
    let mut confirmed = BTreeMap::new();
    let mut valid_ms = BTreeMap::new();
    for id in req.shards {
        // A shard we do not hold is simply not granted: the replica may follow a newer topology.
        let Ok((shard, _)) = node.shard(&id).await else { continue };
        if let Some(valid) = shard.grant_lease(&node, &req.replica) {
            valid_ms.insert(id.clone(), u64::try_from(valid.as_millis()).unwrap_or(u64::MAX));
            // A replica waiting for confirmations of what this primary holds gets them even
            // when nothing is written.
            if shard.unconfirmed() {
                shard.request_barrier(&node);
            }
            if let Some(c) = shard.confirmed(&node).await {
                confirmed.insert(id.clone(), c);
            }
            granted.push(id);
        }
    }
    Ok(Json(LeaseResponse { granted, confirmed, valid_ms }))
}

/// `POST /v1/primary_lease`: the operator lets this server serve reads as the primary of the
/// listed shards until the token's moment plus the lease (see `replication::lease`).
#[tracing::instrument(level = "debug", skip_all, fields(epoch = req.epoch))]
pub async fn primary_lease(
    State(node): State<Arc<Node>>,
    JsonBody(req): JsonBody<PrimaryLeaseRequest>,
) -> Result<Json<PrimaryLeaseResponse>, ApiError> {
    if req.lease_ms == 0 || req.lease_ms > MAX_PRIMARY_LEASE_MS {
        return Err(ApiError::bad_request(format!(
            "lease_ms must be 1 to {MAX_PRIMARY_LEASE_MS}, not {}",
            req.lease_ms
        )));
    }
    let Some(from) = node.token_instant(req.token) else {
        return Err(ApiError::Conflict {
            message: "the token names another start of this server, or a moment still to come; probe again".into(),
            keys: vec![],
        });
    };
    let mut granted = Vec::new();
    if node.epoch() >= req.epoch {
        let until = from + std::time::Duration::from_millis(req.lease_ms);
        for id in req.shards {
            if let Ok((shard, ShardRole::Primary { stale_copy: false, .. })) = node.shard(&id).await {
                shard.extend_primary_lease(until);
                granted.push(id);
            }
        }
    }
    Ok(Json(PrimaryLeaseResponse { granted, next_token: node.lease_token() }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.encode())
        .into_response()
}
