//! Each server of a local cluster: its Postgres and its shard-server process, started together
//! (Postgres clusters in parallel, one `initdb` copied for the rest), the topology written before
//! the processes start, and the verbs that stop, start or wipe one of them. Does I/O.

use super::postgres::{ServerPostgres, Serving};
use super::setup::{PortReservations, make_dir, wait_ready};
use super::supervisor::{ProcessSpec, SupervisorError};
use super::{LocalCluster, LocalError, LocalServer};
use crate::brain::placement::Placement;
use crate::brain::topology::fresh_topology;
use crate::brain::validate::{ValidatedDb, natural_key};
use shard_server::tls::Component;
use shard_server::topology::Topology;

impl LocalCluster {
    /// Starts every Postgres (in parallel), writes the topology, starts the shard servers and waits
    /// for their heartbeats. The servers are those of `placement` and those of a topology left by
    /// an earlier run (a server being drained still holds copies that are needed).
    pub(super) async fn start_servers(&mut self, db: &ValidatedDb, placement: &Placement) -> Result<(), LocalError> {
        // Only the first servers of a directory without a predecessor skip the start-up wait
        // (see `start`); once any has been started, even by an `/init` that then failed and is
        // retried, every later start waits.
        let new_cluster = std::mem::take(&mut self.no_predecessor);
        let previous = self.read_topology();
        let mut names = placement.servers.clone();
        let mut leftover: Vec<String> =
            previous.iter().flat_map(|t| t.servers.keys()).filter(|n| !names.contains(n)).cloned().collect();
        leftover.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        names.extend(leftover);
        let mut ports = PortReservations::default();
        let mut planned = Vec::new();
        for name in &names {
            let port = self.hosts.port(|| ports.any())?;
            planned.push((name.clone(), port, ports.any()?));
        }
        let mut places = Vec::new();
        for name in &names {
            places.push(self.hosts.place(name).await?);
        }
        drop(ports);

        let pgdata = |name: &str| self.servers_dir().join(name).join("pgdata");
        for (name, _, _) in &planned {
            let d = self.servers_dir().join(name);
            make_dir(&d)?;
        }
        // initdb is the slow part of starting (seconds, with fsync); run it once and copy the
        // result (a tenth of a second) for every other server that has no cluster yet.
        let fresh: Vec<&str> =
            planned.iter().map(|(n, _, _)| n.as_str()).filter(|n| !pgdata(n).join("PG_VERSION").is_file()).collect();
        // The template is a cluster of its own: a server's cluster cannot be copied while it starts.
        let template = if fresh.len() > 1 {
            let t = self.servers_dir().join(".template");
            if t.exists() {
                // Left by a run interrupted while starting; it may be half made.
                std::fs::remove_dir_all(&t).map_err(|source| LocalError::Io {
                    action: "remove",
                    path: t.clone(),
                    source,
                })?;
            }
            make_dir(&t)?;
            ServerPostgres::init_template(&t.join("pgdata"), &self.pg).await?;
            Some(t)
        } else {
            None
        };
        let serving = Serving { settings: &db.tuning.postgres_parameters, unix_socket: self.hosts.namespaced() };
        let opening = planned.iter().map(|(name, _, pg_port)| {
            let log = self.logs_dir().join(format!("{name}.postgres.log"));
            let template = template.as_ref().map(|t| t.join("pgdata"));
            let (data_dir, settings) = (pgdata(name), &self.pg);
            async move {
                ServerPostgres::open(name, &data_dir, &log, *pg_port, settings, template.as_deref(), serving).await
            }
        });
        // Keep every cluster that did start, so a failure elsewhere still stops it on shutdown.
        let mut first_error = None;
        let opened = futures::future::join_all(opening).await;
        for (((name, port, _), opened), place) in planned.iter().zip(opened).zip(places) {
            match opened.map_err(LocalError::from) {
                Ok(postgres) => self.servers.push(LocalServer {
                    name: name.clone(),
                    place,
                    port: *port,
                    log: self.logs_dir().join(format!("{name}.log")),
                    postgres,
                    scheme: self.pki.scheme(),
                }),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(t) = template {
            // Off the startup path: removing a cluster's files takes a noticeable moment.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&t) {
                    tracing::warn!(path = %t.display(), error = %e, "cannot remove the template cluster");
                }
            });
        }
        if let Some(e) = first_error {
            return Err(e);
        }

