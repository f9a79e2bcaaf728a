//! The Secrets of a database's identities: its CA, each server's certificate, the routers'
//! certificate and the admin token. Pure: keys and certificates are inputs (issued by the
//! controller, see `k8s::pki`), as the Postgres password is for `secret`.
//!
//! Every certificate Secret is a `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`
//! (the layout cert-manager writes), mounted whole at `/etc/sharddb/tls`, so a renewal written
//! here reaches the pod's files without a restart. The CA key is in `<db>-ca` only, which no pod
//! mounts.

use super::{Owner, names};
use k8s_openapi::api::core::v1::Secret;
use shard_server::tls::issue::{self, LeafRequest};
use shard_server::tls::{DatabaseId, Identity};
use std::collections::BTreeMap;
use std::time::SystemTime;

/// The database, as every identity of it names it.
pub fn database_id(owner: &Owner) -> DatabaseId {
    DatabaseId::new(owner.namespace.clone(), owner.name.clone())
}

/// The identity of `server` (its topology name).
pub fn server_identity(owner: &Owner, server: &str) -> Identity {
    Identity::server(database_id(owner), server).expect("namespace, name and server names are DNS-safe")
}

pub fn router_identity(owner: &Owner) -> Identity {
    Identity::router(database_id(owner)).expect("namespace and name are DNS-safe")
}

/// What a server's certificate must say: its identity and its pod's DNS names.
pub fn server_request(owner: &Owner, server: &str) -> LeafRequest {
    LeafRequest::new(server_identity(owner, server)).with_dns_names(names::server_dns_names(
        &owner.name,
        &owner.namespace,
        server,
    ))
}

/// What the routers' certificate must say: its identity and the router Service's DNS names (for
/// clients over TLS, when the spec asks for it).
pub fn router_request(owner: &Owner) -> LeafRequest {
    LeafRequest::new(router_identity(owner)).with_dns_names(names::router_dns_names(&owner.name, &owner.namespace))
}

/// A CA's certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem").field("cert", &self.cert).finish_non_exhaustive()
    }
}

/// The operator-made CA of a database, `<db>-ca`.
pub fn ca_secret(owner: &Owner, ca: &CaPem) -> Secret {
    Secret {
        metadata: owner.meta(names::ca_secret(&owner.name), BTreeMap::new()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (names::CA_CERT_KEY.to_owned(), ca.cert.clone()),
            (names::CA_KEY_KEY.to_owned(), ca.key.clone()),
        ])),
        ..Secret::default()
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|t| !t.trim().is_empty())
}

/// A CA kept in a Secret: the operator's layout (`ca.crt` + `ca.key`) or a user's TLS Secret of
/// a CA (`tls.crt` + `tls.key`, as cert-manager writes for an `isCA` Certificate).
pub fn stored_ca(secret: &Secret) -> Option<CaPem> {
    let pair = |cert, key| Some(CaPem { cert: text(secret, cert)?, key: text(secret, key)? });
    pair(names::CA_CERT_KEY, names::CA_KEY_KEY).or_else(|| pair(names::TLS_CERT_KEY, names::TLS_KEY_KEY))
}

/// A certificate as kept in a TLS Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Kept {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept").field("cert", &self.cert).field("ca", &self.ca).finish_non_exhaustive()
    }
}

/// The certificate a TLS Secret holds, if it holds all three parts.
pub fn stored_certificate(secret: &Secret) -> Option<Kept> {
    Some(Kept {
        cert: text(secret, names::TLS_CERT_KEY)?,
        key: text(secret, names::TLS_KEY_KEY)?,
        ca: text(secret, names::CA_CERT_KEY)?,
    })
}

/// Whether a kept certificate serves for `want` under the CA `ca_pem` until well after `now`;
/// otherwise a new one is issued (see [`issue::needs_renewal`]).
pub fn still_good(kept: Option<&Kept>, ca_pem: &str, want: &Identity, now: SystemTime) -> bool {
    kept.is_some_and(|k| k.ca == ca_pem && !issue::needs_renewal(&k.cert, ca_pem, Some(want), now))
}

fn tls_secret(owner: &Owner, name: String, cert: &Kept, extra: &[(&str, &str)]) -> Secret {
    let mut data = BTreeMap::from([
        (names::TLS_CERT_KEY.to_owned(), cert.cert.clone()),
        (names::TLS_KEY_KEY.to_owned(), cert.key.clone()),
        (names::CA_CERT_KEY.to_owned(), cert.ca.clone()),
    ]);
    data.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Secret {
        metadata: owner.meta(name, BTreeMap::new()),
        type_: Some("kubernetes.io/tls".into()),
        string_data: Some(data),
        ..Secret::default()
    }
}

/// The certificate Secret of `server`, mounted by its pod.
pub fn server_tls_secret(owner: &Owner, server: &str, cert: &Kept) -> Secret {
    tls_secret(owner, names::server_tls_secret(&owner.name, server), cert, &[])
}

