//! `GET /status` (the seed's configuration view, plus epoch, primaries and replica states),
//! `/healthz`, `/readyz` and `/metrics`. Reads the routing table only; the body builder is pure.

use crate::app_state::AppState;
use crate::error::RouterError;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::json;
use shard_server::schema::SchemaSpec;
use shard_server::topology::{ReplicaState, ShardEntry, Topology};
use std::collections::BTreeMap;

/// The `/status` answer:
/// `{"N":..,"schema":{..},"shards":[{"<key>_low":..,"Shard_id":..,"Shard_size":..,"primary":..,
/// "replicas":{..}}],"servers":{"Server0":["sh1",..]},"epoch":..}`.
#[derive(Debug, serde::Serialize)]
pub struct StatusBody<'a> {
    #[serde(rename = "N")]
    pub n: usize,
    pub schema: &'a SchemaSpec,
    /// Ordered by low key.
    pub shards: Vec<ShardView<'a>>,
    /// Every server with the shards it holds (any replica state), in key order.
    pub servers: BTreeMap<&'a str, Vec<&'a str>>,
    pub epoch: u64,
}

/// One shard in the seed's field names; the low-key field is named after the key column.
#[derive(Debug)]
pub struct ShardView<'a> {
    low_field: String,
    entry: &'a ShardEntry,
}

impl Serialize for ShardView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry(&self.low_field, &e.low)?;
        m.serialize_entry("Shard_id", &e.id)?;
        m.serialize_entry("Shard_size", &e.size)?;
        m.serialize_entry("primary", &e.primary)?;
        m.serialize_entry::<_, BTreeMap<String, ReplicaState>>("replicas", &e.replicas)?;
        m.end()
    }
}

pub fn status_body<'a>(topology: &'a Topology, key_name: &str) -> StatusBody<'a> {
    let low_field = format!("{key_name}_low");
    let mut servers: BTreeMap<&str, Vec<&str>> = topology.servers.keys().map(|s| (s.as_str(), Vec::new())).collect();
    for sh in &topology.shards {
        for server in sh.replicas.keys() {
            servers.entry(server.as_str()).or_default().push(sh.id.as_str());
        }
    }
    StatusBody {
        n: topology.servers.len(),
        schema: &topology.schema,
        shards: topology.shards.iter().map(|entry| ShardView { low_field: low_field.clone(), entry }).collect(),
        servers,
        epoch: topology.epoch,
    }
}

/// Before the first topology (a local mode waiting for `/init`), the seed's answer: an empty
/// configuration, 200.
#[tracing::instrument(skip_all)]
pub async fn status(State(state): State<AppState>) -> Response {
    match state.table().current() {
        Some(routing) => Json(status_body(&routing.topology, routing.schema.key_name())).into_response(),
        None => Json(json!({"N": 0, "schema": {"columns": [], "dtypes": []}, "shards": [], "servers": {}, "epoch": 0}))
            .into_response(),
    }
}

/// Liveness: the process serves HTTP. Also says which topology epoch it routes with.
pub async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let epoch = state.table().current().map(|r| r.epoch());
    Json(json!({"status": "success", "epoch": epoch}))
}

/// `GET /metrics`: the Prometheus exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::response(state.metrics())
}

/// Readiness: a topology is loaded, so data endpoints can answer.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, RouterError> {
    let routing = state.routing()?;
    Ok(Json(json!({"status": "success", "epoch": routing.epoch()})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::topology;

    #[test]
    fn status_has_the_seed_shape_plus_epoch_primaries_and_states() {
        let t = topology(9);
        let v = serde_json::to_value(status_body(&t, "Stud_id")).unwrap();
        assert_eq!(
            v,
            json!({
                "N": 3,
                "schema": {"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"]},
                "shards": [
                    {"Stud_id_low": 0, "Shard_id": "sh1", "Shard_size": 4096, "primary": "Server0",
                     "replicas": {"Server0": "ready", "Server1": "ready", "Server2": "recovering"}},
                    {"Stud_id_low": 4096, "Shard_id": "sh2", "Shard_size": 4096, "primary": "Server1",
                     "replicas": {"Server0": "ready", "Server1": "ready", "Server2": "leaving"}},
                    {"Stud_id_low": 10000, "Shard_id": "sh3", "Shard_size": 100, "primary": "Server2",
                     "replicas": {"Server2": "ready"}}
                ],
                "servers": {"Server0": ["sh1", "sh2"], "Server1": ["sh1", "sh2"], "Server2": ["sh1", "sh2", "sh3"]},
                "epoch": 9
            })
        );
    }

    #[test]
    fn the_low_field_follows_the_key_column_and_field_order_is_the_seeds() {
        let t = topology(1);
        let text = serde_json::to_string(&status_body(&t, "id")).unwrap();
        assert!(text.contains(r#"{"id_low":0,"Shard_id":"sh1","Shard_size":4096,"primary":"Server0","#), "{text}");
        assert!(!text.contains("Stud_id_low"));
    }
}
