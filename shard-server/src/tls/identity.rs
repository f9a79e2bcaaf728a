//! Who a certificate speaks for: a component (server, router, operator) of one database, written
//! into the certificate as a URI subject alternative name. Pure (parsing and formatting).
//!
//! The URI is `spiffe://sharddb.io/ns/<namespace>/db/<database>/<component>/<name>`, in the
//! SPIFFE ID shape people who run meshes already read: a server's name is its topology name
//! (`Server0`), a router's and the operator's are `router` and `operator`. Local mode uses the
//! namespace `local`. Only certificates the database's CA signed are ever read this way (the TLS
//! handshake checked the chain first), so the identity is as trustworthy as that CA: a CA shared
//! by several databases (a user-supplied one) still tells them apart by the database named here.

use std::fmt;
use x509_parser::extensions::GeneralName;

/// The URI prefix of every identity.
pub const URI_PREFIX: &str = "spiffe://sharddb.io/ns/";

/// What a component is; each internal endpoint accepts some of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// A shard server: replicates to and leases from other servers.
    Server,
    /// A router: reads and writes data on the servers, forwards admin verbs to the control plane.
    Router,
    /// The operator: probes, recovers and configures servers. It holds the CA, so it could act
    /// as any component anyway; its certificate is accepted wherever a component's is.
    Operator,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Server => "server",
            Component::Router => "router",
            Component::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Option<Component> {
        match s {
            "server" => Some(Component::Server),
            "router" => Some(Component::Router),
            "operator" => Some(Component::Operator),
            _ => None,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database: the namespace and name of its `ShardedDatabase` (`local/<name>` in local mode).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatabaseId {
    pub namespace: String,
    pub name: String,
}

impl DatabaseId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        DatabaseId { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for DatabaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One component of one database.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub database: DatabaseId,
    pub component: Component,
    /// The server's topology name; `router` or `operator` for the others.
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a sharddb identity (expected {URI_PREFIX}<namespace>/db/<database>/<component>/<name>)")]
    Malformed(String),
    #[error("{what} {value:?} must be 1 to 253 characters of letters, digits, '.', '_' and '-'")]
    BadPart { what: &'static str, value: String },
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate names no sharddb identity")]
    Missing,
    #[error("the certificate names more than one sharddb identity")]
    Ambiguous,
}

fn check_part(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(IdentityError::BadPart { what, value: value.to_owned() }) }
}

impl Identity {
    /// A checked identity (every part a plain name, so the URI round-trips).
    pub fn new(database: DatabaseId, component: Component, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        check_part("namespace", &database.namespace)?;
        check_part("database", &database.name)?;
        check_part("name", &name)?;
        Ok(Identity { database, component, name })
    }

    /// The router of `database` (its routers share one identity).
    pub fn router(database: DatabaseId) -> Result<Self, IdentityError> {
        Identity::new(database, Component::Router, Component::Router.as_str())
    }

    /// The operator, as a client of `database`'s servers.
    pub fn operator(database: DatabaseId) -> Result<Self, IdentityError> {
        Identity::new(database, Component::Operator, Component::Operator.as_str())
    }

    /// Shard server `name` (its topology name) of `database`.
    pub fn server(database: DatabaseId, name: &str) -> Result<Self, IdentityError> {
        Identity::new(database, Component::Server, name)
    }

    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/db/{}/{}/{}", self.database.namespace, self.database.name, self.component, self.name)
    }

    pub fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
        let malformed = || IdentityError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [namespace, "db", database, component, name] = parts[..] else { return Err(malformed()) };
        let component = Component::parse(component).ok_or_else(malformed)?;
        Identity::new(DatabaseId::new(namespace, database), component, name)
    }

    /// The identity a certificate (DER) names: exactly one URI SAN with our prefix.
    pub fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparsable)?;
        let san = cert.subject_alternative_name().map_err(|_| IdentityError::Unparsable)?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(URI_PREFIX)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Identity::parse_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} of {}", self.component, self.name, self.database)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        let db = DatabaseId::new("prod", "students");
        let server = Identity::server(db.clone(), "Server0").unwrap();
        assert_eq!(server.uri(), "spiffe://sharddb.io/ns/prod/db/students/server/Server0");
        assert_eq!(Identity::parse_uri(&server.uri()).unwrap(), server);
        let router = Identity::router(db.clone()).unwrap();
        assert_eq!(router.uri(), "spiffe://sharddb.io/ns/prod/db/students/router/router");
        assert_eq!(Identity::parse_uri(&router.uri()).unwrap().component, Component::Router);
        assert_eq!(server.to_string(), "server Server0 of prod/students");
    }

    #[test]
    fn malformed_identities_are_refused() {
        for bad in [
            "spiffe://other.io/ns/prod/db/students/server/Server0",
            "spiffe://sharddb.io/ns/prod/db/students/server",
            "spiffe://sharddb.io/ns/prod/db/students/server/Server0/x",
            "spiffe://sharddb.io/ns/prod/database/students/server/Server0",
            "spiffe://sharddb.io/ns/prod/db/students/admin/root",
            "spiffe://sharddb.io/ns//db/students/server/Server0",
            "spiffe://sharddb.io/ns/prod/db/stu dents/server/Server0",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad}");
        }
        assert!(Identity::server(DatabaseId::new("prod", "students"), "a/b").is_err());
    }
}
