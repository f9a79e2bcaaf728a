//! Network namespaces for local mode (`--netns ID`): every process gets its own network stack and
//! address on a private switch, so that a test (or a person) can cut links between any two of them
//! without touching the rest of the machine. Names and addresses are pure functions below; the
//! rest runs `ip` (iproute2) and does I/O. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
//!
//! Layout for a run named `ID` (1 to 10 lowercase letters and digits, unique on the machine):
//! ```text
//! namespace ID-net        the switch: bridge br0, one port per attached process, and one port
//!                         (`host`) whose peer `IDh` is in the caller's namespace with 10.A.B.1/24
//! namespace ID-router     the router: eth0 with 10.A.B.n/24, plus its own loopback
//! namespace ID-Server0    a shard server, likewise (one namespace per server)
//! ```
//! `10.A.B.0/24` is chosen free among the caller's routes (starting from a hash of `ID`, so
//! concurrent runs rarely even probe the same subnet). The operator, each server's Postgres and
//! whoever started local mode stay in the caller's namespace and reach everything through
//! `10.A.B.1`; a shard server reaches its own Postgres through a Unix socket, as containers of one
//! pod share a volume, so no cut ever separates a server from its database.
//!
//! Links are cut in the switch namespace, where every packet between two attachments is bridged:
//! a rule in nftables' bridge family there (`ip saddr X ip daddr Y drop`) drops X's packets to Y
//! silently, so both ends see timeouts, as in a real partition. Nothing here installs such rules;
//! `cluster.json` names the switch namespace and each attachment's address for whoever does.
//!
//! Teardown deletes the namespaces (the interfaces in them go with them). A run killed outright
//! leaves them behind; they all start with `ID-`, so its caller can delete them by that prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The switch's bridge, inside the switch namespace.
const BRIDGE: &str = "br0";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network id {0:?} must be 1 to 10 lowercase ASCII letters and digits")]
    BadId(String),
    #[error("process name {0:?} cannot name a network namespace (letters, digits, '-' and '_' only)")]
    BadName(String),
    #[error("network namespaces need root: run local mode as root, or without --netns")]
    NotRoot,
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("no free 10.x.y.0/24 subnet among this machine's routes")]
    NoSubnet,
    #[error("every address of {0}.0/24 is taken")]
    Full(String),
}

/// Checks a network id: short enough that `IDh` fits an interface name (15 bytes).
pub fn check_id(id: &str) -> Result<(), NetnsError> {
    let ok = (1..=10).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok { Ok(()) } else { Err(NetnsError::BadId(id.to_owned())) }
}

/// The switch namespace of run `id`.
pub fn switch_namespace(id: &str) -> String {
    format!("{id}-net")
}

/// The namespace of process `name` in run `id`.
pub fn process_namespace(id: &str, name: &str) -> String {
    format!("{id}-{name}")
}

/// The caller's end of the link to the switch.
pub fn host_link(id: &str) -> String {
    format!("{id}h")
}

/// An IPv4 prefix, for telling whether a subnet is free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    /// `a.b.c.d/n` or a bare address (a /32); anything else (`default`, IPv6) is `None`.
    pub fn parse(text: &str) -> Option<Prefix> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a.parse().ok()?, l.parse().ok().filter(|l| *l <= 32)?),
            None => (text.parse().ok()?, 32),
        };
        Some(Prefix { addr, len })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
    }

    pub fn overlaps(&self, other: &Prefix) -> bool {
        let mask = Prefix::mask(self.len.min(other.len));
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }
}

/// The first `10.A.B.0/24` (A in 100..=199) overlapping none of `used`, starting from a hash of
/// `id` and going round.
pub fn pick_subnet(id: &str, used: &[Prefix]) -> Option<(u8, u8)> {
    let start = id.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193)) % (100 * 256);
    (0..100 * 256).map(|i| (start + i) % (100 * 256)).map(|n| (100 + (n / 256) as u8, (n % 256) as u8)).find(
        |&(a, b)| {
            let candidate = Prefix { addr: Ipv4Addr::new(10, a, b, 0), len: 24 };
            !used.iter().any(|u| u.overlaps(&candidate))
        },
    )
}

