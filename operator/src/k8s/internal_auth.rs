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
//! Secret can never turn authentication off. Leaving `none` is the user's act (setting the
//! field), never the operator's.
//!
//! # The climb between modes
//! Every component dials a server by the scheme of its URL in the topology document, and a pod in
//! `migrate` serves TLS and plain HTTP on one port. So a database moves between `none` and
//! `strict` without any pair of pods losing each other, in three rungs that [`climb`] decides
//! from what the cluster shows (the mode the pod templates carry, whether every pod runs them,
//! the document's scheme, whether every server follows the document):
//! 1. **Serve both**: templates `migrate`, URLs unchanged. Every pod rolls (the drained,
//!    one-at-a-time rolling restart) into a pod that serves both and still dials by the old
//!    scheme, which every pod, rolled or not, serves.
//! 2. **Redial**: once every server pod and the routers run the `migrate` template, the document
//!    lists the servers in the wanted scheme (the healer writes it at the next epoch) and the
//!    operator dials that scheme too; every pod still serves both.
//! 3. **Final**: once every server follows that document, and has for [`ROUTER_GRACE`] (routers
//!    watch the same ConfigMap but are not probed: the grace is how long a router's watch is
//!    given to deliver it), the templates take the wanted mode and every pod rolls again.
//!
//! A wanted `migrate` stops after rung 2. Going down (`strict` to `none`) is the mirror image:
//! `migrate` with `https://`, then `http://`, then `none`. Every decision is taken again from the
//! cluster at each reconcile, so a new operator (or leader) carries on where the last one was.

use crate::crd::ConditionStatus;
use k8s_openapi::api::core::v1::PodSpec;
use shard_server::tls::InternalAuth;
use std::time::Duration;

/// How long every server must have followed the document with the wanted scheme before the last
/// rung rolls the pods out of serving both (see the module's doc).
pub const ROUTER_GRACE: Duration = Duration::from_secs(10);

/// The status condition reporting the mode.
pub const INTERNAL_AUTH: &str = "InternalAuth";
/// The condition's reason in `none` (every replica's admin endpoint reads it).
pub const REASON_NONE: &str = "None";
const REASON_MIGRATE: &str = "Migrate";
const REASON_STRICT: &str = "Strict";
/// The condition's reason while the database climbs between modes.
pub const REASON_CLIMBING: &str = "Climbing";

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

/// Whether `reason` (of the `InternalAuth` condition) names a mode with TLS (a climb has made
/// the CA, whichever way it goes).
pub fn reason_is_tls(reason: &str) -> bool {
    [REASON_STRICT, REASON_MIGRATE, REASON_CLIMBING].contains(&reason)
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

/// The mode a pod template's shard-server or router container (the first) runs in: its
/// `SHARDDB_INTERNAL_AUTH`, else `strict` when it is given a certificate directory (`--tls-dir`)
/// and `none` when not (a release from before internal authentication).
pub fn template_mode(pod: &PodSpec) -> InternalAuth {
    let Some(container) = pod.containers.first() else { return InternalAuth::None };
    let env = container.env.iter().flatten().find(|e| e.name == "SHARDDB_INTERNAL_AUTH");
    match env.and_then(|e| e.value.as_deref()) {
        Some("none") => InternalAuth::None,
        Some("migrate") => InternalAuth::Migrate,
        Some(_) => InternalAuth::Strict,
        None if container.args.iter().flatten().any(|a| a == "--tls-dir") => InternalAuth::Strict,
        None => InternalAuth::None,
    }
}

/// What the cluster shows of a database, for [`climb`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The mode of each workload's current template (every server StatefulSet and the router
    /// Deployment); empty for a database with none yet.
    pub templates: Vec<InternalAuth>,
    /// Every server pod and every router runs its workload's current template (and the copies a
    /// restart took out of service are back).
    pub rolled: bool,
    /// The document's scheme: `Some(true)` when it lists its servers at `http://` URLs; `None`
    /// before the first document.
    pub plain_urls: Option<bool>,
    /// Every server has followed the document (its current epoch) for [`ROUTER_GRACE`].
    pub followed: bool,
    /// The status reports a climb in progress.
    pub climbing: bool,
}

/// Where a climb is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rung {
    /// 1: every pod rolls to serve both; the old scheme is still dialled.
    ServeBoth,
    /// 2: every pod serves both; the wanted scheme is listed and dialled, and the servers and
    /// routers are given time to follow it.
    Redial,
    /// 3: every pod rolls to the wanted mode.
    Final,
}

