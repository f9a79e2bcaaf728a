//! Spec → [`ValidatedDb`]: every rule a `ShardedDatabase` spec must satisfy, checked once. Pure.
//!
//! Everything downstream (placement, topology, the bodies) reads `ValidatedDb`, never the raw
//! spec. Error messages name the offending field by its path in the resource (`spec.shards[1]`),
//! because they end up in a `Ready=False, reason=InvalidSpec` condition or on a terminal.

use super::tuning::{Tuning, TuningError, validate_tuning};
use crate::crd::{
    DEFAULT_POSTGRES_IMAGE, DEFAULT_ROUTER_IMAGE, DEFAULT_SHARD_SERVER_IMAGE, ResourcesSpec, ShardedDatabaseSpec,
};
use shard_server::limits::{MAX_SERVERS, MAX_SHARDS};
use shard_server::schema::{IdentError, Schema, SchemaError, SchemaSpec, check_ident};
use shard_server::topology::UnroutedKeys;
use std::collections::BTreeMap;

/// Copies of each shard when the spec says nothing.
pub const DEFAULT_REPLICAS: u32 = 3;
/// Router pods when the spec says nothing.
pub const DEFAULT_ROUTER_REPLICAS: u32 = 2;

/// A spec that passed [`validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedDb {
    pub schema: Schema,
    /// Ordered by `low`; ranges do not overlap and `low + size` does not overflow.
    pub shards: Vec<ShardRange>,
    pub servers: ServerLayout,
    pub router_replicas: u32,
    /// A Kubernetes quantity, when the spec asks for persistent storage.
    pub storage_size: Option<String>,
    /// The StorageClass of the volumes; the cluster default when `None`.
    pub storage_class: Option<String>,
    /// Container images, defaults filled in.
    pub images: Images,
    /// Compute resources per container kind (names and quantities checked).
    pub resources: ResourcesSpec,
    /// What a router does with a written key in no shard.
    pub unrouted_keys: UnroutedKeys,
    /// Where the database's CA comes from, and whether routers serve clients over TLS.
    pub tls: TlsSettings,
    /// Row cache, threads, probe timings and Postgres settings.
    pub tuning: Tuning,
}

/// The database's certificates, defaults applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// A user-supplied CA Secret; `None`: the operator's own `<name>-ca`.
    pub ca_secret: Option<String>,
    /// Routers serve their client port over HTTPS.
    pub client_tls: bool,
    /// `spec.tls.internalAuth`; `None`: decided by the platform (see `k8s::internal_auth`).
    pub internal_auth: Option<shard_server::tls::InternalAuth>,
}

/// The images every pod runs, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    pub shard_server: String,
    pub router: String,
    pub postgres: String,
}