        self.write_topology(db, placement, previous)?;
        for s in &self.servers {
            self.pki.set_address(Component::Server, &s.name, s.place.address.into());
            self.pki.ensure(Component::Server, &s.name, false)?;
            let mut process = self.server_process(s);
            if new_cluster {
                // No read lease was ever granted in these names: see `--no-predecessor`.
                process.first_start_args.push("--no-predecessor".into());
            }
            self.supervisor.spawn(process)?;
        }
        let http = &self.http;
        let waits = self.servers.iter().map(|s| wait_ready(http, &s.name, format!("{}/heartbeat", s.url()), &s.log));
        futures::future::try_join_all(waits).await?;
        tracing::info!(servers = self.servers.len(), "every shard server answers its heartbeat");
        Ok(())
    }

    pub(super) fn read_topology(&self) -> Option<Topology> {
        std::fs::read(self.topology_path()).ok().and_then(|b| Topology::parse(&b).ok())
    }

    /// The shard-server process of `s`, with the declared configuration's knobs (probes and
    /// resources have no meaning here); its certificate must have been issued
    /// ([`LocalPki::ensure`]).
    pub(super) fn server_process(&self, s: &LocalServer) -> ProcessSpec {
        let tuning = self.declared.as_ref().map(|d| &d.db.tuning);
        let threads =
            tuning.and_then(|t| t.worker_threads).map_or_else(|| self.server_worker_threads(), |t| t as usize);
        let mut args = vec![
            "--listen".into(),
            format!("{}:{}", s.place.address, s.port),
            "--name".into(),
            s.name.clone(),
            "--database-url".into(),
            s.postgres.database_url(),
        ];
        args.extend(self.pki.process_args(Component::Server, &s.name));
        args.extend(self.topology_args());
        args.extend(["--worker-threads".into(), threads.to_string()]);
        if let Some(rows) = tuning.and_then(|t| t.cache_rows) {
            args.extend(["--cache-rows".into(), rows.to_string()]);
        }
        let mut spec = ProcessSpec::new(&s.name, &self.bins.shard_server, args, &s.log);
        spec.netns = s.place.netns_path();
        spec.env = self.pki.process_env();
        // The password file is named in the environment too: a previous release's server, which
        // knows no such flag and whose Postgres trusts local connections, starts all the same.
        if let Some(file) = s.postgres.password_file() {
            spec.env.push(("SHARDDB_DATABASE_PASSWORD_FILE".into(), file.display().to_string()));
        }
        spec
    }

    /// Where a process follows the topology from: the file, or, in a network namespace of its
    /// own, this operator's endpoint (see `hosts`).
    pub(super) fn topology_args(&self) -> [String; 2] {
        if self.hosts.namespaced() {
            ["--topology-url".into(), format!("{}/topology", self.control_url)]
        } else {
            ["--topology-file".into(), self.topology_path().display().to_string()]
        }
    }

    /// Every shard server of local mode shares this machine, so each gets its share of the CPUs
    /// (at least one thread) rather than one thread per CPU: on 2 cores, six servers with two
    /// threads each spent about a tenth more CPU per write, on waking and switching threads, than
    /// with one each (A-1 benchmark).
    fn server_worker_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        (cpus / self.servers.len().max(1)).max(1)
    }

    /// Writes the first topology of this run. A topology left by an earlier run may have been
    /// seen (and its epoch remembered) by the servers whose data we are reusing: it is kept as it
    /// was, with the servers' new URLs and the next epoch, and the healer moves it toward the
    /// declared placement from there (a move in progress resumes; nothing is declared ready that
    /// was not).
    pub(super) fn write_topology(
        &self,
        db: &ValidatedDb,
        placement: &Placement,
        previous: Option<Topology>,
    ) -> Result<Topology, LocalError> {
        let path = self.topology_path();
        let topology = match previous {
            Some(mut t) => {
                t.epoch += 1;
                for (name, entry) in &mut t.servers {
                    if let Some(s) = self.server(name) {
                        entry.url = s.url();
                    }
                }
                t
            }
            None => fresh_topology(db, placement, &self.urls(), 1)?,
        };
        let epoch = topology.epoch;
        shard_server::topology_source::write_atomic(&path, &topology).map_err(|source| LocalError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        tracing::info!(epoch, path = %path.display(), "topology written");
        Ok(topology)
    }

    pub(super) fn known(&self, name: &str) -> Result<&LocalServer, LocalError> {
        self.server(name).ok_or_else(|| SupervisorError::Unknown(name.to_owned()).into())
    }

    /// Stops a server's process (its Postgres keeps running).
    pub async fn stop_server(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?;
        Ok(self.supervisor.stop(name).await?)
    }

    /// Starts a stopped server's process again, on the same port with the same database.
    pub fn start_server(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?;
        Ok(self.supervisor.start(name)?)
    }

    /// Stops a server's Postgres (the server process keeps running and sees its database fail).
    pub async fn stop_postgres(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?.postgres.stop().await?;
        self.supervisor.announce();
        Ok(())
    }

    /// Starts a server's Postgres again on the same port and data directory.
    pub async fn start_postgres(&self, name: &str) -> Result<(), LocalError> {
        self.known(name)?.postgres.start().await?;
        self.supervisor.announce();
        Ok(())
    }

    /// A server loses its volume: its process and Postgres stop, the data directory is replaced
    /// by an empty cluster, and both start again (the server comes back holding nothing).
    pub async fn wipe_server(&self, name: &str) -> Result<(), LocalError> {
        let server = self.known(name)?;
        self.supervisor.stop(name).await?;
        server.postgres.wipe().await?;
        server.postgres.start().await?;
        self.supervisor.start(name)?;
        self.supervisor.announce();
        Ok(())
    }
}
