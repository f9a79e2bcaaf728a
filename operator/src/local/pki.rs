//! Local mode's credentials: a CA of the data directory and a certificate for every process, or,
//! with TLS off (`--internal-tls=false`), one per-cluster secret. Does I/O (files under `DIR/tls`).
//!
//! ```text
//! DIR/tls/ca.crt, ca.key          the cluster's CA (the key never leaves this directory)
//! DIR/tls/operator/               tls.crt, tls.key, ca.crt: the operator's certificate, which its
//!                                 control endpoint serves and its healer presents; also what a
//!                                 person or a test uses to call a shard server by hand
//! DIR/tls/router/                 the router's
//! DIR/tls/servers/<name>/         each shard server's
//! DIR/tls/internal-token          the per-cluster secret, with TLS off
//! ```
//! Directories are 0700 and files 0600, owned by whoever runs the operator (every process of the
//! cluster runs as that user; Postgres, which runs as `postgres` when we are root, reads none of
//! them). The database is `local/sharddb` in every identity: each data directory has its own CA,
//! so certificates of two local clusters never chain to each other's CA.
//!
//! Certificates are issued when missing, and again when less than 30 days of their 90 are left
//! ([`issue::needs_renewal`]): at start, once a minute while running ([`LocalPki::renew_due`]),
//! and on request (`DIR/control/renew-certs.all`, see `healer`). The processes re-read their files
//! every few seconds, so renewal needs no restart and interrupts no request.

use shard_server::tls::issue::{self, Ca, LeafRequest};
use shard_server::tls::source::{CA_FILE, RELOAD_EVERY};
use shard_server::tls::{Component, Credentials, DatabaseId, Identity, InternalAuth, TlsFiles, TlsSource};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// The directory under the data directory holding every credential.
pub const TLS_DIR: &str = "tls";
/// The per-cluster secret's file (TLS off).
pub const TOKEN_FILE: &str = "internal-token";
/// The namespace and name of the database in local mode's identities.
pub const LOCAL_NAMESPACE: &str = "local";
pub const LOCAL_DATABASE: &str = "sharddb";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA in {} cannot be used", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: issue::IssueError,
    },
    #[error("cannot issue a certificate for the {what}")]
    Issue {
        what: String,
        #[source]
        source: issue::IssueError,
    },
    #[error(transparent)]
    Identity(#[from] shard_server::tls::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] shard_server::tls::source::TlsError),
}

/// How internal traffic is protected.
enum Mode {
    Tls(Box<Ca>),
    Token(Arc<str>),
    /// Not at all (`--internal-auth=none`): plain HTTP, as a release from before internal
    /// authentication; nothing is issued or kept.
    Plain,
}

/// The cluster's credentials, kept in the data directory.
pub struct LocalPki {
    dir: PathBuf,
    database: DatabaseId,
    mode: Mode,
    /// The mode every process is started with (`--internal-auth`).
    auth: InternalAuth,
    /// The address each component serves on besides the loopback one (a network namespace's, see
    /// `hosts`), by its certificate directory: its certificate names it too.
    addresses: std::sync::Mutex<std::collections::HashMap<PathBuf, IpAddr>>,
}

/// The file beside a certificate naming the extra address it was issued for, so that a component
/// placed at another address (a later run on a new switch) gets a new certificate.
const ADDRESS_FILE: &str = "address";

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io { action, path: path.to_owned(), source }
}

/// Creates `dir` (and parents) readable by us alone.
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io("set permissions of", dir))
}

/// Writes `contents` to `path` atomically, 0600 from the first byte (a temporary file in the same
/// directory, renamed over the old one, so a reader sees the old file or the new one).
fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replace", path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io("read", path))
}

/// A secret of the cluster kept in `DIR/<file>` (0600), generated on first use: its file and
/// value. A run on the same data directory reuses it.
pub fn kept_secret(dir: &Path, file: &str) -> Result<(PathBuf, String), PkiError> {
    let path = dir.join(file);
    if let Ok(kept) = std::fs::read_to_string(&path)
        && !kept.trim().is_empty()
    {
        return Ok((path, kept.trim().to_owned()));
    }
    let secret = crate::k8s::build::secret::generate_password();
    write_private(&path, &secret)?;
    Ok((path, secret))
}

