//! The operator's Helm chart as rendered by `helm template`: the expected objects, images,
//! security contexts and leader election. Needs helm (`tools/bin/helm`, fetched by
//! `scripts/fetch-tools.sh`, or on PATH); without it every test prints why it skipped and passes.
//! Runs helm as a child process; touches no cluster.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHART: &str = "charts/sharddb-operator";
const RELEASE: &str = "sharddb-operator";
const NAMESPACE: &str = "sharddb-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> Option<PathBuf> {
    let fetched = root().join("tools/bin/helm");
    if fetched.is_file() {
        return Some(fetched);
    }
    let on_path = Command::new("helm").arg("version").output().is_ok_and(|o| o.status.success());
    on_path.then(|| PathBuf::from("helm"))
}

/// Every object `helm template` renders with `--set` overrides, or `None` (after saying why) when
/// helm is not installed.
fn render(sets: &[&str]) -> Option<Vec<Value>> {
    let Some(helm) = helm() else {
        eprintln!("SKIPPED: helm not found; run scripts/fetch-tools.sh (or put helm on PATH) to test the chart");
        return None;
    };
    let mut cmd = Command::new(helm);
    cmd.current_dir(root()).args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().expect("cannot run helm");
    assert!(out.status.success(), "helm template failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("helm printed UTF-8");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("helm rendered valid YAML");
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().map(|d| d["kind"].as_str().expect("every object has a kind")).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let first = found.next().unwrap_or_else(|| panic!("no {kind} rendered"));
    assert!(found.next().is_none(), "more than one {kind} rendered");
    first
}

fn operator_container(docs: &[Value]) -> &Value {
    let containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "the operator pod runs one container");
    &containers[0]
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .map_or(&Value::Null, |e| &e["value"])
}

/// A default image constant of the operator (`operator/src/crd.rs`), the one place they are pinned.
fn pinned(constant: &str) -> String {
    let source = std::fs::read_to_string(root().join("operator/src/crd.rs")).expect("read operator/src/crd.rs");
    let prefix = format!("pub const {constant}: &str = \"");
    source
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.strip_suffix("\";"))
        .unwrap_or_else(|| panic!("operator/src/crd.rs no longer defines {constant} as a string literal"))
        .to_owned()
}

#[test]
fn renders_every_expected_kind_and_the_service_monitor_only_when_enabled() {
    let Some(docs) = render(&[]) else { return };
    let mut got = kinds(&docs);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount"
        ]
    );
    for doc in docs.iter().filter(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding") {
        if doc["kind"] != "CustomResourceDefinition" {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{}", doc["metadata"]["name"]);
        }
    }
    let service = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    let metrics = service("sharddb-operator-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "metrics");
    let admin = service("sharddb-operator-admin");
    assert_eq!(admin["spec"]["type"], "ClusterIP", "the admin endpoint is never exposed outside the cluster");
    assert_eq!(admin["spec"]["ports"][0]["targetPort"], "admin");
    let c = operator_container(&docs);
    assert_eq!(env(c, "SHARDDB_ADMIN_ADDR"), "0.0.0.0:8081");
    assert_eq!(env(c, "SHARDDB_ADMIN_URL"), "https://sharddb-operator-admin.sharddb-system.svc:8081");
    assert!(c["ports"].as_array().unwrap().iter().any(|p| p["name"] == "admin" && p["containerPort"] == 8081));

    let Some(docs) = render(&["serviceMonitor.enabled=true"]) else { return };
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
}

#[test]
fn the_crd_template_is_the_generated_crd() {
    let Some(docs) = render(&[]) else { return };
    let mut rendered = one(&docs, "CustomResourceDefinition").clone();
    let text = std::fs::read_to_string(root().join("crds/shardeddatabases.sharddb.io.yaml")).unwrap();
    let generated: Value = serde_saphyr::from_str(&text).unwrap();
    let meta = rendered["metadata"].as_object_mut().unwrap();
    assert_eq!(meta.remove("annotations").unwrap()["helm.sh/resource-policy"], "keep");
    assert!(meta.remove("labels").is_some());
    assert_eq!(rendered, generated, "stale chart CRD: run scripts/gen-chart-crd.sh");

    let Some(docs) = render(&["crds.install=false"]) else { return };
    assert!(!kinds(&docs).contains(&"CustomResourceDefinition"));
}

