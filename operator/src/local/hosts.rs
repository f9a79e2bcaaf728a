//! Where local mode's processes listen and how they are reached: every one on 127.0.0.1 with a
//! port of its own (the default), or each in a network namespace of its own with an address on a
//! private switch (`--netns ID`, see [`super::netns`]), so that links between any two of them can
//! be cut. Does I/O (through `netns`).
//!
//! With namespaces, a process's whole view of the control plane goes over the switch: the router
//! and the shard servers follow the topology from the operator's admin endpoint (`GET /topology`,
//! a long poll) instead of the file, so a process cut off from the operator also stops learning
//! topology changes, as a pod cut off from the control plane would. The operator's own endpoint
//! listens on the switch's gateway address, which every namespace reaches.

use super::netns::{Attachment, NetnsError, Network};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The port every process listens on inside its own namespace (the seed's port): no two share an
/// address, so none can collide.
pub const NAMESPACED_PORT: u16 = 5000;

/// Where one process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub address: Ipv4Addr,
    /// Its network namespace, when it has one.
    pub netns: Option<Attachment>,
}

impl Place {
    pub fn loopback() -> Place {
        Place { address: Ipv4Addr::LOCALHOST, netns: None }
    }

    /// The file of its namespace, for the supervisor.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_ref().map(Attachment::path)
    }

    pub fn namespace(&self) -> Option<String> {
        self.netns.as_ref().map(|a| a.namespace.clone())
    }
}

/// `cluster.json`'s description of the switch, for whoever cuts links (see [`super::netns`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub id: String,
    pub subnet: String,
    /// The operator's (and the caller's) address on the switch.
    pub gateway: Ipv4Addr,
    /// Where every packet between two attachments is bridged: cut links there.
    pub switch_namespace: String,
}

/// How the processes of one local cluster are placed.
#[derive(Debug)]
pub enum Hosts {
    Loopback,
    Namespaces(Network),
}

impl Hosts {
    /// Loopback, or (with a network id) a new switch for this run.
    pub async fn new(netns: Option<&str>) -> Result<Hosts, NetnsError> {
        Ok(match netns {
            None => Hosts::Loopback,
            Some(id) => Hosts::Namespaces(Network::create(id).await?),
        })
    }

    pub fn namespaced(&self) -> bool {
        matches!(self, Hosts::Namespaces(_))
    }

    /// The address the operator's own endpoint listens on, reachable from every process.
    pub fn control_address(&self) -> Ipv4Addr {
        match self {
            Hosts::Loopback => Ipv4Addr::LOCALHOST,
            Hosts::Namespaces(net) => net.gateway(),
        }
    }

    /// The port a process listens on: its own pick on loopback, the common one in a namespace.
    pub fn port(
        &self,
        loopback_pick: impl FnOnce() -> Result<u16, super::LocalError>,
    ) -> Result<u16, super::LocalError> {
        match self {
            Hosts::Loopback => loopback_pick(),
            Hosts::Namespaces(_) => Ok(NAMESPACED_PORT),
        }
    }

    /// Where process `name` runs (the same place again for a name already placed).
    pub async fn place(&mut self, name: &str) -> Result<Place, NetnsError> {
        match self {
            Hosts::Loopback => Ok(Place::loopback()),
            Hosts::Namespaces(net) => {
                let a = net.attach(name).await?;
                Ok(Place { address: a.address, netns: Some(a) })
            }
        }
    }

    /// Gives up process `name`'s place (once it has stopped for good).
    pub async fn remove(&mut self, name: &str) {
        if let Hosts::Namespaces(net) = self {
            net.detach(name).await;
        }
    }

    pub async fn teardown(&mut self) {
        if let Hosts::Namespaces(net) = self {
            net.teardown().await;
        }
    }

    pub fn info(&self) -> Option<NetworkInfo> {
        match self {
            Hosts::Loopback => None,
            Hosts::Namespaces(net) => Some(NetworkInfo {
                id: net.id().to_owned(),
                subnet: net.subnet_text(),
                gateway: net.gateway(),
                switch_namespace: net.switch_namespace(),
            }),
        }
    }
}
