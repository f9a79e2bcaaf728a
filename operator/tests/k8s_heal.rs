//! The Kubernetes body of the healer: the real `Controller` and healer against the in-process fake
//! API server, and real shard servers (in-process, over a throwaway Postgres) that follow the
//! topology ConfigMap through a watch on that API. The servers are reached at local addresses
//! through the injectable `ServerUrls`, as they would be at their headless-Service names.
//!
//! Database `students`: shards sh1 (primary Server0, copy on Server1) and sh2 (primary Server2,
//! copy on Server0), per the count-mode placement of 2 shards × 2 replicas on 3 servers.
//!
//! The admin verbs go through the operator's admin endpoint (`k8s::admin`), served here over TLS
//! as in `sharddb-operator run`, with the router certificate the operator put in the routers'
//! Secret; the spec changes they make are carried out by the healer's moves. Servers present
//! certificates of the database's CA (the one the operator made in `students-ca`), and the
//! healer reaches them with its own certificate for the database, as in a cluster; but for a
//! database in internal-auth `none`, whose servers and routers speak plain HTTP.

mod common;

use common::{Harness, NS, WAIT, secret, state, students_id};
use serde_json::{Value, json};
use shard_server::tls::issue::{Ca, LeafRequest};
use shard_server::tls::source::Pem;
use shard_server::tls::{Credentials, DatabaseId, Identity, InternalAuth, TlsSource};
use shard_server::topology::Topology;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_volume_heals_back_to_ready_and_a_quiet_cluster_is_left_alone() {
    let mut h = Harness::start().await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..50).await;
    let before = h.topology().unwrap();
    let old_copy = before.shard("sh1").unwrap().copies["Server1"].clone();

    // Nothing changes: several healer rounds and a forced reconcile later, nothing was written to
    // the ConfigMap.
    h.api.clear_writes();
    let mut db = h.api.get("shardeddatabases", NS, "students").unwrap();
    db["metadata"]["annotations"] = json!({ "poke": "1" });
    h.api.upsert(db).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rewrites: Vec<_> = h.api.writes().into_iter().filter(|w| w.changed && w.resource == "configmaps").collect();
    assert!(rewrites.is_empty(), "the topology is not rewritten when nothing changed: {rewrites:?}");
    assert_eq!(h.topology(), Some(before.clone()));

    // Server1 comes back empty, as a pod rescheduled without its volume.
    let lost = Instant::now();
    h.kill(1).await;
    h.restart(1, true).await;
    let healed = |t: &Topology| {
        let sh1 = t.shard("sh1").unwrap();
        state(t, "sh1", "Server1").as_deref() == Some("ready") && sh1.copies.get("Server1") != Some(&old_copy)
    };
    assert!(
        h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| healed(&t))).await,
        "Server1's copy of sh1 recovered and ready again: {:?}",
        h.topology()
    );
    println!("lost volume: ready again after {:?}", lost.elapsed());
    let after = h.topology().unwrap();
    assert!(after.epoch >= before.epoch + 2, "demoted, then ready: {} → {}", before.epoch, after.epoch);
    assert_eq!(after.shard("sh1").unwrap().primary, "Server0", "the primary stayed");
    assert_eq!(h.contents(1, "sh1").await, h.contents(0, "sh1").await, "the recovered copy equals the primary's");
    assert_eq!(h.contents(1, "sh1").await.0, 50);
    let demoted = |h: &Harness| h.events("Demoted").iter().any(|n| n.contains("sh1 on Server1 lost its data"));
    assert!(h.api.wait_for(WAIT, |_| demoted(&h)).await, "{:?}", h.events("Demoted"));
    let ready = |h: &Harness| h.events("ReplicaReady").iter().any(|n| n.contains("sh1 on Server1 is ready"));
    assert!(h.api.wait_for(WAIT, |_| ready(&h)).await, "{:?}", h.events("ReplicaReady"));
    // The status follows the ConfigMap a reconcile later: wait for the one of this topology (an
    // AllReady from before the volume was lost would satisfy the condition alone).
    let current = |h: &Harness| {
        h.condition("Ready") == Some(("True".into(), "AllReady".into()))
            && h.status()["topologyEpoch"] == json!(after.epoch)
    };
    assert!(h.api.wait_for(WAIT, |_| current(&h)).await, "ready again: {}", h.status());
    assert_eq!(h.shard_status("sh1")["readyReplicas"], json!(["Server0", "Server1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_is_gone_fails_over_and_the_status_shows_the_degraded_shard() {
    let mut h = Harness::start().await;
    h.wait_ready().await;
    h.write(2, "sh2", 4096..4146).await;
    let before = h.topology().unwrap();
    assert_eq!(before.shard("sh2").unwrap().primary, "Server2");

    let gone = Instant::now();
    h.kill(2).await;
    let failed_over = |t: &Topology| t.shard("sh2").is_some_and(|s| s.primary == "Server0");
    assert!(h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| failed_over(&t))).await, "Server0 promoted");
    println!("failover: new primary after {:?}", gone.elapsed());
    let after = h.topology().unwrap();
    assert!(after.epoch > before.epoch, "epoch bumped: {} → {}", before.epoch, after.epoch);
    assert_eq!(state(&after, "sh2", "Server2").as_deref(), Some("recovering"), "the old primary must start over");
    assert_eq!(after.shard("sh1"), before.shard("sh1"), "sh1 did not involve Server2");
    let promoted = |h: &Harness| {
        h.events("Promoted").iter().any(|n| n.contains("Server0 is the primary of sh2, replacing Server2"))
    };
    assert!(h.api.wait_for(WAIT, |_| promoted(&h)).await, "{:?}", h.events("Promoted"));

    // The status shows the degraded shard while Server2 is away.
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Degraded") == Some(("True".into(), "CopiesRecovering".into()))).await,
        "degraded: {}",
        h.status()
    );
    assert!(h.api.wait_for(WAIT, |_| h.shard_status("sh2")["primary"] == "Server0").await, "{}", h.status());
    let sh2 = h.shard_status("sh2");
    assert_eq!(sh2["readyReplicas"], json!(["Server0"]));
    assert_eq!(sh2["recoveringReplicas"], json!(["Server2"]));
    assert_eq!(h.condition("Ready"), Some(("False".into(), "ServersNotReady".into())), "{}", h.status());
    let message =
        h.status()["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap()["message"]
            .clone();
    assert!(message.as_str().unwrap().contains("unreachable: Server2"), "{message}");
    assert!(message.as_str().unwrap().contains("recovering: sh2 on Server2"), "{message}");

    // Acknowledged writes survived on the new primary, which takes new ones.
    assert_eq!(h.contents(0, "sh2").await.0, 50);
    h.write(0, "sh2", 4146..4150).await;

    // The operator restarts while the old primary is away; the new one knows nothing but the
    // ConfigMap. The old primary comes back with its data, and is recovered from the new primary
    // all the same.
    h.stop_operator().await;
    h.start_operator();
    h.restart(2, false).await;
    assert!(
        h.api
            .wait_for(WAIT, |_| h.topology().is_some_and(|t| state(&t, "sh2", "Server2").as_deref() == Some("ready")))
            .await,
        "Server2 ready again"
    );
    println!("failover: old primary ready again after {:?}", gone.elapsed());
    assert_eq!(h.topology().unwrap().shard("sh2").unwrap().primary, "Server0", "no flapping back");
    assert_eq!(h.contents(2, "sh2").await, h.contents(0, "sh2").await);
    assert_eq!(h.contents(2, "sh2").await.0, 54);
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready again: {}",
        h.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_through_the_admin_endpoint_changes_the_resource_and_fills_the_new_server_from_replicas() {
    let mut h = Harness::start_with(4).await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;

    let added = Instant::now();
    let body = json!({ "n": 1, "new_shards": [], "servers": { "Server3": ["sh1", "sh2"] } });
    let (status, answer) = h.admin(reqwest::Method::POST, "add", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "N": 4, "message": "Add Server:3", "status": "successful" }));
    let (spec, _) = h.resource();
    assert_eq!(spec["servers"], 4);
    assert_eq!(spec["placement"]["Server3"], json!(["sh1", "sh2"]), "{spec}");

    assert!(
        h.api.wait_for(WAIT, |api| api.get("statefulsets", NS, "students-server3").is_some()).await,
        "the new server's pod is asked for"
    );
    // Its pod is not up yet: several healer rounds later it has been given nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.topology().unwrap().servers.contains_key("Server3"), "Server3 joins only once it answers");
    assert!(h.events("RecoverFailed").is_empty(), "{:?}", h.events("RecoverFailed"));
    h.restart(3, false).await;
    h.mark_workloads_ready();
    let filled = |t: &Topology| {
        state(t, "sh1", "Server3").as_deref() == Some("ready") && state(t, "sh2", "Server3").as_deref() == Some("ready")
    };
    assert!(
        h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| filled(&t))).await,
        "Server3 holds ready copies of sh1 and sh2: {:?}",
        h.topology()
    );
    println!("add: Server3 filled after {:?}", added.elapsed());
    let t = h.topology().unwrap();
    assert_eq!(t.shard("sh1").unwrap().primary, "Server0", "no needless handover");
    assert_eq!(t.shard("sh2").unwrap().primary, "Server2");
    let rows = h.assert_ready_copies_equal().await;
    assert_eq!(rows, BTreeMap::from([("sh1".to_owned(), 40), ("sh2".to_owned(), 30)]));
    let joined = |h: &Harness| h.events("ReplicaAdded").iter().any(|n| n.contains("sh1 gets a copy on Server3"));
    assert!(h.api.wait_for(WAIT, |_| joined(&h)).await, "{:?}", h.events("ReplicaAdded"));
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready with four servers: {}",
        h.status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_drains_a_server_before_its_statefulset_goes_and_refused_requests_change_nothing() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;

    // Refused requests answer 4xx and leave the resource as it was.
    let before = h.resource();
    assert!(before.1.is_number(), "the resource has a generation");
    let refused = [
        (reqwest::Method::DELETE, "rm", json!({ "n": 1, "servers": ["Server9"] }), 400, "unknown server Server9"),
        (reqwest::Method::DELETE, "rm", json!({ "n": 3, "servers": [] }), 400, "last replica"),
        (reqwest::Method::DELETE, "rm", json!({ "n": 0, "servers": ["Server1"] }), 400, "more than removable"),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 2, "new_shards": [], "servers": { "Server5": ["sh1"] } }),
            400,
            "greater than",
        ),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 1, "new_shards": [], "servers": { "Server1": ["sh1"] } }),
            400,
            "already exists",
        ),
        (
            reqwest::Method::POST,
            "add",
            json!({ "n": 1, "new_shards": [], "servers": { "Server5": ["sh9"] } }),
            400,
            "sh9",
        ),
    ];
    for (method, verb, body, code, says) in refused {
        let (status, answer) = h.admin(method, verb, body.clone()).await;
        assert_eq!(status, code, "{verb} {body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(says), "{verb} {body}: {answer}");
        assert_eq!(h.resource(), before, "{verb} {body} changed nothing");
    }
    let init = json!({ "n": 1, "schema": { "columns": ["a"], "dtypes": ["Number"] }, "shards": [], "servers": null });
    let (status, answer) = h.admin(reqwest::Method::POST, "init", init).await;
    assert_eq!(status, 409, "the resource is the configuration: {answer}");
    assert_eq!(h.resource(), before);
    // A database's router speaks for that database alone.
    let elsewhere = format!("https://{}/databases/{NS}/nosuch/rm", h.admin);
    let (status, answer) = h.admin_at(reqwest::Method::DELETE, &elsewhere, json!({ "n": 1, "servers": [] })).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("only the routers of default/nosuch"), "{answer}");

    // Server2 is sh2's primary: its copy moves to Server1 and the primary hands over first.
    let removed = Instant::now();
    let (status, answer) = h.admin(reqwest::Method::DELETE, "rm", json!({ "n": 1, "servers": ["Server2"] })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "message": { "N": 2, "servers": ["Server2"] }, "status": "successful" }));
    assert!(h.resource().0["placement"].get("Server2").is_none());

    // Until the StatefulSet is gone: whenever Server2 is in the topology its StatefulSet exists,
    // and every shard keeps a ready primary.
    let mut observed = 0;
    loop {
        let sts = h.api.get("statefulsets", NS, "students-server2").is_some();
        let t = h.topology().unwrap();
        for shard in &t.shards {
            assert_eq!(
                shard.replicas.get(&shard.primary).and_then(|s| serde_json::to_value(s).ok()),
                Some(json!("ready")),
                "{} keeps a ready primary (epoch {}): {shard:?}",
                shard.id,
                t.epoch
            );
        }
        if t.servers.contains_key("Server2") {
            assert!(sts, "Server2's StatefulSet stays while it is in the topology (epoch {})", t.epoch);
        } else if !sts {
            break;
        }
        observed += 1;
        assert!(removed.elapsed() < WAIT, "Server2 drained and removed: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rm: Server2 drained and its StatefulSet deleted after {:?} ({observed} looks)", removed.elapsed());
    let t = h.topology().unwrap();
    assert!(!t.servers.contains_key("Server2"));
    let sh2 = t.shard("sh2").unwrap();
    assert_ne!(sh2.primary, "Server2");
    assert_eq!(sh2.replicas.keys().collect::<Vec<_>>(), ["Server0", "Server1"]);
    let rows = h.assert_ready_copies_equal().await;
    assert_eq!(rows, BTreeMap::from([("sh1".to_owned(), 40), ("sh2".to_owned(), 30)]), "no write lost");
    let drained = |h: &Harness| h.events("ServerDrained").iter().any(|n| n.contains("Server2 holds nothing"));
    assert!(h.api.wait_for(WAIT, |_| drained(&h)).await, "{:?}", h.events("ServerDrained"));
    h.mark_workloads_ready();
    assert!(
        h.api.wait_for(WAIT, |_| h.condition("Ready") == Some(("True".into(), "AllReady".into()))).await,
        "ready with two servers: {}",
        h.status()
    );
}

