//! Fault injection under load, in local mode: real processes, real Postgres. A recording load
//! (`tests::load`: writers that own their keys, readers that are separate clients) runs while
//! faults are injected repeatedly, through signals and the local mode's `control/` requests. The
//! checker then asserts that every key's history is linearizable (and, more plainly worded, that
//! no read was stale, invented or older than an earlier read), that every acknowledged write (and
//! delete) is on every ready replica, and that the copies of each shard are identical.
//!
//! Heal and failover times and client-visible errors are printed as a table (run with
//! `--no-capture` to see it), never asserted. Every wait is on an event (`events.log`,
//! `cluster.json`, `/status`, the load's progress), bounded by a generous limit.

use anyhow::{Context, Result, ensure};
use reqwest::Method;
use serde_json::json;
use shard_server::api::ShardClient;
use shard_server::topology::ReplicaState;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tests::LocalCluster;
use tests::checks::*;
use tests::fault::*;
use tests::load::{History, Load, LoadConfig, parse_rows};

/// Replica faults, each injected twice (on different servers): SIGKILL (the supervisor restarts
/// it), its Postgres stopped (demoted past the timeout, recovered when Postgres is back), its data
/// wiped (demoted, refilled from the primary), frozen with SIGSTOP (demoted, healed once thawed).
#[tokio::test]
async fn replica_faults_heal_under_load() -> Result<()> {
    let c = LocalCluster::students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    let mut report = Report::default();
    let mut windows = Vec::new();
    progress(&load).await?;
    for round in 0..2 {
        let t = topology(&c)?;
        let (replica, _) = replica_and_primary(&t, round);
        let shard = nth_shard(&t, round);
        let fault = |f: &str| format!("{f} ({replica})");

        let e0 = load.errors();
        let w = open_window(&load, fault("SIGKILL replica"), &shard);
        let ms = kill_and_wait_restart(&c, &replica).await?;
        progress(&load).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(fault("SIGKILL replica"), "restarted by the supervisor in", Some(ms), load.errors() - e0);

        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault("stop replica's Postgres"), &shard);
        control(&c, "stop-postgres", &replica).await?;
        let demoted = wait_event(&c, "demotion", t0, |e| e.event == "demote" && e.server == replica).await?;
        report.add(fault("stop replica's Postgres"), "demoted after", Some(demoted.at_ms - t0), load.errors() - e0);
        progress(&load).await?;
        let e0 = load.errors();
        let t1 = now_ms();
        control(&c, "start-postgres", &replica).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(
            fault("stop replica's Postgres"),
            "Postgres back → every copy ready",
            Some(now_ms() - t1),
            load.errors() - e0,
        );

        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault("wipe replica"), &shard);
        all_recorded(&c).await?;
        control(&c, "wipe", &replica).await?;
        // The healer carries out control requests in its own loop, so it observes nothing while
        // the server stops and its data is replaced: time the demotion from when that is done.
        let wiped = now_ms();
        let demoted = wait_event(&c, "demotion", t0, |e| e.event == "demote" && e.server == replica).await?;
        report.add(fault("wipe replica"), "stopped and wiped in", Some(wiped - t0), 0);
        report.add(
            fault("wipe replica"),
            "demoted after the wipe",
            Some(demoted.at_ms.saturating_sub(wiped)),
            load.errors() - e0,
        );
        let e0 = load.errors();
        let t1 = now_ms();
        control(&c, "start", &replica).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(fault("wipe replica"), "restart → every copy ready", Some(now_ms() - t1), load.errors() - e0);
    }
    // Frozen (SIGSTOP): alive but answering nothing, as a hung process or a partition would be.
    // Writes wait for it until it is demoted; once thawed it is behind, and must be healed before
    // it serves reads again.
    for round in 0..2 {
        let t = topology(&c)?;
        let (replica, _) = replica_and_primary(&t, round + 2);
        let pid = pid_of(&c, &replica)?.context("replica pid")?;
        let fault = format!("SIGSTOP replica ({replica})");
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault.clone(), &nth_shard(&t, round + 2));
        signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
        let demoted = wait_event(&c, "demotion", t0, |e| e.event == "demote" && e.server == replica).await;
        signal(pid, nix::sys::signal::Signal::SIGCONT)?;
        let demoted = demoted?;
        report.add(fault.clone(), "demoted after", Some(demoted.at_ms - t0), load.errors() - e0);
        let e0 = load.errors();
        let t1 = now_ms();
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(fault, "SIGCONT → every copy ready", Some(now_ms() - t1), load.errors() - e0);
    }
    report.print("replica faults");
    finish_with_windows(&c, load, &BTreeMap::new(), "replica faults", &windows).await
}

