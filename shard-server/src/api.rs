//! Wire contracts between sharddb processes: request and response bodies of the shard server (the
//! seed endpoints and our own under `/v1`), the error body every component speaks, and a typed
//! client. Routers, the operator and tests all use these types; nothing re-declares them.
//!
//! # Versions
//! The contract is versioned ([`PROTOCOL_VERSION`]) so that release N and N−1 of the router, the
//! shard server and the operator work together in any mix, in both directions, as they must for
//! minutes of every rolling upgrade. The rules every change follows:
//! - A field added to a body is optional (`#[serde(default)]`) and means, when absent, what the
//!   previous release did; readers ignore fields they do not know (no `deny_unknown_fields` on
//!   any body two sharddb processes exchange).
//! - A new error code is understood by its HTTP status until every peer knows it: a code this
//!   build does not know parses as [`ErrorCode::Unknown`], and [`ClientError::code`] answers the
//!   code its status stands for ([`ErrorCode::for_status`]). So a new code must come with the
//!   status whose class its handling falls in (retry on 503, reroute on 421, final on 4xx).
//! - A new endpoint is used only once the peer advertises a protocol that has it, or with a
//!   fallback to what the previous release offers.
//! - Every response carries the responder's version in the [`PROTOCOL_HEADER`] header, every
//!   request of [`http_client`] the sender's, and `/status` says it in [`ServerStatus::protocol`].
//!   A peer declaring a version older than [`OLDEST_PROTOCOL_VERSION`] is refused
//!   (`unsupported_protocol`, 400); one declaring none is a client of the seed API, or a release
//!   from before the header (version 1), and is served.

use crate::limits::{MAX_READ_RANGES, MAX_ROWS, MAX_SHARDS, bounded_batches, bounded_vec};
use crate::schema::{Row, SchemaSpec};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Versions

/// The wire protocol this build speaks. Version 1 is the release before versions were
/// advertised; each release whose contract changes adds one.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol this build still works with: the previous release's (N−1).
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
/// The header carrying a process's protocol version, on requests and responses alike.
pub const PROTOCOL_HEADER: &str = "sharddb-protocol";

/// What a peer's [`PROTOCOL_HEADER`] says: absent (a seed client, or a release from before
/// versions were advertised), a version, or something that is not one.
pub fn peer_protocol(value: Option<&str>) -> Result<Option<u32>, String> {
    match value {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| format!("{PROTOCOL_HEADER} {v:?} is not a version number")),
    }
}

/// `/status` of a release from before versions were advertised says no protocol: version 1.
fn protocol_v1() -> u32 {
    1
}

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
    /// The sender declared a protocol version older than [`OLDEST_PROTOCOL_VERSION`].
    UnsupportedProtocol,
    /// A code this build does not know (a newer peer's): read it by its HTTP status, see
    /// [`ErrorCode::for_status`]. Never sent.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code an answer's HTTP status stands for: how a failure whose own code is
    /// [`ErrorCode::Unknown`] is handled. 503 (and the other statuses of a failure worth
    /// retrying) is `unavailable`, 421 `not_primary` (route again), 409 `conflict`, 404
    /// `not_found`, 413 `payload_too_large`, another 4xx `bad_request`, any other 5xx `internal`.
    pub fn for_status(status: u16) -> ErrorCode {
        match status {
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            421 => ErrorCode::NotPrimary,
            429 | 502 | 503 | 504 => ErrorCode::Unavailable,
            501 => ErrorCode::NotImplemented,
            400..=499 => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
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
    /// The running hash of the shard's history up to and including this entry (hex), which a
    /// replica checks against its own (see `replication::divergence`); absent from a primary that
    /// predates it or does not know its history's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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
    /// The primary's last confirmed entry (see [`Confirmed`]); absent from senders that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Confirmed>,
}

/// An entry a primary vouches for: every copy it waits for holds it (and every entry before it),
/// so it survives any failover. A replica shows readers the effects of its entries up to it once
/// its own entry there is the same one (see `replication::visibility`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    pub seq: u64,
    /// The epoch of the primary that created the entry: with `seq`, it names the entry.
    pub epoch: u64,
    /// The entry's history hash, when known: it names the whole history up to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateResponse {
    /// The last sequence number this replica holds.
    pub applied: u64,
    /// The replica's history hash at `applied` (see `replication::divergence`), when known: lets
    /// a primary that cannot send its own entry at that number (its log lacks it) still tell
    /// the same history from another. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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
    /// For each granted shard, how long the lease may run at most (in ms, measured the same way):
    /// no longer than the primary's own lease from the operator. Absent: the full lease (an older
    /// primary).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub valid_ms: BTreeMap<String, u64>,
    /// The primary's last confirmed entry of each granted shard, so that a replica shows what
    /// was confirmed even when no write follows to carry it; absent from older primaries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub confirmed: BTreeMap<String, Confirmed>,
}

/// `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerStatus {
    pub server: String,
    /// The protocol this server speaks ([`PROTOCOL_VERSION`]); 1 when absent (a release from
    /// before versions were advertised).
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    /// The epoch of the topology this server follows (0: none).
    pub epoch: u64,
    pub shards: BTreeMap<String, ShardStatus>,
    /// A moment of this server's clock just before it answered, for the operator to grant primary
    /// leases measured from it (see [`PrimaryLeaseRequest`]); absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<LeaseToken>,
    /// How this server authenticates internal callers (`none`, `migrate`, `strict`); absent from
    /// releases from before internal authentication, which took anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_auth: Option<crate::tls::InternalAuth>,
}

/// A moment on one server process's monotonic clock: the process (`boot`, random per start) and
/// the microseconds since it started. Only that process can turn it back into a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseToken {
    pub boot: u64,
    pub at_us: u64,
}

