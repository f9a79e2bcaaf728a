//! Deletion on the store (no I/O): finalizers hold an object with a `deletionTimestamp`, and
//! removing an object garbage-collects what it owned, at once and recursively.

use serde_json::{Value, json};

use super::{ChangeKind, ObjKey, Store, meta_mut, meta_str, now};
use crate::error::ApiError;
use crate::registry::ResourceType;

/// What a DELETE asked for besides the object.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOptions {
    /// `propagationPolicy=Orphan`: dependents lose their owner reference instead of being deleted.
    pub orphan: bool,
    pub resource_version: Option<String>,
    pub uid: Option<String>,
}

impl Store {
    /// DELETE: removes the object, or only marks it while finalizers remain.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(rt, namespace, name);
        let obj = self.objects.get(&key).ok_or_else(|| ApiError::not_found(rt, name))?;
        let stale = |want: &Option<String>, field| want.as_deref().is_some_and(|w| Some(w) != meta_str(obj, field));
        if stale(&opts.resource_version, "resourceVersion") || stale(&opts.uid, "uid") {
            return Err(ApiError::conflict(rt, name));
        }
        if opts.orphan
            && let Some(uid) = meta_str(obj, "uid").map(String::from)
        {
            self.orphan_dependents(&uid);
        }
        Ok(self.delete_key(&key))
    }

    /// Deletes now, or sets `deletionTimestamp` once if finalizers hold the object.
    fn delete_key(&mut self, key: &ObjKey) -> Value {
        let obj = self.objects.get(key).cloned().unwrap(); // callers found it
        if !has_finalizers(&obj) {
            return self.remove_now(key);
        }
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return obj;
        }
        let mut marked = obj.clone();
        let meta = meta_mut(&mut marked);
        meta.insert("deletionTimestamp".into(), json!(now()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        self.put(key.clone(), marked, ChangeKind::Modified, Some(obj))
    }

    /// Removes the object, then garbage-collects what it owned.
    pub(super) fn remove_now(&mut self, key: &ObjKey) -> Value {
        let mut obj = self.objects.remove(key).unwrap(); // callers found it
        self.owners.remove(key);
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(ChangeKind::Deleted, key.clone(), obj.clone(), None);
        if let Some(uid) = meta_str(&obj, "uid") {
            self.collect_garbage(uid);
        }
        obj
    }

    /// Background garbage collection, done at once: every object owned by `owner_uid` whose
    /// other owners (if any) are gone too is deleted, recursively.
    fn collect_garbage(&mut self, owner_uid: &str) {
        let dependents: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, o)| owner_uids(o).any(|u| u == owner_uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let Some(obj) = self.objects.get(&key) else { continue }; // removed by an earlier cascade
            let owned_elsewhere = owner_uids(obj).filter(|u| *u != owner_uid).any(|u| self.uid_exists(u));
            if !owned_elsewhere {
                self.delete_key(&key);
            }
        }
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        let dependents: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, o)| owner_uids(o).any(|u| u == owner_uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let old = self.objects[&key].clone();
            let mut new = old.clone();
            let meta = meta_mut(&mut new);
            if let Some(Value::Array(refs)) = meta.get_mut("ownerReferences") {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
                if refs.is_empty() {
                    meta.remove("ownerReferences");
                }
            }
            self.put(key, new, ChangeKind::Modified, Some(old));
        }
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects.values().any(|o| meta_str(o, "uid") == Some(uid))
    }
}

pub(super) fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty())
}

fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str))
}
