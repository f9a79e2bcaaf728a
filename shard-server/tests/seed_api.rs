//! The seed data-server endpoints against a real Postgres: shapes, decisions and failure cases.

mod common;

use common::Cluster;
use reqwest::Method;
use serde_json::json;

const SH1: common::ShardDef = ("sh1", 0, 4096, 0, &[0]);

#[tokio::test]
async fn standalone_server_speaks_the_seed_api() {
    // One server and no shard in the topology for it: /config makes standalone shards, as the seed did.
    let c = Cluster::start(1, &[SH1]).await;
    let (st, body) = c
        .send(
            Method::POST,
            0,
            "/config",
            r#"{"schema":{"columns":["Stud_id","Stud_name","Stud_marks"],"dtypes":["Number","String","String"]},"shards":["sa","sb"]}"#,
        )
        .await;
    assert_eq!((st, body), (200, json!({"message":"Server0:sa, Server0:sb configured","status":"success"})));

    let (st, _) = c.send(Method::GET, 0, "/heartbeat", "").await;
    assert_eq!(st, 200);
    // Every answer says the server's protocol version, and /status does too.
    use shard_server::api::{PROTOCOL_HEADER, PROTOCOL_VERSION};
    let answer = c.http.get(c.url(0, "/heartbeat")).send().await.unwrap();
    assert_eq!(answer.headers()[PROTOCOL_HEADER], PROTOCOL_VERSION.to_string().as_str());
    assert_eq!(c.client(0).status(false).await.unwrap().protocol, PROTOCOL_VERSION);

    let (st, body) = c
        .send(
            Method::POST,
            0,
            "/write",
            r#"{"shard":"sa","curr_idx":507,"data":[{"Stud_id":2255,"Stud_name":"GHI","Stud_marks":27},{"Stud_id":7,"Stud_name":"A","Stud_marks":"5"}]}"#,
        )
        .await;
    assert_eq!((st, body), (200, json!({"message":"Data entries added","current_idx":509,"status":"success"})));

    // A String column takes a number as its decimal text; rows come back sorted by key.
    let (st, body) = c.send(Method::POST, 0, "/read", r#"{"shard":"sa","Stud_id":{"low":0,"high":3000}}"#).await;
    assert_eq!(st, 200);
    assert_eq!(
        body,
        json!({"data":[{"Stud_id":7,"Stud_name":"A","Stud_marks":"5"},{"Stud_id":2255,"Stud_name":"GHI","Stud_marks":"27"}],"status":"success"})
    );

    let (st, body) = c
        .send(
            Method::PUT,
            0,
            "/update",
            r#"{"shard":"sa","Stud_id":2255,"data":{"Stud_id":2255,"Stud_name":"GHI","Stud_marks":28}}"#,
        )
        .await;
    assert_eq!((st, body), (200, json!({"message":"Data entry for Stud_id:2255 updated","status":"success"})));

    let (st, body) = c.send(Method::DELETE, 0, "/del", r#"{"shard":"sa","Stud_id":7}"#).await;
    assert_eq!((st, body), (200, json!({"message":"Data entry with Stud_id:7 removed","status":"success"})));

    let (st, body) = c.send(Method::GET, 0, "/copy", r#"{"shards":["sa","sb"]}"#).await;
    assert_eq!(st, 200);
    assert_eq!(body, json!({"sa":[{"Stud_id":2255,"Stud_name":"GHI","Stud_marks":"28"}],"sb":[],"status":"success"}));

    // A write carrying an epoch is addressed to a shard's primary in a topology. This server
    // follows epoch 1, which does not make it the primary of sa: refused for good, not "retry".
    let routed = |epoch: u64| json!({"epoch": epoch, "ops": [{"op": "insert", "row": [9, "Z", "1"]}]}).to_string();
    let (st, body) = c.send(Method::POST, 0, "/v1/shards/sa/write", &routed(1)).await;
    assert_eq!((st, body["code"].as_str()), (421, Some("not_primary")), "{body}");
    let (st, body) =
        c.send(Method::POST, 0, "/v1/shards/sa/write_batches", &json!({"epoch": 1, "batches": [[]]}).to_string()).await;
    assert_eq!((st, body["code"].as_str()), (421, Some("not_primary")), "{body}");
    // A sender ahead of us: a newer topology may yet give this server the shard.
    let (st, body) = c.send(Method::POST, 0, "/v1/shards/sa/write", &routed(5)).await;
    assert_eq!((st, body["code"].as_str()), (503, Some("epoch_ahead")), "{body}");
    let (_, body) = c.send(Method::POST, 0, "/read", r#"{"shard":"sa","Stud_id":{"low":9,"high":9}}"#).await;
    assert_eq!(body["data"], json!([]), "nothing was written");
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let c = Cluster::start(1, &[SH1]).await;
    let ok_row = r#"{"Stud_id":1,"Stud_name":"A","Stud_marks":1}"#;
    let (st, _) =
        c.send(Method::POST, 0, "/write", &format!(r#"{{"shard":"sh1","curr_idx":0,"data":[{ok_row}]}}"#)).await;
    assert_eq!(st, 200);

    let cases: &[(Method, &str, String, u16, &str)] = &[
        (Method::POST, "/write", "{oops".into(), 400, "malformed JSON"),
        (Method::POST, "/write", "".into(), 400, "body is empty"),
        (Method::POST, "/write", r#"{"shard":"nope","data":[]}"#.into(), 404, "shard nope is not held"),
        (Method::POST, "/write", r#"{"shard":"sh1"}"#.into(), 400, "data is missing"),
        (Method::POST, "/write", r#"{"shard":"sh1","data":[]}"#.into(), 400, "batch is empty"),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"B","Stud_marks":1},{"Stud_id":"3","Stud_name":"C","Stud_marks":1}]}"#.into(),
            400,
            "data[1]: column Stud_id must be a Number",
        ),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"B","Stud_marks":1.5}]}"#.into(),
            400,
            "column Stud_marks must be a Number",
        ),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"B","Stud_marks":1,"x":1}]}"#.into(),
            400,
            "column x is not in the schema",
        ),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"B","Stud_marks":1},{"Stud_id":2,"Stud_name":"B","Stud_marks":1}]}"#.into(),
            400,
            "Stud_id 2 appears more than once",
        ),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":5000,"Stud_name":"B","Stud_marks":1}]}"#.into(),
            400,
            "Stud_id 5000 is outside shard sh1 [0, 4096)",
        ),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"B","Stud_marks":1},{"Stud_id":1,"Stud_name":"other","Stud_marks":1}]}"#.into(),
            409,
            "Stud_id 1 already hold(s) a different row",
        ),
        (
            Method::PUT,
            "/update",
            r#"{"shard":"sh1","Stud_id":1,"data":{"Stud_id":2,"Stud_name":"B","Stud_marks":1}}"#.into(),
            400,
            "may not change the key",
        ),
        (
            Method::PUT,
            "/update",
            r#"{"shard":"sh1","Stud_id":9,"data":{"Stud_id":9,"Stud_name":"B","Stud_marks":1}}"#.into(),
            404,
            "no data entry for Stud_id 9",
        ),
        (Method::DELETE, "/del", r#"{"shard":"sh1","Stud_id":9}"#.into(), 404, "no data entry for Stud_id 9"),
        (Method::DELETE, "/del", r#"{"shard":"sh1"}"#.into(), 400, "column Stud_id is missing"),
        (Method::POST, "/read", r#"{"shard":"sh1","Stud_id":{"low":5,"high":1}}"#.into(), 400, "low 5 is greater than high 1"),
        (Method::POST, "/read", r#"{"shard":"sh1","Stud_id":{"low":"a","high":1}}"#.into(), 400, "Stud_id must be"),
        (Method::GET, "/write", "".into(), 405, "method not allowed"),
        (Method::GET, "/nowhere", "".into(), 404, "no such endpoint"),
        (Method::POST, "/config", r#"{"schema":{"columns":["a b"],"dtypes":["Number"]},"shards":["x"]}"#.into(), 400, "not a valid identifier"),
        (Method::POST, "/config", r#"{"schema":{"columns":["a"],"dtypes":["Number"]},"shards":["x;drop"]}"#.into(), 400, "not a valid identifier"),
        (Method::POST, "/config", r#"{"schema":{"columns":["a"],"dtypes":["Number"]},"shards":["sh1"]}"#.into(), 409, "another schema"),
        (
            Method::POST,
            "/write",
            r#"{"shard":"sh1","data":[{"Stud_id":2,"Stud_name":"a\u0000b","Stud_marks":1}]}"#.into(),
            400,
            "data[0]: column Stud_name contains a NUL character",
        ),
        (
            Method::POST,
            "/v1/shards/sh1/write",
            r#"{"ops":[{"op":"insert","row":[2,"a\u0000b",1]}]}"#.into(),
            400,
            "column Stud_name contains a NUL character",
        ),
        (Method::GET, "/v1/shards/sh1/log?from=x&to=2", "".into(), 400, "query string: Failed to deserialize"),
        (Method::GET, "/status?checksums=maybe", "".into(), 400, "query string: Failed to deserialize"),
        (
            Method::POST,
            "/config",
            format!(r#"{{"schema":{{"columns":["a"],"dtypes":["Number"]}},"shards":{:?}}}"#, vec!["s"; 1025]),
            400,
            "more than 1024 items in a list",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let (st, got) = c.send(method.clone(), 0, path, body).await;
        assert_eq!(st, *status, "{method} {path} {body}: {got}");
        assert_eq!(got["status"], "failure", "{got}");
        let msg = got["message"].as_str().unwrap();
        assert!(
            msg.starts_with("<Error> ") && msg.contains(needle),
            "{method} {path}: {msg:?} should contain {needle:?}"
        );
    }
    // Nothing of the failed batches was written: only the first row is there.
    let (_, body) = c.send(Method::POST, 0, "/read", r#"{"shard":"sh1","Stud_id":{"low":0,"high":4095}}"#).await;
    assert_eq!(body["data"], json!([{"Stud_id":1,"Stud_name":"A","Stud_marks":1}]));

    // An identical retry is a success and changes nothing.
    let (st, _) = c.send(Method::POST, 0, "/write", &format!(r#"{{"shard":"sh1","data":[{ok_row}]}}"#)).await;
    assert_eq!(st, 200);
    let status = c.client(0).status(true).await.unwrap();
    assert_eq!(status.shards["sh1"].rows, 1);
    assert_eq!(status.shards["sh1"].applied_seq, 1, "the retry made no new entry");
}

#[tokio::test]
async fn oversized_body_is_a_json_413() {
    let c = Cluster::start(1, &[SH1]).await;
    let big =
        format!(r#"{{"shard":"sh1","data":[{{"Stud_id":1,"Stud_name":"{}","Stud_marks":1}}]}}"#, "x".repeat(2 << 20));
    let (st, body) = c.send(Method::POST, 0, "/write", &big).await;
    assert_eq!(st, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large");
}
