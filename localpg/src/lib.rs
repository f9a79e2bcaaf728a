//! A throwaway PostgreSQL cluster built from the machine's own PostgreSQL binaries (`initdb` +
//! `pg_ctl`): the database of local mode and of every service test. Does I/O (processes, files).
//!
//! # Running as root
//! PostgreSQL refuses to run as root. When this process runs as root, every PostgreSQL program
//! (initdb, pg_ctl, createdb, psql) runs as the `postgres` user instead: the child process drops to
//! that user's uid and primary gid before it execs (no `runuser`/`sudo` parent stays around), and the
//! data directory and log file are created by us and handed to that user. The data directory's
//! ancestors must then be traversable by `postgres`; when one is not (a `0700` home or temporary
//! directory), [`LocalPg::new`] fails with [`PgError::NotTraversable`] naming the directory, instead of
//! silently placing the cluster somewhere else. [`LocalPg::temporary`] creates its own world-traversable
//! directory, so it works for root and non-root alike.
//!
//! # Lifetime
//! A [`LocalPg`] owns its server: [`Drop`] stops it (`pg_ctl stop -m fast`). `pg_ctl` detaches the
//! postmaster into its own session, so a Ctrl-C in the terminal never reaches it directly; whoever
//! owns the `LocalPg` decides when it stops.

use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The environment variable naming a directory that holds `initdb` and `pg_ctl`.
pub const PG_BIN_ENV: &str = "SHARDDB_PG_BIN";

/// The superuser created by `initdb -U` (and the OS user PostgreSQL runs as when we are root).
pub const SUPERUSER: &str = "postgres";

