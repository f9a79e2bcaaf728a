//! Typed requests: CRUD, selectors, optimistic concurrency, the patch types, server-side apply,
//! deletion with finalizers and garbage collection, leases, discovery and injected failures.

use fake_apiserver::{Failure, FakeApiServer, Verb};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::{api_error, from_json};

fn configmap(name: &str, app: &str, data: serde_json::Value) -> ConfigMap {
    from_json(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": name, "labels": { "app": app } },
        "data": data,
    }))
}

#[tokio::test]
async fn configmap_create_get_list_replace_patch_delete() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PostParams::default();

    let a = api.create(&pp, &configmap("a", "db", json!({ "k": "v" }))).await?;
    assert_eq!(a.namespace().as_deref(), Some("default"));
    assert!(a.uid().is_some_and(|u| !u.is_empty()));
    assert!(a.resource_version().is_some());
    assert!(a.creation_timestamp().is_some());
    assert_eq!(a.meta().generation, Some(1));
    let b = api.create(&pp, &configmap("b", "web", json!({}))).await?;
    assert_ne!(a.uid(), b.uid());

    let err = api.create(&pp, &configmap("a", "db", json!({}))).await.unwrap_err();
    assert_eq!(api_error(&err), (409, "AlreadyExists".into()));

    assert_eq!(api.get("a").await?.data, a.data);
    let err = api.get("missing").await.unwrap_err();
    assert_eq!(api_error(&err), (404, "NotFound".into()));
    assert!(api.get_opt("missing").await?.is_none());

    let names = |list: kube::core::ObjectList<ConfigMap>| list.items.iter().map(|c| c.name_any()).collect::<Vec<_>>();
    let db = api.list(&ListParams::default().labels("app=db")).await?;
    assert!(db.metadata.resource_version.is_some());
    assert_eq!(names(db), ["a"]);
    assert_eq!(names(api.list(&ListParams::default().labels("app in (db,web)")).await?), ["a", "b"]);
    assert_eq!(names(api.list(&ListParams::default().fields("metadata.name=b")).await?), ["b"]);
    let elsewhere: Api<ConfigMap> = Api::namespaced(server.client(), "other");
    assert!(elsewhere.list(&ListParams::default()).await?.items.is_empty());

    // Replace with the current resourceVersion works; with the old one it conflicts.
    let mut fresh = api.get("a").await?;
    fresh.data = Some([("k".to_string(), "v2".to_string())].into());
    let replaced = api.replace("a", &pp, &fresh).await?;
    assert_ne!(replaced.resource_version(), a.resource_version());
    assert_eq!(replaced.meta().generation, Some(2), "data is not metadata: a new generation");
    let mut stale = a.clone();
    stale.data = Some([("k".to_string(), "v3".to_string())].into());
    let err = api.replace("a", &pp, &stale).await.unwrap_err();
    assert_eq!(api_error(&err), (409, "Conflict".into()));

    let labelled = api
        .patch("a", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "labels": { "x": "1" } } })))
        .await?;
    assert_eq!(labelled.labels().get("x").map(String::as_str), Some("1"));
    assert_eq!(labelled.meta().generation, Some(2), "labels are metadata: same generation");
    let strategic = api.patch("a", &PatchParams::default(), &Patch::Strategic(json!({ "data": { "s": "1" } }))).await?;
    assert_eq!(strategic.data.unwrap().len(), 2);

    api.delete("a", &DeleteParams::default()).await?;
    assert!(api.get_opt("a").await?.is_none());
    assert!(server.get("configmaps", "default", "a").is_none());
    let err = api.delete("a", &DeleteParams::default()).await.unwrap_err();
    assert_eq!(api_error(&err).0, 404);
    Ok(())
}

#[tokio::test]
async fn json_patch_generate_name_and_delete_collection() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &configmap("j", "db", json!({ "a": "1" }))).await?;

    // kube is built without its `jsonpatch` feature here, so send the RFC 6902 patch by hand.
    let ops = json!([
        { "op": "replace", "path": "/data/a", "value": "2" },
        { "op": "add", "path": "/data/b", "value": "3" },
        { "op": "remove", "path": "/metadata/labels" },
    ]);
    let request = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/j")
        .header("content-type", "application/json-patch+json")
        .body(serde_json::to_vec(&ops)?)?;
    let patched: ConfigMap = client.request(request).await?;
    assert_eq!(patched.data.unwrap(), [("a".to_string(), "2".to_string()), ("b".to_string(), "3".to_string())].into());
    assert!(patched.metadata.labels.is_none());

    let generated: ConfigMap = from_json(json!({ "metadata": { "generateName": "gen-", "labels": { "app": "gen" } } }));
    let first = api.create(&PostParams::default(), &generated).await?;
    let second = api.create(&PostParams::default(), &generated).await?;
    assert!(first.name_any().starts_with("gen-") && first.name_any().len() == 9);
    assert_ne!(first.name_any(), second.name_any());

    let deleted = api.delete_collection(&DeleteParams::default(), &ListParams::default().labels("app=gen")).await?;
    assert_eq!(deleted.left().map(|l| l.items.len()), Some(2));
    assert_eq!(server.list("configmaps", "default").len(), 1);
    Ok(())
}

