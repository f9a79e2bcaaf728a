//! The HTTP face of the fake (does I/O): parses Kubernetes REST paths, serves discovery,
//! applies injected failures, runs each request against the store under its lock and logs
//! writes. Watches are handed to the `watch` module.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Shared;
use crate::audit::{Verb, WriteRecord};
use crate::error::ApiError;
use crate::patch::PatchKind;
use crate::registry::ResourceType;
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{DeleteOptions, Sub, scale_of};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// A request for objects: `/api/v1/...` or `/apis/{group}/{version}/...`.
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Objects(Target),
}

fn parse_path(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "readyz" | "livez"] => return Some(Route::Health),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", group] => return Some(Route::Group(group.to_string())),
        ["api", version] => return Some(Route::Resources(String::new(), version.to_string())),
        ["apis", group, version] => return Some(Route::Resources(group.to_string(), version.to_string())),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (Some(namespace.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some(name.to_string()), None),
        [plural, name, sub] => (plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Route::Objects(Target {
        group: group.into(),
        version: version.into(),
        namespace,
        plural: plural.to_string(),
        name,
        subresource,
    }))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match route(&shared, &method, &uri, &headers, &body) {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let route = parse_path(uri.path()).ok_or_else(ApiError::no_route)?;
    if !matches!(route, Route::Objects(_)) && method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    let state = shared.lock();
    let registry = &state.store.registry;
    let doc = match route {
        Route::Version => version_info(),
        Route::Health => return Ok("ok".into_response()),
        Route::CoreVersions => registry.core_versions(),
        Route::Groups => registry.groups(),
        Route::Group(group) => registry.group(&group).ok_or_else(ApiError::no_route)?,
        Route::Resources(group, version) => registry.resource_list(&group, &version).ok_or_else(ApiError::no_route)?,
        Route::Objects(target) => {
            drop(state);
            return objects(shared, method, uri, headers, body, target);
        }
    };
    Ok(axum::Json(doc).into_response())
}

fn version_info() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
    })
}

/// A request for objects: find the type and verb, apply injected failures, run it, log it.
fn objects(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    target: Target,
) -> Result<Response, ApiError> {
    let query: HashMap<String, String> =
        Query::try_from_uri(uri).map(|Query(q)| q).map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let is_true = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, false) if is_true("watch") => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::GET, true) => Verb::Get,
        (&Method::POST, false) => Verb::Create,
        // The one subresource created by name: a pod's eviction.
        (&Method::POST, true) if target.subresource.as_deref() == Some("eviction") => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        (&Method::DELETE, false) => Verb::DeleteCollection,
        _ => return Err(ApiError::method_not_allowed()),
    };
    let mut state = shared.lock();
    let rt = state
        .store
        .registry
        .find(&target.group, &target.version, &target.plural)
        .cloned()
        .ok_or_else(ApiError::no_route)?;
    let all_namespaces = rt.namespaced && target.namespace.is_none();
    if (target.namespace.is_some() && !rt.namespaced) || (all_namespaces && !matches!(verb, Verb::List | Verb::Watch)) {
        return Err(ApiError::no_route());
    }
    let eviction = target.subresource.as_deref() == Some("eviction");
    if eviction && (rt.plural != "pods" || verb != Verb::Create) {
        return Err(ApiError::no_route());
    }
    let sub = match target.subresource.as_deref() {
        None | Some("eviction") => Sub::Main,
        Some("status") if rt.status => Sub::Status,
        Some("scale") if rt.scale.is_some() => Sub::Scale,
        Some(_) => return Err(ApiError::no_route()),
    };
    if sub != Sub::Main && !matches!(verb, Verb::Get | Verb::Update | Verb::Patch) {
        return Err(ApiError::method_not_allowed());
    }
    let mut record = WriteRecord {
        verb,
        group: rt.group.clone(),
        resource: rt.plural.clone(),
        subresource: target.subresource.clone(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        field_manager: query.get("fieldManager").cloned(),
        code: 0,
        changed: false,
    };
    let injected = state.audit.take_failure(verb, &rt.plural, target.subresource.as_deref(), target.name.as_deref());
    let outcome = match injected {
        Some(err) => Err(err),
        // An eviction deletes the pod at once; PodDisruptionBudgets are not consulted.
        None if eviction => {
            let (namespace, name) =
                (target.namespace.as_deref().unwrap_or_default(), target.name.as_deref().unwrap_or_default());
            state.store.delete(&rt, namespace, name, &delete_options(&query, &Bytes::new())?).map(|_| {
                let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201});
                (StatusCode::CREATED, status, true)
            })
        }
        None if verb == Verb::Watch => {
            drop(state);
            return crate::watch::watch(shared, rt, target.namespace, &query, metadata_only(headers));
        }
        None => execute(&mut state.store, &rt, &target, verb, sub, &query, headers, body),
    };
    if verb.is_write() {
        record.code = outcome.as_ref().map_or_else(|e| e.code, |(code, _, _)| code.as_u16());
        record.changed = outcome.as_ref().is_ok_and(|(_, _, changed)| *changed);
        state.audit.writes.push(record);
    }
    let (code, doc, _) = outcome?;
    let doc = match (sub, verb) {
        (Sub::Scale, _) => doc,
        _ if eviction => doc,
        (_, Verb::List | Verb::DeleteCollection) => present_list(&rt, doc, metadata_only(headers)),
        _ => present(&rt, &doc, metadata_only(headers)),
    };
    Ok((code, axum::Json(doc)).into_response())
}

