//! The platform-independent brain: validate the spec, place replicas, build the topology
//! document, observe the servers, plan heals and failovers, and carry out placement changes
//! (`declare` turns the seed's admin verbs into spec changes, `moves` brings the topology to a
//! changed placement, `rollout` restarts outdated servers one at a time, `tuning` and
//! `pg_settings` check the knobs users set, `lease` keeps the primaries' read leases and holds
//! back a change of primary until the old one's has run out). Pure functions over validated types;
//! both bodies (Kubernetes, local) call them.

pub mod declare;
pub mod lease;
pub mod moves;
pub mod observe;
pub mod pg_settings;
pub mod placement;
pub mod plan;
pub mod rollout;
pub mod topology;
pub mod tuning;
pub mod validate;