impl Rung {
    /// The action of its Event.
    pub fn action(self) -> &'static str {
        match self {
            Rung::ServeBoth => "ServeBoth",
            Rung::Redial => "Redial",
            Rung::Final => "Final",
        }
    }
}

/// What the reconcile applies now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Climb {
    /// The mode the server and router templates get.
    pub template: InternalAuth,
    /// Whether the document lists the servers at `http://` URLs, which is what the operator dials.
    pub plain_urls: bool,
    /// `None` once the database runs in the wanted mode.
    pub rung: Option<Rung>,
}

/// The next step toward `wanted` from what is `seen` (see the module's doc). Pure.
pub fn climb(wanted: InternalAuth, seen: &Seen) -> Climb {
    let want_plain = wanted == InternalAuth::None;
    let settled = Climb { template: wanted, plain_urls: want_plain, rung: None };
    // A new database starts in the wanted mode; so do workloads under a document not written yet.
    let (Some(plain_urls), Some(first)) = (seen.plain_urls, seen.templates.first().copied()) else {
        return settled;
    };
    let template = seen.templates.iter().all(|m| *m == first).then_some(first);
    // Every pod serves both: mixed templates are not.
    let serve_both = template == Some(InternalAuth::Migrate) && seen.rolled;
    if plain_urls != want_plain {
        return match serve_both {
            true => Climb { template: InternalAuth::Migrate, plain_urls: want_plain, rung: Some(Rung::Redial) },
            false => Climb { template: InternalAuth::Migrate, plain_urls, rung: Some(Rung::ServeBoth) },
        };
    }
    if template == Some(wanted) {
        // In the wanted mode; the last roll into it is part of the climb.
        let last = if wanted == InternalAuth::Migrate { Rung::ServeBoth } else { Rung::Final };
        let rung = (seen.climbing && !seen.rolled).then_some(last);
        return Climb { rung, ..settled };
    }
    if wanted == InternalAuth::Migrate {
        // The URLs are already `https://`: rolling into serving both is all there is to do.
        return Climb { rung: Some(Rung::ServeBoth), ..settled };
    }
    if serve_both && seen.followed {
        return Climb { rung: Some(Rung::Final), ..settled };
    }
    // Not every pod serves both yet (say, an interrupted climb left pods in the other mode), or
    // not every server follows the document yet.
    let rung = if serve_both { Rung::Redial } else { Rung::ServeBoth };
    Climb { template: InternalAuth::Migrate, plain_urls, rung: Some(rung) }
}

/// The message of the `InternalAuth` condition while climbing to `wanted`.
pub fn climbing_message(wanted: InternalAuth, rung: Rung) -> String {
    let (total, plain) = match wanted {
        InternalAuth::Migrate => (2, false),
        mode => (3, mode == InternalAuth::None),
    };
    let (old, new) =
        if plain { ("TLS (https://)", "plain HTTP (http://)") } else { ("plain HTTP (http://)", "TLS (https://)") };
    let what = match rung {
        Rung::ServeBoth => format!(
            "rung 1 of {total}: rolling every pod to serve TLS and plain HTTP (migrate) while servers are still \
             dialled over {old}"
        ),
        Rung::Redial => format!(
            "rung 2 of {total}: every pod serves both; servers are listed and dialled over {new}, waiting for every \
             server and router to follow"
        ),
        Rung::Final => format!("rung 3 of {total}: rolling every pod to {}", wanted.as_str()),
    };
    format!("climbing to internal-auth {}: {what}", wanted.as_str())
}

/// What the `InternalAuth` condition says, and whether it calls for an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub status: ConditionStatus,
    pub reason: &'static str,
    pub message: String,
    /// The action of the Event to publish (`None`: nothing changed); the Event is a warning
    /// when `warn`.
    pub event: Option<&'static str>,
    pub warn: bool,
}

