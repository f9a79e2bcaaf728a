//! A rolling update of the Kubernetes body against the in-memory API: the real `Controller` and
//! healer, real shard servers over a throwaway Postgres (see `common`), and this test playing the
//! StatefulSet controller and the kubelet — a pod is built from its StatefulSet's template and
//! labelled with that template's revision, an evicted pod's server restarts on the same database
//! (its volume) and comes back as a new pod of the current revision.
//!
//! Database `students`: sh1 (primary Server0, copy on Server1) and sh2 (primary Server2, copy on
//! Server0). Changing `spec.images.shardServer` under a write load must restart the servers one
//! at a time, Server1 (the primary of nothing) first, each evicted only once it serves nothing
//! (its primaries handed over, its copies recovering) while every other copy is ready, and lose
//! no acknowledged write. The status shows the rollout and each server gets its Events. The
//! operator itself is replaced halfway (a fresh one, nothing in memory), as `helm upgrade` does
//! while a rollout runs: the new one carries on from what the cluster shows.
//!
//! The same machinery carries a database out of internal-auth `none`: its servers restart in the
//! mode their pod template carries, and the climb rolls them twice (into serving both, then into
//! TLS only) with every pair of pods still talking in between.

mod common;

use common::{CONFIGMAP, Harness, NS, WAIT, credentials, students_id};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use operator::crd::ConditionStatus;
use operator::k8s::build::names;
use operator::k8s::rollout::REVISION_LABEL;
use serde_json::{Value, json};
use shard_server::api::{ErrorCode, Op, ShardClient, WriteRequest};
use shard_server::schema::{Row, Value as Cell};
use shard_server::tls::{Identity, InternalAuth};
use shard_server::topology::{ReplicaState, Topology};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The StatefulSet controller and the kubelet, one pass at a time.
#[derive(Default)]
struct Kubelet {
    /// Pods created so far: one that disappears was evicted.
    created: BTreeSet<String>,
    /// Each eviction noticed: the server and the topology at the end of its pod's termination.
    evicted: Vec<(String, Topology)>,
}

/// How long an evicted pod's server keeps running before it stops, as a pod's process runs
/// through its termination grace period after the eviction deleted it: five heal rounds, in which
/// the operator must neither recover its copies (the restart throws them away) nor start on the
/// next server.
const TERMINATION: Duration = Duration::from_secs(1);

/// A template's revision: a hash of it, as the StatefulSet controller names its revisions.
fn revision(sts: &str, template: &Value) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    format!("{sts}-{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

impl Kubelet {
    async fn step(&mut self, h: &mut Harness) {
        for mut sts in h.api.list("statefulsets", NS) {
            let name = sts["metadata"]["name"].as_str().unwrap().to_owned();
            let Some(i) = h.servers.iter().position(|s| names::server_statefulset("students", &s.name) == name) else {
                continue;
            };
            let template = sts["spec"]["template"].clone();
            let update = revision(&name, &template);
            let pod_name = format!("{name}-0");
            let pod_revision = match h.api.get("pods", NS, &pod_name) {
                Some(pod) => pod["metadata"]["labels"][REVISION_LABEL].as_str().unwrap().to_owned(),
                None => {
                    if self.created.contains(&pod_name) {
                        // Evicted: the server terminates, then restarts on its volume from the
                        // current template.
                        let server = h.servers[i].name.clone();
                        tokio::time::sleep(TERMINATION).await;
                        self.evicted.push((server, h.topology().unwrap()));
                        h.kill(i).await;
                        h.restart(i, false).await;
                    }
                    let mut labels = template["metadata"]["labels"].clone();
                    labels[REVISION_LABEL] = json!(update);
                    let pod = json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": { "name": pod_name, "namespace": NS, "labels": labels },
                        "spec": template["spec"],
                        "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] },
                    });
                    h.api.upsert(pod).unwrap();
                    self.created.insert(pod_name);
                    update.clone()
                }
            };
            let status = json!({
                "observedGeneration": sts["metadata"]["generation"],
                "replicas": 1, "readyReplicas": 1, "currentReplicas": 1,
                "updatedReplicas": i32::from(pod_revision == update),
                "currentRevision": pod_revision, "updateRevision": update,
            });
            if sts["status"] != status {
                sts["status"] = status;
                h.api.upsert(sts).unwrap();
            }
        }
        for mut d in h.api.list("deployments", NS) {
            let replicas = d["spec"]["replicas"].clone();
            let status = json!({ "observedGeneration": d["metadata"]["generation"], "replicas": replicas,
                                 "readyReplicas": replicas, "updatedReplicas": replicas });
            if d["status"] != status {
                d["status"] = status;
                h.api.upsert(d).unwrap();
            }
        }
    }
}