#[tokio::test]
async fn server_side_apply_is_idempotent_and_status_is_a_subresource() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let api: Api<StatefulSet> = Api::default_namespaced(server.client());
    let sts: StatefulSet = from_json(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": { "name": "db", "labels": { "app": "db" } },
        "spec": {
            "replicas": 3,
            "serviceName": "db",
            "selector": { "matchLabels": { "app": "db" } },
            "template": {
                "metadata": { "labels": { "app": "db" } },
                "spec": { "containers": [{ "name": "pg", "image": "postgres:16" }] },
            },
        },
        "status": { "replicas": 99 },
    }));
    let apply = PatchParams::apply("sharddb-operator").force();

    let first = api.patch("db", &apply, &Patch::Apply(&sts)).await?;
    assert!(first.status.is_none(), "status is written through /status only");
    let second = api.patch("db", &apply, &Patch::Apply(&sts)).await?;
    assert_eq!(first.resource_version(), second.resource_version());
    assert_eq!(second.meta().generation, Some(1));
    let writes = server.writes();
    assert_eq!(writes.len(), 2);
    assert!(writes.iter().all(|w| w.verb == Verb::Patch && w.field_manager.as_deref() == Some("sharddb-operator")));
    assert_eq!(server.changing_write_count(), 1);

    // A label the manager stops applying goes away; a spec change bumps the generation.
    let mut changed = sts.clone();
    changed.metadata.labels = None;
    changed.spec.as_mut().unwrap().replicas = Some(4);
    let third = api.patch("db", &apply, &Patch::Apply(&changed)).await?;
    assert!(third.metadata.labels.is_none());
    assert_eq!(third.meta().generation, Some(2));

    let status = json!({ "status": { "replicas": 4, "readyReplicas": 2 } });
    let with_status = api.patch_status("db", &PatchParams::default(), &Patch::Merge(status)).await?;
    assert_eq!(with_status.status.as_ref().and_then(|s| s.ready_replicas), Some(2));
    assert_eq!(with_status.meta().generation, Some(2), "status changes keep the generation");
    let reapplied = api.patch("db", &apply, &Patch::Apply(&changed)).await?;
    assert_eq!(reapplied.resource_version(), with_status.resource_version(), "apply leaves status alone");

    // The built-in /scale subresource maps onto spec.replicas.
    assert_eq!(api.get_scale("db").await?.spec.and_then(|s| s.replicas), Some(4));
    api.patch_scale("db", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "replicas": 6 } }))).await?;
    assert_eq!(api.get("db").await?.spec.unwrap().replicas, Some(6));
    Ok(())
}

#[tokio::test]
async fn deleting_an_owner_collects_its_dependents() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let configmaps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let pp = PostParams::default();

    let owned_by = |owner: &ConfigMap, object: serde_json::Value| {
        let mut object = object;
        object["metadata"]["ownerReferences"] =
            serde_json::to_value([owner.controller_owner_ref(&()).unwrap()]).unwrap();
        object
    };
    let parent = configmaps.create(&pp, &configmap("parent", "p", json!({}))).await?;
    let child: ConfigMap = from_json(owned_by(&parent, json!({ "metadata": { "name": "child" } })));
    let child = configmaps.create(&pp, &child).await?;
    let grandchild: Secret = from_json(owned_by(&child, json!({ "metadata": { "name": "grandchild" } })));
    secrets.create(&pp, &grandchild).await?;
    configmaps.create(&pp, &configmap("bystander", "p", json!({}))).await?;

    configmaps.delete("parent", &DeleteParams::default()).await?;
    assert!(configmaps.get_opt("child").await?.is_none());
    assert!(secrets.get_opt("grandchild").await?.is_none(), "collection is recursive and crosses kinds");
    assert!(configmaps.get_opt("bystander").await?.is_some());

    // Orphan propagation keeps the dependent and drops its owner reference.
    let parent = configmaps.create(&pp, &configmap("parent2", "p", json!({}))).await?;
    let kept: ConfigMap = from_json(owned_by(&parent, json!({ "metadata": { "name": "kept" } })));
    configmaps.create(&pp, &kept).await?;
    let orphan = DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..Default::default() };
    configmaps.delete("parent2", &orphan).await?;
    assert!(configmaps.get("kept").await?.metadata.owner_references.is_none());
    Ok(())
}

