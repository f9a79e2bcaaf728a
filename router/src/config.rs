//! The router's configuration: command-line flags (each with an environment variable), parsed
//! once into [`Config`] and passed down. Pure; no I/O.

use clap::Parser;
pub use shard_server::serve::parse_duration;
use shard_server::serve::{ServeArgs, ServeLimits};
use shard_server::tls::{CredentialArgs, Credentials};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// sharddb router: the stateless HTTP front door speaking the seed load-balancer API.
#[derive(Clone, Debug, Parser)]
#[command(name = "sharddb-router", version)]
pub struct Args {
    /// Address to serve HTTP on.
    #[arg(long, env = "SHARDDB_LISTEN", default_value = "0.0.0.0:5000")]
    pub listen: SocketAddr,

    /// Topology document to follow (written by the operator; reloaded on change).
    #[arg(
        long,
        env = "SHARDDB_TOPOLOGY_FILE",
        required_unless_present_any = ["topology_configmap", "topology_url"],
        conflicts_with_all = ["topology_configmap", "topology_url"]
    )]
    pub topology_file: Option<PathBuf>,

    /// Topology ConfigMap to follow through the Kubernetes API, as NAMESPACE/NAME.
    #[arg(long, env = "SHARDDB_TOPOLOGY_CONFIGMAP", value_parser = shard_server::topology_source::parse_configmap_ref, conflicts_with = "topology_url")]
    pub topology_configmap: Option<(String, String)>,

    /// Topology document served over HTTP by the local mode's operator (`GET URL?after=EPOCH`,
    /// long-polled), for a router in a network namespace of its own.
    #[arg(long, env = "SHARDDB_TOPOLOGY_URL")]
    pub topology_url: Option<String>,

    /// Limit on every call to a shard server, e.g. `10s` or `500ms`.
    #[arg(long, env = "SHARDDB_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Largest accepted request body, e.g. `16MiB`, `512KiB` or a number of bytes.
    #[arg(long, env = "SHARDDB_BODY_LIMIT", default_value = "16MiB", value_parser = parse_size)]
    pub body_limit: usize,

    /// The control plane's admin endpoint (e.g. `https://127.0.0.1:7100`), which `/init`, `/add`
    /// and `/rm` are passed to; without it they answer 501.
    #[arg(long, env = "SHARDDB_CONTROL_URL")]
    pub control_url: Option<String>,

    /// How this router proves itself to the shard servers and the control plane: `--tls-dir`
    /// (mutual TLS with the database's certificates) or, with TLS off, `--internal-token-file`
    /// and `--database`. One is required.
    #[command(flatten)]
    pub credentials: CredentialArgs,

    /// The CA bundle the control plane's certificate is checked against, when it is not the
    /// database's (in Kubernetes the operator serves every database under its own CA). Default:
    /// the `ca.crt` of --tls-dir.
    #[arg(long, env = "SHARDDB_CONTROL_CA")]
    pub control_ca: Option<PathBuf>,

    /// Require `Authorization: Bearer <token>` on `/init`, `/add` and `/rm`, the token being this
    /// file's content (re-read on every request, so a rotated Secret applies at once). Without
    /// it the verbs are open to whoever reaches the router.
    #[arg(long, env = "SHARDDB_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Serve the client port over HTTPS with this router's certificate (from --tls-dir) instead
    /// of plain HTTP. Clients check it against the database's CA.
    #[arg(long, env = "SHARDDB_SERVE_TLS", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub serve_tls: bool,
    /// Timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Args {
    pub fn config(&self) -> Config {
        Config {
            upstream_timeout: self.upstream_timeout,
            body_limit: self.body_limit,
            body_timeout: self.serve.body_timeout,
            retry: RetryPolicy::default(),
            control_url: self.control_url.clone(),
            credentials: None,
            control_credentials: None,
            admin_token_file: self.admin_token_file.clone(),
        }
    }

    /// The HTTP server's limits.
    pub fn serve_limits(&self) -> ServeLimits {
        self.serve.limits()
    }
}

/// What the request path needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    pub upstream_timeout: Duration,
    pub body_limit: usize,
    /// How long a request body may take to arrive in full (answered 408 past it).
    pub body_timeout: Duration,
    pub retry: RetryPolicy,
    /// Where the admin verbs go (see `control`); none when absent.
    pub control_url: Option<String>,
    /// What this router presents to shard servers (loaded by `main`); without it calls carry no
    /// credential and servers refuse them.
    pub credentials: Option<Credentials>,
    /// What it presents to the control plane, when that is checked against another CA.
    pub control_credentials: Option<Credentials>,
    /// The file holding the admin verbs' bearer token, when they need one.
    pub admin_token_file: Option<PathBuf>,
}

impl Config {
    /// The credentials for the control plane: its own when given, else the servers'.
    pub fn control_credentials(&self) -> Option<&Credentials> {
        self.control_credentials.as_ref().or(self.credentials.as_ref())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstream_timeout: Duration::from_secs(10),
            body_limit: 16 << 20,
            body_timeout: ServeLimits::DEFAULT_BODY_TIMEOUT,
            retry: RetryPolicy::default(),
            control_url: None,
            credentials: None,
            control_credentials: None,
            admin_token_file: None,
        }
    }
}

/// How long the router keeps trying a shard before answering 503.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Budget for retrying transport errors and `unavailable` answers.
    pub deadline: Duration,
    /// How long to wait for a newer topology after a shard server reports a topology mismatch.
    pub topology_wait: Duration,
    /// First pause between retries; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest a read waits for one copy while another is still untried (see `upstream`).
    pub read_attempt: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(5),
            topology_wait: Duration::from_secs(3),
            backoff_min: Duration::from_millis(25),
            backoff_max: Duration::from_millis(500),
            read_attempt: Duration::from_secs(2),
        }
    }
}

/// Parses a byte count with an optional `KiB`/`MiB`/`GiB` (or `K`/`M`/`G`) suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 16MiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        u => return Err(format!("unknown size unit {u:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let args = Args::try_parse_from(["sharddb-router", "--topology-file", "t.json"]).unwrap();
        assert_eq!(args.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(args.upstream_timeout, Duration::from_secs(10));
        assert_eq!(args.body_limit, 16 << 20);
        let args = Args::try_parse_from([
            "sharddb-router",
            "--topology-file",
            "t.json",
            "--listen",
            "127.0.0.1:7000",
            "--upstream-timeout",
            "750ms",
            "--body-limit",
            "1KiB",
        ])
        .unwrap();
        assert_eq!(args.listen.port(), 7000);
        assert_eq!(args.config().upstream_timeout, Duration::from_millis(750));
        assert_eq!(args.config().body_limit, 1024);
    }
}
