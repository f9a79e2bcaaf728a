//! The identities of a database in Kubernetes, kept by each reconcile: its CA, the certificate
//! Secret of every running server and of the routers (issued when missing, renewed when due), the
//! routers' admin token, and the operator's own client certificate for it (`k8s::pki`). The
//! Secrets are built by `build::tls`. Does I/O (Secrets).

use super::apply;
use super::build::Owner;
use super::build::names;
use super::build::secret::generate_password;
use super::build::tls::{self as tls_build, CaPem, Kept};
use super::controller::{Context, ReconcileError};
use super::pki::PkiError;
use crate::brain::validate::ValidatedDb;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use shard_server::tls::issue::{CA_VALIDITY, Ca, LeafRequest};
use std::collections::BTreeSet;
use std::time::SystemTime;

/// The database's CA (operator-made or the user's), every running server's and the routers'
/// certificate Secrets, issued when missing and renewed when due, and the routers' admin token;
/// then the operator's own client certificate for the database (see `k8s::pki`).
pub(super) async fn ensure_identities(
    ctx: &Context,
    owner: &Owner,
    valid: &ValidatedDb,
    servers: &BTreeSet<String>,
) -> Result<(), ReconcileError> {
    let (client, ns) = (&ctx.client, owner.namespace.as_str());
    let ca = database_ca(client, owner, valid.tls.ca_secret.as_deref()).await?;
    let now = SystemTime::now();
    let issue = |request: &LeafRequest| -> Result<Kept, ReconcileError> {
        let what = request.identity.as_ref().map_or_else(String::new, ToString::to_string);
        let issued = ca.issue(request, now).map_err(|source| PkiError::Issue { what, source })?;
        Ok(Kept { cert: issued.cert_pem, key: issued.key_pem, ca: ca.cert_pem().to_owned() })
    };
    let kept = |secret: Option<Secret>| secret.as_ref().and_then(tls_build::stored_certificate);
    let mut issued = Vec::new();
    for server in servers {
        let stored = kept(apply::get::<Secret>(client, ns, &names::server_tls_secret(&owner.name, server)).await?);
        let want = tls_build::server_identity(owner, server);
        let cert = match stored.filter(|k| tls_build::still_good(Some(k), ca.cert_pem(), &want, now)) {
            Some(k) => k,
            None => {
                issued.push(server.clone());
                issue(&tls_build::server_request(owner, server))?
            }
        };
        apply::apply(client, ns, &tls_build::server_tls_secret(owner, server, &cert)).await?;
    }
    let stored = kept(apply::get::<Secret>(client, ns, &names::router_tls_secret(&owner.name)).await?);
    let want = tls_build::router_identity(owner);
    let cert = match stored.filter(|k| tls_build::still_good(Some(k), ca.cert_pem(), &want, now)) {
        Some(k) => k,
        None => {
            issued.push("router".into());
            issue(&tls_build::router_request(owner))?
        }
    };
    apply::apply(client, ns, &tls_build::router_tls_secret(owner, &cert, ctx.pki.operator_ca_pem())).await?;
    if ctx.config.require_admin_token {
        let token = apply::get::<Secret>(client, ns, &names::admin_token_secret(&owner.name))
            .await?
            .as_ref()
            .and_then(tls_build::stored_token)
            .unwrap_or_else(generate_password);
        apply::apply(client, ns, &tls_build::admin_token_secret(owner, &token)).await?;
    }
    ctx.pki.register(&tls_build::database_id(owner), &ca)?;
    if !issued.is_empty() {
        tracing::info!(db = %owner.name, ?issued, "certificates issued");
    }
    Ok(())
}

