//! Harness for the end-to-end suites: starts `sharddb-operator local` as a real child process on a
//! spec, waits for its router, reads `cluster.json`, and speaks HTTP to what it started. Does I/O.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use shard_server::api::install_crypto_provider;
use shard_server::tls::{Credentials, DatabaseId, Identity, TlsFiles, TlsSource};

/// The benchmark program's library (its binary is `src/bin/bench.rs`).
pub mod bench;

/// What the local-mode suites check and wait for: topology, events, readiness, the checker.
pub mod checks;

/// The fault-injection suites' fixtures: process faults, waits on events, the report and the
/// windows of unavailability per fault.
pub mod fault;

/// The fault-injection suite's recording load generator and its checkers.
pub mod load;

/// Network namespaces of a test run and the links cut between them.
pub mod partition;

/// The previous release's binaries, built from the git history, for the upgrade test.
pub mod previous;

/// Keeps nextest's retries of the fault-injection tests from hiding a safety finding.
pub mod safety;

/// The linearizability checker for one register that [`load::History::linearizability`] runs per key.
pub mod linearizable;

/// `cluster.json`, as the local mode writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterFile {
    pub router: Process,
    pub topology: PathBuf,
    pub servers: Vec<ServerProcess>,
    pub control_url: String,
    /// Absent in a cluster of a release from before internal authentication.
    #[serde(default)]
    pub internal: Internal,
    /// The switch, when every process runs in a network namespace of its own.
    #[serde(default)]
    pub network: Option<NetworkInfo>,
}

/// How the cluster's processes authenticate each other (`cluster.json`'s `internal`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Internal {
    pub tls: bool,
    /// `none`, `migrate` or `strict` (`--internal-auth`); empty before internal authentication.
    #[serde(default)]
    pub mode: String,
    pub ca: Option<PathBuf>,
    pub operator_tls_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub database: String,
    pub admin_token_file: Option<PathBuf>,
}

impl ClusterFile {
    /// The operator's credentials: what a test presents to call a shard server directly.
    pub fn operator_credentials(&self) -> Result<Credentials> {
        let i = &self.internal;
        match (&i.operator_tls_dir, &i.token_file) {
            (Some(dir), _) => Ok(Credentials::Tls(TlsSource::open(TlsFiles::in_dir(dir))?)),
            (None, Some(file)) => {
                let (namespace, name) = i.database.split_once('/').context("database is NAMESPACE/NAME")?;
                let identity = Identity::operator(DatabaseId::new(namespace, name))?;
                Ok(Credentials::Token { secret: std::fs::read_to_string(file)?.trim().into(), identity })
            }
            (None, None) => bail!("cluster.json names no credentials"),
        }
    }

