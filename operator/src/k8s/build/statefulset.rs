//! One StatefulSet per server (replicas 1), so a particular server can be removed, as the seed's
//! `/rm` names servers. Its pod runs the shard server and the upstream Postgres image; the shard
//! server reaches Postgres on the pod's loopback. Pure.
//!
//! Pods restart when the operator says: the update strategy is `OnDelete`, so a changed template
//! (an image, a knob) restarts nothing by itself, and the healer restarts the servers one at a
//! time, each drained first (`brain::rollout`, `k8s::rollout`). With the default `RollingUpdate`,
//! the StatefulSet controller would restart every server at once (each is its own StatefulSet).
//!
//! Volumes are kept: the `persistentVolumeClaimRetentionPolicy` is `Retain` both when the
//! StatefulSet is deleted (a server removed from the spec, or the whole database deleted) and
//! when it is scaled, as CloudNativePG keeps data by default. Deleting data is the one mistake
//! that cannot be undone; a re-added server finds its volume (its copies are then checked and
//! recovered by the healer), and an operator who wants the space back deletes the claims, found
//! by the database's labels, which every claim carries.

use super::{Owner, names, resources};
use crate::brain::tuning::ProbeTiming;
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use shard_server::tls::InternalAuth;
use std::collections::BTreeMap;

/// Scratch volumes Postgres needs beside its data, since its root filesystem is read-only.
const RUN_VOLUME: &str = "run";
const TMP_VOLUME: &str = "tmp";

/// The StatefulSet of `server` (its topology name, e.g. `Server0`), for a database in internal-auth
/// `mode`: in `none` the pod mounts no certificate and serves plain HTTP, as earlier releases
/// built it, with only `SHARDDB_INTERNAL_AUTH=none` added.
pub fn server_statefulset(db: &ValidatedDb, owner: &Owner, server: &str, mode: InternalAuth) -> StatefulSet {
    let selector = names::server_selector(&owner.name, server);
    let mut pod_labels = names::common_labels(&owner.name);
    pod_labels.extend(selector.clone());
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mut volumes = vec![empty_dir(RUN_VOLUME), empty_dir(TMP_VOLUME)];
    if mode != InternalAuth::None {
        volumes.push(secret_volume(names::TLS_VOLUME, &names::server_tls_secret(&owner.name, server)));
    }
    let claims = match &db.storage_size {
        Some(size) => Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(names::DATA_VOLUME.into()),
                labels: Some(pod_labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: db.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(size.clone()))])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]),
        None => {
            volumes.push(empty_dir(names::DATA_VOLUME));
            None
        }
    };
    StatefulSet {
        metadata: owner.meta(names::server_statefulset(&owner.name, server), selector.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names::headless_service(&owner.name)),
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some("OnDelete".into()), rolling_update: None }),
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            }),
            volume_claim_templates: claims,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::server_service_account(&owner.name)),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(names::POSTGRES_UID),
                        run_as_group: Some(names::POSTGRES_UID),
                        fs_group: Some(names::POSTGRES_UID),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![shard_server_container(db, owner, server, mode), postgres_container(db, owner)],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// No privilege, no capabilities, nothing written outside mounted volumes.
pub(super) fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        ..SecurityContext::default()
    }
}

/// A Secret mounted whole (never through `subPath`, so that the kubelet replaces the files when
/// the operator renews a certificate), readable by the pod's group only.
pub(super) fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub(super) fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(true), ..VolumeMount::default() }
}

/// An HTTP GET probe; `tls` for a port serving HTTPS (the kubelet then does not check the
/// certificate, and presents none: the probed paths answer without one).
pub(super) fn http_probe(path: &str, timing: ProbeTiming, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(names::HTTP_PORT_NAME.into()),
            // Unset for HTTP, its default, as earlier releases built it (no change on takeover).
            scheme: tls.then(|| "HTTPS".into()),
            ..HTTPGetAction::default()
        }),
        ..timed(timing)
    }
}

/// A probe with `timing` and no action yet.
fn timed(timing: ProbeTiming) -> Probe {
    Probe {
        initial_delay_seconds: timing.initial_delay_seconds,
        period_seconds: Some(timing.period_seconds),
        failure_threshold: Some(timing.failure_threshold),
        timeout_seconds: Some(timing.timeout_seconds),
        ..Probe::default()
    }
}

