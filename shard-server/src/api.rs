//! Wire contracts between sharddb processes: request and response bodies of the shard server (the
//! seed endpoints and our own under `/v1`), the error body every component speaks, and a typed
//! client. Routers, the operator and tests all use these types; nothing re-declares them.

use crate::limits::{MAX_READ_RANGES, MAX_ROWS, MAX_SHARDS, bounded_batches, bounded_vec};
use crate::schema::{Row, SchemaSpec};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Bodies shared by every endpoint

/// `{"message": "...", "status": "success"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Message {
    pub message: String,
    pub status: String,
}

impl Message {
    pub fn success(message: impl Into<String>) -> Self {
        Message { message: message.into(), status: "success".into() }
    }
}

/// Machine-readable reason of a failure, beside the human `message`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or breaks a rule; the message names what.
    BadRequest,
    /// A key already holds a different row.
    Conflict,
    /// The key, shard or path does not exist.
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    /// The caller showed no credential of the database's components (401).
    Unauthenticated,
    /// The caller is a component, but of another database or not one allowed here (403).
    Forbidden,
    /// The sender's topology epoch is older than ours: it must reload and retry.
    StaleEpoch,
    /// The sender's epoch is newer than ours: retry shortly, we are catching up.
    EpochAhead,
    /// This server is not the primary of the shard.
    NotPrimary,
    /// Replication: the entries do not follow on from what this replica applied.
    SeqGap,
    /// Replication: this replica holds an entry the primary does not (written by an earlier
    /// primary and never acknowledged); it gave up its copy and waits to be copied afresh.
    Diverged,
    /// The replica is not ready to serve (recovering) or the shard is not held here.
    NotReady,
    /// A dependency (Postgres, a replica) failed; safe to retry.
    Unavailable,
    /// Log entries asked for are no longer kept: copy a snapshot instead.
    LogTruncated,
    /// The endpoint exists but is not available in this deployment (e.g. no control plane).
    NotImplemented,
    /// The request's body did not arrive in full within the server's body timeout.
    RequestTimeout,
    Internal,
}

/// `{"message": "<Error> ...", "status": "failure", ...}`: every failure has this body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    pub status: String,
    pub code: ErrorCode,
    /// Keys the failure is about (conflicts, absent keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<i64>,
    /// With `seq_gap`: the last sequence number the replica applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// With `stale_epoch` / `epoch_ahead`: the responder's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        ErrorBody {
            message: format!("<Error> {message}"),
            status: "failure".into(),
            code,
            keys: Vec::new(),
            applied: None,
            epoch: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seed endpoints of the shard server

/// `POST /config`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigRequest {
    pub schema: SchemaSpec,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub shards: Vec<String>,
}

/// `GET /copy` (a JSON body on a GET, as the seed did).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyRequest {
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub shards: Vec<String>,
}

/// An inclusive key range, `{"low": 1000, "high": 8889}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    pub low: i64,
    pub high: i64,
}

/// `POST /read` answer; `data` stays raw JSON so routers pass rows through without re-parsing.
#[derive(Debug, Deserialize)]
pub struct ReadResponse {
    pub data: Box<RawValue>,
}

/// `POST /write` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedWriteResponse {
    pub message: String,
    pub current_idx: i64,
    pub status: String,
}

// ---------------------------------------------------------------------------------------------
// Our endpoints: writes through the primary, replication, status

/// `POST /v1/shards/{shard}/read_ranges`: several key ranges of one shard read in one request (a
/// router coalesces concurrent clients' reads of a shard). Served by whoever may serve `/read`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadRangesRequest {
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_READ_RANGES>")]
    pub ranges: Vec<KeyRange>,
}

/// The rows of each range of a [`ReadRangesRequest`], in its order: one JSON array per range,
/// sorted by key, kept raw so routers pass rows through without re-parsing.
#[derive(Debug, Deserialize)]
pub struct ReadRangesResponse {
    pub data: Vec<Box<RawValue>>,
}

