//! `sharddb-operator`: runs the Kubernetes operator (`run`), runs a ShardedDatabase locally
//! (`local`), or prints the CRD (`crd`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use operator::k8s::process::{Listen, run_operator};
use operator::local::{LocalOptions, run_local};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "sharddb-operator", version, about = "The sharddb control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a ShardedDatabase on this machine: one throwaway Postgres and one shard server per
    /// server, and a router. Prints the router URL; stops everything on Ctrl-C or SIGTERM.
    Local {
        /// The ShardedDatabase resource (YAML, as given to kubectl apply). Without it the cluster
        /// starts empty and waits for the router's `POST /init`; a data directory holding a
        /// `declared.json` from an earlier run resumes that configuration instead.
        spec: Option<PathBuf>,
        /// Where data, logs, topology.json and cluster.json go; a new temporary directory (kept)
        /// when absent. An existing directory's data is reused.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The router's port on 127.0.0.1 (0 picks a free one), or on its own address with --netns
        /// (0: 5000).
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// Directory holding sharddb-shard-server and sharddb-router; default: this program's own.
        #[arg(long, env = "SHARDDB_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Directory holding the PostgreSQL binaries (initdb, pg_ctl); default: initdb on PATH, else
        /// the newest /usr/lib/postgresql/*/bin.
        #[arg(long, env = "SHARDDB_PG_BIN")]
        pg_bin: Option<PathBuf>,
        /// Mutual TLS between the cluster's processes under a CA kept in the data directory. With
        /// `--internal-tls=false` a per-cluster secret still authenticates them, but nothing is
        /// encrypted: meant for measuring what TLS costs.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
              default_missing_value = "true")]
        internal_tls: bool,
        /// Make the router's `/init`, `/add` and `/rm` require `Authorization: Bearer <token>`,
        /// the token being in `DIR/admin-token` (generated, 0600). Off by default: the seed's
        /// clients call them without one, on 127.0.0.1.
        #[arg(long)]
        admin_token: bool,
        /// How every process authenticates internal traffic: `strict` (mutual TLS), `migrate`
        /// (TLS, and plain HTTP accepted and counted) or `none` (plain HTTP, anyone accepted).
        /// Default: `none` for a data directory a release from before internal authentication
        /// made (it has no `tls/`), so its processes still running can be replaced one at a
        /// time, else `strict`. See the README's upgrade plan.
        #[arg(long, env = "SHARDDB_INTERNAL_AUTH", value_enum)]
        internal_auth: Option<shard_server::tls::InternalAuth>,
        /// Run the router and every shard server in a network namespace of its own, attached to a
        /// private switch (namespaces `ID-net`, `ID-router`, `ID-<server>`), so that links between
        /// them can be cut; `cluster.json` says where. ID: 1 to 10 lowercase letters and digits,
        /// unique on this machine. Needs root; the namespaces are deleted on exit.
        #[arg(long, value_name = "ID")]
        netns: Option<String>,
    },
    /// Print the ShardedDatabase CustomResourceDefinition as YAML.
    Crd,
    /// Run the Kubernetes operator: reconcile every ShardedDatabase in the cluster (kubeconfig or
    /// in-cluster configuration) until SIGTERM or Ctrl-C.
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where `/metrics` (Prometheus), `/healthz` (alive) and `/readyz` (reconciling, i.e. leading
    /// when leader election is on) are served.
    #[arg(long, env = "SHARDDB_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Where the admin endpoint is served: the seed's `/init`, `/add`, `/rm` for each database
    /// under `/databases/{namespace}/{name}/`, forwarded by its routers.
    #[arg(long, env = "SHARDDB_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    admin_addr: std::net::SocketAddr,
    /// The admin endpoint's base URL as routers reach it (the operator's Service, set by the Helm
    /// chart). Without it, routers are built without a control plane and the verbs answer 501.
    #[arg(long, env = "SHARDDB_ADMIN_URL")]
    admin_url: Option<String>,
    /// Reconcile only while holding a coordination Lease, so that of several replicas one acts.
    #[arg(long, env = "SHARDDB_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, env = "SHARDDB_LEASE_NAME", default_value = "sharddb-operator")]
    lease_name: String,
    /// The Lease's namespace; default: this pod's (POD_NAMESPACE).
    #[arg(long, env = "SHARDDB_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This pod's namespace, from the downward API.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pod_namespace: Option<String>,
    /// Who holds the Lease: this pod's name, from the downward API; default: the host name.
    #[arg(long, env = "POD_NAME", hide = true)]
    pod_name: Option<String>,
    /// The shard-server image of a ShardedDatabase whose spec.images leaves it out.
    #[arg(long, env = "SHARDDB_SHARD_SERVER_IMAGE", default_value = operator::crd::DEFAULT_SHARD_SERVER_IMAGE)]
    shard_server_image: String,
    /// The router image of a ShardedDatabase whose spec.images leaves it out.
    #[arg(long, env = "SHARDDB_ROUTER_IMAGE", default_value = operator::crd::DEFAULT_ROUTER_IMAGE)]
    router_image: String,
    /// The PostgreSQL image of a ShardedDatabase whose spec.images leaves it out.
    #[arg(long, env = "SHARDDB_POSTGRES_IMAGE", default_value = operator::crd::DEFAULT_POSTGRES_IMAGE)]
    postgres_image: String,
    /// The Secret (in this pod's namespace) keeping the operator's own CA, which signs its admin
    /// endpoint's certificate; made on first start. Without it (or outside a cluster) the CA is
    /// held in memory and changes with every start.
    #[arg(long, env = "SHARDDB_OPERATOR_CA_SECRET")]
    operator_ca_secret: Option<String>,
    /// Routers' `/init`, `/add` and `/rm` require the bearer token of the Secret
    /// `<db>-admin-token` (on by default).
    #[arg(long, env = "SHARDDB_REQUIRE_ADMIN_TOKEN", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    require_admin_token: bool,
    /// Give each database a NetworkPolicy admitting only its routers, its servers and the
    /// operator to its servers (on by default; needs POD_NAMESPACE and --operator-pod-labels).
    #[arg(long, env = "SHARDDB_NETWORK_POLICIES", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    network_policies: bool,
    /// Labels selecting the operator's pods, as `key=value,key=value` (the chart sets them).
    #[arg(long, env = "SHARDDB_OPERATOR_POD_LABELS", value_parser = parse_labels)]
    operator_pod_labels: Option<std::collections::BTreeMap<String, String>>,
    /// Watch only these namespaces (comma-separated), with namespaced Roles there instead of a
    /// ClusterRole; default: every namespace.
    #[arg(long, env = "SHARDDB_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
}