pub(super) fn http_port() -> Option<Vec<ContainerPort>> {
    Some(vec![ContainerPort {
        name: Some(names::HTTP_PORT_NAME.into()),
        container_port: names::HTTP_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }])
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn secret_env(owner: &Owner, name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: names::postgres_secret(&owner.name),
                key: key.into(),
                ..SecretKeySelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// `SHARDDB_INTERNAL_AUTH` for a mode other than the default (`strict`), which sets nothing.
pub(super) fn internal_auth_env(mode: InternalAuth) -> Option<EnvVar> {
    (mode != InternalAuth::Strict).then(|| env("SHARDDB_INTERNAL_AUTH", mode.as_str()))
}

fn shard_server_container(db: &ValidatedDb, owner: &Owner, server: &str, mode: InternalAuth) -> Container {
    let tls = mode != InternalAuth::None;
    // Kubernetes expands `$(VAR)` from earlier entries, so the password never appears in the spec.
    let database_url = format!(
        "postgres://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@127.0.0.1:{}/{}",
        names::POSTGRES_PORT,
        names::POSTGRES_DB
    );
    let mut args = vec![
        "--name".into(),
        server.into(),
        "--topology-configmap".into(),
        format!("{}/{}", owner.namespace, names::topology_configmap(&owner.name)),
    ];
    if tls {
        args.extend(["--tls-dir".into(), names::TLS_MOUNT.into()]);
    }
    // Only when set: the server's own defaults apply otherwise, and the pod template stays what
    // earlier releases built (no needless restart on an operator upgrade).
    if let Some(rows) = db.tuning.cache_rows {
        args.extend(["--cache-rows".into(), rows.to_string()]);
    }
    if let Some(threads) = db.tuning.worker_threads {
        args.extend(["--worker-threads".into(), threads.to_string()]);
    }
    let probes = &db.tuning.probes;
    let mut env_vars = vec![
        env("SHARDDB_LISTEN", &format!("0.0.0.0:{}", names::HTTP_PORT)),
        secret_env(owner, "POSTGRES_USER", names::SECRET_USER_KEY),
        secret_env(owner, "POSTGRES_PASSWORD", names::SECRET_PASSWORD_KEY),
        env("DATABASE_URL", &database_url),
    ];
    // Last, so that a template of an earlier release only gains it.
    env_vars.extend(internal_auth_env(mode));
    Container {
        name: "shard-server".into(),
        image: Some(db.images.shard_server.clone()),
        args: Some(args),
        env: Some(env_vars),
        ports: http_port(),
        volume_mounts: tls.then(|| vec![read_only_mount(names::TLS_VOLUME, names::TLS_MOUNT)]),
        readiness_probe: Some(http_probe("/heartbeat", probes.shard_server_readiness, tls)),
        liveness_probe: Some(http_probe("/heartbeat", probes.shard_server_liveness, tls)),
        resources: resources(db.resources.shard_server.as_ref()),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

fn postgres_container(db: &ValidatedDb, owner: &Owner) -> Container {
    let mount =
        |name: &str, path: &str| VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() };
    let pg_isready = |timing| Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "pg_isready -h 127.0.0.1 -p {} -U \"$POSTGRES_USER\" -d {}",
                    names::POSTGRES_PORT,
                    names::POSTGRES_DB
                ),
            ]),
        }),
        ..timed(timing)
    };
    // Loopback only: nothing but the shard server beside it should reach the database. The
    // allow-listed settings follow (`brain::tuning`), in name order.
    let mut args = vec!["-c".to_owned(), "listen_addresses=127.0.0.1".to_owned()];
    for (name, value) in &db.tuning.postgres_parameters {
        args.extend(["-c".to_owned(), format!("{name}={value}")]);
    }
    Container {
        name: "postgres".into(),
        image: Some(db.images.postgres.clone()),
        args: Some(args),
        env: Some(vec![
            secret_env(owner, "POSTGRES_USER", names::SECRET_USER_KEY),
            secret_env(owner, "POSTGRES_PASSWORD", names::SECRET_PASSWORD_KEY),
            env("POSTGRES_DB", names::POSTGRES_DB),
            env("PGDATA", names::PGDATA),
        ]),
        volume_mounts: Some(vec![
            mount(names::DATA_VOLUME, names::DATA_MOUNT),
            mount(RUN_VOLUME, "/var/run/postgresql"),
            mount(TMP_VOLUME, "/tmp"),
        ]),
        readiness_probe: Some(pg_isready(db.tuning.probes.postgres_readiness)),
        liveness_probe: Some(pg_isready(db.tuning.probes.postgres_liveness)),
        resources: resources(db.resources.postgres.as_ref()),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ContainerResources, DEFAULT_POSTGRES_IMAGE};
    use crate::k8s::build::testing::{assert_child_meta, db, db_with_mirror_images, mirror_images, owner};

    fn pod(sts: &StatefulSet) -> &PodSpec {
        sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn one_pod_per_server_selected_by_its_own_labels() {
        let sts = server_statefulset(&db(), &owner(), "Server3", InternalAuth::Strict);
        assert_child_meta(&sts.metadata, "students-server3");
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("students-servers"));
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector["sharddb.io/server"], "server3");
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        for (k, v) in selector {
            assert_eq!(pod_labels.get(k), Some(v), "the pod matches the selector on {k}");
        }
        assert_eq!(pod(&sts).service_account_name.as_deref(), Some("students-server"));
        let strategy = spec.update_strategy.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("OnDelete"), "the operator decides when a pod restarts");
    }

    #[test]
    fn shard_server_follows_the_configmap_and_reaches_postgres_on_loopback() {
        let sts = server_statefulset(&db(), &owner(), "Server3", InternalAuth::Strict);
        let c = &pod(&sts).containers[0];
        assert_eq!(c.name, "shard-server");
        assert_eq!(
            c.args.as_deref().unwrap(),
            ["--name", "Server3", "--topology-configmap", "prod/students-topology", "--tls-dir", "/etc/sharddb/tls"]
        );
        let env = c.env.as_ref().unwrap();
        let url = env.iter().find(|e| e.name == "DATABASE_URL").unwrap().value.as_deref().unwrap();
        assert!(url.starts_with("postgres://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@127.0.0.1:5432/"), "{url}");
        let pw = env.iter().position(|e| e.name == "POSTGRES_PASSWORD").unwrap();
        let url_at = env.iter().position(|e| e.name == "DATABASE_URL").unwrap();
        assert!(pw < url_at, "$(VAR) expands only variables defined earlier");
        assert_eq!(pw_secret(&env[pw]), ("students-postgres", "password"));
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((probe.path.as_deref(), probe.scheme.as_deref()), (Some("/heartbeat"), Some("HTTPS")));
        assert!(c.liveness_probe.is_some());
    }

    #[test]
    fn in_none_a_server_mounts_no_certificate_serves_plain_and_says_so() {
        let sts = server_statefulset(&db(), &owner(), "Server3", InternalAuth::None);
        let p = pod(&sts);
        assert!(p.volumes.as_ref().unwrap().iter().all(|v| v.name != "tls" && v.secret.is_none()));
        let c = &p.containers[0];
        assert!(c.volume_mounts.is_none(), "{:?}", c.volume_mounts);
        assert_eq!(c.args.as_deref().unwrap(), ["--name", "Server3", "--topology-configmap", "prod/students-topology"]);
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!((get.path.as_deref(), get.scheme.as_deref()), (Some("/heartbeat"), None), "HTTP, the default");
        }
        let env = c.env.as_ref().unwrap();
        let last = env.last().unwrap();
        assert_eq!((last.name.as_str(), last.value.as_deref()), ("SHARDDB_INTERNAL_AUTH", Some("none")));
        // Only that variable differs from what strict builds beside it, and strict sets none.
        let strict = server_statefulset(&db(), &owner(), "Server3", InternalAuth::Strict);
        let strict_env = pod(&strict).containers[0].env.clone().unwrap();
        assert!(strict_env.iter().all(|e| e.name != "SHARDDB_INTERNAL_AUTH"), "strict is the default");
        assert_eq!(env[..env.len() - 1], strict_env[..]);
        assert_eq!(p.containers[1], pod(&strict).containers[1], "postgres is the same in every mode");
    }

    #[test]
    fn in_migrate_a_server_has_its_certificate_and_says_migrate() {
        let sts = server_statefulset(&db(), &owner(), "Server3", InternalAuth::Migrate);
        let c = &pod(&sts).containers[0];
        assert!(c.args.as_ref().unwrap().windows(2).any(|w| w == ["--tls-dir", "/etc/sharddb/tls"]));
        let get = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
        let last = c.env.as_ref().unwrap().last().unwrap();
        assert_eq!((last.name.as_str(), last.value.as_deref()), ("SHARDDB_INTERNAL_AUTH", Some("migrate")));
        assert!(pod(&sts).volumes.as_ref().unwrap().iter().any(|v| v.name == "tls"));
    }

    #[test]
    fn each_server_mounts_its_own_certificate_secret_whole() {
        let sts = server_statefulset(&db(), &owner(), "Server3", InternalAuth::Strict);
        let p = pod(&sts);
        let volume = p.volumes.as_ref().unwrap().iter().find(|v| v.name == "tls").unwrap();
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("students-tls-server3"));
        assert_eq!(secret.default_mode, Some(0o440), "readable by the pod's group (fsGroup) only");
        let mount = p.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "tls").unwrap();
        assert_eq!(mount.mount_path, "/etc/sharddb/tls");
        assert_eq!(mount.read_only, Some(true));
        assert!(mount.sub_path.is_none(), "a subPath mount would never see a renewed certificate");
        assert!(
            p.containers[1].volume_mounts.as_ref().unwrap().iter().all(|m| m.name != "tls"),
            "postgres never sees the certificate"
        );
    }

    fn pw_secret(e: &EnvVar) -> (&str, &str) {
        let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        (r.name.as_str(), r.key.as_str())
    }

    #[test]
    fn postgres_runs_non_root_read_only_with_writable_volumes_only() {
        let sts = server_statefulset(&db(), &owner(), "Server0", InternalAuth::Strict);
        let p = pod(&sts);
        assert_eq!(p.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let pg = &p.containers[1];
        assert_eq!(pg.image.as_deref(), Some(DEFAULT_POSTGRES_IMAGE));
        for c in &p.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        }
        let mounts: Vec<&str> = pg.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, ["/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"]);
        assert!(pg.readiness_probe.as_ref().unwrap().exec.is_some());
    }

    #[test]
    fn storage_gives_a_claim_template_and_its_absence_an_empty_dir() {
        let mut db = db();
        db.storage_class = Some("fast".into());
        let sts = server_statefulset(&db, &owner(), "Server0", InternalAuth::Strict);
        let claims = sts.spec.as_ref().unwrap().volume_claim_templates.as_ref().unwrap();
        let claim = claims[0].spec.as_ref().unwrap();
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        assert_eq!(claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"], Quantity("1Gi".into()));
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        let labels = claims[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["sharddb.io/database"], "students");
        assert_eq!(labels["sharddb.io/server"], "server0");
        assert_eq!(labels["app.kubernetes.io/component"], "server");
        let retention = sts.spec.as_ref().unwrap().persistent_volume_claim_retention_policy.as_ref().unwrap();
        assert_eq!(
            (retention.when_deleted.as_deref(), retention.when_scaled.as_deref()),
            (Some("Retain"), Some("Retain"))
        );
        assert!(!pod(&sts).volumes.as_ref().unwrap().iter().any(|v| v.name == "data"));

        db.storage_size = None;
        let sts = server_statefulset(&db, &owner(), "Server0", InternalAuth::Strict);
        assert!(sts.spec.as_ref().unwrap().volume_claim_templates.is_none());
        assert!(pod(&sts).volumes.as_ref().unwrap().iter().any(|v| v.name == "data" && v.empty_dir.is_some()));
    }

    #[test]
    fn images_and_resources_come_from_the_spec() {
        let mut db = db();
        db.images.shard_server = "example/ss:1".into();
        db.resources.postgres = Some(ContainerResources {
            requests: BTreeMap::from([("memory".into(), "1Gi".into())]),
            ..Default::default()
        });
        let sts = server_statefulset(&db, &owner(), "Server0", InternalAuth::Strict);
        let p = pod(&sts);
        assert_eq!(p.containers[0].image.as_deref(), Some("example/ss:1"));
        assert_eq!(p.containers[0].resources, None);
        assert_eq!(
            p.containers[1].resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"],
            Quantity("1Gi".into())
        );
    }

    #[test]
    fn knobs_left_unset_build_what_earlier_releases_built() {
        let sts = server_statefulset(&db(), &owner(), "Server0", InternalAuth::Strict);
        let p = pod(&sts);
        let server = &p.containers[0];
        let args = server.args.as_deref().unwrap();
        assert_eq!(args.len(), 6, "no --cache-rows or --worker-threads: {args:?}");
        assert_eq!(args[4..], ["--tls-dir", names::TLS_MOUNT]);
        let ready = server.readiness_probe.as_ref().unwrap();
        assert_eq!(
            (ready.initial_delay_seconds, ready.period_seconds, ready.timeout_seconds, ready.failure_threshold),
            (None, Some(5), Some(2), Some(3))
        );
        let alive = server.liveness_probe.as_ref().unwrap();
        assert_eq!(
            (alive.period_seconds, alive.timeout_seconds, alive.failure_threshold),
            (Some(10), Some(2), Some(6))
        );
        let pg = &p.containers[1];
        assert_eq!(pg.args.as_deref().unwrap(), ["-c", "listen_addresses=127.0.0.1"]);
        let pg_ready = pg.readiness_probe.as_ref().unwrap();
        assert_eq!(
            (pg_ready.period_seconds, pg_ready.timeout_seconds, pg_ready.failure_threshold),
            (Some(10), Some(5), Some(6))
        );
        assert_eq!(pg.liveness_probe, pg.readiness_probe);
    }

    #[test]
    fn knobs_reach_the_containers() {
        use crate::brain::validate::{tests::students, validate};
        use crate::crd::{PostgresSpec, ProbeSpec, ShardServerSpec};
        let mut spec = students();
        spec.shard_server = Some(ShardServerSpec {
            cache_rows: Some(200_000),
            worker_threads: Some(3),
            liveness_probe: Some(ProbeSpec {
                initial_delay_seconds: Some(15),
                failure_threshold: Some(10),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.postgres = Some(PostgresSpec {
            parameters: [("work_mem".into(), "8MB".into()), ("shared_buffers".into(), "256MB".into())].into(),
            readiness_probe: Some(ProbeSpec {
                period_seconds: Some(3),
                timeout_seconds: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        });
        let sts = server_statefulset(&validate(&spec).unwrap(), &owner(), "Server0", InternalAuth::Strict);
        let p = pod(&sts);
        let args = p.containers[0].args.as_deref().unwrap();
        assert_eq!(&args[6..], ["--cache-rows", "200000", "--worker-threads", "3"]);
        let alive = p.containers[0].liveness_probe.as_ref().unwrap();
        assert_eq!(
            (alive.initial_delay_seconds, alive.period_seconds, alive.failure_threshold),
            (Some(15), Some(10), Some(10))
        );
        assert_eq!(
            p.containers[1].args.as_deref().unwrap(),
            ["-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=256MB", "-c", "work_mem=8MB"],
            "loopback first, then the settings in name order"
        );
        let pg_ready = p.containers[1].readiness_probe.as_ref().unwrap();
        assert_eq!((pg_ready.period_seconds, pg_ready.timeout_seconds), (Some(3), Some(3)));
        assert!(pg_ready.exec.is_some());
        assert_eq!(p.containers[1].liveness_probe.as_ref().unwrap().period_seconds, Some(10));
    }

    #[test]
    fn the_operators_configured_images_are_the_defaults() {
        let sts = server_statefulset(&db_with_mirror_images(), &owner(), "Server0", InternalAuth::Strict);
        let p = pod(&sts);
        assert_eq!(p.containers[0].image, Some(mirror_images().shard_server));
        assert_eq!(p.containers[1].image, Some(mirror_images().postgres));
    }
}