    /// A client presenting the operator's credentials, or a plain one when the cluster names
    /// none (a release from before internal authentication).
    pub fn operator_http(&self, timeout: Duration) -> Result<reqwest::Client> {
        if self.internal.operator_tls_dir.is_none() && self.internal.token_file.is_none() {
            return Ok(shard_server::api::http_client(timeout));
        }
        Ok(self.operator_credentials()?.http_client(timeout))
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Process {
    pub url: String,
    /// `None` while the process is down (between a crash and its restart).
    pub pid: Option<u32>,
    #[serde(default)]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServerProcess {
    pub name: String,
    pub url: String,
    /// `None` while the process is down (between a crash and its restart).
    pub pid: Option<u32>,
    pub postgres: PostgresProcess,
    #[serde(default)]
    pub netns: Option<String>,
}

/// The local mode's switch (`--netns`): where links are cut.
#[derive(Clone, Debug, Deserialize)]
pub struct NetworkInfo {
    pub id: String,
    pub subnet: String,
    /// The operator's (and this test process's) address on the switch.
    pub gateway: std::net::Ipv4Addr,
    pub switch_namespace: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PostgresProcess {
    pub port: u16,
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    /// Without the password (cluster.json holds no secret).
    pub url: String,
    /// The file holding the password.
    pub password_file: Option<PathBuf>,
}

impl PostgresProcess {
    /// A URL to connect with: `url` plus the password from its file.
    pub fn connect_url(&self) -> Result<String> {
        let Some(file) = &self.password_file else { return Ok(self.url.clone()) };
        let password = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut url = url::Url::parse(&self.url)?;
        url.set_password(Some(password.trim())).map_err(|()| anyhow::anyhow!("{} cannot hold a password", self.url))?;
        Ok(url.into())
    }
}

/// Where the workspace's binaries are: `SHARDDB_BIN_DIR`, else the cargo target directory this
/// test binary was built into (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHARDDB_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") { dir.parent().expect("profile dir").to_path_buf() } else { dir.to_path_buf() }
}

/// The repository root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Which programs a local cluster runs, and the router's port.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `sharddb-operator` binary.
    pub operator: PathBuf,
    /// Where it finds `sharddb-router` and `sharddb-shard-server` (`--bin-dir`).
    pub bin_dir: PathBuf,
    /// The router's port; 0 picks a free one.
    pub port: u16,
    /// Flags given to `sharddb-operator local` beyond the spec, data directory and ports.
    pub args: Vec<String>,
    /// Environment variables set for it (and so for the processes it starts).
    pub env: Vec<(String, String)>,
}

impl Default for Launch {
    /// This workspace's binaries, any free port.
    fn default() -> Self {
        Launch {
            operator: bin_dir().join("sharddb-operator"),
            bin_dir: bin_dir(),
            port: 0,
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running local cluster; stopped (SIGTERM, then SIGKILL) on drop.
pub struct LocalCluster {
    child: Child,
    pub dir: tempfile::TempDir,
    pub router: String,
    /// Presents the operator's credentials: shard servers answer it on every endpoint.
    pub http: reqwest::Client,
    /// Flags given to `sharddb-operator local` beyond the spec, data directory and ports.
    args: Vec<String>,
    /// With `--netns`: deletes what the run left of its namespaces, after the stop above.
    namespaces: Option<partition::Namespaces>,
}

impl LocalCluster {
    /// Starts `sharddb-operator local` on a spec file, with the router on a free port.
    pub fn start(spec: &Path) -> Result<LocalCluster> {
        LocalCluster::launch(Some(spec))
    }

    /// Starts `sharddb-operator local` on a spec file with extra flags.
    pub fn start_with<S: AsRef<str>>(spec: &Path, args: &[S]) -> Result<LocalCluster> {
        let args = args.iter().map(|a| a.as_ref().to_owned()).collect();
        LocalCluster::start_as(Some(spec), &Launch { args, ..Launch::default() })
    }

    /// Starts `sharddb-operator local` with no spec: only the router, waiting for `POST /init`.
    pub fn empty() -> Result<LocalCluster> {
        LocalCluster::launch(None)
    }

    /// Starts `sharddb-operator local` with no spec and extra flags (e.g. `--admin-token`).
    pub fn empty_with(args: &[&str]) -> Result<LocalCluster> {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        LocalCluster::start_as(None, &Launch { args, ..Launch::default() })
    }

    /// Starts `sharddb-operator local --netns` on a spec file: the router and every server in a
    /// network namespace of its own, named uniquely for this run (see [`partition`]).
    pub fn start_in_namespaces(spec: &Path) -> Result<LocalCluster> {
        let namespaces = partition::Namespaces::new()?;
        let id = namespaces.id().to_owned();
        let c = LocalCluster::launch_with(Some(spec), &Launch::default(), Some(namespaces))?;
        let network = c.cluster_file()?.network;
        ensure!(network.as_ref().is_some_and(|n| n.id == id), "cluster.json describes no network {id}: {network:?}");
        Ok(c)
    }

    fn launch(spec: Option<&Path>) -> Result<LocalCluster> {
        LocalCluster::start_as(spec, &Launch::default())
    }

    /// Starts `launch.operator local` on a spec file (or none), with `launch`'s binaries and port.
    pub fn start_as(spec: Option<&Path>, launch: &Launch) -> Result<LocalCluster> {
        LocalCluster::launch_with(spec, launch, None)
    }

    fn launch_with(
        spec: Option<&Path>,
        launch: &Launch,
        namespaces: Option<partition::Namespaces>,
    ) -> Result<LocalCluster> {
        safety::no_earlier_violation()?;
        install_crypto_provider();
        // SHARDDB_KEEP_TEST_DIRS=1 keeps every cluster's directory (data, logs, events) to read
        // after a failure.
        let keep = std::env::var_os("SHARDDB_KEEP_TEST_DIRS").is_some();
        let dir = tempfile::Builder::new().prefix("sharddb-e2e-").disable_cleanup(keep).tempdir()?;
        let netns = namespaces.as_ref().map(|n| n.id().to_owned());
        let (child, router) = spawn_operator(dir.path(), spec, launch, netns.as_deref())?;
        let http = shard_server::api::http_client(Duration::from_secs(30));
        let mut cluster = LocalCluster { child, dir, router, http, args: launch.args.clone(), namespaces };
        cluster.http = cluster.cluster_file()?.operator_http(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The switch of a cluster started in namespaces, for cutting links.
    pub fn switch(&self) -> Result<partition::Switch> {
        partition::Switch::of(&self.cluster_file()?)
    }

    /// Stops the local mode (SIGTERM) and starts it again on the same data directory with no spec
    /// file, so it resumes from what it left there (`declared.json`, `topology.json`, the data).
    /// The router gets a new port.
    pub fn restart(&mut self) -> Result<()> {
        self.restart_as(&Launch { args: self.args.clone(), ..Launch::default() })
    }

    /// [`LocalCluster::restart`] with `launch`'s binaries and port (e.g. another release's
    /// operator, on the port the router had).
    pub fn restart_as(&mut self, launch: &Launch) -> Result<()> {
        ensure!(self.stop()?, "the local mode did not exit cleanly");
        let netns = self.namespaces.as_ref().map(|n| n.id().to_owned());
        let (child, router) = spawn_operator(self.dir.path(), None, launch, netns.as_deref())?;
        self.child = child;
        self.router = router;
        self.http = self.cluster_file()?.operator_http(Duration::from_secs(30))?;
        Ok(())
    }

    /// Starts the seed's default configuration (`examples/students.yaml`).
    pub fn students() -> Result<LocalCluster> {
        LocalCluster::start(&repo_root().join("examples/students.yaml"))
    }

    /// The process id of the local mode itself (the operator).
    pub fn operator_pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cluster_file(&self) -> Result<ClusterFile> {
        let text = std::fs::read_to_string(self.dir.path().join("cluster.json"))?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.router)
    }

    /// Sends a raw body (as `curl -d` does, with a form content type) to the router.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
        send(&self.http, method, &self.url(path), body).await
    }

    /// Waits until `check` holds, polling; fails with `what` after `limit`.
    pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let held = checks::poll(limit, Duration::from_millis(100), || {
            let holds = check();
            async move { Ok(holds.await.then_some(())) }
        });
        held.await?.with_context(|| format!("{what}: not within {limit:?}"))
    }

    /// Sends SIGTERM and waits for the local mode to exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> Result<bool> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        Ok(false)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// Starts `launch.operator local` on `dir` (with `--netns ID` when given) and waits for its
/// router URL line.
fn spawn_operator(dir: &Path, spec: Option<&Path>, launch: &Launch, netns: Option<&str>) -> Result<(Child, String)> {
    let operator = &launch.operator;
    if !operator.exists() {
        bail!("{} is missing: run `cargo build --workspace --bins` first", operator.display());
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("operator.log"))?;
    let mut child = Command::new(operator)
        .arg("local")
        .args(spec)
        .arg("--data-dir")
        .arg(dir)
        .arg("--port")
        .arg(launch.port.to_string())
        .arg("--bin-dir")
        .arg(&launch.bin_dir)
        .args(&launch.args)
        .args(netns.map(|id| format!("--netns={id}")))
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {}", operator.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("sharddb router listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default();
            bail!("local mode did not print its router URL within 120 s; its log:\n{log}");
        }
    }
}

/// Sends `body` with a form content type; returns the status and JSON body (Null when empty).
pub async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &str,
) -> Result<(u16, serde_json::Value)> {
    let r = http
        .request(method, url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .with_context(|| format!("sending to {url}"))?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    let json =
        if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text).context(text.clone())? };
    Ok((status, json))
}