/// Where Debian and Ubuntu install the server binaries (one directory per major version).
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: set {PG_BIN_ENV} to their directory, \
         put initdb on PATH, or install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`, \
         Fedora: `dnf install postgresql-server`, macOS: `brew install postgresql`)"
    )]
    BinariesNotFound,
    #[error("{dir} does not contain {program} (from {origin})")]
    BinaryMissing { dir: PathBuf, program: &'static str, origin: &'static str },
    #[error(
        "running as root: PostgreSQL refuses to run as root and there is no `{SUPERUSER}` user to run \
         it as; create one (`useradd --system {SUPERUSER}`) or run as an unprivileged user"
    )]
    NoPostgresUser,
    #[error(
        "running as root, PostgreSQL runs as user `{SUPERUSER}`, which cannot enter {dir}; choose a data \
         directory under a path every user can traverse (e.g. under /tmp or /var/tmp), or `chmod o+x {dir}`"
    )]
    NotTraversable { dir: PathBuf },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free TCP port on 127.0.0.1")]
    NoFreePort(#[source] std::io::Error),
    #[error("failed to run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Command { program: String, status: String, stderr: String },
    #[error("postgres in {} did not start; last lines of {}:\n{log_tail}", data_dir.display(), log.display())]
    Start { data_dir: PathBuf, log: PathBuf, log_tail: String },
    #[error("template cluster {} {why}", template.display())]
    BadTemplate { template: PathBuf, why: &'static str },
    #[error("database name {0:?} is not a valid identifier")]
    BadDatabaseName(String),
    #[error("server setting {0:?} is not a name=value of letters, digits, '_', '.', '-'")]
    BadSetting(String),
}

/// How to create a cluster. `data_dir` is the only required field.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cluster's data directory; created by `initdb` unless it already holds a cluster.
    pub data_dir: PathBuf,
    /// Directory holding `initdb` and `pg_ctl`; else `$SHARDDB_PG_BIN`, `initdb` on PATH, or the
    /// newest `/usr/lib/postgresql/*/bin`.
    pub bin_dir: Option<PathBuf>,
    /// TCP port on 127.0.0.1; a free one is picked when absent.
    pub port: Option<u16>,
    /// Server log; `<data_dir's parent>/<data_dir's name>.log` when absent.
    pub log_file: Option<PathBuf>,
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Skip fsync (`initdb -N`, `fsync=off`, `synchronous_commit=off`): fast and fine for tests, but
    /// a crash of the machine can lose or corrupt data. Off by default.
    pub no_sync: bool,
    /// A freshly initialised, stopped cluster to copy instead of running `initdb` (a copy takes a
    /// fraction of initdb's time, which matters when many clusters start together). Only used when
    /// `data_dir` holds no cluster yet.
    pub template: Option<PathBuf>,
    /// The superuser's password: a new cluster then authenticates every connection with
    /// `scram-sha-256` instead of trusting it, and our own client programs send the password (in
    /// their environment, never on a command line). A template must have been made with the same
    /// password. `None`: `trust`, for throwaway test clusters.
    pub password: Option<String>,
    /// More server settings (`-c name=value`), after and so over the ones set here.
    pub settings: Vec<(String, String)>,
    /// Also listen on a Unix socket in the data directory ([`LocalPg::socket_url`]), for clients
    /// that cannot reach 127.0.0.1 here: a process in another network namespace, for instance.
    pub unix_socket: bool,
}

impl Options {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Options {
            data_dir: data_dir.into(),
            bin_dir: None,
            port: None,
            log_file: None,
            max_connections: 100,
            no_sync: false,
            template: None,
            password: None,
            settings: Vec::new(),
            unix_socket: false,
        }
    }
}

/// The PostgreSQL programs of one installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBinaries {
    dir: PathBuf,
}

impl PgBinaries {
    /// Finds the binaries: `explicit`, else `$SHARDDB_PG_BIN`, else `initdb` on PATH (symlinks
    /// resolved, so its siblings are found), else the newest `/usr/lib/postgresql/*/bin`.
    pub fn locate(explicit: Option<&Path>) -> Result<PgBinaries, PgError> {
        if let Some(dir) = explicit {
            return PgBinaries::at(dir, "an explicit option");
        }
        if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty()) {
            return PgBinaries::at(Path::new(&dir), PG_BIN_ENV);
        }
        if let Some(initdb) = find_on_path("initdb") {
            let real = fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(dir) = real.parent() {
                return PgBinaries::at(dir, "initdb on PATH");
            }
        }
        let versions = fs::read_dir(DEBIAN_PG_ROOT)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_else(|_| Vec::new());
        match newest_version(&versions) {
            Some(v) => PgBinaries::at(&Path::new(DEBIAN_PG_ROOT).join(v).join("bin"), DEBIAN_PG_ROOT),
            None => Err(PgError::BinariesNotFound),
        }
    }

    fn at(dir: &Path, origin: &'static str) -> Result<PgBinaries, PgError> {
        for program in ["initdb", "pg_ctl"] {
            if !is_executable(&dir.join(program)) {
                return Err(PgError::BinaryMissing { dir: dir.to_owned(), program, origin });
            }
        }
        Ok(PgBinaries { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
}

/// The newest of directory names like `15`, `9.6`, `16`; names that are not versions are ignored.
fn newest_version(names: &[String]) -> Option<&str> {
    let parse = |s: &str| -> Option<Vec<u32>> { s.split('.').map(|p| p.parse().ok()).collect() };
    names.iter().filter_map(|n| parse(n).map(|v| (v, n.as_str()))).max().map(|(_, n)| n)
}

/// The OS identity PostgreSQL programs run as: ourselves, or `postgres` when we are root.
#[derive(Clone, Copy, Debug)]
enum RunAs {
    Current,
    User { uid: u32, gid: u32 },
}

impl RunAs {
    fn detect() -> Result<RunAs, PgError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(RunAs::Current);
        }
        match nix::unistd::User::from_name(SUPERUSER) {
            Ok(Some(u)) => Ok(RunAs::User { uid: u.uid.as_raw(), gid: u.gid.as_raw() }),
            _ => Err(PgError::NoPostgresUser),
        }
    }

    /// Gives `path` to the PostgreSQL user (a no-op when we are that user).
    fn own(self, path: &Path) -> Result<(), PgError> {
        if let RunAs::User { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| PgError::Io {
                action: "failed to chown",
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Fails unless the PostgreSQL user can traverse every existing ancestor of `path`.
    fn check_traversable(self, path: &Path) -> Result<(), PgError> {
        let RunAs::User { uid, gid } = self else {
            return Ok(());
        };
        for dir in path.ancestors().skip(1) {
            let Ok(meta) = fs::metadata(dir) else {
                continue;
            };
            let mode = meta.mode();
            let bit = if meta.uid() == uid {
                0o100
            } else if meta.gid() == gid {
                0o010
            } else {
                0o001
            };
            if mode & bit == 0 {
                return Err(PgError::NotTraversable { dir: dir.to_owned() });
            }
        }
        Ok(())
    }

    fn command(self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let RunAs::User { uid, gid } = self {
            // std drops supplementary groups when it changes the uid. The working directory must
            // be one the user may enter, or the PostgreSQL tools complain about it.
            cmd.uid(uid).gid(gid).current_dir("/");
        }
        cmd
    }
}

/// One PostgreSQL server on 127.0.0.1 with its own data directory.
#[derive(Debug)]
pub struct LocalPg {
    bins: PgBinaries,
    run_as: RunAs,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    max_connections: u32,
    no_sync: bool,
    settings: Vec<(String, String)>,
    unix_socket: bool,
    running: bool,
    /// The superuser's password (`scram-sha-256`), or `None` (`trust`).
    password: Option<String>,
    /// Set by [`LocalPg::temporary`]: the directory removed when this value drops (after the stop).
    temp: Option<tempfile::TempDir>,
}

impl LocalPg {
    /// Prepares a cluster: finds the binaries, picks the port and runs `initdb` unless the data
    /// directory already holds a cluster. Does not start the server.
    pub fn new(opts: Options) -> Result<LocalPg, PgError> {
        let bins = PgBinaries::locate(opts.bin_dir.as_deref())?;
        let run_as = RunAs::detect()?;
        let data_dir = absolute(&opts.data_dir)?;
        run_as.check_traversable(&data_dir)?;
        let log_file = match opts.log_file {
            Some(l) => absolute(&l)?,
            None => {
                let name = data_dir.file_name().unwrap_or(OsStr::new("pgdata")).to_string_lossy();
                data_dir.with_file_name(format!("{name}.log"))
            }
        };
        let port = match opts.port {
            Some(p) => p,
            None => free_port().map_err(PgError::NoFreePort)?,
        };
        // pg_ctl hands its `-o` options to a shell: only plain words may get there.
        let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if let Some((name, value)) = opts.settings.iter().find(|(n, v)| !plain(n) || !plain(v)) {
            return Err(PgError::BadSetting(format!("{name}={value}")));
        }
        let pg = LocalPg {
            bins,
            run_as,
            data_dir,
            log_file,
            port,
            max_connections: opts.max_connections,
            no_sync: opts.no_sync,
            settings: opts.settings,
            unix_socket: opts.unix_socket,
            running: false,
            password: opts.password,
            temp: None,
        };
        if !pg.is_initialized() {
            match &opts.template {
                Some(template) => pg.copy_template(&absolute(template)?)?,
                None => pg.initdb()?,
            }
        }
        pg.prepare_log()?;
        Ok(pg)
    }

    /// A started cluster in a fresh temporary directory (removed on drop), without fsync: for tests.
    pub fn temporary() -> Result<LocalPg, PgError> {
        let temp = tempfile::Builder::new()
            .prefix("localpg-")
            .permissions(fs::Permissions::from_mode(0o755))
            .tempdir()
            .map_err(|source| PgError::Io {
                action: "failed to create a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let mut opts = Options::new(temp.path().join("pgdata"));
        opts.no_sync = true;
        let mut pg = LocalPg::new(opts)?;
        pg.temp = Some(temp);
        pg.start()?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// Whether this value started the server and has not stopped it since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A connection URL for database `db` as the superuser. It never holds the password (see
    /// [`LocalPg::password`]), so it may be shown and logged.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The superuser's password, when the cluster authenticates with one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A connection URL for database `db` through the Unix socket in the data directory, when the
    /// cluster was created with [`Options::unix_socket`].
    pub fn socket_url(&self, db: &str) -> Option<String> {
        let dir: String = self
            .data_dir
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' => char::from(b).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect();
        self.unix_socket.then(|| format!("postgres://{SUPERUSER}@localhost:{}/{db}?host={dir}", self.port))
    }

    /// The postmaster's pid: the first line of `postmaster.pid`, when the server is up.
    pub fn pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    /// Creates the data directory (mode 0700, owned by the PostgreSQL user), which that user may
    /// not be allowed to create itself.
    fn create_data_dir(&self) -> Result<(), PgError> {
        let io = |action| move |source| PgError::Io { action, path: self.data_dir.clone(), source };
        fs::create_dir_all(&self.data_dir).map_err(io("failed to create"))?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io("failed to set permissions of"))?;
        self.run_as.own(&self.data_dir)
    }

    fn copy_template(&self, template: &Path) -> Result<(), PgError> {
        if !template.join("PG_VERSION").is_file() {
            return Err(PgError::BadTemplate { template: template.to_owned(), why: "holds no cluster" });
        }
        if template.join("postmaster.pid").exists() {
            return Err(PgError::BadTemplate { template: template.to_owned(), why: "is in use by a running server" });
        }
        self.create_data_dir()?;
        // `cp -a` keeps modes; running it as the PostgreSQL user makes that user the owner.
        let mut cmd = self.run_as.command(Path::new("cp"));
        cmd.arg("-a").arg(template.join(".")).arg(&self.data_dir);
        run("cp", cmd)?;
        Ok(())
    }

    fn initdb(&self) -> Result<(), PgError> {
        if let RunAs::User { .. } = self.run_as {
            self.create_data_dir()?;
        }
        let mut cmd = self.run_as.command(&self.bins.program("initdb"));
        let auth = if self.password.is_some() { "scram-sha-256" } else { "trust" };
        cmd.arg("-D").arg(&self.data_dir).args(["-A", auth, "-U", SUPERUSER, "--encoding=UTF8", "--locale=C"]);
        if self.no_sync {
            cmd.arg("-N");
        }
        // initdb reads the password from a file (or a terminal): one readable by the PostgreSQL
        // user alone, beside the data directory (initdb wants the directory itself empty), and
        // removed whether initdb succeeded or not.
        let pwfile = self.password.as_ref().map(|_| self.data_dir.with_extension("pwfile"));
        if let (Some(file), Some(password)) = (&pwfile, &self.password) {
            write_private(file, password)?;
            self.run_as.own(file)?;
            cmd.arg(format!("--pwfile={}", file.display()));
        }
        let done = run("initdb", cmd);
        if let Some(file) = &pwfile {
            let _ = fs::remove_file(file);
        }
        done.map(drop)
    }

    /// A client program (createdb, psql) as the PostgreSQL user, with the password, if any, in
    /// its environment: a command line is visible to every user of the machine, an environment
    /// only to the process's own user.
    fn client(&self, program: &str) -> Command {
        let mut cmd = self.run_as.command(&self.bins.program(program));
        if let Some(password) = &self.password {
            cmd.env("PGPASSWORD", password);
        }
        cmd
    }

    fn prepare_log(&self) -> Result<(), PgError> {
        // pg_ctl appends to the log as the PostgreSQL user, which may not be able to create it.
        fs::OpenOptions::new().create(true).append(true).open(&self.log_file).map_err(|source| PgError::Io {
            action: "failed to create",
            path: self.log_file.clone(),
            source,
        })?;
        self.run_as.own(&self.log_file)
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.run_as.command(&self.bins.program("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// Starts the server and waits until it accepts connections. A server left running on this data
    /// directory (by a process that died without stopping it) is stopped first.
    pub fn start(&mut self) -> Result<(), PgError> {
        if self.running {
            return Ok(());
        }
        let mut status = self.pg_ctl();
        status.arg("status");
        if status.output().map(|o| o.status.success()).unwrap_or(false) {
            tracing::warn!(data_dir = %self.data_dir.display(), "stopping a postgres left running on this data directory");
            self.pg_ctl_stop()?;
        }
        // The socket directory is quoted for the server's option parser; a data directory holding
        // a quote or a backslash is refused rather than passed on.
        let sockets = if self.unix_socket {
            let dir = self.data_dir.to_string_lossy();
            if dir.contains(['\'', '\\', ' ']) {
                return Err(PgError::Start {
                    data_dir: self.data_dir.clone(),
                    log: self.log_file.clone(),
                    log_tail: "a data directory with a Unix socket may not contain quotes, backslashes or spaces"
                        .into(),
                });
            }
            dir.into_owned()
        } else {
            String::new()
        };
        let mut server_opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{sockets}' -c max_connections={} -c shared_buffers=32MB",
            self.port, self.max_connections
        );
        if self.no_sync {
            server_opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        for (name, value) in &self.settings {
            server_opts.push_str(&format!(" -c {name}={value}"));
        }
        let mut cmd = self.pg_ctl();
        cmd.arg("-w").arg("-t").arg("60").arg("-l").arg(&self.log_file).arg("-o").arg(server_opts).arg("start");
        // Capturing pg_ctl's output is safe: it points the postmaster's stdout and stderr at the log
        // file, so the daemon does not hold our pipes open.
        if let Err(e) = run("pg_ctl start", cmd) {
            return Err(PgError::Start {
                data_dir: self.data_dir.clone(),
                log: self.log_file.clone(),
                log_tail: format!("{}\n({e})", tail(&self.log_file, 20)),
            });
        }
        self.running = true;
        tracing::debug!(port = self.port, data_dir = %self.data_dir.display(), "postgres started");
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast -w`): open transactions are rolled back, the data is
    /// kept. Stopping a stopped server is a no-op.
    pub fn stop(&mut self) -> Result<(), PgError> {
        self.running = false;
        let Some(pid) = self.pid() else { return Ok(()) };
        self.pg_ctl_stop()?;
        // pg_ctl returns once the pid file is gone, a moment before the process exits; wait for
        // the exit so callers can rely on "stopped" meaning "no process".
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !process_gone(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    fn pg_ctl_stop(&self) -> Result<(), PgError> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "fast", "-w", "-t", "60", "stop"]);
        match run("pg_ctl stop", cmd) {
            Ok(_) => Ok(()),
            // Already gone (e.g. killed from outside): nothing to stop.
            Err(PgError::Command { stderr, .. }) if stderr.contains("Is server running?") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the server, deletes the data directory and creates an empty cluster in its place (not
    /// started): the loss of a disk.
    pub fn wipe(&mut self) -> Result<(), PgError> {
        self.stop()?;
        fs::remove_dir_all(&self.data_dir).map_err(|source| PgError::Io {
            action: "failed to remove",
            path: self.data_dir.clone(),
            source,
        })?;
        self.initdb()
    }

    /// Creates database `name`; an existing database of that name is kept as it is.
    pub fn create_database(&self, name: &str) -> Result<(), PgError> {
        check_db_name(name)?;
        let mut cmd = self.client("createdb");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, name]);
        match run("createdb", cmd) {
            Ok(_) => Ok(()),
            Err(PgError::Command { stderr, .. }) if stderr.contains("already exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes a running cluster made without a password (one whose `pg_hba.conf` trusts some
    /// connection, as `initdb -A trust` writes it) authenticate every connection with the
    /// password of [`Options::password`]: sets the superuser's password (`scram-sha-256`), then
    /// rewrites every `trust` rule of `pg_hba.conf` to `scram-sha-256` and reloads the server.
    /// Returns whether anything changed; a cluster without a `trust` rule, or without a password
    /// to set, is left alone.
    ///
    /// The order makes every step safe to interrupt: the password is set while the old rules
    /// still let us in without one (a second run sets it again), and `pg_hba.conf` is replaced
    /// by a rename, so a crash leaves the old file or the new one, never half of one. The
    /// statement holding the password reaches `psql` through a file readable by the PostgreSQL
    /// user alone, never a command line.
    pub fn require_password(&self) -> Result<bool, PgError> {
        let Some(password) = &self.password else { return Ok(false) };
        let hba = self.data_dir.join("pg_hba.conf");
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| PgError::Io { action, path, source }
        };
        let text = fs::read_to_string(&hba).map_err(io("failed to read", &hba))?;
        let Some(rewritten) = hba_without_trust(&text) else { return Ok(false) };
        let sql = format!(
            "SET password_encryption = 'scram-sha-256';\nALTER ROLE {SUPERUSER} PASSWORD '{}';\n",
            password.replace('\'', "''")
        );
        let file = self.data_dir.with_extension("password.sql");
        write_private(&file, &sql)?;
        self.run_as.own(&file)?;
        let mut cmd = self.client("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-d", "postgres"])
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&file);
        let set = run("psql", cmd);
        let _ = fs::remove_file(&file);
        set?;
        let next = self.data_dir.join("pg_hba.conf.new");
        let _ = fs::remove_file(&next);
        write_private(&next, &rewritten)?;
        self.run_as.own(&next)?;
        fs::rename(&next, &hba).map_err(io("failed to replace", &hba))?;
        let mut reload = self.pg_ctl();
        reload.arg("reload");
        run("pg_ctl reload", reload)?;
        tracing::info!(data_dir = %self.data_dir.display(), "postgres now authenticates every connection with a password");
        Ok(true)
    }

    /// Runs `sql` with `psql` in database `db` and returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, PgError> {
        check_db_name(db)?;
        let mut cmd = self.client("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db]).args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]);
        let out = run("psql", cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(data_dir = %self.data_dir.display(), error = %e, "failed to stop postgres");
        }
    }
}

