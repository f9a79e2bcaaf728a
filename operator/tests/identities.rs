//! The database's identities against the in-memory API server, with the real `Controller`: the
//! CA, a certificate Secret per server and for the routers, the admin token, what each pod
//! mounts, the NetworkPolicy, renewal of a certificate that is due, and a user-supplied CA.

mod common;

use common::Reconciler;
use fake_apiserver::FakeApiServer;
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use operator::crd::ShardedDatabase;
use operator::k8s::build::netpol::OperatorPods;
use operator::k8s::controller::Config;
use serde_json::{Value, json};
use shard_server::tls::issue::{self, CA_VALIDITY, Ca, LeafRequest};
use shard_server::tls::{DatabaseId, Identity};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

const WAIT: Duration = Duration::from_secs(15);
const NS: &str = "default";

type Harness = Reconciler;

fn operator_pods() -> OperatorPods {
    OperatorPods {
        namespace: "sharddb-system".into(),
        labels: BTreeMap::from([("app.kubernetes.io/name".into(), "sharddb-operator".into())]),
    }
}

async fn start(config: Config) -> Harness {
    Reconciler::start(config).await
}

async fn create(h: &Harness, tls: Option<Value>) {
    create_in(h, NS, tls).await
}

async fn create_in(h: &Harness, namespace: &str, tls: Option<Value>) {
    let mut spec = json!({
        "schema": { "columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"] },
        "shards": [{ "id": "sh1", "low": 0, "size": 4096 }],
        "replicas": 2,
        "servers": 2
    });
    if let Some(tls) = tls {
        spec["tls"] = tls;
    }
    let db: ShardedDatabase = serde_json::from_value(json!({
        "apiVersion": "sharddb.io/v1alpha1",
        "kind": "ShardedDatabase",
        "metadata": { "name": "students", "namespace": namespace },
        "spec": spec
    }))
    .unwrap();
    Api::<ShardedDatabase>::namespaced(h.server.client(), namespace).create(&PostParams::default(), &db).await.unwrap();
}

/// A Secret's key, decoded.
fn data(s: &FakeApiServer, secret: &str, key: &str) -> Option<String> {
    let o = s.get("secrets", NS, secret)?;
    let bytes: k8s_openapi::ByteString = serde_json::from_value(o["data"][key].clone()).ok()?;
    String::from_utf8(bytes.0).ok()
}

fn identity_of(cert_pem: &str) -> Identity {
    Identity::from_certificate(&issue::first_certificate(cert_pem).unwrap()).unwrap()
}

fn students() -> DatabaseId {
    DatabaseId::new(NS, "students")
}

/// Checks that `cert` was signed by `ca` (chain verification as a server does it).
fn signed_by(cert: &str, ca: &str) -> bool {
    !issue::needs_renewal(cert, ca, None, SystemTime::now())
}

async fn wait_secret(s: &FakeApiServer, name: &str) {
    assert!(s.wait_for(WAIT, |s| s.get("secrets", NS, name).is_some()).await, "secret {name} made");
}

