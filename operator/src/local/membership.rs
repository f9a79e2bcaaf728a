//! Which servers run: starting the servers the declared configuration adds and removing those that
//! left the topology (after the healer drained them). Does I/O (processes, Postgres, files).

use super::postgres::{ServerPostgres, Serving};
use super::{LocalCluster, LocalError, LocalServer, PortReservations, make_dir, wait_ready};

impl LocalCluster {
    /// Starts one new server: an empty Postgres and its shard server, and waits for its heartbeat.
    /// It holds nothing until the healer adds it to the topology and gives it copies.
    pub(super) async fn add_server(&mut self, name: &str) -> Result<(), LocalError> {
        // Each port stays held until just before its user binds it, so that nothing else (an
        // outgoing connection, another process) takes it meanwhile.
        let (mut server_port, mut pg_port) = (PortReservations::default(), PortReservations::default());
        let (port, pg) = (self.hosts.port(|| server_port.any())?, pg_port.any()?);
        let dir = self.dir.join("servers").join(name);
        let in_topology = self.read_topology().is_some_and(|t| t.servers.contains_key(name));
        if dir.exists() && !in_topology {
            // Left by a server of this name that was removed: a new server starts empty.
            std::fs::remove_dir_all(&dir).map_err(|source| LocalError::Io {
                action: "remove",
                path: dir.clone(),
                source,
            })?;
        }
        make_dir(&dir)?;
        let log = self.logs_dir().join(format!("{name}.postgres.log"));
        drop(pg_port);
        let settings = self.declared.as_ref().map(|d| d.db.tuning.postgres_parameters.clone()).unwrap_or_default();
        let serving = Serving { settings: &settings, unix_socket: self.hosts.namespaced() };
        let postgres = ServerPostgres::open(name, &dir.join("pgdata"), &log, pg, &self.pg, None, serving).await?;
        let place = self.hosts.place(name).await?;
        let log = self.logs_dir().join(format!("{name}.log"));
        let server = LocalServer { name: name.to_owned(), place, port, log, postgres, scheme: self.pki.scheme() };
        self.pki.set_address(shard_server::tls::Component::Server, name, server.place.address.into());
        self.pki.ensure(shard_server::tls::Component::Server, name, false)?;
        drop(server_port);
        self.supervisor.spawn(self.server_process(&server))?;
        self.servers.push(server.clone());
        self.supervisor.announce();
        if let Err(e) = wait_ready(&self.http, name, format!("{}/heartbeat", server.url()), &server.log).await {
            // E.g. its port was taken after all: start over next round, on fresh ports.
            if !in_topology {
                self.remove_server(name).await;
            }
            return Err(e);
        }
        tracing::info!(server = name, url = %server.url(), "server started");
        Ok(())
    }

    /// Stops a server that left the topology, then its Postgres, and deletes its data.
    pub(super) async fn remove_server(&mut self, name: &str) {
        let _ = self.supervisor.remove(name).await;
        if let Some(i) = self.servers.iter().position(|s| s.name == name) {
            let server = self.servers.remove(i);
            if let Err(e) = server.postgres.stop().await {
                tracing::error!(server = name, error = %e, "cannot stop postgres");
            }
            let dir = self.dir.join("servers").join(name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(server = name, path = %dir.display(), error = %e, "cannot delete the server's data");
            }
            self.pki.remove_server(name);
        }
        self.hosts.remove(name).await;
        self.supervisor.announce();
        tracing::info!(server = name, "server removed");
    }

    /// Brings the processes to the declared configuration: starts the servers it names that do
    /// not run yet, and removes those it no longer names once they have left the topology (the
    /// healer drains them first).
    pub async fn reconcile(&mut self) {
        let Some(declared) = self.declared.clone() else { return };
        let missing: Vec<String> =
            declared.placement.servers.iter().filter(|n| self.server(n).is_none()).cloned().collect();
        for name in missing {
            if let Err(e) = self.add_server(&name).await {
                tracing::error!(server = %name, error = %e, "cannot start a new server; retrying next round");
            }
        }
        let Some(topology) = self.read_topology() else { return };
        let gone: Vec<String> = self
            .servers
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| !declared.placement.servers.contains(n) && !topology.servers.contains_key(n))
            .collect();
        for name in gone {
            self.remove_server(&name).await;
        }
    }
}
