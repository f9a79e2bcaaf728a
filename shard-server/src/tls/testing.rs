//! A CA and credentials held in memory, for tests and tools that start components in-process.
//! Pure apart from key generation.

use super::issue::{CA_VALIDITY, Ca, LeafRequest};
use super::source::{Pem, TlsSource};
use super::{Component, Credentials, DatabaseId, Identity};
use std::time::SystemTime;

/// A database's CA, issuing credentials on demand.
pub struct TestPki {
    pub ca: Ca,
    pub database: DatabaseId,
}

impl TestPki {
    /// A fresh CA for database `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> TestPki {
        let ca = Ca::generate(&format!("sharddb {namespace}/{name} test CA"), SystemTime::now(), CA_VALIDITY)
            .expect("a CA can be made");
        TestPki { ca, database: DatabaseId::new(namespace, name) }
    }

    /// The identity of `component` `name` of this database.
    pub fn identity(&self, component: Component, name: &str) -> Identity {
        Identity::new(self.database.clone(), component, name).expect("a valid test identity")
    }

    /// The PEM texts of a fresh certificate for `identity` (signed by this CA, whatever database
    /// it names), serving on the loopback address.
    pub fn issue(&self, identity: Identity) -> Pem {
        let issued = self
            .ca
            .issue(&LeafRequest::new(identity).on_loopback(), SystemTime::now())
            .expect("a certificate can be issued");
        Pem { cert: issued.cert_pem, key: issued.key_pem, ca: self.ca.cert_pem().to_owned() }
    }

    /// TLS credentials of `component` `name` of this database.
    pub fn credentials(&self, component: Component, name: &str) -> Credentials {
        self.credentials_of(self.identity(component, name))
    }

    /// TLS credentials naming any identity (another database's, to test refusals), signed by
    /// this CA.
    pub fn credentials_of(&self, identity: Identity) -> Credentials {
        Credentials::Tls(TlsSource::from_pem(self.issue(identity)).expect("issued material loads"))
    }

    /// An HTTP client that trusts this CA but presents no certificate.
    pub fn anonymous_http(&self, timeout: std::time::Duration) -> reqwest::Client {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        crate::api::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).expect("the CA certificate parses");
        roots.add(ca).expect("the CA certificate is a root");
        let mut config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        crate::api::client_defaults().tls_backend_preconfigured(config).timeout(timeout).build().expect("client builds")
    }
}
