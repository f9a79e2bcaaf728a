//! One StatefulSet per server (replicas 1), so a particular server can be removed, as the seed's
//! `/rm` names servers. Its pod runs the shard server and the upstream Postgres image; the shard
//! server reaches Postgres on the pod's loopback. Pure.
//!
//! Volumes are kept: the `persistentVolumeClaimRetentionPolicy` is `Retain` both when the
//! StatefulSet is deleted (a server removed from the spec, or the whole database deleted) and
//! when it is scaled, as CloudNativePG keeps data by default. Deleting data is the one mistake
//! that cannot be undone; a re-added server finds its volume (its copies are then checked and
//! recovered by the healer), and an operator who wants the space back deletes the claims, found
//! by the database's labels, which every claim carries.

use super::{Owner, names, resources};
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// Scratch volumes Postgres needs beside its data, since its root filesystem is read-only.
const RUN_VOLUME: &str = "run";
const TMP_VOLUME: &str = "tmp";

/// The StatefulSet of `server` (its topology name, e.g. `Server0`).
pub fn server_statefulset(db: &ValidatedDb, owner: &Owner, server: &str) -> StatefulSet {
    let selector = names::server_selector(&owner.name, server);
    let mut pod_labels = names::common_labels(&owner.name);
    pod_labels.extend(selector.clone());
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mut volumes = vec![
        empty_dir(RUN_VOLUME),
        empty_dir(TMP_VOLUME),
        secret_volume(names::TLS_VOLUME, &names::server_tls_secret(&owner.name, server)),
    ];
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
                    containers: vec![shard_server_container(db, owner, server), postgres_container(db, owner)],
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
pub(super) fn http_probe(path: &str, period: i32, failures: i32, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(names::HTTP_PORT_NAME.into()),
            scheme: Some(if tls { "HTTPS" } else { "HTTP" }.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
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

fn shard_server_container(db: &ValidatedDb, owner: &Owner, server: &str) -> Container {
    // Kubernetes expands `$(VAR)` from earlier entries, so the password never appears in the spec.
    let database_url = format!(
        "postgres://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@127.0.0.1:{}/{}",
        names::POSTGRES_PORT,
        names::POSTGRES_DB
    );
    Container {
        name: "shard-server".into(),
        image: Some(db.images.shard_server.clone()),
        args: Some(vec![
            "--name".into(),
            server.into(),
            "--topology-configmap".into(),
            format!("{}/{}", owner.namespace, names::topology_configmap(&owner.name)),
            "--tls-dir".into(),
            names::TLS_MOUNT.into(),
        ]),
        env: Some(vec![
            env("SHARDDB_LISTEN", &format!("0.0.0.0:{}", names::HTTP_PORT)),
            secret_env(owner, "POSTGRES_USER", names::SECRET_USER_KEY),
            secret_env(owner, "POSTGRES_PASSWORD", names::SECRET_PASSWORD_KEY),
            env("DATABASE_URL", &database_url),
        ]),
        ports: http_port(),
        volume_mounts: Some(vec![read_only_mount(names::TLS_VOLUME, names::TLS_MOUNT)]),
        readiness_probe: Some(http_probe("/heartbeat", 5, 3, true)),
        liveness_probe: Some(http_probe("/heartbeat", 10, 6, true)),
        resources: resources(db.resources.shard_server.as_ref()),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

fn postgres_container(db: &ValidatedDb, owner: &Owner) -> Container {
    let mount =
        |name: &str, path: &str| VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() };
    let pg_isready = Probe {
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
        period_seconds: Some(10),
        timeout_seconds: Some(5),
        failure_threshold: Some(6),
        ..Probe::default()
    };
    Container {
        name: "postgres".into(),
        image: Some(db.images.postgres.clone()),
        // Loopback only: nothing but the shard server beside it should reach the database.
        args: Some(vec!["-c".into(), "listen_addresses=127.0.0.1".into()]),
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
        readiness_probe: Some(pg_isready.clone()),
        liveness_probe: Some(pg_isready),
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
        let sts = server_statefulset(&db(), &owner(), "Server3");
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
    }

    #[test]
    fn shard_server_follows_the_configmap_and_reaches_postgres_on_loopback() {
        let sts = server_statefulset(&db(), &owner(), "Server3");
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
    fn each_server_mounts_its_own_certificate_secret_whole() {
        let sts = server_statefulset(&db(), &owner(), "Server3");
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
        let sts = server_statefulset(&db(), &owner(), "Server0");
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
        let sts = server_statefulset(&db, &owner(), "Server0");
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
        let sts = server_statefulset(&db, &owner(), "Server0");
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
        let sts = server_statefulset(&db, &owner(), "Server0");
        let p = pod(&sts);
        assert_eq!(p.containers[0].image.as_deref(), Some("example/ss:1"));
        assert_eq!(p.containers[0].resources, None);
        assert_eq!(
            p.containers[1].resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"],
            Quantity("1Gi".into())
        );
    }

    #[test]
    fn the_operators_configured_images_are_the_defaults() {
        let sts = server_statefulset(&db_with_mirror_images(), &owner(), "Server0");
        let p = pod(&sts);
        assert_eq!(p.containers[0].image, Some(mirror_images().shard_server));
        assert_eq!(p.containers[1].image, Some(mirror_images().postgres));
    }
}
