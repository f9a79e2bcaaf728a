//! The object store (no I/O): objects as JSON keyed by group/resource/namespace/name, the global
//! resourceVersion, the change history that watches resume from, and the API server's write
//! rules — metadata bookkeeping, optimistic concurrency, the status and scale subresources,
//! server-side apply, finalizers and owner-reference garbage collection.

mod apply;
mod defaults;
mod delete;
mod scale;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::patch::{self, Owners, PatchKind};
use crate::registry::{Registry, ResourceType};

pub(crate) use delete::DeleteOptions;
use delete::has_finalizers;
pub(crate) use scale::scale_of;

/// Changes kept for resuming watches; a watch from an older resourceVersion gets 410 Gone.
const HISTORY_LIMIT: usize = 10_000;
/// Changes a slow watch may fall behind by before it is told to relist.
const BROADCAST_CAPACITY: usize = 4096;
/// Metadata only the server writes: kept from the stored object on every update.
const SERVER_FIELDS: [&str; 8] = [
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Where an object lives. Versions of one group/resource share storage.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjKey {
    pub group: String,
    pub plural: String,
    /// Empty for cluster-scoped resources.
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(rt: &ResourceType, namespace: &str, name: &str) -> Self {
        let namespace = if rt.namespaced { namespace } else { "" };
        Self { group: rt.group.clone(), plural: rt.plural.clone(), namespace: namespace.into(), name: name.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change, as watches see it. Every change has its own resourceVersion.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: ChangeKind,
    pub key: ObjKey,
    pub object: Value,
    /// The object before a modification, so a filtered watch can tell an object entering its
    /// selection (ADDED) or leaving it (DELETED).
    pub previous: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    /// The object itself; `.status` is kept from the stored object if the type has a status
    /// subresource.
    Main,
    /// `/status`: only `.status` changes.
    Status,
    /// `/scale`: only the replicas field changes.
    Scale,
    /// A test writing through the handle: like `Main`, but `.status` is taken as given.
    Direct,
}

pub(crate) struct Store {
    pub registry: Registry,
    objects: BTreeMap<ObjKey, Value>,
    /// Server-side apply field ownership, per object.
    owners: HashMap<ObjKey, Owners>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    /// The newest resourceVersion no longer in `history`; watches must start at or after it.
    compacted: u64,
    events: broadcast::Sender<Arc<Change>>,
    /// State of the generator behind uids and `generateName` suffixes.
    seed: u64,
}

impl Store {
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Self {
            registry: Registry::builtin(),
            objects: BTreeMap::new(),
            owners: HashMap::new(),
            rv: 1,
            history: VecDeque::new(),
            compacted: 1,
            events: broadcast::channel(BROADCAST_CAPACITY).0,
            seed,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Live changes from now on. Take it under the same lock as any snapshot it continues.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.events.subscribe()
    }

    /// The changes after `rv`, or 410 Gone if some of them are no longer kept.
    pub fn changes_after(&self, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::gone(format!("too old resource version: {rv} ({})", self.compacted)));
        }
        Ok(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// Forgets the change history, so that every watch resumed from before now gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<&Value, ApiError> {
        self.objects.get(&ObjKey::new(rt, namespace, name)).ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Objects of one resource, in one namespace or all, ordered by namespace and name.
    pub fn list<'a>(
        &'a self,
        rt: &'a ResourceType,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |(k, _)| {
                k.group == rt.group && k.plural == rt.plural && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v)
    }

    /// POST: a new object. `direct` (a test's own write) keeps the given `.status`.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut obj: Value,
        direct: bool,
    ) -> Result<Value, ApiError> {
        check_body(rt, &obj)?;
        let given_ns = meta_str(&obj, "namespace").filter(|ns| !ns.is_empty());
        if rt.namespaced && given_ns.is_some_and(|ns| ns != namespace) {
            return Err(ApiError::bad_request(
                "the namespace of the object does not match the namespace on the request",
            ));
        }
        let name = match (meta_str(&obj, "name").filter(|n| !n.is_empty()), meta_str(&obj, "generateName")) {
            (Some(name), _) => name.to_string(),
            (None, Some(prefix)) if !prefix.is_empty() => {
                let prefix = prefix.to_string();
                loop {
                    let name = format!("{prefix}{}", self.name_suffix());
                    if !self.objects.contains_key(&ObjKey::new(rt, namespace, &name)) {
                        break name;
                    }
                }
            }
            _ => return Err(ApiError::invalid("metadata.name: Required value: name or generateName is required")),
        };
        if name.contains('/') || name == "." || name == ".." {
            return Err(ApiError::invalid(format!("metadata.name: Invalid value: {name:?}")));
        }
        let key = ObjKey::new(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        let uid = self.new_uid();
        let meta = meta_mut(&mut obj);
        if rt.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        for field in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"]
        {
            meta.remove(field);
        }
        drop_empty_finalizers(meta);
        let map = obj.as_object_mut().unwrap(); // check_body: a map
        map.insert("apiVersion".into(), json!(rt.api_version()));
        map.insert("kind".into(), json!(rt.kind));
        if rt.status && !direct {
            map.remove("status");
        }
        self.server_side_defaults(rt, &mut obj);
        Ok(self.put(key, obj, ChangeKind::Added, None))
    }

    /// PUT: replaces the object (or its status or scale). Returns the result and whether
    /// anything changed.
    pub fn replace(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        body: Value,
        sub: Sub,
    ) -> Result<(Value, bool), ApiError> {
        let key = ObjKey::new(rt, namespace, name);
        let old = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
        if sub == Sub::Scale {
            return self.write_scale(rt, &key, old, &body);
        }
        self.write_update(rt, &key, old, body, sub)
    }

    /// PATCH of any content type. Server-side apply creates the object if it is absent.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        body: Value,
        sub: Sub,
        manager: Option<&str>,
    ) -> Result<(Value, bool), ApiError> {
        let key = ObjKey::new(rt, namespace, name);
        if kind == PatchKind::Apply && sub != Sub::Scale {
            return self.apply(rt, key, body, sub, manager);
        }
        let old = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
        if sub == Sub::Scale {
            let paths = rt.scale.as_ref().ok_or_else(ApiError::no_route)?;
            let scale = patch::patch_document(scale_of(paths, &old), kind, &body)?;
            return self.write_scale(rt, &key, old, &scale);
        }
        let candidate = patch::patch_document(old.clone(), kind, &body)?;
        self.write_update(rt, &key, old, candidate, sub)
    }

    /// A test's own write: creates or replaces the object named by its apiVersion, kind,
    /// namespace (default `default`) and name, status included, with no concurrency check.
    pub fn upsert(&mut self, mut obj: Value) -> Result<Value, ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let rt = self
            .registry
            .by_api_version_kind(api_version, kind)
            .cloned()
            .ok_or_else(|| ApiError::bad_request(format!("no resource is registered for {api_version} {kind}")))?;
        let namespace = meta_str(&obj, "namespace").unwrap_or("default").to_string();
        let key = ObjKey::new(&rt, &namespace, meta_str(&obj, "name").unwrap_or_default());
        match self.objects.get(&key).cloned() {
            None => self.create(&rt, &namespace, obj, true),
            Some(old) => {
                meta_mut(&mut obj).remove("resourceVersion");
                self.write_update(&rt, &key, old, obj, Sub::Direct).map(|(v, _)| v)
            }
        }
    }

    /// The common tail of every update: optimistic concurrency, server-owned fields, the status
    /// boundary, generation, and no new resourceVersion (nor watch event) unless the content
    /// changed. Removes the object if it was being deleted and lost its last finalizer.
    fn write_update(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        old: Value,
        candidate: Value,
        sub: Sub,
    ) -> Result<(Value, bool), ApiError> {
        check_body(rt, &candidate)?;
        if meta_str(&candidate, "resourceVersion")
            .is_some_and(|rv| !rv.is_empty() && Some(rv) != meta_str(&old, "resourceVersion"))
        {
            return Err(ApiError::conflict(rt, &key.name));
        }
        if let Some(name) = meta_str(&candidate, "name").filter(|n| !n.is_empty() && *n != key.name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        let mut new = if sub == Sub::Status {
            let mut new = old.clone();
            set_or_remove(new.as_object_mut().unwrap(), "status", candidate.get("status"));
            new
        } else {
            let mut new = candidate;
            let old_meta = old.get("metadata");
            let meta = meta_mut(&mut new);
            for field in SERVER_FIELDS {
                set_or_remove(meta, field, old_meta.and_then(|m| m.get(field)));
            }
            meta.remove("managedFields");
            meta.remove("selfLink");
            let map = new.as_object_mut().unwrap(); // check_body: a map
            set_or_remove(map, "apiVersion", old.get("apiVersion"));
            set_or_remove(map, "kind", old.get("kind"));
            if rt.status && sub != Sub::Direct {
                set_or_remove(map, "status", old.get("status"));
            }
            new
        };
        drop_empty_finalizers(meta_mut(&mut new));
        self.server_side_defaults(rt, &mut new);
        if !same_spec(&old, &new) {
            let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        if new == old {
            return Ok((old, false));
        }
        let new = self.put(key.clone(), new, ChangeKind::Modified, Some(old));
        if new.pointer("/metadata/deletionTimestamp").is_some() && !has_finalizers(&new) {
            return Ok((self.remove_now(key), true));
        }
        Ok((new, true))
    }

    /// Commits `obj` under a new resourceVersion and tells the watches.
    fn put(&mut self, key: ObjKey, mut obj: Value, kind: ChangeKind, previous: Option<Value>) -> Value {
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(key.clone(), obj.clone());
        self.record(kind, key, obj.clone(), previous);
        obj
    }

    fn record(&mut self, kind: ChangeKind, key: ObjKey, object: Value, previous: Option<Value>) {
        let change = Arc::new(Change { rv: self.rv, kind, key, object, previous });
        if self.history.len() == HISTORY_LIMIT
            && let Some(oldest) = self.history.pop_front()
        {
            self.compacted = oldest.rv;
        }
        self.history.push_back(change.clone());
        // An error only means no watch is open.
        let _ = self.events.send(change);
    }

    /// splitmix64: unique enough for uids and name suffixes in tests, and needs no extra crate.
    fn next_random(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn new_uid(&mut self) -> String {
        let (a, b) = (self.next_random(), self.next_random());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// Five characters from the alphabet Kubernetes uses for `generateName`.
    fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }
}

fn check_body(rt: &ResourceType, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    let mismatch = |field: &str, want: &str| body.get(field).is_some_and(|v| v.as_str() != Some(want));
    if mismatch("kind", &rt.kind) || mismatch("apiVersion", &rt.api_version()) {
        return Err(ApiError::bad_request(format!(
            "the object's apiVersion and kind do not match {} {}",
            rt.api_version(),
            rt.kind
        )));
    }
    Ok(())
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The object's `metadata` map, made a map if missing or of another type. `obj` is a map.
fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let map = obj.as_object_mut().unwrap(); // callers pass maps only
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().unwrap()
}

fn set_or_remove(map: &mut Map<String, Value>, field: &str, value: Option<&Value>) {
    match value {
        Some(v) => map.insert(field.into(), v.clone()),
        None => map.remove(field),
    };
}

fn drop_empty_finalizers(meta: &mut Map<String, Value>) {
    if meta.get("finalizers").is_some_and(|f| f.as_array().is_none_or(Vec::is_empty)) {
        meta.remove("finalizers");
    }
}

/// Whether two versions differ only in metadata and status, i.e. keep the same generation.
fn same_spec(a: &Value, b: &Value) -> bool {
    let spec = |v: &Value| -> Map<String, Value> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| *k != "metadata" && *k != "status")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    spec(a) == spec(b)
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str, data: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": data })
    }

    fn configmaps(store: &Store) -> ResourceType {
        store.registry.find("", "v1", "configmaps").unwrap().clone()
    }

    #[test]
    fn apply_removes_fields_its_manager_stopped_applying() {
        let mut store = Store::new();
        let rt = configmaps(&store);
        let first = json!({ "a": "1", "b": "2" });
        store.patch(&rt, "ns", "x", PatchKind::Apply, cm("x", first), Sub::Main, Some("m")).unwrap();
        store.patch(&rt, "ns", "x", PatchKind::Merge, json!({ "data": { "c": "3" } }), Sub::Main, None).unwrap();
        let (obj, changed) =
            store.patch(&rt, "ns", "x", PatchKind::Apply, cm("x", json!({ "a": "1" })), Sub::Main, Some("m")).unwrap();
        assert!(changed);
        assert_eq!(obj["data"], json!({ "a": "1", "c": "3" }));
        let (_, changed) =
            store.patch(&rt, "ns", "x", PatchKind::Apply, cm("x", json!({ "a": "1" })), Sub::Main, Some("m")).unwrap();
        assert!(!changed);
    }

    #[test]
    fn generation_moves_with_spec_only() {
        let mut store = Store::new();
        let rt = configmaps(&store);
        store.create(&rt, "ns", cm("x", json!({ "a": "1" })), false).unwrap();
        let labels = json!({ "metadata": { "labels": { "l": "v" } } });
        let (obj, _) = store.patch(&rt, "ns", "x", PatchKind::Merge, labels, Sub::Main, None).unwrap();
        assert_eq!(obj["metadata"]["generation"], json!(1));
        let (obj, _) =
            store.patch(&rt, "ns", "x", PatchKind::Merge, json!({ "data": { "a": "2" } }), Sub::Main, None).unwrap();
        assert_eq!(obj["metadata"]["generation"], json!(2));
    }

    #[test]
    fn finalizers_hold_deletion_until_cleared_and_gc_follows() {
        let mut store = Store::new();
        let rt = configmaps(&store);
        let mut parent = cm("parent", json!({}));
        parent["metadata"]["finalizers"] = json!(["test/hold"]);
        let parent = store.create(&rt, "ns", parent, false).unwrap();
        let mut child = cm("child", json!({}));
        child["metadata"]["ownerReferences"] =
            json!([{ "apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent["metadata"]["uid"] }]);
        store.create(&rt, "ns", child, false).unwrap();

        let marked = store.delete(&rt, "ns", "parent", &DeleteOptions::default()).unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(store.get(&rt, "ns", "child").is_ok(), "the owner still exists");

        let clear = json!({ "metadata": { "finalizers": null } });
        store.patch(&rt, "ns", "parent", PatchKind::Merge, clear, Sub::Main, None).unwrap();
        assert!(store.get(&rt, "ns", "parent").is_err());
        assert!(store.get(&rt, "ns", "child").is_err(), "garbage-collected with its owner");
    }

    #[test]
    fn history_serves_resumes_until_compacted() {
        let mut store = Store::new();
        let rt = configmaps(&store);
        let start = store.resource_version();
        store.create(&rt, "ns", cm("x", json!({})), false).unwrap();
        assert_eq!(store.changes_after(start).unwrap().len(), 1);
        store.compact();
        assert_eq!(store.changes_after(start).unwrap_err().code, 410);
        assert!(store.changes_after(store.resource_version()).unwrap().is_empty());
    }
}