#[test]
fn images_default_to_the_operator_release_and_its_pinned_postgres() {
    let Some(docs) = render(&[]) else { return };
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join(CHART).join("Chart.yaml")).unwrap()).unwrap();
    let c = operator_container(&docs);
    let server = pinned("DEFAULT_SHARD_SERVER_IMAGE");
    let registry = server.rsplit_once('/').unwrap().0;
    let app_version = chart["appVersion"].as_str().unwrap();
    assert_eq!(c["image"], format!("{registry}/sharddb-operator:{app_version}"));
    assert_eq!(env(c, "SHARDDB_SHARD_SERVER_IMAGE"), server.as_str());
    assert_eq!(env(c, "SHARDDB_ROUTER_IMAGE"), pinned("DEFAULT_ROUTER_IMAGE").as_str());
    assert_eq!(
        env(c, "SHARDDB_POSTGRES_IMAGE"),
        pinned("DEFAULT_POSTGRES_IMAGE").as_str(),
        "values.yaml images.postgres must equal DEFAULT_POSTGRES_IMAGE in operator/src/crd.rs"
    );
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");

    let Some(docs) = render(&["images.registry=example.org/x", "images.tag=dev"]) else { return };
    let c = operator_container(&docs);
    assert_eq!(c["image"], "example.org/x/sharddb-operator:dev");
    assert_eq!(env(c, "SHARDDB_ROUTER_IMAGE"), "example.org/x/sharddb-router:dev");
}

#[test]
fn the_operator_runs_unprivileged_with_probes_and_resources() {
    let Some(docs) = render(&[]) else { return };
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let c = operator_container(&docs);
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["args"], serde_json::json!(["run"]));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(env(c, "SHARDDB_METRICS_ADDR"), "0.0.0.0:8080");
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
}

#[test]
fn leader_election_is_on_by_default_with_its_lease_role() {
    let Some(docs) = render(&[]) else { return };
    let c = operator_container(&docs);
    assert_eq!(env(c, "SHARDDB_LEADER_ELECT"), "true");
    assert_eq!(env(c, "SHARDDB_LEASE_NAME"), RELEASE);
    let role = one(&docs, "Role");
    assert_eq!(role["rules"][0]["apiGroups"], serde_json::json!(["coordination.k8s.io"]));
    assert_eq!(role["rules"][0]["resources"], serde_json::json!(["leases"]));

    let Some(docs) = render(&["leaderElection.enabled=false", "replicaCount=1"]) else { return };
    assert_eq!(env(operator_container(&docs), "SHARDDB_LEADER_ELECT"), "false");
    assert!(!kinds(&docs).contains(&"Role"));
    let Some(docs) = render(&["replicaCount=3"]) else { return };
    assert_eq!(one(&docs, "Deployment")["spec"]["replicas"], 3);
}