#[tokio::test]
async fn finalizers_hold_an_object_until_cleared() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut held = configmap("held", "f", json!({}));
    held.metadata.finalizers = Some(vec!["sharddb.io/cleanup".into()]);
    api.create(&PostParams::default(), &held).await?;

    let deleted = api.delete("held", &DeleteParams::default()).await?;
    let marked = deleted.left().expect("the object comes back while finalizers hold it");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(api.get("held").await?.metadata.deletion_timestamp.is_some());

    api.patch("held", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "finalizers": null } }))).await?;
    assert!(api.get_opt("held").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn lease_updates_use_optimistic_concurrency() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let api: Api<Lease> = Api::default_namespaced(server.client());
    let lease: Lease = from_json(json!({
        "metadata": { "name": "sharddb-operator" },
        "spec": {
            "holderIdentity": "pod-a",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": "2026-01-01T00:00:00.000000Z",
        },
    }));
    let created = api.create(&PostParams::default(), &lease).await?;

    let mut renewed = api.get("sharddb-operator").await?;
    renewed.spec.as_mut().unwrap().renew_time = from_json(json!("2026-01-01T00:00:10.000000Z"));
    let renewed = api.replace("sharddb-operator", &PostParams::default(), &renewed).await?;

    // A contender holding the first version loses the race.
    let mut takeover = created.clone();
    takeover.spec.as_mut().unwrap().holder_identity = Some("pod-b".into());
    let err = api.replace("sharddb-operator", &PostParams::default(), &takeover).await.unwrap_err();
    assert_eq!(api_error(&err), (409, "Conflict".into()));

    let mut takeover = renewed;
    takeover.spec.as_mut().unwrap().holder_identity = Some("pod-b".into());
    let taken = api.replace("sharddb-operator", &PostParams::default(), &takeover).await?;
    assert_eq!(taken.spec.unwrap().holder_identity.as_deref(), Some("pod-b"));
    Ok(())
}

#[tokio::test]
async fn injected_failures_reach_the_client_and_the_log() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &configmap("x", "f", json!({}))).await?;

    server.inject_failure(Failure::new(500).verb(Verb::Get).resource("configmaps"));
    let err = api.get("x").await.unwrap_err();
    assert_eq!(api_error(&err), (500, "InternalError".into()));
    assert!(api.get("x").await.is_ok(), "a failure injected once fires once");

    server.clear_writes();
    server.inject_failure(Failure::new(409).verb(Verb::Patch).name("x").times(2));
    let patch = Patch::Merge(json!({ "data": { "a": "1" } }));
    for _ in 0..2 {
        let err = api.patch("x", &PatchParams::default(), &patch).await.unwrap_err();
        assert_eq!(api_error(&err).0, 409);
    }
    api.patch("x", &PatchParams::default(), &patch).await?;
    let codes: Vec<(u16, bool)> = server.writes().iter().map(|w| (w.code, w.changed)).collect();
    assert_eq!(codes, [(409, false), (409, false), (200, true)]);
    Ok(())
}