#[tokio::test]
async fn every_component_gets_a_certificate_of_the_database_ca_and_mounts_it() {
    let h = start(Config { network_policy: Some(operator_pods()), ..Config::default() }).await;
    let s = &h.server;
    create(&h, None).await;
    for name in
        ["students-ca", "students-tls-server0", "students-tls-server1", "students-router-tls", "students-admin-token"]
    {
        wait_secret(s, name).await;
    }
    let ca = data(s, "students-ca", "ca.crt").unwrap();
    assert!(data(s, "students-ca", "ca.key").unwrap().contains("PRIVATE KEY"));
    for (secret, want) in [
        ("students-tls-server0", Identity::server(students(), "Server0").unwrap()),
        ("students-tls-server1", Identity::server(students(), "Server1").unwrap()),
        ("students-router-tls", Identity::router(students()).unwrap()),
    ] {
        let o = s.get("secrets", NS, secret).unwrap();
        assert_eq!(o["type"], "kubernetes.io/tls", "{secret}");
        let cert = data(s, secret, "tls.crt").unwrap();
        assert_eq!(identity_of(&cert), want, "{secret}");
        assert!(signed_by(&cert, &ca), "{secret} chains to the database's CA");
        assert_eq!(data(s, secret, "ca.crt").unwrap(), ca);
        assert!(data(s, secret, "tls.key").unwrap().contains("PRIVATE KEY"));
    }
    assert_eq!(data(s, "students-router-tls", "operator-ca.crt").as_deref(), Some(h.ctx.pki.operator_ca_pem()));
    assert_eq!(data(s, "students-admin-token", "token").unwrap().len(), 32);
    // The operator holds its own certificate for this database, in memory only. It is issued
    // after the Secrets are written, so it may come a moment after the last of them.
    assert!(s.wait_for(WAIT, |_| h.ctx.pki.credentials(&students()).is_some()).await, "registered");
    let credentials = h.ctx.pki.credentials(&students()).expect("registered");
    assert_eq!(credentials.identity().unwrap(), Identity::operator(students()).unwrap());

    // What the pods mount: each server its own certificate; the routers theirs and the token.
    assert!(s.wait_for(WAIT, |s| s.get("deployments", NS, "students-router").is_some()).await);
    let sts = s.get("statefulsets", NS, "students-server1").unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(volume["secret"]["secretName"], "students-tls-server1");
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "tls" && m["mountPath"] == "/etc/sharddb/tls" && m["readOnly"] == true));
    assert_eq!(pod["containers"][0]["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    let router = s.get("deployments", NS, "students-router").unwrap();
    let pod = &router["spec"]["template"]["spec"];
    let secrets: Vec<&str> =
        pod["volumes"].as_array().unwrap().iter().filter_map(|v| v["secret"]["secretName"].as_str()).collect();
    assert_eq!(secrets, ["students-router-tls", "students-admin-token"]);
    let args: Vec<&str> = pod["containers"][0]["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(args.windows(2).any(|w| w == ["--admin-token-file", "/etc/sharddb/admin/token"]), "{args:?}");

    // Servers admit only the database's routers, its servers and the operator.
    assert!(s.wait_for(WAIT, |s| s.get("networkpolicies", NS, "students-servers").is_some()).await);
    let policy = s.get("networkpolicies", NS, "students-servers").unwrap();
    let from = policy["spec"]["ingress"][0]["from"].as_array().unwrap();
    assert_eq!(from.len(), 3, "{policy}");
    assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "router");
    assert_eq!(from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "server");
    assert_eq!(from[2]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "sharddb-system");
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "server");

    // A steady reconcile keeps every certificate and the token as they are.
    let before: Vec<Option<String>> =
        ["students-tls-server0", "students-router-tls"].iter().map(|n| data(s, n, "tls.crt")).collect();
    let token = data(s, "students-admin-token", "token");
    let reconciles = h.ctx.metrics.reconciles();
    let mut db = s.get("shardeddatabases", NS, "students").unwrap();
    db["metadata"]["annotations"] = json!({ "poke": "1" });
    s.upsert(db).unwrap();
    assert!(s.wait_for(WAIT, |_| h.ctx.metrics.reconciles() > reconciles).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<Option<String>> =
        ["students-tls-server0", "students-router-tls"].iter().map(|n| data(s, n, "tls.crt")).collect();
    assert_eq!(after, before);
    assert_eq!(data(s, "students-admin-token", "token"), token);
}

#[tokio::test]
async fn a_certificate_that_is_due_gone_or_foreign_is_issued_again() {
    let h = start(Config::default()).await;
    let s = &h.server;
    create(&h, None).await;
    wait_secret(s, "students-tls-server0").await;
    wait_secret(s, "students-tls-server1").await;
    wait_secret(s, "students-router-tls").await;
    let ca_pem = (data(s, "students-ca", "ca.crt").unwrap(), data(s, "students-ca", "ca.key").unwrap());
    let ca = Ca::from_pem(&ca_pem.0, &ca_pem.1).unwrap();
    let poke = |n: &str| {
        let mut db = s.get("shardeddatabases", NS, "students").unwrap();
        db["metadata"]["annotations"] = json!({ "poke": n });
        s.upsert(db).unwrap();
    };

    // Server0's certificate has 10 days left: due (renewal starts with 30 left).
    let mut request = LeafRequest::new(Identity::server(students(), "Server0").unwrap());
    request.validity = Duration::from_secs(10 * 24 * 3600);
    let due = ca.issue(&request, SystemTime::now()).unwrap();
    let mut secret = s.get("secrets", NS, "students-tls-server0").unwrap();
    secret["stringData"] = json!({ "tls.crt": due.cert_pem, "tls.key": due.key_pem });
    s.upsert(secret).unwrap();
    // Server1's was signed by another CA (a CA that is not the database's).
    let stranger = Ca::generate("stranger", SystemTime::now(), CA_VALIDITY).unwrap();
    let foreign =
        stranger.issue(&LeafRequest::new(Identity::server(students(), "Server1").unwrap()), SystemTime::now()).unwrap();
    let mut secret = s.get("secrets", NS, "students-tls-server1").unwrap();
    secret["stringData"] = json!({ "tls.crt": foreign.cert_pem });
    s.upsert(secret).unwrap();
    // The routers' is gone.
    s.delete("secrets", NS, "students-router-tls").unwrap();
    poke("1");

    let renewed = |s: &FakeApiServer| {
        let good = |name: &str| {
            data(s, name, "tls.crt").is_some_and(|c| {
                signed_by(&c, &ca_pem.0)
                    && issue::not_after(&c).unwrap() > SystemTime::now() + Duration::from_secs(80 * 24 * 3600)
            })
        };
        good("students-tls-server0") && good("students-tls-server1") && good("students-router-tls")
    };
    assert!(s.wait_for(WAIT, renewed).await, "every certificate is issued again under the database's CA");
    assert_eq!(identity_of(&data(s, "students-tls-server1", "tls.crt").unwrap()).name, "Server1");
    assert_eq!(data(s, "students-ca", "ca.crt").unwrap(), ca_pem.0, "the CA itself is kept");
}

#[tokio::test]
async fn a_user_supplied_ca_signs_every_certificate_and_none_is_made() {
    let h = start(Config { require_admin_token: false, ..Config::default() }).await;
    let s = &h.server;
    // As cert-manager writes a CA Certificate's Secret.
    let ca = Ca::generate("company CA", SystemTime::now(), CA_VALIDITY).unwrap();
    s.upsert(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": "company-ca", "namespace": NS },
        "stringData": { "tls.crt": ca.cert_pem(), "tls.key": ca.key_pem(), "ca.crt": ca.cert_pem() }
    }))
    .unwrap();
    create(&h, Some(json!({ "caSecretName": "company-ca", "clientTls": true }))).await;
    wait_secret(s, "students-router-tls").await;
    wait_secret(s, "students-tls-server1").await;
    for secret in ["students-tls-server0", "students-tls-server1", "students-router-tls"] {
        assert!(signed_by(&data(s, secret, "tls.crt").unwrap(), ca.cert_pem()), "{secret}");
    }
    assert!(s.get("secrets", NS, "students-ca").is_none(), "no CA of our own");
    assert!(s.get("secrets", NS, "students-admin-token").is_none(), "no token when none is required");
    assert!(s.wait_for(WAIT, |s| s.get("deployments", NS, "students-router").is_some()).await);
    let router = s.get("deployments", NS, "students-router").unwrap();
    let c = &router["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--serve-tls") && !args.contains(&"--admin-token-file"), "{args:?}");
    assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
}

