//! Where the router sends the seed's admin verbs (`/init`, `/add`, `/rm`): the control plane that
//! owns the declared configuration. Does I/O (HTTP to the control plane).
//!
//! The router only parses and shape-checks a request (see `routes::admin`); the control plane
//! decides it against the declared configuration and answers with the final seed body, which the
//! router relays with its status. Implementations:
//! - [`ControlPlane::Http`]: an admin endpoint serving `POST /init`, `POST /add`, `DELETE /rm`
//!   with the typed bodies of `shard_server::admin`. The local mode's operator serves one and
//!   starts its router with `--control-url` pointing at it.
//! - [`ControlPlane::None`]: no control plane; the verbs answer 501 saying so.
//!
//! In Kubernetes the operator serves the same verbs per database under
//! `/databases/{namespace}/{name}` and builds each router with `--control-url` pointing there;
//! they change the `ShardedDatabase` resource (`operator::k8s::admin`).

use crate::error::RouterError;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use shard_server::tls::Credentials;
use std::time::Duration;

/// How long the control plane may take to accept a change (an `/init` starts every server).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default)]
pub enum ControlPlane {
    #[default]
    None,
    Http {
        base: String,
        http: reqwest::Client,
    },
}

/// The admin verbs, each the path it is served on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Init,
    Add,
    Rm,
}

impl Verb {
    pub fn path(self) -> &'static str {
        match self {
            Verb::Init => "/init",
            Verb::Add => "/add",
            Verb::Rm => "/rm",
        }
    }
}

impl ControlPlane {
    /// An HTTP control plane at `base` (e.g. `https://127.0.0.1:7100`), called with
    /// `credentials` (it answers only the database's routers), or none.
    pub fn from_url(base: Option<&str>, credentials: Option<&Credentials>) -> ControlPlane {
        match base {
            Some(base) => ControlPlane::Http {
                base: base.trim_end_matches('/').to_owned(),
                http: match credentials {
                    Some(c) => c.http_client(CONTROL_TIMEOUT),
                    None => shard_server::api::http_client(CONTROL_TIMEOUT),
                },
            },
            None => ControlPlane::None,
        }
    }

    /// Submits a parsed request; returns the control plane's status and seed body.
    pub async fn submit<T: Serialize>(&self, verb: Verb, request: &T) -> Result<(StatusCode, Value), RouterError> {
        let ControlPlane::Http { base, http } = self else {
            return Err(RouterError::NotImplemented(format!(
                "{} needs a control plane, and this router has none (start it with --control-url)",
                verb.path()
            )));
        };
        let method = if verb == Verb::Rm { reqwest::Method::DELETE } else { reqwest::Method::POST };
        let url = format!("{base}{}", verb.path());
        let response = http
            .request(method, &url)
            .json(request)
            .send()
            .await
            .map_err(|e| RouterError::Unavailable(format!("control plane {url}: {e}")))?;
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let body: Value = response
            .json()
            .await
            .map_err(|e| RouterError::Internal(format!("control plane {url} answered no JSON: {e}")))?;
        // Refusing this router's credentials is a fault of the deployment, not of the client's
        // request: the client must not read it as its own 401 or 403.
        if status.is_server_error() || status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RouterError::Internal(format!("control plane {url} answered {status}: {body}")));
        }
        Ok((status, body))
    }
}
