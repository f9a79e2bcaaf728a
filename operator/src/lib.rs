//! The sharddb control plane: the `ShardedDatabase` resource and the platform-independent brain.

pub mod brain;
pub mod crd;
