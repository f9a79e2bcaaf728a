//! The `ShardedDatabase` custom resource (group `sharddb.io`, version `v1alpha1`): the spec users
//! write and the status the operator reports. Pure types; the `///` comments become the CRD's
//! schema descriptions (`kubectl explain`).
//!
//! The schema must stay *structural* for Kubernetes: no untagged enums mixing types. Rules the
//! OpenAPI schema can express (minimums, identifier patterns) are declared here so the API server
//! rejects them at `kubectl apply`; everything else is checked by `brain::validate`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use shard_server::limits::{MAX_SERVERS, MAX_SHARDS};
use std::collections::BTreeMap;

/// The identifier pattern of `shard_server::schema::check_ident`, for the OpenAPI schema.
const IDENT_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_-]{0,47}$";

/// The shard-server image when `spec.images.shardServer` is absent. Every default image is pinned
/// here and nowhere else.
pub const DEFAULT_SHARD_SERVER_IMAGE: &str = "ghcr.io/sharddb/sharddb-shard-server:0.1.0";
/// The router image when `spec.images.router` is absent.
pub const DEFAULT_ROUTER_IMAGE: &str = "ghcr.io/sharddb/sharddb-router:0.1.0";
/// The upstream PostgreSQL image run beside each shard server when `spec.images.postgres` is absent.
pub const DEFAULT_POSTGRES_IMAGE: &str = "docker.io/library/postgres:17.6-bookworm";

/// A sharded, replicated table served over the seed HTTP API.
// Each `printcolumn` repeats `type_`, which the lint mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "sharddb.io",
    version = "v1alpha1",
    kind = "ShardedDatabase",
    shortname = "sdb",
    namespaced,
    status = "ShardedDatabaseStatus",
    doc = "A sharded, replicated, Postgres-backed table served over HTTP",
    scale(spec_replicas_path = ".spec.servers", status_replicas_path = ".status.readyServers"),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        json_path = ".status.shardCount",
        description = "Shards in the published topology"
    ),
    printcolumn(
        name = "Copies",
        type_ = "string",
        json_path = ".status.copiesReady",
        description = "Copies of shards that serve reads / every copy in the topology"
    ),
    printcolumn(name = "Servers", type_ = "integer", json_path = ".spec.servers"),
    printcolumn(name = "Servers-Ready", type_ = "integer", json_path = ".status.readyServers"),
    printcolumn(
        name = "Servers-Updated",
        type_ = "integer",
        json_path = ".status.updatedServers",
        priority = 1,
        description = "Server pods running the current revision of their template"
    ),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.topologyEpoch", priority = "1"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("has(self.placement) || !has(self.replicas) || self.replicas <= self.servers")
        .message("spec.replicas must not exceed spec.servers: each copy of a shard needs its own server"),
    validation = Rule::new("!has(self.placement) || size(self.placement) == self.servers")
        .message("spec.placement must list exactly spec.servers servers"),
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct ShardedDatabaseSpec {
    /// The table: column names and types. The first column is the shard key unless `key` names
    /// another one; the key must be a `Number` column. Immutable once created.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.schema is immutable"))]
    pub schema: TableSchema,
    /// The shards (at most 1024): half-open key ranges `[low, low + size)` that must not overlap.
    /// A written key outside every shard is handled as `unroutedKeys` says. Shard ids are unique
    /// (the list is keyed by `id`).
    #[schemars(length(min = 1, max = MAX_SHARDS), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub shards: Vec<ShardSpec>,
    /// Copies of each shard, each on a different server. Defaults to 3 when `placement` is absent;
    /// with a `placement`, each shard has as many copies as servers listing it, and `replicas`, if
    /// set, must equal that number for every shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SERVERS))]
    pub replicas: Option<u32>,
    /// Number of data servers (each one pod with its own Postgres and volume), at most 256. The scale
    /// subresource (`kubectl scale sdb/NAME --replicas=N`) sets this field.
    #[schemars(range(min = 1, max = MAX_SERVERS))]
    pub servers: u32,
    /// An explicit placement, like the seed's `/init` `servers`: server name → the shard ids it
    /// holds. Must list exactly `servers` servers and place every shard. Without it, replicas are
    /// placed automatically on servers named `Server0` … `Server{servers-1}`. Naming servers lets
    /// one particular server be removed (the seed's `/rm`). In Kubernetes a server name becomes
    /// part of object names, so it may hold only letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Bounded so the API server's CEL cost estimate of the name rule stays within budget.
    #[schemars(extend("maxProperties" = MAX_SERVERS))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[A-Za-z]([A-Za-z0-9-]{0,38}[A-Za-z0-9])?$'))")
        .message("spec.placement server names must be letters, digits and '-', start with a letter, end with a letter or digit, at most 40 characters"))]
    pub placement: Option<BTreeMap<String, Vec<String>>>,
    /// The stateless HTTP router in front of the servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterSpec>,
    /// Persistent storage of each server. Without it, servers use ephemeral storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Container images; each defaults to the version this operator release was tested with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesSpec>,
    /// Compute resources per container kind; none are requested when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// The database's certificates. Traffic between its servers, routers and the operator is
    /// always mutual TLS; this chooses the CA and whether clients reach the router over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Tuning of every shard server: its row cache, its threads and its probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_server: Option<ShardServerSpec>,
    /// The PostgreSQL run beside each shard server: an allow-listed set of its settings, and its
    /// probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
    /// What a write does with a row whose key is in no shard: `Reject` (the default) refuses the
    /// whole write with a 400 and writes nothing; `Skip` writes the rows that belong to a shard
    /// and says in its answer how many rows were skipped and which keys, as the seed's load
    /// balancer did (a database declared through the seed's `/init` is created with `Skip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrouted_keys: Option<UnroutedKeys>,
}

