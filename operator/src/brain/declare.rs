//! The seed's admin verbs as changes of the declared configuration: `/init`, `/add` and `/rm` are
//! pure functions from the current `ShardedDatabaseSpec` (or none) to the next one. Both bodies
//! use them: the local body keeps the result in `declared.json`, the Kubernetes body would patch
//! the resource with it. Carrying the change out (starting servers, healing new copies, draining
//! old ones) is [`super::moves`]' job, never this module's.
//!
//! Decisions where the seed was silent:
//! - `/init`'s `N` is informational when `servers` is given (the seed never read it); without
//!   `servers`, copies are placed on `N` servers.
//! - A database declared through `/init` skips written keys in no shard (`unroutedKeys: Skip`), as
//!   the seed's load balancer did.
//! - `/add` and `/rm` turn a count layout (`servers: 6, replicas: 3`) into the explicit placement
//!   it stands for, because they name particular servers. `replicas` is then dropped: shards may
//!   differ in copy count from there on.
//! - A generated name (`Server[5]`) is the stem followed by the smallest number not in use.
//! - `/rm` removes the named servers, then the last ones in natural name order (`Server10` after
//!   `Server9`) until `n` are chosen. Every copy it takes away is re-placed on a remaining server
//!   that lacks the shard (the least loaded first), so the shard keeps its copy count when there
//!   is room; a shard left with no copy at all (no server remains) refuses the whole request.
//! - A name still used by a server being drained cannot be reused until that server is gone.

use super::placement::place;
use super::validate::{DEFAULT_REPLICAS, SpecError, natural_key, validate};
use crate::crd::{ColumnType, ShardSpec, ShardedDatabaseSpec, TableSchema, UnroutedKeys};
use shard_server::admin::{AddRequest, InitRequest, RmRequest, ShardDecl, generated_stem};
use shard_server::schema::DType;
use std::collections::{BTreeMap, BTreeSet};

/// Why an admin request is refused. Every variant is the caller's mistake (a 4xx).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("the database is already configured; /init is accepted once")]
    AlreadyConfigured,
    #[error("the database is not configured yet: POST /init first")]
    NotConfigured,
    #[error("Number of new servers (n) is greater than newly added instances")]
    AddTooMany,
    #[error("n ({n}) is less than the number of new servers listed ({listed})")]
    AddTooFew { n: u32, listed: usize },
    #[error("server {0} already exists")]
    ServerExists(String),
    #[error("server {0} is still being removed; use another name or retry once it is gone")]
    ServerLeaving(String),
    #[error("shard {0} already exists")]
    ShardExists(String),
    #[error("Length of server list is more than removable instances")]
    RmListTooLong,
    #[error("n ({n}) is more than the number of servers ({servers})")]
    RmTooMany { n: u32, servers: usize },
    #[error("unknown server {0}")]
    UnknownServer(String),
    #[error("server {0} is listed twice")]
    RepeatedServer(String),
    #[error("removing these servers would remove the last replica of shard {0}")]
    LastReplica(String),
    /// The resulting configuration breaks a rule of the spec; the text names the field in the
    /// request's terms.
    #[error("{0}")]
    Invalid(String),
}

impl AdminError {
    /// Conflicts with the state of the database (409) rather than a malformed request (400).
    pub fn is_conflict(&self) -> bool {
        matches!(self, AdminError::AlreadyConfigured | AdminError::NotConfigured)
    }
}

/// A spec error in the words of the seed's request (`shards[1]`, `servers.Server0`, `N`).
fn invalid(e: SpecError) -> AdminError {
    let text = e.to_string();
    let text = text
        .replace("spec.placement.", "servers.")
        .replace("spec.placement", "servers")
        .replace("spec.servers", "N")
        .replace("spec.replicas", "replicas")
        .replace("spec.", "");
    AdminError::Invalid(text)
}

fn column_type(t: DType) -> ColumnType {
    match t {
        DType::Number => ColumnType::Number,
        DType::String => ColumnType::String,
    }
}