/// The operator's admin endpoint answers the routers of the database named in the path alone:
/// no certificate, another component's, another database's (even under the same CA) or another
/// CA's are refused, and the resource is unchanged; the database's router is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_answers_only_the_routers_of_the_database_in_its_path() {
    let h = Harness::start().await;
    assert!(h.api.wait_for(WAIT, |api| secret(api, "students-router-tls", "tls.crt").is_some()).await);
    let before = h.resource();
    let url = format!("https://{}/databases/{NS}/students/add", h.admin);
    let body = json!({ "n": 1, "new_shards": [], "servers": { "Server3": ["sh1"] } });
    let operator_ca = secret(&h.api, "students-router-tls", "operator-ca.crt").unwrap();
    let ca = h.ca.as_ref().unwrap();
    // A client presenting `identity` signed by `signer`, trusting the admin endpoint's CA.
    let client = |signer: &Ca, identity: Identity| {
        let issued = signer.issue(&LeafRequest::new(identity), std::time::SystemTime::now()).unwrap();
        let pem = Pem { cert: issued.cert_pem, key: issued.key_pem, ca: operator_ca.clone() };
        Credentials::Tls(TlsSource::from_pem(pem).unwrap()).http_client(Duration::from_secs(10))
    };
    let attempt = |http: reqwest::Client| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            match http.post(url).json(&body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    Some((status, body["code"].as_str().map(str::to_owned)))
                }
                Err(_) => None,
            }
        }
    };
    // Trusts the endpoint, presents nothing.
    let anonymous = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(operator_ca.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        reqwest::Client::builder().tls_backend_preconfigured(config).build().unwrap()
    };
    assert_eq!(attempt(anonymous).await, Some((401, Some("unauthenticated".into()))));
    let forbidden = Some((403, Some("forbidden".into())));
    let server = Identity::server(students_id(), "Server0").unwrap();
    assert_eq!(attempt(client(ca, server)).await, forbidden, "a server of the database");
    let teachers = Identity::router(DatabaseId::new(NS, "teachers")).unwrap();
    assert_eq!(attempt(client(ca, teachers)).await, forbidden, "another database's router, same CA");
    let elsewhere = Identity::router(DatabaseId::new("other", "students")).unwrap();
    assert_eq!(attempt(client(ca, elsewhere)).await, forbidden, "a namesake in another namespace");
    let stranger =
        Ca::generate("stranger", std::time::SystemTime::now(), shard_server::tls::issue::CA_VALIDITY).unwrap();
    assert_eq!(
        attempt(client(&stranger, Identity::router(students_id()).unwrap())).await,
        None,
        "another CA's certificate gets no handshake"
    );
    assert_eq!(h.resource(), before, "nothing changed");

    // The routers' own certificate is answered.
    assert_eq!(attempt(h.router_http()).await.map(|a| a.0), Some(200));
    assert_eq!(h.resource().0["servers"], 4);
}