/// `key=value,key=value` → a label map.
fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

impl RunArgs {
    /// The Lease to hold, when leader election is on.
    fn lease(&self) -> anyhow::Result<Option<operator::k8s::leader::LeaseConfig>> {
        if !self.leader_elect {
            return Ok(None);
        }
        let namespace = self
            .lease_namespace
            .clone()
            .or_else(|| self.pod_namespace.clone())
            .filter(|ns| !ns.is_empty())
            .context("leader election needs the Lease's namespace: set --lease-namespace or POD_NAMESPACE")?;
        let identity = match self.pod_name.clone().filter(|n| !n.is_empty()) {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("cannot read the host name; set POD_NAME")?
                .trim()
                .to_owned(),
        };
        Ok(Some(operator::k8s::leader::LeaseConfig::new(self.lease_name.clone(), namespace, identity)))
    }

    fn config(&self) -> anyhow::Result<operator::k8s::controller::Config> {
        let network_policy = if self.network_policies {
            let namespace = self.pod_namespace.clone().filter(|ns| !ns.is_empty()).context(
                "NetworkPolicies need the operator's namespace (POD_NAMESPACE); or pass --network-policies=false",
            )?;
            let labels = self.operator_pod_labels.clone().filter(|l| !l.is_empty()).context(
                "NetworkPolicies need the operator's pod labels (--operator-pod-labels); or pass --network-policies=false",
            )?;
            Some(operator::k8s::build::netpol::OperatorPods { namespace, labels })
        } else {
            None
        };
        let namespaces: Vec<String> = self.namespaces.iter().filter(|n| !n.is_empty()).cloned().collect();
        Ok(operator::k8s::controller::Config {
            default_images: operator::brain::validate::Images {
                shard_server: self.shard_server_image.clone(),
                router: self.router_image.clone(),
                postgres: self.postgres_image.clone(),
            },
            admin_url: self.admin_url.clone().filter(|u| !u.is_empty()),
            require_admin_token: self.require_admin_token,
            network_policy,
            namespaces: (!namespaces.is_empty()).then_some(namespaces),
            ..operator::k8s::controller::Config::default()
        })
    }
}