/// Primary faults, each injected twice (on different shards' primaries), and the router killed
/// twice: a primary killed and kept down fails over, then comes back and is refilled; a primary
/// whose Postgres stops fails over; a primary SIGKILLed and restarted at once keeps its role.
#[tokio::test]
async fn primary_faults_fail_over_under_load() -> Result<()> {
    let c = LocalCluster::students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    let mut report = Report::default();
    let mut windows = Vec::new();
    progress(&load).await?;
    for round in 0..2 {
        // Killed and kept down: the ready copy with the highest sequence number takes over.
        let t = topology(&c)?;
        let shard = t.shards[round].id.clone();
        let (_, primary) = replica_and_primary(&t, round);
        let fault = |f: &str| format!("{f} ({primary}, {shard})");
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault("SIGKILL primary, kept down"), &nth_shard(&t, round));
        control(&c, "kill", &primary).await?;
        let promoted = wait_event(&c, "failover", t0, |e| e.event == "promote" && e.shard == shard).await?;
        progress(&load).await?;
        report.add(
            fault("SIGKILL primary, kept down"),
            "failover (promote) after",
            Some(promoted.at_ms - t0),
            load.errors() - e0,
        );
        let e0 = load.errors();
        let t1 = now_ms();
        control(&c, "start", &primary).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(
            fault("SIGKILL primary, kept down"),
            "restart → every copy ready",
            Some(now_ms() - t1),
            load.errors() - e0,
        );

        // Its Postgres stops: the server cannot answer for its shards, so it is failed over too.
        let t = topology(&c)?;
        let (_, primary) = replica_and_primary(&t, round + 2);
        let shard = t.shards[(round + 2) % t.shards.len()].id.clone();
        let fault = |f: &str| format!("{f} ({primary}, {shard})");
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault("stop primary's Postgres"), &nth_shard(&t, round + 2));
        control(&c, "stop-postgres", &primary).await?;
        let promoted = wait_event(&c, "failover", t0, |e| e.event == "promote" && e.shard == shard).await?;
        progress(&load).await?;
        report.add(
            fault("stop primary's Postgres"),
            "failover (promote) after",
            Some(promoted.at_ms - t0),
            load.errors() - e0,
        );
        let e0 = load.errors();
        let t1 = now_ms();
        control(&c, "start-postgres", &primary).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(
            fault("stop primary's Postgres"),
            "Postgres back → every copy ready",
            Some(now_ms() - t1),
            load.errors() - e0,
        );

        // SIGKILL, restarted at once by the supervisor: back before any timeout, keeps its role.
        let t = topology(&c)?;
        let (_, primary) = replica_and_primary(&t, round + 1);
        let e0 = load.errors();
        let w = open_window(&load, format!("SIGKILL primary, restarted ({primary})"), &nth_shard(&t, round + 1));
        let ms = kill_and_wait_restart(&c, &primary).await?;
        progress(&load).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(
            format!("SIGKILL primary ({primary})"),
            "restarted by the supervisor in",
            Some(ms),
            load.errors() - e0,
        );

        // The router dies: the supervisor restarts it on the same port; clients see errors meanwhile.
        let e0 = load.errors();
        let w = open_window(&load, "SIGKILL router", &nth_shard(&t, round));
        let ms = kill_and_wait_restart(&c, "router").await?;
        progress(&load).await?;
        windows.push(w.close(&load));
        report.add("SIGKILL router", "restarted by the supervisor in", Some(ms), load.errors() - e0);
    }
    report.print("primary and router faults");
    finish_with_windows(&c, load, &BTreeMap::new(), "primary and router faults", &windows).await
}

