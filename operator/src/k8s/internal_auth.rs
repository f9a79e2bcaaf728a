//! A database's internal-authentication mode in Kubernetes, decided at every reconcile, and how
//! it is reported. Pure.
//!
//! The spec's `tls.internalAuth` wins when set. Otherwise a database that a release from before
//! internal authentication created (its server StatefulSets exist, and it has no `<name>-ca`
//! Secret, which this release makes before any StatefulSet) runs in `none`, so taking it over
//! rolls its pods once into plain HTTP, every pair of pods still able to talk, rather than into a
//! mix of TLS and plain pods that cannot. Every other database is `strict`.
//!
//! The decision is sticky by construction: `none` never makes the CA, so the next reconcile finds
//! the same inputs; and once `strict` has made the CA, the CA stays. A database whose status
//! already reports TLS (`strict` or `migrate`) never falls back to `none` when its CA Secret is
//! deleted (the documented way to replace the CA): the CA is made again instead, so deleting a
//! Secret can never turn authentication off. Climbing from `none` is the user's act (setting the
//! field), never the operator's.

use crate::crd::ConditionStatus;
use shard_server::tls::InternalAuth;

/// The status condition reporting the mode.
pub const INTERNAL_AUTH: &str = "InternalAuth";
/// The condition's reason in `none` (every replica's admin endpoint reads it).
pub const REASON_NONE: &str = "None";
const REASON_MIGRATE: &str = "Migrate";
const REASON_STRICT: &str = "Strict";

/// What the reconcile found of the database before deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its CA exists: `<name>-ca`, or the spec names a CA Secret of the user's.
    pub ca: bool,
    /// Some server StatefulSet of it exists.
    pub servers: bool,
    /// Its status already reports a mode with TLS (`strict` or `migrate`).
    pub was_tls: bool,
}

/// Whether `reason` (of the `InternalAuth` condition) names a mode with TLS.
pub fn reason_is_tls(reason: &str) -> bool {
    [REASON_STRICT, REASON_MIGRATE].contains(&reason)
}

/// The mode the database runs in (see the module's doc).
pub fn decide(spec: Option<InternalAuth>, found: Found) -> InternalAuth {
    match spec {
        Some(mode) => mode,
        None if found.servers && !found.ca && !found.was_tls => InternalAuth::None,
        None => InternalAuth::Strict,
    }
}

/// The condition's status, reason and message for `mode`; `set` says whether the spec chose it.
pub fn condition(mode: InternalAuth, set: bool) -> (ConditionStatus, &'static str, String) {
    let why = if set {
        "spec.tls.internalAuth"
    } else {
        "taken over from a release before internal authentication (no CA Secret, servers already running)"
    };
    match mode {
        InternalAuth::Strict => (
            ConditionStatus::True,
            REASON_STRICT,
            "mutual TLS between the database's components; nothing else is accepted".into(),
        ),
        InternalAuth::Migrate => (
            ConditionStatus::False,
            REASON_MIGRATE,
            format!(
                "servers also accept plain HTTP from anyone ({why}); set spec.tls.internalAuth: strict once \
                 sharddb_plain_internal_requests_total stays at zero"
            ),
        ),
        InternalAuth::None => (
            ConditionStatus::False,
            REASON_NONE,
            format!(
                "internal traffic is plain HTTP and anyone who reaches a server is accepted ({why}); \
                 set spec.tls.internalAuth: strict to turn on mutual TLS (rolls every pod; see the README)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: Found = Found { ca: false, servers: false, was_tls: false };
    const PREVIOUS_RELEASE: Found = Found { ca: false, servers: true, was_tls: false };
    const THIS_RELEASE: Found = Found { ca: true, servers: true, was_tls: true };

    #[test]
    fn the_spec_wins_whatever_exists() {
        for found in [NEW, PREVIOUS_RELEASE, THIS_RELEASE, Found { ca: true, servers: false, was_tls: false }] {
            for mode in [InternalAuth::None, InternalAuth::Migrate, InternalAuth::Strict] {
                assert_eq!(decide(Some(mode), found), mode, "{found:?}");
            }
        }
    }

    #[test]
    fn unset_only_a_database_with_servers_and_no_ca_runs_plain() {
        assert_eq!(decide(None, PREVIOUS_RELEASE), InternalAuth::None);
        assert_eq!(decide(None, NEW), InternalAuth::Strict, "a new database is strict from its first pod");
        assert_eq!(decide(None, THIS_RELEASE), InternalAuth::Strict);
        // The CA is made before the first StatefulSet: a reconcile interrupted between the two
        // leaves a CA and no servers, which is this release's database.
        assert_eq!(decide(None, Found { ca: true, servers: false, was_tls: false }), InternalAuth::Strict);
    }

    #[test]
    fn deleting_the_ca_of_a_tls_database_never_turns_authentication_off() {
        let ca_deleted = Found { ca: false, ..THIS_RELEASE };
        assert_eq!(decide(None, ca_deleted), InternalAuth::Strict, "the CA is made again");
    }

    #[test]
    fn strict_is_true_and_the_others_name_their_mode_and_the_way_out() {
        assert_eq!(condition(InternalAuth::Strict, false).0, ConditionStatus::True);
        let (status, reason, message) = condition(InternalAuth::None, false);
        assert_eq!((status, reason), (ConditionStatus::False, "None"));
        assert!(message.contains("taken over") && message.contains("spec.tls.internalAuth: strict"), "{message}");
        let (status, reason, message) = condition(InternalAuth::Migrate, true);
        assert_eq!((status, reason), (ConditionStatus::False, "Migrate"));
        assert!(message.contains("(spec.tls.internalAuth)"), "{message}");
    }
}
