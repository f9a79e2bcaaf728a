//! The operator's certificates in Kubernetes. Does I/O (Secrets).
//!
//! - **Each database's CA** is kept in a Secret: `<db>-ca` (made here, once, with a create that
//!   never overwrites), or a user's Secret named by `spec.tls.caSecretName`. The reconcile issues
//!   every server's and the routers' certificate from it into Secrets the pods mount
//!   (`build::tls`), and renews them once less than 30 of their 90 days are left.
//! - **The operator's client certificate for each database** is issued from that database's CA
//!   and held in memory only ([`OperatorPki::register`]); the healer presents it to the servers.
//! - **The operator's own CA** signs the certificate its admin endpoint serves (one endpoint for
//!   every database, so no database's CA can vouch for it). It is kept in a Secret of the
//!   operator's namespace (`--operator-ca-secret`, made on first start), or in memory when the
//!   operator runs outside a cluster. Routers get its certificate as `operator-ca.crt` beside
//!   their own. The admin endpoint checks clients against every registered database's CA and
//!   then against the database named in the request path (`k8s::admin`).
//!
//! - **A database in internal-auth `none`** has no CA: the operator dials its servers over plain
//!   HTTP with no credential ([`OperatorPki::set_dial_plain`]), and the admin endpoint answers its
//!   routers over plain HTTP ([`OperatorPki::register_plain`], `k8s::admin`). The two are kept
//!   apart because a database climbing out of `none` (`k8s::internal_auth`) has its servers
//!   dialled plain only until its topology lists them over `https://`, while its routers may
//!   call over plain HTTP until every one of them is rolled.
//!
//! Renewals need no restart anywhere: pods re-read their mounted files, and the in-memory
//! certificates are swapped under the live TLS configurations ([`TlsSource::replace`]).

use super::apply::{self, ApplyError};
use super::build::tls::CaPem;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::ObjectMeta;
use shard_server::tls::issue::{self, CA_VALIDITY, Ca, LeafRequest};
use shard_server::tls::source::Pem;
use shard_server::tls::{Credentials, DatabaseId, Identity, TlsSource};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Api(#[from] ApplyError),
    #[error("the CA in Secret {namespace}/{name} cannot be used: {why}")]
    BadCa { namespace: String, name: String, why: String },
    #[error("cannot issue a certificate for {what}")]
    Issue {
        what: String,
        #[source]
        source: issue::IssueError,
    },
    #[error(transparent)]
    Tls(#[from] shard_server::tls::source::TlsError),
}

/// The key of the operator CA's Secret.
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

struct Database {
    ca_pem: String,
    /// The operator's client certificate for this database, renewed in place.
    operator: Arc<TlsSource>,
}

/// The operator's CA, its admin endpoint's certificate, and its per-database client credentials.
pub struct OperatorPki {
    ca: Ca,
    /// The admin endpoint's host (from its URL), named by its certificate.
    admin_host: Option<String>,
    /// The admin endpoint's certificate, and every registered database's CA to check routers.
    admin: Arc<TlsSource>,
    databases: Mutex<BTreeMap<DatabaseId, Database>>,
    /// Databases whose routers are answered over plain HTTP (internal-auth `none`, or climbing
    /// out of it).
    plain: Mutex<HashSet<DatabaseId>>,
    /// Per database, whether the operator dials its servers plain (its topology lists `http://`
    /// URLs), as the leader's reconcile last decided; absent until it has.
    dial_plain: Mutex<HashMap<DatabaseId, bool>>,
}

impl std::fmt::Debug for OperatorPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorPki").field("admin_host", &self.admin_host).finish_non_exhaustive()
    }
}

/// The host of a URL (`https://host:port/...`), for the admin endpoint's certificate.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

fn serving_request(host: Option<&str>) -> LeafRequest {
    let mut request =
        LeafRequest { identity: None, dns_names: Vec::new(), ips: Vec::new(), validity: issue::LEAF_VALIDITY };
    match host.map(|h| h.parse::<IpAddr>()) {
        Some(Ok(ip)) => request.ips.push(ip),
        Some(Err(_)) => request.dns_names.push(host.unwrap_or_default().to_owned()),
        None => {}
    }
    // Also reachable as localhost (port-forwards, a process outside the cluster).
    request.dns_names.push("localhost".into());
    request
}