/// A primary whose data is wiped (its volume lost) comes back empty: it must not serve its shards
/// with nothing in them; another copy takes over and the wiped one is refilled.
#[tokio::test]
async fn a_wiped_primary_fails_over_under_load() -> Result<()> {
    let c = LocalCluster::students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    let mut report = Report::default();
    let mut windows = Vec::new();
    progress(&load).await?;
    for round in 0..2 {
        let t = topology(&c)?;
        let shard = t.shards[round].id.clone();
        let (_, primary) = replica_and_primary(&t, round);
        let fault = format!("wipe primary ({primary}, {shard})");
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, fault.clone(), &nth_shard(&t, round));
        all_recorded(&c).await?;
        control(&c, "wipe", &primary).await?;
        let wiped = now_ms();
        let promoted = wait_event(&c, "failover", t0, |e| e.event == "promote" && e.shard == shard).await?;
        progress(&load).await?;
        report.add(fault.clone(), "stopped and wiped in", Some(wiped - t0), 0);
        report.add(
            fault.clone(),
            "failover (promote) after the wipe",
            Some(promoted.at_ms.saturating_sub(wiped)),
            load.errors() - e0,
        );
        let e0 = load.errors();
        let t1 = now_ms();
        control(&c, "start", &primary).await?;
        all_ready(&c).await?;
        windows.push(w.close(&load));
        report.add(fault, "restart → every copy ready", Some(now_ms() - t1), load.errors() - e0);
    }
    report.print("wiped primaries");
    finish_with_windows(&c, load, &BTreeMap::new(), "wiped primaries", &windows).await
}

/// The seed's own fault test: a server is killed; it comes back with its shards copied from the
/// other replicas, and the router's `/status` still shows every server.
#[tokio::test]
async fn a_killed_server_comes_back_with_its_shards() -> Result<()> {
    let c = LocalCluster::students()?;
    let (_, n_before) = c.send(Method::GET, "/status", "").await?;
    let victim = "Server2";
    let base = write_rows(&c, (0..16384).step_by(64)).await?;
    all_recorded(&c).await?;
    let t0 = now_ms();
    control(&c, "wipe", victim).await?;
    control(&c, "start", victim).await?;
    let held: Vec<String> = topology(&c)?.shards_of(victim).map(|(s, _)| s.id.clone()).collect();
    ensure!(!held.is_empty(), "{victim} holds no shard");
    // Each of its copies is noticed empty, then refilled from the other replicas.
    for sh in &held {
        wait_event(&c, "recovered", t0, |e| e.event == "ready" && e.server == victim && e.shard == *sh).await?;
    }
    all_ready(&c).await?;
    println!("seed test: {victim} wiped and back to every copy ready in {} ms", now_ms() - t0);
    let (_, n_after) = c.send(Method::GET, "/status", "").await?;
    assert_eq!(n_after["N"], n_before["N"], "the router still shows every server");
    assert_eq!(n_after["servers"][victim], n_before["servers"][victim], "with the same shards");
    check(&c, &History::default(), &base).await
}

