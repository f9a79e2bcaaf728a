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

/// The fault-injection suite's recording load generator and its checker.
pub mod load;

/// Keeps nextest's retries of the fault-injection tests from hiding a safety finding.
pub mod safety;

/// `cluster.json`, as the local mode writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterFile {
    pub router: Process,
    pub topology: PathBuf,
    pub servers: Vec<ServerProcess>,
    pub control_url: String,
    pub internal: Internal,
}

/// How the cluster's processes authenticate each other (`cluster.json`'s `internal`).
#[derive(Clone, Debug, Deserialize)]
pub struct Internal {
    pub tls: bool,
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
}

#[derive(Clone, Debug, Deserialize)]
pub struct Process {
    pub url: String,
    /// `None` while the process is down (between a crash and its restart).
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServerProcess {
    pub name: String,
    pub url: String,
    /// `None` while the process is down (between a crash and its restart).
    pub pid: Option<u32>,
    pub postgres: PostgresProcess,
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

/// A running local cluster; stopped (SIGTERM, then SIGKILL) on drop.
pub struct LocalCluster {
    child: Child,
    pub dir: tempfile::TempDir,
    pub router: String,
    /// Presents the operator's credentials: shard servers answer it on every endpoint.
    pub http: reqwest::Client,
    /// Flags given to `sharddb-operator local` beyond the spec, data directory and ports.
    args: Vec<String>,
}

impl LocalCluster {
    /// Starts `sharddb-operator local` on a spec file, with the router on a free port.
    pub fn start(spec: &Path) -> Result<LocalCluster> {
        LocalCluster::launch(Some(spec))
    }

    /// Starts `sharddb-operator local` with no spec: only the router, waiting for `POST /init`.
    pub fn empty() -> Result<LocalCluster> {
        LocalCluster::launch(None)
    }

    /// Starts `sharddb-operator local` with no spec and extra flags (e.g. `--admin-token`).
    pub fn empty_with(args: &[&str]) -> Result<LocalCluster> {
        LocalCluster::launch_with(None, args)
    }

    /// Starts `sharddb-operator local` on a spec file with extra flags (e.g. `--internal-tls=false`).
    pub fn start_with(spec: &Path, args: &[&str]) -> Result<LocalCluster> {
        LocalCluster::launch_with(Some(spec), args)
    }

    fn launch(spec: Option<&Path>) -> Result<LocalCluster> {
        LocalCluster::launch_with(spec, &[])
    }

    fn launch_with(spec: Option<&Path>, args: &[&str]) -> Result<LocalCluster> {
        safety::no_earlier_violation()?;
        install_crypto_provider();
        // SHARDDB_KEEP_TEST_DIRS=1 keeps every cluster's directory (data, logs, events) to read
        // after a failure.
        let keep = std::env::var_os("SHARDDB_KEEP_TEST_DIRS").is_some();
        let dir = tempfile::Builder::new().prefix("sharddb-e2e-").disable_cleanup(keep).tempdir()?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, router) = spawn_operator(dir.path(), spec, &args)?;
        let mut cluster =
            LocalCluster { child, dir, router, http: shard_server::api::http_client(Duration::from_secs(30)), args };
        cluster.http = cluster.cluster_file()?.operator_credentials()?.http_client(Duration::from_secs(30));
        Ok(cluster)
    }

    /// Stops the local mode (SIGTERM) and starts it again on the same data directory with no spec
    /// file, so it resumes from what it left there (`declared.json`, `topology.json`, the data).
    /// The router gets a new port.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.stop()?, "the local mode did not exit cleanly");
        let (child, router) = spawn_operator(self.dir.path(), None, &self.args)?;
        self.child = child;
        self.router = router;
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
        let start = Instant::now();
        while start.elapsed() < limit {
            if check().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{what}: not within {limit:?}")
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

/// Starts `sharddb-operator local` on `dir` and waits for its router URL line.
fn spawn_operator(dir: &Path, spec: Option<&Path>, args: &[String]) -> Result<(Child, String)> {
    let bin = bin_dir();
    let operator = bin.join("sharddb-operator");
    if !operator.exists() {
        bail!("{} is missing: run `cargo build --workspace --bins` first", operator.display());
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("operator.log"))?;
    let mut child = Command::new(&operator)
        .arg("local")
        .args(spec)
        .arg("--data-dir")
        .arg(dir)
        .arg("--port")
        .arg("0")
        .arg("--bin-dir")
        .arg(&bin)
        .args(args)
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
