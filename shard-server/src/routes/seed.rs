//! The seed's data-server endpoints, with the seed's shapes (SEED-API.md). Writes go through the
//! same primary write path as our own endpoint, so replication and fencing apply to them too.

use super::{check_ops, check_readable};
use crate::api::{ConfigRequest, CopyRequest, KeyRange, Message, Op, SeedWriteResponse};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::node::Node;
use crate::schema::{Schema, check_ident};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;

type Obj = Map<String, Value>;

fn shard_field(body: &Obj) -> Result<&str, ApiError> {
    match body.get("shard") {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::bad_request("shard must be a string")),
        None => Err(ApiError::bad_request("shard is missing")),
    }
}

/// `POST /config`: creates the tables of the listed shards with the schema.
#[tracing::instrument(skip_all)]
pub async fn config(
    State(node): State<Arc<Node>>,
    JsonBody(req): JsonBody<ConfigRequest>,
) -> Result<Json<Message>, ApiError> {
    let schema = Schema::try_from(req.schema).map_err(|e| ApiError::bad_request(format!("schema: {e}")))?;
    if req.shards.is_empty() {
        return Err(ApiError::bad_request("shards is empty"));
    }
    for id in &req.shards {
        check_ident("shard", id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let topo = node.topology();
    for id in &req.shards {
        let in_topology =
            topo.as_ref().is_some_and(|t| t.shard(id).is_some_and(|s| s.replicas.contains_key(node.name())));
        node.open_shard(id, schema.clone(), !in_topology).await?;
    }
    let list: Vec<String> = req.shards.iter().map(|s| format!("{}:{s}", node.name())).collect();
    Ok(Json(Message::success(format!("{} configured", list.join(", ")))))
}

/// `GET /heartbeat`: 200 with an empty body.
pub async fn heartbeat() {}

/// `GET /copy`: every row of the listed shards, streamed (never materialised whole).
#[tracing::instrument(skip_all)]
pub async fn copy(State(node): State<Arc<Node>>, JsonBody(req): JsonBody<CopyRequest>) -> Result<Response, ApiError> {
    let mut shards = Vec::with_capacity(req.shards.len());
    for id in &req.shards {
        let (shard, role) = node.shard(id).await?;
        check_readable(id, &role)?;
        shards.push(shard);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    tokio::spawn(async move {
        let mut prefix = String::from("{");
        for shard in shards {
            prefix.push_str(&serde_json::to_string(shard.id()).expect("string serialises"));
            prefix.push_str(":[");
            if tx.send(std::mem::take(&mut prefix).into()).await.is_err() {
                return;
            }
            match node.db.stream_objects(&shard.table, &tx).await {
                Ok(true) => prefix.push_str("],"),
                Ok(false) => return,
                Err(e) => {
                    // The body is cut short, so the client sees invalid JSON rather than a partial copy.
                    tracing::error!(shard = shard.id(), error = %e, "copy failed mid-stream");
                    return;
                }
            }
        }
        prefix.push_str("\"status\":\"success\"}");
        let _ = tx.send(prefix.into()).await;
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, std::io::Error>));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

use futures::StreamExt as _;

/// `POST /read`: rows of one shard with keys in `[low, high]`, sorted by key.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn read(State(node): State<Arc<Node>>, JsonBody(body): JsonBody<Obj>) -> Result<Response, ApiError> {
    let id = shard_field(&body)?;
    let (shard, role) = node.shard(id).await?;
    check_readable(id, &role)?;
    let key_name = shard.table.schema.key_name();
    let range: KeyRange = match body.get(key_name) {
        None => {
            return Err(ApiError::bad_request(format!("{key_name} is missing; expected {{\"low\":..,\"high\":..}}")));
        }
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            ApiError::bad_request(format!("{key_name} must be {{\"low\": integer, \"high\": integer}}: {e}"))
        })?,
    };
    if range.low > range.high {
        return Err(ApiError::bad_request(format!("{key_name} low {} is greater than high {}", range.low, range.high)));
    }
    let rows = super::read_confirmed(&node, &shard, &role, &[(range.low, range.high)])
        .await?
        .pop()
        .ok_or_else(|| ApiError::Internal("no rows part for the one range read".into()))?;
    let body = format!("{{\"data\":{rows},\"status\":\"success\"}}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `POST /write`: adds rows to a shard this server is the primary of.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn write(
    State(node): State<Arc<Node>>,
    JsonBody(body): JsonBody<Obj>,
) -> Result<Json<SeedWriteResponse>, ApiError> {
    let id = shard_field(&body)?;
    let (shard, role) = node.shard(id).await?;
    let schema = &shard.table.schema;
    let curr_idx = match body.get("curr_idx") {
        None => 0,
        Some(v) => v.as_i64().ok_or_else(|| ApiError::bad_request("curr_idx must be an integer"))?,
    };
    let data = match body.get("data") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad_request("data must be a list of rows")),
        None => return Err(ApiError::bad_request("data is missing")),
    };
    let ops = data
        .iter()
        .enumerate()
        .map(|(i, v)| {
            schema
                .parse_row(v)
                .map(|row| Op::Insert { row })
                .map_err(|e| ApiError::bad_request(format!("data[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_ops(id, schema, &role, &ops)?;
    let n = ops.len() as i64;
    shard.submit(&node, ops, None, false).await?;
    Ok(Json(SeedWriteResponse {
        message: "Data entries added".into(),
        current_idx: curr_idx.saturating_add(n),
        status: "success".into(),
    }))
}

/// `PUT /update`: replaces the row at a key.
#[tracing::instrument(skip_all)]
pub async fn update(State(node): State<Arc<Node>>, JsonBody(body): JsonBody<Obj>) -> Result<Json<Message>, ApiError> {
    let id = shard_field(&body)?;
    let (shard, role) = node.shard(id).await?;
    let schema = &shard.table.schema;
    let key = schema.parse_key(body.get(schema.key_name())).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let row = body.get("data").ok_or_else(|| ApiError::bad_request("data is missing"))?;
    let row = schema.parse_row(row).map_err(|e| ApiError::bad_request(format!("data: {e}")))?;
    let ops = vec![Op::Update { key, row }];
    check_ops(id, schema, &role, &ops)?;
    shard.submit(&node, ops, None, false).await?;
    Ok(Json(Message::success(format!("Data entry for {}:{key} updated", schema.key_name()))))
}

/// `DELETE /del`: removes the row at a key.
#[tracing::instrument(skip_all)]
pub async fn del(State(node): State<Arc<Node>>, JsonBody(body): JsonBody<Obj>) -> Result<Json<Message>, ApiError> {
    let id = shard_field(&body)?;
    let (shard, role) = node.shard(id).await?;
    let schema = &shard.table.schema;
    let key = schema.parse_key(body.get(schema.key_name())).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ops = vec![Op::Delete { key }];
    check_ops(id, schema, &role, &ops)?;
    shard.submit(&node, ops, None, false).await?;
    Ok(Json(Message::success(format!("Data entry with {}:{key} removed", schema.key_name()))))
}
