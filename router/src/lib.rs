//! sharddb router: the stateless HTTP front door speaking the seed load-balancer API. Routes each
//! key to its shard by range, sends writes to the shard's primary, reads from a ready replica
//! chosen by a consistent-hash ring, and follows topology changes without restart.

pub mod batch;
pub mod config;
pub mod error;
pub mod ring;
pub mod routing;
