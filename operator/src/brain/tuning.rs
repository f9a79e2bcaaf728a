//! The knobs a user tunes — the shard server's row cache and threads, probe timings, compute
//! resources, and an allow-listed set of Postgres settings — checked once and turned into the
//! [`Tuning`] the builders and the local body read. Pure.
//!
//! Every field left out keeps the value an earlier release used, so a database that sets nothing
//! gets exactly the objects it always got (an operator upgrade rewrites nothing). Postgres
//! settings are checked against their allow-list in [`super::pg_settings`].

use super::pg_settings::check_parameter;
use crate::crd::{ContainerResources, ProbeSpec, ShardedDatabaseSpec};
use std::collections::BTreeMap;

/// Largest `spec.shardServer.cacheRows` (about 20 GiB of the seed's rows).
pub const MAX_CACHE_ROWS: u64 = 100_000_000;
/// Largest `spec.shardServer.workerThreads`.
pub const MAX_WORKER_THREADS: u32 = 256;

/// The validated knobs; `None` or defaults where the spec says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// `--cache-rows` of every shard server; the server's own default when `None`.
    pub cache_rows: Option<u64>,
    /// `--worker-threads` of every shard server; one per CPU (local mode: a share) when `None`.
    pub worker_threads: Option<u32>,
    /// Postgres settings, allow-listed and checked, in name order.
    pub postgres_parameters: BTreeMap<String, String>,
    pub probes: Probes,
}

/// The timings of every probe the builders set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probes {
    pub shard_server_readiness: ProbeTiming,
    pub shard_server_liveness: ProbeTiming,
    pub router_readiness: ProbeTiming,
    pub router_liveness: ProbeTiming,
    pub postgres_readiness: ProbeTiming,
    pub postgres_liveness: ProbeTiming,
}

/// The timings earlier releases used, and so the defaults.
impl Default for Probes {
    fn default() -> Self {
        let http_ready = ProbeTiming::new(5, 2, 3);
        let http_alive = ProbeTiming::new(10, 2, 6);
        let pg = ProbeTiming::new(10, 5, 6);
        Probes {
            shard_server_readiness: http_ready,
            shard_server_liveness: http_alive,
            router_readiness: http_ready,
            router_liveness: http_alive,
            postgres_readiness: pg,
            postgres_liveness: pg,
        }
    }
}

/// One probe's timings, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    /// `None`: not set on the object (Kubernetes' default, 0).
    pub initial_delay_seconds: Option<i32>,
    pub period_seconds: i32,
    pub timeout_seconds: i32,
    pub failure_threshold: i32,
}