/// The destinations of `ip -4 route show` output (its first word per line).
pub fn route_prefixes(output: &str) -> Vec<Prefix> {
    output.lines().filter_map(|l| l.split_whitespace().next()).filter_map(Prefix::parse).collect()
}

/// One process's place on the switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub namespace: String,
    pub address: Ipv4Addr,
    /// The switch's port for it.
    port: String,
}

impl Attachment {
    /// The namespace's file, for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.namespace)
    }
}

/// The switch of one run and the processes attached to it.
#[derive(Debug)]
pub struct Network {
    id: String,
    subnet: (u8, u8),
    attached: BTreeMap<String, Attachment>,
    /// Host numbers handed out, never reused within a run: an old topology naming a removed
    /// server's address can then never reach another server.
    next_host: u8,
    namespaces: BTreeSet<String>,
}

impl Network {
    /// Creates the switch namespace with its bridge and links it to the caller's namespace.
    pub async fn create(id: &str) -> Result<Network, NetnsError> {
        check_id(id)?;
        if !nix::unistd::geteuid().is_root() {
            return Err(NetnsError::NotRoot);
        }
        let routes = ip(&["-4", "route", "show", "table", "all"]).await?;
        let subnet = pick_subnet(id, &route_prefixes(&routes)).ok_or(NetnsError::NoSubnet)?;
        let mut net =
            Network { id: id.to_owned(), subnet, attached: BTreeMap::new(), next_host: 2, namespaces: BTreeSet::new() };
        let switch = switch_namespace(id);
        let host = host_link(id);
        if let Err(e) = net.build_switch(&switch, &host).await {
            net.teardown().await;
            return Err(e);
        }
        tracing::info!(id, subnet = %net.subnet_text(), namespace = %switch, "network created");
        Ok(net)
    }

    async fn build_switch(&mut self, switch: &str, host: &str) -> Result<(), NetnsError> {
        self.add_namespace(switch).await?;
        ip(&["-n", switch, "link", "add", BRIDGE, "type", "bridge"]).await?;
        ip(&["-n", switch, "link", "set", BRIDGE, "up"]).await?;
        ip(&["link", "add", host, "type", "veth", "peer", "name", "host", "netns", switch]).await?;
        ip(&["-n", switch, "link", "set", "host", "master", BRIDGE, "up"]).await?;
        let gateway = format!("{}/24", self.gateway());
        ip(&["addr", "add", &gateway, "dev", host]).await?;
        ip(&["link", "set", host, "up"]).await?;
        Ok(())
    }

    async fn add_namespace(&mut self, name: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", name]).await?;
        self.namespaces.insert(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]).await?;
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The caller's address on the switch (`10.A.B.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 1)
    }

    pub fn subnet_text(&self) -> String {
        format!("10.{}.{}.0/24", self.subnet.0, self.subnet.1)
    }

    pub fn switch_namespace(&self) -> String {
        switch_namespace(&self.id)
    }

    pub fn attachment(&self, name: &str) -> Option<&Attachment> {
        self.attached.get(name)
    }

    /// Gives process `name` its namespace and address (the same ones again if it has them).
    pub async fn attach(&mut self, name: &str) -> Result<Attachment, NetnsError> {
        if let Some(a) = self.attached.get(name) {
            return Ok(a.clone());
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(NetnsError::BadName(name.to_owned()));
        }
        if self.next_host == 255 {
            return Err(NetnsError::Full(format!("10.{}.{}", self.subnet.0, self.subnet.1)));
        }
        let host = self.next_host;
        self.next_host += 1;
        let namespace = process_namespace(&self.id, name);
        let address = Ipv4Addr::new(10, self.subnet.0, self.subnet.1, host);
        let port = format!("p{host}");
        let switch = self.switch_namespace();
        self.add_namespace(&namespace).await?;
        let cidr = format!("{address}/24");
        let steps: [&[&str]; 4] = [
            &["-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &namespace],
            &["-n", &switch, "link", "set", &port, "master", BRIDGE, "up"],
            &["-n", &namespace, "addr", "add", &cidr, "dev", "eth0"],
            &["-n", &namespace, "link", "set", "eth0", "up"],
        ];
        for args in steps {
            if let Err(e) = ip(args).await {
                self.delete_namespace(&namespace).await;
                return Err(e);
            }
        }
        let attachment = Attachment { namespace, address, port };
        tracing::info!(process = name, namespace = %attachment.namespace, %address, "attached to the network");
        self.attached.insert(name.to_owned(), attachment.clone());
        Ok(attachment)
    }

    /// Deletes process `name`'s namespace (once its processes have stopped).
    pub async fn detach(&mut self, name: &str) {
        if let Some(a) = self.attached.remove(name) {
            self.delete_namespace(&a.namespace).await;
        }
    }

    async fn delete_namespace(&mut self, name: &str) {
        if let Err(e) = ip(&["netns", "delete", name]).await {
            tracing::warn!(namespace = name, error = %e, "cannot delete a network namespace");
        }
        self.namespaces.remove(name);
    }

    /// Deletes every namespace this network made, the switch last.
    pub async fn teardown(&mut self) {
        self.attached.clear();
        let switch = self.switch_namespace();
        let names: Vec<String> = self.namespaces.iter().filter(|n| **n != switch).cloned().collect();
        for n in names {
            self.delete_namespace(&n).await;
        }
        if self.namespaces.contains(&switch) {
            self.delete_namespace(&switch).await;
        }
        tracing::info!(id = %self.id, "network removed");
    }
}