// What a write does with a row whose key is in no shard. No `///` here: the field's description is
// the one the schema should show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnroutedKeys {
    /// Refuse the whole write (400); nothing is written.
    #[default]
    Reject,
    /// Write the rows that belong to a shard; the answer names the keys skipped.
    Skip,
}

impl From<UnroutedKeys> for shard_server::topology::UnroutedKeys {
    fn from(u: UnroutedKeys) -> Self {
        match u {
            UnroutedKeys::Reject => shard_server::topology::UnroutedKeys::Reject,
            UnroutedKeys::Skip => shard_server::topology::UnroutedKeys::Skip,
        }
    }
}

/// The table's columns, in the seed's format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSchema {
    /// Column names: letters, digits, `_` and `-`, starting with a letter or `_`, at most 48
    /// characters, unique ignoring case.
    #[schemars(length(min = 1), inner(pattern(IDENT_PATTERN)))]
    pub columns: Vec<String>,
    /// The type of each column, in column order.
    #[schemars(length(min = 1))]
    pub dtypes: Vec<ColumnType>,
    /// The shard key column; the first column when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(IDENT_PATTERN))]
    pub key: Option<String>,
}

/// A column type of the seed API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ColumnType {
    /// A 64-bit signed integer.
    Number,
    /// UTF-8 text (a JSON number sent for it is stored as its decimal text).
    String,
}

impl From<ColumnType> for shard_server::schema::DType {
    fn from(t: ColumnType) -> Self {
        match t {
            ColumnType::Number => shard_server::schema::DType::Number,
            ColumnType::String => shard_server::schema::DType::String,
        }
    }
}

/// One shard: the key range `[low, low + size)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardSpec {
    /// The shard's id (e.g. `sh1`): letters, digits, `_` and `-`, starting with a letter or `_`.
    #[schemars(pattern(IDENT_PATTERN))]
    pub id: String,
    /// The lowest key in the shard.
    pub low: i64,
    /// The number of keys in the shard (positive).
    #[schemars(range(min = 1))]
    pub size: i64,
}

/// The router Deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Router pods (default 2). Local mode always runs one router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub replicas: Option<u32>,
    /// When a router pod counts as ready (`GET /readyz`: it has a routing table); defaults:
    /// every 5 s, 2 s timeout, 3 failures. Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ProbeSpec>,
    /// When a router pod is restarted (`GET /healthz`); defaults: every 10 s, 2 s timeout, 6
    /// failures. Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<ProbeSpec>,
}

/// Tuning of each shard server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardServerSpec {
    /// Rows each server keeps in memory across its shard copies (`--cache-rows`), so reads and
    /// a primary's decisions skip Postgres; a copy that does not fit is read from Postgres. About
    /// 200 bytes per row of the seed's table. 0 turns the cache off; default 50,000. At most
    /// 100,000,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub cache_rows: Option<u64>,
    /// Threads running requests (`--worker-threads`), 1 to 256. Default: one per CPU the
    /// container may use (its CPU limit included); in local mode, each server's share of this
    /// machine's CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub worker_threads: Option<u32>,
    /// When a server pod counts as ready (`GET /heartbeat`); defaults: every 5 s, 2 s timeout, 3
    /// failures. Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ProbeSpec>,
    /// When the shard-server container is restarted (`GET /heartbeat`); defaults: every 10 s,
    /// 2 s timeout, 6 failures. Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<ProbeSpec>,
}

