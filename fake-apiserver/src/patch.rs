//! Patch semantics (pure): the four PATCH content types, the field-ownership bookkeeping behind
//! the server-side apply approximation, and dotted-path helpers for the `/scale` subresource.
//!
//! Server-side apply here: the applied object is deep-merged into the live one (maps merge key by
//! key, lists and scalars replace, `null` removes), and each field manager remembers the leaf
//! paths it applied last time, so a field it stops applying is removed unless another manager
//! applied it too. Lists are atomic (no merge keys) and there are no apply conflicts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::error::ApiError;

/// A field's location: object keys from the root.
pub(crate) type FieldPath = Vec<String>;

/// Field paths each manager last applied, per object.
pub(crate) type Owners = BTreeMap<String, BTreeSet<FieldPath>>;

/// The content type of a PATCH request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    /// `application/apply-patch+yaml`: server-side apply.
    Apply,
    /// `application/merge-patch+json` (RFC 7386); strategic merge is treated the same way.
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
}

impl PatchKind {
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/apply-patch+yaml" => Ok(Self::Apply),
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Applies a merge or JSON patch to `doc`. (Apply patches go through the store's own path.)
pub(crate) fn patch_document(mut doc: Value, kind: PatchKind, patch: &Value) -> Result<Value, ApiError> {
    match kind {
        PatchKind::Apply | PatchKind::Merge => json_patch::merge(&mut doc, patch),
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            for op in &ops.0 {
                // As on Kubernetes, `test` for null passes on a missing path (kube's finalizer
                // helper relies on it). Ops apply one by one; on error the caller drops `doc`.
                if let json_patch::PatchOperation::Test(test) = op
                    && test.value.is_null()
                    && doc.pointer(test.path.as_str()).is_none_or(Value::is_null)
                {
                    continue;
                }
                json_patch::patch(&mut doc, std::slice::from_ref(op))
                    .map_err(|e| ApiError::invalid(format!("JSON patch failed: {e}")))?;
            }
        }
    }
    Ok(doc)
}

/// The leaf paths an applied configuration sets. Maps are walked; lists, scalars and empty maps
/// are leaves. `apiVersion`, `kind` and the object's identity are not fields anyone owns.
pub(crate) fn leaf_paths(applied: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, child) in map {
                    prefix.push(k.clone());
                    walk(child, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                out.insert(prefix.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(applied, &mut Vec::new(), &mut out);
    out.retain(|p| {
        let p: Vec<&str> = p.iter().map(String::as_str).collect();
        !matches!(p.as_slice(), [] | ["apiVersion"] | ["kind"] | ["metadata", "name" | "namespace"])
    });
    out
}

/// Fields `manager` applied before but leaves out now (among those `in_scope`), which no other
/// manager applied: server-side apply removes them from the object.
pub(crate) fn released_fields(
    owners: &Owners,
    manager: &str,
    now: &BTreeSet<FieldPath>,
    in_scope: impl Fn(&FieldPath) -> bool,
) -> Vec<FieldPath> {
    let Some(before) = owners.get(manager) else { return Vec::new() };
    let claimed_elsewhere = |p: &FieldPath| {
        owners
            .iter()
            .filter(|(m, _)| *m != manager)
            .any(|(_, set)| set.iter().any(|q| p.starts_with(q) || q.starts_with(p)))
    };
    before.iter().filter(|p| in_scope(p) && !now.contains(*p) && !claimed_elsewhere(p)).cloned().collect()
}

/// Records what `manager` applied: its fields outside the scope stay, those inside are replaced.
pub(crate) fn record_fields(
    owners: &mut Owners,
    manager: &str,
    now: BTreeSet<FieldPath>,
    in_scope: impl Fn(&FieldPath) -> bool,
) {
    let set = owners.entry(manager.to_string()).or_default();
    set.retain(|p| !in_scope(p));
    set.extend(now);
}

/// Removes the field at `path`, and any map the removal leaves empty.
pub(crate) fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    let Some(map) = v.as_object_mut() else { return };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(child) = map.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(|m| m.is_empty()) {
            map.remove(first);
        }
    }
}

/// `.spec.replicas` → `["spec", "replicas"]`.
pub(crate) fn parse_json_path(path: &str) -> FieldPath {
    path.split('.').filter(|s| !s.is_empty()).map(String::from).collect()
}

pub(crate) fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Sets the field at `path`, creating (or replacing non-map values with) maps on the way.
pub(crate) fn set_path(v: &mut Value, path: &[String], new: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = new;
        return;
    };
    if !v.is_object() {
        *v = Value::Object(Default::default());
    }
    let child = v.as_object_mut().unwrap().entry(first.clone()).or_insert(Value::Null);
    set_path(child, rest, new);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> FieldPath {
        parse_json_path(s)
    }

    #[test]
    fn leaf_paths_stop_at_lists_and_skip_identity() {
        let applied = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"a": "1"}},
            "data": {"k": "v"}, "list": [1, 2], "empty": {}
        });
        let paths: Vec<FieldPath> = leaf_paths(&applied).into_iter().collect();
        assert_eq!(paths, vec![p("data.k"), p("empty"), p("list"), p("metadata.labels.a")]);
    }

    #[test]
    fn a_field_another_manager_applied_is_not_released() {
        let mut owners = Owners::new();
        record_fields(&mut owners, "a", [p("data.x"), p("data.y")].into(), |_| true);
        record_fields(&mut owners, "b", [p("data.y")].into(), |_| true);
        let released = released_fields(&owners, "a", &[p("data.z")].into(), |_| true);
        assert_eq!(released, vec![p("data.x")]);
    }

    #[test]
    fn remove_path_prunes_emptied_maps() {
        let mut v = json!({"metadata": {"labels": {"a": "1"}, "name": "x"}});
        remove_path(&mut v, &p("metadata.labels.a"));
        assert_eq!(v, json!({"metadata": {"name": "x"}}));
        remove_path(&mut v, &p("no.such.path"));
        assert_eq!(v, json!({"metadata": {"name": "x"}}));
    }

    #[test]
    fn set_path_creates_parents() {
        let mut v = json!({"spec": 3});
        set_path(&mut v, &p(".spec.replicas"), json!(5));
        assert_eq!(v, json!({"spec": {"replicas": 5}}));
    }

    #[test]
    fn json_patch_and_merge_patch() {
        let doc = json!({"a": {"b": 1, "c": 2}, "l": [1]});
        let merged =
            patch_document(doc.clone(), PatchKind::Merge, &json!({"a": {"b": null, "d": 3}, "l": [2]})).unwrap();
        assert_eq!(merged, json!({"a": {"c": 2, "d": 3}, "l": [2]}));
        let ops = json!([{"op": "replace", "path": "/a/b", "value": 9}, {"op": "add", "path": "/l/-", "value": 2}]);
        let patched = patch_document(doc.clone(), PatchKind::Json, &ops).unwrap();
        assert_eq!(patched, json!({"a": {"b": 9, "c": 2}, "l": [1, 2]}));
        let err =
            patch_document(doc.clone(), PatchKind::Json, &json!([{"op": "remove", "path": "/nope"}])).unwrap_err();
        assert_eq!(err.code, 422);
        let guarded = json!([{"op": "test", "path": "/f", "value": null}, {"op": "add", "path": "/f", "value": ["x"]}]);
        assert_eq!(patch_document(doc.clone(), PatchKind::Json, &guarded).unwrap()["f"], json!(["x"]));
        let failing = json!([{"op": "test", "path": "/a/b", "value": null}]);
        assert_eq!(patch_document(doc, PatchKind::Json, &failing).unwrap_err().code, 422);
    }
}
