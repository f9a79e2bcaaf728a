//! A database's certificate authority and the certificates it issues to the database's
//! components (rcgen, ECDSA P-256). No I/O: keys and certificates go in and out as PEM text,
//! and the caller decides where they are kept (a Secret, files in the data directory).
//!
//! Lifetimes follow what CloudNativePG users know: a leaf certificate lives 90 days and is
//! renewed once less than 30 remain ([`needs_renewal`]), so a renewal that fails is noticed and
//! retried for weeks before anything expires. The CA lives 10 years; replacing it means issuing
//! every leaf again under the new one (see the README's Security section).

use super::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// How long a leaf certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// A leaf certificate with less than this left is issued again.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a CA made by sharddb is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start to be valid this long before they are made, so a clock slightly behind
/// the issuer's does not refuse a fresh one.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CA certificate cannot be read: {0}")]
    BadCaCertificate(String),
    #[error("the CA key cannot be read: {0}")]
    BadCaKey(String),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("{0} is not a valid DNS name for a certificate")]
    BadDnsName(String),
    #[error("the certificate cannot be read: {0}")]
    BadCertificate(String),
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRequest {
    /// The component it speaks for (a URI SAN); `None` for a plain serving certificate (the
    /// operator's admin endpoint in Kubernetes, which serves every database).
    pub identity: Option<Identity>,
    /// Host names it serves under.
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub validity: Duration,
}

impl LeafRequest {
    pub fn new(identity: Identity) -> Self {
        LeafRequest { identity: Some(identity), dns_names: Vec::new(), ips: Vec::new(), validity: LEAF_VALIDITY }
    }

    /// Also serves on the loopback address and `localhost` (local mode).
    pub fn on_loopback(mut self) -> Self {
        self.dns_names.push("localhost".into());
        self.ips.push(IpAddr::from([127, 0, 0, 1]));
        self
    }

    pub fn with_dns_names(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.dns_names.extend(names);
        self
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// A CA able to sign: its certificate and key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive integer in DER: the top bit clear.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid from now for `lifetime`.
    pub fn generate(common_name: &str, now: SystemTime, lifetime: Duration) -> Result<Ca, IssueError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sharddb");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        // It signs leaf certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        validity(&mut params, now, lifetime);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(Ca { cert_pem, key_pem, issuer: Issuer::new(params, key) })
    }

    /// A CA kept earlier (or supplied by the user): its certificate and PKCS#8 key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| IssueError::BadCaKey(e.to_string()))?;
        let der = first_certificate(cert_pem).map_err(IssueError::BadCaCertificate)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| IssueError::BadCaCertificate(e.to_string()))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(IssueError::KeyMismatch);
        }
        if !parsed.is_ca() {
            return Err(IssueError::BadCaCertificate("it is not a CA certificate (basicConstraints CA:FALSE)".into()));
        }
        let issuer =
            Issuer::from_ca_cert_der(&der.into(), key).map_err(|e| IssueError::BadCaCertificate(e.to_string()))?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs a fresh key pair's certificate for `req`, valid from now.
    pub fn issue(&self, req: &LeafRequest, now: SystemTime) -> Result<Issued, IssueError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sharddb");
        let cn = match &req.identity {
            Some(id) => format!("{} {}", id.component, id.name),
            None => req.dns_names.first().cloned().unwrap_or_else(|| "sharddb".into()),
        };
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every component is both: servers answer and call peers, routers call servers and may
        // answer clients over TLS, the operator calls servers and answers routers.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, now, req.validity);
        for name in &req.dns_names {
            let dns = name.clone().try_into().map_err(|_| IssueError::BadDnsName(name.clone()))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.subject_alt_names.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        if let Some(id) = &req.identity {
            let uri = id.uri().try_into().map_err(|_| IssueError::BadDnsName(id.uri()))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The first certificate of a PEM text, as DER.
pub fn first_certificate(pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no certificate in the PEM text".to_owned())?
        .map(|c| c.to_vec())
        .map_err(|e| e.to_string())
}

/// When the first certificate of a PEM text stops being valid.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, IssueError> {
    let der = first_certificate(cert_pem).map_err(IssueError::BadCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| IssueError::BadCertificate(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// Whether a kept certificate must be issued again: unreadable, not signed by `ca_pem`'s
/// certificate, naming another identity, or with less than [`RENEW_BEFORE`] left.
pub fn needs_renewal(cert_pem: &str, ca_pem: &str, want: Option<&Identity>, now: SystemTime) -> bool {
    let Ok(expiry) = not_after(cert_pem) else { return true };
    if expiry < now + RENEW_BEFORE {
        return true;
    }
    let (Ok(der), Ok(ca_der)) = (first_certificate(cert_pem), first_certificate(ca_pem)) else { return true };
    let (Ok((_, cert)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(&der), x509_parser::parse_x509_certificate(&ca_der))
    else {
        return true;
    };
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return true;
    }
    match want {
        Some(want) => Identity::from_certificate(&der).ok().as_ref() != Some(want),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::DatabaseId;

    fn new_ca() -> Ca {
        Ca::generate("sharddb test CA", SystemTime::now(), CA_VALIDITY).unwrap()
    }

    #[test]
    fn a_leaf_names_its_identity_and_chains_to_its_ca() {
        let ca = new_ca();
        let id = Identity::server(DatabaseId::new("prod", "students"), "Server3").unwrap();
        let now = SystemTime::now();
        let leaf = ca.issue(&LeafRequest::new(id.clone()).on_loopback(), now).unwrap();
        let der = first_certificate(&leaf.cert_pem).unwrap();
        assert_eq!(Identity::from_certificate(&der).unwrap(), id);
        let expiry = not_after(&leaf.cert_pem).unwrap();
        let lifetime = expiry.duration_since(now).unwrap();
        assert!(lifetime <= LEAF_VALIDITY && lifetime > LEAF_VALIDITY - Duration::from_secs(5), "{lifetime:?}");
        assert!(!needs_renewal(&leaf.cert_pem, ca.cert_pem(), Some(&id), now));
        // Another CA did not sign it.
        assert!(needs_renewal(&leaf.cert_pem, new_ca().cert_pem(), Some(&id), now));
        // Another identity is wanted.
        let other = Identity::server(DatabaseId::new("prod", "students"), "Server4").unwrap();
        assert!(needs_renewal(&leaf.cert_pem, ca.cert_pem(), Some(&other), now));
        // Two months on, less than 30 days are left.
        assert!(needs_renewal(&leaf.cert_pem, ca.cert_pem(), Some(&id), now + Duration::from_secs(61 * 24 * 3600)));
        assert!(needs_renewal("not a certificate", ca.cert_pem(), Some(&id), now));
    }

    #[test]
    fn a_kept_ca_signs_like_the_fresh_one() {
        let fresh = new_ca();
        let kept = Ca::from_pem(fresh.cert_pem(), fresh.key_pem()).unwrap();
        let id = Identity::router(DatabaseId::new("local", "students")).unwrap();
        let leaf = kept.issue(&LeafRequest::new(id.clone()), SystemTime::now()).unwrap();
        assert!(!needs_renewal(&leaf.cert_pem, fresh.cert_pem(), Some(&id), SystemTime::now()));
        // A key that is not the CA's is refused.
        let stranger = KeyPair::generate().unwrap().serialize_pem();
        assert!(matches!(Ca::from_pem(fresh.cert_pem(), &stranger), Err(IssueError::KeyMismatch)));
        // A leaf certificate is no CA.
        assert!(matches!(Ca::from_pem(&leaf.cert_pem, &leaf.key_pem), Err(IssueError::BadCaCertificate(_))));
    }
}
