//! The resource types the fake serves (no I/O): the built-in kinds an operator touches, custom
//! resources registered at runtime or learned from CRD objects, and the discovery documents
//! (`/api`, `/apis`, `/apis/{group}/{version}`) built from them.

use serde_json::{Value, json};

/// One served resource: `group/version`, its plural (URL) name, kind and scope, and which
/// subresources it has.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    /// Plural, lower-case name used in URLs, e.g. `configmaps`.
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Whether `.status` is only written through the `/status` subresource.
    pub status: bool,
    /// The `/scale` subresource, if any.
    pub scale: Option<ScalePaths>,
    pub short_names: Vec<String>,
}

/// Where the `/scale` subresource reads and writes replicas, as CRD-style JSON paths
/// (`.spec.replicas`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

impl ScalePaths {
    pub fn new(spec_replicas: &str, status_replicas: &str) -> Self {
        Self { spec_replicas: spec_replicas.into(), status_replicas: status_replicas.into(), label_selector: None }
    }

    pub fn with_label_selector(mut self, path: &str) -> Self {
        self.label_selector = Some(path.into());
        self
    }
}

impl ResourceType {
    /// A resource without subresources.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status: false,
            scale: None,
            short_names: Vec::new(),
        }
    }

    /// Gives the resource a `/status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    /// Gives the resource a `/scale` subresource.
    pub fn with_scale(mut self, paths: ScalePaths) -> Self {
        self.scale = Some(paths);
        self
    }

    /// `apiVersion` of its objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `configmaps` or `statefulsets.apps`, as error messages name resources.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// Whether a test's shorthand (`configmaps`, `ConfigMap`, a short name like `sdb`,
    /// `statefulsets.apps`, `apps/v1/StatefulSet`, `apps/v1/statefulsets`) names this resource.
    fn answers_to(&self, name: &str) -> bool {
        let api_version = self.api_version();
        let long = [
            self.plural.clone(),
            self.kind.clone(),
            self.qualified(),
            format!("{api_version}/{}", self.plural),
            format!("{api_version}/{}", self.kind),
        ];
        long.iter().chain(&self.short_names).any(|candidate| candidate.eq_ignore_ascii_case(name))
    }

    fn discovery_entries(&self) -> Vec<Value> {
        let verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.kind.to_lowercase(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
        })];
        let sub_verbs = ["get", "patch", "update"];
        if self.status {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": sub_verbs,
            }));
        }
        if self.scale.is_some() {
            entries.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": sub_verbs,
            }));
        }
        entries
    }
}

/// All resource types currently served, core group first so that shorthand lookups prefer it
/// (`events` is core/v1 before events.k8s.io/v1).
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    pub fn builtin() -> Self {
        let workload_scale = || ScalePaths::new(".spec.replicas", ".status.replicas");
        let t = ResourceType::new;
        let types = vec![
            t("", "v1", "namespaces", "Namespace", false).with_status(),
            t("", "v1", "configmaps", "ConfigMap", true),
            t("", "v1", "secrets", "Secret", true),
            t("", "v1", "services", "Service", true).with_status(),
            t("", "v1", "serviceaccounts", "ServiceAccount", true),
            t("", "v1", "pods", "Pod", true).with_status(),
            t("", "v1", "events", "Event", true),
            t("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true).with_status(),
            t("apps", "v1", "statefulsets", "StatefulSet", true).with_status().with_scale(workload_scale()),
            t("apps", "v1", "deployments", "Deployment", true).with_status().with_scale(workload_scale()),
            t("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", true).with_status(),
            t("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", true),
            t("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
            t("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
            t("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
            t("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
            t("coordination.k8s.io", "v1", "leases", "Lease", true),
            t("events.k8s.io", "v1", "events", "Event", true),
            t("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", false)
                .with_status(),
        ];
        Self { types }
    }

    /// Adds a type, replacing an earlier registration of the same group/version/plural.
    pub fn register(&mut self, rt: ResourceType) {
        match self.types.iter_mut().find(|t| t.group == rt.group && t.version == rt.version && t.plural == rt.plural) {
            Some(existing) => *existing = rt,
            None => self.types.push(rt),
        }
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// The type a test's shorthand names (see [`ResourceType::answers_to`]).
    pub fn resolve(&self, name: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.answers_to(name))
    }

    pub fn by_api_version_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.api_version() == api_version && t.kind == kind)
    }

    /// `/api`: the core group's versions.
    pub fn core_versions(&self) -> Value {
        json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] })
    }

    fn group_doc(&self, group: &str) -> Value {
        let mut versions: Vec<&str> = Vec::new();
        for t in self.types.iter().filter(|t| t.group == group) {
            if !versions.contains(&t.version.as_str()) {
                versions.push(&t.version);
            }
        }
        let entry = |v: &str| json!({ "groupVersion": format!("{group}/{v}"), "version": v });
        json!({
            "name": group,
            "versions": versions.iter().map(|v| entry(v)).collect::<Vec<_>>(),
            "preferredVersion": entry(versions.first().copied().unwrap_or_default()),
        })
    }

    /// `/apis`: every non-core group.
    pub fn groups(&self) -> Value {
        let mut names: Vec<&str> = Vec::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            if !names.contains(&t.group.as_str()) {
                names.push(&t.group);
            }
        }
        let groups: Vec<Value> = names.iter().map(|g| self.group_doc(g)).collect();
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
    }

    /// `/apis/{group}`.
    pub fn group(&self, group: &str) -> Option<Value> {
        let known = self.types.iter().any(|t| t.group == group && !group.is_empty());
        known.then(|| {
            let mut doc = self.group_doc(group);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        })
    }

    /// `/api/v1` or `/apis/{group}/{version}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let types: Vec<&ResourceType> =
            self.types.iter().filter(|t| t.group == group && t.version == version).collect();
        if types.is_empty() {
            return None;
        }
        let resources: Vec<Value> = types.iter().flat_map(|t| t.discovery_entries()).collect();
        let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(
            json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources }),
        )
    }
}

/// The types a `CustomResourceDefinition` object declares: one per served version.
pub(crate) fn types_from_crd(crd: &Value) -> Vec<ResourceType> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let Some(spec) = crd.get("spec") else { return Vec::new() };
    let names = spec.get("names");
    let group = text(spec.get("group"));
    let plural = text(names.and_then(|n| n.get("plural")));
    let kind = text(names.and_then(|n| n.get("kind")));
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let short_names: Vec<String> = names
        .and_then(|n| n.get("shortNames"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
        .unwrap_or_default();
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let versions = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| {
            let version = v.get("name").and_then(Value::as_str)?;
            let mut rt = ResourceType::new(&group, version, &plural, &kind, namespaced);
            rt.short_names = short_names.clone();
            let subresources = v.get("subresources");
            rt.status = subresources.and_then(|s| s.get("status")).is_some();
            rt.scale = subresources.and_then(|s| s.get("scale")).map(|s| ScalePaths {
                spec_replicas: text(s.get("specReplicasPath")),
                status_replicas: text(s.get("statusReplicasPath")),
                label_selector: s.get("labelSelectorPath").and_then(Value::as_str).map(String::from),
            });
            Some(rt)
        })
        .collect()
}
