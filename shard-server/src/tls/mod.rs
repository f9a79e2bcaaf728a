//! Identity and encryption of traffic between a database's components (shard servers, routers,
//! the operator). Module docs here give the trust model; [`crate::auth`] applies it per endpoint.
//!
//! # Trust model
//! - **One CA per database.** The operator makes it (or takes a user-supplied one) and keeps its
//!   key to itself: a Secret in Kubernetes, `tls/ca.key` (0600) in local mode's data directory.
//!   It issues each component a certificate naming the component ([`identity`]): every shard
//!   server its own (`server/<Server0>`), the routers one, the operator one per database.
//! - **Mutual TLS on every internal hop.** Shard servers serve only TLS and ask every client for
//!   a certificate; routers and the operator present theirs. A certificate that does not chain to
//!   the database's CA ends the handshake; a client without one gets through the handshake only
//!   to be answered 401 by every internal endpoint. Clients verify servers' certificates against
//!   the CA and the host name they dialled.
//! - **Per endpoint, a role.** [`crate::auth`] lists which components may call what: routers the
//!   data path, servers replication and leases (a server may only speak as itself: the name in a
//!   request body must be the certificate's), the operator everything (it holds the CA and could
//!   issue itself any certificate anyway). A caller of another database is refused with 403 even
//!   under a CA shared between databases. Liveness (`/heartbeat`) and `/metrics` stay open.
//! - **Nothing is trusted from a request body**: a recover copies from the primary the server's
//!   own topology names, never from a URL it is sent.
//! - **Renewal without downtime**: certificates are re-read from their files every few seconds
//!   ([`source`]); a renewal happens while the old certificate has weeks left ([`issue`]).
//! - **TLS off** (local mode's `--internal-tls=false`, to measure what TLS costs): a per-cluster
//!   secret in a header authenticates the cluster's components instead, without encryption, and
//!   the component's role is taken from the caller's word. Never the default.
//! - **Running beside a release from before this layer** ([`InternalAuth`]): `none` serves and
//!   dials plain HTTP and accepts anyone, as that release did; `migrate` serves TLS and plain HTTP
//!   on one port, dials TLS, checks TLS callers by role and accepts plain ones as `none` does,
//!   counting them; `strict` (the default) is the trust model above. A rolling restart climbs
//!   from one rung to the next.

pub mod identity;
pub mod issue;
pub mod listener;
pub mod source;
pub mod testing;

pub use identity::{Component, DatabaseId, Identity};
pub use listener::{TlsListener, TlsPeer};
pub use source::{TlsFiles, TlsSource};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The header carrying the per-cluster secret when TLS is off.
pub const TOKEN_HEADER: &str = "x-sharddb-token";
/// The header naming the caller (an identity URI) when TLS is off.
pub const IDENTITY_HEADER: &str = "x-sharddb-identity";

/// How strictly a process authenticates internal traffic: the rungs a database climbs, one
/// rolling restart each, when it moves from a release without internal authentication to this one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InternalAuth {
    /// Plain HTTP both ways, anyone accepted: what the previous release did.
    None,
    /// TLS and plain HTTP served on one port, TLS dialled; TLS callers checked by role, plain ones
    /// accepted and counted (`sharddb_plain_internal_requests_total`).
    Migrate,
    /// Mutual TLS (or the per-cluster secret with TLS off) only.
    #[default]
    Strict,
}

impl InternalAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            InternalAuth::None => "none",
            InternalAuth::Migrate => "migrate",
            InternalAuth::Strict => "strict",
        }
    }

    /// Whether callers without credentials are served.
    pub fn accepts_plain(self) -> bool {
        self != InternalAuth::Strict
    }

    /// What this mode leaves open, for the warning a process logs at start; `None` for `strict`.
    pub fn weakness(self) -> Option<&'static str> {
        match self {
            InternalAuth::None => Some(
                "internal endpoints are served over plain HTTP to anyone who can reach them: any client \
                 can replicate into, reconfigure or recover this database's data",
            ),
            InternalAuth::Migrate => Some(
                "internal endpoints also answer plain HTTP callers without any check (counted in \
                 sharddb_plain_internal_requests_total): roll every process to --internal-auth=strict \
                 once that count stays at zero",
            ),
            InternalAuth::Strict => None,
        }
    }
}

impl std::fmt::Display for InternalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a component proves who it is to the others of its database, and checks them.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// Mutual TLS with certificates of the database's CA.
    Tls(Arc<TlsSource>),
    /// No encryption; a per-cluster secret in every internal request (local mode only).
    Token { secret: Arc<str>, identity: Identity },
    /// None at all: plain HTTP, as a release from before internal authentication spoke
    /// ([`InternalAuth::None`]).
    Plain,
}

impl Credentials {
    /// Who we are.
    pub fn identity(&self) -> Option<Identity> {
        match self {
            Credentials::Tls(source) => source.identity(),
            Credentials::Token { identity, .. } => Some(identity.clone()),
            Credentials::Plain => None,
        }
    }

