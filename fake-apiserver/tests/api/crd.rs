//! Custom resources: a test-local `Widget` registered at runtime or installed as a CRD object,
//! its status and scale subresources, and a ShardedDatabase-shaped resource used dynamically.

use std::time::Duration;

use fake_apiserver::{FakeApiServer, ResourceType, ScalePaths};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::from_json;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "test.io",
    version = "v1",
    kind = "Widget",
    shortname = "wd",
    namespaced,
    status = "WidgetStatus",
    scale(spec_replicas_path = ".spec.replicas", status_replicas_path = ".status.replicas")
)]
pub struct WidgetSpec {
    pub replicas: i32,
    pub color: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WidgetStatus {
    pub replicas: i32,
    pub phase: Option<String>,
}

fn widget(name: &str, color: &str) -> Widget {
    Widget::new(name, WidgetSpec { replicas: 1, color: color.into() })
}

#[tokio::test]
async fn widget_status_goes_through_the_status_subresource() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    server.register_crd("test.io", "v1", "widgets", "Widget", true);
    let api: Api<Widget> = Api::default_namespaced(server.client());

    let mut w = widget("w", "red");
    w.status = Some(WidgetStatus { replicas: 7, phase: Some("Bogus".into()) });
    let created = api.create(&PostParams::default(), &w).await?;
    assert!(created.status.is_none(), "status in a main-resource write is ignored");

    let merged = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "replicas": 1, "phase": "Ready" } })),
        )
        .await?;
    assert_eq!(merged.status, Some(WidgetStatus { replicas: 1, phase: Some("Ready".into()) }));
    assert_eq!(merged.meta().generation, Some(1));

    let apply = PatchParams::apply("widget-controller").force();
    let status =
        json!({ "apiVersion": "test.io/v1", "kind": "Widget", "status": { "replicas": 1, "phase": "Running" } });
    let applied = api.patch_status("w", &apply, &Patch::Apply(&status)).await?;
    assert_eq!(applied.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"));
    let again = api.patch_status("w", &apply, &Patch::Apply(&status)).await?;
    assert_eq!(again.resource_version(), applied.resource_version(), "same status applied twice changes nothing");

    // A status write cannot touch the spec, and a spec apply cannot touch the status.
    let sneaky = json!({ "spec": { "replicas": 1, "color": "blue" }, "status": { "replicas": 2, "phase": "Running" } });
    let status_only = api.patch_status("w", &PatchParams::default(), &Patch::Merge(sneaky)).await?;
    assert_eq!((status_only.spec.color.as_str(), status_only.status.as_ref().map(|s| s.replicas)), ("red", Some(2)));
    let mut blue = widget("w", "blue");
    blue.status = Some(WidgetStatus::default());
    let spec_only = api.patch("w", &PatchParams::apply("widget-controller").force(), &Patch::Apply(&blue)).await?;
    assert_eq!(spec_only.spec.color, "blue");
    assert_eq!(spec_only.status.as_ref().map(|s| s.replicas), Some(2));
    assert_eq!(spec_only.meta().generation, Some(2));

    let mut current = api.get("w").await?;
    current.status.as_mut().unwrap().phase = Some("Done".into());
    let replaced = api.replace_status("w", &PostParams::default(), &current).await?;
    assert_eq!(replaced.status.unwrap().phase.as_deref(), Some("Done"));
    Ok(())
}