/// The CA of a database: the user's Secret when the spec names one, else `<db>-ca`, made here
/// the first time (created, never overwritten, so a CA once made stays).
async fn database_ca(client: &Client, owner: &Owner, user_secret: Option<&str>) -> Result<Ca, ReconcileError> {
    let ns = owner.namespace.as_str();
    let bad = |name: &str, why: String| PkiError::BadCa { namespace: ns.to_owned(), name: name.to_owned(), why };
    let name = match user_secret {
        Some(name) => name.to_owned(),
        None => names::ca_secret(&owner.name),
    };
    let mut stored = apply::get::<Secret>(client, ns, &name).await?.as_ref().and_then(tls_build::stored_ca);
    if stored.is_none() {
        if user_secret.is_some() {
            return Err(
                bad(&name, "it does not exist or holds no tls.crt and tls.key (spec.tls.caSecretName)".into()).into()
            );
        }
        let ca = Ca::generate(&format!("sharddb {ns}/{} CA", owner.name), SystemTime::now(), CA_VALIDITY)
            .map_err(|source| PkiError::Issue { what: "the database's CA".into(), source })?;
        let pem = CaPem { cert: ca.cert_pem().to_owned(), key: ca.key_pem().to_owned() };
        if apply::create(client, ns, &tls_build::ca_secret(owner, &pem)).await? {
            tracing::info!(db = %owner.name, secret = %name, "created the database's CA");
        }
        stored = apply::get::<Secret>(client, ns, &name).await?.as_ref().and_then(tls_build::stored_ca);
    }
    let pem = stored.ok_or_else(|| bad(&name, "it holds no ca.crt and ca.key".into()))?;
    Ok(Ca::from_pem(&pem.cert, &pem.key).map_err(|e| bad(&name, e.to_string()))?)
}

/// Keeps the CA of every database known to this replica's admin endpoint. Every operator replica
/// serves the endpoint, but only the leader reconciles (and so registers CAs as it issues
/// certificates): without this a follower would refuse every router's handshake. Read-only: it
/// never makes a CA, only reads those the leader (or the user) keeps. Runs until `shutdown`.
pub async fn trust_databases(
    client: Client,
    pki: std::sync::Arc<super::pki::OperatorPki>,
    namespaces: Option<Vec<String>>,
    every: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use crate::crd::ShardedDatabase;
    use kube::api::{Api, ListParams};
    tokio::pin!(shutdown);
    let scopes: Vec<Option<String>> = match namespaces {
        Some(list) => list.into_iter().map(Some).collect(),
        None => vec![None],
    };
    loop {
        for scope in &scopes {
            let api: Api<ShardedDatabase> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let dbs = match api.list(&ListParams::default()).await {
                Ok(list) => list.items,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the databases whose routers the admin endpoint trusts");
                    continue;
                }
            };
            let mut known = std::collections::HashSet::new();
            for db in &dbs {
                let Some(owner) = Owner::of(db) else { continue };
                let name = match db.spec.tls.as_ref().and_then(|t| t.ca_secret_name.clone()) {
                    Some(name) => name,
                    None => names::ca_secret(&owner.name),
                };
                let id = tls_build::database_id(&owner);
                known.insert(id.clone());
                // Routers are answered over plain HTTP by every replica while the database's
                // document lists its servers at `http://` URLs (internal-auth `none`, or climbing
                // into or out of it), as the leader's reconcile does. Before the first document:
                // the spec's mode when set, else the leader's decision as the status reports it
                // (sticky, see `k8s::internal_auth`).
                let document = match super::topology::read(&client, &owner).await {
                    Ok(published) => published.and_then(|p| p.topology),
                    Err(e) => {
                        tracing::debug!(db = %id, error = %e, "cannot read the database's topology");
                        continue;
                    }
                };
                let set = db.spec.tls.as_ref().and_then(|t| t.internal_auth);
                let plain = match set {
                    _ if document.is_some() => document.as_ref().is_some_and(super::topology::lists_plain),
                    Some(mode) => mode == crate::crd::InternalAuthMode::None,
                    None => db
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.iter().find(|c| c.type_ == super::internal_auth::INTERNAL_AUTH))
                        .is_some_and(|c| c.reason == super::internal_auth::REASON_NONE),
                };
                if plain {
                    pki.register_plain(&id);
                } else {
                    pki.unregister_plain(&id);
                }
                let stored = match apply::get::<Secret>(&client, &owner.namespace, &name).await {
                    Ok(secret) => secret.as_ref().and_then(tls_build::stored_ca),
                    Err(e) => {
                        tracing::debug!(db = %id, error = %e, "cannot read the database's CA");
                        continue;
                    }
                };
                // Not made yet: the leader's reconcile makes it and registers it itself.
                let Some(pem) = stored else { continue };
                match Ca::from_pem(&pem.cert, &pem.key) {
                    Ok(ca) => {
                        if let Err(e) = pki.register(&id, &ca) {
                            tracing::warn!(db = %id, error = %e, "cannot trust the database's routers");
                        }
                    }
                    Err(e) => tracing::warn!(db = %id, error = %e, "the database's CA cannot be used"),
                }
            }
            if let Err(e) = pki.forget_except(scope.as_deref(), &known) {
                tracing::warn!(error = %e, "cannot update the admin endpoint's trusted CAs");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut shutdown => return,
        }
    }
}
