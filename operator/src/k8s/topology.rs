//! The topology ConfigMap as shared state: read with its resourceVersion, written only if nobody
//! wrote it since (optimistic concurrency). Two writers touch it — the reconcile (spec changes)
//! and the healer (heals and failovers) — and neither may undo the other, so neither uses a blind
//! server-side apply: a write computed from a stale read fails with a conflict, and its author
//! starts over from a fresh read. Does I/O.
//!
//! Also where servers are reached ([`ServerUrls`]): the URL the topology gives a server is the
//! one the operator probes and recovers through.

use super::apply::ApplyError;
use super::build::configmap::{published_topology, topology_configmap};
use super::build::{Owner, names};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use shard_server::topology::Topology;
use std::fmt::Debug;

/// The base URL of a server of a database. The one injection point between the operator and the
/// network: the topology document, the prober and recovers all use it.
pub trait ServerUrls: Debug + Send + Sync {
    fn url(&self, db: &str, namespace: &str, server: &str) -> String;
}

/// `url` with the scheme of a database in internal-auth `none` (`plain`: `http://`) or not
/// (`https://`); any other URL unchanged. [`ServerUrls`] give `https://`.
pub fn in_scheme(url: &str, plain: bool) -> String {
    let (from, to) = if plain { ("https://", "http://") } else { ("http://", "https://") };
    match url.strip_prefix(from) {
        Some(rest) => format!("{to}{rest}"),
        None => url.to_owned(),
    }
}

/// `t` with every server's URL in the database's scheme ([`in_scheme`]), at the next epoch so
/// that servers and routers take it; `None` when every URL already is. The servers of a
/// database a previous release made are listed with `http://`; once it leaves internal-auth
/// `none` they serve `https://` only, and the reverse when it is set back to `none`. Pure.
pub fn with_scheme(t: &Topology, plain: bool) -> Option<Topology> {
    if t.servers.values().all(|s| in_scheme(&s.url, plain) == s.url) {
        return None;
    }
    let mut next = t.clone();
    for server in next.servers.values_mut() {
        server.url = in_scheme(&server.url, plain);
    }
    next.epoch = t.epoch.saturating_add(1);
    Some(next)
}

/// Whether `t` lists its servers at `http://` URLs (a database in internal-auth `none`, or
/// climbing into or out of it). Pure.
pub fn lists_plain(t: &Topology) -> bool {
    t.servers.values().next().is_some_and(|s| s.url.starts_with("http://"))
}

/// In a cluster: the server pod's stable DNS name under the headless Service
/// (`<pod>.<headless>.<namespace>.svc:5000`), which follows the pod across restarts and nodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadlessService;

impl ServerUrls for HeadlessService {
    fn url(&self, db: &str, namespace: &str, server: &str) -> String {
        names::server_url(db, namespace, server)
    }
}

/// The ConfigMap as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// `None` if the ConfigMap holds no valid document.
    pub topology: Option<Topology>,
    /// The version a write must match.
    pub resource_version: String,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Someone wrote the ConfigMap (or created it) since it was read: read again and redo.
    #[error("the topology ConfigMap {0} changed since it was read")]
    Conflict(String),
    #[error(transparent)]
    Api(#[from] ApplyError),
}

/// Reads the topology ConfigMap of `owner`; `None` if it does not exist.
pub async fn read(client: &Client, owner: &Owner) -> Result<Option<Published>, ApplyError> {
    let name = names::topology_configmap(&owner.name);
    let Some(cm) = super::apply::get::<ConfigMap>(client, &owner.namespace, &name).await? else { return Ok(None) };
    Ok(Some(Published {
        topology: published_topology(&cm),
        resource_version: cm.resource_version().unwrap_or_default(),
    }))
}

/// Writes `topology`: creates the ConfigMap when `read_at` is `None` (it did not exist), otherwise
/// replaces it only if it is still at `read_at`. Returns the new resourceVersion.
pub async fn write(
    client: &Client,
    owner: &Owner,
    topology: &Topology,
    read_at: Option<&str>,
) -> Result<String, WriteError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &owner.namespace);
    let mut cm = topology_configmap(owner, topology);
    let name = cm.name_any();
    let params = PostParams { field_manager: Some(names::MANAGER.into()), ..PostParams::default() };
    let result = match read_at {
        None => api.create(&params, &cm).await,
        Some(version) => {
            cm.metadata.resource_version = Some(version.to_owned());
            api.replace(&name, &params, &cm).await
        }
    };
    match result {
        Ok(written) => Ok(written.resource_version().unwrap_or_default()),
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Err(WriteError::Conflict(name)),
        Err(source) => Err(ApplyError::Apply { kind: "ConfigMap", name, source }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shard_server::topology::ServerEntry;

    #[test]
    fn urls_follow_the_mode_at_the_next_epoch() {
        assert_eq!(in_scheme("https://a.b.svc:5000", true), "http://a.b.svc:5000");
        assert_eq!(in_scheme("http://a.b.svc:5000", false), "https://a.b.svc:5000");
        assert_eq!(in_scheme("http://a.b.svc:5000", true), "http://a.b.svc:5000");
        let mut t: Topology = serde_json::from_value(serde_json::json!({
            "version": 1, "epoch": 7,
            "schema": {"columns": ["k", "v"], "dtypes": ["Number", "String"]},
            "servers": {}, "shards": []
        }))
        .unwrap();
        t.servers.insert("Server0".into(), ServerEntry { id: 0, url: "http://s0.svc:5000".into() });
        t.servers.insert("Server1".into(), ServerEntry { id: 1, url: "http://s1.svc:5000".into() });
        assert_eq!(with_scheme(&t, true), None, "already plain: nothing to write");
        let tls = with_scheme(&t, false).unwrap();
        assert_eq!(tls.epoch, 8, "a newer epoch, which servers and routers take");
        assert!(tls.servers.values().all(|s| s.url.starts_with("https://")), "{:?}", tls.servers);
        assert_eq!(with_scheme(&tls, false), None);
        assert_eq!(with_scheme(&tls, true).unwrap().servers, t.servers, "and back");
    }
}