#[tokio::test]
async fn kube_finalizer_helper_adds_and_removes_its_finalizer() -> anyhow::Result<()> {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event, finalizer};
    use std::sync::Arc;
    const FINALIZER: &str = "test.io/cleanup";
    let server = FakeApiServer::start().await;
    server.register_crd("test.io", "v1", "widgets", "Widget", true);
    let api: Api<Widget> = Api::default_namespaced(server.client());
    let created = api.create(&PostParams::default(), &widget("fin", "grey")).await?;

    // The helper's JSON patches ("test" then "add"/"remove") go through the fake's RFC 6902.
    let reconcile = |expect_cleanup: bool| {
        move |event: Event<Widget>| async move {
            assert_eq!(matches!(event, Event::Cleanup(_)), expect_cleanup);
            Ok::<_, kube::Error>(Action::await_change())
        }
    };
    finalizer(&api, FINALIZER, Arc::new(created), reconcile(false)).await?;
    let held = api.get("fin").await?;
    assert_eq!(held.finalizers(), [FINALIZER]);
    finalizer(&api, FINALIZER, Arc::new(held), reconcile(false)).await?;

    api.delete("fin", &Default::default()).await?;
    let deleting = api.get("fin").await?;
    assert!(deleting.meta().deletion_timestamp.is_some());
    finalizer(&api, FINALIZER, Arc::new(deleting), reconcile(true)).await?;
    assert!(api.get_opt("fin").await?.is_none(), "gone once its finalizer is removed");
    Ok(())
}

#[tokio::test]
async fn a_crd_object_makes_its_type_servable_with_scale() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let err = widgets.list(&Default::default()).await.unwrap_err();
    assert_eq!(crate::api_error(&err).0, 404, "not served before its CRD exists");

    crds.patch("widgets.test.io", &PatchParams::apply("installer").force(), &Patch::Apply(Widget::crd())).await?;
    let established = await_condition(crds, "widgets.test.io", conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(10), established).await??;

    widgets.create(&PostParams::default(), &widget("scaled", "green")).await?;
    let scale = widgets.get_scale("scaled").await?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    widgets.patch_scale("scaled", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "replicas": 4 } }))).await?;
    let scaled = widgets.get("scaled").await?;
    assert_eq!((scaled.spec.replicas, scaled.meta().generation), (4, Some(2)));
    assert_eq!(server.get("wd", "default", "scaled").unwrap()["spec"]["replicas"], 4, "short names resolve");

    let gvk = GroupVersionKind::gvk("test.io", "v1", "Widget");
    let (_, caps) = kube::discovery::pinned_kind(&client, &gvk).await?;
    let subresources: Vec<String> = caps.subresources.iter().map(|(ar, _)| ar.plural.clone()).collect();
    assert_eq!(subresources, ["status", "scale"]);
    Ok(())
}

#[tokio::test]
async fn sharddb_shaped_resource_through_a_dynamic_api() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await;
    let servers = ScalePaths::new(".spec.servers", ".status.servers").with_label_selector(".status.selector");
    let sdb = ResourceType::new("sharddb.io", "v1alpha1", "shardeddatabases", "ShardedDatabase", true)
        .with_status()
        .with_scale(servers);
    server.register(sdb);
    let client = server.client();

    let gvk = GroupVersionKind::gvk("sharddb.io", "v1alpha1", "ShardedDatabase");
    let (resource, _) = kube::discovery::pinned_kind(&client, &gvk).await?;
    assert_eq!(resource, ApiResource::from_gvk_with_plural(&gvk, "shardeddatabases"));
    let api: Api<DynamicObject> = Api::default_namespaced_with(client, &resource);
    let db: DynamicObject = from_json(json!({
        "apiVersion": "sharddb.io/v1alpha1", "kind": "ShardedDatabase",
        "metadata": { "name": "orders" },
        "spec": { "servers": 3, "shards": [{ "id": "s0", "low": 0, "size": 100 }] },
    }));
    api.create(&PostParams::default(), &db).await?;
    let status = json!({ "status": { "servers": 2, "selector": "app=orders" } });
    api.patch_status("orders", &PatchParams::default(), &Patch::Merge(status)).await?;

    let scale = api.get_scale("orders").await?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let status = scale.status.unwrap();
    assert_eq!((status.replicas, status.selector.as_deref()), (2, Some("app=orders")));
    api.patch_scale("orders", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "replicas": 5 } }))).await?;
    assert_eq!(server.get("ShardedDatabase", "default", "orders").unwrap()["spec"]["servers"], 5);
    Ok(())
}
