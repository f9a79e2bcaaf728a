//! Server-side apply on the store (no I/O): the applied object is merged into the live one and
//! each field manager's previously applied fields are tracked, as the `patch` module describes.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{ObjKey, Store, Sub, check_body, meta_mut, meta_str};
use crate::error::ApiError;
use crate::patch::{self, FieldPath};
use crate::registry::ResourceType;

/// The fields server-side apply manages in one call: all of them, or one side of the status
/// subresource boundary.
#[derive(Clone, Copy)]
enum Scope {
    All,
    StatusOnly,
    NotStatus,
}

impl Scope {
    fn contains(self, path: &FieldPath) -> bool {
        let status = path.first().is_some_and(|f| f == "status");
        match self {
            Scope::All => true,
            Scope::StatusOnly => status,
            Scope::NotStatus => !status,
        }
    }
}

impl Store {
    /// Server-side apply (see the `patch` module for how it approximates the real thing).
    pub(super) fn apply(
        &mut self,
        rt: &ResourceType,
        key: ObjKey,
        mut applied: Value,
        sub: Sub,
        manager: Option<&str>,
    ) -> Result<(Value, bool), ApiError> {
        let manager = manager
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::bad_request("fieldManager is required for apply patch"))?;
        check_body(rt, &applied)?;
        if applied.get("apiVersion").is_none() || applied.get("kind").is_none() {
            return Err(ApiError::bad_request("apiVersion and kind must be set in an apply patch"));
        }
        if let Some(name) = meta_str(&applied, "name").filter(|n| !n.is_empty() && *n != key.name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        let meta = meta_mut(&mut applied);
        meta.insert("name".into(), json!(key.name));
        let precondition = meta.remove("resourceVersion").and_then(|v| v.as_str().map(String::from));
        for field in ["managedFields", "selfLink", "uid", "creationTimestamp", "generation", "deletionTimestamp"] {
            meta.remove(field);
        }
        let scope = match sub {
            Sub::Status => Scope::StatusOnly,
            _ if rt.status => Scope::NotStatus,
            _ => Scope::All,
        };
        let map = applied.as_object_mut().unwrap(); // check_body: a map
        match scope {
            Scope::StatusOnly => map.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")),
            Scope::NotStatus => drop(map.remove("status")),
            Scope::All => {}
        }
        let fields: BTreeSet<FieldPath> =
            patch::leaf_paths(&applied).into_iter().filter(|p| scope.contains(p)).collect();

        let Some(old) = self.objects.get(&key).cloned() else {
            if sub != Sub::Main {
                return Err(ApiError::not_found(rt, &key.name));
            }
            let created = self.create(rt, &key.namespace, applied, false)?;
            patch::record_fields(self.owners.entry(key).or_default(), manager, fields, |p| scope.contains(p));
            return Ok((created, true));
        };
        let mut candidate = old.clone();
        if let Some(owners) = self.owners.get(&key) {
            for path in patch::released_fields(owners, manager, &fields, |p| scope.contains(p)) {
                patch::remove_path(&mut candidate, &path);
            }
        }
        json_patch::merge(&mut candidate, &applied);
        if let Some(rv) = precondition.filter(|rv| !rv.is_empty()) {
            meta_mut(&mut candidate).insert("resourceVersion".into(), json!(rv));
        }
        let result = self.write_update(rt, &key, old, candidate, sub)?;
        if self.objects.contains_key(&key) {
            patch::record_fields(self.owners.entry(key).or_default(), manager, fields, |p| scope.contains(p));
        }
        Ok(result)
    }
}
