//! The ConfigMap topology source against the in-process fake API server: a new epoch arrives
//! through the watch, an older one and garbage are ignored.

use fake_apiserver::FakeApiServer;
use serde_json::json;
use shard_server::topology::Topology;
use shard_server::topology_source::{parse_configmap_ref, watch_configmap};
use std::time::Duration;

fn document(epoch: u64) -> String {
    json!({
        "version": 1,
        "epoch": epoch,
        "schema": { "columns": ["k", "v"], "dtypes": ["Number", "String"] },
        "servers": { "Server0": { "id": 0, "url": "http://s0:5000" } },
        "shards": [{ "id": "sh1", "low": 0, "size": 10, "primary": "Server0", "replicas": { "Server0": "ready" } }]
    })
    .to_string()
}

fn configmap(name: &str, topology: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": "db" },
        "data": { "topology.json": topology }
    })
}

#[tokio::test]
async fn follows_the_configmap_and_never_goes_backwards() {
    let server = FakeApiServer::start().await;
    Topology::parse(document(1).as_bytes()).expect("the test document is valid");
    let mut rx = watch_configmap(server.client(), "db", "students-topology");
    // Another ConfigMap in the namespace is not ours.
    server.upsert(configmap("other", &document(9))).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.borrow().is_none(), "no topology until our ConfigMap exists");

    server.upsert(configmap("students-topology", &document(2))).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
    assert_eq!(rx.borrow().as_ref().unwrap().epoch, 2);

    server.upsert(configmap("students-topology", "{ not json")).unwrap();
    server.upsert(configmap("students-topology", &document(1))).unwrap();
    server.upsert(configmap("students-topology", &document(3))).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
    assert_eq!(rx.borrow().as_ref().unwrap().epoch, 3, "garbage and the older epoch were skipped");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!rx.has_changed().unwrap(), "nothing older was published afterwards");
}

#[test]
fn the_flag_is_namespace_slash_name() {
    assert_eq!(parse_configmap_ref("prod/students-topology"), Ok(("prod".into(), "students-topology".into())));
    for bad in ["students-topology", "/x", "x/", "a/b/c"] {
        assert!(parse_configmap_ref(bad).is_err(), "{bad}");
    }
}
