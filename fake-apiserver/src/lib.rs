//! A stateful, in-process fake Kubernetes API server for tests (does I/O: serves plain HTTP on
//! `127.0.0.1:0`), so that real kube clients, watchers and `Controller`s run against it.
//!
//! ```no_run
//! # async fn demo() {
//! use fake_apiserver::FakeApiServer;
//! use k8s_openapi::api::core::v1::ConfigMap;
//!
//! let server = FakeApiServer::start().await;
//! let configmaps: kube::Api<ConfigMap> = kube::Api::default_namespaced(server.client());
//! // ... run the code under test against `configmaps`, then look inside:
//! assert!(server.get("configmaps", "default", "my-config").is_some());
//! assert_eq!(server.changing_write_count(), 1);
//! # }
//! ```
//!
//! What it models: objects stored as JSON per group/resource/namespace/name; a global
//! resourceVersion; `uid`, `creationTimestamp`, `generation` (bumped on non-metadata, non-status
//! changes), `generateName`; GET, LIST and WATCH with label and field selectors, bookmarks,
//! `sendInitialEvents`, `timeoutSeconds` and 410 Gone for compacted resourceVersions; POST, PUT
//! with optimistic concurrency, PATCH (server-side apply, merge, strategic merge as merge, JSON
//! patch), DELETE with finalizers, propagation policies and owner-reference garbage collection;
//! the `/status` and `/scale` subresources; discovery; CRDs registered by creating them.
//! See the `patch` module for how server-side apply is approximated.
//!
//! What it does not model: authentication and RBAC; schema validation and defaulting (except
//! Secret `stringData` folded into `data`, and CRDs reporting `Established`); `managedFields`
//! and apply conflicts; merge keys (strategic merge and apply replace lists whole); pagination
//! (`limit`/`continue` return everything); `dryRun` (rejected with 400); foreground deletion
//! (handled as background); garbage collection is immediate, not eventual; deleting a CRD does
//! not stop serving its type; aggregated discovery, protobuf, and `exec`/`log`-style
//! subresources.

mod audit;
mod error;
mod http;
mod patch;
mod registry;
mod select;
mod store;
mod watch;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use tokio::task::JoinHandle;

pub use audit::{Failure, Verb, WriteRecord};
pub use error::ApiError;
pub use registry::{ResourceType, ScalePaths};

use audit::Audit;
use store::{DeleteOptions, Store};

/// Everything behind one lock: the store and what tests observe and inject.
pub(crate) struct State {
    pub store: Store,
    pub audit: Audit,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Turns true when the handle is dropped, ending open watches.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    /// The state. A panic elsewhere never leaves it half-written (each operation checks before
    /// it writes), so a poisoned lock is still usable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake API server. Dropping it stops the server and ends its watches.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    url: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server on a free loopback port. Panics if no port can be bound.
    pub async fn start() -> Self {
        Self::try_start().await.expect("bind the fake API server to 127.0.0.1")
    }

    pub async fn try_start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let state = State { store: Store::new(), audit: Audit::default() };
        let shared = Arc::new(Shared { state: Mutex::new(state), shutdown: shutdown_rx });
        let app = http::router(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "fake API server stopped");
            }
        });
        Ok(Self { shared, url, shutdown, server })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kube config pointing at this server: no auth, default namespace `default`, kube's
    /// default retries (429, 503 and 504 are retried by the client).
    pub fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().expect("the server URL is a valid URI"));
        config.default_namespace = "default".into();
        config
    }

    /// A client for this server (installs rustls' ring provider if none is installed yet).
    pub fn client(&self) -> kube::Client {
        // Fails only if a provider is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
        kube::Client::try_from(self.config()).expect("build a kube client for the fake API server")
    }

    /// Serves a custom resource with a `/status` subresource (no `/scale`; see [`Self::register`]).
    pub fn register_crd(&self, group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) {
        self.register(ResourceType::new(group, version, plural, kind, namespaced).with_status());
    }

    /// Serves a resource type, replacing an earlier registration of the same group/version/plural.
    pub fn register(&self, resource: ResourceType) {
        self.shared.lock().store.registry.register(resource);
    }

    /// Stores a CRD object, as `kubectl apply` of the CRD would, which serves its types with the
    /// subresources it declares (e.g. `install_crd(&ShardedDatabase::crd())`).
    pub fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<Value, ApiError> {
        let mut object = serde_json::to_value(crd).map_err(|e| ApiError::bad_request(e.to_string()))?;
        object["apiVersion"] = "apiextensions.k8s.io/v1".into();
        object["kind"] = "CustomResourceDefinition".into();
        self.upsert(object)
    }

    /// An object as stored. `resource` is a plural (`configmaps`), a kind (`ConfigMap`),
    /// `plural.group` (`statefulsets.apps`) or `apiVersion/kind` (`apps/v1/StatefulSet`);
    /// `namespace` is ignored for cluster-scoped resources.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.lock();
        let rt = state.store.registry.resolve(resource)?;
        state.store.get(rt, namespace, name).ok().cloned()
    }

    /// The objects of a resource in `namespace`, or in all namespaces if it is empty.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        let state = self.shared.lock();
        let Some(rt) = state.store.registry.resolve(resource) else { return Vec::new() };
        let namespace = (!namespace.is_empty()).then_some(namespace);
        state.store.list(rt, namespace).cloned().collect()
    }

    /// Deletes like a client would (finalizers, then garbage collection), without logging a
    /// write. Returns the deleted (or, with finalizers, the marked) object.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut state = self.shared.lock();
        let rt = state.store.registry.resolve(resource)?.clone();
        state.store.delete(&rt, namespace, name, &DeleteOptions::default()).ok()
    }

    /// Creates or replaces an object as given — status included, no resourceVersion check, no
    /// write logged — e.g. to play a kubelet marking pods ready. The resource comes from its
    /// `apiVersion` and `kind`, the namespace from its metadata (default `default`).
    pub fn upsert(&self, object: Value) -> Result<Value, ApiError> {
        self.shared.lock().store.upsert(object)
    }

    /// Every write request so far (create, update, patch, delete, deletecollection), in order.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.shared.lock().audit.writes.clone()
    }

    /// How many write requests were made.
    pub fn write_count(&self) -> usize {
        self.shared.lock().audit.writes.len()
    }

    /// How many write requests changed stored state.
    pub fn changing_write_count(&self) -> usize {
        self.shared.lock().audit.writes.iter().filter(|w| w.changed).count()
    }

    /// Forgets the write log, e.g. before checking that a second reconcile writes nothing.
    pub fn clear_writes(&self) {
        self.shared.lock().audit.writes.clear();
    }

    /// Makes matching requests fail (see [`Failure`]).
    pub fn inject_failure(&self, failure: Failure) {
        self.shared.lock().audit.inject(failure);
    }

    pub fn clear_failures(&self) {
        self.shared.lock().audit.clear_failures();
    }

    /// Forgets the change history: every watch resuming from an earlier resourceVersion gets
    /// 410 Gone and must relist, as after an etcd compaction.
    pub fn compact_history(&self) {
        self.shared.lock().store.compact();
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.resource_version()
    }

    /// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.server.abort();
    }
}