/// Runs `ip ARGS`; fails with its stderr.
async fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = tokio::process::Command::new("ip").args(args).output().await.map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_fit_interface_and_namespace_names() {
        for good in ["a", "sdbt1a2b3c", "0"] {
            check_id(good).unwrap();
            assert!(host_link(good).len() <= 15, "interface names are at most 15 bytes");
        }
        for bad in ["", "ABC", "a-b", "abcdefghijk", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(switch_namespace("x1"), "x1-net");
        assert_eq!(process_namespace("x1", "Server0"), "x1-Server0");
        assert_eq!(host_link("x1"), "x1h");
    }

    #[test]
    fn prefixes_parse_and_overlap() {
        let p = |s| Prefix::parse(s).unwrap();
        assert_eq!(Prefix::parse("default"), None);
        assert_eq!(Prefix::parse("fe80::/64"), None);
        assert_eq!(p("10.1.2.3"), Prefix { addr: Ipv4Addr::new(10, 1, 2, 3), len: 32 });
        assert!(p("10.0.0.0/8").overlaps(&p("10.150.3.0/24")));
        assert!(p("10.150.3.0/24").overlaps(&p("10.0.0.0/8")));
        assert!(p("10.150.3.7").overlaps(&p("10.150.3.0/24")));
        assert!(!p("10.150.4.0/24").overlaps(&p("10.150.3.0/24")));
        assert!(p("0.0.0.0/0").overlaps(&p("192.168.1.0/24")));
    }

    #[test]
    fn a_subnet_is_picked_clear_of_every_route() {
        let routes = "default via 172.17.0.1 dev eth0\n172.17.0.0/16 dev eth0 proto kernel scope link src 172.17.0.2\n\
                      local 127.0.0.1 dev lo table local\nbroadcast 10.255.255.255 dev x\n";
        let used = route_prefixes(routes);
        assert_eq!(used.len(), 1, "only plain destinations count: {used:?}");
        let (a, b) = pick_subnet("sdbt1", &used).unwrap();
        assert!((100..=199).contains(&a));
        assert_eq!(pick_subnet("sdbt1", &used), Some((a, b)), "deterministic");
        // Taken: the next one round.
        let taken = Prefix { addr: Ipv4Addr::new(10, a, b, 0), len: 24 };
        let next = pick_subnet("sdbt1", &[taken]).unwrap();
        assert_ne!(next, (a, b));
        // A route covering the whole range leaves nothing.
        assert_eq!(pick_subnet("sdbt1", &[Prefix { addr: Ipv4Addr::new(10, 0, 0, 0), len: 8 }]), None);
    }
}
