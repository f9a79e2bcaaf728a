//! Watches (does I/O): the events a watch owes from before it started, then live changes
//! streamed as newline-delimited `WatchEvent` JSON on a connection that stays open until
//! `timeoutSeconds`, the client leaving, or the server shutting down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::Shared;
use crate::error::ApiError;
use crate::http::{present, selectors};
use crate::registry::ResourceType;
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{Change, ChangeKind};

/// How often a watch that allows bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);
/// Upper bound on `timeoutSeconds`, so that no client value can overflow a deadline.
const MAX_WATCH: Duration = Duration::from_secs(24 * 3600);

/// Which changes one watch sees, and how it renders them.
struct WatchFilter {
    rt: ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    metadata_only: bool,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event line for a change, if this watch sees it. A modification that moves an object
    /// into or out of the selection is an ADDED or DELETED, as on a real server.
    fn render(&self, change: &Change) -> Option<Bytes> {
        let key = &change.key;
        if key.group != self.rt.group || key.plural != self.rt.plural {
            return None;
        }
        if self.namespace.as_ref().is_some_and(|ns| *ns != key.namespace) {
            return None;
        }
        let now = self.matches(&change.object);
        let kind = match change.kind {
            ChangeKind::Added => now.then_some("ADDED"),
            ChangeKind::Deleted => now.then_some("DELETED"),
            ChangeKind::Modified => match (change.previous.as_ref().is_some_and(|p| self.matches(p)), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }?;
        Some(event_line(kind, &present(&self.rt, &change.object, self.metadata_only)))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let object = json!({ "apiVersion": self.rt.api_version(), "kind": self.rt.kind, "metadata": metadata });
        event_line("BOOKMARK", &object)
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Starts a watch: the events it owes from before (a resumed history, or the current objects
/// as ADDED), then live changes until `timeoutSeconds`, the client leaving, or shutdown.
pub(crate) fn watch(
    shared: &Arc<Shared>,
    rt: ResourceType,
    namespace: Option<String>,
    query: &HashMap<String, String>,
    metadata_only: bool,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let filter = WatchFilter { rt, namespace, labels, fields, metadata_only };
    let flag = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
    let (bookmarks, initial_events) = (flag("allowWatchBookmarks"), flag("sendInitialEvents"));
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(MAX_WATCH, |s| Duration::from_secs(s).min(MAX_WATCH));
    let start = match query.get("resourceVersion").filter(|rv| !rv.is_empty()) {
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?)
        }
        None => None,
    };

    let mut backlog: Vec<Bytes> = Vec::new();
    // Snapshot and subscription under one lock: no change falls between them.
    let (mut changes, mut last_rv) = {
        let state = shared.lock();
        let store = &state.store;
        match start {
            Some(rv) if rv > 0 && !initial_events => match store.changes_after(rv) {
                Ok(missed) => backlog.extend(missed.iter().filter_map(|c| filter.render(c))),
                Err(gone) => return Ok(stream(vec![event_line("ERROR", &gone.to_status())])),
            },
            _ => {
                let current = store.list(&filter.rt, filter.namespace.as_deref()).filter(|o| filter.matches(o));
                backlog.extend(current.map(|o| event_line("ADDED", &present(&filter.rt, o, metadata_only))));
                if initial_events {
                    backlog.push(filter.bookmark(store.resource_version(), true));
                }
            }
        }
        (store.subscribe(), store.resource_version())
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        for line in backlog {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
        loop {
            let line = tokio::select! {
                _ = &mut deadline => break,
                _ = shutdown.changed() => break,
                _ = tx.closed() => break,
                _ = ticker.tick(), if bookmarks => Some(filter.bookmark(last_rv, false)),
                received = changes.recv() => match received {
                    Ok(change) => {
                        last_rv = change.rv;
                        filter.render(&change)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Events were lost: make the client relist rather than go on with gaps.
                        let gone = ApiError::gone("the watch fell behind; relist");
                        let _ = tx.send(event_line("ERROR", &gone.to_status())).await;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            if let Some(line) = line
                && tx.send(line).await.is_err()
            {
                break;
            }
        }
    });
    Ok(stream_from(rx))
}

fn stream(lines: Vec<Bytes>) -> Response {
    let body = Body::from_stream(futures::stream::iter(lines.into_iter().map(Ok::<_, Infallible>)));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn stream_from(rx: mpsc::Receiver<Bytes>) -> Response {
    let lines =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx)) },
        );
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(lines)).into_response()
}