/// The condition for a database in `mode` (`set`: the spec chose it), at `rung` of a climb if
/// it climbs, against the condition last written (`previous`: its reason and message). An Event
/// for each change of mode and for each rung; a mode short of `strict` is a warning. Pure.
pub fn report(mode: InternalAuth, set: bool, rung: Option<Rung>, previous: Option<(&str, &str)>) -> Report {
    let (status, reason, message) = match rung {
        Some(rung) => (ConditionStatus::False, REASON_CLIMBING, climbing_message(mode, rung)),
        None => condition(mode, set),
    };
    let changed = previous.is_none_or(|(r, m)| r != reason || (rung.is_some() && m != message));
    // The recorder folds Events of one reason and action into the first: each rung has its own.
    let event = changed.then(|| rung.map_or("Reconcile", Rung::action));
    let warn = mode != InternalAuth::Strict && rung.is_none();
    Report { status, reason, message, event, warn }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_calls_for_an_event_at_each_change_of_mode_and_each_rung() {
        let first = report(InternalAuth::Strict, false, None, None);
        assert_eq!(
            (first.status, first.reason, first.event, first.warn),
            (ConditionStatus::True, "Strict", Some("Reconcile"), false)
        );
        let again = report(InternalAuth::Strict, false, None, Some((first.reason, &first.message)));
        assert_eq!(again.event, None, "nothing changed");
        let none = report(InternalAuth::None, true, None, Some((first.reason, &first.message)));
        assert_eq!((none.reason, none.event, none.warn), ("None", Some("Reconcile"), true));
        // Climbing: one Event per rung, each with its own action, none repeated.
        let r1 = report(InternalAuth::Strict, true, Some(Rung::ServeBoth), Some((none.reason, &none.message)));
        assert_eq!(
            (r1.status, r1.reason, r1.event, r1.warn),
            (ConditionStatus::False, "Climbing", Some("ServeBoth"), false)
        );
        assert!(r1.message.contains("rung 1 of 3"), "{}", r1.message);
        assert_eq!(
            report(InternalAuth::Strict, true, Some(Rung::ServeBoth), Some((r1.reason, &r1.message))).event,
            None
        );
        let r2 = report(InternalAuth::Strict, true, Some(Rung::Redial), Some((r1.reason, &r1.message)));
        assert_eq!(r2.event, Some("Redial"));
        let r3 = report(InternalAuth::Strict, true, Some(Rung::Final), Some((r2.reason, &r2.message)));
        assert_eq!(r3.event, Some("Final"));
        let done = report(InternalAuth::Strict, true, None, Some((r3.reason, &r3.message)));
        assert_eq!((done.reason, done.event), ("Strict", Some("Reconcile")));
    }

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

    use InternalAuth::{Migrate, None as Plain, Strict};

    fn seen(templates: &[InternalAuth], rolled: bool, plain_urls: bool, followed: bool) -> Seen {
        Seen { templates: templates.to_vec(), rolled, plain_urls: Some(plain_urls), followed, climbing: true }
    }

    fn step(template: InternalAuth, plain_urls: bool, rung: Option<Rung>) -> Climb {
        Climb { template, plain_urls, rung }
    }

    /// (what is seen, what follows) for a climb from `none` to `strict`, in order.
    #[test]
    fn none_to_strict_serves_both_then_redials_then_rolls_to_strict() {
        let table = [
            // The field is set: roll into serving both, still plain.
            (seen(&[Plain, Plain], true, true, true), step(Migrate, true, Some(Rung::ServeBoth))),
            // Templates changed, pods not all rolled: wait, dialling plain.
            (seen(&[Migrate, Migrate], false, true, true), step(Migrate, true, Some(Rung::ServeBoth))),
            // A workload still on the old template (an interrupted apply) is not rolled either.
            (seen(&[Migrate, Plain], true, true, true), step(Migrate, true, Some(Rung::ServeBoth))),
            // Every pod serves both: list and dial TLS.
            (seen(&[Migrate, Migrate], true, true, false), step(Migrate, false, Some(Rung::Redial))),
            // Listed over TLS, not every server follows it yet.
            (seen(&[Migrate, Migrate], true, false, false), step(Migrate, false, Some(Rung::Redial))),
            // They all do: roll to strict.
            (seen(&[Migrate, Migrate], true, false, true), step(Strict, false, Some(Rung::Final))),
            // Rolling to strict.
            (seen(&[Strict, Strict], false, false, true), step(Strict, false, Some(Rung::Final))),
            // Done.
            (seen(&[Strict, Strict], true, false, true), step(Strict, false, None)),
        ];
        for (seen, want) in table {
            assert_eq!(climb(Strict, &seen), want, "{seen:?}");
        }
    }

    #[test]
    fn strict_to_none_mirrors_it() {
        let table = [
            (seen(&[Strict, Strict], true, false, true), step(Migrate, false, Some(Rung::ServeBoth))),
            (seen(&[Migrate, Migrate], false, false, true), step(Migrate, false, Some(Rung::ServeBoth))),
            (seen(&[Migrate, Migrate], true, false, true), step(Migrate, true, Some(Rung::Redial))),
            (seen(&[Migrate, Migrate], true, true, false), step(Migrate, true, Some(Rung::Redial))),
            (seen(&[Migrate, Migrate], true, true, true), step(Plain, true, Some(Rung::Final))),
            (seen(&[Plain, Plain], false, true, true), step(Plain, true, Some(Rung::Final))),
            (seen(&[Plain, Plain], true, true, true), step(Plain, true, None)),
        ];
        for (seen, want) in table {
            assert_eq!(climb(Plain, &seen), want, "{seen:?}");
        }
    }

    #[test]
    fn a_wanted_migrate_stops_after_the_redial() {
        assert_eq!(climb(Migrate, &seen(&[Plain], true, true, true)), step(Migrate, true, Some(Rung::ServeBoth)));
        assert_eq!(climb(Migrate, &seen(&[Migrate], true, true, false)), step(Migrate, false, Some(Rung::Redial)));
        assert_eq!(climb(Migrate, &seen(&[Migrate], true, false, false)), step(Migrate, false, None));
        // From strict the URLs are already right: one roll into serving both.
        assert_eq!(climb(Migrate, &seen(&[Strict], true, false, true)), step(Migrate, false, Some(Rung::ServeBoth)));
        assert_eq!(climb(Migrate, &seen(&[Migrate], false, false, true)), step(Migrate, false, Some(Rung::ServeBoth)));
        assert_eq!(climb(Migrate, &seen(&[Migrate], true, false, true)), step(Migrate, false, None));
    }

    #[test]
    fn pods_in_the_wrong_mode_for_the_document_serve_both_first() {
        // Strict pods under plain URLs (the roll straight from none of an earlier operator): back
        // through serving both, whichever way is wanted, never straight on.
        assert_eq!(climb(Strict, &seen(&[Strict], true, true, true)), step(Migrate, true, Some(Rung::ServeBoth)));
        assert_eq!(climb(Plain, &seen(&[Strict], true, true, true)), step(Migrate, true, Some(Rung::ServeBoth)));
    }

    #[test]
    fn a_new_database_and_a_settled_one_go_straight_to_the_wanted_mode() {
        let new = Seen { templates: vec![], rolled: false, plain_urls: None, followed: false, climbing: false };
        for mode in [Plain, Migrate, Strict] {
            assert_eq!(climb(mode, &new), step(mode, mode == Plain, None));
        }
        let no_document = Seen { plain_urls: None, ..seen(&[Plain], true, true, true) };
        assert_eq!(climb(Strict, &no_document), step(Strict, false, None));
        // An image rollout of a settled database is not a climb.
        let rolling = Seen { climbing: false, ..seen(&[Strict, Strict], false, false, true) };
        assert_eq!(climb(Strict, &rolling), step(Strict, false, None));
    }

    #[test]
    fn the_template_mode_is_read_from_its_env_or_its_certificate() {
        use k8s_openapi::api::core::v1::{Container, EnvVar};
        let pod = |env: Option<&str>, tls: bool| PodSpec {
            containers: vec![Container {
                args: Some(if tls { vec!["--tls-dir".into(), "/tls".into()] } else { vec![] }),
                env: env.map(|v| {
                    vec![EnvVar { name: "SHARDDB_INTERNAL_AUTH".into(), value: Some(v.into()), ..Default::default() }]
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(template_mode(&pod(None, false)), Plain, "a release before internal authentication");
        assert_eq!(template_mode(&pod(None, true)), Strict);
        assert_eq!(template_mode(&pod(Some("none"), false)), Plain);
        assert_eq!(template_mode(&pod(Some("migrate"), true)), Migrate);
    }

    #[test]
    fn each_rung_says_where_it_is() {
        assert!(climbing_message(Strict, Rung::ServeBoth).contains("rung 1 of 3"));
        assert!(climbing_message(Strict, Rung::ServeBoth).contains("dialled over plain HTTP"));
        assert!(climbing_message(Plain, Rung::Redial).contains("dialled over plain HTTP (http://)"));
        assert!(climbing_message(Migrate, Rung::Redial).contains("rung 2 of 2"));
        assert!(climbing_message(Strict, Rung::Final).contains("rung 3 of 3: rolling every pod to strict"));
    }
}