/// `pg_hba.conf`'s text with the method of every `trust` rule replaced by `scram-sha-256`;
/// `None` when no rule trusts. The method is the first `trust` field after a rule's type,
/// database and user fields (an address, and a mask, may come between); spacing and comments
/// are kept.
fn hba_without_trust(text: &str) -> Option<String> {
    let mut changed = false;
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let rule_len = line.find('#').unwrap_or(line.len());
        let (rule, comment) = line.split_at(rule_len);
        let mut rest = rule;
        let mut index = 0;
        let mut replaced = false;
        while let Some(start) = rest.find(|c: char| !c.is_whitespace()) {
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let field = &rest[..end];
            if index >= 3 && field == "trust" && !replaced {
                out.push_str("scram-sha-256");
                replaced = true;
            } else {
                out.push_str(field);
            }
            index += 1;
            rest = &rest[end..];
        }
        out.push_str(rest);
        out.push_str(comment);
        changed |= replaced;
    }
    changed.then_some(out)
}

/// Writes `contents` to a new file `path` readable by its owner alone from the first byte.
fn write_private(path: &Path, contents: &str) -> Result<(), PgError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| PgError::Io { action: "failed to write", path: path.to_owned(), source })
}

fn check_db_name(name: &str) -> Result<(), PgError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if ok { Ok(()) } else { Err(PgError::BadDatabaseName(name.to_owned())) }
}