#[tokio::test]
async fn a_missing_user_ca_is_reported_and_nothing_is_issued() {
    let h = start(Config::default()).await;
    let s = &h.server;
    create(&h, Some(json!({ "caSecretName": "not-there" }))).await;
    let reported = |s: &FakeApiServer| {
        s.list("events.events.k8s.io", NS).iter().any(|e| {
            e["reason"] == "CertificateAuthority" && e["note"].as_str().is_some_and(|n| n.contains("not-there"))
        })
    };
    assert!(s.wait_for(WAIT, reported).await, "an event names the missing Secret");
    assert!(s.get("secrets", NS, "students-tls-server0").is_none());
    assert!(s.list("statefulsets", NS).is_empty(), "no pod starts without its certificate");
}

/// With a namespace list (namespaced Roles instead of the ClusterRole) only databases of those
/// namespaces are reconciled; one elsewhere is left alone.
#[tokio::test]
async fn with_a_namespace_list_only_those_namespaces_are_managed() {
    let h = start(Config { namespaces: Some(vec!["team-a".into()]), ..Config::default() }).await;
    let s = &h.server;
    create_in(&h, "team-b", None).await;
    create_in(&h, "team-a", None).await;
    let built = |s: &FakeApiServer| s.list("statefulsets", "team-a").len() == 2;
    assert!(s.wait_for(WAIT, built).await, "team-a's database is built");
    assert!(s.get("secrets", "team-a", "students-tls-server0").is_some());
    // Reconciles of team-a are done by now; one of team-b would have started at the same time.
    assert!(
        s.wait_for(WAIT, |s| s
            .get("shardeddatabases", "team-a", "students")
            .is_some_and(|d| d["status"]["conditions"].is_array()))
            .await
    );
    assert!(s.list("statefulsets", "team-b").is_empty(), "team-b is not watched");
    assert!(s.list("secrets", "team-b").is_empty());
    assert!(s.get("shardeddatabases", "team-b", "students").unwrap()["status"].is_null());
    assert!(h.ctx.pki.credentials(&DatabaseId::new("team-b", "students")).is_none());
}