/// The images this operator release was tested with (the `crd` constants); the operator may be
/// configured with others, see [`validate_with_defaults`].
impl Default for Images {
    fn default() -> Self {
        Images {
            shard_server: DEFAULT_SHARD_SERVER_IMAGE.to_owned(),
            router: DEFAULT_ROUTER_IMAGE.to_owned(),
            postgres: DEFAULT_POSTGRES_IMAGE.to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRange {
    pub id: String,
    pub low: i64,
    pub size: i64,
}

/// How servers and their shards are declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerLayout {
    /// `servers` servers named `Server0..`, `replicas` copies of each shard placed automatically.
    Count { servers: u32, replicas: u32 },
    /// An explicit map: servers in natural name order (`Server2` before `Server10`), each with the
    /// shard ids it holds. Every shard is held by at least one server, no server lists one twice.
    Explicit(Vec<(String, Vec<String>)>),
}

impl ValidatedDb {
    pub fn server_count(&self) -> usize {
        match &self.servers {
            ServerLayout::Count { servers, .. } => *servers as usize,
            ServerLayout::Explicit(list) => list.len(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "spec.tls.clientTls needs the database's certificates, which spec.tls.internalAuth: none does not make; \
         use migrate or strict"
    )]
    ClientTlsWithoutInternalTls,
    #[error("spec.schema: {0}")]
    Schema(#[source] SchemaError),
    #[error("spec.shards: at least one shard is required")]
    NoShards,
    #[error("spec.shards[{index}].id: {source}")]
    ShardId {
        index: usize,
        #[source]
        source: IdentError,
    },
    #[error("spec.shards[{index}] ({id}): id already used by spec.shards[{first}]")]
    DuplicateShard { index: usize, id: String, first: usize },
    #[error("spec.shards[{index}] ({id}): size must be positive, got {size}")]
    ShardSize { index: usize, id: String, size: i64 },
    #[error("spec.shards[{index}] ({id}): low + size overflows a 64-bit key")]
    ShardOverflow { index: usize, id: String },
    #[error("spec.shards[{index}] ({id}) overlaps {other}")]
    Overlap { index: usize, id: String, other: String },
    #[error("spec.servers must be at least 1")]
    NoServers,
    #[error("spec.servers is {0}; at most {MAX_SERVERS} servers are allowed")]
    TooManyServers(u64),
    #[error("spec.shards lists {0} shards; at most {MAX_SHARDS} are allowed")]
    TooManyShards(usize),
    #[error("spec.replicas must be at least 1")]
    NoReplicas,
    #[error("spec.replicas ({replicas}) exceeds spec.servers ({servers}): each copy of a shard needs its own server")]
    TooManyReplicas { replicas: u32, servers: u32 },
    #[error("spec.placement lists {listed} servers but spec.servers is {servers}")]
    PlacementCount { listed: usize, servers: u32 },
    #[error("spec.placement: {0}")]
    PlacementServerName(#[source] IdentError),
    #[error("spec.placement: server names {first} and {second} differ only in case")]
    PlacementNameClash { first: String, second: String },
    #[error("spec.placement.{server}: unknown shard {shard}")]
    PlacementUnknownShard { server: String, shard: String },
    #[error("spec.placement.{server}: lists shard {shard} twice")]
    PlacementRepeat { server: String, shard: String },
    #[error("spec.placement: shard {shard} is not placed on any server")]
    PlacementUncovered { shard: String },
    #[error("spec.placement: shard {shard} is on {count} servers but spec.replicas is {replicas}")]
    PlacementReplicas { shard: String, count: usize, replicas: u32 },
    #[error("spec.router.replicas must be at least 1")]
    NoRouters,
    #[error("spec.storage.size {0:?} is not a quantity like 1Gi or 500Mi")]
    StorageSize(String),
    #[error(transparent)]
    Tuning(#[from] TuningError),
}

/// Checks a spec and returns the form the rest of the operator reads; images the spec leaves out
/// are this release's defaults.
pub fn validate(spec: &ShardedDatabaseSpec) -> Result<ValidatedDb, SpecError> {
    validate_with_defaults(spec, &Images::default())
}

/// [`validate`], with `default_images` for the images the spec leaves out (the operator's
/// configured images, e.g. a mirror registry).
pub fn validate_with_defaults(spec: &ShardedDatabaseSpec, default_images: &Images) -> Result<ValidatedDb, SpecError> {
    let schema = Schema::try_from(SchemaSpec {
        columns: spec.schema.columns.clone(),
        dtypes: spec.schema.dtypes.iter().map(|&t| t.into()).collect(),
        key: spec.schema.key.clone(),
    })
    .map_err(SpecError::Schema)?;
    let shards = validate_shards(spec)?;
    let servers = validate_servers(spec, &shards)?;
    let router_replicas = spec.router.as_ref().and_then(|r| r.replicas).unwrap_or(DEFAULT_ROUTER_REPLICAS);
    if router_replicas == 0 {
        return Err(SpecError::NoRouters);
    }
    let storage_size = match &spec.storage {
        Some(s) if is_quantity(&s.size) => Some(s.size.clone()),
        Some(s) => return Err(SpecError::StorageSize(s.size.clone())),
        None => None,
    };
    let tuning = validate_tuning(spec)?;
    let client_tls = spec.tls.as_ref().and_then(|t| t.client_tls).unwrap_or(false);
    let internal_auth = spec.tls.as_ref().and_then(|t| t.internal_auth).map(shard_server::tls::InternalAuth::from);
    if client_tls && internal_auth == Some(shard_server::tls::InternalAuth::None) {
        return Err(SpecError::ClientTlsWithoutInternalTls);
    }
    let images = spec.images.clone().unwrap_or_default();
    let images = Images {
        shard_server: images.shard_server.unwrap_or_else(|| default_images.shard_server.clone()),
        router: images.router.unwrap_or_else(|| default_images.router.clone()),
        postgres: images.postgres.unwrap_or_else(|| default_images.postgres.clone()),
    };
    Ok(ValidatedDb {
        schema,
        shards,
        servers,
        router_replicas,
        storage_size,
        storage_class: spec.storage.as_ref().and_then(|s| s.storage_class_name.clone()),
        images,
        resources: spec.resources.clone().unwrap_or_default(),
        tls: TlsSettings {
            ca_secret: spec.tls.as_ref().and_then(|t| t.ca_secret_name.clone()),
            client_tls,
            internal_auth,
        },
        unrouted_keys: spec.unrouted_keys.unwrap_or_default().into(),
        tuning,
    })
}

fn validate_shards(spec: &ShardedDatabaseSpec) -> Result<Vec<ShardRange>, SpecError> {
    if spec.shards.is_empty() {
        return Err(SpecError::NoShards);
    }
    if spec.shards.len() > MAX_SHARDS {
        return Err(SpecError::TooManyShards(spec.shards.len()));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, s) in spec.shards.iter().enumerate() {
        check_ident("shard", &s.id).map_err(|source| SpecError::ShardId { index, source })?;
        if let Some(&first) = seen.get(s.id.as_str()) {
            return Err(SpecError::DuplicateShard { index, id: s.id.clone(), first });
        }
        seen.insert(&s.id, index);
        if s.size <= 0 {
            return Err(SpecError::ShardSize { index, id: s.id.clone(), size: s.size });
        }
        if s.low.checked_add(s.size).is_none() {
            return Err(SpecError::ShardOverflow { index, id: s.id.clone() });
        }
    }
    // Sorted by low, ranges are disjoint iff each ends at or before the next begins. Report the
    // pair by the later of the two in spec order, which is where the user added the conflict.
    let mut order: Vec<usize> = (0..spec.shards.len()).collect();
    order.sort_by_key(|&i| (spec.shards[i].low, i));
    for pair in order.windows(2) {
        let (a, b) = (&spec.shards[pair[0]], &spec.shards[pair[1]]);
        if a.low + a.size > b.low {
            let (index, other) = if pair[0] > pair[1] { (pair[0], pair[1]) } else { (pair[1], pair[0]) };
            return Err(SpecError::Overlap {
                index,
                id: spec.shards[index].id.clone(),
                other: spec.shards[other].id.clone(),
            });
        }
    }
    Ok(order
        .into_iter()
        .map(|i| {
            let s = &spec.shards[i];
            ShardRange { id: s.id.clone(), low: s.low, size: s.size }
        })
        .collect())
}

fn validate_servers(spec: &ShardedDatabaseSpec, shards: &[ShardRange]) -> Result<ServerLayout, SpecError> {
    if spec.servers == 0 {
        return Err(SpecError::NoServers);
    }
    if spec.servers as usize > MAX_SERVERS {
        return Err(SpecError::TooManyServers(spec.servers.into()));
    }
    if spec.replicas == Some(0) {
        return Err(SpecError::NoReplicas);
    }
    let Some(placement) = &spec.placement else {
        let replicas = spec.replicas.unwrap_or(DEFAULT_REPLICAS);
        if replicas > spec.servers {
            return Err(SpecError::TooManyReplicas { replicas, servers: spec.servers });
        }
        return Ok(ServerLayout::Count { servers: spec.servers, replicas });
    };
    if placement.len() != spec.servers as usize {
        return Err(SpecError::PlacementCount { listed: placement.len(), servers: spec.servers });
    }
    let mut lowered: BTreeMap<String, &str> = BTreeMap::new();
    let mut holders: BTreeMap<&str, usize> = shards.iter().map(|s| (s.id.as_str(), 0)).collect();
    for (server, held) in placement {
        check_ident("server", server).map_err(SpecError::PlacementServerName)?;
        if let Some(first) = lowered.insert(server.to_ascii_lowercase(), server) {
            return Err(SpecError::PlacementNameClash { first: first.to_owned(), second: server.clone() });
        }
        for (i, shard) in held.iter().enumerate() {
            let Some(count) = holders.get_mut(shard.as_str()) else {
                return Err(SpecError::PlacementUnknownShard { server: server.clone(), shard: shard.clone() });
            };
            if held[..i].contains(shard) {
                return Err(SpecError::PlacementRepeat { server: server.clone(), shard: shard.clone() });
            }
            *count += 1;
        }
    }
    // Report in key order, so the first shard named is the first a reader finds in the spec.
    for shard in shards {
        let count = holders[shard.id.as_str()];
        if count == 0 {
            return Err(SpecError::PlacementUncovered { shard: shard.id.clone() });
        }
        if let Some(replicas) = spec.replicas.filter(|&r| r as usize != count) {
            return Err(SpecError::PlacementReplicas { shard: shard.id.clone(), count, replicas });
        }
    }
    let mut list: Vec<(String, Vec<String>)> = placement.iter().map(|(s, h)| (s.clone(), h.clone())).collect();
    list.sort_by(|a, b| natural_key(&a.0).cmp(&natural_key(&b.0)));
    Ok(ServerLayout::Explicit(list))
}

/// Orders `Server2` before `Server10`: the name without its trailing digits, then their value.
pub fn natural_key(name: &str) -> (&str, u128, &str) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = name[stem.len()..].parse().unwrap_or(0);
    (stem, number, name)
}

/// A Kubernetes quantity in the forms a volume size uses: digits, an optional fraction, an
/// optional binary or decimal suffix (`1Gi`, `500Mi`, `1.5G`, `1024`).
fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 13] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E", ""];
    let number_end = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let mut parts = number.split('.');
    let whole = parts.next().unwrap_or("");
    let fraction = parts.next();
    !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty())
        && parts.next().is_none()
        && SUFFIXES.contains(&suffix)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{ColumnType, ImagesSpec, RouterSpec, ShardSpec, StorageSpec, TableSchema};

    /// The seed's default configuration (examples/students.yaml).
    pub fn students() -> ShardedDatabaseSpec {
        ShardedDatabaseSpec {
            schema: TableSchema {
                columns: vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
                dtypes: vec![ColumnType::Number, ColumnType::String, ColumnType::Number],
                key: None,
            },
            shards: (0..4).map(|i| ShardSpec { id: format!("sh{}", i + 1), low: i * 4096, size: 4096 }).collect(),
            replicas: Some(3),
            servers: 6,
            placement: None,
            router: Some(RouterSpec { replicas: Some(2), ..RouterSpec::default() }),
            storage: Some(StorageSpec { size: "1Gi".into(), storage_class_name: None }),
            images: None,
            resources: None,
            tls: None,
            unrouted_keys: None,
            shard_server: None,
            postgres: None,
        }
    }

    fn placement(entries: &[(&str, &[&str])]) -> Option<BTreeMap<String, Vec<String>>> {
        Some(entries.iter().map(|(s, h)| (s.to_string(), h.iter().map(|x| x.to_string()).collect())).collect())
    }

    #[test]
    fn the_seed_default_is_valid() {
        let db = validate(&students()).unwrap();
        assert_eq!(db.shards.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["sh1", "sh2", "sh3", "sh4"]);
        assert_eq!(db.servers, ServerLayout::Count { servers: 6, replicas: 3 });
        assert_eq!(db.router_replicas, 2);
        assert_eq!(db.storage_size.as_deref(), Some("1Gi"));
        assert_eq!(db.schema.key_name(), "Stud_id");
        assert_eq!(db.unrouted_keys, UnroutedKeys::Reject, "a declared database refuses keys in no shard");
    }

    #[test]
    fn internal_auth_is_optional_and_none_refuses_client_tls() {
        use crate::crd::{InternalAuthMode, TlsSpec};
        use shard_server::tls::InternalAuth;
        assert_eq!(validate(&students()).unwrap().tls.internal_auth, None, "decided by the platform when unset");
        let mut spec = students();
        spec.tls = Some(TlsSpec { internal_auth: Some(InternalAuthMode::None), ..TlsSpec::default() });
        assert_eq!(validate(&spec).unwrap().tls.internal_auth, Some(InternalAuth::None));
        spec.tls = Some(TlsSpec { client_tls: Some(true), ..spec.tls.unwrap() });
        let err = validate(&spec).unwrap_err().to_string();
        assert!(err.contains("spec.tls.clientTls") && err.contains("internalAuth"), "{err}");
        spec.tls = Some(TlsSpec { internal_auth: Some(InternalAuthMode::Migrate), ..spec.tls.unwrap() });
        assert_eq!(validate(&spec).unwrap().tls.internal_auth, Some(InternalAuth::Migrate));
        let parsed: TlsSpec = serde_json::from_value(serde_json::json!({"internalAuth": "strict"})).unwrap();
        assert_eq!(parsed.internal_auth, Some(InternalAuthMode::Strict));
        assert!(serde_json::from_value::<TlsSpec>(serde_json::json!({"internalAuth": "off"})).is_err());
    }

    #[test]
    fn images_the_spec_leaves_out_are_the_configured_defaults() {
        let configured = Images { shard_server: "m/ss:9".into(), router: "m/r:9".into(), postgres: "m/pg:9".into() };
        assert_eq!(validate(&students()).unwrap().images, Images::default());
        assert_eq!(validate_with_defaults(&students(), &configured).unwrap().images, configured);
        let mut spec = students();
        spec.images = Some(ImagesSpec { router: Some("own/r:1".into()), ..ImagesSpec::default() });
        let db = validate_with_defaults(&spec, &configured).unwrap();
        assert_eq!(db.images, Images { router: "own/r:1".into(), ..configured });
    }

    #[test]
    fn defaults_and_ordering() {
        let mut spec = students();
        spec.replicas = None;
        spec.router = None;
        spec.storage = None;
        spec.shards.reverse();
        let db = validate(&spec).unwrap();
        assert_eq!(db.servers, ServerLayout::Count { servers: 6, replicas: DEFAULT_REPLICAS });
        assert_eq!(db.router_replicas, DEFAULT_ROUTER_REPLICAS);
        assert_eq!(db.storage_size, None);
        let lows: Vec<i64> = db.shards.iter().map(|s| s.low).collect();
        assert_eq!(lows, [0, 4096, 8192, 12288], "shards come out ordered by low");
    }

    #[test]
    fn explicit_placement_is_kept_in_natural_server_order() {
        let mut spec = students();
        spec.replicas = None;
        spec.servers = 3;
        spec.placement = placement(&[
            ("Server10", &["sh1", "sh2"]),
            ("Server2", &["sh3", "sh4", "sh1"]),
            ("Server1", &["sh2", "sh3", "sh4"]),
        ]);
        let db = validate(&spec).unwrap();
        let ServerLayout::Explicit(list) = &db.servers else { panic!("explicit layout") };
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Server1", "Server2", "Server10"]);
        assert_eq!(db.server_count(), 3);
        // Agreeing `replicas` is accepted.
        spec.placement =
            placement(&[("a", &["sh1", "sh2", "sh3", "sh4"]), ("b", &["sh1", "sh2", "sh3", "sh4"]), ("c", &[])]);
        spec.replicas = Some(2);
        assert!(validate(&spec).is_ok());
    }

    #[test]
    fn every_rule_names_the_offending_field() {
        type Edit = fn(&mut ShardedDatabaseSpec);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "bad column",
                |s| s.schema.columns[1] = "Stud name".into(),
                "spec.schema: column \"Stud name\" is not a valid identifier",
            ),
            (
                "dtype count",
                |s| {
                    s.schema.dtypes.pop();
                },
                "spec.schema: schema has 3 columns but 2 dtypes",
            ),
            (
                "string key",
                |s| s.schema.key = Some("Stud_name".into()),
                "spec.schema: key column Stud_name must have dtype Number",
            ),
            ("no shards", |s| s.shards.clear(), "spec.shards: at least one shard is required"),
            (
                "bad shard id",
                |s| s.shards[2].id = "sh 3".into(),
                "spec.shards[2].id: shard \"sh 3\" is not a valid identifier",
            ),
            (
                "duplicate id",
                |s| s.shards[3].id = "sh1".into(),
                "spec.shards[3] (sh1): id already used by spec.shards[0]",
            ),
            ("zero size", |s| s.shards[1].size = 0, "spec.shards[1] (sh2): size must be positive, got 0"),
            ("negative size", |s| s.shards[1].size = -5, "spec.shards[1] (sh2): size must be positive, got -5"),
            (
                "overflow",
                |s| s.shards[3].low = i64::MAX - 10,
                "spec.shards[3] (sh4): low + size overflows a 64-bit key",
            ),
            ("overlap", |s| s.shards[1].low = 4000, "spec.shards[1] (sh2) overlaps sh1"),
            ("overlap reported at the later shard", |s| s.shards[0].low = 4100, "spec.shards[1] (sh2) overlaps sh1"),
            ("same low", |s| s.shards[3].low = 8192, "spec.shards[3] (sh4) overlaps sh3"),
            ("no servers", |s| s.servers = 0, "spec.servers must be at least 1"),
            (
                "too many servers",
                |s| s.servers = u32::MAX,
                "spec.servers is 4294967295; at most 256 servers are allowed",
            ),
            (
                "too many shards",
                |s| s.shards = (0..1025).map(|i| ShardSpec { id: format!("s{i}"), low: i, size: 1 }).collect(),
                "spec.shards lists 1025 shards; at most 1024 are allowed",
            ),
            ("no replicas", |s| s.replicas = Some(0), "spec.replicas must be at least 1"),
            (
                "too many replicas",
                |s| s.replicas = Some(7),
                "spec.replicas (7) exceeds spec.servers (6): each copy of a shard needs its own server",
            ),
            (
                "default replicas vs few servers",
                |s| {
                    s.replicas = None;
                    s.servers = 2;
                },
                "spec.replicas (3) exceeds spec.servers (2)",
            ),
            (
                "router",
                |s| s.router = Some(RouterSpec { replicas: Some(0), ..RouterSpec::default() }),
                "spec.router.replicas must be at least 1",
            ),
            (
                "storage",
                |s| s.storage = Some(StorageSpec { size: "lots".into(), storage_class_name: None }),
                "spec.storage.size \"lots\" is not a quantity like 1Gi or 500Mi",
            ),
            (
                "placement count",
                |s| {
                    s.replicas = None;
                    s.placement = placement(&[("Server0", &["sh1", "sh2", "sh3", "sh4"])]);
                },
                "spec.placement lists 1 servers but spec.servers is 6",
            ),
            (
                "placement name",
                |s| {
                    s.servers = 1;
                    s.replicas = None;
                    s.placement = placement(&[("Server 0", &["sh1", "sh2", "sh3", "sh4"])]);
                },
                "spec.placement: server \"Server 0\" is not a valid identifier",
            ),
            (
                "placement case clash",
                |s| {
                    s.servers = 2;
                    s.replicas = None;
                    s.placement = placement(&[("Server0", &["sh1", "sh2"]), ("server0", &["sh3", "sh4"])]);
                },
                "spec.placement: server names Server0 and server0 differ only in case",
            ),
            (
                "placement unknown shard",
                |s| {
                    s.servers = 1;
                    s.replicas = None;
                    s.placement = placement(&[("Server0", &["sh1", "sh2", "sh3", "sh4", "sh9"])]);
                },
                "spec.placement.Server0: unknown shard sh9",
            ),
            (
                "placement repeat",
                |s| {
                    s.servers = 1;
                    s.replicas = None;
                    s.placement = placement(&[("Server0", &["sh1", "sh2", "sh1", "sh3", "sh4"])]);
                },
                "spec.placement.Server0: lists shard sh1 twice",
            ),
            (
                "placement uncovered",
                |s| {
                    s.servers = 2;
                    s.replicas = None;
                    s.placement = placement(&[("Server0", &["sh1", "sh2"]), ("Server1", &["sh2", "sh4"])]);
                },
                "spec.placement: shard sh3 is not placed on any server",
            ),
            (
                "placement disagrees with replicas",
                |s| {
                    s.servers = 2;
                    s.replicas = Some(2);
                    s.placement =
                        placement(&[("Server0", &["sh1", "sh2", "sh3", "sh4"]), ("Server1", &["sh1", "sh3", "sh4"])]);
                },
                "spec.placement: shard sh2 is on 1 servers but spec.replicas is 2",
            ),
        ];
        for (name, edit, want) in cases {
            let mut spec = students();
            edit(&mut spec);
            let got = validate(&spec).expect_err(name).to_string();
            assert!(got.starts_with(want), "{name}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1Gi", "500Mi", "1.5G", "1024", "10k", "2Ti"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "1 Gi", "1GB", "1.", ".5Gi", "1.2.3", "-1Gi", "1gi"] {
            assert!(!is_quantity(bad), "{bad:?}");
        }
    }

    #[test]
    fn natural_order() {
        let mut names = vec!["Server10", "Server2", "alpha", "Server1", "Server", "beta3"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["Server", "Server1", "Server2", "Server10", "alpha", "beta3"]);
    }
}
