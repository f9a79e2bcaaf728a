//! The `/scale` subresource (no I/O): a `Scale` view of an object and writes of its replicas,
//! through the JSON paths the resource type was registered with.

use serde_json::{Map, Value, json};

use super::{ObjKey, Store, Sub, meta_mut};
use crate::error::ApiError;
use crate::patch;
use crate::registry::{ResourceType, ScalePaths};

impl Store {
    /// Sets the replicas a `Scale` object asks for, honouring its resourceVersion.
    pub(super) fn write_scale(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        old: Value,
        scale: &Value,
    ) -> Result<(Value, bool), ApiError> {
        let paths = rt.scale.as_ref().ok_or_else(ApiError::no_route)?;
        let replicas = scale
            .pointer("/spec/replicas")
            .filter(|r| r.as_i64().is_some_and(|n| (0..=i64::from(i32::MAX)).contains(&n)))
            .cloned()
            .ok_or_else(|| ApiError::invalid("spec.replicas: Invalid value: must be a non-negative integer"))?;
        let mut candidate = old.clone();
        patch::set_path(&mut candidate, &patch::parse_json_path(&paths.spec_replicas), replicas);
        if let Some(rv) = scale.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|rv| !rv.is_empty())
        {
            meta_mut(&mut candidate).insert("resourceVersion".into(), json!(rv));
        }
        let (obj, changed) = self.write_update(rt, key, old, candidate, Sub::Main)?;
        Ok((scale_of(paths, &obj), changed))
    }
}

/// The `autoscaling/v1` `Scale` view of an object.
pub(crate) fn scale_of(paths: &ScalePaths, obj: &Value) -> Value {
    let read = |path: &str| patch::get_path(obj, &patch::parse_json_path(path)).cloned();
    let mut metadata = Map::new();
    for field in ["name", "namespace", "uid", "resourceVersion", "creationTimestamp"] {
        if let Some(v) = obj.get("metadata").and_then(|m| m.get(field)) {
            metadata.insert(field.into(), v.clone());
        }
    }
    let mut status = json!({ "replicas": read(&paths.status_replicas).unwrap_or(json!(0)) });
    if let Some(selector) = paths.label_selector.as_deref().and_then(read).filter(Value::is_string) {
        status["selector"] = selector;
    }
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": metadata,
        "spec": { "replicas": read(&paths.spec_replicas).unwrap_or(json!(0)) },
        "status": status,
    })
}