/// The PostgreSQL beside each shard server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Server settings, name → value, passed as `-c name=value`, like CloudNativePG's
    /// `postgresql.parameters`. Only an allow-list may be set (memory, checkpoints, planner costs,
    /// autovacuum, logging); settings that would lose acknowledged writes (`fsync`,
    /// `synchronous_commit`, ...), move Postgres away from where the shard server reaches it
    /// (`port`, `listen_addresses`), cancel its statements (`statement_timeout`) or keep Postgres
    /// from starting (`shared_preload_libraries`) are refused with the reason. Each value is
    /// checked against the setting's kind (`64MB`, `5min`, `0.9`, `on`). The README lists them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub parameters: BTreeMap<String, String>,
    /// When the postgres container counts as ready (`pg_isready`); defaults: every 10 s, 5 s
    /// timeout, 6 failures. Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ProbeSpec>,
    /// When the postgres container is restarted (`pg_isready`); defaults as for readiness.
    /// Kubernetes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<ProbeSpec>,
}

/// Timings of one probe; each field left out keeps its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Seconds after the container starts before the first probe (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,
    /// Seconds between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: Option<i32>,
    /// Seconds a probe may take; at most `periodSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
    /// Consecutive failures before the probe counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: Option<i32>,
}

/// The database's certificates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the database's namespace holding the CA that signs the database's
    /// certificates, as `tls.crt` and `tls.key` (a `kubernetes.io/tls` Secret; cert-manager
    /// writes one for a `Certificate` with `isCA: true`). The CA must serve sharddb alone:
    /// whoever can obtain a certificate from it can act as any component of the databases it
    /// signs for. Default: the operator makes a CA and keeps it in the Secret `<name>-ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: Option<String>,
    /// Serve the router's client port over HTTPS, with a certificate of the database's CA for
    /// the router Service's DNS names; clients check it against `ca.crt` of the Secret
    /// `<name>-router-tls`. Default false: plain HTTP, which the seed's clients speak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<bool>,
    /// How the database's components authenticate each other (see [`InternalAuthMode`]).
    /// Unset on a database a previous release created, this operator runs it in `none`, so that
    /// taking it over does not roll its pods into a mix of TLS and plain pods that cannot talk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_auth: Option<InternalAuthMode>,
}

/// How the database's components authenticate each other. `strict`: mutual TLS with
/// certificates of the database's CA, nothing else accepted. `none`: plain HTTP and no
/// credential, as releases before internal authentication spoke; no CA, certificates or admin
/// token are made. `migrate`: servers serve TLS and plain HTTP on one port, every component dials
/// TLS. Default: `none` for a database a previous release created (its servers exist and it has
/// no `<name>-ca` Secret), `strict` otherwise. Changing it rolls every pod. The mode in force is
/// the status condition `InternalAuth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InternalAuthMode {
    /// Plain HTTP, anyone accepted: only to run beside a release from before internal authentication.
    None,
    /// TLS and plain HTTP served on one port, TLS dialled: the rung between `none` and `strict`.
    Migrate,
    /// Mutual TLS only (the default for a new database).
    Strict,
}

impl From<InternalAuthMode> for shard_server::tls::InternalAuth {
    fn from(mode: InternalAuthMode) -> Self {
        match mode {
            InternalAuthMode::None => shard_server::tls::InternalAuth::None,
            InternalAuthMode::Migrate => shard_server::tls::InternalAuth::Migrate,
            InternalAuthMode::Strict => shard_server::tls::InternalAuth::Strict,
        }
    }
}

/// Persistent storage per server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each server's volume, as a Kubernetes quantity (e.g. `1Gi`, `500Mi`).
    pub size: String,
    /// The StorageClass of each server's volume; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Container images. Changing one rolls the pods that run it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    /// The shard-server image (`sharddb-shard-server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub shard_server: Option<String>,
    /// The router image (`sharddb-router`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub router: Option<String>,
    /// The PostgreSQL image run beside each shard server (the upstream `postgres` image or one
    /// compatible with its entrypoint and environment variables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub postgres: Option<String>,
}

