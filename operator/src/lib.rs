//! The sharddb control plane: the `ShardedDatabase` resource, the platform-independent brain, and
//! the bodies that carry its decisions out: local processes, and Kubernetes.

pub mod admin;
pub mod brain;
pub mod crd;
pub mod exec;
pub mod k8s;
pub mod local;
