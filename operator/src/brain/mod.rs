//! The platform-independent brain: validate the spec, place replicas, build the topology
//! document, observe the servers and plan heals and failovers. Pure functions over validated types;
//! both bodies (Kubernetes, local) call them.

pub mod observe;
pub mod placement;
pub mod plan;
pub mod topology;
pub mod validate;