/// The routers' certificate Secret, with the CA of the operator's admin endpoint beside it.
pub fn router_tls_secret(owner: &Owner, cert: &Kept, operator_ca: &str) -> Secret {
    tls_secret(owner, names::router_tls_secret(&owner.name), cert, &[(names::OPERATOR_CA_KEY, operator_ca)])
}

/// The bearer token the routers require on `/init`, `/add` and `/rm`.
pub fn admin_token_secret(owner: &Owner, token: &str) -> Secret {
    Secret {
        metadata: owner.meta(names::admin_token_secret(&owner.name), BTreeMap::new()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(names::ADMIN_TOKEN_KEY.to_owned(), token.to_owned())])),
        ..Secret::default()
    }
}

/// The token an existing admin token Secret holds.
pub fn stored_token(secret: &Secret) -> Option<String> {
    text(secret, names::ADMIN_TOKEN_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};
    use k8s_openapi::ByteString;
    use shard_server::tls::issue::{CA_VALIDITY, Ca};

    fn stored(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()),
            ..Secret::default()
        }
    }

    #[test]
    fn a_server_certificate_names_the_server_and_its_pod() {
        let r = server_request(&owner(), "Server1");
        assert_eq!(r.identity.as_ref().unwrap().uri(), "spiffe://sharddb.io/ns/prod/db/students/server/Server1");
        assert!(r.dns_names.contains(&"students-server1-0.students-servers.prod.svc".to_owned()), "{r:?}");
        assert!(r.ips.is_empty());
        let r = router_request(&owner());
        assert_eq!(r.identity.unwrap().uri(), "spiffe://sharddb.io/ns/prod/db/students/router/router");
        assert!(r.dns_names.contains(&"students-router.prod.svc".to_owned()));
    }

    #[test]
    fn secrets_carry_the_mounted_layout() {
        let cert = Kept { cert: "C".into(), key: "K".into(), ca: "A".into() };
        let s = server_tls_secret(&owner(), "Server1", &cert);
        assert_child_meta(&s.metadata, "students-tls-server1");
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = s.string_data.unwrap();
        assert_eq!((data["tls.crt"].as_str(), data["tls.key"].as_str(), data["ca.crt"].as_str()), ("C", "K", "A"));
        let r = router_tls_secret(&owner(), &cert, "OPCA");
        assert_child_meta(&r.metadata, "students-router-tls");
        assert_eq!(r.string_data.unwrap()["operator-ca.crt"], "OPCA");
        let ca = ca_secret(&owner(), &CaPem { cert: "CA".into(), key: "KEY".into() });
        assert_child_meta(&ca.metadata, "students-ca");
        assert_eq!(ca.string_data.unwrap()["ca.key"], "KEY");
        let t = admin_token_secret(&owner(), "tok");
        assert_child_meta(&t.metadata, "students-admin-token");
        assert_eq!(t.string_data.unwrap()["token"], "tok");
    }

    #[test]
    fn kept_material_is_read_back_from_either_layout() {
        assert_eq!(
            stored_ca(&stored(&[("ca.crt", "C"), ("ca.key", "K")])),
            Some(CaPem { cert: "C".into(), key: "K".into() })
        );
        // cert-manager's layout for a CA Certificate.
        let cm = stored(&[("tls.crt", "C"), ("tls.key", "K"), ("ca.crt", "root")]);
        assert_eq!(stored_ca(&cm), Some(CaPem { cert: "C".into(), key: "K".into() }));
        assert_eq!(stored_ca(&stored(&[("ca.crt", "C")])), None, "no key, no CA");
        assert_eq!(stored_certificate(&cm).unwrap().ca, "root");
        assert_eq!(stored_certificate(&stored(&[("tls.crt", "C")])), None);
        assert_eq!(stored_token(&stored(&[("token", "t")])).as_deref(), Some("t"));
        assert_eq!(stored_token(&stored(&[("token", " ")])), None);
    }

    #[test]
    fn a_certificate_is_issued_again_when_missing_due_or_under_another_ca() {
        let now = SystemTime::now();
        let ca = Ca::generate("test", now, CA_VALIDITY).unwrap();
        let id = server_identity(&owner(), "Server0");
        let issued = ca.issue(&server_request(&owner(), "Server0"), now).unwrap();
        let kept = Kept { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() };
        assert!(still_good(Some(&kept), ca.cert_pem(), &id, now));
        assert!(!still_good(None, ca.cert_pem(), &id, now));
        assert!(!still_good(Some(&kept), ca.cert_pem(), &server_identity(&owner(), "Server1"), now));
        let later = now + std::time::Duration::from_secs(70 * 24 * 3600);
        assert!(!still_good(Some(&kept), ca.cert_pem(), &id, later), "renewed with 20 of 90 days left");
        let other = Ca::generate("other", now, CA_VALIDITY).unwrap();
        assert!(!still_good(Some(&kept), other.cert_pem(), &id, now), "a new CA means new certificates");
    }
}