#[tokio::test]
async fn event_recorder_creates_then_patches_a_series() -> anyhow::Result<()> {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = FakeApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = api.create(&PostParams::default(), &configmap("noisy", "e", json!({}))).await?;

    let recorder = Recorder::new(client, Reporter { controller: "sharddb-operator".into(), instance: None });
    let event = Event {
        type_: EventType::Normal,
        reason: "Reconciled".into(),
        note: Some("all good".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&event, &cm.object_ref(&())).await?;
    recorder.publish(&event, &cm.object_ref(&())).await?;
    let events = server.list("events.k8s.io/v1/events", "default");
    assert_eq!(events.len(), 1, "the repeat is folded into the first event");
    assert_eq!(events[0]["regarding"]["name"], "noisy");
    assert_eq!(events[0]["series"]["count"], 2);
    Ok(())
}

#[tokio::test]
async fn odd_requests_get_status_errors() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), &configmap("x", "o", json!({}))).await?;
    let cms = "/api/v1/namespaces/default/configmaps";
    let cases: Vec<(&str, String, &str, &[u8], u16)> = vec![
        ("POST", cms.into(), "application/json", b"{not json", 400),
        ("POST", cms.into(), "application/json", b"[1, 2]", 400),
        ("POST", cms.into(), "application/json", br#"{"kind": "Secret", "metadata": {"name": "y"}}"#, 400),
        ("POST", cms.into(), "application/json", br#"{"metadata": {}}"#, 422),
        ("PATCH", format!("{cms}/x"), "text/plain", b"{}", 415),
        ("PATCH", format!("{cms}/x"), "application/merge-patch+json", b"\"scalar\"", 400),
        ("PATCH", format!("{cms}/x"), "application/json-patch+json", br#"{"op": "add"}"#, 400),
        ("PATCH", format!("{cms}/x"), "application/apply-patch+yaml", b"{}", 400),
        ("PUT", format!("{cms}/y"), "application/json", br#"{"metadata": {"name": "y"}}"#, 404),
        ("PUT", format!("{cms}/x"), "application/json", br#"{"metadata": {"name": "z"}}"#, 400),
        ("GET", format!("{cms}?labelSelector=a%20in%20(b"), "", b"", 400),
        ("GET", format!("{cms}?watch=true&resourceVersion=abc"), "", b"", 400),
        ("GET", format!("{cms}/x/status"), "", b"", 404),
        ("GET", "/apis/nope.io/v1/things".into(), "", b"", 404),
        ("GET", "/api/v1/configmaps/x".into(), "", b"", 404),
        ("DELETE", format!("{cms}/x/scale"), "", b"", 404),
        ("DELETE", "/apis/apps/v1/namespaces/default/statefulsets/s/scale".into(), "", b"", 405),
        ("POST", "/version".into(), "", b"", 405),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/default/statefulsets/s/scale".into(),
            "application/merge-patch+json",
            b"{}",
            404,
        ),
    ];
    for (method, uri, content_type, body, code) in cases {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", content_type)
            .body(body.to_vec())?;
        let err = client.request::<serde_json::Value>(request).await.unwrap_err();
        assert_eq!(api_error(&err).0, code, "{method} {uri}");
    }
    // A watch with an absurd timeout is still a watch, and the server is still up.
    let request = axum::http::Request::get(format!("{cms}?watch=true&timeoutSeconds=99999999999999")).body(vec![])?;
    let mut events = Box::pin(client.request_events::<ConfigMap>(request).await?);
    let first = futures::StreamExt::next(&mut events).await.expect("an event").expect("a watch event");
    assert!(matches!(first, kube::api::WatchEvent::Added(_)));
    assert!(api.get("x").await.is_ok());
    Ok(())
}

#[tokio::test]
async fn discovery_and_version() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let version = client.apiserver_version().await?;
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));

    let discovery = kube::Discovery::new(client.clone()).run().await?;
    let kinds: Vec<String> =
        discovery.groups().flat_map(|g| g.recommended_resources()).map(|(ar, _)| ar.kind).collect();
    for kind in ["ConfigMap", "StatefulSet", "Lease", "PodDisruptionBudget", "RoleBinding", "CustomResourceDefinition"]
    {
        assert!(kinds.iter().any(|k| k == kind), "{kind} is discoverable");
    }
    let gvk = kube::api::GroupVersionKind::gvk("apps", "v1", "StatefulSet");
    let (_, caps) = kube::discovery::pinned_kind(&client, &gvk).await?;
    let subresources: Vec<String> = caps.subresources.iter().map(|(ar, _)| ar.plural.clone()).collect();
    assert_eq!(subresources, ["status", "scale"]);
    Ok(())
}

#[tokio::test]
async fn an_eviction_deletes_the_pod_and_is_recorded() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let server = FakeApiServer::start().await;
    let api: Api<Pod> = Api::default_namespaced(server.client());
    let pod: Pod = from_json(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "db-0" },
        "spec": { "containers": [{ "name": "c", "image": "i" }] },
    }));
    api.create(&PostParams::default(), &pod).await?;
    server.clear_writes();
    api.evict("db-0", &kube::api::EvictParams::default()).await?;
    assert!(api.get_opt("db-0").await?.is_none(), "evicted");
    let writes = server.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(
        (writes[0].verb, writes[0].subresource.as_deref(), writes[0].code),
        (Verb::Create, Some("eviction"), 201)
    );
    assert_eq!(writes[0].name.as_deref(), Some("db-0"));
    let err = api.evict("db-0", &kube::api::EvictParams::default()).await.unwrap_err();
    assert_eq!(api_error(&err).0, 404, "no such pod");
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &configmap("x", "a", json!({}))).await?;
    let client = server.client();
    let request = axum::http::Request::post("/api/v1/namespaces/default/configmaps/x/eviction").body(b"{}".to_vec())?;
    assert!(client.request::<serde_json::Value>(request).await.is_err(), "only pods are evicted");
    Ok(())
}