fn absolute(path: &Path) -> Result<PathBuf, PgError> {
    std::path::absolute(path).map_err(|source| PgError::Io {
        action: "failed to resolve",
        path: path.to_owned(),
        source,
    })
}

/// Whether process `pid` has exited (it no longer exists, or is a zombie waiting to be reaped).
pub fn process_gone(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
        return true;
    }
    // `/proc/PID/stat` is `pid (comm) STATE ...`; comm may contain spaces and parentheses.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(program: &str, mut cmd: Command) -> Result<Output, PgError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| PgError::Spawn { program: program.into(), source })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(PgError::Command {
            program: program.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_compares_numerically() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(newest_version(&names(&["9.6", "15", "13"])), Some("15"));
        assert_eq!(newest_version(&names(&["9.6", "10"])), Some("10"));
        assert_eq!(newest_version(&names(&["README", "16", "x.1"])), Some("16"));
        assert_eq!(newest_version(&names(&[])), None);
    }

    #[test]
    fn an_explicit_directory_without_binaries_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = PgBinaries::locate(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("does not contain initdb"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn only_trust_methods_are_rewritten_and_the_rest_kept() {
        let hba = "# TYPE  DATABASE USER ADDRESS METHOD\n\
                   local   all      all          trust\n\
                   host    all      all  127.0.0.1/32  trust # loopback\n\
                   host    all      trust 10.0.0.0 255.0.0.0 trust\n\
                   host    all      all  ::1/128   scram-sha-256\n\
                   local   replication all       trust";
        let want = "# TYPE  DATABASE USER ADDRESS METHOD\n\
                    local   all      all          scram-sha-256\n\
                    host    all      all  127.0.0.1/32  scram-sha-256 # loopback\n\
                    host    all      trust 10.0.0.0 255.0.0.0 scram-sha-256\n\
                    host    all      all  ::1/128   scram-sha-256\n\
                    local   replication all       scram-sha-256";
        assert_eq!(hba_without_trust(hba).as_deref(), Some(want));
        assert_eq!(hba_without_trust(want), None, "nothing trusts: nothing to change");
        assert_eq!(hba_without_trust("# local all all trust\n"), None, "a comment is not a rule");
    }

    #[test]
    fn database_names_are_identifiers() {
        assert!(check_db_name("sharddb").is_ok());
        assert!(check_db_name("t_1").is_ok());
        for bad in ["", "1db", "a-b", "a;b", "a b"] {
            assert!(check_db_name(bad).is_err(), "{bad:?}");
        }
    }
}
