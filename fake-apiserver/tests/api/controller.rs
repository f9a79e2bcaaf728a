//! A real `kube::runtime::Controller` against the fake: ConfigMaps owning Secrets, written with
//! server-side apply; owned-object events trigger reconciles, and the error policy sees
//! injected failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fake_apiserver::{Failure, FakeApiServer, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::from_json;

struct Ctx {
    client: Client,
    reconciles: AtomicUsize,
    errors: AtomicUsize,
}

fn secret_name(cm: &ConfigMap) -> String {
    format!("{}-secret", cm.name_any())
}

/// Keeps a Secret `<name>-secret`, owned by the ConfigMap, holding the ConfigMap's data.
async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.reconciles.fetch_add(1, Ordering::SeqCst);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&cm)),
            owner_references: Some(vec![cm.controller_owner_ref(&()).unwrap()]),
            ..Default::default()
        },
        string_data: cm.data.clone(),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &cm.namespace().unwrap());
    secrets.patch(&secret_name(&cm), &PatchParams::apply("test-controller").force(), &Patch::Apply(&secret)).await?;
    Ok(Action::await_change())
}

fn error_policy(_cm: Arc<ConfigMap>, _err: &kube::Error, ctx: Arc<Ctx>) -> Action {
    ctx.errors.fetch_add(1, Ordering::SeqCst);
    Action::requeue(Duration::from_millis(50))
}

fn start_controller(server: &FakeApiServer) -> Arc<Ctx> {
    let client = server.client();
    let ctx = Arc::new(Ctx { client: client.clone(), reconciles: AtomicUsize::new(0), errors: AtomicUsize::new(0) });
    let configmaps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let controller = Controller::new(configmaps, watcher::Config::default())
        .owns(secrets, watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(controller);
    ctx
}

fn configmap(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    let data: BTreeMap<String, String> = data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    from_json(json!({ "metadata": { "name": name }, "data": data }))
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn controller_reconciles_owned_secrets_and_recreates_a_deleted_one() {
    let server = FakeApiServer::start().await;
    let ctx = start_controller(&server);
    let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
    configmaps.create(&PostParams::default(), &configmap("alpha", &[("password", "s3cret")])).await.unwrap();

    assert!(server.wait_for(WAIT, |s| s.get("secrets", "default", "alpha-secret").is_some()).await);
    let secret = server.get("secrets", "default", "alpha-secret").unwrap();
    assert_eq!(secret["data"]["password"], "czNjcmV0", "stringData is merged into data");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "alpha");

    // The Secret's own creation event triggers a second reconcile, which must write nothing.
    let ctx2 = ctx.clone();
    assert!(server.wait_for(WAIT, move |_| ctx2.reconciles.load(Ordering::SeqCst) >= 2).await);
    let secret_writes =
        |s: &FakeApiServer| s.writes().into_iter().filter(|w| w.resource == "secrets").collect::<Vec<_>>();
    assert!(server.wait_for(WAIT, |s| secret_writes(s).len() >= 2).await);
    let writes = secret_writes(&server);
    assert!(writes.iter().all(|w| w.verb == Verb::Patch && w.code == 200));
    assert_eq!(writes.iter().filter(|w| w.changed).count(), 1, "only the first apply changed anything: {writes:?}");

    // Deleting the Secret behind the controller's back makes it come back.
    let old_uid = secret["metadata"]["uid"].clone();
    server.delete("secrets", "default", "alpha-secret").expect("the secret exists");
    let recreated = |s: &FakeApiServer| {
        s.get("secrets", "default", "alpha-secret").is_some_and(|x| x["metadata"]["uid"] != old_uid)
    };
    assert!(server.wait_for(WAIT, recreated).await, "the controller recreates the deleted secret");

    // Deleting the ConfigMap garbage-collects the Secret.
    server.delete("configmaps", "default", "alpha").unwrap();
    assert!(server.get("secrets", "default", "alpha-secret").is_none());
}

#[tokio::test]
async fn controller_error_policy_sees_injected_failures() {
    let server = FakeApiServer::start().await;
    server.inject_failure(Failure::new(500).verb(Verb::Patch).resource("secrets").times(2));
    let ctx = start_controller(&server);
    let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
    configmaps.create(&PostParams::default(), &configmap("beta", &[("k", "v")])).await.unwrap();

    assert!(server.wait_for(WAIT, |s| s.get("secrets", "default", "beta-secret").is_some()).await);
    assert_eq!(ctx.errors.load(Ordering::SeqCst), 2);
    let codes: Vec<u16> = server.writes().iter().filter(|w| w.resource == "secrets").map(|w| w.code).collect();
    assert_eq!(&codes[..3], [500, 500, 200]);
}