/// One mutation asked of a shard's primary. Rows are positional, in schema column order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Add a row. An identical existing row is a no-op; a different one is a conflict.
    Insert { row: Row },
    /// Replace the row at `key` (which must exist; `row` must carry the same key).
    Update { key: i64, row: Row },
    /// Remove the row at `key` (which must exist).
    Delete { key: i64 },
}

/// `POST /v1/shards/{shard}/write`: a batch applied atomically (all or nothing) by the primary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteRequest {
    /// The sender's topology epoch; `None` for a client that does not take part in fencing.
    #[serde(default)]
    pub epoch: Option<u64>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_ROWS>")]
    pub ops: Vec<Op>,
    /// Validate against the current data and answer as if written, without writing (routers use it
    /// to find conflicts in every part of a multi-shard batch before writing any part).
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/shards/{shard}/write_batches`: several independent batches in one request (a router
/// coalesces concurrent clients' writes to one shard). Each batch is all or nothing on its own and
/// gets its own outcome, exactly as if it had been sent alone to `/write`; they join the same
/// group commit, so a request of many batches costs the primary about what one batch does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteBatchesRequest {
    /// As in [`WriteRequest`].
    #[serde(default)]
    pub epoch: Option<u64>,
    /// At most [`MAX_BATCHES`](crate::limits::MAX_BATCHES) batches of at most [`MAX_ROWS`] operations in all.
    #[serde(deserialize_with = "bounded_batches")]
    pub batches: Vec<Vec<Op>>,
    /// As in [`WriteRequest`].
    #[serde(default)]
    pub dry_run: bool,
}

/// The outcomes of a [`WriteBatchesRequest`], in the order of its batches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriteBatchesResponse {
    pub results: Vec<BatchOutcome>,
}

/// One batch's outcome: what `/write` would have answered for it alone.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchOutcome {
    Ok(WriteResponse),
    Err { status: u16, error: ErrorBody },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResponse {
    /// The shard sequence number that made this batch durable everywhere (0: nothing changed).
    pub seq: u64,
    pub inserted: usize,
    pub updated: usize,
    pub deleted: usize,
    /// Inserts of a row identical to the stored one (retries).
    pub unchanged: usize,
}

/// The final state of one key after a replication entry: a row, or absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub key: i64,
    pub row: Option<Row>,
}

/// One replication entry: everything one primary transaction changed in a shard. Applying it is
/// idempotent (it sets final states), so replaying an entry is harmless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// The epoch of the primary that created it.
    pub epoch: u64,
    pub changes: Vec<Change>,
}

/// `POST /v1/shards/{shard}/replicate`: consecutive entries from the primary. Empty `entries`
/// asks only for the replica's position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicateRequest {
    pub epoch: u64,
    /// The sending primary's name, for logs and fencing.
    pub primary: String,
    pub entries: Vec<Entry>,
    /// The epoch of the primary's entry just before `entries[0]`, when it still has it: the
    /// replica checks that its own entry there matches before appending (see
    /// [`crate::replication`], divergence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_epoch: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateResponse {
    /// The last sequence number this replica holds.
    pub applied: u64,
}

/// `POST /v1/lease`: a ready replica asks the primary it is sent to for read leases on the listed
/// shards (all the shards it replicates from that primary, in one request).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// The asking replica's server name.
    pub replica: String,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub shards: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// The shards this server is the primary of and lists the replica as ready for: the replica may
    /// serve reads of them for the lease duration, measured from before it sent the request.
    pub granted: Vec<String>,
}

/// `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerStatus {
    pub server: String,
    /// The epoch of the topology this server follows (0: none).
    pub epoch: u64,
    pub shards: BTreeMap<String, ShardStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub role: Role,
    /// Last sequence number applied here.
    pub applied_seq: u64,
    pub rows: i64,
    /// Order-independent checksum of the rows (decimal); equal on replicas holding equal rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Identity of this copy; changes whenever the copy starts over empty (new table, lost
    /// volume, installed snapshot). A changed id means "this copy lost its data".
    #[serde(default)]
    pub copy_id: String,
    /// Whether this copy's rows are held in memory (reads and decisions skip Postgres).
    #[serde(default)]
    pub cached: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    /// Configured with `/config` outside any topology: its own sole primary.
    Standalone,
}

