//! An operator upgrade in Kubernetes, against the in-memory API: the previous release's operator
//! binary (`sharddb-operator run`, built from the git history, see `tests::previous`) creates a
//! database's children; it stops, and this build's operator binary takes over the same database.
//! Its reconcile must leave what the previous one built as it is, but for the changes this
//! release makes on purpose:
//!
//! - the database runs in internal-auth `none` (it has servers and no `<name>-ca` Secret): no CA,
//!   certificate or admin-token Secret is made, and the server and router containers only gain
//!   `SHARDDB_INTERNAL_AUTH=none`, which rolls them once, every pod plain, so every pair of pods
//!   still talks (a roll into TLS pods would leave new and old pods unable to); the status says
//!   so (`InternalAuth=False`, reason `None`). Leaving `none` afterwards is the user's act, which
//!   the operator climbs in rungs that keep every pair of pods talking
//!   (`operator/tests/k8s_rollout.rs`);
//! - the NetworkPolicy closing the servers to all but the database's components is created;
//! - every server StatefulSet gains `updateStrategy: OnDelete`, outside the pod template, so the
//!   operator rather than the StatefulSet controller decides when a server restarts (rolling
//!   restarts);
//! - the router Deployment gains `strategy` (`maxSurge: 1`, `maxUnavailable: 0`), outside the
//!   template, and a `preStop` sleep in the router container, which rolls the routers once, a new
//!   one ready before an old one stops. With the images of a new release (the operator's default
//!   images move with it) they roll anyway.
//!
//! Everything else — Services, the Secret and its password, ServiceAccounts, Roles and bindings,
//! PodDisruptionBudgets, the topology ConfigMap's identity — is not written with a change at all.
//! The topology ConfigMap's document is the healers' state and is not compared (here the servers
//! never answer, so both healers mark copies down).

use anyhow::{Context, Result, bail, ensure};
use fake_apiserver::FakeApiServer;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(60);
/// Every kind of child the operator builds.
const KINDS: [&str; 10] = [
    "statefulsets",
    "deployments",
    "services",
    "configmaps",
    "secrets",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "poddisruptionbudgets",
    "networkpolicies",
];

/// `sharddb-operator run` against the fake API server, stopped (SIGTERM) on drop.
struct Operator(Child);

impl Operator {
    fn start(binary: &Path, kubeconfig: &Path, log: &Path) -> Result<Operator> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(binary)
            .args(["run", "--metrics-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("SHARDDB_ADMIN_URL")
            .env("RUST_LOG", "info")
            // Where this build keeps its own CA and looks for its pods' NetworkPolicy labels (the
            // chart sets it from the downward API); the previous release ignores it.
            .env("POD_NAMESPACE", NS)
            .env("SHARDDB_OPERATOR_POD_LABELS", "app.kubernetes.io/name=sharddb-operator")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Operator(child))
    }

