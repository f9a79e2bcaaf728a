//! Watches through kube-runtime's `watcher`: initial listing, live events, selection changes,
//! and the relist after a resourceVersion has been compacted away.

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::from_json;

/// What a watcher emitted, reduced to something easy to compare.
#[derive(Debug, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// Runs a watcher in the background and hands its events over a channel.
fn spawn_watcher(api: Api<ConfigMap>, config: watcher::Config) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, config).boxed();
        while let Some(item) = stream.next().await {
            let seen = match item {
                Ok(Event::Init) => Seen::Init,
                Ok(Event::InitApply(cm)) => Seen::InitApply(cm.name_any()),
                Ok(Event::InitDone) => Seen::InitDone,
                Ok(Event::Apply(cm)) => Seen::Apply(cm.name_any()),
                Ok(Event::Delete(cm)) => Seen::Delete(cm.name_any()),
                Err(err) => Seen::Error(err.to_string()),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a watch event in time")
        .expect("the watcher runs")
}

fn configmap(name: &str, app: &str) -> ConfigMap {
    from_json(json!({ "metadata": { "name": name, "labels": { "app": app } } }))
}

async fn create(client: &Client, namespace: &str, name: &str, app: &str) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), &configmap(name, app)).await.unwrap();
}

#[tokio::test]
async fn watcher_sees_added_modified_and_deleted() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    create(&client, "default", "before", "w").await;
    create(&client, "default", "unselected", "other").await;

    let mut rx = spawn_watcher(api.clone(), watcher::Config::default().labels("app=w"));
    assert_eq!(next(&mut rx).await, Seen::Init);
    assert_eq!(next(&mut rx).await, Seen::InitApply("before".into()));
    assert_eq!(next(&mut rx).await, Seen::InitDone);

    create(&client, "default", "x", "w").await;
    create(&client, "other-namespace", "y", "w").await;
    assert_eq!(next(&mut rx).await, Seen::Apply("x".into()));
    api.patch("x", &PatchParams::default(), &Patch::Merge(json!({ "data": { "k": "v" } }))).await.unwrap();
    assert_eq!(next(&mut rx).await, Seen::Apply("x".into()));
    api.delete("x", &DeleteParams::default()).await.unwrap();
    assert_eq!(next(&mut rx).await, Seen::Delete("x".into()));

    // Relabelling moves objects into and out of the selection.
    let relabel = |app: &str| Patch::Merge(json!({ "metadata": { "labels": { "app": app } } }));
    api.patch("unselected", &PatchParams::default(), &relabel("w")).await.unwrap();
    assert_eq!(next(&mut rx).await, Seen::Apply("unselected".into()));
    api.patch("before", &PatchParams::default(), &relabel("gone")).await.unwrap();
    assert_eq!(next(&mut rx).await, Seen::Delete("before".into()));
}

#[tokio::test]
async fn metadata_watcher_gets_partial_objects() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    create(&client, "default", "m", "meta").await;
    // `Api<PartialObjectMeta<K>>` asks for metadata only (an `Accept: ...;as=PartialObjectMetadata`).
    let api: Api<PartialObjectMeta<ConfigMap>> = Api::default_namespaced(client.clone());

    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    let mut names = Vec::new();
    while names.is_empty() {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
        if let Event::InitApply(meta) = event {
            assert_eq!(meta.types.as_ref().map(|t| t.kind.as_str()), Some("PartialObjectMetadata"));
            names.push(meta.name_any());
        }
    }
    assert_eq!(names, ["m"]);
}

#[tokio::test]
async fn streaming_list_ends_its_initial_events_with_a_bookmark() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    create(&client, "default", "a", "s").await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());

    let mut rx = spawn_watcher(api, watcher::Config::default().streaming_lists());
    assert_eq!(next(&mut rx).await, Seen::Init);
    assert_eq!(next(&mut rx).await, Seen::InitApply("a".into()));
    assert_eq!(next(&mut rx).await, Seen::InitDone);
    create(&client, "default", "b", "s").await;
    assert_eq!(next(&mut rx).await, Seen::Apply("b".into()));
}

#[tokio::test]
async fn a_compacted_resource_version_makes_the_watcher_relist() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    create(&client, "default", "a", "c").await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());

    // The server ends each watch after a second; the watcher then resumes from its last version.
    let mut rx = spawn_watcher(api, watcher::Config::default().timeout(1));
    assert_eq!(next(&mut rx).await, Seen::Init);
    assert_eq!(next(&mut rx).await, Seen::InitApply("a".into()));
    assert_eq!(next(&mut rx).await, Seen::InitDone);

    // A change this watch never sees, then compaction: its version is now too old.
    create(&client, "elsewhere", "unseen", "c").await;
    server.compact_history();
    let error = next(&mut rx).await;
    assert!(matches!(&error, Seen::Error(e) if e.contains("410") || e.contains("too old")), "{error:?}");
    assert_eq!(next(&mut rx).await, Seen::Init);
    assert_eq!(next(&mut rx).await, Seen::InitApply("a".into()));
    assert_eq!(next(&mut rx).await, Seen::InitDone);
}