#[test]
fn the_cluster_role_covers_every_kind_the_operator_owns() {
    let Some(docs) = render(&[]) else { return };
    let rules = one(&docs, "ClusterRole")["rules"].as_array().unwrap();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            let has = |key: &str, want: &str| r[key].as_array().is_some_and(|a| a.iter().any(|v| v == want));
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for (group, resource) in [
        ("apps", "statefulsets"),
        ("apps", "deployments"),
        ("", "services"),
        ("", "configmaps"),
        ("", "secrets"),
        ("", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["get", "list", "watch", "create", "patch", "delete"] {
            assert!(allows(group, resource, verb), "{verb} {group}/{resource}");
        }
    }
    for verb in ["get", "list", "watch", "patch"] {
        assert!(allows("sharddb.io", "shardeddatabases", verb), "{verb} shardeddatabases");
    }
    // The admin endpoint replaces the spec at the resourceVersion it read.
    assert!(allows("sharddb.io", "shardeddatabases", "update"));
    assert!(allows("sharddb.io", "shardeddatabases/status", "patch"));
    // The topology ConfigMap is written with a resourceVersion precondition (a replace), so the
    // reconcile and the healer never undo each other's writes.
    assert!(allows("", "configmaps", "update"));
    // A rolling update lists the server pods and evicts them one at a time (the eviction API,
    // so PodDisruptionBudgets hold); it never deletes a pod or a volume itself.
    assert!(allows("", "pods", "watch"));
    assert!(allows("", "pods", "list"));
    assert!(allows("", "pods/eviction", "create"));
    assert!(!allows("", "pods", "delete") && !allows("", "persistentvolumeclaims", "delete"));
    assert!(allows("events.k8s.io", "events", "create"));
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], one(&docs, "ServiceAccount")["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
}

#[test]
fn security_settings_reach_the_operator_and_the_admin_port_admits_routers_only() {
    let Some(docs) = render(&[]) else { return };
    let c = operator_container(&docs);
    assert_eq!(env(c, "SHARDDB_OPERATOR_CA_SECRET"), "sharddb-operator-ca");
    assert_eq!(env(c, "SHARDDB_REQUIRE_ADMIN_TOKEN"), "true");
    assert_eq!(env(c, "SHARDDB_NETWORK_POLICIES"), "true");
    assert_eq!(env(c, "SHARDDB_NAMESPACES"), &Value::Null, "every namespace by default");
    // The labels the operator gives databases' policies select its own pods.
    let selector = &one(&docs, "Deployment")["spec"]["selector"]["matchLabels"];
    let labels = env(c, "SHARDDB_OPERATOR_POD_LABELS").as_str().unwrap();
    for pair in labels.split(',') {
        let (k, v) = pair.split_once('=').unwrap();
        assert_eq!(selector[k], v, "{k}");
    }
    assert_eq!(labels.split(',').count(), selector.as_object().unwrap().len());

    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], selector);
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let admin = rules.iter().find(|r| r["ports"][0]["port"] == 8081).expect("a rule for the admin port");
    let from = &admin["from"][0];
    assert_eq!(from["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "router");
    assert_eq!(from["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "sharddb");
    let metrics = rules.iter().find(|r| r["ports"][0]["port"] == 8080).expect("a rule for metrics");
    assert!(metrics["from"].is_null(), "metrics and probes from anywhere");
    assert_eq!(rules.len(), 2, "no other port is open");

    let Some(docs) = render(&["networkPolicy.enabled=false", "security.requireAdminToken=false"]) else { return };
    assert!(!kinds(&docs).contains(&"NetworkPolicy"));
    let c = operator_container(&docs);
    assert_eq!(env(c, "SHARDDB_NETWORK_POLICIES"), "false");
    assert_eq!(env(c, "SHARDDB_REQUIRE_ADMIN_TOKEN"), "false");
}

#[test]
fn listed_namespaces_get_roles_instead_of_the_cluster_role() {
    let Some(docs) = render(&["rbac.namespaces={team-a,team-b}"]) else { return };
    let got = kinds(&docs);
    assert!(!got.contains(&"ClusterRole") && !got.contains(&"ClusterRoleBinding"), "{got:?}");
    let c = operator_container(&docs);
    assert_eq!(env(c, "SHARDDB_NAMESPACES"), "team-a,team-b");
    let roles: Vec<&Value> =
        docs.iter().filter(|d| d["kind"] == "Role" && d["metadata"]["name"] == "sharddb-operator").collect();
    let namespaces: Vec<&str> = roles.iter().map(|r| r["metadata"]["namespace"].as_str().unwrap()).collect();
    assert_eq!(namespaces, ["team-a", "team-b"]);
    for role in &roles {
        let rules = role["rules"].as_array().unwrap();
        let allows = |group: &str, resource: &str, verb: &str| {
            rules.iter().any(|r| {
                let has = |key: &str, want: &str| r[key].as_array().is_some_and(|a| a.iter().any(|v| v == want));
                has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
            })
        };
        assert!(allows("sharddb.io", "shardeddatabases", "watch"));
        assert!(allows("", "secrets", "create"));
        assert!(allows("networking.k8s.io", "networkpolicies", "patch"));
        assert!(allows("apps", "statefulsets", "delete"));
    }
    let bindings: Vec<&Value> =
        docs.iter().filter(|d| d["kind"] == "RoleBinding" && d["metadata"]["name"] == "sharddb-operator").collect();
    assert_eq!(bindings.len(), 2);
    for b in bindings {
        assert_eq!(b["roleRef"]["kind"], "Role");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
    }
    // Its own CA's Secret, in the release namespace (not in the list): get and create, nothing more.
    let ca = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "sharddb-operator-ca")
        .expect("a Role for the operator's CA");
    assert_eq!(ca["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        ca["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]}])
    );
    // The admin port admits routers of the listed namespaces only.
    let policy = one(&docs, "NetworkPolicy");
    let ns = &policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(ns["values"], serde_json::json!(["team-a", "team-b"]));
}