    /// Stops it as Kubernetes does (SIGTERM) and waits for it to exit.
    fn stop(&mut self) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        let started = Instant::now();
        while started.elapsed() < WAIT {
            if let Some(status) = self.0.try_wait()? {
                ensure!(status.success(), "the operator exited with {status}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the operator did not stop within {WAIT:?}")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Every child of the database, by kind and name, as stored.
fn children(api: &FakeApiServer) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for kind in KINDS {
        for o in api.list(kind, NS) {
            if o["metadata"]["labels"]["app.kubernetes.io/instance"] == "students" {
                let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                out.insert((kind.to_owned(), name), o);
            }
        }
    }
    out
}

/// A pod template's first container without its last environment variable, which must be
/// `SHARDDB_INTERNAL_AUTH=none` (the `env` list goes when that was all of it); an error otherwise.
fn without_internal_auth_none(template: &Value) -> Result<Value> {
    let mut t = template.clone();
    let container = t.pointer_mut("/spec/containers/0").context("a first container")?;
    let env = container["env"].as_array_mut().context("an env list")?;
    let last = env.pop().context("an env variable")?;
    ensure!(last == json!({"name": "SHARDDB_INTERNAL_AUTH", "value": "none"}), "the last env variable is {last}");
    if env.is_empty() {
        container.as_object_mut().context("a container object")?.remove("env");
    }
    Ok(t)
}

/// `value` without the fields at `paths` (JSON pointers).
fn without(value: &Value, paths: &[&str]) -> Value {
    let mut v = value.clone();
    for path in paths {
        let (parent, last) = path.rsplit_once('/').expect("a pointer");
        if let Some(Value::Object(map)) = v.pointer_mut(parent) {
            map.remove(last);
        }
    }
    v
}

async fn wait_for(api: &FakeApiServer, what: &str, check: impl Fn(&FakeApiServer) -> bool, log: &Path) -> Result<()> {
    if api.wait_for(WAIT, check).await {
        return Ok(());
    }
    bail!("{what}: not within {WAIT:?}; the operator's log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_operator_takes_over_without_rewriting_what_the_previous_one_built() -> Result<()> {
    tests::install_crypto_provider();
    let previous = tests::previous::bin_dir()?;
    let api = FakeApiServer::start().await;
    let crd_yaml = std::fs::read_to_string(tests::repo_root().join("crds/shardeddatabases.sharddb.io.yaml"))?;
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&crd_yaml)?;
    api.install_crd(&crd).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let example = std::fs::read_to_string(tests::repo_root().join("examples/students.yaml"))?;
    let mut db: Value = serde_saphyr::from_str(&example)?;
    db["metadata"]["namespace"] = json!(NS);
    api.upsert(db).map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NS}}}}}]\n\
             current-context: fake\n",
            api.url()
        ),
    )?;

    // The previous release builds the children.
    let old_log = dir.path().join("previous-operator.log");
    let mut old = Operator::start(&previous.join("sharddb-operator"), &kubeconfig, &old_log)?;
    let built = |api: &FakeApiServer| {
        let status = api.get("shardeddatabases", NS, "students").map(|d| d["status"].clone()).unwrap_or(Value::Null);
        api.list("statefulsets", NS).len() == 6
            && api.list("poddisruptionbudgets", NS).len() == 2
            && status["observedGeneration"].is_number()
    };
    wait_for(&api, "the previous operator builds the database", built, &old_log).await?;
    tokio::task::block_in_place(|| old.stop())?;
    let before = children(&api);
    ensure!(before.len() == 17, "children built: {:?}", before.keys().collect::<Vec<_>>());

    // This build's operator takes over.
    api.clear_writes();
    let new_log = dir.path().join("operator.log");
    let mut new = Operator::start(&tests::bin_dir().join("sharddb-operator"), &kubeconfig, &new_log)?;
    let reconciled = |api: &FakeApiServer| {
        api.get("shardeddatabases", NS, "students").is_some_and(|d| d["status"]["shardCount"] == 4)
    };
    wait_for(&api, "this build's operator reconciles", reconciled, &new_log).await?;
    // A resync and the reconciles its own writes trigger: give them time to run, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| new.stop())?;
    let after = children(&api);

    let changed: BTreeSet<(String, String)> = api
        .writes()
        .into_iter()
        .filter(|w| w.changed && KINDS.contains(&w.resource.as_str()))
        .map(|w| (w.resource.clone(), w.name.clone().unwrap_or_default()))
        .collect();
    let network_policy = ("networkpolicies".to_owned(), "students-servers".to_owned());
    let expected: BTreeSet<(String, String)> = ["server0", "server1", "server2", "server3", "server4", "server5"]
        .iter()
        .map(|s| ("statefulsets".to_owned(), format!("students-{s}")))
        .chain([("deployments".to_owned(), "students-router".to_owned()), network_policy.clone()])
        .collect();
    let unexpected: Vec<_> = changed
        .iter()
        .filter(|c| !expected.contains(c) && **c != ("configmaps".into(), "students-topology".into()))
        .collect();
    ensure!(unexpected.is_empty(), "rewritten needlessly: {unexpected:?}");

    // Only the NetworkPolicy is new: no CA, no certificate, no admin token (internal-auth none).
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    ensure!(added == [&network_policy], "children added: {added:?}");
    ensure!(before.keys().all(|k| after.contains_key(k)), "children removed: {:?}", after.keys().collect::<Vec<_>>());
    let db = api.get("shardeddatabases", NS, "students").context("the database")?;
    let conditions = db["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let auth = conditions.iter().find(|c| c["type"] == "InternalAuth").context("an InternalAuth condition")?;
    ensure!(auth["status"] == "False" && auth["reason"] == "None", "the mode reported: {auth}");
    for ((kind, name), was) in &before {
        let is = &after[&(kind.clone(), name.clone())];
        match kind.as_str() {
            "statefulsets" => {
                // Plain as before, and told so: the roll this causes keeps every pair talking.
                let template = without_internal_auth_none(&is["spec"]["template"]).context(name.clone())?;
                ensure!(template == was["spec"]["template"], "{name}: the pod template changed\n{was}\n{is}");
                ensure!(is["spec"]["updateStrategy"] == json!({"type": "OnDelete"}), "{name}: {}", is["spec"]);
                let rest = |v: &Value| without(&v["spec"], &["/updateStrategy", "/template"]);
                ensure!(rest(is) == rest(was), "{name}: more than the update strategy changed");
            }
            "deployments" => {
                let strategy = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
                ensure!(is["spec"]["strategy"] == strategy, "{name}: {}", is["spec"]["strategy"]);
                let pre_stop = &is["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"];
                ensure!(pre_stop["sleep"]["seconds"] == 5, "{name}: {pre_stop}");
                let mut is = is.clone();
                is["spec"]["template"] = without_internal_auth_none(&is["spec"]["template"]).context(name.clone())?;
                let rest = |v: &Value| without(&v["spec"], &["/strategy", "/template/spec/containers/0/lifecycle"]);
                ensure!(
                    rest(&is) == rest(was),
                    "{name}: more than the strategy, the preStop hook and the mode changed\n{was}\n{is}"
                );
            }
            "configmaps" => {
                let identity = |v: &Value| (v["metadata"]["labels"].clone(), v["metadata"]["ownerReferences"].clone());
                ensure!(identity(is) == identity(was), "{name}: labels or owner changed");
            }
            _ => {
                let kept = |v: &Value| without(v, &["/metadata/resourceVersion", "/metadata/managedFields"]);
                ensure!(kept(is) == kept(was), "{kind} {name} changed:\n{was}\n{is}");
            }
        }
    }
    println!("changed with a purpose: {changed:?}");
    Ok(())
}
