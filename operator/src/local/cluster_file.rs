//! `cluster.json`: where every process of a local cluster runs (pids, ports, paths, how they
//! authenticate each other), for people and scripts. Holds no secret; written atomically and
//! readable by our user alone. Does I/O (writes the file).

use super::hosts::NetworkInfo;
use super::postgres::PostgresInfo;
use super::{LocalCluster, LocalError, ROUTER};
use serde::{Deserialize, Serialize};
use shard_server::tls::{Component, InternalAuth};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// `cluster.json`: where everything runs, for people and scripts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub data_dir: PathBuf,
    /// The operator process itself.
    pub operator: OperatorInfo,
    pub router: RouterInfo,
    /// The admin endpoint the router passes `/init`, `/add` and `/rm` to.
    pub control_url: String,
    /// The topology file.
    pub topology: PathBuf,
    /// In server id order.
    pub servers: Vec<ServerInfo>,
    /// The switch, when every process runs in a network namespace of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// How the processes authenticate each other (where the credentials are; never a secret).
    pub internal: InternalInfo,
}

/// `cluster.json`'s description of internal authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalInfo {
    /// Mutual TLS under the cluster's CA; false: a per-cluster secret, unencrypted (or nothing,
    /// in `none`).
    pub tls: bool,
    /// The mode every process runs in (`--internal-auth`).
    #[serde(default)]
    pub mode: InternalAuth,
    /// The CA certificate servers are checked against (with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The operator's certificate directory (`tls.crt`, `tls.key`, `ca.crt`): what a person or a
    /// test presents to call a shard server directly (with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_tls_dir: Option<PathBuf>,
    /// The file holding the per-cluster secret (TLS off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The database every identity names (`local/sharddb`).
    pub database: String,
    /// The file holding the admin verbs' bearer token, when the router requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterInfo {
    pub url: String,
    /// `null` while the process is down (e.g. between a crash and its restart).
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// Its network namespace, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub name: String,
    pub url: String,
    /// `null` while the process is down.
    pub pid: Option<u32>,
    pub log: PathBuf,
    pub postgres: PostgresInfo,
    /// Its network namespace, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}
impl LocalCluster {
    /// Describes the cluster as it is now.
    pub fn cluster_info(&self) -> ClusterInfo {
        ClusterInfo {
            data_dir: self.dir.clone(),
            operator: OperatorInfo { pid: std::process::id() },
            router: RouterInfo {
                url: self.router_url(),
                pid: self.supervisor.pid(ROUTER),
                log: self.logs_dir().join(format!("{ROUTER}.log")),
                netns: self.router_place.namespace(),
            },
            control_url: self.control_url.clone(),
            topology: self.topology_path(),
            servers: self
                .servers
                .iter()
                .map(|s| ServerInfo {
                    name: s.name.clone(),
                    url: s.url(),
                    pid: self.supervisor.pid(&s.name),
                    log: s.log.clone(),
                    postgres: s.postgres.info(),
                    netns: s.place.namespace(),
                })
                .collect(),
            network: self.hosts.info(),
            internal: InternalInfo {
                tls: self.pki.tls(),
                mode: self.pki.internal_auth(),
                ca: self.pki.ca_file(),
                operator_tls_dir: self.pki.tls().then(|| self.pki.component_dir(Component::Operator, "operator")),
                token_file: self.pki.token_file(),
                database: self.pki.database().to_string(),
                admin_token_file: self.admin_token.clone(),
            },
        }
    }

    /// Writes `cluster.json` atomically (temporary file + rename), readable by our user alone: it
    /// holds no secret, but it maps every port of the cluster.
    pub fn write_cluster_file(&self) -> Result<(), LocalError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.cluster_file();
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_string_pretty(&self.cluster_info()).expect("cluster info serialises");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all((json + "\n").as_bytes()))
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| LocalError::Io { action: "write", path, source })
    }
}
