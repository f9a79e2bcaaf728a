//! Network namespaces of a test run and the links cut between them. The local mode with `--netns
//! ID` puts the router and every shard server in a network namespace of its own on a switch (see
//! the operator's `local::netns`); this module names a run uniquely, deletes whatever the run
//! leaves behind, and cuts links: nftables rules (bridge family) in the switch's namespace that
//! drop the packets of one address to another, silently, as a real partition would (both ends see
//! timeouts, not errors). Needs root, `ip` (iproute2) and `nft` (nftables). Does I/O.
//!
//! The operator, every Postgres and this test process share the caller's namespace and its one
//! address on the switch (`gateway`), so cutting a process from the operator also cuts it from the
//! test process (which only talks to the router while a cut lasts).

use crate::ClusterFile;
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The name the operator and everything else in this test process's namespace go by.
pub const OPERATOR: &str = "operator";

/// The nftables table and chain (bridge family) the cuts go in.
const TABLE: &str = "sharddb";
const CHAIN: &str = "cuts";

/// Checks that this machine can run the partition suites: root, `ip` and `nft`. Where it cannot,
/// the suite fails, naming what is missing: a skip would pass for a run, and the partitions are
/// the faults a production network brings most often.
pub fn runnable() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the partition suite cannot run: network namespaces need root (run the tests as root, as CI does)");
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!(
                "the partition suite cannot run: `{tool}` is not installed (Debian packages iproute2 and nftables; \
                 .ci/run installs them)"
            );
        }
    }
    Ok(())
}

/// The namespaces of one run: a unique id for `--netns`, and on drop the deletion of every
/// namespace named after it (the local mode deletes them when it stops cleanly; this catches a run
/// that was killed).
#[derive(Debug)]
pub struct Namespaces {
    id: String,
}

impl Namespaces {
    pub fn new() -> Result<Namespaces> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let id = format!("t{}x{}", base36(std::process::id()), base36(RUNS.fetch_add(1, Ordering::Relaxed)));
        ensure!(id.len() <= 10, "network id {id} is too long");
        Ok(Namespaces { id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        let prefix = format!("{}-", self.id);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(&prefix)) {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
            }
        }
    }
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).expect("a digit"));
        n /= 36;
        if n == 0 {
            return digits.into_iter().rev().collect();
        }
    }
}

/// The switch of a cluster started in namespaces.
#[derive(Clone, Debug)]
pub struct Switch {
    namespace: String,
    /// Every party's address: the processes by name, and [`OPERATOR`].
    addresses: BTreeMap<String, Ipv4Addr>,
}

impl Switch {
    pub fn of(file: &ClusterFile) -> Result<Switch> {
        let net = file.network.as_ref().context("this cluster does not run in network namespaces")?;
        let mut addresses =
            BTreeMap::from([(OPERATOR.to_owned(), net.gateway), ("router".to_owned(), host(&file.router.url)?)]);
        for s in &file.servers {
            addresses.insert(s.name.clone(), host(&s.url)?);
        }
        Ok(Switch { namespace: net.switch_namespace.clone(), addresses })
    }

    pub fn address(&self, party: &str) -> Result<Ipv4Addr> {
        self.addresses.get(party).copied().with_context(|| format!("no party {party} on the switch"))
    }

    /// Drops every packet `from` sends to `to` (one way).
    pub fn cut(&self, from: &str, to: &str) -> Result<()> {
        let (a, b) = (self.address(from)?, self.address(to)?);
        self.nft(&format!(
            "add table bridge {TABLE}\n\
             add chain bridge {TABLE} {CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n\
             add rule bridge {TABLE} {CHAIN} ip saddr {a} ip daddr {b} drop comment \"{from} to {to}\"\n"
        ))
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn isolate(&self, a: &str, b: &str) -> Result<()> {
        self.cut(a, b)?;
        self.cut(b, a)
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<()> {
        self.nft(&format!(
            "add table bridge {TABLE}\n\
             add chain bridge {TABLE} {CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n\
             flush chain bridge {TABLE} {CHAIN}\n"
        ))
    }

    /// The cuts in place, as nftables lists them.
    pub fn cuts(&self) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "nft", "list", "table", "bridge", TABLE])
            .output()
            .context("running nft")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nft(&self, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft in the switch's namespace")?;
        child.stdin.take().context("nft's stdin")?.write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "nft failed on\n{script}{}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

/// The IPv4 host of `https://a.b.c.d:port` (or `http://`).
fn host(url: &str) -> Result<Ipv4Addr> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .with_context(|| format!("{url} is not an http(s) URL"))?;
    let host = rest.split([':', '/']).next().unwrap_or_default();
    host.parse().with_context(|| format!("{url} names no IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_distinct() {
        let (a, b) = (Namespaces::new().unwrap(), Namespaces::new().unwrap());
        assert_ne!(a.id(), b.id());
        assert!(
            a.id().len() <= 10 && a.id().bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{}",
            a.id()
        );
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36 * 36 + 35), "10z");
    }

    #[test]
    fn hosts_come_from_urls() {
        assert_eq!(host("http://10.1.2.3:5000").unwrap(), Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(host("http://10.1.2.3/x").unwrap(), Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(host("https://10.1.2.3:5000").unwrap(), Ipv4Addr::new(10, 1, 2, 3));
        assert!(host("http://localhost:5000").is_err());
        assert!(host("10.1.2.3:5000").is_err());
    }
}
