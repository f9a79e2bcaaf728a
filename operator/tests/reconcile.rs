//! The real `Controller` against the in-process fake API server: children created, a quiet second
//! reconcile, scaling, adding a shard, an invalid spec, a deleted child recreated, conditions.

mod common;

use common::{NS, Reconciler, mark_workloads_ready, students};
use fake_apiserver::FakeApiServer;
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator::crd::ShardedDatabase;
use operator::k8s::controller::Config;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

type Harness = Reconciler;

async fn start() -> Harness {
    Reconciler::start(Config::default()).await
}

fn api(h: &Harness) -> Api<ShardedDatabase> {
    Api::namespaced(h.server.client(), NS)
}

async fn create(h: &Harness, spec: Value) {
    let db: ShardedDatabase = serde_json::from_value(spec).unwrap();
    api(h).create(&PostParams::default(), &db).await.unwrap();
}

async fn patch_spec(h: &Harness, spec: Value) {
    api(h).patch("students", &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec }))).await.unwrap();
}

fn names(server: &FakeApiServer, resource: &str) -> Vec<String> {
    let mut v: Vec<String> =
        server.list(resource, NS).iter().filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned)).collect();
    v.sort();
    v
}

fn condition(server: &FakeApiServer, type_: &str) -> Option<(String, String)> {
    let db = server.get("shardeddatabases", NS, "students")?;
    let c = db["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
    Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
}

fn topology_epoch(server: &FakeApiServer) -> Option<u64> {
    let cm = server.get("configmaps", NS, "students-topology")?;
    let doc: Value = serde_json::from_str(cm["data"]["topology.json"].as_str()?).ok()?;
    doc["epoch"].as_u64()
}

/// Plays the kubelet and the StatefulSet/Deployment controllers: once the reconcile has built
/// the router Deployment and `servers` server StatefulSets, every workload is ready.
///
/// It waits for them first because a reconcile applies the StatefulSets before the Deployment:
/// marking as soon as the StatefulSets exist (on a busy machine the Deployment may come a moment
/// later) would leave the router unready for good, and the status rightly never turns Ready.
async fn mark_all_ready(server: &FakeApiServer, servers: usize) {
    let built = |s: &FakeApiServer| names(s, "statefulsets").len() == servers && names(s, "deployments").len() == 1;
    assert!(server.wait_for(WAIT, built).await, "workloads built: {:?}", names(server, "statefulsets"));
    mark_workloads_ready(server);
}

#[tokio::test]
async fn first_reconcile_creates_every_child_then_reports_ready_and_a_second_writes_nothing() {
    let h = start().await;
    create(&h, students(3)).await;
    let s = &h.server;
    assert!(s.wait_for(WAIT, |s| condition(s, "Ready").is_some()).await, "status written");
    assert_eq!(names(s, "statefulsets"), ["students-server0", "students-server1", "students-server2"]);
    assert_eq!(names(s, "deployments"), ["students-router"]);
    assert_eq!(names(s, "services"), ["students-router", "students-servers"]);
    assert_eq!(names(s, "configmaps"), ["students-topology"]);
    assert_eq!(
        names(s, "secrets"),
        [
            "students-admin-token",
            "students-ca",
            "students-postgres",
            "students-router-tls",
            "students-tls-server0",
            "students-tls-server1",
            "students-tls-server2"
        ]
    );
    assert_eq!(names(s, "serviceaccounts"), ["students-router", "students-server"]);
    assert_eq!(names(s, "roles"), ["students-topology-reader"]);
    assert_eq!(names(s, "rolebindings"), ["students-topology-reader"]);
    assert_eq!(names(s, "poddisruptionbudgets"), ["students-router", "students-servers"]);
    let uid = s.get("shardeddatabases", NS, "students").unwrap()["metadata"]["uid"].clone();
    for kind in ["statefulsets", "deployments", "services", "configmaps", "secrets", "roles", "poddisruptionbudgets"] {
        for o in s.list(kind, NS) {
            assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], uid, "{kind} {} is owned", o["metadata"]["name"]);
        }
    }
    assert_eq!(condition(s, "Ready"), Some(("False".into(), "ServersNotReady".into())));
    assert_eq!(condition(s, "Progressing"), Some(("True".into(), "RollingOut".into())));
    assert_eq!(topology_epoch(s), Some(1));
    let password = s.get("secrets", NS, "students-postgres").unwrap()["data"]["password"].clone();

    mark_all_ready(s, 3).await;
    assert!(s.wait_for(WAIT, |s| condition(s, "Ready") == Some(("True".into(), "AllReady".into()))).await);
    let db = s.get("shardeddatabases", NS, "students").unwrap();
    assert_eq!(db["status"]["readyServers"], 3);
    assert_eq!(db["status"]["shards"][0]["readyReplicas"].as_array().unwrap().len(), 2);
    // What `kubectl get sdb` shows in its SHARDS and COPIES columns.
    assert_eq!((db["status"]["shardCount"].clone(), db["status"]["copiesReady"].clone()), (json!(2), json!("4/4")));
    assert_eq!(condition(s, "Degraded"), Some(("False".into(), "AllReady".into())));

    // Let the reconciles triggered by our own writes settle, then force one more: it writes nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.clear_writes();
    let before = h.ctx.metrics.reconciles();
    let mut db = s.get("shardeddatabases", NS, "students").unwrap();
    db["metadata"]["annotations"] = json!({ "poke": "1" });
    s.upsert(db).unwrap();
    assert!(s.wait_for(WAIT, |_| h.ctx.metrics.reconciles() > before).await, "the change triggers a reconcile");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changing: Vec<_> = s.writes().into_iter().filter(|w| w.changed).collect();
    assert!(changing.is_empty(), "a steady-state reconcile changes nothing: {changing:?}");
    assert_eq!(s.get("secrets", NS, "students-postgres").unwrap()["data"]["password"], password, "password kept");
    assert_eq!(topology_epoch(s), Some(1), "epoch unchanged");
}

