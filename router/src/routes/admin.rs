//! `POST /init`, `POST /add`, `DELETE /rm`: the seed's admin verbs. Parsing and the checks that
//! need no state are pure and live here (the seed's field names, the `<key>_low` shard field, `n`
//! against the list given); the control plane decides the rest and its answer is relayed (see
//! `control`). Handlers do I/O through the control plane.

use super::JsonBody;
use crate::app_state::AppState;
use crate::control::Verb;
use crate::error::RouterError;
use axum::Json;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value};
use shard_server::admin::{AddRequest, InitRequest, RmRequest, ShardDecl};
use shard_server::limits::{MAX_SERVERS, MAX_SHARDS, bounded_vec, opt_placement, placement};
use shard_server::schema::SchemaSpec;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long `/init` waits, once accepted, for the router to load the first topology, so that the
/// seed's client can write right after it.
const FIRST_TOPOLOGY_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInit {
    #[serde(rename = "N")]
    n: u32,
    schema: SchemaSpec,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    shards: Vec<Map<String, Value>>,
    #[serde(default, deserialize_with = "opt_placement")]
    servers: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdd {
    n: u32,
    #[serde(default, deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    new_shards: Vec<Map<String, Value>>,
    #[serde(default, deserialize_with = "placement")]
    servers: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRm {
    n: u32,
    #[serde(default, deserialize_with = "bounded_vec::<_, _, MAX_SERVERS>")]
    servers: Vec<String>,
}

fn bad(message: impl Into<String>) -> RouterError {
    RouterError::BadRequest(message.into())
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, RouterError> {
    serde_json::from_value(v).map_err(|e| bad(format!("malformed request: {e}")))
}

/// One seed shard `{"<key>_low":0,"Shard_id":"sh1","Shard_size":4096}`; `at` names it in errors.
fn parse_shard(at: &str, shard: &Map<String, Value>, key: &str) -> Result<ShardDecl, RouterError> {
    let low_field = format!("{key}_low");
    if let Some(extra) = shard.keys().find(|k| ![low_field.as_str(), "Shard_id", "Shard_size"].contains(&k.as_str())) {
        return Err(bad(format!("{at}: unknown field {extra} (expected {low_field}, Shard_id, Shard_size)")));
    }
    let int = |field: &str| match shard.get(field) {
        None => Err(bad(format!("{at}: missing {field}"))),
        Some(v) => v.as_i64().ok_or_else(|| bad(format!("{at}.{field} must be an integer, got {v}"))),
    };
    let id = match shard.get("Shard_id") {
        None => return Err(bad(format!("{at}: missing Shard_id"))),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(bad(format!("{at}.Shard_id must be a string, got {v}"))),
    };
    Ok(ShardDecl { id, low: int(&low_field)?, size: int("Shard_size")? })
}

/// The shard key of a schema as given: `key`, else the first column.
fn key_of(schema: &SchemaSpec) -> Result<&str, RouterError> {
    match (&schema.key, schema.columns.first()) {
        (Some(k), _) => Ok(k),
        (None, Some(first)) => Ok(first),
        (None, None) => Err(bad("schema.columns: at least one column is required")),
    }
}

pub fn parse_init(body: Value) -> Result<InitRequest, RouterError> {
    init_request(from_value(body)?)
}

/// The body is parsed straight into these shapes (never into a `Value` tree first), so a list
/// past its limit is cut off before it costs memory.
fn init_request(raw: RawInit) -> Result<InitRequest, RouterError> {
    // `N` sizes the database only when `servers` is absent; otherwise it is informational.
    if raw.servers.is_none() && raw.n as usize > MAX_SERVERS {
        return Err(bad(format!("N is {}; at most {MAX_SERVERS} servers are allowed", raw.n)));
    }
    let key = key_of(&raw.schema)?;
    let shards = raw
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| parse_shard(&format!("shards[{i}]"), s, key))
        .collect::<Result<_, _>>()?;
    Ok(InitRequest { n: raw.n, schema: raw.schema, shards, servers: raw.servers })
}

/// `key` is the current schema's key (new shards name their low field after it).
pub fn parse_add(body: Value, key: &str) -> Result<AddRequest, RouterError> {
    add_request(from_value(body)?, key)
}

fn add_request(raw: RawAdd, key: &str) -> Result<AddRequest, RouterError> {
    if raw.n as usize > raw.servers.len() {
        return Err(bad("Number of new servers (n) is greater than newly added instances"));
    }
    let new_shards = raw
        .new_shards
        .iter()
        .enumerate()
        .map(|(i, s)| parse_shard(&format!("new_shards[{i}]"), s, key))
        .collect::<Result<_, _>>()?;
    Ok(AddRequest { n: raw.n, new_shards, servers: raw.servers })
}

pub fn parse_rm(body: Value) -> Result<RmRequest, RouterError> {
    rm_request(from_value(body)?)
}

fn rm_request(raw: RawRm) -> Result<RmRequest, RouterError> {
    if raw.n as usize > MAX_SERVERS {
        return Err(bad(format!("n is {}; a database has at most {MAX_SERVERS} servers", raw.n)));
    }
    if raw.servers.len() > raw.n as usize {
        return Err(bad("Length of server list is more than removable instances"));
    }
    Ok(RmRequest { n: raw.n, servers: raw.servers })
}

/// With `--admin-token-file`, `/init`, `/add` and `/rm` answer only a request carrying
/// `Authorization: Bearer <the file's content>`; anything else is a 401 that changes nothing. The
/// file is read on each request, so a rotated token applies at once.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(path) = state.config().admin_token_file.as_ref() else { return next.run(req).await };
    let expected = match tokio::fs::read_to_string(path).await {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        Ok(_) => {
            return RouterError::Internal(format!("the admin token file {} is empty", path.display())).into_response();
        }
        Err(e) => {
            return RouterError::Internal(format!("cannot read the admin token file {}: {e}", path.display()))
                .into_response();
        }
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if shard_server::auth::same_secret(token.as_bytes(), expected.as_bytes()) => next.run(req).await,
        Some(_) => {
            RouterError::Unauthenticated("the bearer token is not this database's admin token".into()).into_response()
        }
        None => RouterError::Unauthenticated(format!(
            "{} needs the database's admin token: send Authorization: Bearer <token>",
            req.uri().path()
        ))
        .into_response(),
    }
}

fn relay((status, body): (axum::http::StatusCode, Value)) -> Response {
    (status, Json(body)).into_response()
}

#[tracing::instrument(skip_all)]
pub async fn init(State(state): State<AppState>, JsonBody(body): JsonBody<RawInit>) -> Result<Response, RouterError> {
    let request = init_request(body)?;
    let (status, body) = state.control().submit(Verb::Init, &request).await?;
    if status.is_success() && state.table().current().is_none() {
        // The control plane answers once the topology is written; wait until we route with it.
        if state.table().wait_newer(0, FIRST_TOPOLOGY_WAIT).await.is_none() {
            return Err(RouterError::Unavailable("configured, but no topology arrived in time".into()));
        }
    }
    Ok(relay((status, body)))
}

#[tracing::instrument(skip_all)]
pub async fn add(State(state): State<AppState>, JsonBody(body): JsonBody<RawAdd>) -> Result<Response, RouterError> {
    let routing = state.routing().map_err(|_| RouterError::Conflict {
        message: "the database is not configured yet: POST /init first".into(),
        keys: vec![],
    })?;
    let request = add_request(body, routing.schema.key_name())?;
    Ok(relay(state.control().submit(Verb::Add, &request).await?))
}

#[tracing::instrument(skip_all)]
pub async fn rm(State(state): State<AppState>, JsonBody(body): JsonBody<RawRm>) -> Result<Response, RouterError> {
    let request = rm_request(body)?;
    Ok(relay(state.control().submit(Verb::Rm, &request).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shard_server::schema::DType;

    fn message(e: RouterError) -> String {
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{e}");
        e.to_string()
    }

    #[test]
    fn init_takes_the_seed_shape() {
        let body = json!({
            "N": 3,
            "schema": {"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "String"]},
            "shards": [{"Stud_id_low": 0, "Shard_id": "sh1", "Shard_size": 4096},
                       {"Stud_id_low": 4096, "Shard_id": "sh2", "Shard_size": 4096}],
            "servers": {"Server0": ["sh1", "sh2"], "Server[5]": ["sh2"], "Server1": ["sh1"]}
        });
        let req = parse_init(body.clone()).unwrap();
        assert_eq!(req.n, 3);
        assert_eq!(req.schema.dtypes, [DType::Number, DType::String, DType::String]);
        assert_eq!(req.shards[1], ShardDecl { id: "sh2".into(), low: 4096, size: 4096 });
        assert_eq!(req.servers.unwrap()["Server[5]"], ["sh2"]);

        let mut auto = body.clone();
        auto.as_object_mut().unwrap().remove("servers");
        assert_eq!(parse_init(auto).unwrap().servers, None, "servers is optional");

        let mut keyed = body;
        keyed["schema"]["key"] = json!("Stud_marks");
        let e = message(parse_init(keyed).unwrap_err());
        assert_eq!(e, "shards[0]: unknown field Stud_id_low (expected Stud_marks_low, Shard_id, Shard_size)");
    }

    #[test]
    fn init_errors_name_the_field() {
        let base = || {
            json!({
                "N": 1, "schema": {"columns": ["id"], "dtypes": ["Number"]},
                "shards": [{"id_low": 0, "Shard_id": "a", "Shard_size": 10}]
            })
        };
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["shards"][0]["Shard_size"] = json!("10")),
                "shards[0].Shard_size must be an integer, got \"10\"",
            ),
            (Box::new(|v| v["shards"][0]["Shard_id"] = json!(7)), "shards[0].Shard_id must be a string, got 7"),
            (
                Box::new(|v| {
                    v["shards"][0].as_object_mut().unwrap().remove("id_low");
                }),
                "shards[0]: missing id_low",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("N");
                }),
                "malformed request: missing field `N`",
            ),
            (Box::new(|v| v["n"] = json!(1)), "malformed request: unknown field `n`"),
            (Box::new(|v| v["schema"]["columns"] = json!([])), "schema.columns: at least one column is required"),
        ];
        for (edit, want) in cases {
            let mut v = base();
            edit(&mut v);
            let got = message(parse_init(v).unwrap_err());
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
        parse_init(base()).unwrap();
    }

    #[test]
    fn counts_beyond_the_limits_are_refused_while_parsing() {
        let base = || {
            json!({
                "N": 1, "schema": {"columns": ["id"], "dtypes": ["Number"]},
                "shards": [{"id_low": 0, "Shard_id": "a", "Shard_size": 10}]
            })
        };
        let mut huge_n = base();
        huge_n["N"] = json!(4294967295u32);
        assert_eq!(
            message(parse_init(huge_n.clone()).unwrap_err()),
            "N is 4294967295; at most 256 servers are allowed"
        );
        huge_n["servers"] = json!({"S0": ["a"]});
        assert_eq!(parse_init(huge_n).unwrap().n, 4294967295, "informational beside servers");
        let mut many_shards = base();
        many_shards["shards"] = Value::Array(vec![json!({}); MAX_SHARDS + 1]);
        let e = message(parse_init(many_shards).unwrap_err());
        assert!(e.contains("more than 1024 items in a list"), "{e}");
        let mut many_servers = base();
        let servers: Map<String, Value> = (0..=MAX_SERVERS).map(|i| (format!("S{i}"), json!(["a"]))).collect();
        many_servers["servers"] = Value::Object(servers);
        let e = message(parse_init(many_servers).unwrap_err());
        assert!(e.contains("more than 256 entries in an object"), "{e}");
        let e = message(parse_rm(json!({"n": 4294967295u32})).unwrap_err());
        assert_eq!(e, "n is 4294967295; a database has at most 256 servers");
    }

    #[test]
    fn add_checks_n_against_the_servers_listed() {
        let body = json!({
            "n": 2,
            "new_shards": [{"Stud_id_low": 16384, "Shard_id": "sh5", "Shard_size": 4096}],
            "servers": {"Server4": ["sh3", "sh5"], "Server[5]": ["sh2", "sh5"]}
        });
        let req = parse_add(body.clone(), "Stud_id").unwrap();
        assert_eq!(req.new_shards, [ShardDecl { id: "sh5".into(), low: 16384, size: 4096 }]);
        assert_eq!(req.servers.len(), 2);
        let mut too_many = body;
        too_many["n"] = json!(3);
        assert_eq!(
            message(parse_add(too_many, "Stud_id").unwrap_err()),
            "Number of new servers (n) is greater than newly added instances"
        );
        let e = parse_add(json!({"n": 1, "servers": {"S": ["a"]}}), "k").unwrap();
        assert!(e.new_shards.is_empty(), "new_shards is optional");
        let e = message(parse_add(json!({"n": -1, "servers": {}}), "k").unwrap_err());
        assert!(e.starts_with("malformed request: invalid value: integer `-1`"), "{e}");
    }

    #[test]
    fn rm_checks_the_list_against_n() {
        let req = parse_rm(json!({"n": 2, "servers": ["Server4"]})).unwrap();
        assert_eq!(req, RmRequest { n: 2, servers: vec!["Server4".into()] });
        assert_eq!(parse_rm(json!({"n": 1})).unwrap().servers, Vec::<String>::new());
        assert_eq!(
            message(parse_rm(json!({"n": 1, "servers": ["Server1", "Server2"]})).unwrap_err()),
            "Length of server list is more than removable instances"
        );
        let e = message(parse_rm(json!({"n": 1, "servers": "Server1"})).unwrap_err());
        assert!(e.starts_with("malformed request: invalid type: string"), "{e}");
    }
}
