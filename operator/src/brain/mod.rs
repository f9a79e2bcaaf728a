//! The platform-independent brain: validate the spec, place replicas, build the topology
//! document. Pure functions over validated types; both bodies (Kubernetes, local) call them.

pub mod placement;
pub mod topology;
pub mod validate;