    /// The scheme our peers serve on.
    pub fn scheme(&self) -> &'static str {
        match self {
            Credentials::Tls(_) => "https",
            Credentials::Token { .. } | Credentials::Plain => "http",
        }
    }

    /// An HTTP client presenting these credentials on every request, with the bounds of
    /// [`crate::api::http_client`].
    pub fn http_client(&self, request_timeout: Duration) -> reqwest::Client {
        self.client_builder().timeout(request_timeout).build().expect("HTTP client builds")
    }

    /// The common settings plus these credentials; the caller adds timeouts and builds.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        crate::api::install_crypto_provider();
        let builder = crate::api::client_defaults();
        match self {
            Credentials::Tls(source) => builder.tls_backend_preconfigured(source.client_config()),
            Credentials::Plain => builder,
            Credentials::Token { secret, identity } => {
                let mut headers = reqwest::header::HeaderMap::new();
                let mut token = reqwest::header::HeaderValue::from_str(secret).expect("the secret is a header value");
                token.set_sensitive(true);
                headers.insert(TOKEN_HEADER, token);
                headers.insert(
                    IDENTITY_HEADER,
                    reqwest::header::HeaderValue::from_str(&identity.uri()).expect("an identity URI is a header value"),
                );
                builder.default_headers(headers)
            }
        }
    }
}

/// The command-line flags every component takes to find its credentials.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CredentialArgs {
    /// Directory holding this component's certificate (`tls.crt`), key (`tls.key`) and the CA
    /// bundle it trusts (`ca.crt`), as a mounted Kubernetes TLS Secret has them. Re-read every
    /// few seconds, so a renewed certificate is used without a restart.
    #[arg(long, env = "SHARDDB_TLS_DIR", conflicts_with = "internal_token_file")]
    pub tls_dir: Option<PathBuf>,
    /// With TLS off (local mode, to measure its cost): a file holding the per-cluster secret
    /// every internal request carries instead of a certificate.
    #[arg(long, env = "SHARDDB_INTERNAL_TOKEN_FILE", requires = "database")]
    pub internal_token_file: Option<PathBuf>,
    /// The database this component belongs to, as NAMESPACE/NAME; with --internal-token-file
    /// (a certificate names its database itself).
    #[arg(long, env = "SHARDDB_DATABASE")]
    pub database: Option<String>,
    /// `strict` (default): only the database's components, by certificate. `none`: plain HTTP
    /// both ways and anyone accepted, to run beside a release from before internal
    /// authentication. `migrate`: TLS and plain HTTP on one port, TLS dialled, plain callers
    /// accepted and counted; the rung between the two. See the README's upgrade plan.
    #[arg(long, env = "SHARDDB_INTERNAL_AUTH", value_enum, default_value_t = InternalAuth::Strict)]
    pub internal_auth: InternalAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Tls(#[from] source::TlsError),
    #[error("cannot read the internal token file {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the internal token file {} is empty", .0.display())]
    EmptyToken(PathBuf),
    #[error("--database must be NAMESPACE/NAME, not {0:?}")]
    BadDatabase(String),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("the certificate in {} names no sharddb identity (a URI SAN {}...)", .0.display(), identity::URI_PREFIX)]
    NoIdentity(PathBuf),
    #[error("the certificate in {dir} names the {found}, but this process runs as the {expected}")]
    WrongIdentity { dir: String, found: Box<Identity>, expected: String },
    #[error("--internal-auth=migrate needs --tls-dir: it dials TLS and serves it beside plain HTTP")]
    MigrateWithoutTls,
}

impl CredentialArgs {
    /// The credentials these flags point at, for a component of kind `component` named `name`;
    /// `None` when neither flag is given. A certificate must name that component; its file is
    /// re-read every [`source::RELOAD_EVERY`] from then on (the caller runs in a Tokio runtime).
    pub fn load(&self, component: Component, name: &str) -> Result<Option<Credentials>, CredentialError> {
        match self.internal_auth {
            // Nothing to present or check, whatever else is given.
            InternalAuth::None => return Ok(Some(Credentials::Plain)),
            InternalAuth::Migrate if self.tls_dir.is_none() => return Err(CredentialError::MigrateWithoutTls),
            InternalAuth::Migrate | InternalAuth::Strict => {}
        }
        if let Some(dir) = &self.tls_dir {
            let source = TlsSource::open(TlsFiles::in_dir(dir))?;
            let identity = source.identity().ok_or_else(|| CredentialError::NoIdentity(dir.clone()))?;
            if identity.component != component || identity.name != name {
                return Err(CredentialError::WrongIdentity {
                    dir: dir.display().to_string(),
                    found: Box::new(identity),
                    expected: format!("{component} {name}"),
                });
            }
            source.watch(source::RELOAD_EVERY);
            return Ok(Some(Credentials::Tls(source)));
        }
        let Some(path) = &self.internal_token_file else { return Ok(None) };
        let secret = std::fs::read_to_string(path)
            .map_err(|source| CredentialError::Token { path: path.clone(), source })?
            .trim()
            .to_owned();
        if secret.is_empty() {
            return Err(CredentialError::EmptyToken(path.clone()));
        }
        let database = self.database.clone().unwrap_or_default();
        let Some((namespace, db)) = database.split_once('/') else {
            return Err(CredentialError::BadDatabase(database));
        };
        let identity = Identity::new(DatabaseId::new(namespace, db), component, name)?;
        Ok(Some(Credentials::Token { secret: secret.into(), identity }))
    }
}
