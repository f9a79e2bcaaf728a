//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas only
//! one reconciles at a time. Does I/O (reads and writes the Lease).
//!
//! The protocol is client-go's, reduced to what we need:
//! - A contender reads the Lease. It may take it when it is absent (create), has no holder, or its
//!   `renewTime + leaseDurationSeconds` has passed; the holder itself renews it.
//! - Every write is a `replace` carrying the `resourceVersion` that was read (or a `create`), so
//!   of two contenders that read the same Lease only one write succeeds; the other gets 409
//!   Conflict (or AlreadyExists) and has lost this round.
//! - The holder renews every `retry_period`. If it cannot renew for `renew_deadline` (shorter than
//!   the lease duration, so it stops before anyone else may take over), or it sees another holder,
//!   it has lost leadership and must stop acting at once; the caller exits so Kubernetes restarts
//!   it as a follower.
//!
//! Expiry is judged by this process's clock against the `renewTime` written by the holder's, so
//! clocks must agree to well within `lease_duration - renew_deadline` (NTP easily does).

use super::controller::error_chain;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::time::Instant;

/// Where the Lease is and how it is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Who we are in `holderIdentity`: unique per replica (the pod name).
    pub identity: String,
    /// How long a Lease stays ours after a renewal (`leaseDurationSeconds`, whole seconds).
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before giving up; less than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews and a follower retries.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, retry every 2 s.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to {verb} Lease {namespace}/{name}")]
    Api {
        verb: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Why a holder stopped being the leader.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeadershipLost {
    #[error("Lease taken over by {0}")]
    TakenOver(String),
    #[error("could not renew the Lease within the renew deadline")]
    RenewDeadline,
}

/// The outcome of one attempt to acquire or renew.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease until at least `lease_duration` from now.
    Held,
    /// Someone else holds an unexpired Lease.
    HeldBy(String),
    /// Another writer got there between our read and our write; try again.
    Conflict,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaderElector { api: Api::namespaced(client, &config.namespace), config }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Waits until this replica holds the Lease, retrying every `retry_period`. Transient API
    /// errors are logged and retried; it never gives up (cancel it to stop waiting).
    pub async fn acquire(&self) {
        let mut last_holder = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "acquired the Lease");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.config.name, %holder, "waiting: another replica leads");
                        last_holder = Some(holder);
                    }
                }
                Ok(Attempt::Conflict) => tracing::debug!("lost a race for the Lease; retrying"),
                Err(error) => tracing::warn!(error = %error_chain(&error), "cannot acquire the Lease; retrying"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the Lease every `retry_period` while we hold it; returns once leadership is lost.
    /// Call after [`Self::acquire`]. Conflicts and API errors are retried until `renew_deadline`
    /// after the last successful renewal; seeing another holder ends leadership at once.
    pub async fn hold(&self) -> LeadershipLost {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => renewed = Instant::now(),
                Ok(Attempt::HeldBy(holder)) => return LeadershipLost::TakenOver(holder),
                Ok(Attempt::Conflict) => tracing::warn!("conflict renewing the Lease; retrying"),
                Err(error) => tracing::warn!(error = %error_chain(&error), "cannot renew the Lease; retrying"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                return LeadershipLost::RenewDeadline;
            }
        }
    }

    /// Gives the Lease up, if we still hold it, by clearing the holder and expiring it, so a
    /// follower takes over without waiting out the lease duration. Call only after this replica
    /// stopped acting.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await.map_err(|e| self.error("read", e))? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Someone wrote it since we read it: it is no longer ours to release.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(self.error("release", e)),
        }
    }

    /// One read and at most one write: create the Lease, take it over, or renew it.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await.map_err(|e| self.error("read", e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.claim(LeaseSpec::default(), now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(Attempt::Conflict),
                Err(e) => Err(self.error("create", e)),
            };
        };
        let spec = lease.spec.take().unwrap_or_default();
        if let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty())
            && holder != self.config.identity
            && !expired(&spec, now)
        {
            return Ok(Attempt::HeldBy(holder.to_owned()));
        }
        lease.spec = Some(self.claim(spec, now));
        // `lease.metadata.resourceVersion` is the one read above: if anyone wrote the Lease since,
        // the server refuses this write with 409, which is what keeps two contenders from both
        // winning.
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Conflict),
            Err(e) => Err(self.error("update", e)),
        }
    }

    /// `spec` as written by us holding it from `now`: a takeover counts a transition and sets
    /// the acquire time; a renewal only moves the renew time.
    fn claim(&self, mut spec: LeaseSpec, now: Timestamp) -> LeaseSpec {
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            spec.lease_transitions = Some(spec.lease_transitions.map_or(0, |t| t.saturating_add(1)));
            spec.acquire_time = Some(MicroTime(now));
            spec.holder_identity = Some(self.config.identity.clone());
        }
        spec.lease_duration_seconds = Some(self.config.lease_duration.as_secs().clamp(1, i32::MAX as u64) as i32);
        spec.renew_time = Some(MicroTime(now));
        spec
    }

    fn error(&self, verb: &'static str, source: kube::Error) -> LeaderError {
        LeaderError::Api { verb, namespace: self.config.namespace.clone(), name: self.config.name.clone(), source }
    }
}

/// Whether a Lease's holder has failed to renew in time. A Lease without a renew time or
/// duration is treated as expired: nobody can be relying on it.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let (Some(renewed), Some(seconds)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds) else {
        return true;
    };
    renewed.0.checked_add(SignedDuration::from_secs(seconds.into())).is_ok_and(|until| until <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some("a".into()),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_expires_lease_duration_after_its_renewal() {
        let now = Timestamp::now();
        assert!(!expired(&spec(5, 15), now));
        assert!(expired(&spec(16, 15), now));
        assert!(expired(&LeaseSpec::default(), now));
    }
}
