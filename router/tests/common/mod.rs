//! Test harness: the real router `app` served on 127.0.0.1:0, in front of small in-process stubs
//! standing in for shard servers. The stubs record every call and answer as each test scripts, to
//! provoke router behaviours real servers produce only under failure. Does I/O (local sockets).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use router::config::{Config, RetryPolicy};
use router::{AppState, app};
use serde_json::{Value, json};
use shard_server::api::{
    BatchOutcome, ErrorBody, ErrorCode, ReadRangesRequest, WriteBatchesRequest, WriteBatchesResponse, WriteRequest,
    WriteResponse,
};
use shard_server::serve::{ServeLimits, serve};
use shard_server::topology::Topology;
use shard_server::topology_source::offer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One call a stub received.
#[derive(Clone, Debug)]
pub enum Call {
    Read { shard: String, low: i64, high: i64 },
    Write { shard: String, req: WriteRequest },
}

impl Call {
    pub fn is_dry_run(&self) -> bool {
        matches!(self, Call::Write { req, .. } if req.dry_run)
    }
    pub fn is_real_write(&self) -> bool {
        matches!(self, Call::Write { req, .. } if !req.dry_run)
    }
}

/// How a stub answers: status and JSON body for a call.
pub type Behaviour = Arc<dyn Fn(&Call) -> (StatusCode, Value) + Send + Sync>;

#[derive(Clone)]
struct StubState {
    calls: Arc<Mutex<Vec<Call>>>,
    behaviour: Behaviour,
    /// HTTP requests to the write endpoints (a coalesced request records several calls).
    write_requests: Arc<AtomicUsize>,
    /// How long each write or read request takes to answer.
    delay: Duration,
    /// HTTP requests to the read endpoints (a coalesced request records several calls).
    read_requests: Arc<AtomicUsize>,
}

/// A stand-in shard server.
pub struct Stub {
    pub url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    write_requests: Arc<AtomicUsize>,
    read_requests: Arc<AtomicUsize>,
}

impl Stub {
    pub fn write_requests(&self) -> usize {
        self.write_requests.load(Ordering::SeqCst)
    }