impl LocalPki {
    /// Opens (or creates) the credentials of the data directory `data_dir` for processes run in
    /// `auth` (with `none`, there are none and nothing is created).
    pub fn open(data_dir: &Path, tls: bool, auth: InternalAuth) -> Result<LocalPki, PkiError> {
        let dir = data_dir.join(TLS_DIR);
        let database = DatabaseId::new(LOCAL_NAMESPACE, LOCAL_DATABASE);
        if auth == InternalAuth::None {
            return Ok(LocalPki { dir, database, mode: Mode::Plain, auth, addresses: Default::default() });
        }
        private_dir(&dir)?;
        private_dir(&dir.join("servers"))?;
        let mode = if tls {
            let (cert, key) = (dir.join(CA_FILE), dir.join("ca.key"));
            let ca = if cert.is_file() && key.is_file() {
                Ca::from_pem(&read(&cert)?, &read(&key)?)
                    .map_err(|source| PkiError::Ca { path: cert.clone(), source })?
            } else {
                let ca = Ca::generate("sharddb local/sharddb CA", SystemTime::now(), issue::CA_VALIDITY)
                    .map_err(|source| PkiError::Ca { path: cert.clone(), source })?;
                // The key first: a CA certificate without its key would be kept and be useless.
                write_private(&key, ca.key_pem())?;
                write_private(&cert, ca.cert_pem())?;
                tracing::info!(path = %cert.display(), "created the cluster's CA");
                ca
            };
            Mode::Tls(Box::new(ca))
        } else {
            Mode::Token(kept_secret(&dir, TOKEN_FILE)?.1.into())
        };
        Ok(LocalPki { dir, database, mode, auth, addresses: Default::default() })
    }

    pub fn tls(&self) -> bool {
        matches!(self.mode, Mode::Tls(_))
    }

