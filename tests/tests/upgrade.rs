//! An upgrade from the previous release, in local mode, under the recording load: the previous
//! release's operator, router and shard servers (built from the git history, see
//! `tests::previous`) run `examples/students.yaml`; then, one at a time, the router, the operator
//! and the servers are replaced by this build's. Real processes, real Postgres.
//!
//! 1. **Router**: its file in the bin directory is replaced and the process stopped; the previous
//!    operator's supervisor starts the new one. The new router routes to old servers.
//!    Then one server (a replica) is restarted on this build's binary through the previous
//!    operator's `control/` verbs, and back on the previous one: the previous operator probes and
//!    heals a new server, and an old primary replicates to it.
//! 2. **Operator**: the previous operator stops (in local mode it is every process's parent, so its
//!    processes stop with it) and this build's resumes on the same data directory and port, with
//!    the old servers: it reads what the previous release left (`declared.json`, the topology, the
//!    data) and drives old servers.
//! 3. **Servers**: the shard-server file is replaced and the operator asked to upgrade
//!    (`control/upgrade`): it restarts the servers one at a time, replicas first, each drained
//!    before its restart and recovered before the next, while old and new servers replicate to
//!    each other.
//!
//! 4. **Internal authentication**: phases 1 to 3 run in `--internal-auth=none` (the previous
//!    operator hands `SHARDDB_INTERNAL_AUTH=none` to the new processes it starts through their
//!    environment; this build's operator picks `none` by itself for a data directory without
//!    `tls/`), as open as the previous release. Then the operator is restarted with
//!    `--internal-auth=strict`, under the same load: it makes the cluster's CA and certificates
//!    and its processes come back strict. After it, a request without a certificate is refused
//!    by every server (no answer over plain HTTP, 401 over TLS), and every server's Postgres,
//!    which the previous release made trusting every local connection, requires the cluster's
//!    password.
//!
//! In local mode the operator goes before the servers: the previous release cannot roll servers,
//! and the operator's replacement restarts its processes. In Kubernetes, `helm upgrade` replaces
//! the operator first too, and the new operator rolls the pods.
//!
//! Checked: no acknowledged write lost, no stale read, every copy identical (`tests::checks`);
//! linearizability and the order of reads only from the moment every process runs this build
//! (`checks::check_since`): the previous release does not promise them, and mixed with it this
//! one keeps what that release promised (README, "Reads while releases mix");
//! every write got a definite answer within the load's retries; the servers' rollout failed no
//! client request; every process runs this build's protocol at the end. Errors per phase are
//! printed. Build the previous release first (`scripts/build-previous-release.sh`; the test runs
//! it when its cache is empty) and this build's binaries (`cargo build --workspace --bins`).

use anyhow::{Context, Result, ensure};
use shard_server::api::{PROTOCOL_HEADER, PROTOCOL_VERSION, ShardClient};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tests::checks::{EVENT_LIMIT, Event, HEAL_LIMIT, all_ready, check_since, events, events_text, topology};
use tests::load::{Load, LoadConfig, Outcome};
use tests::{Launch, LocalCluster};

/// Acknowledged writes that prove the cluster serves writes again after a step.
const PROGRESS: usize = 20;

async fn progress(load: &Load, after: &str) -> Result<()> {
    ensure!(load.progress(PROGRESS, HEAL_LIMIT).await, "no write acknowledged within {HEAL_LIMIT:?} after {after}");
    Ok(())
}

/// Replaces `bins/name` with `from/name` the way a package upgrade does: a new file renamed over
/// the old one, so a process started from the old file keeps running it.
fn install(bins: &Path, from: &Path, name: &str) -> Result<()> {
    let staged = bins.join(format!(".{name}.new"));
    std::fs::copy(from.join(name), &staged).with_context(|| format!("copying {name}"))?;
    std::fs::rename(&staged, bins.join(name))?;
    Ok(())
}

/// The protocol each server says it speaks.
async fn server_protocols(c: &LocalCluster) -> Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    for s in c.cluster_file()?.servers {
        let status = ShardClient::new(c.http.clone(), s.url.clone()).status(false).await?;
        out.insert(s.name, status.protocol);
    }
    Ok(out)
}