    pub fn read_requests(&self) -> usize {
        self.read_requests.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

async fn stub_read(State(s): State<StubState>, Json(body): Json<Value>) -> Response {
    let shard = body["shard"].as_str().unwrap_or_default().to_owned();
    let range = body.as_object().and_then(|o| o.iter().find(|(k, _)| k.as_str() != "shard")).map(|(_, v)| v.clone());
    let range = range.unwrap_or_default();
    let call = Call::Read { shard, low: range["low"].as_i64().unwrap(), high: range["high"].as_i64().unwrap() };
    answer(&s, call)
}

/// Each range is one recorded call; the first range the behaviour fails is the request's answer
/// (a read request succeeds or fails as a whole), else every range's `data`, in order.
async fn stub_read_ranges(
    State(s): State<StubState>,
    Path(shard): Path<String>,
    Json(req): Json<ReadRangesRequest>,
) -> Response {
    s.read_requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    let mut data = Vec::new();
    for r in req.ranges {
        let call = Call::Read { shard: shard.clone(), low: r.low, high: r.high };
        let (status, body) = (s.behaviour)(&call);
        s.calls.lock().unwrap().push(call);
        if !status.is_success() {
            return (status, Json(body)).into_response();
        }
        data.push(body["data"].clone());
    }
    Json(json!({ "data": data })).into_response()
}

async fn stub_write(State(s): State<StubState>, Path(shard): Path<String>, Json(req): Json<WriteRequest>) -> Response {
    s.write_requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    answer(&s, Call::Write { shard, req })
}

/// Each batch is one recorded call, answered as the behaviour says. A lone batch's failure is the
/// request's answer (so scripted transport-like failures stay request failures); with several
/// batches, failures with an error body become those batches' outcomes.
async fn stub_write_batches(
    State(s): State<StubState>,
    Path(shard): Path<String>,
    Json(req): Json<WriteBatchesRequest>,
) -> Response {
    s.write_requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    let single = req.batches.len() == 1;
    let mut results = Vec::new();
    for ops in req.batches {
        let call =
            Call::Write { shard: shard.clone(), req: WriteRequest { epoch: req.epoch, ops, dry_run: req.dry_run } };
        let (status, body) = (s.behaviour)(&call);
        s.calls.lock().unwrap().push(call);
        if status.is_success() {
            results.push(BatchOutcome::Ok(serde_json::from_value(body).unwrap()));
            continue;
        }
        match serde_json::from_value::<ErrorBody>(body.clone()) {
            Ok(error) if !single => results.push(BatchOutcome::Err { status: status.as_u16(), error }),
            _ => return (status, Json(body)).into_response(),
        }
    }
    Json(WriteBatchesResponse { results }).into_response()
}

fn answer(s: &StubState, call: Call) -> Response {
    let (status, body) = (s.behaviour)(&call);
    s.calls.lock().unwrap().push(call);
    (status, Json(body)).into_response()
}

pub async fn spawn_stub(behaviour: impl Fn(&Call) -> (StatusCode, Value) + Send + Sync + 'static) -> Stub {
    spawn_slow_stub(behaviour, Duration::ZERO).await
}

/// A stub whose write and read requests each take `write_delay` to answer.
pub async fn spawn_slow_stub(
    behaviour: impl Fn(&Call) -> (StatusCode, Value) + Send + Sync + 'static,
    write_delay: Duration,
) -> Stub {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let write_requests = Arc::new(AtomicUsize::new(0));
    let read_requests = Arc::new(AtomicUsize::new(0));
    let state = StubState {
        calls: calls.clone(),
        behaviour: Arc::new(behaviour),
        write_requests: write_requests.clone(),
        delay: write_delay,
        read_requests: read_requests.clone(),
    };
    let app = axum::Router::new()
        .route("/read", post(stub_read))
        .route("/v1/shards/{shard}/read_ranges", post(stub_read_ranges))
        .route("/v1/shards/{shard}/write", post(stub_write))
        .route("/v1/shards/{shard}/write_batches", post(stub_write_batches))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Stub { url, calls, write_requests, read_requests }
}

/// A stub that holds one row per key in `[low, high]` of every read (so merges can be checked)
/// and accepts every write.
pub async fn healthy_stub() -> Stub {
    spawn_stub(ok).await
}

pub fn ok(call: &Call) -> (StatusCode, Value) {
    match call {
        Call::Read { low, high, .. } => (StatusCode::OK, json!({"data": rows(*low, *high), "status": "success"})),
        Call::Write { req, .. } => {
            let resp = WriteResponse { seq: 1, inserted: req.ops.len(), ..WriteResponse::default() };
            (StatusCode::OK, serde_json::to_value(resp).unwrap())
        }
    }
}

/// Rows for the keys `low` and `high` (one row when equal).
pub fn rows(low: i64, high: i64) -> Vec<Value> {
    let mut keys = vec![low];
    if high != low {
        keys.push(high);
    }
    keys.into_iter().map(|k| json!({"Stud_id": k, "Stud_name": format!("s{k}"), "Stud_marks": 1})).collect()
}

pub fn error(status: StatusCode, code: ErrorCode, keys: Vec<i64>) -> (StatusCode, Value) {
    let mut body = ErrorBody::new(code, format!("stub says {code:?}"));
    body.keys = keys;
    (status, serde_json::to_value(body).unwrap())
}

/// An address nothing listens on (connections are refused).
pub async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

/// One shard of a test topology: id, low, size, primary, and (replica, state) pairs.
pub type ShardSpec<'a> = (&'a str, i64, i64, &'a str, &'a [(&'a str, &'a str)]);

/// A topology over `servers` (name, url; ids in order) and `shards`.
pub fn topology(epoch: u64, servers: &[(&str, &str)], shards: &[ShardSpec]) -> Topology {
    let servers: serde_json::Map<String, Value> =
        servers.iter().enumerate().map(|(i, (n, u))| (n.to_string(), json!({"id": i, "url": u}))).collect();
    let shards: Vec<Value> = shards
        .iter()
        .map(|(id, low, size, primary, replicas)| {
            let replicas: serde_json::Map<String, Value> =
                replicas.iter().map(|(n, s)| (n.to_string(), json!(s))).collect();
            json!({"id": id, "low": low, "size": size, "primary": primary, "replicas": replicas})
        })
        .collect();
    let doc = json!({
        "version": 1, "epoch": epoch,
        "schema": {"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "Number"]},
        "servers": servers, "shards": shards,
    });
    Topology::parse(doc.to_string().as_bytes()).unwrap()
}

/// Retry timings short enough for tests, long enough to be meaningful.
pub fn test_config() -> Config {
    Config {
        body_timeout: Duration::from_secs(60),
        upstream_timeout: Duration::from_secs(5),
        body_limit: 4096,
        retry: RetryPolicy {
            deadline: Duration::from_millis(2000),
            topology_wait: Duration::from_secs(3),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            read_attempt: Duration::from_millis(300),
        },
        ..Config::default()
    }
}

/// The real router serving on 127.0.0.1:0, and the sender that feeds it topologies.
pub struct Router {
    pub url: String,
    pub topology: watch::Sender<Option<Arc<Topology>>>,
    pub http: reqwest::Client,
}

impl Router {
    pub async fn start(initial: Option<Topology>, config: Config) -> Router {
        let limits = ServeLimits {
            header_timeout: ServeLimits::DEFAULT_HEADER_TIMEOUT,
            body_timeout: config.body_timeout,
            idle_timeout: ServeLimits::DEFAULT_IDLE_TIMEOUT,
            max_connections: 1024,
        };
        Router::start_with_limits(initial, config, limits).await
    }

    /// The router served with `limits` (its config's body timeout is theirs).
    pub async fn start_with_limits(initial: Option<Topology>, mut config: Config, limits: ServeLimits) -> Router {
        config.body_timeout = limits.body_timeout;
        shard_server::api::install_crypto_provider();
        let (tx, rx) = watch::channel(None);
        if let Some(t) = initial {
            offer(&tx, t);
        }
        let state = AppState::new(config, rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { serve(listener, app(state), limits, std::future::pending()).await.unwrap() });
        Router { url, topology: tx, http: shard_server::api::http_client(Duration::from_secs(20)) }
    }

    /// Sends `body` as raw bytes (with the given content type), returns status and parsed JSON.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &str, content_type: &str) -> (u16, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} answered non-JSON ({e}): {text:?}"));
        (status, json)
    }

    pub async fn json(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        self.send(method, path, &body.to_string(), "application/json").await
    }
}