    /// The scheme shard servers and the control endpoint serve on.
    pub fn scheme(&self) -> &'static str {
        if self.tls() { "https" } else { "http" }
    }

    pub fn database(&self) -> &DatabaseId {
        &self.database
    }

    /// The CA certificate's file (TLS only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls().then(|| self.dir.join(CA_FILE))
    }

    /// The per-cluster secret's file (TLS off only).
    pub fn token_file(&self) -> Option<PathBuf> {
        matches!(self.mode, Mode::Token(_)).then(|| self.dir.join(TOKEN_FILE))
    }

    /// The mode every process is started with.
    pub fn internal_auth(&self) -> InternalAuth {
        self.auth
    }

    /// Where a component's certificate is kept.
    pub fn component_dir(&self, component: Component, name: &str) -> PathBuf {
        match component {
            Component::Server => self.dir.join("servers").join(name),
            Component::Router => self.dir.join("router"),
            Component::Operator => self.dir.join("operator"),
        }
    }

    /// Records that `component` `name` also serves on `address`; its next [`LocalPki::ensure`]
    /// issues a certificate naming that address if its current one does not.
    pub fn set_address(&self, component: Component, name: &str, address: IpAddr) {
        let dir = self.component_dir(component, name);
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if address.is_loopback() {
            addresses.remove(&dir);
        } else {
            addresses.insert(dir, address);
        }
    }

    fn identity(&self, component: Component, name: &str) -> Result<Identity, PkiError> {
        Ok(Identity::new(self.database.clone(), component, name)?)
    }

    /// Makes sure `component` `name` holds a valid certificate, issuing one when it has none, it
    /// is due for renewal, or `force`; whether one was issued. Nothing to do with TLS off.
    pub fn ensure(&self, component: Component, name: &str, force: bool) -> Result<bool, PkiError> {
        let Mode::Tls(ca) = &self.mode else { return Ok(false) };
        let identity = self.identity(component, name)?;
        let dir = self.component_dir(component, name);
        let files = TlsFiles::in_dir(&dir);
        let current = std::fs::read_to_string(&files.cert).ok();
        let now = SystemTime::now();
        let address = self.addresses.lock().unwrap_or_else(|e| e.into_inner()).get(&dir).copied();
        let issued_for = std::fs::read_to_string(dir.join(ADDRESS_FILE)).ok().and_then(|a| a.trim().parse().ok());
        let due = current.is_none_or(|c| issue::needs_renewal(&c, ca.cert_pem(), Some(&identity), now))
            || issued_for != address;
        if !due && !force && files.key.is_file() && files.ca.is_file() {
            return Ok(false);
        }
        private_dir(&dir)?;
        let mut request = LeafRequest::new(identity.clone());
        if component != Component::Router {
            // Servers and the control endpoint serve on the loopback address; the router's client
            // port is plain HTTP in local mode.
            request = request.on_loopback();
        }
        request.ips.extend(address);
        let issued =
            ca.issue(&request, now).map_err(|source| PkiError::Issue { what: identity.to_string(), source })?;
        write_private(&files.ca, ca.cert_pem())?;
        // Key before certificate: a reader between the two sees a mismatched pair, refuses it and
        // keeps what it had (see `TlsSource`); the other way round it would too, but this way the
        // window ends with the file it checks first.
        write_private(&files.key, &issued.key_pem)?;
        write_private(&files.cert, &issued.cert_pem)?;
        match address {
            Some(a) => write_private(&dir.join(ADDRESS_FILE), &a.to_string())?,
            None => {
                let _ = std::fs::remove_file(dir.join(ADDRESS_FILE));
            }
        }
        tracing::info!(identity = %identity, "certificate issued");
        Ok(true)
    }

    /// Forgets a removed server's certificate.
    pub fn remove_server(&self, name: &str) {
        let dir = self.component_dir(Component::Server, name);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(path = %dir.display(), error = %e, "cannot delete a removed server's certificate");
        }
    }

    /// Renews every certificate that is due (`force`: every one), for the router, the operator and
    /// `servers`; the names of those renewed.
    pub fn renew_due<'a>(
        &self,
        servers: impl IntoIterator<Item = &'a str>,
        force: bool,
    ) -> Result<Vec<String>, PkiError> {
        let mut renewed = Vec::new();
        let fixed = [(Component::Operator, "operator"), (Component::Router, "router")];
        for (component, name) in fixed.into_iter().chain(servers.into_iter().map(|s| (Component::Server, s))) {
            if self.ensure(component, name, force)? {
                renewed.push(name.to_owned());
            }
        }
        Ok(renewed)
    }

    /// The flags a process of `component` `name` is started with to find its credentials.
    /// The mode goes in [`LocalPki::process_env`].
    pub fn process_args(&self, component: Component, name: &str) -> Vec<String> {
        match &self.mode {
            Mode::Tls(_) => vec!["--tls-dir".into(), self.component_dir(component, name).display().to_string()],
            Mode::Token(_) => vec![
                "--internal-token-file".into(),
                self.dir.join(TOKEN_FILE).display().to_string(),
                "--database".into(),
                self.database.to_string(),
            ],
            Mode::Plain => Vec::new(),
        }
    }

    /// The environment every process is started with: its `--internal-auth` mode, always (so a
    /// mode in the operator's own environment never reaches it instead), and in the environment
    /// rather than as a flag so that a previous release's program, still run beside ours in
    /// `none`, starts too (it ignores the variable).
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![("SHARDDB_INTERNAL_AUTH".into(), self.auth.to_string())]
    }

    /// The operator's own credentials (its certificate is issued first if need be); with TLS the
    /// files are re-read as [`TlsSource`] does for every process.
    pub fn operator_credentials(&self) -> Result<Credentials, PkiError> {
        match &self.mode {
            Mode::Tls(_) => {
                self.ensure(Component::Operator, "operator", false)?;
                let source = TlsSource::open(TlsFiles::in_dir(&self.component_dir(Component::Operator, "operator")))?;
                source.watch(RELOAD_EVERY);
                Ok(Credentials::Tls(source))
            }
            Mode::Token(secret) => Ok(Credentials::Token {
                secret: secret.clone(),
                identity: self.identity(Component::Operator, "operator")?,
            }),
            Mode::Plain => Ok(Credentials::Plain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use shard_server::tls::source::{CERT_FILE, KEY_FILE};

    fn component_files(dir: &Path) -> [PathBuf; 3] {
        [dir.join(CERT_FILE), dir.join(KEY_FILE), dir.join(CA_FILE)]
    }

    #[test]
    fn certificates_are_private_kept_and_renewed_on_request() {
        let data = tempfile::tempdir().unwrap();
        let pki = LocalPki::open(data.path(), true, InternalAuth::Strict).unwrap();
        assert!(pki.ensure(Component::Server, "Server0", false).unwrap(), "issued when missing");
        assert!(!pki.ensure(Component::Server, "Server0", false).unwrap(), "kept while valid");
        let dir = pki.component_dir(Component::Server, "Server0");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data.path().join(TLS_DIR)), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(dir.parent().unwrap()), 0o700);
        for f in component_files(&dir).iter().chain([&data.path().join("tls/ca.key")]) {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        let before = std::fs::read_to_string(dir.join(CERT_FILE)).unwrap();
        let source = TlsSource::open(TlsFiles::in_dir(&dir)).unwrap();
        assert_eq!(source.identity().unwrap().uri(), "spiffe://sharddb.io/ns/local/db/sharddb/server/Server0");
        assert_eq!(pki.renew_due(["Server0"], true).unwrap(), ["operator", "router", "Server0"]);
        assert_ne!(std::fs::read_to_string(dir.join(CERT_FILE)).unwrap(), before);
        assert!(source.reload().unwrap(), "a process sees the renewed certificate");

        // Opened again, the same CA signs: the old certificates still verify against it.
        let again = LocalPki::open(data.path(), true, InternalAuth::Strict).unwrap();
        assert!(!again.ensure(Component::Server, "Server0", false).unwrap());
        pki.remove_server("Server0");
        assert!(!dir.exists());
    }

    #[test]
    fn without_tls_one_private_secret_is_kept() {
        let data = tempfile::tempdir().unwrap();
        let pki = LocalPki::open(data.path(), false, InternalAuth::Strict).unwrap();
        let file = pki.token_file().unwrap();
        let secret = std::fs::read_to_string(&file).unwrap();
        assert_eq!(secret.len(), 32);
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(
                LocalPki::open(data.path(), false, InternalAuth::Strict).unwrap().token_file().unwrap()
            )
            .unwrap(),
            secret
        );
        let args = pki.process_args(Component::Router, "router");
        assert_eq!(args[0], "--internal-token-file");
        assert_eq!(args[3], "local/sharddb");
        assert!(!pki.ensure(Component::Router, "router", true).unwrap());
    }
}
