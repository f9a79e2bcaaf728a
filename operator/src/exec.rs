//! The I/O half of the brain that both bodies need in the same form: probing servers' `/status`
//! and replacing one copy of a shard by a verified recover. Platform-independent: callers say
//! where each server is; what to do with the outcomes stays with the body (which document to
//! write, where to log).

use crate::brain::observe::Probe;
use shard_server::api::{ClientError, RecoverRequest, RecoverResponse, ShardClient};
use std::time::Duration;

/// How long a server may take to answer a probe before it counts as failed. A failed probe starts
/// the clock towards a failover (`plan::Settings`), so this must be well above how long a live
/// server takes to answer on a busy machine: on 2 cores running ten servers, their Postgres and a
/// hundred clients, answers took over a second and healthy primaries were replaced.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A recover of a large shard streams every row; give it time.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// Probes every `(server, base URL)` concurrently; an error answer counts as no answer (a server
/// whose database is down cannot serve either).
pub async fn probe_servers(http: &reqwest::Client, servers: Vec<(String, String)>) -> Vec<(String, Probe)> {
    let probes = servers.into_iter().map(|(name, url)| {
        let client = ShardClient::new(http.clone(), url);
        async move {
            let probe = match client.status(false).await {
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