/// First line of a snapshot stream (`GET /v1/shards/{shard}/snapshot`, newline-delimited JSON):
/// then one positional row per line, then a [`SnapshotEnd`] line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub shard: String,
    /// The sequence number the snapshot reflects.
    pub seq: u64,
    pub schema: SchemaSpec,
}

/// Last line of a snapshot stream; its absence means the stream was cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    pub end: bool,
    pub rows: u64,
}

/// `POST /v1/shards/{shard}/recover` on a recovering replica: replace this copy with a snapshot
/// of the shard's primary, then verify it against the primary at one sequence number. The
/// replica copies from the primary its own topology names, at the address the topology gives;
/// never from an address in a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// The server name of the primary the caller expects the copy to come from; the replica
    /// refuses (409) when its topology names another.
    pub primary: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverResponse {
    /// The sequence number of the snapshot that was installed.
    pub snapshot_seq: u64,
    pub snapshot_rows: u64,
    /// The sequence number at which the copy was verified equal to the source.
    pub verified_seq: u64,
    pub rows: i64,
    pub checksum: String,
}

/// `GET /v1/shards/{shard}/log?from=&to=`: entries still kept in the log, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogResponse {
    pub entries: Vec<Entry>,
}

/// `GET /v1/shards/{shard}/stats`: row count and checksum at one sequence number, computed while
/// no write can be applied to the shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    pub applied_seq: u64,
    pub rows: i64,
    pub checksum: String,
}

// ---------------------------------------------------------------------------------------------
// Typed client

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {}", body.message)]
    Api { url: String, status: u16, body: ErrorBody },
    #[error("{url} answered {status} with an unexpected body: {text}")]
    Unexpected { url: String, status: u16, text: String },
}

impl ClientError {
    /// The failure body, when the peer answered with one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Api { body, .. } => Some(body),
            _ => None,
        }
    }
    pub fn code(&self) -> Option<ErrorCode> {
        self.body().map(|b| b.code)
    }
}

/// A client for one shard server, cheap to clone (connection pool shared).
#[derive(Clone, Debug)]
pub struct ShardClient {
    http: reqwest::Client,
    base: String,
}

/// The HTTP client every sharddb process uses to call another: bounded connect and request times.
/// Installs the TLS provider first, so no caller (a test, a tool) can forget it. It carries no
/// credential: internal endpoints need [`crate::tls::Credentials::http_client`].
pub fn http_client(request_timeout: Duration) -> reqwest::Client {
    install_crypto_provider();
    client_defaults().timeout(request_timeout).build().expect("HTTP client builds")
}

/// The settings every sharddb HTTP client shares: a bounded connect, a reused connection pool and
/// no Nagle delay.
pub(crate) fn client_defaults() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        // Well below the servers' idle timeout (`serve`, 60 s by default), so a pooled connection
        // is never reused just as its server closes it.
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
}