fn shard_spec(d: &ShardDecl) -> ShardSpec {
    ShardSpec { id: d.id.clone(), low: d.low, size: d.size }
}

/// Server name → shards held, as the spec places them (a count layout expanded).
pub fn explicit_placement(spec: &ShardedDatabaseSpec) -> Result<BTreeMap<String, Vec<String>>, AdminError> {
    let db = validate(spec).map_err(invalid)?;
    let p = place(&db);
    Ok(p.servers.iter().map(|s| (s.clone(), p.shards_of(s).map(str::to_owned).collect())).collect())
}

/// Resolves generated names (`Server[5]`) against `taken` and the literal names of the request.
fn resolve_names(
    requested: &BTreeMap<String, Vec<String>>,
    taken: &BTreeSet<String>,
) -> Result<Vec<(String, Vec<String>)>, AdminError> {
    let mut used: BTreeSet<String> = taken.iter().map(|n| n.to_ascii_lowercase()).collect();
    let mut out = Vec::new();
    for (name, held) in requested.iter().filter(|(n, _)| generated_stem(n).is_none()) {
        if !used.insert(name.to_ascii_lowercase()) {
            return Err(AdminError::ServerExists(name.clone()));
        }
        out.push((name.clone(), held.clone()));
    }
    for (name, held) in requested {
        let Some(stem) = generated_stem(name) else { continue };
        let generated = (0u64..).map(|k| format!("{stem}{k}")).find(|n| !used.contains(&n.to_ascii_lowercase()));
        let generated = generated.expect("some number is free");
        used.insert(generated.to_ascii_lowercase());
        out.push((generated, held.clone()));
    }
    Ok(out)
}

/// `/init`: the first configuration. `current` is what is declared now (must be nothing).
pub fn init(current: Option<&ShardedDatabaseSpec>, req: &InitRequest) -> Result<ShardedDatabaseSpec, AdminError> {
    if current.is_some() {
        return Err(AdminError::AlreadyConfigured);
    }
    let (servers, replicas, placement) = match &req.servers {
        None => (req.n, Some(DEFAULT_REPLICAS.min(req.n.max(1))), None),
        // The seed's load balancer never read `N` when `servers` was given; its clients send
        // values that differ from the map, so the map decides.
        Some(map) => {
            let named = resolve_names(map, &BTreeSet::new())?;
            let count = u32::try_from(named.len()).unwrap_or(u32::MAX);
            (count, None, Some(named.into_iter().collect()))
        }
    };
    let spec = ShardedDatabaseSpec {
        schema: TableSchema {
            columns: req.schema.columns.clone(),
            dtypes: req.schema.dtypes.iter().copied().map(column_type).collect(),
            key: req.schema.key.clone(),
        },
        shards: req.shards.iter().map(shard_spec).collect(),
        replicas,
        servers,
        placement,
        router: None,
        storage: None,
        images: None,
        resources: None,
        tls: None,
        // The seed's clients depend on a write with keys in no shard succeeding (SEED-API.md).
        unrouted_keys: Some(UnroutedKeys::Skip),
        shard_server: None,
        postgres: None,
    };
    validate(&spec).map_err(invalid)?;
    Ok(spec)
}