/// Compute resources of each kind of container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// The shard-server container of each server pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_server: Option<ContainerResources>,
    /// The postgres container of each server pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<ContainerResources>,
    /// Each router pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<ContainerResources>,
}

/// Requests and limits of one container, as Kubernetes quantities (e.g. `cpu: 500m`, `memory: 1Gi`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerResources {
    /// Resource name (`cpu`, `memory`, …) → the amount the scheduler reserves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Resource name → the most the container may use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// What the operator last observed and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct ShardedDatabaseStatus {
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, following the Kubernetes condition convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Server pods that are ready (the scale subresource's status replicas).
    #[serde(default)]
    pub ready_servers: u32,
    /// Server pods running the current revision of their template; fewer than `readyServers`
    /// while a rolling update restarts them one at a time.
    #[serde(default)]
    pub updated_servers: u32,
    /// Per shard: its primary and the servers whose copy serves reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// The epoch of the topology document last published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_epoch: Option<u64>,
    /// Shards in the published topology.
    #[serde(default)]
    pub shard_count: u32,
    /// Copies of shards in the published topology, whatever their state.
    #[serde(default)]
    pub copies: u32,
    /// Of `copies`, those that serve reads: ready in the topology, on a ready pod the operator
    /// reaches.
    #[serde(default)]
    pub ready_copies: u32,
    /// `readyCopies/copies`, for `kubectl get` (a column cannot compute it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub copies_ready: String,
}

/// One condition of the resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect this condition reports: `Ready`, `Progressing`, `Degraded` or `InternalAuth`
    /// (`True` in `strict`; else `False`, the reason naming the mode).
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether the condition holds.
    pub status: ConditionStatus,
    /// A CamelCase reason for the last transition, e.g. `InvalidSpec`.
    pub reason: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The state of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell.
    Unknown,
}

/// The observed state of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// The shard's id.
    pub id: String,
    /// The server accepting its writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Servers whose copy is complete and serves reads.
    #[serde(default)]
    pub ready_replicas: Vec<String>,
    /// Servers whose copy is being rebuilt from the primary (after a lost volume, an outage or a
    /// failover); they serve no reads and do not hold up writes until ready again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovering_replicas: Vec<String>,
}

/// The `format`s the Kubernetes API server recognises in a CRD schema (`supportedVersionedFormats`
/// of apiextensions-apiserver, compared with `-` removed as it does). Any other format draws an
/// `unrecognized format` warning on `kubectl apply` from some Kubernetes versions, integer formats
/// (`int32`, `int64`) included, and is never checked anyway: the API server stores every
/// integer as 64 bits and validates ranges with `minimum`/`maximum`.
pub const KUBERNETES_FORMATS: [&str; 24] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
];

/// Drops the `format` schemars gives numbers (`uint32`, `uint64`, `int64`, `double`, ...), which
/// Kubernetes does not know (see [`KUBERNETES_FORMATS`]); ranges stay as `minimum`/`maximum`.
fn kubernetes_formats(schema: &mut schemars::Schema) {
    // An optional field's type is still `["integer", "null"]` here (made `nullable` later).
    let numeric = |t: &serde_json::Value| matches!(t.as_str(), Some("integer" | "number"));
    if let Some(object) = schema.as_object_mut()
        && object.get("type").is_some_and(|t| numeric(t) || t.as_array().is_some_and(|a| a.iter().any(numeric)))
    {
        object.remove("format");
    }
    schemars::transform::transform_subschemas(&mut kubernetes_formats, schema);
}

/// Where the generated CRD is kept, relative to the repository root.
pub const CRD_FILE: &str = "crds/shardeddatabases.sharddb.io.yaml";