/// Heal of a large shard: 100,000 rows loaded into one shard (in batches through the router's
/// `/write`), a replica wiped, the time from its restart to `ready` printed with rows/s, while a
/// light load keeps writing to and reading from the same shard.
#[tokio::test]
async fn a_wiped_replica_of_a_100k_row_shard_heals() -> Result<()> {
    const ROWS: i64 = 100_000;
    const BATCH: i64 = 5_000;
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("big.yaml");
    std::fs::write(
        &spec,
        "apiVersion: sharddb.io/v1alpha1\nkind: ShardedDatabase\nmetadata:\n  name: big\nspec:\n  schema:\n    \
         columns: [Stud_id, Stud_name, Stud_marks]\n    dtypes: [Number, String, Number]\n  shards:\n    \
         - { id: big, low: 0, size: 131072 }\n  replicas: 3\n  servers: 3\n",
    )?;
    let c = LocalCluster::start(&spec)?;
    let loaded = Instant::now();
    let mut base = BTreeMap::new();
    for first in (0..ROWS).step_by(BATCH as usize) {
        let rows: Vec<_> = (first..first + BATCH)
            .map(|k| {
                base.insert(k, k % 1000);
                json!({"Stud_id": k, "Stud_name": format!("student number {k}"), "Stud_marks": k % 1000})
            })
            .collect();
        let (st, resp) = c.send(Method::POST, "/write", &json!({"data": rows}).to_string()).await?;
        ensure!(st == 200, "loading rows from {first}: {st} {resp}");
    }
    let load_secs = loaded.elapsed().as_secs_f64();
    println!("loaded {ROWS} rows in {load_secs:.1} s ({:.0} rows/s)", ROWS as f64 / load_secs);

    let config =
        LoadConfig { writers: 2, readers: 2, first_key: ROWS, key_space: 131_072 - ROWS, ..Default::default() };
    let load = Load::start(&c.router, config);
    progress(&load).await?;
    let (replica, _) = replica_and_primary(&topology(&c)?, 0);
    all_recorded(&c).await?;
    let t0 = now_ms();
    control(&c, "wipe", &replica).await?;
    wait_event(&c, "demotion", t0, |e| e.event == "demote" && e.server == replica).await?;
    let e0 = load.errors();
    let t1 = now_ms();
    control(&c, "start", &replica).await?;
    let ready = wait_event(&c, "heal", t1, |e| e.event == "ready" && e.server == replica).await?;
    let heal_ms = ready.at_ms - t1;
    let mut report = Report::default();
    report.add(
        format!("wipe replica of a {ROWS}-row shard ({replica})"),
        "restart → ready",
        Some(heal_ms),
        load.errors() - e0,
    );
    report.print("heal of a large shard");
    println!(
        "heal: {:.0} rows/s from restart to ready; the healer's own account: {}",
        ROWS as f64 / (heal_ms.max(1) as f64 / 1000.0),
        ready.detail
    );
    finish(&c, load, &base).await
}

