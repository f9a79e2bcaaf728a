//! Local mode end to end: the real operator binary runs examples/students.yaml with the real shard
//! server and router binaries (build them first: `cargo build --workspace`) and real Postgres; a
//! shard server killed with SIGKILL comes back, SIGTERM leaves nothing running, and the cluster
//! resumed on its directory waits out its predecessor's read leases before acknowledging.

use operator::local::ClusterInfo;
use shard_server::tls::{Credentials, TlsFiles, TlsSource};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const OPERATOR: &str = env!("CARGO_BIN_EXE_sharddb-operator");

fn bin_dir() -> PathBuf {
    Path::new(OPERATOR).parent().unwrap().to_owned()
}

/// Stops the operator if the test fails half way, so no cluster outlives it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            signal(self.0.id(), nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

fn alive(pid: u32) -> bool {
    !localpg::process_gone(pid)
}

/// `GET path` over plain HTTP/1.1; true on a 2xx.
fn http_ok(base: &str, path: &str) -> bool {
    let addr = base.trim_start_matches("http://");
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 2")
}

fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `method url path` (an empty JSON body) with the operator's certificate, or with none; the
/// status, or `None` when no answer came (a refused connection or handshake).
fn https_call(
    cluster: &ClusterInfo,
    method: reqwest::Method,
    url: &str,
    path: &str,
    with_certificate: bool,
) -> Option<u16> {
    let dir = cluster.internal.operator_tls_dir.clone().expect("local mode uses TLS by default");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let http = if with_certificate {
            Credentials::Tls(TlsSource::open(TlsFiles::in_dir(&dir)).unwrap()).http_client(Duration::from_secs(5))
        } else {
            anonymous(&std::fs::read_to_string(dir.join("ca.crt")).unwrap())
        };
        let request = http.request(method, format!("{url}{path}")).body("{}");
        request.send().await.ok().map(|r| r.status().as_u16())
    })
}

fn https_get(cluster: &ClusterInfo, url: &str, path: &str, with_certificate: bool) -> Option<u16> {
    https_call(cluster, reqwest::Method::GET, url, path, with_certificate)
}

/// A client trusting the PEM CA `ca` and presenting no certificate.
fn anonymous(ca: &str) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    shard_server::api::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(config).timeout(Duration::from_secs(5)).build().unwrap()
}

fn https_ok(cluster: &ClusterInfo, url: &str, path: &str) -> bool {
    https_get(cluster, url, path, true).is_some_and(|s| (200..300).contains(&s))
}

fn read_cluster(dir: &Path) -> ClusterInfo {
    serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap()
}