/// A replica's rows changed behind its server's back (straight in its Postgres) keep its sequence
/// number and history hash: only the rows' checksum differs from the primary's. The healer
/// compares the copies' checksums at equal sequence numbers, demotes the replica with a `Diverged`
/// Event, counts it in `sharddb_operator_copies_diverged`, and copies it afresh from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_differs_from_its_primary_is_demoted_with_an_event_and_a_metric_and_copied_afresh() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..50).await;
    let before = h.topology().unwrap();
    assert!(h.metrics().contains("sharddb_operator_copies_diverged_total 0"), "{}", h.metrics());

    h.pg.psql("server1", r#"UPDATE "shard_sh1" SET "Stud_marks" = 1000 WHERE "Stud_id" = 7"#).unwrap();
    let diverged = |h: &Harness| h.events("Diverged").iter().any(|n| n.contains("sh1 on Server1"));
    assert!(h.api.wait_for(WAIT, |_| diverged(&h)).await, "Diverged: {:?}", h.events("Diverged"));
    assert!(h.metrics().contains("sharddb_operator_copies_diverged_total 1"), "{}", h.metrics());
    // Demoted (one epoch), then ready again (another).
    let recopied = |t: &Topology| state(t, "sh1", "Server1").as_deref() == Some("ready") && t.epoch >= before.epoch + 2;
    assert!(
        h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| recopied(&t))).await,
        "Server1's copy of sh1 copied afresh and ready: {:?}",
        h.topology()
    );
    assert_eq!(h.assert_ready_copies_equal().await["sh1"], 50);
    assert!(h.events("Diverged").iter().all(|n| n.contains("sh1 on Server1")), "{:?}", h.events("Diverged"));
    // Copied afresh, the copy is the primary's again: nothing differs, nothing more is counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.metrics().contains("sharddb_operator_copies_diverged_total 1"), "{}", h.metrics());
}