/// `/add`: new servers and shards. `leaving` are servers still in the topology but no longer
/// declared (being drained); their names are not free yet. Returns the next spec and the names
/// of the servers added, in request order with generated names last.
pub fn add(
    current: Option<&ShardedDatabaseSpec>,
    leaving: &BTreeSet<String>,
    req: &AddRequest,
) -> Result<(ShardedDatabaseSpec, Vec<String>), AdminError> {
    let current = current.ok_or(AdminError::NotConfigured)?;
    if req.n as usize > req.servers.len() {
        return Err(AdminError::AddTooMany);
    }
    if (req.n as usize) < req.servers.len() {
        return Err(AdminError::AddTooFew { n: req.n, listed: req.servers.len() });
    }
    let mut placement = explicit_placement(current)?;
    let mut spec = current.clone();
    for d in &req.new_shards {
        if spec.shards.iter().any(|s| s.id == d.id) {
            return Err(AdminError::ShardExists(d.id.clone()));
        }
        spec.shards.push(shard_spec(d));
    }
    for name in req.servers.keys().filter(|n| generated_stem(n).is_none()) {
        if let Some(existing) = placement.keys().find(|e| e.eq_ignore_ascii_case(name)) {
            return Err(AdminError::ServerExists(existing.clone()));
        }
        if let Some(l) = leaving.iter().find(|l| l.eq_ignore_ascii_case(name)) {
            return Err(AdminError::ServerLeaving(l.clone()));
        }
    }
    let taken: BTreeSet<String> = placement.keys().chain(leaving).cloned().collect();
    let named = resolve_names(&req.servers, &taken)?;
    let added: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    placement.extend(named);
    spec.servers = placement.len() as u32;
    spec.replicas = None;
    spec.placement = Some(placement);
    validate(&spec).map_err(invalid)?;
    Ok((spec, added))
}