/// Every operator replica serves the admin endpoint, but only the leader reconciles: a follower
/// learns each database's CA by reading it, so that it too admits the database's routers, and
/// forgets it once the database is gone.
#[tokio::test]
async fn a_replica_that_does_not_reconcile_still_trusts_every_databases_routers() {
    let server = FakeApiServer::start().await;
    server.install_crd(&ShardedDatabase::crd()).unwrap();
    // The leader made the database and its CA; this replica only reads.
    let db: ShardedDatabase = serde_json::from_value(json!({
        "apiVersion": "sharddb.io/v1alpha1", "kind": "ShardedDatabase",
        "metadata": { "name": "students", "namespace": NS },
        "spec": { "schema": { "columns": ["k"], "dtypes": ["Number"] }, "shards": [{ "id": "a", "low": 0, "size": 1 }], "servers": 1 }
    }))
    .unwrap();
    Api::<ShardedDatabase>::namespaced(server.client(), NS).create(&PostParams::default(), &db).await.unwrap();
    let ca = Ca::generate("students", SystemTime::now(), CA_VALIDITY).unwrap();
    server
        .upsert(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "students-ca", "namespace": NS },
            "stringData": { "ca.crt": ca.cert_pem(), "ca.key": ca.key_pem() }
        }))
        .unwrap();
    let pki = operator::k8s::pki::OperatorPki::ephemeral(Some("https://127.0.0.1:8081"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(operator::k8s::identities::trust_databases(
        server.client(),
        pki.clone(),
        None,
        Duration::from_millis(100),
        async move {
            let _ = stopped.await;
        },
    ));
    let trusted = |pki: &operator::k8s::pki::OperatorPki| pki.credentials(&students()).is_some();
    assert!(server.wait_for(WAIT, |_| trusted(&pki)).await, "the database's CA is learnt");
    assert!(server.list("secrets", NS).len() == 1, "nothing is written");
    Api::<ShardedDatabase>::namespaced(server.client(), NS).delete("students", &Default::default()).await.unwrap();
    assert!(server.wait_for(WAIT, |_| !trusted(&pki)).await, "a database that is gone is forgotten");
    let _ = stop.send(());
}