/// `POST /v1/primary_lease`: the operator lets a primary serve reads of the listed shards (those
/// it is the primary of in the operator's topology of `epoch`) until `lease_ms` after the moment
/// `token` names, which the server handed out before the operator decided: so the server's lease
/// always ends before the operator stops counting on it, however late this request arrives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrimaryLeaseRequest {
    pub token: LeaseToken,
    pub epoch: u64,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub shards: Vec<String>,
    pub lease_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryLeaseResponse {
    /// The shards this server took the lease for: it is their primary in a topology at least as
    /// new as `epoch`.
    pub granted: Vec<String>,
    /// A fresh token, for the next grant (so the operator need not probe `/status` for one).
    pub next_token: LeaseToken,
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
    /// A ready replica: whether it caught up with its primary as of the topology that made it
    /// ready (only then does it hold every acknowledged write, so only then may it be promoted).
    /// Absent from primaries, other copies and older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
    /// The running hash of this copy's history at `applied_seq` (see `replication::divergence`),
    /// when known: two copies at one sequence number with different hashes hold different
    /// histories. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The highest sequence number this copy knows confirmed (acknowledged by its primary once
    /// every ready replica held it; see `replication::visibility`); 0 when it knows none. Absent
    /// from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_seq: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    /// Configured with `/config` outside any topology: its own sole primary.
    Standalone,
    /// A role this build does not know (a newer server's); the copy's position and identity,
    /// which the operator reads, mean the same whatever its role.
    #[serde(other)]
    Unknown,
}

/// First line of a snapshot stream (`GET /v1/shards/{shard}/snapshot`, newline-delimited JSON):
/// then one positional row per line, then a [`SnapshotEnd`] line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub shard: String,
    /// The sequence number the snapshot reflects.
    pub seq: u64,
    pub schema: SchemaSpec,
    /// The source's history hash at `seq`, when known: the installed copy carries it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Last line of a snapshot stream; its absence means the stream was cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    pub end: bool,
    pub rows: u64,
    /// A digest of the rows streamed, from the same database snapshot as the rows: the bitwise XOR
    /// of `hashtextextended(row::text, 0)` over every row (the row as the record of the table's
    /// columns in order), as decimal text. A replica computes the same over the table it installed
    /// and commits only if both agree (see `replication::replica`). Absent from releases before it;
    /// a replica then verifies against the source's [`ShardStats`] instead.
    ///
    /// It is not [`ShardStats::checksum`]: that md5 sum costs about five times as much per row, and
    /// the primary pauses its writer while computing it. Postgres's hash functions give the same
    /// value for the same text on every platform of one byte order (all that sharddb runs on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
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
    /// The source's checksum or, for a snapshot that carried a digest, that digest (both at
    /// `verified_seq`).
    pub checksum: String,
    /// Where the time went; absent from releases before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<RecoverTimings>,
}

/// Where a recover's time went, in microseconds. Streaming the snapshot and copying it into
/// Postgres overlap: `copy_us` runs from the first row to the copy's end, and `stream_wait_us`
/// (waiting for the source), `parse_us` (parsing, checking and encoding rows) and `copy_wait_us`
/// (waiting for Postgres to take them) split the reading side's share of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverTimings {
    /// Opening the snapshot and emptying the table (its primary key index dropped).
    pub prepare_us: u64,
    pub copy_us: u64,
    pub stream_wait_us: u64,
    pub parse_us: u64,
    pub copy_wait_us: u64,
    /// Building the primary key index once every row is in.
    pub index_us: u64,
    /// Counting and digesting the installed rows, compared with the snapshot's end line.
    pub verify_us: u64,
    pub commit_us: u64,
    /// Applying the entries the source committed meanwhile (from a source that sends no digest,
    /// this includes the verification against its checksum).
    pub catch_up_us: u64,
    /// Loading the row cache from the new table.
    pub cache_us: u64,
    /// From the request to the answer.
    pub total_us: u64,
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
    /// The failure's code; a code this build does not know is the one its status stands for
    /// (see the module documentation, versions).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, status, .. } if body.code == ErrorCode::Unknown => {
                Some(ErrorCode::for_status(*status))
            }
            _ => self.body().map(|b| b.code),
        }
    }
}

/// A client for one shard server, cheap to clone (connection pool shared).
#[derive(Clone, Debug)]
pub struct ShardClient {
    http: reqwest::Client,
    base: String,
}

/// The HTTP client every sharddb process uses to call another: bounded connect and request times,
/// and this build's protocol version on every request. Installs the TLS provider first, so no
/// caller (a test, a tool) can forget it. It carries no credential: internal endpoints need
/// [`crate::tls::Credentials::http_client`].
pub fn http_client(request_timeout: Duration) -> reqwest::Client {
    install_crypto_provider();
    client_defaults().timeout(request_timeout).build().expect("HTTP client builds")
}

/// The settings every sharddb HTTP client shares: this build's protocol version, a bounded
/// connect, a reused connection pool and no Nagle delay.
pub(crate) fn client_defaults() -> reqwest::ClientBuilder {
    install_crypto_provider();
    let version = reqwest::header::HeaderValue::from(PROTOCOL_VERSION);
    reqwest::Client::builder()
        .default_headers([(reqwest::header::HeaderName::from_static(PROTOCOL_HEADER), version)].into_iter().collect())
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

    /// `POST /v1/primary_lease`: the operator's lease for this server as a primary.
    pub async fn primary_lease(&self, req: &PrimaryLeaseRequest) -> Result<PrimaryLeaseResponse, ClientError> {
        let url = format!("{}/v1/primary_lease", self.base);
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