/// A replica that keeps serving reads but cannot apply writes (here: a trigger refusing every
/// change to its table). A delete through the router fails on it; the router retries, and its retry
/// finds the row already gone on the primary. The router counts such a retried delete as done, so
/// the primary's "not found" must only come once every ready replica holds the deletion: otherwise
/// the client gets a 200 while a replica that serves reads still returns the row.
#[tokio::test]
async fn a_delete_is_acknowledged_only_once_every_ready_replica_has_it() -> Result<()> {
    use sqlx::Connection;
    let c = LocalCluster::students()?;
    let key = 77;
    let row = json!({"data": [{"Stud_id": key, "Stud_name": "x", "Stud_marks": 1}]});
    let (st, body) = c.send(Method::POST, "/write", &row.to_string()).await?;
    ensure!(st == 200, "{body}");
    let t = topology(&c)?;
    let (replica, _) = replica_and_primary(&t, 0);
    let pg = c.cluster_file()?.servers.iter().find(|s| s.name == replica).context("replica")?.postgres.connect_url()?;
    let mut conn = sqlx::PgConnection::connect(&pg).await?;
    let refuse = [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
        r#"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE OR DELETE ON "shard_sh1" FOR EACH STATEMENT EXECUTE FUNCTION refuse()"#,
    ];
    for q in refuse {
        sqlx::query(q).execute(&mut conn).await?;
    }
    let read_replica = async || -> Result<Option<i64>> {
        let req = json!({"shard": "sh1", "Stud_id": {"low": key, "high": key}});
        let (st, body) =
            tests::send(&c.http, Method::POST, &format!("{}/read", t.servers[&replica].url), &req.to_string()).await?;
        ensure!(st == 200, "{replica}: {st} {body}");
        Ok(parse_rows(&body)?.get(&key).copied())
    };

    let (st, body) = c.send(Method::DELETE, "/del", &json!({"Stud_id": key}).to_string()).await?;
    let on_replica = read_replica().await?;
    println!("delete while {replica} refuses changes: {st} {body}; {replica} holds {on_replica:?}");
    let answered = || -> Result<()> {
        ensure!(st != 200 || on_replica.is_none(), "the delete was acknowledged, but {replica} still serves the row");
        ensure!(st == 200 || st >= 500, "a failed delete is a 5xx (retry), not {st} {body}");
        Ok(())
    };
    answered().map_err(tests::safety::violation)?;

    // Once the replica applies again, a retry completes and the row is gone from every copy.
    sqlx::query(r#"DROP TRIGGER refuse ON "shard_sh1""#).execute(&mut conn).await?;
    let (st, body) = c.send(Method::DELETE, "/del", &json!({"Stud_id": key}).to_string()).await?;
    ensure!(st == 200 || st == 404, "retried delete: {st} {body}");
    ensure!(read_replica().await?.is_none(), "{replica} still holds the deleted row");
    let mut h = History::default();
    h.keys.insert(key);
    h.writes.push(tests::load::WriteOp {
        key,
        change: tests::load::Change::Delete,
        start: 0,
        end: 0,
        outcome: tests::load::Outcome::Acked,
    });
    check(&c, &h, &BTreeMap::new()).await
}

/// Placement changes under the recording load, each twice: `/add` of a server that takes copies
/// of two shards (filled from their replicas), then `/rm` of a shard's primary (it hands over and
/// drains before it stops). The checker then holds the whole history to the same standard as the
/// other faults: no stale read, no lost write, identical copies.
#[tokio::test]
async fn add_and_rm_under_load_lose_nothing() -> Result<()> {
    let c = LocalCluster::students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    let mut report = Report::default();
    let mut windows = Vec::new();
    progress(&load).await?;
    for (round, new) in ["Server6", "Server7"].into_iter().enumerate() {
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(&load, format!("/add {new} (copies of sh1, sh2)"), &nth_shard(&topology(&c)?, 0));
        let body = json!({"n": 1, "new_shards": [], "servers": {new: ["sh1", "sh2"]}});
        let (st, resp) = c.send(Method::POST, "/add", &body.to_string()).await?;
        ensure!(st == 200, "/add {new}: {st} {resp}");
        settled(&c, "the new server filled", |t| {
            let held: BTreeSet<&str> =
                t.shards_of(new).filter(|(_, s)| *s == ReplicaState::Ready).map(|(s, _)| s.id.as_str()).collect();
            held == BTreeSet::from(["sh1", "sh2"])
        })
        .await?;
        report.add(format!("/add {new}"), "→ filled, every copy ready", Some(now_ms() - t0), load.errors() - e0);
        progress(&load).await?;
        windows.push(w.close(&load));

        let t = topology(&c)?;
        let victim = t.shards[round].primary.clone();
        let e0 = load.errors();
        let t0 = now_ms();
        let w = open_window(
            &load,
            format!("/rm primary {victim} (hand-over of {})", t.shards[round].id),
            &nth_shard(&t, round),
        );
        let (st, resp) = c.send(Method::DELETE, "/rm", &json!({"n": 1, "servers": [victim]}).to_string()).await?;
        ensure!(st == 200, "/rm {victim}: {st} {resp}");
        settled(&c, "the primary drained", |t| !t.servers.contains_key(&victim)).await?;
        let t = topology(&c)?;
        if t.shards.iter().any(|s| s.replicas.len() < 3) {
            return Err(tests::safety::violation(anyhow::anyhow!("a shard lost a copy: {:?}", t.shards)));
        }
        report.add(
            format!("/rm primary {victim}"),
            "→ drained, every copy ready",
            Some(now_ms() - t0),
            load.errors() - e0,
        );
        progress(&load).await?;
        windows.push(w.close(&load));
    }
    report.print("placement changes");
    finish_with_windows(&c, load, &BTreeMap::new(), "placement changes", &windows).await
}

/// A replica's rows changed behind its server's back (here: straight in its Postgres) leave its
/// history hash as it was: only the rows' checksum shows it. The healer compares the copies'
/// checksums at equal sequence numbers, demotes the one that differs from its primary and copies
/// it afresh; afterwards every copy is identical again.
#[tokio::test]
async fn a_copy_whose_rows_differ_from_its_primary_is_found_and_copied_afresh() -> Result<()> {
    use sqlx::Connection;
    let c = LocalCluster::students()?;
    let base = write_rows(&c, (0..4096).step_by(128)).await?;
    let (replica, _) = replica_and_primary(&topology(&c)?, 0);
    let pg = c.cluster_file()?.servers.iter().find(|s| s.name == replica).context("replica")?.postgres.connect_url()?;
    let mut conn = sqlx::PgConnection::connect(&pg).await?;
    sqlx::query(r#"UPDATE "shard_sh1" SET "Stud_marks" = 1000 WHERE "Stud_id" = 128"#).execute(&mut conn).await?;

    let t0 = now_ms();
    let found = wait_event(&c, "divergence found", t0, |e| {
        e.event == "demote" && e.server == replica && e.shard == "sh1" && e.detail.contains("differs")
    })
    .await?;
    println!("{replica}'s forged copy of sh1 demoted after {} ms: {}", found.at_ms - t0, found.detail);
    wait_event(&c, "copied afresh", t0, |e| e.event == "ready" && e.server == replica && e.shard == "sh1").await?;
    all_ready(&c).await?;
    check(&c, &History::default(), &base).await
}

/// The certificate a TLS server at `url` presents to a fresh connection (no pooled one), as DER.
async fn served_certificate(c: &LocalCluster, url: &str) -> Result<Vec<u8>> {
    let http =
        c.cluster_file()?.operator_credentials()?.client_builder().tls_info(true).pool_max_idle_per_host(0).build()?;
    let resp = http.get(format!("{url}/heartbeat")).timeout(Duration::from_secs(10)).send().await?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().context("no TLS information")?;
    Ok(info.peer_certificate().context("no certificate presented")?.to_vec())
}

/// The DER of the certificate in a PEM file.
fn certificate_file(path: &Path) -> Result<Vec<u8>> {
    shard_server::tls::issue::first_certificate(&std::fs::read_to_string(path)?).map_err(anyhow::Error::msg)
}

/// Every certificate of the cluster is issued again twice while the load runs. Each time, every
/// shard server and the control endpoint present the new certificate to a new connection within
/// seconds, without a restart, and accept the new ones of their clients; connections already open
/// go on with the old ones. Not one request of the load fails, nothing is lost.
#[tokio::test]
async fn certificate_renewal_under_load_loses_no_request() -> Result<()> {
    let c = LocalCluster::students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    progress(&load).await?;
    let tls = c.dir.path().join("tls");
    for round in 0..2 {
        let file = c.cluster_file()?;
        let before = served_certificate(&c, &file.servers[0].url).await?;
        control(&c, "renew-certs", "all").await?;
        let renewed = certificate_file(&tls.join("servers").join(&file.servers[0].name).join("tls.crt"))?;
        ensure!(renewed != before, "round {round}: the certificate files were issued again");
        for s in &file.servers {
            let want = certificate_file(&tls.join("servers").join(&s.name).join("tls.crt"))?;
            LocalCluster::eventually(&format!("{} presents its renewed certificate", s.name), EVENT_LIMIT, || {
                let (c, url, want) = (&c, s.url.clone(), want.clone());
                async move { served_certificate(c, &url).await.is_ok_and(|got| got == want) }
            })
            .await?;
        }
        let want = certificate_file(&tls.join("operator/tls.crt"))?;
        LocalCluster::eventually("the control endpoint presents its renewed certificate", EVENT_LIMIT, || {
            let (c, url, want) = (&c, file.control_url.clone(), want.clone());
            async move { served_certificate(c, &url).await.is_ok_and(|got| got == want) }
        })
        .await?;
        // Fresh connections with the renewed operator certificate are answered everywhere.
        for s in &file.servers {
            let http = file.operator_credentials()?.client_builder().pool_max_idle_per_host(0).build()?;
            ShardClient::new(http, s.url.clone())
                .status(false)
                .await
                .with_context(|| format!("{} with the new certificate", s.name))?;
        }
        progress(&load).await?;
    }
    all_ready(&c).await?;
    let h = load.finish().await?;
    ensure!(h.acked_writes() > 50 && h.successful_reads() > 50, "too little load to prove anything");
    ensure!(
        h.errors.is_empty(),
        "requests failed while certificates were renewed: {:?}",
        &h.errors[..h.errors.len().min(10)]
    );
    check(&c, &h, &BTreeMap::new()).await
}