impl OperatorPki {
    fn with_ca(ca: Ca, admin_host: Option<String>) -> Result<Arc<OperatorPki>, PkiError> {
        let issued = ca
            .issue(&serving_request(admin_host.as_deref()), SystemTime::now())
            .map_err(|source| PkiError::Issue { what: "the admin endpoint".into(), source })?;
        let admin =
            TlsSource::from_pem(Pem { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() })?;
        Ok(Arc::new(OperatorPki {
            ca,
            admin_host,
            admin,
            databases: Mutex::new(BTreeMap::new()),
            plain: Mutex::new(HashSet::new()),
            dial_plain: Mutex::new(HashMap::new()),
        }))
    }

    /// A CA held in memory only: for an operator outside a cluster, and for tests. Routers built
    /// meanwhile trust it; a restart makes another, and the next reconcile hands routers the new one.
    pub fn ephemeral(admin_url: Option<&str>) -> Arc<OperatorPki> {
        let ca = Ca::generate("sharddb operator CA", SystemTime::now(), CA_VALIDITY).expect("a CA can be made");
        OperatorPki::with_ca(ca, admin_url.and_then(url_host)).expect("a fresh CA issues")
    }

    /// The CA kept in Secret `namespace/name`, made there on first start. Operator replicas
    /// starting together all end up with the one that was created first.
    pub async fn load(
        client: &Client,
        namespace: &str,
        name: &str,
        admin_url: Option<&str>,
    ) -> Result<Arc<OperatorPki>, PkiError> {
        let read = |secret: Option<Secret>| {
            let data = secret?.data?;
            let text = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
            Some(CaPem { cert: text(CA_CERT)?, key: text(CA_KEY)? })
        };
        let kept = match read(apply::get::<Secret>(client, namespace, name).await?) {
            Some(pem) => pem,
            None => {
                let ca = Ca::generate("sharddb operator CA", SystemTime::now(), CA_VALIDITY)
                    .map_err(|source| PkiError::Issue { what: "the operator's CA".into(), source })?;
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        namespace: Some(namespace.into()),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    string_data: Some(BTreeMap::from([
                        (CA_CERT.to_owned(), ca.cert_pem().to_owned()),
                        (CA_KEY.to_owned(), ca.key_pem().to_owned()),
                    ])),
                    ..Secret::default()
                };
                if apply::create(client, namespace, &secret).await? {
                    tracing::info!(namespace, name, "created the operator's CA");
                }
                read(apply::get::<Secret>(client, namespace, name).await?).ok_or_else(|| PkiError::BadCa {
                    namespace: namespace.into(),
                    name: name.into(),
                    why: "it holds no ca.crt and ca.key".into(),
                })?
            }
        };
        let ca = Ca::from_pem(&kept.cert, &kept.key).map_err(|e| PkiError::BadCa {
            namespace: namespace.into(),
            name: name.into(),
            why: e.to_string(),
        })?;
        OperatorPki::with_ca(ca, admin_url.and_then(url_host))
    }

    /// The certificate routers check the admin endpoint against.
    pub fn operator_ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The admin endpoint's TLS material (serve it with [`TlsSource::server_config`]).
    pub fn admin_tls(&self) -> Arc<TlsSource> {
        Arc::clone(&self.admin)
    }

    /// The operator's credentials for calling `db`'s servers, once the database is registered.
    pub fn credentials(&self, db: &DatabaseId) -> Option<Credentials> {
        if self.dials_plain(db) == Some(true) {
            return Some(Credentials::Plain);
        }
        let dbs = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        dbs.get(db).map(|d| Credentials::Tls(Arc::clone(&d.operator)))
    }

    /// Records that `db`'s routers may call the admin endpoint over plain HTTP (internal-auth
    /// `none`, or climbing out of it). Undone by [`OperatorPki::unregister_plain`].
    pub fn register_plain(&self, db: &DatabaseId) {
        self.plain.lock().unwrap_or_else(|e| e.into_inner()).insert(db.clone());
    }

    /// Records that `db`'s routers call the admin endpoint over TLS only (its CA is [`register`]ed).
    ///
    /// [`register`]: OperatorPki::register
    pub fn unregister_plain(&self, db: &DatabaseId) {
        self.plain.lock().unwrap_or_else(|e| e.into_inner()).remove(db);
    }

    /// Whether `db`'s routers may call the admin endpoint over plain HTTP.
    pub fn is_plain(&self, db: &DatabaseId) -> bool {
        self.plain.lock().unwrap_or_else(|e| e.into_inner()).contains(db)
    }

    /// Records whether the operator dials `db`'s servers plain (`plain`: its topology lists them
    /// at `http://` URLs) or with its certificate for `db`.
    pub fn set_dial_plain(&self, db: &DatabaseId, plain: bool) {
        self.dial_plain.lock().unwrap_or_else(|e| e.into_inner()).insert(db.clone(), plain);
    }

    /// Whether the operator dials `db`'s servers plain; `None` until this process's reconcile
    /// has decided it (the healer then leaves the database alone: guessing could rewrite its
    /// document in the wrong scheme).
    pub fn dials_plain(&self, db: &DatabaseId) -> Option<bool> {
        self.dial_plain.lock().unwrap_or_else(|e| e.into_inner()).get(db).copied()
    }

    /// Records `db`'s CA: the operator's client certificate for it is issued (or renewed, when
    /// due or under another CA), and the admin endpoint trusts the CA's routers. Its own serving
    /// certificate is renewed too when due.
    pub fn register(&self, db: &DatabaseId, ca: &Ca) -> Result<(), PkiError> {
        let now = SystemTime::now();
        let identity = Identity::operator(db.clone()).map_err(|e| PkiError::BadCa {
            namespace: db.namespace.clone(),
            name: db.name.clone(),
            why: e.to_string(),
        })?;
        let mut dbs = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let due = dbs.get(db).is_none_or(|d| {
            let pem = d.operator.pem();
            d.ca_pem != ca.cert_pem() || issue::needs_renewal(&pem.cert, ca.cert_pem(), Some(&identity), now)
        });
        let cas_changed = dbs.get(db).is_none_or(|d| d.ca_pem != ca.cert_pem());
        if due {
            let issued = ca
                .issue(&LeafRequest::new(identity), now)
                .map_err(|source| PkiError::Issue { what: format!("the operator in {db}"), source })?;
            let pem = Pem { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() };
            match dbs.get(db) {
                Some(d) => {
                    d.operator.replace(pem)?;
                    dbs.get_mut(db).expect("present").ca_pem = ca.cert_pem().to_owned();
                }
                None => {
                    let operator = TlsSource::from_pem(pem)?;
                    dbs.insert(db.clone(), Database { ca_pem: ca.cert_pem().to_owned(), operator });
                }
            }
            tracing::info!(database = %db, "the operator's client certificate issued");
        }
        if cas_changed {
            self.refresh_admin(&dbs, now)?;
        } else {
            self.renew_admin_if_due(&dbs, now)?;
        }
        Ok(())
    }

    /// Forgets the databases of `scope` (a namespace, or every one) that are gone: their routers
    /// are no longer trusted.
    pub fn forget_except(&self, scope: Option<&str>, keep: &HashSet<DatabaseId>) -> Result<(), PkiError> {
        let gone = |k: &DatabaseId| scope.is_none_or(|ns| k.namespace == ns) && !keep.contains(k);
        self.plain.lock().unwrap_or_else(|e| e.into_inner()).retain(|k| !gone(k));
        self.dial_plain.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| !gone(k));
        let mut dbs = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let before = dbs.len();
        dbs.retain(|k, _| scope.is_some_and(|ns| k.namespace != ns) || keep.contains(k));
        if dbs.len() != before {
            self.refresh_admin(&dbs, SystemTime::now())?;
        }
        Ok(())
    }

    fn renew_admin_if_due(&self, dbs: &BTreeMap<DatabaseId, Database>, now: SystemTime) -> Result<(), PkiError> {
        if issue::needs_renewal(&self.admin.pem().cert, self.ca.cert_pem(), None, now) {
            self.refresh_admin(dbs, now)?;
        }
        Ok(())
    }

    /// Rebuilds the admin endpoint's material: its certificate (renewed when due) and the bundle
    /// of every database's CA it checks routers against. The operator's own CA is in the bundle
    /// too, so that it is never empty; it signs no client certificate.
    fn refresh_admin(&self, dbs: &BTreeMap<DatabaseId, Database>, now: SystemTime) -> Result<(), PkiError> {
        let mut pem = self.admin.pem();
        if issue::needs_renewal(&pem.cert, self.ca.cert_pem(), None, now) {
            let issued = self
                .ca
                .issue(&serving_request(self.admin_host.as_deref()), now)
                .map_err(|source| PkiError::Issue { what: "the admin endpoint".into(), source })?;
            (pem.cert, pem.key) = (issued.cert_pem, issued.key_pem);
        }
        pem.ca = std::iter::once(self.ca.cert_pem())
            .chain(dbs.values().map(|d| d.ca_pem.as_str()))
            .collect::<Vec<_>>()
            .join("");
        self.admin.replace(pem)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_urls() {
        assert_eq!(url_host("https://sharddb-admin.ops.svc:8081").as_deref(), Some("sharddb-admin.ops.svc"));
        assert_eq!(url_host("https://127.0.0.1:8081/databases").as_deref(), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:8081").as_deref(), Some("::1"));
        assert_eq!(url_host("https://host").as_deref(), Some("host"));
        assert_eq!(url_host("no url"), None);
    }

    #[test]
    fn a_registered_database_gets_an_operator_certificate_and_its_routers_are_trusted() {
        let pki = OperatorPki::ephemeral(Some("https://127.0.0.1:8081"));
        let db = DatabaseId::new("prod", "students");
        assert!(pki.credentials(&db).is_none());
        let ca = Ca::generate("students", SystemTime::now(), CA_VALIDITY).unwrap();
        pki.register(&db, &ca).unwrap();
        let Some(Credentials::Tls(source)) = pki.credentials(&db) else { panic!("credentials") };
        assert_eq!(source.identity().unwrap(), Identity::operator(db.clone()).unwrap());
        let first = source.pem();
        assert!(pki.admin.pem().ca.contains(ca.cert_pem()), "the admin endpoint checks the database's routers");
        // Registering again changes nothing; a new CA means a new certificate, in place.
        pki.register(&db, &ca).unwrap();
        assert_eq!(source.pem(), first);
        let other = Ca::generate("students again", SystemTime::now(), CA_VALIDITY).unwrap();
        pki.register(&db, &other).unwrap();
        assert_ne!(source.pem().cert, first.cert);
        assert!(!pki.admin.pem().ca.contains(ca.cert_pem()), "the old CA is no longer trusted");
        pki.forget_except(Some("other"), &HashSet::new()).unwrap();
        assert!(pki.credentials(&db).is_some(), "another namespace's healer forgets only its own");
        pki.forget_except(None, &HashSet::new()).unwrap();
        assert!(pki.credentials(&db).is_none());
        pki.set_dial_plain(&db, true);
        assert!(matches!(pki.credentials(&db), Some(Credentials::Plain)), "a database in none is dialled plain");
        pki.register(&db, &ca).unwrap();
        assert!(matches!(pki.credentials(&db), Some(Credentials::Plain)), "plain holds even with a CA kept");
        pki.register_plain(&db);
        pki.set_dial_plain(&db, false);
        assert!(matches!(pki.credentials(&db), Some(Credentials::Tls(_))), "dialled with TLS once told so");
        assert!(pki.is_plain(&db), "while its routers may still call plain");
        pki.set_dial_plain(&db, true);
        pki.forget_except(None, &HashSet::new()).unwrap();
        assert!(!pki.is_plain(&db) && pki.dials_plain(&db).is_none(), "forgotten once gone");
        assert!(!pki.admin.pem().ca.contains(other.cert_pem()));
    }
}