/// How each server treats a caller without a certificate asking for its status: `served`, or
/// `refused` (no answer over plain HTTP, and 401 over TLS with no client certificate).
async fn refusals(c: &LocalCluster) -> Result<BTreeMap<String, String>> {
    let file = c.cluster_file()?;
    let plain = shard_server::api::http_client(Duration::from_secs(5));
    let anonymous = match &file.internal.ca {
        Some(ca) => {
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            Some(reqwest::Client::builder().tls_backend_preconfigured(config).timeout(Duration::from_secs(5)).build()?)
        }
        None => None,
    };
    let mut out = BTreeMap::new();
    for s in file.servers {
        let plain_url = format!("{}/status", s.url.replacen("https://", "http://", 1));
        let plain_answer = plain.get(&plain_url).send().await.ok().map(|r| r.status().as_u16());
        let tls_answer = match (&anonymous, s.url.starts_with("https://")) {
            (Some(http), true) => http.get(format!("{}/status", s.url)).send().await.ok().map(|r| r.status().as_u16()),
            _ => None,
        };
        let verdict = match (plain_answer, tls_answer) {
            (Some(200), _) | (_, Some(200)) => "served".to_owned(),
            (None, Some(401)) => "refused".to_owned(),
            other => format!("unexpected (plain, TLS) answers {other:?}"),
        };
        out.insert(s.name, verdict);
    }
    Ok(out)
}

/// Whether each server's Postgres lets in a local client that sends no password; and, when it
/// does not, that the cluster's password (`cluster.json` names its file) still does.
async fn postgres_open(c: &LocalCluster) -> Result<BTreeMap<String, bool>> {
    use sqlx::Connection as _;
    let connect = |url: String| async move {
        match tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 10 s".to_owned()),
        }
    };
    let mut out = BTreeMap::new();
    for s in c.cluster_file()?.servers {
        let open = match connect(s.postgres.url.clone()).await {
            Ok(()) => true,
            Err(e) => {
                ensure!(
                    e.contains("password"),
                    "{}'s Postgres refused a client without a password for another reason: {e}",
                    s.name
                );
                let with = connect(s.postgres.connect_url()?).await;
                ensure!(with.is_ok(), "{}'s Postgres refuses the cluster's password too: {with:?}", s.name);
                false
            }
        };
        out.insert(s.name, open);
    }
    Ok(out)
}

/// The protocol the router's answers carry (`None`: a release from before versions).
async fn router_protocol(c: &LocalCluster) -> Result<Option<String>> {
    let answer = c.http.get(c.url("/healthz")).send().await?;
    ensure!(answer.status().is_success(), "router /healthz: {}", answer.status());
    Ok(answer.headers().get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap_or_default().to_owned()))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// Two workers: the local mode is stopped and started with blocking calls, and the load must keep