#[test]
fn runs_the_students_example_restarts_a_killed_server_and_stops_cleanly() {
    for bin in ["sharddb-shard-server", "sharddb-router"] {
        assert!(
            bin_dir().join(bin).is_file(),
            "{bin} is missing from {}: run `cargo build --workspace` first",
            bin_dir().display()
        );
    }
    // Traversable by everyone: as root, Postgres runs as `postgres` and must reach its data.
    let data = tempfile::Builder::new()
        .prefix("sharddb-local-")
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .unwrap();
    let (mut operator, router_url) = start_operator(data.path(), &[]);

    let cluster = read_cluster(data.path());
    assert_eq!(cluster.router.url, router_url);
    assert_eq!(cluster.operator.pid, operator.0.id());
    let names: Vec<&str> = cluster.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["Server0", "Server1", "Server2", "Server3", "Server4", "Server5"]);
    let mut pids = vec![cluster.router.pid.unwrap()];
    for s in &cluster.servers {
        let (pid, pg_pid) = (s.pid.unwrap(), s.postgres.pid.unwrap());
        assert!(alive(pid) && alive(pg_pid), "{} and its postgres run", s.name);
        assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
        assert!(https_ok(&cluster, &s.url, "/heartbeat"), "{} answers its heartbeat", s.name);
        assert!(s.postgres.data_dir.starts_with(data.path().join("servers").join(&s.name)));
        assert!(s.postgres.url.ends_with("/sharddb"));
        // A new cluster's servers are the first processes of their names: no lease wait at start.
        assert!(cmdline(pid).contains(" --no-predecessor"), "{}: {}", s.name, cmdline(pid));
        pids.extend([pid, pg_pid]);
    }
    assert!(alive(cluster.router.pid.unwrap()));
    assert!(http_ok(&router_url, "/healthz"));
    let topology = shard_server::topology::Topology::parse(&std::fs::read(&cluster.topology).unwrap()).unwrap();
    assert_eq!(topology.servers.len(), 6);
    assert_eq!(topology.shards.len(), 4);

    // Only the cluster's own components are answered: the operator's certificate is, nobody
    // without one is (401), and plain HTTP gets no answer at all.
    let server = &cluster.servers[0].url;
    assert_eq!(https_get(&cluster, server, "/status", true), Some(200));
    assert_eq!(https_get(&cluster, server, "/status", false), Some(401));
    assert_eq!(https_call(&cluster, reqwest::Method::POST, &cluster.control_url, "/add", false), Some(401));
    assert_eq!(https_call(&cluster, reqwest::Method::POST, server, "/config", false), Some(401));
    let plain = server.replacen("https://", "http://", 1);
    assert!(!http_ok(&plain, "/status"), "plain HTTP to a shard server is not served");
    // Secrets and the map of ports are for the operator's user alone.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.path().join("cluster.json")), 0o600);
    assert_eq!(mode(&data.path().join("tls")), 0o700);
    assert_eq!(mode(&data.path().join("tls/ca.key")), 0o600);

    // Every server's Postgres authenticates: a password kept 0600 in the data directory, in no
    // command line and not in cluster.json; without it no connection is made.
    let password_file = data.path().join("postgres-password");
    assert_eq!(mode(&password_file), 0o600);
    let password = std::fs::read_to_string(&password_file).unwrap().trim().to_owned();
    assert!(password.len() >= 32);
    let cluster_json = std::fs::read_to_string(data.path().join("cluster.json")).unwrap();
    assert!(!cluster_json.contains(&password), "cluster.json holds no secret");
    for &pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&password), "pid {pid}'s command line holds no password");
    }
    let pg = &cluster.servers[0].postgres;
    assert_eq!(pg.password_file.as_deref(), Some(password_file.as_path()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use sqlx::Connection as _;
        let refused = sqlx::PgConnection::connect(&pg.url).await.unwrap_err().to_string();
        assert!(refused.contains("password"), "{refused}");
        let wrong = pg.url.replacen("postgres@", "postgres:wrong@", 1);
        let refused = sqlx::PgConnection::connect(&wrong).await.unwrap_err().to_string();
        assert!(refused.contains("password authentication failed"), "{refused}");
        let right = pg.url.replacen("postgres@", &format!("postgres:{password}@"), 1);
        sqlx::PgConnection::connect(&right).await.expect("the password opens it").close().await.unwrap();
    });

    // A shard server killed outright comes back on the same port, with a new pid.
    let victim = &cluster.servers[2];
    let old = victim.pid.unwrap();
    signal(old, nix::sys::signal::Signal::SIGKILL);
    let new = eventually("a restarted Server2 in cluster.json", Duration::from_secs(30), || {
        read_cluster(data.path()).servers[2].pid.filter(|&p| p != old)
    });
    assert!(alive(new));
    assert!(!cmdline(new).contains("--no-predecessor"), "a restart had a predecessor: {}", cmdline(new));
    eventually("the restarted Server2's heartbeat", Duration::from_secs(60), || {
        https_ok(&cluster, &victim.url, "/heartbeat").then_some(())
    });
    pids.push(new);

    // SIGTERM: everything stops, the operator exits 0.
    signal(operator.0.id(), nix::sys::signal::Signal::SIGTERM);
    let status = eventually("the operator to exit", Duration::from_secs(60), || operator.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
    eventually("every child and postgres to be gone", Duration::from_secs(10), || {
        pids.iter().all(|&p| !alive(p)).then_some(())
    });
    let log = std::fs::read_to_string(data.path().join("logs/Server2.log")).unwrap();
    assert!(log.contains("exited (signal: 9 (SIGKILL)); restarting"), "{log}");

    // The same directory started again: its servers have predecessors (the processes just
    // stopped), whose replicas could still hold read leases had they not exited. So no server skips
    // the start-up wait, and no write is acknowledged before one lease after its primary started.
    // The lease is longer than the cluster takes to start, so a skipped wait shows; a slow
    // machine only makes the acknowledgements later.
    let lease = Duration::from_secs(8);
    let (mut operator, router_url) = start_operator(data.path(), &[("SHARDDB_LEASE_MS", "8000")]);
    let cluster = read_cluster(data.path());
    let mut started = Vec::new();
    for s in &cluster.servers {
        let pid = s.pid.unwrap();
        assert!(!cmdline(pid).contains("--no-predecessor"), "a resumed cluster's {}: {}", s.name, cmdline(pid));
        started.push(process_age(pid));
    }
    // Ages are measured now; a server's age at an acknowledgement is its age now plus the time
    // since. The youngest bounds every primary from below.
    let measured = Instant::now();
    let youngest = started.into_iter().min().unwrap();
    for key in 1..=20 {
        let body = format!(r#"{{"data":[{{"Stud_id":{key},"Stud_name":"resumed","Stud_marks":1}}]}}"#);
        if http_post_ok(&router_url, "/write", &body) {
            let age = youngest + measured.elapsed();
            // Every server started before the youngest, so each was at least this old.
            assert!(age >= lease, "a write was acknowledged {age:?} after the servers started, within a lease");
            break;
        }
        assert!(key < 20, "no write acknowledged after 20 attempts");
    }
    signal(operator.0.id(), nix::sys::signal::Signal::SIGTERM);
    let status = eventually("the resumed operator to exit", Duration::from_secs(60), || operator.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
}

/// Starts `sharddb-operator local examples/students.yaml` on `dir` (resuming it if it holds a
/// cluster) with extra environment variables, and waits for the router URL line, which means the
/// whole cluster is up.
fn start_operator(dir: &Path, env: &[(&str, &str)]) -> (Running, String) {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/students.yaml");
    let mut child = Command::new(OPERATOR)
        .arg("local")
        .arg(&spec)
        .arg("--data-dir")
        .arg(dir)
        .args(["--port", "0", "--bin-dir"])
        .arg(bin_dir())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let operator = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let router_url = loop {
        let line = rx.recv_timeout(Duration::from_secs(180)).expect("the router URL line within 3 minutes");
        if let Some(url) = line.strip_prefix("sharddb router listening on ") {
            break url.to_owned();
        }
    };
    assert!(router_url.starts_with("http://127.0.0.1:"), "{router_url}");
    (operator, router_url)
}

/// How long ago process `pid` started, from `/proc` (clock ticks since boot).
fn process_age(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis start
    // at field 3, so the start time (field 22) is the 20th of them.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let ticks: u64 = after.split_whitespace().nth(19).unwrap().parse().unwrap();
    let hz = Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout;
    let hz: f64 = String::from_utf8(hz).unwrap().trim().parse().unwrap();
    let uptime: f64 =
        std::fs::read_to_string("/proc/uptime").unwrap().split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_secs_f64((uptime - ticks as f64 / hz).max(0.0))
}

/// `POST path` with a JSON body over plain HTTP/1.1; true on a 2xx. Waits up to 30 s.
fn http_post_ok(base: &str, path: &str, body: &str) -> bool {
    let addr = base.trim_start_matches("http://");
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 2")
}

/// A process's command line, arguments separated by spaces.
fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

/// Processes whose command line mentions `dir` (Postgres servers name their data directory).
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then_some((pid, cmd))
        })
        .collect()
}

#[test]
fn a_signal_while_starting_stops_what_started() {
    let data = tempfile::Builder::new().prefix("sharddb-interrupt-").tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/students.yaml");
    let child = Command::new(OPERATOR)
        .arg("local")
        .arg(&spec)
        .arg("--data-dir")
        .arg(data.path())
        .args(["--port", "0", "--bin-dir"])
        .arg(bin_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut operator = Running(child);
    // Interrupt once the first Postgres exists, i.e. in the middle of starting them.
    eventually("a postgres of this cluster", Duration::from_secs(60), || {
        processes_under(data.path()).iter().any(|(_, cmd)| cmd.contains("postgres -D")).then_some(())
    });
    signal(operator.0.id(), nix::sys::signal::Signal::SIGTERM);
    let status = eventually("the operator to exit", Duration::from_secs(60), || operator.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
    let left = eventually("nothing left running", Duration::from_secs(10), || {
        let left = processes_under(data.path());
        left.is_empty().then_some(left)
    });
    assert!(left.is_empty());
}
