//! What a local run needs from this machine: the programs it runs, its data directory, free
//! ports held until their processes take them, the signals that stop it, and a wait for a
//! started process to answer. Does I/O.

use super::supervisor::BinaryId;
use super::{LocalError, READY_TIMEOUT, ROUTER_BIN, SHARD_SERVER_BIN};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};

pub(super) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub(super) fn new() -> Self {
        let install = |kind| signal(kind).expect("signal handlers can be installed");
        Signals { term: install(SignalKind::terminate()), int: install(SignalKind::interrupt()) }
    }

    pub(super) async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The programs local mode runs, as the files were when located: a process started from
/// another file (an earlier build) is outdated, and the healer restarts it (`upgrade`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
    pub shard_server: PathBuf,
    pub router: PathBuf,
    pub shard_server_id: BinaryId,
    pub router_id: BinaryId,
}

impl Binaries {
    pub fn locate(dir: &Path) -> Result<Binaries, LocalError> {
        let find = |name: &'static str| {
            let p = dir.join(name);
            if p.is_file() { Ok(p) } else { Err(LocalError::MissingBinary { name, dir: dir.to_owned() }) }
        };
        let (shard_server, router) = (find(SHARD_SERVER_BIN)?, find(ROUTER_BIN)?);
        Ok(Binaries {
            dir: dir.to_owned(),
            shard_server_id: BinaryId::of(&shard_server),
            router_id: BinaryId::of(&router),
            shard_server,
            router,
        })
    }
}

/// The given directory (created if needed), or a fresh temporary one that outlives us.
pub(super) fn data_dir(given: Option<&Path>) -> Result<PathBuf, LocalError> {
    let dir = match given {
        Some(d) => d.to_owned(),
        None => tempfile::Builder::new()
            .prefix("sharddb-")
            .tempdir()
            .map_err(|source| LocalError::Io { action: "create a directory in", path: std::env::temp_dir(), source })?
            .keep(),
    };
    make_dir(&dir)?;
    std::path::absolute(&dir).map_err(|source| LocalError::Io { action: "resolve", path: dir, source })
}

/// Creates a directory of ours (and its parents). When we are root, Postgres runs as `postgres`
/// and must pass through our directories to reach its cluster, so they get the traverse bit
/// (`o+x`: enter, not list) whatever the umask or `tempfile` chose. A directory above the data
/// directory that `postgres` cannot enter is not ours to change; localpg reports it by name.
pub(super) fn make_dir(dir: &Path) -> Result<(), LocalError> {
    let io = |action| move |source| LocalError::Io { action, path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(io("create"))?;
    if nix::unistd::geteuid().is_root() {
        let mode = std::fs::metadata(dir).map_err(io("inspect"))?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(io("set permissions of"))?;
        }
    }
    Ok(())
}

/// Ports held open until the processes that will use them start, so that two picks cannot collide.
#[derive(Default)]
pub(super) struct PortReservations(Vec<TcpListener>);

impl PortReservations {
    pub(super) fn any(&mut self) -> Result<u16, LocalError> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(LocalError::NoFreePort)?;
        let port = l.local_addr().map_err(LocalError::NoFreePort)?.port();
        self.0.push(l);
        Ok(port)
    }

    pub(super) fn exact(&mut self, port: u16) -> Result<u16, LocalError> {
        if port == 0 {
            return self.any();
        }
        let l = TcpListener::bind(("127.0.0.1", port)).map_err(|source| LocalError::PortInUse { port, source })?;
        self.0.push(l);
        Ok(port)
    }
}
/// Polls `url` until it answers 2xx.
pub(super) async fn wait_ready(http: &reqwest::Client, name: &str, url: String, log: &Path) -> Result<(), LocalError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
            tracing::info!(name, %url, "ready");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(LocalError::NotReady { name: name.to_owned(), url, log: log.to_owned() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_binaries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Binaries::locate(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("sharddb-shard-server not found in"), "{e}");
        assert!(e.contains("--bin-dir"), "{e}");
    }

    #[test]
    fn as_root_our_directories_are_traversable() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = base.path().join("a/b");
        make_dir(&dir).unwrap();
        make_dir(&dir).unwrap(); // existing is fine
        let mode = std::fs::metadata(base.path()).unwrap().permissions().mode();
        if nix::unistd::geteuid().is_root() {
            let made = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(made & 0o001, 0o001, "{made:o}");
            // The temporary directory is the caller's: left as it was.
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
            assert_eq!(data_dir(Some(base.path())).unwrap(), base.path());
            let mode = std::fs::metadata(base.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o711, "a data directory of ours becomes traversable: {mode:o}");
        }
    }

    #[test]
    fn a_busy_port_is_reported() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut r = PortReservations::default();
        let e = r.exact(port).unwrap_err().to_string();
        assert!(e.starts_with(&format!("port {port} on 127.0.0.1 is in use")), "{e}");
        let a = r.exact(0).unwrap();
        let b = r.any().unwrap();
        assert_ne!(a, b);
    }
}