impl ProbeTiming {
    const fn new(period_seconds: i32, timeout_seconds: i32, failure_threshold: i32) -> Self {
        ProbeTiming { initial_delay_seconds: None, period_seconds, timeout_seconds, failure_threshold }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuningError {
    #[error("spec.shardServer.cacheRows ({0}) is more than {MAX_CACHE_ROWS}")]
    CacheRows(u64),
    #[error("spec.shardServer.workerThreads ({0}) must be between 1 and {MAX_WORKER_THREADS}")]
    WorkerThreads(u32),
    #[error("{path}.{field} ({value}) must be between {min} and {max}")]
    ProbeRange { path: String, field: &'static str, value: i32, min: i32, max: i32 },
    #[error(
        "{path}.timeoutSeconds ({timeout}) exceeds its periodSeconds ({period}): a probe would still run when the next starts"
    )]
    ProbeTimeout { path: String, timeout: i32, period: i32 },
    #[error("spec.postgres.parameters.{name}: not settable: {why}")]
    RefusedParameter { name: String, why: &'static str },
    #[error("spec.postgres.parameters.{name}: not a setting sharddb lets you change (allowed: {allowed})")]
    UnknownParameter { name: String, allowed: String },
    #[error("spec.postgres.parameters.{name}: {value:?} is not {kind}")]
    ParameterValue { name: String, value: String, kind: &'static str },
    #[error("{path}: {name:?} is not a resource name like cpu, memory or example.com/gpu")]
    ResourceName { path: String, name: String },
    #[error("{path}.{name}: {value:?} is not a quantity like 500m, 2 or 1Gi")]
    ResourceQuantity { path: String, name: String, value: String },
    #[error("{path}: requests.{name} ({request}) exceeds limits.{name} ({limit})")]
    RequestOverLimit { path: String, name: String, request: String, limit: String },
}

/// Checks the knobs of `spec`, compute resources included (which stay in
/// [`ValidatedDb::resources`](super::validate::ValidatedDb::resources)).
pub fn validate_tuning(spec: &ShardedDatabaseSpec) -> Result<Tuning, TuningError> {
    let server = spec.shard_server.clone().unwrap_or_default();
    if let Some(rows) = server.cache_rows.filter(|&r| r > MAX_CACHE_ROWS) {
        return Err(TuningError::CacheRows(rows));
    }
    if let Some(threads) = server.worker_threads.filter(|&t| t == 0 || t > MAX_WORKER_THREADS) {
        return Err(TuningError::WorkerThreads(threads));
    }
    let router = spec.router.clone().unwrap_or_default();
    let postgres = spec.postgres.clone().unwrap_or_default();
    let d = Probes::default();
    let probes = Probes {
        shard_server_readiness: probe(
            "spec.shardServer.readinessProbe",
            server.readiness_probe.as_ref(),
            d.shard_server_readiness,
        )?,
        shard_server_liveness: probe(
            "spec.shardServer.livenessProbe",
            server.liveness_probe.as_ref(),
            d.shard_server_liveness,
        )?,
        router_readiness: probe("spec.router.readinessProbe", router.readiness_probe.as_ref(), d.router_readiness)?,
        router_liveness: probe("spec.router.livenessProbe", router.liveness_probe.as_ref(), d.router_liveness)?,
        postgres_readiness: probe(
            "spec.postgres.readinessProbe",
            postgres.readiness_probe.as_ref(),
            d.postgres_readiness,
        )?,
        postgres_liveness: probe("spec.postgres.livenessProbe", postgres.liveness_probe.as_ref(), d.postgres_liveness)?,
    };
    for (name, value) in &postgres.parameters {
        check_parameter(name, value)?;
    }
    let resources = spec.resources.clone().unwrap_or_default();
    for (path, r) in [
        ("spec.resources.shardServer", &resources.shard_server),
        ("spec.resources.postgres", &resources.postgres),
        ("spec.resources.router", &resources.router),
    ] {
        if let Some(r) = r {
            check_resources(path, r)?;
        }
    }
    Ok(Tuning {
        cache_rows: server.cache_rows,
        worker_threads: server.worker_threads,
        postgres_parameters: postgres.parameters,
        probes,
    })
}

/// `spec` over `default`, each field within Kubernetes' sense and ours.
fn probe(path: &str, spec: Option<&ProbeSpec>, default: ProbeTiming) -> Result<ProbeTiming, TuningError> {
    let Some(spec) = spec else { return Ok(default) };
    let range = |field: &'static str, value: i32, min: i32, max: i32| {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(TuningError::ProbeRange { path: path.to_owned(), field, value, min, max })
        }
    };
    let timing = ProbeTiming {
        initial_delay_seconds: spec
            .initial_delay_seconds
            .map(|v| range("initialDelaySeconds", v, 0, 3600))
            .transpose()?
            .or(default.initial_delay_seconds),
        period_seconds: range("periodSeconds", spec.period_seconds.unwrap_or(default.period_seconds), 1, 3600)?,
        timeout_seconds: range("timeoutSeconds", spec.timeout_seconds.unwrap_or(default.timeout_seconds), 1, 3600)?,
        failure_threshold: range(
            "failureThreshold",
            spec.failure_threshold.unwrap_or(default.failure_threshold),
            1,
            100,
        )?,
    };
    if timing.timeout_seconds > timing.period_seconds {
        return Err(TuningError::ProbeTimeout {
            path: path.to_owned(),
            timeout: timing.timeout_seconds,
            period: timing.period_seconds,
        });
    }
    Ok(timing)
}

fn check_resources(path: &str, r: &ContainerResources) -> Result<(), TuningError> {
    for (side, map) in [("requests", &r.requests), ("limits", &r.limits)] {
        let path = format!("{path}.{side}");
        for (name, value) in map {
            if !is_resource_name(name) {
                return Err(TuningError::ResourceName { path, name: name.clone() });
            }
            if quantity_value(value).is_none() {
                return Err(TuningError::ResourceQuantity { path, name: name.clone(), value: value.clone() });
            }
        }
    }
    for (name, request) in &r.requests {
        if let Some(limit) = r.limits.get(name)
            && quantity_value(request) > quantity_value(limit)
        {
            return Err(TuningError::RequestOverLimit {
                path: path.to_owned(),
                name: name.clone(),
                request: request.clone(),
                limit: limit.clone(),
            });
        }
    }
    Ok(())
}

/// `cpu`, `memory`, `ephemeral-storage`, `hugepages-2Mi`, or a domain-prefixed extended resource.
fn is_resource_name(name: &str) -> bool {
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    match name.rsplit_once('/') {
        Some((prefix, base)) => dns(prefix) && dns(base),
        None => dns(name),
    }
}

/// The value of a Kubernetes quantity (`500m`, `1.5`, `2Gi`, `1e3`), for comparing requests
/// with limits; `None` when it is not one.
fn quantity_value(s: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let end = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let valid_number = !number.is_empty()
        && number.chars().filter(|&c| c == '.').count() <= 1
        && !number.starts_with('.')
        && !number.ends_with('.');
    if !valid_number || s.len() > 32 {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "P" => 1e15,
        "E" => 1e18,
        _ if suffix.starts_with(['e', 'E']) => 10f64.powi(suffix[1..].parse::<i32>().ok().filter(|e| e.abs() <= 18)?),
        _ => SUFFIXES.iter().find(|(k, _)| *k == suffix)?.1,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::validate::tests::students;
    use crate::crd::{PostgresSpec, ResourcesSpec, RouterSpec, ShardServerSpec};

    fn with_parameters(pairs: &[(&str, &str)]) -> ShardedDatabaseSpec {
        let mut spec = students();
        let parameters = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        spec.postgres = Some(PostgresSpec { parameters, ..PostgresSpec::default() });
        spec
    }

    #[test]
    fn nothing_set_is_what_earlier_releases_built() {
        let t = validate_tuning(&students()).unwrap();
        assert_eq!((t.cache_rows, t.worker_threads), (None, None));
        assert!(t.postgres_parameters.is_empty());
        assert_eq!(t.probes, Probes::default());
        assert_eq!(t.probes.shard_server_readiness, ProbeTiming::new(5, 2, 3));
        assert_eq!(t.probes.postgres_liveness, ProbeTiming::new(10, 5, 6));
    }

    #[test]
    fn set_knobs_are_carried_and_probe_fields_left_out_keep_their_defaults() {
        let mut spec = with_parameters(&[("shared_buffers", "256MB"), ("checkpoint_timeout", "15min")]);
        spec.shard_server = Some(ShardServerSpec {
            cache_rows: Some(0),
            worker_threads: Some(4),
            readiness_probe: Some(ProbeSpec {
                period_seconds: Some(2),
                timeout_seconds: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.router = Some(RouterSpec {
            liveness_probe: Some(ProbeSpec { initial_delay_seconds: Some(5), ..Default::default() }),
            ..Default::default()
        });
        let t = validate_tuning(&spec).unwrap();
        assert_eq!((t.cache_rows, t.worker_threads), (Some(0), Some(4)));
        assert_eq!(t.probes.shard_server_readiness, ProbeTiming::new(2, 1, 3));
        assert_eq!(
            t.probes.router_liveness,
            ProbeTiming { initial_delay_seconds: Some(5), ..ProbeTiming::new(10, 2, 6) }
        );
        assert_eq!(t.postgres_parameters["checkpoint_timeout"], "15min");
    }

    #[test]
    fn knob_errors_name_the_field() {
        type Edit = fn(&mut ShardedDatabaseSpec);
        let cases: &[(Edit, &str)] = &[
            (
                |s| {
                    s.shard_server =
                        Some(ShardServerSpec { cache_rows: Some(MAX_CACHE_ROWS + 1), ..Default::default() })
                },
                "spec.shardServer.cacheRows (100000001) is more than 100000000",
            ),
            (
                |s| s.shard_server = Some(ShardServerSpec { worker_threads: Some(0), ..Default::default() }),
                "spec.shardServer.workerThreads (0) must be between 1 and 256",
            ),
            (
                |s| {
                    let probe = ProbeSpec { period_seconds: Some(0), ..Default::default() };
                    s.shard_server = Some(ShardServerSpec { liveness_probe: Some(probe), ..Default::default() })
                },
                "spec.shardServer.livenessProbe.periodSeconds (0) must be between 1 and 3600",
            ),
            (
                |s| {
                    let probe = ProbeSpec { timeout_seconds: Some(6), ..Default::default() };
                    s.router = Some(RouterSpec { readiness_probe: Some(probe), ..Default::default() })
                },
                "spec.router.readinessProbe.timeoutSeconds (6) exceeds its periodSeconds (5)",
            ),
            (
                |s| {
                    let probe = ProbeSpec { failure_threshold: Some(101), ..Default::default() };
                    s.postgres = Some(PostgresSpec { readiness_probe: Some(probe), ..Default::default() })
                },
                "spec.postgres.readinessProbe.failureThreshold (101) must be between 1 and 100",
            ),
            (
                |s| {
                    s.resources = Some(ResourcesSpec {
                        postgres: Some(ContainerResources {
                            requests: [("memory".into(), "2Gi".into())].into(),
                            limits: [("memory".into(), "1Gi".into())].into(),
                        }),
                        ..Default::default()
                    })
                },
                "spec.resources.postgres: requests.memory (2Gi) exceeds limits.memory (1Gi)",
            ),
            (
                |s| {
                    s.resources = Some(ResourcesSpec {
                        router: Some(ContainerResources {
                            limits: [("cpu".into(), "lots".into())].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                },
                "spec.resources.router.limits.cpu: \"lots\" is not a quantity like 500m, 2 or 1Gi",
            ),
            (
                |s| {
                    s.resources = Some(ResourcesSpec {
                        shard_server: Some(ContainerResources {
                            requests: [("CPU!".into(), "1".into())].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                },
                "spec.resources.shardServer.requests: \"CPU!\" is not a resource name",
            ),
        ];
        for (edit, want) in cases {
            let mut spec = students();
            edit(&mut spec);
            let got = validate_tuning(&spec).unwrap_err().to_string();
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn quantities_and_resource_names() {
        for (q, v) in [("500m", 0.5), ("2", 2.0), ("1Gi", 1073741824.0), ("1.5G", 1.5e9), ("1e3", 1000.0)] {
            assert_eq!(quantity_value(q), Some(v), "{q}");
        }
        for bad in ["", "m", "1 Gi", "1GB", ".5", "1.", "-1", "1e99"] {
            assert_eq!(quantity_value(bad), None, "{bad:?}");
        }
        assert!(quantity_value("900Mi") < quantity_value("1Gi"));
        for ok in ["cpu", "memory", "ephemeral-storage", "hugepages-2Mi", "nvidia.com/gpu"] {
            assert!(is_resource_name(ok), "{ok}");
        }
        for bad in ["", "-cpu", "a b", "x/", "/gpu"] {
            assert!(!is_resource_name(bad), "{bad:?}");
        }
    }
}
