//! Upgrading a running local cluster: the binaries to run become those of a bin directory (the
//! same one, rebuilt in place, or another), the router is restarted on them at once, and the
//! servers whose process runs another binary are restarted one at a time by the healer, drained
//! first (`brain::rollout`), as the Kubernetes body does with pods. Postgres keeps running: it is
//! not ours to upgrade. Does I/O (processes).
//!
//! There is one router, so its restart refuses connections for the moment it takes to start
//! (clients retry); in Kubernetes routers roll with a surge and lose nothing.

use super::supervisor::ProcessSpec;
use super::{Binaries, LocalCluster, LocalError, ROUTER, wait_ready};
use shard_server::tls::Component;
use std::collections::BTreeSet;
use std::path::Path;

impl LocalCluster {
    /// The router's process, on the current binaries.
    pub(super) fn router_process(&self) -> ProcessSpec {
        let mut args = vec!["--listen".into(), format!("{}:{}", self.router_place.address, self.router_port)];
        args.extend(self.topology_args());
        args.extend(["--control-url".into(), self.control_url.clone()]);
        args.extend(self.pki.process_args(Component::Router, ROUTER));
        if let Some(token) = &self.admin_token {
            args.extend(["--admin-token-file".into(), token.display().to_string()]);
        }
        let mut router =
            ProcessSpec::new(ROUTER, &self.bins.router, args, self.logs_dir().join(format!("{ROUTER}.log")));
        router.netns = self.router_place.netns_path();
        router.env = self.pki.process_env();
        router
    }

    /// The servers whose process was started from another file than the shard-server binary to
    /// run now.
    pub fn outdated_servers(&self) -> BTreeSet<String> {
        self.servers
            .iter()
            .filter(|s| self.supervisor.binary(&s.name).is_some_and(|b| b != self.bins.shard_server_id))
            .map(|s| s.name.clone())
            .collect()
    }

    /// Restarts a server's process from the current shard-server binary; its Postgres and data
    /// stay. The rollout drained it first.
    pub async fn restart_server(&self, name: &str) -> Result<(), LocalError> {
        let server = self.known(name)?.clone();
        self.supervisor.remove(name).await?;
        self.supervisor.spawn(self.server_process(&server))?;
        Ok(())
    }

    /// Takes the binaries of `dir` (the current bin directory when `None`: rebuilt in place) as
    /// the ones to run, and restarts the router on its new binary if it runs another. Returns
    /// whether the router was restarted; the healer restarts the servers.
    pub async fn upgrade(&mut self, dir: Option<&Path>) -> Result<bool, LocalError> {
        let bins = Binaries::locate(dir.unwrap_or(&self.bins.dir))?;
        tracing::info!(dir = %bins.dir.display(), "upgrading to these binaries");
        self.bins = bins;
        if self.supervisor.binary(ROUTER).is_none_or(|b| b == self.bins.router_id) {
            return Ok(false);
        }
        let router = self.router_process();
        self.supervisor.remove(ROUTER).await?;
        self.supervisor.spawn(router.clone())?;
        wait_ready(&self.http, ROUTER, format!("{}/healthz", self.router_url()), &router.log).await?;
        Ok(true)
    }
}
