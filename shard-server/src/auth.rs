//! Who may call what: every internal endpoint names the components it accepts, and a request from
//! anyone else is refused before its handler runs, so it has no effect at all. Pure apart from
//! reading the request's connection info and headers.
//!
//! A caller is identified by the certificate it presented in the TLS handshake (see
//! [`crate::tls`]), or, with TLS turned off in local mode, by the per-cluster secret and the
//! identity it names in headers. Then:
//! - no identity: **401** (`unauthenticated`);
//! - a component of another database: **403** (`forbidden`), whatever its role;
//! - a component of this database whose role the endpoint does not accept: **403**.
//!
//! With `--internal-auth=none` or `migrate` ([`crate::tls::InternalAuth`]) a request that came over
//! plain HTTP (no TLS connection at all) is served as the previous release served everyone: as
//! if the operator had sent it, and counted. A TLS connection is checked as above in every mode.
//!
//! The operator is accepted wherever any component is: it holds the CA and could issue itself any
//! certificate, so refusing it would protect nothing. The accepted roles per endpoint are listed
//! where the routes are declared (`crate::app`).

use crate::error::ApiError;
use crate::tls::{Component, Credentials, DatabaseId, IDENTITY_HEADER, Identity, TOKEN_HEADER, TlsPeer};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The caller of a request that passed its endpoint's check, for handlers that bind what a body
/// says to who sent it (a server may only replicate or ask leases as itself).
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<Identity>);

/// What callers are checked against: our database, and the per-cluster secret when TLS is off.
#[derive(Clone, Debug)]
pub struct Gate {
    database: DatabaseId,
    token: Option<Arc<str>>,
    /// Plain-HTTP callers are served (and counted here): `--internal-auth` `none` or `migrate`.
    plain: Option<prometheus_client::metrics::counter::Counter>,
}

/// Why a caller is refused (status 401 or 403 and a message naming the reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(String),
    Forbidden(String),
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Unauthenticated(m) => ApiError::Unauthenticated(m),
            Refusal::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Gate {
    /// The gate of a component holding `credentials`: it admits components of its own database.
    /// `None` when the credentials name no database (a plain serving certificate).
    pub fn for_credentials(credentials: &Credentials) -> Option<Gate> {
        let database = credentials.identity()?.database;
        let token = match credentials {
            Credentials::Tls(_) | Credentials::Plain => None,
            Credentials::Token { secret, .. } => Some(secret.clone()),
        };
        Some(Gate { database, token, plain: None })
    }

    /// A gate no caller passes (credentials that name no database cannot tell ours apart).
    pub fn nobody() -> Gate {
        // No identity has an empty namespace, so nothing matches this database.
        Gate { database: DatabaseId::new("", ""), token: None, plain: None }
    }

    /// This gate, also serving callers that came over plain HTTP, each counted in `counter`
    /// (`--internal-auth` `none` or `migrate`).
    pub fn accepting_plain(mut self, counter: prometheus_client::metrics::counter::Counter) -> Gate {
        self.plain = Some(counter);
        self
    }

    /// A request that came over plain HTTP and this gate serves such requests: it is counted,
    /// and its caller is taken to be the operator, as the previous release took everyone.
    fn plain_caller(&self, req: &Request) -> Option<Identity> {
        let counter = self.plain.as_ref()?;
        // Over TLS, or carrying the per-cluster secret: checked as in `strict`, never waved through.
        if req.extensions().get::<ConnectInfo<TlsPeer>>().is_some() || req.headers().contains_key(TOKEN_HEADER) {
            return None;
        }
        counter.inc();
        Some(Identity { database: self.database.clone(), component: Component::Operator, name: "operator".into() })
    }

    pub fn database(&self) -> &DatabaseId {
        &self.database
    }

    /// Who sent `req`, if it proved anything: the certificate of its TLS connection, else (TLS
    /// off) the per-cluster secret and the identity it claims.
    pub fn identify(&self, req: &Request) -> Option<Identity> {
        if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<TlsPeer>>() {
            return peer.identity.as_deref().cloned();
        }
        let secret = self.token.as_ref()?;
        let given = req.headers().get(TOKEN_HEADER)?;
        if !same_secret(given.as_bytes(), secret.as_bytes()) {
            return None;
        }
        Identity::parse_uri(req.headers().get(IDENTITY_HEADER)?.to_str().ok()?).ok()
    }

    /// Checks `req`'s caller against the components `allowed` to call `what`.
    pub fn check(&self, req: &Request, allowed: &[Component], what: &str) -> Result<Identity, Refusal> {
        let Some(caller) = self.identify(req) else {
            return Err(Refusal::Unauthenticated(format!(
                "{what} answers only the components of database {}: present a client certificate of its CA",
                self.database
            )));
        };
        if caller.database != self.database {
            return Err(Refusal::Forbidden(format!(
                "{what} answers only the components of database {}, not the {caller}",
                self.database
            )));
        }
        if caller.component != Component::Operator && !allowed.contains(&caller.component) {
            return Err(Refusal::Forbidden(format!("{what} does not answer a {}", caller.component)));
        }
        Ok(caller)
    }

    /// A route layer admitting only `allowed` components (and the operator).
    pub fn allow(&self, allowed: &'static [Component]) -> Policy {
        Policy { gate: self.clone(), allowed }
    }
}

/// One endpoint's check: the gate and the components it accepts.
#[derive(Clone, Debug)]
pub struct Policy {
    gate: Gate,
    allowed: &'static [Component],
}

