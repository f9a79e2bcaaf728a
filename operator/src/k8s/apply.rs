//! Server-side apply of the built children, with the one field manager and force, so the operator
//! owns every field it sets and a field it stops setting is removed. Does I/O.

use super::build::names::MANAGER;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Errors talking to the API server, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("failed to apply {kind} {name}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read {kind} {name}")]
    Get {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to list {kind}")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete {kind} {name}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    pub fn source_error(&self) -> &kube::Error {
        match self {
            ApplyError::Apply { source, .. }
            | ApplyError::Get { source, .. }
            | ApplyError::List { source, .. }
            | ApplyError::Delete { source, .. } => source,
        }
    }
}

/// Anything the operator applies: a namespaced built-in object.
pub trait Child:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<T> Child for T where
    T: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

fn kind<K: Resource<DynamicType = ()>>() -> &'static str {
    // `K::kind` is a `Cow` borrowed from a static string for built-in types.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(k) => k,
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// Applies `object` (which carries its own name and namespace).
pub async fn apply<K: Child>(client: &Client, namespace: &str, object: &K) -> Result<K, ApplyError> {
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    // SSA needs apiVersion and kind in the body; typed k8s-openapi values omit them when serialised
    // through `Patch::Apply` unless set, so send them explicitly.
    let mut body = serde_json::to_value(object).map_err(|e| ApplyError::Apply {
        kind: kind::<K>(),
        name: name.clone(),
        source: kube::Error::SerdeError(e),
    })?;
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|source| ApplyError::Apply { kind: kind::<K>(), name, source })
}

/// Reads an object; `None` if it does not exist.
pub async fn get<K: Child>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, ApplyError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.map_err(|source| ApplyError::Get { kind: kind::<K>(), name: name.to_owned(), source })
}

/// Lists objects by label selector.
pub async fn list<K: Child>(client: &Client, namespace: &str, selector: &str) -> Result<Vec<K>, ApplyError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default().labels(selector);
    Ok(api.list(&params).await.map_err(|source| ApplyError::List { kind: kind::<K>(), source })?.items)
}

/// Deletes an object; an already absent one is fine.
pub async fn delete<K: Child>(client: &Client, namespace: &str, name: &str) -> Result<(), ApplyError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(source) => Err(ApplyError::Delete { kind: kind::<K>(), name: name.to_owned(), source }),
    }
}

/// Creates `object` unless an object of its name exists (never overwriting it); whether this
/// call created it. For what must be made exactly once, such as a CA, even by two writers.
pub async fn create<K: Child>(client: &Client, namespace: &str, object: &K) -> Result<bool, ApplyError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.create(&kube::api::PostParams::default(), object).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
        Err(source) => Err(ApplyError::Apply { kind: kind::<K>(), name: object.name_any(), source }),
    }
}