fn main() -> ExitCode {
    shard_server::api::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", operator::crd::crd_yaml().context("failed to render the CRD")?);
            Ok(())
        }
        Command::Run(args) => {
            let args = *args;
            let lease = args.lease()?;
            let config = args.config()?;
            let ca_secret = match (&args.operator_ca_secret, args.pod_namespace.as_deref().filter(|n| !n.is_empty())) {
                (Some(name), Some(ns)) => Some((ns.to_owned(), name.clone())),
                (Some(_), None) => anyhow::bail!("--operator-ca-secret needs the operator's namespace (POD_NAMESPACE)"),
                (None, _) => None,
            };
            let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            let listen = Listen { metrics: args.metrics_addr, admin: args.admin_addr };
            runtime.block_on(run_operator(listen, config, lease, ca_secret))
        }
        Command::Local { spec, data_dir, port, bin_dir, pg_bin, netns, internal_tls, admin_token, internal_auth } => {
            if internal_auth == Some(shard_server::tls::InternalAuth::Migrate) && !internal_tls {
                anyhow::bail!("--internal-auth=migrate needs internal TLS (it serves TLS beside plain HTTP)");
            }
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .context("cannot find this program's path; pass --bin-dir")?
                    .parent()
                    .context("this program has no directory; pass --bin-dir")?
                    .to_owned(),
            };
            let opts =
                LocalOptions { spec, data_dir, port, bin_dir, pg_bin, netns, internal_tls, admin_token, internal_auth };
            let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            runtime.block_on(run_local(opts))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let fixed = ["sharddb-operator", "run", "--network-policies=false"];
        let cli = Cli::try_parse_from(fixed.iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn leader_election_is_off_by_default_and_needs_a_namespace_when_on() {
        // The chart sets these through the environment; explicit flags here keep the test
        // independent of the environment it runs in.
        let args = run_args(&["--leader-elect=false"]);
        assert!(args.lease().unwrap().is_none());
        let args = run_args(&["--leader-elect", "--lease-name", "l", "--lease-namespace", "ops", "--pod-name", "p-0"]);
        let lease = args.lease().unwrap().unwrap();
        assert_eq!((lease.name.as_str(), lease.namespace.as_str(), lease.identity.as_str()), ("l", "ops", "p-0"));
        let args = run_args(&["--leader-elect=true", "--pod-namespace", "pods", "--pod-name", "p-0"]);
        assert_eq!(args.lease().unwrap().unwrap().namespace, "pods");
    }

    #[test]
    fn security_flags_become_the_configuration() {
        let config = run_args(&[]).config().unwrap();
        assert!(config.require_admin_token, "admin verbs need a token by default");
        assert_eq!(config.network_policy, None);
        assert_eq!(config.namespaces, None);
        let cli = Cli::try_parse_from([
            "sharddb-operator",
            "run",
            "--pod-namespace",
            "ops",
            "--operator-pod-labels",
            "app.kubernetes.io/name=sharddb-operator,app.kubernetes.io/instance=x",
            "--namespaces",
            "a,b",
            "--require-admin-token=false",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        let config = args.config().unwrap();
        let pods = config.network_policy.unwrap();
        assert_eq!(pods.namespace, "ops");
        assert_eq!(pods.labels["app.kubernetes.io/instance"], "x");
        assert_eq!(config.namespaces, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert!(!config.require_admin_token);
        // On by default, NetworkPolicies cannot be built without knowing the operator's pods.
        let cli = Cli::try_parse_from(["sharddb-operator", "run"]).unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        let pods_known = args.pod_namespace.is_some() && args.operator_pod_labels.is_some();
        assert_eq!(args.config().is_ok(), pods_known);
        assert!(parse_labels("a=b,c").is_err());
    }

    #[test]
    fn image_flags_become_the_default_images() {
        let args =
            run_args(&["--router-image", "m/r:1", "--postgres-image", "m/pg:1", "--shard-server-image", "m/s:1"]);
        let images = args.config().unwrap().default_images;
        assert_eq!(
            (images.router.as_str(), images.postgres.as_str(), images.shard_server.as_str()),
            ("m/r:1", "m/pg:1", "m/s:1")
        );
    }
}