/// `/rm`: removes `n` servers, the named ones first, re-placing the copies they held. Returns the
/// next spec and the removed servers in natural name order.
pub fn rm(
    current: Option<&ShardedDatabaseSpec>,
    req: &RmRequest,
) -> Result<(ShardedDatabaseSpec, Vec<String>), AdminError> {
    let current = current.ok_or(AdminError::NotConfigured)?;
    if req.servers.len() > req.n as usize {
        return Err(AdminError::RmListTooLong);
    }
    let mut placement = explicit_placement(current)?;
    let mut removed: Vec<String> = Vec::new();
    for name in &req.servers {
        if !placement.contains_key(name) {
            return Err(AdminError::UnknownServer(name.clone()));
        }
        if removed.contains(name) {
            return Err(AdminError::RepeatedServer(name.clone()));
        }
        removed.push(name.clone());
    }
    if req.n as usize > placement.len() {
        return Err(AdminError::RmTooMany { n: req.n, servers: placement.len() });
    }
    let mut others: Vec<&String> = placement.keys().filter(|s| !removed.contains(s)).collect();
    others.sort_by(|a, b| natural_key(b).cmp(&natural_key(a)));
    let extra: Vec<String> = others.into_iter().take(req.n as usize - removed.len()).cloned().collect();
    removed.extend(extra);
    removed.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));

    let before = placement.clone();
    placement.retain(|s, _| !removed.contains(s));
    // Re-place each copy taken away, shards in key order so the outcome is deterministic.
    let mut shards: Vec<&ShardSpec> = current.shards.iter().collect();
    shards.sort_by_key(|s| s.low);
    for shard in shards {
        let id = &shard.id;
        let count = before.values().filter(|held| held.contains(id)).count();
        let mut holders = placement.values().filter(|held| held.contains(id)).count();
        while holders < count {
            let target = placement
                .iter()
                .filter(|(_, held)| !held.contains(id))
                .min_by(|a, b| a.1.len().cmp(&b.1.len()).then(natural_key(a.0).cmp(&natural_key(b.0))))
                .map(|(name, _)| name.clone());
            let Some(target) = target else { break };
            placement.get_mut(&target).expect("chosen from the map").push(id.clone());
            holders += 1;
        }
        if holders == 0 {
            return Err(AdminError::LastReplica(id.clone()));
        }
    }
    let mut spec = current.clone();
    spec.servers = placement.len() as u32;
    spec.replicas = None;
    spec.placement = Some(placement);
    validate(&spec).map_err(invalid)?;
    Ok((spec, removed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::validate::tests::students;
    use shard_server::schema::SchemaSpec;

    fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        entries.iter().map(|(s, h)| (s.to_string(), h.iter().map(|x| x.to_string()).collect())).collect()
    }

    fn init_request(servers: Option<BTreeMap<String, Vec<String>>>, n: u32) -> InitRequest {
        InitRequest {
            n,
            schema: SchemaSpec {
                columns: vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
                dtypes: vec![DType::Number, DType::String, DType::String],
                key: None,
            },
            shards: (0..4).map(|i| ShardDecl { id: format!("sh{}", i + 1), low: i * 4096, size: 4096 }).collect(),
            servers,
        }
    }

    fn held(spec: &ShardedDatabaseSpec) -> Vec<(String, Vec<String>)> {
        explicit_placement(spec).unwrap().into_iter().collect()
    }

    #[test]
    fn init_places_automatically_or_as_given_and_only_once() {
        let spec = init(None, &init_request(None, 6)).unwrap();
        assert_eq!((spec.servers, spec.replicas, spec.placement.as_ref()), (6, Some(3), None));
        let two = init(None, &init_request(None, 2)).unwrap();
        assert_eq!(two.replicas, Some(2), "no more copies than servers");
        assert_eq!(init(Some(&spec), &init_request(None, 6)), Err(AdminError::AlreadyConfigured));

        let given = map(&[("Server0", &["sh1", "sh2"]), ("Server[7]", &["sh3", "sh4"]), ("Server1", &["sh1", "sh3"])]);
        let spec = init(None, &init_request(Some(given.clone()), 3)).unwrap();
        assert_eq!(spec.placement.as_ref().unwrap()["Server2"], ["sh3", "sh4"], "generated: first free number");
        let informational = init(None, &init_request(Some(given), 4)).unwrap();
        assert_eq!(informational.servers, 3, "N is informational when servers are listed");

        let unplaced = map(&[("Server0", &["sh1", "sh2"]), ("Server1", &["sh3"])]);
        let e = init(None, &init_request(Some(unplaced), 2)).unwrap_err().to_string();
        assert_eq!(e, "servers: shard sh4 is not placed on any server");
        let unknown = map(&[("Server0", &["sh1", "sh2", "sh3", "sh4", "sh9"])]);
        let e = init(None, &init_request(Some(unknown), 1)).unwrap_err().to_string();
        assert_eq!(e, "servers.Server0: unknown shard sh9");
        let mut overlap = init_request(None, 3);
        overlap.shards[1].low = 100;
        let e = init(None, &overlap).unwrap_err().to_string();
        assert_eq!(e, "shards[1] (sh2) overlaps sh1");
        assert_eq!(init(None, &init_request(None, 0)).unwrap_err().to_string(), "N must be at least 1");
        let huge = init(None, &init_request(None, u32::MAX)).unwrap_err().to_string();
        assert_eq!(huge, "N is 4294967295; at most 256 servers are allowed");
        assert_eq!(spec.unrouted_keys, Some(UnroutedKeys::Skip), "the seed's clients rely on skipping");
    }

    #[test]
    fn add_expands_the_count_layout_and_names_new_servers() {
        let current = students();
        let req = AddRequest {
            n: 2,
            new_shards: vec![ShardDecl { id: "sh5".into(), low: 16384, size: 4096 }],
            servers: map(&[("Server[5]", &["sh2", "sh5"]), ("Server9", &["sh3", "sh5"])]),
        };
        let (spec, added) = add(Some(&current), &BTreeSet::new(), &req).unwrap();
        assert_eq!(added, ["Server9", "Server6"], "Server0..5 exist, so the generated one is Server6");
        assert_eq!(spec.servers, 8);
        assert_eq!(spec.replicas, None);
        let p = spec.placement.as_ref().unwrap();
        assert_eq!(p["Server0"], ["sh1", "sh3"], "existing copies stay where they were");
        assert_eq!(p["Server6"], ["sh2", "sh5"]);
        assert_eq!(spec.shards.last().unwrap().id, "sh5");

        let leaving: BTreeSet<String> = ["Server6".to_owned()].into();
        let (_, added) = add(Some(&current), &leaving, &req).unwrap();
        assert_eq!(added, ["Server9", "Server7"], "a draining server's name is not reused");

        let cases = [
            (AddRequest { n: 3, ..req.clone() }, AdminError::AddTooMany),
            (AddRequest { n: 1, ..req.clone() }, AdminError::AddTooFew { n: 1, listed: 2 }),
            (
                AddRequest { n: 1, new_shards: vec![], servers: map(&[("Server3", &["sh1"])]) },
                AdminError::ServerExists("Server3".into()),
            ),
            (
                AddRequest { n: 1, new_shards: vec![], servers: map(&[("server6", &["sh1"])]) },
                AdminError::ServerLeaving("Server6".into()),
            ),
            (
                AddRequest { new_shards: vec![ShardDecl { id: "sh1".into(), low: 90000, size: 1 }], ..req.clone() },
                AdminError::ShardExists("sh1".into()),
            ),
            (
                AddRequest { n: 1, new_shards: req.new_shards.clone(), servers: map(&[("Server7", &["sh1"])]) },
                AdminError::Invalid("servers: shard sh5 is not placed on any server".into()),
            ),
        ];
        for (req, want) in cases {
            assert_eq!(add(Some(&current), &leaving, &req).map(|_| ()), Err(want), "{req:?}");
        }
        assert_eq!(add(None, &leaving, &req).map(|_| ()), Err(AdminError::NotConfigured));
    }

    #[test]
    fn rm_removes_named_then_last_servers_and_re_places_their_copies() {
        let current = students();
        // Server0..2 hold sh1 and sh3, Server3..5 hold sh2 and sh4.
        let (spec, removed) = rm(Some(&current), &RmRequest { n: 2, servers: vec!["Server1".into()] }).unwrap();
        assert_eq!(removed, ["Server1", "Server5"]);
        assert_eq!(spec.servers, 4);
        let v = |h: &[&str]| h.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            held(&spec),
            [
                ("Server0".to_owned(), v(&["sh1", "sh2", "sh3"])),
                ("Server2".to_owned(), v(&["sh1", "sh3", "sh4"])),
                ("Server3".to_owned(), v(&["sh1", "sh2", "sh4"])),
                ("Server4".to_owned(), v(&["sh2", "sh3", "sh4"])),
            ],
            "each lost copy goes to the least loaded server lacking the shard"
        );
        for shard in ["sh1", "sh2", "sh3", "sh4"] {
            let copies = explicit_placement(&spec).unwrap().values().filter(|h| h.iter().any(|x| x == shard)).count();
            assert_eq!(copies, 3, "{shard} keeps three copies");
        }

        let cases = [
            (RmRequest { n: 1, servers: vec!["Server1".into(), "Server2".into()] }, AdminError::RmListTooLong),
            (RmRequest { n: 1, servers: vec!["Server9".into()] }, AdminError::UnknownServer("Server9".into())),
            (
                RmRequest { n: 2, servers: vec!["Server1".into(), "Server1".into()] },
                AdminError::RepeatedServer("Server1".into()),
            ),
            (RmRequest { n: 7, servers: vec![] }, AdminError::RmTooMany { n: 7, servers: 6 }),
            (RmRequest { n: 6, servers: vec!["Server0".into()] }, AdminError::LastReplica("sh1".into())),
        ];
        for (req, want) in cases {
            assert_eq!(rm(Some(&current), &req).map(|_| ()), Err(want), "{req:?}");
        }
    }

    #[test]
    fn rm_with_no_room_lowers_the_copy_count_but_never_below_one() {
        let mut current = students();
        current.placement = Some(map(&[("a", &["sh1", "sh2", "sh3", "sh4"]), ("b", &["sh1"])]));
        current.servers = 2;
        current.replicas = None;
        let (spec, removed) = rm(Some(&current), &RmRequest { n: 1, servers: vec!["b".into()] }).unwrap();
        assert_eq!(removed, ["b"]);
        assert_eq!(held(&spec), [("a".to_owned(), vec!["sh1".into(), "sh2".into(), "sh3".into(), "sh4".into()])]);
        let (spec, _) = rm(Some(&current), &RmRequest { n: 1, servers: vec!["a".into()] }).unwrap();
        assert_eq!(held(&spec), [("b".to_owned(), vec!["sh1".into(), "sh2".into(), "sh3".into(), "sh4".into()])]);
    }
}