/// Waits until the reconcile has seen the current generation of the resource.
async fn wait_observed(s: &FakeApiServer) {
    let seen = |s: &FakeApiServer| {
        s.get("shardeddatabases", NS, "students").is_some_and(|d| {
            d["metadata"]["generation"].is_number() && d["status"]["observedGeneration"] == d["metadata"]["generation"]
        })
    };
    assert!(s.wait_for(WAIT, seen).await, "the reconcile saw the change");
}

/// A server added to the spec gets its StatefulSet at once; one removed keeps it until the
/// healer has drained it out of the topology. The reconcile itself never moves a copy: with no
/// healer here the document stays as published, and the status says the placement is changing.
#[tokio::test]
async fn servers_start_at_once_and_stop_only_once_drained_from_the_topology() {
    let h = start().await;
    let s = &h.server;
    create(&h, students(3)).await;
    assert!(s.wait_for(WAIT, |s| topology_epoch(s) == Some(1)).await);
    mark_all_ready(s, 3).await;
    assert!(s.wait_for(WAIT, |s| condition(s, "Ready") == Some(("True".into(), "AllReady".into()))).await);

    patch_spec(&h, json!({ "servers": 4 })).await;
    mark_all_ready(s, 4).await;
    assert!(
        s.wait_for(WAIT, |s| condition(s, "Ready") == Some(("False".into(), "PlacementChanging".into()))).await,
        "{:?}",
        condition(s, "Ready")
    );
    assert_eq!(topology_epoch(s), Some(1), "holders change only through the healer's moves");

    // Down to 2: Server3 never entered the document and goes at once; Server2 is still listed
    // (it holds copies) and stays until drained.
    patch_spec(&h, json!({ "servers": 2 })).await;
    wait_observed(s).await;
    assert!(
        s.wait_for(WAIT, |s| names(s, "statefulsets") == ["students-server0", "students-server1", "students-server2"])
            .await,
        "{:?}",
        names(s, "statefulsets")
    );
    assert_eq!(topology_epoch(s), Some(1));

    // As the healer would once every copy moved: Server2 leaves the document.
    let mut cm = s.get("configmaps", NS, "students-topology").unwrap();
    let mut doc: Value = serde_json::from_str(cm["data"]["topology.json"].as_str().unwrap()).unwrap();
    doc["epoch"] = json!(5);
    doc["servers"].as_object_mut().unwrap().remove("Server2");
    for shard in doc["shards"].as_array_mut().unwrap() {
        shard["replicas"] = json!({ "Server0": "ready", "Server1": "ready" });
        if shard["primary"] == "Server2" {
            shard["primary"] = json!("Server0");
        }
    }
    cm["data"]["topology.json"] = json!(doc.to_string());
    s.upsert(cm).unwrap();
    assert!(
        s.wait_for(WAIT, |s| names(s, "statefulsets") == ["students-server0", "students-server1"]).await,
        "drained, then removed: {:?}",
        names(s, "statefulsets")
    );
    assert_eq!(topology_epoch(s), Some(5), "the reconcile left the healer's document alone");
}