/// A database in internal-auth `none` (as one taken over from a release before internal
/// authentication runs): plain servers and no CA. The healer reaches them over plain HTTP (the
/// database turns Ready, and a primary that is gone fails over), the document lists them at
/// `http://` URLs, and the admin endpoint answers this database's routers over plain HTTP at
/// the control URL they are given, but no plain caller for a database not in `none`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_none_the_operator_heals_plain_servers_and_answers_plain_routers() {
    let mut h = Harness::start_in(3, Some("none")).await;
    h.wait_ready().await;
    assert_eq!(h.condition("InternalAuth"), Some(("False".into(), "None".into())));
    assert!(secret(&h.api, "students-ca", "ca.crt").is_none(), "no CA in none");
    let t = h.topology().unwrap();
    assert!(t.servers.values().all(|s| s.url.starts_with("http://")), "{:?}", t.servers);

    h.write(2, "sh2", 4096..4146).await;
    h.kill(2).await;
    let failed_over = |t: &Topology| t.shard("sh2").is_some_and(|s| s.primary == "Server0");
    assert!(h.api.wait_for(WAIT, |_| h.topology().is_some_and(|t| failed_over(&t))).await, "Server0 promoted");
    assert_eq!(h.contents(0, "sh2").await.0, 50, "the new primary has every acknowledged row");

    let router = h.api.get("deployments", NS, "students-router").unwrap();
    let args = router["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().clone();
    let at = args.iter().position(|a| a == "--control-url").expect("a control URL");
    let control = args[at + 1].as_str().unwrap().to_owned();
    assert_eq!(control, format!("http://{}/databases/{NS}/students", h.admin), "plain, for a router in none");
    let plain = shard_server::api::http_client(Duration::from_secs(30));
    // Past the gate: the endpoint's own answer to `/init` (the resource holds the configuration).
    let init = json!({ "n": 1, "schema": { "columns": ["a"], "dtypes": ["Number"] }, "shards": [], "servers": null });
    let answer = plain.post(format!("{control}/init")).json(&init).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 409, "{}", answer.text().await.unwrap());
    let other = format!("http://{}/databases/{NS}/other/init", h.admin);
    let answer = plain.post(other).json(&init).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 401, "a database not in none needs its routers' certificate");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["code"], "unauthenticated", "{body}");
    assert!(body["message"].as_str().unwrap().contains("over TLS"), "{body}");
}

