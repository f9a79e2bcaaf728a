//! Network partitions under load, in local mode with the router and every shard server in a
//! network namespace of its own on a switch (`sharddb-operator local --netns`; `tests::partition`
//! cuts links there by dropping packets, silently). The recording load of `tests::load` runs
//! while links are cut and healed, each cut at least twice (on different shards); the checker of
//! `tests::checks` then asserts that every key's history is linearizable, that no acknowledged
//! write is missing from any copy, and that the copies of each shard are identical.
//!
//! Each cut lasts [`CUT`], longer than the operator's failover and demotion timeouts (3 s) and a
//! read lease (2 s), so that whatever the control plane does about it happens while it lasts;
//! then every cut is removed and the test waits until every copy is ready and writes are
//! acknowledged again. Per fault, the client-visible errors, the longest stretch without an
//! acknowledged write or a successful read of the shard it was aimed at, and the checker's
//! verdict are printed as a table (run with `--no-capture`), never asserted.
//!
//! The operator and this test process share one address on the switch: cutting a server from
//! the operator cuts it from the test too, which meanwhile only talks to the router.
//!
//! Needs root, `ip` and `nft` (see `tests::partition::runnable`); without them each test fails
//! and says what is missing.

use anyhow::Result;
use shard_server::topology::Topology;
use std::collections::BTreeMap;
use std::time::Duration;
use tests::LocalCluster;
use tests::checks::{all_ready, topology};
use tests::fault::{Window, finish_with_windows, progress};
use tests::load::{Load, LoadConfig};
use tests::partition::{OPERATOR, runnable};

/// How long each cut lasts.
const CUT: Duration = Duration::from_secs(8);

fn students() -> Result<LocalCluster> {
    LocalCluster::start_in_namespaces(&tests::repo_root().join("examples/students.yaml"))
}

/// The `n`-th shard (round robin), its primary and its other copies.
fn shard(t: &Topology, n: usize) -> (String, i64, i64, String, Vec<String>) {
    let sh = &t.shards[n % t.shards.len()];
    let replicas = sh.replicas.keys().filter(|r| **r != sh.primary).cloned().collect();
    (sh.id.clone(), sh.low, sh.high_exclusive(), sh.primary.clone(), replicas)
}

/// Cuts `links` (each one way: `from`'s packets to `to` are dropped) for [`CUT`], heals them, and
/// waits until the cluster is whole and serves writes again; returns the fault's window.
async fn inject(
    c: &LocalCluster,
    load: &Load,
    fault: String,
    t: &Topology,
    shard_index: usize,
    links: &[(String, String)],
) -> Result<Window> {
    let (shard, low, high, _, _) = shard(t, shard_index);
    let switch = c.switch()?;
    let e0 = load.errors();
    let from = load.now();
    for (a, b) in links {
        switch.cut(a, b)?;
    }
    println!("{fault}: cut {links:?}");
    tokio::time::sleep(CUT).await;
    switch.heal()?;
    all_ready(c).await?;
    progress(load).await?;
    let to = load.now();
    println!("{fault}: healed; whole again after {} ms", (to - from) / 1000);
    Ok(Window { fault, shard, low, high, from, to, errors: load.errors() - e0 })
}

fn both_ways(a: &str, b: &str) -> [(String, String); 2] {
    [(a.to_owned(), b.to_owned()), (b.to_owned(), a.to_owned())]
}

/// Cuts around a shard's primary, each twice (the first and second shards' primaries): from every
/// other copy of its shard (it can replicate nothing; they get no leases), from the operator
/// while routers and its replicas still reach it (the operator fails it over), and one way, its
/// packets to the operator dropped while the operator's still reach it.
#[tokio::test]
async fn partitions_around_a_primary() -> Result<()> {
    runnable()?;
    let c = students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    progress(&load).await?;
    let mut windows = Vec::new();
    for round in 0..2 {
        let t = topology(&c)?;
        let (id, _, _, primary, replicas) = shard(&t, round);
        let links: Vec<_> = replicas.iter().flat_map(|r| both_ways(&primary, r)).collect();
        let fault = format!("primary cut from its replicas ({primary}, {id})");
        windows.push(inject(&c, &load, fault, &t, round, &links).await?);

        let t = topology(&c)?;
        let (id, _, _, primary, _) = shard(&t, round + 1);
        let fault = format!("primary cut from the operator ({primary}, {id})");
        windows.push(inject(&c, &load, fault, &t, round + 1, &both_ways(&primary, OPERATOR)).await?);

        let t = topology(&c)?;
        let (id, _, _, primary, _) = shard(&t, round + 2);
        let fault = format!("primary's packets to the operator dropped ({primary}, {id})");
        windows.push(inject(&c, &load, fault, &t, round + 2, &[(primary, OPERATOR.to_owned())]).await?);
    }
    finish_with_windows(&c, load, &BTreeMap::new(), "partitions around a primary", &windows).await
}

/// Cuts around replicas and the router, each twice: a replica from its primary (writes wait for
/// it until it is demoted; it loses its read lease), the router from a shard's primary (writes to
/// that shard fail, reads go to its replicas), and one way, a replica's packets to its primary
/// dropped while the primary's still reach it.
#[tokio::test]
async fn partitions_around_replicas_and_the_router() -> Result<()> {
    runnable()?;
    let c = students()?;
    let load = Load::start(&c.router, LoadConfig::default());
    progress(&load).await?;
    let mut windows = Vec::new();
    for round in 0..2 {
        let t = topology(&c)?;
        let (id, _, _, primary, replicas) = shard(&t, round);
        let fault = format!("replica cut from its primary ({}, {id})", replicas[0]);
        windows.push(inject(&c, &load, fault, &t, round, &both_ways(&replicas[0], &primary)).await?);

        let t = topology(&c)?;
        let (id, _, _, primary, _) = shard(&t, round + 1);
        let fault = format!("router cut from a primary ({primary}, {id})");
        windows.push(inject(&c, &load, fault, &t, round + 1, &both_ways("router", &primary)).await?);

        let t = topology(&c)?;
        let (id, _, _, primary, replicas) = shard(&t, round + 2);
        let fault = format!("replica's packets to its primary dropped ({}, {id})", replicas[0]);
        windows.push(inject(&c, &load, fault, &t, round + 2, &[(replicas[0].clone(), primary)]).await?);
    }
    finish_with_windows(&c, load, &BTreeMap::new(), "partitions around replicas and the router", &windows).await
}
