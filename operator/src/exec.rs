//! The I/O half of the brain that both bodies need in the same form: probing servers' `/status`
//! and replacing one copy of a shard by a verified recover. Platform-independent: callers say
//! where each server is; what to do with the outcomes stays with the body (which document to
//! write, where to log).

use crate::brain::lease::LeaseBook;
use crate::brain::observe::Probe;
use shard_server::api::{ClientError, LeaseToken, PrimaryLeaseRequest, RecoverRequest, RecoverResponse, ShardClient};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server may take to answer a probe before it counts as failed. A failed probe starts
/// the clock towards a failover (`plan::Settings`), so this must be well above how long a live
/// server takes to answer on a busy machine: on 2 cores running ten servers, their Postgres and a
/// hundred clients, answers took over a second and healthy primaries were replaced.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A recover of a large shard streams every row; give it time.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// How often (in rounds) a healer's probes ask for the rows' checksums too, a scan of every copy's
/// rows, so that copies can be compared at equal sequence numbers (see `brain::observe`).
pub const CHECKSUM_EVERY: u64 = 20;

/// Probes every `(server, base URL)` concurrently, with the rows' checksums when `checksums`; an
/// error answer counts as no answer (a server whose database is down cannot serve either).
pub async fn probe_servers(
    http: &reqwest::Client,
    servers: Vec<(String, String)>,
    checksums: bool,
) -> Vec<(String, Probe)> {
    let probes = servers.into_iter().map(|(name, url)| {
        let client = ShardClient::new(http.clone(), url);
        async move {
            let probe = match client.status(checksums).await {
                Ok(status) => Probe::Answered(status),
                Err(_) => Probe::Failed,
            };
            (name, probe)
        }
    });
    futures::future::join_all(probes).await
}

/// A recover that finished: what the server reported, and the identity of the copy it installed
/// (recorded when the copy becomes ready).
#[derive(Clone, Debug)]
pub struct RecoveredCopy {
    pub response: RecoverResponse,
    /// Empty if the server no longer reports the shard (then the copy must not be marked ready).
    pub copy_id: String,
}

/// Has the server at `url` replace its copy of `shard` from `primary` (a server name: the server
/// copies from the address its own topology gives) and verify it against the primary, then reads
/// back the new copy's identity.
pub async fn recover_copy(
    recover_http: &reqwest::Client,
    probe_http: &reqwest::Client,
    url: &str,
    shard: &str,
    primary: &str,
) -> Result<RecoveredCopy, ClientError> {
    let response = ShardClient::new(recover_http.clone(), url)
        .recover(shard, &RecoverRequest { primary: primary.to_owned() })
        .await?;
    let status = ShardClient::new(probe_http.clone(), url).status(false).await?;
    let copy_id = status.shards.get(shard).map(|s| s.copy_id.clone()).unwrap_or_default();
    Ok(RecoveredCopy { response, copy_id })
}

/// How often primaries are granted their leases: a quarter of the default lease, so three grants
/// in a row may fail before reads stop.
pub const GRANT_EVERY: Duration = Duration::from_millis(500);

/// Grants every primary of `book`'s topology its lease (see `brain::lease`): takes a token from
/// the server (the one its last grant's answer carried, in `tokens`, or else from a probe),
/// records the grant in `book`, then sends it. A primary that does not answer is granted nothing
/// (and recorded as nothing). Runs the servers concurrently. `url` turns a server's name and the
/// URL the topology gives it into the URL to reach it at.
pub async fn grant_primary_leases(
    http: &reqwest::Client,
    book: &Mutex<LeaseBook>,
    tokens: &Mutex<HashMap<String, LeaseToken>>,
    url: &(dyn Fn(&str, &str) -> String + Sync),
) {
    let (primaries, lease) = {
        let b = book.lock().expect("lease book lock");
        (b.primaries(), b.lease())
    };
    let grants = primaries.into_iter().map(|(server, published)| async move {
        let url = url(&server, &published);
        let client = ShardClient::new(http.clone(), url);
        let saved = tokens.lock().expect("tokens lock").remove(&server);
        let token = match saved {
            Some(t) => t,
            None => match client.status(false).await.ok().and_then(|s| s.lease_token) {
                Some(t) => t,
                None => return,
            },
        };
        let Some(grant) = book.lock().expect("lease book lock").grant(&server, Instant::now()) else { return };
        let req = PrimaryLeaseRequest {
            token,
            epoch: grant.epoch,
            shards: grant.shards,
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        };
        match client.primary_lease(&req).await {
            Ok(answer) => {
                tokens.lock().expect("tokens lock").insert(server, answer.next_token);
            }
            Err(e) => tracing::debug!(%server, error = %e, "granting a primary lease failed"),
        }
    });
    futures::future::join_all(grants).await;
}