// running (and see the outage) meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_is_upgraded_one_process_at_a_time_under_load_and_loses_nothing() -> Result<()> {
    let previous = tests::previous::bin_dir()?;
    let current = tests::bin_dir();
    println!("previous release {} from {}", tests::previous::commit(), previous.display());
    // The bin directory the local mode runs from: the previous release's router and server, to be
    // replaced file by file.
    let bins = tempfile::tempdir()?;
    for name in ["sharddb-router", "sharddb-shard-server"] {
        install(bins.path(), &previous, name)?;
    }
    let port = free_port()?;
    let spec = tests::repo_root().join("examples/students.yaml");
    // The previous operator passes its environment to the processes it starts: this build's
    // router and server then speak plain HTTP to the previous release's processes.
    let old = Launch {
        operator: previous.join("sharddb-operator"),
        bin_dir: bins.path().to_owned(),
        port,
        args: Vec::new(),
        env: vec![("SHARDDB_INTERNAL_AUTH".into(), "none".into())],
    };
    let mut c = LocalCluster::start_as(Some(&spec), &old)?;
    ensure!(router_protocol(&c).await?.is_none(), "the previous router advertises no protocol");
    ensure!(server_protocols(&c).await?.values().all(|p| *p == 1), "the previous servers speak protocol 1");

    let load = Load::start(&c.router, LoadConfig::default());
    progress(&load, "the start").await?;
    let mut phases: Vec<(&str, u64, u64)> = Vec::new();

    // 1. The router.
    let t0 = load.now();
    install(bins.path(), &current, "sharddb-router")?;
    let pid = c.cluster_file()?.router.pid.context("router pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
    let want = PROTOCOL_VERSION.to_string();
    LocalCluster::eventually("the new router answers", EVENT_LIMIT, || async {
        router_protocol(&c).await.ok().flatten().as_deref() == Some(want.as_str())
    })
    .await?;
    progress(&load, "the router's replacement").await?;
    phases.push(("router replaced (previous operator, old servers)", t0, load.now()));

    // 1b. One replica on this build's server under the previous operator, then back.
    let t0 = load.now();
    let t = topology(&c)?;
    let replica = t.servers.keys().find(|s| t.shards.iter().all(|sh| sh.primary != **s)).context("a replica")?.clone();
    install(bins.path(), &current, "sharddb-shard-server")?;
    control(&c, "stop", &replica).await?;
    control(&c, "start", &replica).await?;
    let url = t.servers[&replica].url.clone();
    LocalCluster::eventually("the replica on this build", EVENT_LIMIT, || async {
        ShardClient::new(c.http.clone(), url.clone()).status(false).await.is_ok_and(|s| s.protocol == PROTOCOL_VERSION)
    })
    .await?;
    all_ready(&c).await?;
    progress(&load, "a new replica under the previous operator").await?;
    install(bins.path(), &previous, "sharddb-shard-server")?;
    phases.push(("one replica on this build (previous operator)", t0, load.now()));

    // 2. The operator: this build's, resuming the previous release's cluster with its servers.
    let t0 = load.now();
    // No mode given: this build's operator sees a directory without `tls/` and runs `none`.
    let new = Launch { operator: current.join("sharddb-operator"), env: Vec::new(), ..old.clone() };
    tokio::task::block_in_place(|| c.restart_as(&new))?;
    let internal = c.cluster_file()?.internal;
    ensure!(
        internal.mode == "none" && !c.dir.path().join("tls").exists(),
        "a previous release's directory runs in none: {internal:?}"
    );
    ensure!(c.router == format!("http://127.0.0.1:{port}"), "the router keeps its port: {}", c.router);
    all_ready(&c).await?;
    progress(&load, "the operator's replacement").await?;
    ensure!(server_protocols(&c).await?.values().all(|p| *p == 1), "still the previous servers");
    phases.push(("operator replaced (its processes restart with it)", t0, load.now()));

    // 3. The servers, rolled by the operator.
    let t0 = load.now();
    let before = topology(&c)?;
    let since = now_ms();
    install(bins.path(), &current, "sharddb-shard-server")?;
    std::fs::write(c.dir.path().join("control/upgrade"), b"")?;
    let servers: BTreeSet<String> = before.servers.keys().cloned().collect();
    let started = Instant::now();
    loop {
        let updated: BTreeSet<String> = events(c.dir.path())
            .into_iter()
            .filter(|e| e.at_ms >= since && e.event == "updated")
            .map(|e| e.server)
            .collect();
        if updated == servers {
            break;
        }
        ensure!(
            started.elapsed() < HEAL_LIMIT * 3,
            "the servers were not all updated within {:?}; events.log:\n{}",
            HEAL_LIMIT * 3,
            events_text(&c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From here on every process runs this build.
    let all_new = load.now();
    all_ready(&c).await?;
    progress(&load, "the servers' rollout").await?;
    phases.push(("servers rolled one at a time by the operator", t0, load.now()));
    let rollout = phases.len() - 1;
    ensure!(
        server_protocols(&c).await?.values().all(|p| *p == PROTOCOL_VERSION),
        "every server runs this build: {:?}",
        server_protocols(&c).await?
    );
    check_rollout_order(&c, &before, since)?;
    // Some load with nothing but this build, for linearizability to be checked on.
    progress(&load, "the rollout's end").await?;
    let open = refusals(&c).await?;
    ensure!(open.values().all(|r| r == "served"), "in none every server answers anyone: {open:?}");
    // The previous release made every Postgres trust local connections, and in `none` a previous
    // release's server (which sends no password) may still run, so they are left so.
    let trusting = postgres_open(&c).await?;
    ensure!(trusting.values().all(|open| *open), "in none the previous release's Postgres still trusts: {trusting:?}");

    // 4. Internal authentication: the operator restarted strict, under the same load.
    let t0 = load.now();
    let strict = Launch { args: vec!["--internal-auth=strict".into()], ..new.clone() };
    tokio::task::block_in_place(|| c.restart_as(&strict))?;
    all_ready(&c).await?;
    progress(&load, "the restart in strict").await?;
    phases.push(("operator restarted with --internal-auth=strict", t0, load.now()));
    let internal = c.cluster_file()?.internal;
    ensure!(internal.mode == "strict" && internal.tls, "strict at the end: {internal:?}");
    let closed = refusals(&c).await?;
    ensure!(
        closed.values().all(|r| r == "refused"),
        "after the last rung no server answers a caller without a certificate: {closed:?}"
    );
    let trusting = postgres_open(&c).await?;
    ensure!(
        trusting.values().all(|open| !*open),
        "in strict every server's Postgres requires the cluster's password: {trusting:?}"
    );
    progress(&load, "strict").await?;

    let h = load.finish().await?;
    println!("\n{:<52} {:>10} {:>14}", "upgrade step", "ms", "client errors");
    let mut rollout_errors = 0;
    for (i, (what, from, to)) in phases.iter().enumerate() {
        let errors = h.errors_between(*from, *to);
        if i == rollout {
            rollout_errors = errors;
        }
        println!("{what:<52} {:>10} {errors:>14}", (to - from) / 1000);
    }
    let (from, to) = (phases[rollout].1, phases[rollout].2);
    for (at, e) in h.errors.iter().filter(|(at, _)| *at >= from && *at <= to).take(10) {
        println!("  during the servers' rollout at {at} µs: {e}");
    }
    check_since(&c, &h, &BTreeMap::new(), all_new).await?;
    let checked = h.linearizability_since(all_new);
    ensure!(
        checked.keys > 20 && checked.operations > 100,
        "too little load on this build alone to check linearizability: {checked}"
    );
    let unknown = h.writes.iter().filter(|w| w.outcome == Outcome::Unknown).count();
    ensure!(unknown == 0, "{unknown} writes got no definite answer within the load's retries");
    ensure!(h.acked_writes() > 100 && h.successful_reads() > 100, "too little load to prove anything");
    ensure!(rollout_errors == 0, "the servers' rollout failed {rollout_errors} client requests");
    Ok(())
}

/// Asks the local mode for a fault-injection verb on `server` and waits until it is carried out.
async fn control(c: &LocalCluster, verb: &str, server: &str) -> Result<()> {
    let path = c.dir.path().join("control").join(format!("{verb}.{server}"));
    std::fs::write(&path, b"")?;
    LocalCluster::eventually(&format!("control {verb} {server}"), EVENT_LIMIT, || {
        let gone = !path.exists();
        async move { gone }
    })
    .await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// From `events.log` since `since`: each server restarted once, the first one the primary of
/// nothing; each drained first (every copy it held demoted, or handed over when it was the
/// primary); and each back and updated before the next restarted.
fn check_rollout_order(c: &LocalCluster, before: &shard_server::topology::Topology, since: u64) -> Result<()> {
    let log: Vec<Event> = events(c.dir.path()).into_iter().filter(|e| e.at_ms >= since).collect();
    let restarts: Vec<&Event> = log.iter().filter(|e| e.event == "restart").collect();
    let order: Vec<&str> = restarts.iter().map(|e| e.server.as_str()).collect();
    println!("servers restarted in this order: {order:?}");
    ensure!(order.len() == before.servers.len(), "each server restarted once: {order:?}\n{}", events_text(c));
    ensure!(order.iter().collect::<BTreeSet<_>>().len() == order.len(), "each server once: {order:?}");
    let first = order[0];
    ensure!(before.shards.iter().all(|s| s.primary != first), "{first} restarted first but was a primary");
    let mut previous: Option<&Event> = None;
    for restart in &restarts {
        let server = restart.server.as_str();
        let window = log.iter().filter(|e| previous.is_none_or(|p| e.at_ms >= p.at_ms) && e.at_ms <= restart.at_ms);
        let drained = window
            .filter(|e| {
                (e.event == "drain_demote" && e.server == server)
                    || (e.event == "drain_hand_over" && e.detail.contains(&format!("from {server},")))
            })
            .count();
        let held = before.shards_of(server).count();
        ensure!(drained == held, "{server} held {held} copies, {drained} were taken out of service before its restart");
        if let Some(p) = previous {
            let back = log.iter().any(|e| e.event == "updated" && e.server == p.server && e.at_ms <= restart.at_ms);
            ensure!(back, "{} restarted before {} was back and its copies ready", server, p.server);
        }
        previous = Some(restart);
    }
    Ok(())
}