#[tokio::test]
async fn an_invalid_spec_gives_a_condition_and_an_event_and_creates_nothing() {
    let h = start().await;
    let s = &h.server;
    let mut spec = students(2);
    spec["spec"]["replicas"] = json!(3);
    create(&h, spec).await;
    assert!(s.wait_for(WAIT, |s| condition(s, "Ready") == Some(("False".into(), "InvalidSpec".into()))).await);
    let db = s.get("shardeddatabases", NS, "students").unwrap();
    let ready = db["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert!(ready["message"].as_str().unwrap().contains("spec.replicas (3) exceeds spec.servers (2)"), "{ready}");
    assert!(
        s.wait_for(WAIT, |s| s
            .list("events.events.k8s.io", NS)
            .iter()
            .any(|e| e["reason"] == "InvalidSpec" && e["regarding"]["name"] == "students"))
            .await,
        "an event is recorded"
    );
    assert!(s.list("statefulsets", NS).is_empty(), "nothing is built from an invalid spec");

    // Fixing the spec proceeds.
    patch_spec(&h, json!({ "replicas": 2 })).await;
    assert!(s.wait_for(WAIT, |s| names(s, "statefulsets").len() == 2).await);
    assert!(s.wait_for(WAIT, |s| condition(s, "Ready").is_some_and(|c| c.1 == "ServersNotReady")).await);
}

#[tokio::test]
async fn a_deleted_child_is_recreated() {
    let h = start().await;
    let s = &h.server;
    create(&h, students(2)).await;
    assert!(s.wait_for(WAIT, |s| s.get("statefulsets", NS, "students-server1").is_some()).await);
    let password = s.get("secrets", NS, "students-postgres").unwrap()["data"]["password"].clone();
    s.delete("statefulsets", NS, "students-server1").unwrap();
    s.delete("configmaps", NS, "students-topology").unwrap();
    assert!(s.wait_for(WAIT, |s| s.get("statefulsets", NS, "students-server1").is_some()).await);
    assert!(s.wait_for(WAIT, |s| topology_epoch(s).is_some()).await, "topology republished");
    assert_eq!(s.get("secrets", NS, "students-postgres").unwrap()["data"]["password"], password);
}

/// What a healer wrote into the topology is the operator's record of the data: a spec change
/// leaves it alone (the healer carries the change out), and a write from a stale read must be
/// refused, not applied over it.
#[tokio::test]
async fn a_spec_change_leaves_the_healers_document_alone_and_stale_writes_are_refused() {
    let h = start().await;
    let s = &h.server;
    create(&h, students(3)).await;
    assert!(s.wait_for(WAIT, |s| topology_epoch(s) == Some(1)).await);

    // As the healer would: sh1 failed over from Server0 to Server1, whose copy is recorded.
    let mut cm = s.get("configmaps", NS, "students-topology").unwrap();
    let mut doc: Value = serde_json::from_str(cm["data"]["topology.json"].as_str().unwrap()).unwrap();
    assert_eq!(doc["shards"][0]["primary"], "Server0");
    doc["epoch"] = json!(7);
    doc["shards"][0]["primary"] = json!("Server1");
    doc["shards"][0]["replicas"]["Server0"] = json!("recovering");
    doc["shards"][0]["copies"] = json!({ "Server1": "c1" });
    cm["data"]["topology.json"] = json!(doc.to_string());
    s.upsert(cm).unwrap();

    let mut shards = students(3)["spec"]["shards"].clone();
    shards.as_array_mut().unwrap().push(json!({ "id": "sh3", "low": 8192, "size": 4096 }));
    patch_spec(&h, json!({ "shards": shards })).await;
    wait_observed(s).await;
    let cm = s.get("configmaps", NS, "students-topology").unwrap();
    let after: Value = serde_json::from_str(cm["data"]["topology.json"].as_str().unwrap()).unwrap();
    assert_eq!(after, doc, "the failover and the recorded copy are kept; sh3 waits for the healer");
    // A write computed from an older read fails with a conflict and changes nothing.
    let db: ShardedDatabase = Api::namespaced(s.client(), NS).get("students").await.unwrap();
    let owner = operator::k8s::build::Owner::of(&db).unwrap();
    let read = operator::k8s::topology::read(&s.client(), &owner).await.unwrap().unwrap();
    let mut stale = read.topology.clone().unwrap();
    stale.epoch += 1;
    let mut newer = s.get("configmaps", NS, "students-topology").unwrap();
    newer["metadata"]["annotations"] = json!({ "touched": "yes" });
    s.upsert(newer).unwrap();
    let refused = operator::k8s::topology::write(&s.client(), &owner, &stale, Some(&read.resource_version)).await;
    assert!(matches!(refused, Err(operator::k8s::topology::WriteError::Conflict(_))), "{refused:?}");
    assert_eq!(topology_epoch(s), Some(7));
    let created = operator::k8s::topology::write(&s.client(), &owner, &stale, None).await;
    assert!(matches!(created, Err(operator::k8s::topology::WriteError::Conflict(_))), "it exists: {created:?}");
}

/// The first container of a workload's pod template.
fn first_container(server: &FakeApiServer, kind: &str, name: &str) -> Value {
    server.get(kind, NS, name).unwrap()["spec"]["template"]["spec"]["containers"][0].clone()
}

fn has_tls_dir(container: &Value) -> bool {
    container["args"].as_array().unwrap().iter().any(|a| a == "--tls-dir")
}

fn mode_env(container: &Value) -> Option<String> {
    let env = container["env"].as_array()?;
    let var = env.iter().find(|e| e["name"] == "SHARDDB_INTERNAL_AUTH")?;
    var["value"].as_str().map(str::to_owned)
}

/// In internal-auth `none` nothing of the trust layer is made and the pods are plain; the mode
/// stays `none` when the field is removed (the servers exist and there is no CA: a database a
/// previous release made looks the same); setting `strict` makes the CA and the certificates,
/// and starts the climb at its first rung (templates serving TLS and plain HTTP, `migrate`: the
/// pods here never roll, so it goes no further; `k8s_rollout` climbs all the way), which then
/// goes on, the CA existing, when the field is removed again.
#[tokio::test]
async fn none_makes_no_certificate_sticks_and_strict_set_by_the_user_makes_them() {
    let h = start().await;
    let s = &h.server;
    let mut spec = students(2);
    spec["spec"]["tls"] = json!({ "internalAuth": "none" });
    create(&h, spec).await;
    assert!(s.wait_for(WAIT, |s| condition(s, "InternalAuth").is_some()).await, "status written");
    assert_eq!(condition(s, "InternalAuth"), Some(("False".into(), "None".into())));
    assert_eq!(names(s, "statefulsets"), ["students-server0", "students-server1"]);
    assert_eq!(names(s, "secrets"), ["students-postgres"], "no CA, certificate or admin token");
    for (kind, name) in [("statefulsets", "students-server0"), ("deployments", "students-router")] {
        let c = first_container(s, kind, name);
        assert!(!has_tls_dir(&c) && c["volumeMounts"].is_null(), "{name} is plain: {c}");
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], Value::Null, "{name}: an HTTP probe");
        assert_eq!(mode_env(&c).as_deref(), Some("none"), "{name}");
    }
    let plain_events =
        |s: &FakeApiServer| s.list("events.events.k8s.io", NS).iter().filter(|e| e["reason"] == "InternalAuth").count();
    assert!(s.wait_for(WAIT, |s| plain_events(s) == 1).await, "the mode is announced");

    api(&h)
        .patch("students", &PatchParams::default(), &Patch::Merge(&json!({ "spec": { "tls": null } })))
        .await
        .unwrap();
    wait_observed(s).await;
    assert_eq!(condition(s, "InternalAuth"), Some(("False".into(), "None".into())), "none sticks");
    assert_eq!(names(s, "secrets"), ["students-postgres"]);
    let reason = |s: &FakeApiServer| {
        let db = s.get("shardeddatabases", NS, "students").unwrap();
        let c = db["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "InternalAuth").cloned();
        c.map(|c| c["message"].as_str().unwrap_or_default().to_owned()).unwrap_or_default()
    };
    assert!(reason(s).contains("taken over"), "now decided, not set: {}", reason(s));

    patch_spec(&h, json!({ "tls": { "internalAuth": "strict" } })).await;
    let climbing = |s: &FakeApiServer| condition(s, "InternalAuth") == Some(("False".into(), "Climbing".into()));
    assert!(s.wait_for(WAIT, climbing).await);
    assert!(reason(s).contains("climbing to internal-auth strict: rung 1 of 3"), "{}", reason(s));
    assert_eq!(
        names(s, "secrets"),
        [
            "students-admin-token",
            "students-ca",
            "students-postgres",
            "students-router-tls",
            "students-tls-server0",
            "students-tls-server1"
        ]
    );
    for (kind, name) in [("statefulsets", "students-server0"), ("deployments", "students-router")] {
        let c = first_container(s, kind, name);
        assert!(has_tls_dir(&c), "{name} has its certificate: {c}");
        assert_eq!(mode_env(&c).as_deref(), Some("migrate"), "{name}: serves both");
    }
    let server = first_container(s, "statefulsets", "students-server1");
    assert_eq!(server["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert!(s.wait_for(WAIT, |s| plain_events(s) == 2).await, "the change is announced");

    api(&h)
        .patch("students", &PatchParams::default(), &Patch::Merge(&json!({ "spec": { "tls": null } })))
        .await
        .unwrap();
    wait_observed(s).await;
    assert!(climbing(s), "the climb goes on: the CA exists");
    let c = first_container(s, "statefulsets", "students-server0");
    assert!(has_tls_dir(&c) && mode_env(&c).as_deref() == Some("migrate"), "{c}");
}
