//! A component's certificate, key and trusted CA bundle, and the rustls configurations built on
//! them. Does I/O (reads the files, and re-reads them while the process runs).
//!
//! The files follow a Kubernetes TLS Secret's keys: `tls.crt` (the certificate, then any
//! intermediates), `tls.key` (PKCS#8 or SEC1 key) and `ca.crt` (the CA bundle trusted for peers).
//! Kubernetes updates a mounted Secret's files in place when the operator renews a certificate,
//! and local mode rewrites them, so a [`TlsSource`] re-reads them every few seconds
//! ([`TlsSource::watch`]) and every new connection from then on uses the new certificate;
//! connections already open keep theirs (the old certificate stays valid for weeks after a
//! renewal). A change that does not load (a half-written file, a key of another certificate) is
//! logged and the previous material kept.
//!
//! Both directions verify: a server asks every client for a certificate of the trusted CA but
//! lets a client without one finish the handshake, so that the HTTP layer can answer it 401
//! (see [`crate::auth`]); a certificate that does not chain to the CA ends the handshake.

use super::identity::Identity;
use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// How often the files are looked at again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} holds no usable {kind}: {detail}")]
    Pem { what: String, kind: &'static str, detail: String },
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot trust the CA bundle {what}: {detail}")]
    Verifier { what: String, detail: String },
}

/// Where a component's TLS material is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir` (a mounted Secret, or local mode's directory).
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { cert: dir.join(CERT_FILE), key: dir.join(KEY_FILE), ca: dir.join(CA_FILE) }
    }

    fn read(&self) -> Result<Pem, TlsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
        };
        Ok(Pem { cert: read(&self.cert)?, key: read(&self.key)?, ca: read(&self.ca)? })
    }
}

/// The PEM texts one [`Material`] is built from.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").field("cert", &self.cert).field("ca", &self.ca).finish_non_exhaustive()
    }
}

/// Everything built from one version of the files.
struct Material {
    pem: Pem,
    key: Arc<CertifiedKey>,
    /// The identity our own certificate names (`None` for a plain serving certificate).
    identity: Option<Identity>,
    /// Verifies the servers we call.
    servers: Arc<WebPkiServerVerifier>,
    /// Verifies the clients calling us; lets a client without a certificate through.
    clients: Arc<dyn ClientCertVerifier>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    fn build(pem: Pem, what: &str) -> Result<Material, TlsError> {
        let bad = |kind, detail: String| TlsError::Pem { what: what.to_owned(), kind, detail };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate", e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("certificate", "no CERTIFICATE block".into()));
        }
        let key_der =
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| bad("private key", e.to_string()))?;
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|source| TlsError::Rustls { what: what.to_owned(), source })?;
        let key = CertifiedKey::new(chain.clone(), signing);
        key.keys_match()
            .map_err(|source| TlsError::Rustls { what: format!("{what} (key and certificate)"), source })?;
        let identity = Identity::from_certificate(&chain[0]).ok();

        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(pem.ca.as_bytes()) {
            let ca = ca.map_err(|e| bad("CA certificate", e.to_string()))?;
            roots.add(ca).map_err(|source| TlsError::Rustls { what: format!("{what} (CA bundle)"), source })?;
        }
        if roots.is_empty() {
            return Err(bad("CA certificate", "no CERTIFICATE block".into()));
        }
        let roots = Arc::new(roots);
        let verifier_error =
            |e: &dyn std::fmt::Display| TlsError::Verifier { what: what.to_owned(), detail: e.to_string() };
        let servers = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| verifier_error(&e))?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| verifier_error(&e))?;
        Ok(Material { pem, key: Arc::new(key), identity, servers, clients })
    }
}

/// A component's TLS material, kept current. Cheap to share behind an `Arc`.
pub struct TlsSource {
    /// `None` for material held only in memory (the operator's per-database client certificates).
    files: Option<TlsFiles>,
    current: ArcSwap<Material>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource").field("files", &self.files).field("identity", &self.identity()).finish()
    }
}

impl TlsSource {
    /// Loads the files; they must be valid now (a process does not start without its identity).
    pub fn open(files: TlsFiles) -> Result<Arc<TlsSource>, TlsError> {
        let material = Material::build(files.read()?, &files.cert.display().to_string())?;
        Ok(Arc::new(TlsSource { files: Some(files), current: ArcSwap::from_pointee(material) }))
    }

    /// Material held in memory only.
    pub fn from_pem(pem: Pem) -> Result<Arc<TlsSource>, TlsError> {
        let material = Material::build(pem, "certificate in memory")?;
        Ok(Arc::new(TlsSource { files: None, current: ArcSwap::from_pointee(material) }))
    }

    /// Replaces material held in memory (a renewed certificate); new connections use it.
    pub fn replace(&self, pem: Pem) -> Result<(), TlsError> {
        if self.current.load().pem == pem {
            return Ok(());
        }
        self.current.store(Arc::new(Material::build(pem, "certificate in memory")?));
        Ok(())
    }

    /// The PEM texts in use.
    pub fn pem(&self) -> Pem {
        self.current.load().pem.clone()
    }

    /// The identity our certificate names, if it names one.
    pub fn identity(&self) -> Option<Identity> {
        self.current.load().identity.clone()
    }

    /// Re-reads the files now; whether anything changed. A change that does not load is an error
    /// and the material in use stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else { return Ok(false) };
        let pem = files.read()?;
        if self.current.load().pem == pem {
            return Ok(false);
        }
        let material = Material::build(pem, &files.cert.display().to_string())?;
        self.current.store(Arc::new(material));
        Ok(true)
    }

    /// Re-reads the files every `every` for as long as the returned task runs.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticks.tick().await;
                match me.reload() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(files = ?me.files, identity = ?me.identity().map(|i| i.to_string()), "TLS certificate reloaded");
                    }
                    Ok(false) => failing = false,
                    Err(e) => {
                        // Said once per failing stretch: a file being rewritten is normal for a moment.
                        if !failing {
                            tracing::warn!(error = %e, "cannot reload the TLS certificate; keeping the one in use");
                        }
                        failing = true;
                    }
                }
            }
        })
    }

    /// A server configuration: presents our certificate, asks clients for theirs (optional at the
    /// TLS level, required per endpoint by [`crate::auth`]).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(Arc::new(Clients(Arc::clone(self))))
            .with_cert_resolver(Arc::new(Ours(Arc::clone(self))));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A client configuration: verifies servers against the CA bundle and their host name, and
    /// presents our certificate when asked.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            // Not a weakened check: `Servers` is webpki's full verification, against whatever CA
            // bundle is current rather than one fixed when the client was built.
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Servers(Arc::clone(self))))
            .with_client_cert_resolver(Arc::new(Ours(Arc::clone(self))));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

/// Our certificate, as whatever version is current.
#[derive(Debug)]
struct Ours(Arc<TlsSource>);

impl ResolvesServerCert for Ours {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Ours {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies servers against the current CA bundle.
#[derive(Debug)]
struct Servers(Arc<TlsSource>);

impl ServerCertVerifier for Servers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current.load().servers.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().servers.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().servers.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current.load().servers.supported_verify_schemes()
    }
}

/// Verifies clients against the current CA bundle; a client without a certificate passes here
/// and is refused per endpoint.
#[derive(Debug)]
struct Clients(Arc<TlsSource>);

impl ClientCertVerifier for Clients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to outlive a reload; our clients hold one certificate and send it anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current.load().clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().clients.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().clients.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current.load().clients.supported_verify_schemes()
    }
}