/// Leaving `none` starts with its first rung (see `k8s::internal_auth`; `k8s_rollout` climbs all
/// of them): setting `spec.tls.internalAuth: strict` makes the CA and every certificate, and
/// gives every server and router template `migrate` with its certificate mounted, while the
/// document still lists the servers at `http://` URLs at the same epoch. Until the pods have
/// rolled into serving both, nothing is dialled over TLS: the operator still reaches the plain
/// servers (the database stays Ready, with every row), and still answers the routers over plain
/// HTTP. The status names the rung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_strict_on_a_database_in_none_first_rolls_its_pods_to_serve_both_still_dialled_plain() {
    let h = Harness::start_in(3, Some("none")).await;
    h.wait_ready().await;
    h.write(0, "sh1", 0..30).await;
    let before = h.topology().unwrap();

    let api: kube::Api<operator::crd::ShardedDatabase> = kube::Api::namespaced(h.api.client(), NS);
    let patch = json!({ "spec": { "tls": { "internalAuth": "strict" } } });
    api.patch("students", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    assert!(h.api.wait_for(WAIT, |api| secret(api, "students-ca", "ca.key").is_some()).await, "the CA is made");
    let mode = |spec: &Value| {
        let pod: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(spec.clone()).unwrap();
        operator::k8s::internal_auth::template_mode(&pod)
    };
    let serve_both = |api: &fake_apiserver::FakeApiServer| {
        let sets = api.list("statefulsets", NS);
        let router = api.get("deployments", NS, "students-router").unwrap();
        sets.len() == 3
            && sets.iter().all(|s| mode(&s["spec"]["template"]["spec"]) == InternalAuth::Migrate)
            && mode(&router["spec"]["template"]["spec"]) == InternalAuth::Migrate
    };
    assert!(h.api.wait_for(WAIT, serve_both).await, "every template serves both");
    for server in ["Server0", "Server1", "Server2"] {
        let name = operator::k8s::build::names::server_tls_secret("students", server);
        assert!(secret(&h.api, &name, "tls.crt").is_some(), "{server}'s certificate");
    }
    let climbing = |h: &Harness| h.condition("InternalAuth") == Some(("False".into(), "Climbing".into()));
    assert!(h.api.wait_for(WAIT, |_| climbing(&h)).await, "{}", h.status());
    let message =
        h.status()["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "InternalAuth").unwrap()["message"]
            .clone();
    assert!(message.as_str().unwrap().contains("rung 1 of 3"), "{message}");

    // The pods have not rolled (nothing plays the kubelet here): the rung holds, plain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = h.topology().unwrap();
    assert_eq!(t.epoch, before.epoch, "the document is not rewritten");
    assert!(t.servers.values().all(|s| s.url.starts_with("http://")), "{:?}", t.servers);
    assert_eq!(h.condition("Ready"), Some(("True".into(), "AllReady".into())), "{}", h.status());
    let primary = h.index(&t.shard("sh1").unwrap().primary);
    assert_eq!(h.contents(primary, "sh1").await.0, 30, "every row kept");
    let plain = shard_server::api::http_client(Duration::from_secs(30));
    let init = json!({ "n": 1, "schema": { "columns": ["a"], "dtypes": ["Number"] }, "shards": [], "servers": null });
    let control = format!("http://{}/databases/{NS}/students/init", h.admin);
    let answer = plain.post(control).json(&init).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 409, "routers not rolled yet are still answered plain");
}