/// Installs the process-wide TLS provider (ring). Idempotent; call at the start of every `main`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ShardClient {
    pub fn new(http: reqwest::Client, base: impl Into<String>) -> Self {
        ShardClient { http, base: base.into().trim_end_matches('/').to_owned() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: String,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                url,
                status,
                text: format!("{e}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api { url, status, body }),
            Err(_) => Err(ClientError::Unexpected {
                url,
                status,
                text: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            }),
        }
    }

    /// Reads several ranges of one shard in one request; one JSON array per range, in order.
    pub async fn read_ranges(&self, shard: &str, ranges: &[KeyRange]) -> Result<Vec<Box<RawValue>>, ClientError> {
        let url = format!("{}/v1/shards/{shard}/read_ranges", self.base);
        let body = ReadRangesRequest { ranges: ranges.to_vec() };
        let r: ReadRangesResponse = self.call(self.http.post(&url).json(&body), url).await?;
        Ok(r.data)
    }

    /// Sends independent batches to the shard's primary in one request.
    pub async fn write_batches(
        &self,
        shard: &str,
        req: &WriteBatchesRequest,
    ) -> Result<WriteBatchesResponse, ClientError> {
        let url = format!("{}/v1/shards/{shard}/write_batches", self.base);
        self.call(self.http.post(&url).json(req), url).await
    }

    /// Sends a batch to the shard's primary.
    pub async fn write(&self, shard: &str, req: &WriteRequest) -> Result<WriteResponse, ClientError> {
        let url = format!("{}/v1/shards/{shard}/write", self.base);
        self.call(self.http.post(&url).json(req), url).await
    }

    /// Forwards replication entries to a replica.
    pub async fn replicate(&self, shard: &str, req: &ReplicateRequest) -> Result<ReplicateResponse, ClientError> {
        let url = format!("{}/v1/shards/{shard}/replicate", self.base);
        self.call(self.http.post(&url).json(req), url).await
    }

    /// `POST /v1/lease`: asks this server (a primary) for read leases.
    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseResponse, ClientError> {
        let url = format!("{}/v1/lease", self.base);
        self.call(self.http.post(&url).json(req), url).await
    }

    /// Seed `POST /read`: rows of `shard` with keys in `[low, high]`, as raw JSON.
    pub async fn read(&self, shard: &str, key_name: &str, range: KeyRange) -> Result<Box<RawValue>, ClientError> {
        let url = format!("{}/read", self.base);
        let mut body = serde_json::Map::new();
        body.insert("shard".into(), shard.into());
        body.insert(key_name.into(), serde_json::to_value(range).expect("range serialises"));
        let r: ReadResponse = self.call(self.http.post(&url).json(&body), url).await?;
        Ok(r.data)
    }

    /// `GET /status`; `checksums` asks for row checksums too (reads every row).
    pub async fn status(&self, checksums: bool) -> Result<ServerStatus, ClientError> {
        let url = format!("{}/status?checksums={checksums}", self.base);
        self.call(self.http.get(&url), url).await
    }

    /// Stats of one shard at one sequence number (writes held off while computing).
    pub async fn stats(&self, shard: &str) -> Result<ShardStats, ClientError> {
        let url = format!("{}/v1/shards/{shard}/stats", self.base);
        self.call(self.http.get(&url), url).await
    }

    /// Log entries `from..=to` still kept by the server.
    pub async fn log(&self, shard: &str, from: u64, to: u64) -> Result<LogResponse, ClientError> {
        let url = format!("{}/v1/shards/{shard}/log?from={from}&to={to}", self.base);
        self.call(self.http.get(&url), url).await
    }

    /// Asks a recovering replica to copy the shard from `source` and verify it.
    pub async fn recover(&self, shard: &str, req: &RecoverRequest) -> Result<RecoverResponse, ClientError> {
        let url = format!("{}/v1/shards/{shard}/recover", self.base);
        self.call(self.http.post(&url).json(req), url).await
    }

    /// Opens the streamed snapshot of a shard (newline-delimited JSON).
    pub async fn snapshot(&self, shard: &str) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}/v1/shards/{shard}/snapshot", self.base);
        let resp =
            self.http.get(&url).send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api { url, status, body }),
            Err(_) => Err(ClientError::Unexpected { url, status, text: String::from_utf8_lossy(&bytes).into_owned() }),
        }
    }

    /// `GET /heartbeat`: true when the server answers 200.
    pub async fn heartbeat(&self) -> bool {
        let url = format!("{}/heartbeat", self.base);
        matches!(self.http.get(&url).send().await, Ok(r) if r.status().is_success())
    }
}
