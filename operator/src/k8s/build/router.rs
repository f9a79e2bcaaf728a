//! The router Deployment: stateless pods following the topology ConfigMap. Pure.
//!
//! Routers roll as a Deployment does, but never below the wanted count: a new pod is started and
//! ready (it has a routing table) before an old one stops (`maxSurge: 1`, `maxUnavailable: 0`),
//! and a stopping pod keeps serving for a few seconds after it is taken out of its Service's
//! endpoints (a `preStop` sleep), since proxies and clients learn of that with a delay; its
//! requests in flight then finish before it exits. The PodDisruptionBudget (`pdb`) covers
//! evictions.

use super::statefulset::{http_port, http_probe, internal_auth_env, read_only_mount, restricted, secret_volume};
use super::{Owner, names, resources};
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Container, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, SleepAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use shard_server::tls::InternalAuth;
use std::collections::BTreeMap;

/// How long a stopping router keeps serving before it is signalled: longer than Service
/// endpoints take to stop sending it connections. Within the default 30 s grace period.
const DRAIN_SECONDS: i64 = 5;

/// `control_url` is where the router forwards the admin verbs (the operator's admin endpoint for
/// this database); without one they answer 501. With `admin_token` the verbs need the bearer
/// token of the Secret `<db>-admin-token`, mounted at `/etc/sharddb/admin`.
///
/// Every router mounts the routers' certificate Secret (servers and the operator answer only its
/// certificate); it checks the operator's admin endpoint against `operator-ca.crt` of that
/// Secret, and with `spec.tls.clientTls` serves its client port over HTTPS with the same
/// certificate.
///
/// In internal-auth `none` (`mode`) the router is what earlier releases built, with only
/// `SHARDDB_INTERNAL_AUTH=none` added: no certificate, and no admin token either (a database
/// taken over keeps answering its clients as before; the token comes with leaving `none`). It
/// then reaches the control URL over plain HTTP, which the admin endpoint answers for a database
/// in `none` only.
pub fn router_deployment(
    db: &ValidatedDb,
    owner: &Owner,
    control_url: Option<&str>,
    admin_token: bool,
    mode: InternalAuth,
) -> Deployment {
    let certificate = mode != InternalAuth::None;
    let admin_token = admin_token && certificate;
    let selector = names::router_selector(&owner.name);
    let mut pod_labels = names::common_labels(&owner.name);
    pod_labels.extend(selector.clone());
    let component = BTreeMap::from([(names::LABEL_COMPONENT.to_owned(), names::COMPONENT_ROUTER.to_owned())]);
    let mut args = vec![
        "--listen".into(),
        format!("0.0.0.0:{}", names::HTTP_PORT),
        "--topology-configmap".into(),
        format!("{}/{}", owner.namespace, names::topology_configmap(&owner.name)),
    ];
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    if certificate {
        args.extend(["--tls-dir".into(), names::TLS_MOUNT.into()]);
        volumes.push(secret_volume(names::TLS_VOLUME, &names::router_tls_secret(&owner.name)));
        mounts.push(read_only_mount(names::TLS_VOLUME, names::TLS_MOUNT));
    }
    match control_url {
        Some(url) if certificate => args.extend([
            "--control-url".into(),
            url.to_owned(),
            "--control-ca".into(),
            format!("{}/{}", names::TLS_MOUNT, names::OPERATOR_CA_KEY),
        ]),
        Some(url) => args.extend(["--control-url".into(), plain_url(url)]),
        None => {}
    }
    if admin_token {
        args.extend(["--admin-token-file".into(), format!("{}/{}", names::ADMIN_TOKEN_MOUNT, names::ADMIN_TOKEN_KEY)]);
        volumes.push(secret_volume(names::ADMIN_TOKEN_VOLUME, &names::admin_token_secret(&owner.name)));
        mounts.push(read_only_mount(names::ADMIN_TOKEN_VOLUME, names::ADMIN_TOKEN_MOUNT));
    }
    let tls = db.tls.client_tls;
    if tls {
        args.push("--serve-tls".into());
    }
    let container = Container {
        name: "router".into(),
        image: Some(db.images.router.clone()),
        args: Some(args),
        ports: http_port(),
        env: internal_auth_env(mode).map(|e| vec![e]),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        readiness_probe: Some(http_probe("/readyz", db.tuning.probes.router_readiness, tls)),
        liveness_probe: Some(http_probe("/healthz", db.tuning.probes.router_liveness, tls)),
        resources: resources(db.resources.router.as_ref()),
        security_context: Some(restricted()),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: DRAIN_SECONDS }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: owner.meta(names::router(&owner.name), component),
        spec: Some(DeploymentSpec {
            replicas: Some(i32::try_from(db.router_replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::router_service_account(&owner.name)),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(names::ROUTER_UID),
                        run_as_group: Some(names::ROUTER_UID),
                        // The mounted Secrets are group-readable (0440) by this group.
                        fs_group: (!volumes.is_empty()).then_some(names::ROUTER_UID),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// `url` over plain HTTP: the admin endpoint serves both on one port.
fn plain_url(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DEFAULT_ROUTER_IMAGE;
    use crate::k8s::build::testing::{assert_child_meta, db, db_with_mirror_images, mirror_images, owner};

    #[test]
    fn routers_follow_the_configmap_with_readiness_on_readyz() {
        let d = router_deployment(&db(), &owner(), None, true, InternalAuth::Strict);
        assert_child_meta(&d.metadata, "students-router");
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("students-router"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(DEFAULT_ROUTER_IMAGE));
        assert!(c.args.as_ref().unwrap().windows(2).any(|w| w == ["--topology-configmap", "prod/students-topology"]));
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        assert_eq!(c.security_context.as_ref().unwrap().read_only_root_filesystem, Some(true));
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.match_labels.unwrap() {
            assert_eq!(labels.get(&k), Some(&v));
        }
    }

    #[test]
    fn routers_roll_one_new_pod_at_a_time_and_keep_serving_while_they_leave_the_service() {
        let spec = router_deployment(&db(), &owner(), None, true, InternalAuth::Strict).spec.unwrap();
        let strategy = spec.strategy.unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let rolling = strategy.rolling_update.unwrap();
        assert_eq!(
            (rolling.max_surge, rolling.max_unavailable),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0))),
            "never fewer routers than asked for"
        );
        let pod = spec.template.spec.unwrap();
        let pre_stop = pod.containers[0].lifecycle.clone().unwrap().pre_stop.unwrap();
        assert_eq!(pre_stop.sleep.unwrap().seconds, DRAIN_SECONDS);
        assert!(pod.termination_grace_period_seconds.is_none_or(|g| g > DRAIN_SECONDS), "the default 30 s");
    }

    #[test]
    fn the_admin_verbs_go_to_the_control_url_when_there_is_one() {
        let args = |url| {
            router_deployment(&db(), &owner(), url, true, InternalAuth::Strict)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap()
        };
        assert!(!args(None).contains(&"--control-url".to_owned()), "none: the verbs answer 501");
        let url = "https://sharddb-operator.sharddb-system.svc:8081/databases/prod/students";
        assert!(args(Some(url)).windows(2).any(|w| w == ["--control-url", url]));
        assert!(args(Some(url)).windows(2).any(|w| w == ["--control-ca", "/etc/sharddb/tls/operator-ca.crt"]));
    }

    fn pod(d: Deployment) -> PodSpec {
        d.spec.unwrap().template.spec.unwrap()
    }

    #[test]
    fn routers_mount_their_certificate_and_the_admin_token() {
        let p = pod(router_deployment(&db(), &owner(), None, true, InternalAuth::Strict));
        let args = p.containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--tls-dir", "/etc/sharddb/tls"]));
        assert!(args.windows(2).any(|w| w == ["--admin-token-file", "/etc/sharddb/admin/token"]));
        assert!(!args.contains(&"--serve-tls".to_owned()), "plain HTTP for clients by default");
        let secret = |name: &str| {
            p.volumes.as_ref().unwrap().iter().find(|v| v.name == name).unwrap().secret.clone().unwrap().secret_name
        };
        assert_eq!(secret("tls").as_deref(), Some("students-router-tls"));
        assert_eq!(secret("admin-token").as_deref(), Some("students-admin-token"));
        let mounts = p.containers[0].volume_mounts.clone().unwrap();
        assert!(mounts.iter().all(|m| m.read_only == Some(true) && m.sub_path.is_none()));
        assert_eq!(p.security_context.unwrap().fs_group, Some(names::ROUTER_UID));
        // Without the token requirement, nothing about it is mounted.
        let p = pod(router_deployment(&db(), &owner(), None, false, InternalAuth::Strict));
        assert!(!p.containers[0].args.clone().unwrap().contains(&"--admin-token-file".to_owned()));
        assert_eq!(p.volumes.unwrap().len(), 1);
    }

    #[test]
    fn in_none_routers_mount_nothing_reach_the_control_url_plain_and_say_so() {
        let url = "https://sharddb-operator.sharddb-system.svc:8081/databases/prod/students";
        let p = pod(router_deployment(&db(), &owner(), Some(url), true, InternalAuth::None));
        let c = &p.containers[0];
        assert_eq!(
            c.args.as_deref().unwrap(),
            [
                "--listen",
                "0.0.0.0:5000",
                "--topology-configmap",
                "prod/students-topology",
                "--control-url",
                "http://sharddb-operator.sharddb-system.svc:8081/databases/prod/students"
            ],
            "no certificate, no operator CA, no admin token"
        );
        assert!(p.volumes.is_none() && c.volume_mounts.is_none());
        assert_eq!(p.security_context.as_ref().unwrap().fs_group, None, "nothing mounted to be readable");
        let env = c.env.clone().unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!((env[0].name.as_str(), env[0].value.as_deref()), ("SHARDDB_INTERNAL_AUTH", Some("none")));
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            assert_eq!(probe.as_ref().unwrap().http_get.as_ref().unwrap().scheme, None, "HTTP");
        }
        let strict = pod(router_deployment(&db(), &owner(), Some(url), true, InternalAuth::Strict));
        assert_eq!(strict.containers[0].env, None, "strict is the default and sets nothing");
        let migrate = pod(router_deployment(&db(), &owner(), Some(url), true, InternalAuth::Migrate));
        let args = migrate.containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--control-url", url]), "migrate dials TLS: {args:?}");
        assert!(args.windows(2).any(|w| w == ["--tls-dir", "/etc/sharddb/tls"]));
        assert_eq!(migrate.containers[0].env.clone().unwrap()[0].value.as_deref(), Some("migrate"));
    }

    #[test]
    fn client_tls_serves_https_and_probes_it() {
        let mut db = db();
        db.tls.client_tls = true;
        let p = pod(router_deployment(&db, &owner(), None, true, InternalAuth::Strict));
        let c = &p.containers[0];
        assert!(c.args.clone().unwrap().contains(&"--serve-tls".to_owned()));
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.scheme.as_deref(), Some("HTTPS"));
    }

    #[test]
    fn probe_timings_come_from_the_spec_and_default_to_earlier_releases() {
        use crate::brain::validate::{tests::students, validate};
        use crate::crd::{ProbeSpec, RouterSpec};
        let probes = |db: &ValidatedDb| {
            let c = router_deployment(db, &owner(), None, true, InternalAuth::Strict)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers
                .remove(0);
            let t = |p: Option<k8s_openapi::api::core::v1::Probe>| {
                let p = p.unwrap();
                (p.initial_delay_seconds, p.period_seconds, p.timeout_seconds, p.failure_threshold)
            };
            (t(c.readiness_probe), t(c.liveness_probe))
        };
        assert_eq!(probes(&db()), ((None, Some(5), Some(2), Some(3)), (None, Some(10), Some(2), Some(6))));
        let mut spec = students();
        spec.router = Some(RouterSpec {
            replicas: Some(3),
            readiness_probe: Some(ProbeSpec {
                period_seconds: Some(1),
                timeout_seconds: Some(1),
                ..Default::default()
            }),
            liveness_probe: Some(ProbeSpec { initial_delay_seconds: Some(2), ..Default::default() }),
        });
        assert_eq!(
            probes(&validate(&spec).unwrap()),
            ((None, Some(1), Some(1), Some(3)), (Some(2), Some(10), Some(2), Some(6)))
        );
    }

    #[test]
    fn the_operators_configured_router_image_is_the_default() {
        let d = router_deployment(&db_with_mirror_images(), &owner(), None, true, InternalAuth::Strict);
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image, Some(mirror_images().router));
    }
}
