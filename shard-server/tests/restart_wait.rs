//! The start-up wait for a predecessor's read leases (see `replication::lease`): a server
//! declared to have no predecessor acknowledges at once, and the same server restarted (a
//! predecessor now exists) holds acknowledgements back until a lease has passed. The lease here
//! is long, so the first bound holds on any machine and the second cannot pass by accident.

mod common;

use common::Cluster;
use shard_server::api::{Op, WriteRequest};
use shard_server::schema::{Row, Value};
use std::time::Duration;

fn write(k: i64) -> WriteRequest {
    let row = Row(vec![Value::Int(k), Value::Text("n".into()), Value::Int(1)]);
    WriteRequest { epoch: Some(1), ops: vec![Op::Insert { row }], dry_run: false }
}

#[tokio::test]
async fn only_a_server_without_predecessor_acknowledges_within_a_lease_of_its_start() {
    let lease = Duration::from_secs(60);
    let mut c = Cluster::start_with_lease(2, &[("sh1", 0, 1000, 0, &[0, 1])], lease, Duration::from_millis(500)).await;
    for s in &c.servers {
        s.node.as_ref().expect("running").declare_no_predecessor();
    }
    tokio::time::timeout(lease / 2, c.client(0).write("sh1", &write(1)))
        .await
        .expect("a server with no predecessor acknowledges without waiting a lease")
        .unwrap();

    c.kill(0).await;
    c.restart(0).await;
    let held = tokio::time::timeout(Duration::from_secs(5), c.client(0).write("sh1", &write(2))).await;
    assert!(held.is_err(), "a restarted primary acknowledged before its predecessor's leases ran out: {held:?}");
}