/// Runs one non-watch request: the response code, body, and whether state changed.
#[allow(clippy::too_many_arguments)]
fn execute(
    store: &mut crate::store::Store,
    rt: &ResourceType,
    target: &Target,
    verb: Verb,
    sub: Sub,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(StatusCode, Value, bool), ApiError> {
    if verb.is_write() && query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad_request("dryRun is not supported by the fake API server"));
    }
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let name = target.name.as_deref().unwrap_or_default();
    let ok = |(obj, changed): (Value, bool)| (StatusCode::OK, obj, changed);
    match verb {
        Verb::Get => {
            let obj = store.get(rt, namespace, name)?;
            let doc = match (sub, &rt.scale) {
                (Sub::Scale, Some(paths)) => scale_of(paths, obj),
                _ => obj.clone(),
            };
            Ok((StatusCode::OK, doc, false))
        }
        Verb::List => {
            let (labels, fields) = selectors(query)?;
            let items: Vec<Value> = store
                .list(rt, target.namespace.as_deref())
                .filter(|o| labels.matches(o) && fields.matches(o))
                .cloned()
                .collect();
            let list = json!({
                "apiVersion": rt.api_version(),
                "kind": format!("{}List", rt.kind),
                "metadata": { "resourceVersion": store.resource_version().to_string() },
                "items": items,
            });
            Ok((StatusCode::OK, list, false))
        }
        Verb::Create => {
            let obj = store.create(rt, namespace, json_body(body)?, false)?;
            Ok((StatusCode::CREATED, obj, true))
        }
        Verb::Update => store.replace(rt, namespace, name, json_body(body)?, sub).map(ok),
        Verb::Patch => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let kind = PatchKind::from_content_type(content_type)?;
            let patch = if kind == PatchKind::Apply { apply_body(body)? } else { json_body(body)? };
            let manager = query.get("fieldManager").map(String::as_str);
            store.patch(rt, namespace, name, kind, patch, sub, manager).map(ok)
        }
        Verb::Delete => {
            let obj = store.delete(rt, namespace, name, &delete_options(query, body)?)?;
            Ok((StatusCode::OK, obj, true))
        }
        Verb::DeleteCollection => {
            let (labels, fields) = selectors(query)?;
            let opts = delete_options(query, body)?;
            let names: Vec<(String, String)> = store
                .list(rt, target.namespace.as_deref())
                .filter(|o| labels.matches(o) && fields.matches(o))
                .map(|o| {
                    let field = |f| o.pointer(f).and_then(Value::as_str).unwrap_or_default().to_string();
                    (field("/metadata/namespace"), field("/metadata/name"))
                })
                .collect();
            let mut items = Vec::new();
            for (ns, name) in names {
                // An earlier deletion in this loop may have garbage-collected this one.
                if let Ok(obj) = store.delete(rt, &ns, &name, &opts) {
                    items.push(obj);
                }
            }
            let changed = !items.is_empty();
            let list = json!({ "apiVersion": rt.api_version(), "kind": format!("{}List", rt.kind), "metadata": {}, "items": items });
            Ok((StatusCode::OK, list, changed))
        }
        Verb::Watch => unreachable!("watches are streamed by `watch`"),
    }
}

pub(crate) fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels =
        LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let fields =
        FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Apply patches are YAML by their content type; kube sends JSON, which is YAML too.
fn apply_body(body: &Bytes) -> Result<Value, ApiError> {
    json_body(body).or_else(|_| {
        let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the apply patch is not UTF-8"))?;
        serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("the apply patch is not valid YAML: {e}")))
    })
}

/// `propagationPolicy` and preconditions, from the query or a `DeleteOptions` body.
fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.is_empty() { json!({}) } else { json_body(body)? };
    if body.get("dryRun").and_then(Value::as_array).is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad_request("dryRun is not supported by the fake API server"));
    }
    let policy = query
        .get("propagationPolicy")
        .map(String::as_str)
        .or_else(|| body.get("propagationPolicy").and_then(Value::as_str));
    let orphan_flag = query
        .get("orphanDependents")
        .map(|v| v == "true")
        .or_else(|| body.get("orphanDependents").and_then(Value::as_bool));
    let precondition =
        |field: &str| body.pointer(&format!("/preconditions/{field}")).and_then(Value::as_str).map(String::from);
    Ok(DeleteOptions {
        orphan: policy == Some("Orphan") || orphan_flag == Some(true),
        resource_version: precondition("resourceVersion"),
        uid: precondition("uid"),
    })
}

/// Whether the client asked for `PartialObjectMetadata` (kube's metadata watchers do).
fn metadata_only(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

/// An object as served at the requested version, or only its metadata.
pub(crate) fn present(rt: &ResourceType, obj: &Value, metadata_only: bool) -> Value {
    if metadata_only {
        let metadata = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
        return json!({ "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": metadata });
    }
    let mut obj = obj.clone();
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".into(), json!(rt.api_version()));
    }
    obj
}

fn present_list(rt: &ResourceType, mut list: Value, metadata_only: bool) -> Value {
    if let Some(items) = list.get_mut("items").and_then(Value::as_array_mut) {
        for item in items.iter_mut() {
            *item = present(rt, item, metadata_only);
        }
    }
    if metadata_only {
        list["apiVersion"] = json!("meta.k8s.io/v1");
        list["kind"] = json!("PartialObjectMetadataList");
    }
    list
}