/// Middleware applying a [`Policy`]: refused requests never reach the handler; admitted ones
/// carry their [`Caller`].
pub async fn require(State(policy): State<Policy>, mut req: Request, next: Next) -> Response {
    let what =
        req.extensions().get::<MatchedPath>().map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let checked = policy.gate.check(&req, policy.allowed, &what);
    let checked = match checked {
        Err(refusal) => policy.gate.plain_caller(&req).ok_or(refusal),
        ok => ok,
    };
    match checked {
        Ok(caller) => {
            req.extensions_mut().insert(Caller(Arc::new(caller)));
            next.run(req).await
        }
        Err(refusal) => {
            tracing::info!(endpoint = %what, reason = ?refusal, "request refused");
            ApiError::from(refusal).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn db(name: &str) -> DatabaseId {
        DatabaseId::new("local", name)
    }

    fn over_tls(identity: Option<Identity>) -> Request {
        let mut req = Request::new(axum::body::Body::empty());
        let peer = TlsPeer { addr: SocketAddr::from(([127, 0, 0, 1], 1)), identity: identity.map(Arc::new) };
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    }

    #[test]
    fn tls_callers_are_checked_by_database_and_role() {
        let gate = Gate { database: db("students"), token: None, plain: None };
        let router = Identity::router(db("students")).unwrap();
        let server = Identity::server(db("students"), "Server1").unwrap();
        let operator = Identity::operator(db("students")).unwrap();
        let foreign = Identity::server(db("teachers"), "Server1").unwrap();
        const SERVERS: &[Component] = &[Component::Server];
        assert_eq!(gate.check(&over_tls(Some(server.clone())), SERVERS, "x"), Ok(server));
        assert_eq!(
            gate.check(&over_tls(Some(operator.clone())), SERVERS, "x"),
            Ok(operator),
            "the operator goes anywhere"
        );
        assert!(matches!(gate.check(&over_tls(Some(router)), SERVERS, "x"), Err(Refusal::Forbidden(_))));
        let e = gate.check(&over_tls(Some(foreign)), SERVERS, "x").unwrap_err();
        assert!(matches!(&e, Refusal::Forbidden(m) if m.contains("not the server Server1 of local/teachers")), "{e:?}");
        assert!(matches!(gate.check(&over_tls(None), SERVERS, "x"), Err(Refusal::Unauthenticated(_))));
        // Without TLS connection info and without a secret: nobody.
        assert!(matches!(
            gate.check(&Request::new(axum::body::Body::empty()), SERVERS, "x"),
            Err(Refusal::Unauthenticated(_))
        ));
    }

    #[test]
    fn without_tls_the_secret_and_a_claimed_identity_are_needed() {
        let gate = Gate { database: db("students"), token: Some("s3cret".into()), plain: None };
        let router = Identity::router(db("students")).unwrap();
        let with = |token: Option<&str>, id: Option<&Identity>| {
            let mut req = Request::new(axum::body::Body::empty());
            if let Some(t) = token {
                req.headers_mut().insert(TOKEN_HEADER, t.parse().unwrap());
            }
            if let Some(id) = id {
                req.headers_mut().insert(IDENTITY_HEADER, id.uri().parse().unwrap());
            }
            gate.check(&req, &[Component::Router], "x")
        };
        assert_eq!(with(Some("s3cret"), Some(&router)), Ok(router.clone()));
        assert!(matches!(with(Some("s3cre"), Some(&router)), Err(Refusal::Unauthenticated(_))));
        assert!(matches!(with(None, Some(&router)), Err(Refusal::Unauthenticated(_))));
        assert!(matches!(with(Some("s3cret"), None), Err(Refusal::Unauthenticated(_))));
        // A TLS connection without a certificate is not rescued by headers.
        let mut req = over_tls(None);
        req.headers_mut().insert(TOKEN_HEADER, "s3cret".parse().unwrap());
        req.headers_mut().insert(IDENTITY_HEADER, router.uri().parse().unwrap());
        assert!(matches!(gate.check(&req, &[Component::Router], "x"), Err(Refusal::Unauthenticated(_))));
    }

    #[tokio::test]
    async fn plain_callers_pass_only_a_gate_that_accepts_them_and_are_counted() {
        use axum::routing::get;
        use tower::ServiceExt;
        let counter = prometheus_client::metrics::counter::Counter::default();
        let strict = Gate { database: db("students"), token: None, plain: None };
        let migrate = strict.clone().accepting_plain(counter.clone());
        let call = |gate: Gate, tls: Option<Option<Identity>>| {
            let app = axum::Router::new()
                .route("/x", get(|axum::Extension(Caller(c)): axum::Extension<Caller>| async move { c.to_string() }))
                .route_layer(axum::middleware::from_fn_with_state(gate.allow(&[Component::Server]), require));
            let mut req = Request::builder().uri("/x").body(axum::body::Body::empty()).unwrap();
            if let Some(identity) = tls {
                let peer = TlsPeer { addr: SocketAddr::from(([127, 0, 0, 1], 1)), identity: identity.map(Arc::new) };
                req.extensions_mut().insert(ConnectInfo(peer));
            }
            async move { app.oneshot(req).await.unwrap().status().as_u16() }
        };
        assert_eq!(call(strict.clone(), None).await, 401, "strict: plain HTTP is refused");
        assert_eq!(call(migrate.clone(), None).await, 200, "migrate: plain HTTP is served");
        assert_eq!(counter.get(), 1, "and counted");
        // Over TLS the role is checked in every mode, and nothing is counted.
        let router = Identity::router(db("students")).unwrap();
        assert_eq!(call(migrate.clone(), Some(Some(router))).await, 403);
        assert_eq!(call(migrate.clone(), Some(None)).await, 401, "TLS without a certificate");
        let server = Identity::server(db("students"), "Server1").unwrap();
        assert_eq!(call(migrate, Some(Some(server))).await, 200);
        assert_eq!(counter.get(), 1);
    }
}