/// A client writing one new row at a time to the primary the published topology names, retrying
/// a row until it is acknowledged, presenting the routers' certificate (`http`; `None`: plain,
/// until the document lists `https://` URLs, then the certificate a router gets from the
/// database's CA, as a router rolled into TLS). An answer that the topology it went by is stale
/// (`stale_epoch`, `not_primary`) sends it back to the topology, as a router reroutes on those.
fn start_writer(
    client: kube::Client,
    http: Option<reqwest::Client>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Written> {
    tokio::spawn(async move {
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, NS);
        let mut http = http.unwrap_or_else(|| shard_server::api::http_client(Duration::from_secs(10)));
        let mut tls = false;
        let mut w = Written::default();
        // The failed attempts at the row being written: (primary, error).
        let mut pending: Vec<(String, String)> = Vec::new();
        // Rows written so far: the n-th goes to sh1 (even n) or sh2 (odd n), at keys no other
        // row of the test uses (sh1 from 100, sh2 from 4296).
        let mut n = 0i64;
        // A row whose attempt failed may have been written (a 503 leaves it unknown): it is
        // retried until acknowledged even once asked to stop, so every row written is counted.
        let mut stopped: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) || !pending.is_empty() {
            if stop.load(Ordering::Relaxed) {
                let since = *stopped.get_or_insert_with(Instant::now);
                assert!(since.elapsed() < WAIT, "a row is still not acknowledged after {WAIT:?}: {pending:?}");
            }
            if 4296 + n / 2 >= 8192 {
                // Out of keys (a very long run): the load ends here.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let k = if n % 2 == 0 { 100 + n / 2 } else { 4296 + n / 2 };
            let Ok(cm) = configmaps.get(CONFIGMAP).await else { break };
            let t = Topology::parse(cm.data.unwrap()["topology.json"].as_bytes()).unwrap();
            let shard = t.shard_for_key(k).unwrap();
            let url = t.servers[&shard.primary].url.clone();
            if url.starts_with("https://") && !tls {
                let ca = secrets.get("students-ca").await.unwrap().data.unwrap();
                let pem = |k: &str| String::from_utf8(ca[k].0.clone()).unwrap();
                let ca = shard_server::tls::issue::Ca::from_pem(&pem("ca.crt"), &pem("ca.key")).unwrap();
                http = credentials(&ca, Identity::router(students_id()).unwrap()).http_client(Duration::from_secs(10));
                tls = true;
            }
            let primary = ShardClient::new(http.clone(), url);
            let row = Row(vec![Cell::Int(k), Cell::Text(format!("w{k}")), Cell::Int(k % 100)]);
            let req = WriteRequest { epoch: Some(t.epoch), ops: vec![Op::Insert { row }], dry_run: false };
            // A retry of a row an earlier attempt applied after all is a no-op success (an
            // identical insert).
            match primary.write(&shard.id, &req).await {
                Ok(_) => {
                    w.acked.push(k);
                    n += 1;
                    for (at, error) in pending.drain(..) {
                        match at == shard.primary {
                            true => w.failed.push(error),
                            false => w.handed_over.push(error),
                        }
                    }
                }
                Err(e) if matches!(e.code(), Some(ErrorCode::StaleEpoch | ErrorCode::NotPrimary)) => w.rerouted += 1,
                // The server does not follow the document the writer went by yet: nothing was
                // written, and a router retries it shortly.
                Err(e) if e.code() == Some(ErrorCode::EpochAhead) => {
                    w.ahead += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    pending.push((shard.primary.clone(), format!("epoch {} at {}: {e}", t.epoch, shard.primary)));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        w
    })
}

/// Every copy ready holds the same rows as its primary, and those are the rows written before the
/// load (40 in sh1, 30 in sh2) and every row the writer saw acknowledged (`acked`), no more.
async fn assert_acknowledged_rows_kept(h: &Harness, acked: &[i64]) {
    let rows = h.assert_ready_copies_equal().await;
    for (shard, range) in [("sh1", 0..4096), ("sh2", 4096..8192)] {
        let missing = h.missing(shard, range, acked).await;
        assert!(missing.is_empty(), "acknowledged rows missing from {shard}: {missing:?}");
    }
    let per_shard = |low: i64, high: i64| acked.iter().filter(|k| (low..high).contains(*k)).count() as i64;
    assert_eq!(
        rows,
        BTreeMap::from([("sh1".to_owned(), 40 + per_shard(0, 4096)), ("sh2".to_owned(), 30 + per_shard(4096, 8192))])
    );
}

/// What the writer saw.
#[derive(Debug, Default)]
struct Written {
    /// The keys acknowledged.
    acked: Vec<i64>,
    /// Failed attempts whose row was then acknowledged by another primary: the group in flight
    /// when a drain handed the shard over (a router retries it, and it lands at the new primary).
    handed_over: Vec<String>,
    /// Every other failed attempt.
    failed: Vec<String>,
    /// Attempts answered `stale_epoch` or `not_primary`, sent back to the topology.
    rerouted: usize,
    /// Attempts answered `epoch_ahead` (the server had not loaded the document yet), retried.
    ahead: usize,
}

impl Written {
    fn summary(&self) -> String {
        format!(
            "writer: {} rows acknowledged, {} attempts rerouted, {} ahead of their server; {} in flight at a \
             handover: {:?}; other failures: {:?}",
            self.acked.len(),
            self.rerouted,
            self.ahead,
            self.handed_over.len(),
            self.handed_over,
            self.failed
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_change_restarts_servers_one_at_a_time_replicas_first_and_loses_nothing() {
    let mut h = Harness::start().await;
    h.wait_ready().await;
    let mut kubelet = Kubelet::default();
    for _ in 0..3 {
        kubelet.step(&mut h).await;
    }
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;
    // Pods built, revisions current: nothing restarts on its own.
    tokio::time::sleep(Duration::from_secs(1)).await;
    kubelet.step(&mut h).await;
    assert!(kubelet.evicted.is_empty() && h.events("ServerDraining").is_empty(), "no rollout without a change");
    let before = h.topology().unwrap();
    assert_eq!(
        (before.shard("sh1").unwrap().primary.as_str(), before.shard("sh2").unwrap().primary.as_str()),
        ("Server0", "Server2")
    );

    let not_ready_before = not_ready_events(&h);
    let stop = Arc::new(AtomicBool::new(false));
    let router = credentials(h.ca.as_ref().unwrap(), Identity::router(students_id()).unwrap());
    let writer = start_writer(h.api.client(), Some(router.http_client(Duration::from_secs(10))), stop.clone());
    let mut db = h.api.get("shardeddatabases", NS, "students").unwrap();
    db["spec"]["images"] = json!({ "shardServer": "example.com/sharddb-shard-server:next" });
    h.api.upsert(db).unwrap();
    let changed = Instant::now();

    // Drive the controllers until every server runs the new template and the database is Ready
    // again, watching the status on the way.
    let mut progressing = BTreeSet::new();
    let mut operator_replaced = false;
    let done = |h: &Harness, kubelet: &Kubelet| {
        let all_updated = h.api.list("statefulsets", NS).iter().all(|s| {
            s["status"]["currentRevision"] == s["status"]["updateRevision"]
                && s["spec"]["template"]["spec"]["containers"][0]["image"] == "example.com/sharddb-shard-server:next"
        });
        all_updated
            && kubelet.evicted.len() == 3
            && h.condition("Ready") == Some(("True".into(), "AllReady".into()))
            && h.condition("Progressing").is_some_and(|(s, _)| s == "False")
            && h.events("ServerUpdated").len() == 3
    };
    while !done(&h, &kubelet) {
        assert!(
            changed.elapsed() < 3 * WAIT,
            "the rollout did not finish: evicted {:?}; status {}",
            kubelet.evicted.iter().map(|e| &e.0).collect::<Vec<_>>(),
            h.status()
        );
        kubelet.step(&mut h).await;
        if kubelet.evicted.len() == 1 && !operator_replaced {
            h.stop_operator().await;
            h.start_operator();
            operator_replaced = true;
        }
        if let Some(c) = h.condition("Progressing") {
            progressing.insert(c.1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rollout of 3 servers: {:?}", changed.elapsed());
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    println!("{}", written.summary());
    let acked = written.acked;
    assert!(acked.len() > 20, "the writer made progress through the rollout: {}", acked.len());

    // Replicas first: Server1 held a copy and was the primary of nothing.
    let order: Vec<&str> = kubelet.evicted.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order[0], "Server1", "{order:?}");
    assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), 3, "each server once: {order:?}");
    // Through the eviction API, in that order.
    let evictions: Vec<String> = h
        .api
        .writes()
        .into_iter()
        .filter(|w| w.subresource.as_deref() == Some("eviction") && w.code == 201)
        .map(|w| w.name.unwrap())
        .collect();
    let pods: Vec<String> = order.iter().map(|s| names::server_pod("students", s)).collect();
    assert_eq!(evictions, pods);
    for (server, t) in &kubelet.evicted {
        // Drained: the primary of nothing, none of its copies serving; every other copy ready
        // (the server before it is back and caught up).
        assert!(t.shards.iter().all(|s| s.primary != *server), "{server} was still a primary: {t:?}");
        for shard in &t.shards {
            for (holder, state) in &shard.replicas {
                let want = if holder == server { ReplicaState::Recovering } else { ReplicaState::Ready };
                assert_eq!(*state, want, "{} on {holder} when {server} was evicted (epoch {})", shard.id, t.epoch);
            }
        }
    }

    // Nothing acknowledged was lost, and every copy holds the same rows.
    assert_acknowledged_rows_kept(&h, &acked).await;

    // The status and the Events told the story.
    assert!(progressing.contains("RollingUpdate"), "{progressing:?}");
    assert_eq!(h.status()["updatedServers"], 3);
    assert_eq!(h.events("ServerRestarting").len(), 3, "{:?}", h.events("ServerRestarting"));
    let drained = h.events("ServerDraining");
    assert!(
        drained.iter().any(|n| n.starts_with("Server1 is drained") && n.contains("sh1 stops serving there")),
        "{drained:?}"
    );
    assert!(drained.iter().any(|n| n.contains("is handed over to")), "a primary was handed over: {drained:?}");
    assert!(
        h.events("ServerUpdated").iter().any(|n| n.contains("(3/3 servers updated)")),
        "{:?}",
        h.events("ServerUpdated")
    );
    assert_eq!(not_ready_events(&h), not_ready_before, "the rollout's own Events, not NotReady");
}

/// `NotReady` Events recorded so far, counting each repetition the recorder folded into a series.
fn not_ready_events(h: &Harness) -> i64 {
    h.api
        .list("events.events.k8s.io", NS)
        .iter()
        .filter(|e| e["reason"] == "NotReady")
        .map(|e| e["series"]["count"].as_i64().unwrap_or(1))
        .sum()
}

/// The internal-auth mode of a pod template (a pod's spec, or a workload's template's spec).
fn mode_of(spec: &Value) -> InternalAuth {
    operator::k8s::internal_auth::template_mode(&serde_json::from_value(spec.clone()).unwrap())
}

/// Leaving internal-auth `none` under a write load, as a user does by setting
/// `spec.tls.internalAuth: strict` on a database taken over from a release before internal
/// authentication. The servers here take their mode from their pod's template, and restart only
/// when evicted: the climb must go through every rung in order (templates `migrate` while the
/// document lists `http://` URLs, then `https://`, then templates `strict`), with every pair of
/// pods able to talk at every moment (no pod in `strict` while plain URLs are listed, none in
/// `none` while `https://` ones are), no write failed but one in flight when a drain handed its
/// shard over to another copy (which any rolling restart may cost, and a router retries at the
/// new primary), and nothing acknowledged lost. The operator is replaced in the first rung and in the second, and carries
/// on from what the cluster shows. At the end no server answers a plain caller, and a TLS caller without a certificate
/// gets 401. Routers are not run: their Deployment's status (played here as rolled at once) is
/// what the climb waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_none_climbs_through_serving_both_and_no_write_fails() {
    let h = climb_under_load(InternalAuth::None, InternalAuth::Strict).await;
    // Strict: a plain caller gets no answer, a TLS caller without a certificate 401.
    let plain = shard_server::api::http_client(Duration::from_secs(5));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(h.ca.as_ref().unwrap().cert_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let anonymous =
        reqwest::Client::builder().tls_backend_preconfigured(config).timeout(Duration::from_secs(5)).build().unwrap();
    for s in &h.servers {
        let answer = plain.get(format!("http://{}/status", s.addr)).send().await;
        assert!(answer.is_err(), "{} answered a plain caller: {answer:?}", s.name);
        let answer = anonymous.get(format!("https://{}/status", s.addr)).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 401, "{}", s.name);
    }
}

/// The way back: setting `spec.tls.internalAuth: none` on a database in `strict` climbs down
/// through the same rungs in reverse (templates `migrate` while the document still lists
/// `https://` URLs, then `http://`, then templates `none`), under the same checks. At the end a
/// plain caller is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_to_none_climbs_down_through_serving_both_and_no_write_fails() {
    let h = climb_under_load(InternalAuth::Strict, InternalAuth::None).await;
    let plain = shard_server::api::http_client(Duration::from_secs(5));
    for s in &h.servers {
        let answer = plain.get(format!("http://{}/status", s.addr)).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{} answers a plain caller", s.name);
    }
}

/// Drives a database in internal-auth `from` to `to` under a write load (see
/// [`leaving_none_climbs_through_serving_both_and_no_write_fails`]) and checks the climb; the
/// harness, for checks of the final mode.
async fn climb_under_load(from: InternalAuth, to: InternalAuth) -> Harness {
    let mut h = Harness::start_in(3, Some(from.as_str())).await;
    h.wait_ready().await;
    let mut kubelet = Kubelet::default();
    for _ in 0..3 {
        kubelet.step(&mut h).await;
    }
    h.write(0, "sh1", 0..40).await;
    h.write(2, "sh2", 4096..4126).await;
    let reason = |mode: InternalAuth| {
        let (status, reason, _) = operator::k8s::internal_auth::condition(mode, true);
        Some((if status == ConditionStatus::True { "True" } else { "False" }.to_owned(), reason.to_owned()))
    };
    assert_eq!(h.condition("InternalAuth"), reason(from));

    let stop = Arc::new(AtomicBool::new(false));
    // A writer playing a router of the starting mode (a router's certificate also dials plain).
    let http = h.ca.as_ref().map(|ca| credentials(ca, Identity::router(students_id()).unwrap()).http_client(WAIT));
    let writer = start_writer(h.api.client(), http, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut db = h.api.get("shardeddatabases", NS, "students").unwrap();
    db["spec"]["tls"] = json!({ "internalAuth": to.as_str() });
    h.api.upsert(db).unwrap();
    let changed = Instant::now();
    let from_plain = from == InternalAuth::None;

    // (templates' mode, document's scheme) in the order first seen, and the condition's messages.
    let mut stages: Vec<String> = Vec::new();
    let mut messages: Vec<String> = Vec::new();
    let mut replaced = 0;
    let done = |h: &Harness, kubelet: &Kubelet| {
        let sets = h.api.list("statefulsets", NS);
        let rolled = sets.iter().all(|s| {
            s["status"]["currentRevision"] == s["status"]["updateRevision"]
                && mode_of(&s["spec"]["template"]["spec"]) == to
        });
        rolled
            && kubelet.evicted.len() == 6
            && h.condition("InternalAuth") == reason(to)
            && h.condition("Ready") == Some(("True".into(), "AllReady".into()))
    };
    while !done(&h, &kubelet) {
        assert!(
            changed.elapsed() < 4 * WAIT,
            "the climb did not finish: stages {stages:?}, evicted {:?}; status {}",
            kubelet.evicted.iter().map(|e| &e.0).collect::<Vec<_>>(),
            h.status()
        );
        kubelet.step(&mut h).await;
        let t = h.topology().unwrap();
        let plain = t.servers.values().all(|s| s.url.starts_with("http://"));
        assert!(plain || t.servers.values().all(|s| s.url.starts_with("https://")), "one scheme: {t:?}");
        // Every pair of pods can talk, and the operator reaches every pod.
        for pod in h.api.list("pods", NS) {
            let mode = mode_of(&pod["spec"]);
            let name = &pod["metadata"]["name"];
            assert!(!(plain && mode == InternalAuth::Strict), "{name} strict while epoch {} lists http://", t.epoch);
            assert!(plain || mode != InternalAuth::None, "{name} plain while epoch {} lists https://", t.epoch);
        }
        let mut templates: Vec<InternalAuth> =
            h.api.list("statefulsets", NS).iter().map(|s| mode_of(&s["spec"]["template"]["spec"])).collect();
        let router = h.api.get("deployments", NS, "students-router").unwrap();
        templates.push(mode_of(&router["spec"]["template"]["spec"]));
        templates.dedup();
        if let [mode] = templates[..] {
            let stage = format!("{}/{}", mode.as_str(), if plain { "http" } else { "https" });
            if stages.last() != Some(&stage) {
                stages.push(stage);
            }
        }
        let status = h.status();
        let auth = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "InternalAuth"));
        if let Some(message) = auth.and_then(|c| c["message"].as_str())
            && messages.last().map(String::as_str) != Some(message)
        {
            messages.push(message.to_owned());
        }
        // Replaced in the first rung (a pod rolled, the document's scheme still the old one) and
        // in the second.
        let replace = match replaced {
            0 => plain == from_plain && kubelet.evicted.len() == 1,
            1 => plain != from_plain,
            _ => false,
        };
        if replace {
            h.stop_operator().await;
            h.start_operator();
            replaced += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("climb from {} to {}: {:?}", from.as_str(), to.as_str(), changed.elapsed());
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    println!("{}", written.summary());
    let (acked, failed) = (written.acked, written.failed);

    let want = match from_plain {
        true => ["none/http", "migrate/http", "migrate/https", "strict/https"],
        false => ["strict/https", "migrate/https", "migrate/http", "none/http"],
    };
    assert_eq!(stages, want, "every rung, in order");
    assert_eq!(replaced, 2, "the operator was replaced in the first two rungs");
    let rungs: Vec<&str> = ["rung 1 of 3", "rung 2 of 3", "rung 3 of 3"]
        .into_iter()
        .filter(|r| messages.iter().any(|m| m.contains(r)))
        .collect();
    assert_eq!(rungs.len(), 3, "the status named every rung: {messages:?}");
    let first = |r: &str| messages.iter().position(|m| m.contains(r)).unwrap();
    assert!(first("rung 1 of 3") < first("rung 2 of 3") && first("rung 2 of 3") < first("rung 3 of 3"), "{messages:?}");
    let events = h.events("InternalAuth");
    for rung in ["rung 1 of 3", "rung 2 of 3", "rung 3 of 3"] {
        assert!(events.iter().any(|e| e.contains(rung)), "an Event for {rung}: {events:?}");
    }
    // Each server restarted twice (into serving both, then into the wanted mode), drained each time.
    let order: Vec<&str> = kubelet.evicted.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order.len(), 6, "{order:?}");
    for (server, t) in &kubelet.evicted {
        assert!(t.shards.iter().all(|s| s.primary != *server), "{server} was still a primary: {t:?}");
    }

    // No write failed but those in flight when a drain handed their shard over (as in any rolling
    // restart), and nothing acknowledged was lost.
    assert!(acked.len() > 20, "the writer made progress through the climb: {}", acked.len());
    assert!(failed.is_empty(), "no write failed: {failed:?}");
    assert_acknowledged_rows_kept(&h, &acked).await;

    h
}