/// The CRD as YAML: what `sharddb-operator crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&ShardedDatabase::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_names_and_scope() {
        let crd = ShardedDatabase::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("shardeddatabases.sharddb.io"));
        assert_eq!(crd.spec.group, "sharddb.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "ShardedDatabase");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["sdb".to_string()][..]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some(), "status subresource");
    }

    #[test]
    fn crd_schema_is_documented_and_carries_the_simple_rules() {
        let crd = ShardedDatabase::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        for field in [
            "schema",
            "shards",
            "replicas",
            "servers",
            "placement",
            "router",
            "storage",
            "images",
            "resources",
            "shardServer",
            "postgres",
        ] {
            let desc = spec["properties"][field]["description"].as_str().unwrap_or("");
            assert!(!desc.is_empty(), "spec.{field} has a description");
        }
        assert_eq!(spec["properties"]["servers"]["minimum"], 1.0);
        let shard = &spec["properties"]["shards"]["items"];
        assert_eq!(shard["properties"]["id"]["pattern"], IDENT_PATTERN);
        assert_eq!(
            spec["properties"]["schema"]["properties"]["dtypes"]["items"]["enum"],
            serde_json::json!(["Number", "String"])
        );
        let required: Vec<&str> = spec["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(required, ["schema", "servers", "shards"]);
    }

    #[test]
    fn crd_file_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_FILE);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml().unwrap(),
            "{CRD_FILE} is stale; regenerate it with `cargo run -p sharddb-operator -- crd > {CRD_FILE}`"
        );
    }

    #[test]
    fn crd_carries_scale_columns_and_cel_rules() {
        let crd = ShardedDatabase::crd();
        let v = &crd.spec.versions[0];
        let scale = v.subresources.as_ref().unwrap().scale.as_ref().expect("scale subresource");
        assert_eq!(scale.spec_replicas_path, ".spec.servers");
        assert_eq!(scale.status_replicas_path, ".status.readyServers");
        let columns: Vec<&str> =
            v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            columns,
            ["Shards", "Copies", "Servers", "Servers-Ready", "Servers-Updated", "Epoch", "Ready", "Age"]
        );
        let paths: Vec<&str> =
            v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.json_path.as_str()).collect();
        assert!(
            !paths.iter().any(|p| p.contains("[*]")),
            "kubectl prints only the first match of a wildcard: {paths:?}"
        );
        let schema = serde_json::to_value(&v.schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let rules = |v: &serde_json::Value| -> Vec<String> {
            v["x-kubernetes-validations"]
                .as_array()
                .map(|a| a.iter().map(|r| r["rule"].as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        assert!(rules(spec).iter().any(|r| r.contains("self.replicas <= self.servers")), "{spec}");
        assert!(rules(spec).iter().any(|r| r.contains("size(self.placement) == self.servers")));
        assert_eq!(rules(&spec["properties"]["schema"]), ["self == oldSelf"], "schema is immutable");
        assert_eq!(rules(&spec["properties"]["placement"]).len(), 1, "placement server names");
        let shards = &spec["properties"]["shards"];
        assert_eq!(shards["x-kubernetes-list-type"], "map", "shard ids are unique");
        assert_eq!(shards["x-kubernetes-list-map-keys"], serde_json::json!(["id"]));
        assert_eq!(shards["items"]["properties"]["size"]["minimum"], 1.0);
        for field in ["images", "resources"] {
            assert!(spec["properties"][field]["description"].as_str().is_some_and(|d| !d.is_empty()), "{field}");
        }
    }

    /// Every `format` in the schema, with the path where it occurs.
    fn formats(value: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(f) = map.get("format").and_then(|f| f.as_str()) {
                    out.push((path.to_owned(), f.to_owned()));
                }
                for (k, v) in map {
                    formats(v, &format!("{path}.{k}"), out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    formats(v, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_schema_uses_only_formats_kubernetes_recognises() {
        let crd = ShardedDatabase::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut found = Vec::new();
        formats(&schema, "schema", &mut found);
        let unknown: Vec<_> =
            found.iter().filter(|(_, f)| !KUBERNETES_FORMATS.contains(&f.replace('-', "").as_str())).collect();
        assert!(unknown.is_empty(), "formats `kubectl apply` warns about: {unknown:?}");
        // The check sees formats where they are: a number field keeps its range, not its format.
        let epoch = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["topologyEpoch"];
        assert_eq!(epoch["type"], "integer");
        assert_eq!(epoch["minimum"], 0.0, "{epoch}");
        let mut sample = Vec::new();
        formats(&serde_json::json!({"a": [{"format": "uint64"}]}), "x", &mut sample);
        assert_eq!(sample, [("x.a[0]".to_owned(), "uint64".to_owned())]);
    }

    #[test]
    fn crd_serialises_to_yaml() {
        let yaml = serde_saphyr::to_string(&ShardedDatabase::crd()).unwrap();
        assert!(yaml.contains("kind: CustomResourceDefinition"), "{yaml}");
        assert!(yaml.contains("shardeddatabases.sharddb.io"));
    }
}
