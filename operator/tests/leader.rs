//! Leader election against the in-process fake API server, with a 1 s Lease renewed every 200 ms:
//! one holder at a time, takeover after expiry, release, and races decided by resourceVersion.

use fake_apiserver::FakeApiServer;
use futures::future::join_all;
use operator::k8s::leader::{Attempt, LeaderElector, LeadershipLost, LeaseConfig};
use serde_json::{Value, json};
use std::time::Duration;

const NS: &str = "default";
const LEASE: &str = "sharddb-operator";

fn elector(server: &FakeApiServer, identity: &str) -> LeaderElector {
    let mut config = LeaseConfig::new(LEASE, NS, identity);
    config.lease_duration = Duration::from_secs(1);
    config.renew_deadline = Duration::from_millis(700);
    config.retry_period = Duration::from_millis(200);
    LeaderElector::new(server.client(), config)
}

fn holder(server: &FakeApiServer) -> Option<String> {
    let lease = server.get("leases.coordination.k8s.io", NS, LEASE)?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

fn lease(holder: &str, renew_time: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": LEASE, "namespace": NS },
        "spec": { "holderIdentity": holder, "leaseDurationSeconds": 1, "renewTime": renew_time },
    })
}

async fn acquire_within(elector: &LeaderElector, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, elector.acquire()).await.is_ok()
}

#[tokio::test]
async fn a_single_elector_creates_and_holds_the_lease() {
    let server = FakeApiServer::start().await;
    let a = elector(&server, "a");
    assert!(acquire_within(&a, Duration::from_secs(5)).await);
    assert_eq!(holder(&server).as_deref(), Some("a"));
    let stored = server.get("leases.coordination.k8s.io", NS, LEASE).unwrap();
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 1);
    // Renewing keeps it and moves the renew time.
    let before = stored["spec"]["renewTime"].clone();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    let after = server.get("leases.coordination.k8s.io", NS, LEASE).unwrap();
    assert_ne!(after["spec"]["renewTime"], before);
    assert_eq!(after["spec"]["leaseTransitions"], 0);
}

#[tokio::test]
async fn a_contender_waits_while_the_holder_renews_and_takes_over_after_expiry() {
    let server = FakeApiServer::start().await;
    let a = elector(&server, "a");
    let b = elector(&server, "b");
    assert!(acquire_within(&a, Duration::from_secs(5)).await);
    let holding = tokio::spawn(async move { a.hold().await });

    // Three lease durations: a keeps renewing, so b never gets it.
    assert!(!acquire_within(&b, Duration::from_secs(3)).await);
    assert_eq!(holder(&server).as_deref(), Some("a"));
    // b either sees a's unexpired Lease, or (on a slow machine, a renewing just as b read an
    // about-to-expire Lease) loses the write race; it never gets the Lease.
    let attempt = b.try_acquire_or_renew().await.unwrap();
    assert!(matches!(&attempt, Attempt::HeldBy(h) if h == "a") || attempt == Attempt::Conflict, "{attempt:?}");

    // a stops renewing (as a crashed process would): b takes over once the Lease expires.
    holding.abort();
    let _ = holding.await;
    let stopped = std::time::Instant::now();
    assert!(acquire_within(&b, Duration::from_secs(5)).await);
    assert!(stopped.elapsed() >= Duration::from_millis(500), "took over before the Lease expired");
    assert_eq!(holder(&server).as_deref(), Some("b"));
    let stored = server.get("leases.coordination.k8s.io", NS, LEASE).unwrap();
    assert_eq!(stored["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn the_holder_notices_another_holder_and_stops() {
    let server = FakeApiServer::start().await;
    let a = elector(&server, "a");
    assert!(acquire_within(&a, Duration::from_secs(5)).await);
    // Someone else writes the Lease as theirs (e.g. after a long pause of ours).
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    server.upsert(lease("x", now.as_str().unwrap())).unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(5), a.hold()).await.expect("hold returns");
    assert_eq!(lost, LeadershipLost::TakenOver("x".into()));
}

#[tokio::test]
async fn the_holder_gives_up_when_it_cannot_renew_before_the_deadline() {
    let server = FakeApiServer::start().await;
    let a = elector(&server, "a");
    assert!(acquire_within(&a, Duration::from_secs(5)).await);
    // The API server goes away: every renewal fails.
    drop(server);
    let started = std::time::Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(10), a.hold()).await.expect("hold returns");
    assert_eq!(lost, LeadershipLost::RenewDeadline);
    assert!(started.elapsed() < Duration::from_secs(1), "gave up after the Lease could have expired");
}

#[tokio::test]
async fn releasing_hands_the_lease_over_without_waiting_for_expiry() {
    let server = FakeApiServer::start().await;
    let a = elector(&server, "a");
    let b = elector(&server, "b");
    assert!(acquire_within(&a, Duration::from_secs(5)).await);
    a.release().await.unwrap();
    assert_eq!(holder(&server), None);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    // Releasing a Lease someone else holds leaves it alone.
    a.release().await.unwrap();
    assert_eq!(holder(&server).as_deref(), Some("b"));
}

#[tokio::test]
async fn of_contenders_racing_for_a_fresh_lease_exactly_one_wins() {
    let server = FakeApiServer::start().await;
    let contenders: Vec<_> = (0..6).map(|i| elector(&server, &format!("c{i}"))).collect();
    let results = join_all(contenders.iter().map(|c| c.try_acquire_or_renew())).await;
    let winners: Vec<_> = results.iter().filter(|r| matches!(r, Ok(Attempt::Held))).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[tokio::test]
async fn of_contenders_racing_for_an_expired_lease_exactly_one_wins() {
    let server = FakeApiServer::start().await;
    server.upsert(lease("gone", "2020-01-01T00:00:00.000000Z")).unwrap();
    for round in 0..5 {
        let contenders: Vec<_> = (0..6).map(|i| elector(&server, &format!("r{round}c{i}"))).collect();
        let results = join_all(contenders.iter().map(|c| c.try_acquire_or_renew())).await;
        let winners = results.iter().filter(|r| matches!(r, Ok(Attempt::Held))).count();
        assert_eq!(winners, 1, "round {round}: {results:?}");
        // Expire it again for the next round.
        server.upsert(lease("gone", "2020-01-01T00:00:00.000000Z")).unwrap();
    }
}

#[tokio::test]
async fn a_stale_resource_version_is_refused() {
    // The guarantee the elector relies on: a replace with the resourceVersion read before another
    // write gets 409.
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, PostParams};
    let server = FakeApiServer::start().await;
    server.upsert(lease("gone", "2020-01-01T00:00:00.000000Z")).unwrap();
    let api: Api<Lease> = Api::namespaced(server.client(), NS);
    let read = api.get(LEASE).await.unwrap();
    let mut first = read.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("a".into());
    api.replace(LEASE, &PostParams::default(), &first).await.unwrap();
    let mut second = read;
    second.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let err = api.replace(LEASE, &PostParams::default(), &second).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.is_conflict()));
    assert_eq!(holder(&server).as_deref(), Some("a"));
}
