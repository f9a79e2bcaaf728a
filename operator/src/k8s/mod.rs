//! The Kubernetes body: pure builders of the child objects, server-side apply, status, and the
//! controller that drives them.

pub mod admin;
pub mod apply;
pub mod build;
pub mod controller;
pub mod heal;
pub mod identities;
pub mod internal_auth;
pub mod leader;
pub mod pki;
pub mod process;
pub mod rollout;
pub mod status;
pub mod topology;
pub mod workloads;
