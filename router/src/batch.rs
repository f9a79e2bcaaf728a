//! Turning write requests into per-shard parts: validation of a whole `/write` batch (row shapes,
//! duplicate keys, keys in no shard, refused or skipped) before anything is sent, and the
//! single-key checks of `/update` and `/del`. Pure; no I/O.

use crate::error::RouterError;
use crate::routing::Ranges;
use serde_json::{Map, Value};
use shard_server::api::Op;
use shard_server::schema::{Row, Schema};
use shard_server::topology::UnroutedKeys;
use std::collections::{BTreeMap, HashMap};

/// The ops for one shard, with the keys they touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Index of the shard in the routing table.
    pub shard: usize,
    pub keys: Vec<i64>,
    pub ops: Vec<Op>,
}

impl Part {
    fn single(shard: usize, key: i64, op: Op) -> Vec<Part> {
        vec![Part { shard, keys: vec![key], ops: vec![op] }]
    }
}

/// A `/write` batch split by shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertPlan {
    /// In shard order, rows in request order.
    pub parts: Vec<Part>,
    /// Keys in no shard, in request order, when the database skips them (`UnroutedKeys::Skip`).
    pub skipped: Vec<i64>,
}

impl InsertPlan {
    /// Rows that go to a shard.
    pub fn routed(&self) -> usize {
        self.parts.iter().map(|p| p.ops.len()).sum()
    }
}

/// Validates every row of a `/write` batch and groups the inserts by shard (parts in shard order,
/// rows in request order). The first problem found is reported, naming the row's index in `data`,
/// its key when it has one, and what is wrong. A key in no shard is refused, or skipped when
/// `unrouted` says so; an empty batch is a plan with nothing to write (the seed answered it with
/// `0 Data entries added`).
pub fn plan_inserts(
    schema: &Schema,
    ranges: &Ranges,
    rows: &[Value],
    unrouted: UnroutedKeys,
) -> Result<InsertPlan, RouterError> {
    let key_name = schema.key_name();
    let mut skipped = Vec::new();
    let mut seen: HashMap<i64, usize> = HashMap::with_capacity(rows.len());
    let mut parts: BTreeMap<usize, Part> = BTreeMap::new();
    for (i, value) in rows.iter().enumerate() {
        let row = schema.parse_row(value).map_err(|e| {
            let key =
                value.get(key_name).and_then(Value::as_i64).map(|k| format!(" ({key_name} {k})")).unwrap_or_default();
            RouterError::BadRequest(format!("data[{i}]{key}: {e}"))
        })?;
        let key = row.key(schema);
        if let Some(first) = seen.insert(key, i) {
            return Err(RouterError::BadRequest(format!(
                "data[{i}]: {key_name} {key} appears twice in the batch (also data[{first}])"
            )));
        }
        let Some(shard) = ranges.shard_for_key(key) else {
            match unrouted {
                UnroutedKeys::Skip => {
                    skipped.push(key);
                    continue;
                }
                UnroutedKeys::Reject => {
                    return Err(RouterError::BadRequest(format!(
                        "data[{i}]: {key_name} {key} is in no shard; nothing was written"
                    )));
                }
            }
        };
        let part = parts.entry(shard).or_insert_with(|| Part { shard, keys: Vec::new(), ops: Vec::new() });
        part.keys.push(key);
        part.ops.push(Op::Insert { row });
    }
    Ok(InsertPlan { parts: parts.into_values().collect(), skipped })
}

/// The key named by the request body's key field (`{"Stud_id": 2255, ...}`).
pub fn request_key(schema: &Schema, body: &Map<String, Value>) -> Result<i64, RouterError> {
    let key_name = schema.key_name();
    if !body.contains_key(key_name) {
        return Err(RouterError::BadRequest(format!("missing field {key_name} (the key of the row)")));
    }
    schema.parse_key(body.get(key_name)).map_err(|e| RouterError::BadRequest(e.to_string()))
}

fn shard_of(schema: &Schema, ranges: &Ranges, key: i64) -> Result<usize, RouterError> {
    ranges
        .shard_for_key(key)
        .ok_or_else(|| RouterError::BadRequest(format!("{} {key} is in no shard", schema.key_name())))
}

/// `/update` body `{"Stud_id": 2255, "data": {full row}}` → the key and its one-op part. The row
/// may not change the key.
pub fn plan_update(
    schema: &Schema,
    ranges: &Ranges,
    body: &Map<String, Value>,
) -> Result<(i64, Vec<Part>), RouterError> {
    let key_name = schema.key_name();
    let key = request_key(schema, body)?;
    let data =
        body.get("data").ok_or_else(|| RouterError::BadRequest("missing field data (the full new row)".into()))?;
    let row: Row = schema.parse_row(data).map_err(|e| RouterError::BadRequest(format!("data: {e}")))?;
    let row_key = row.key(schema);
    if row_key != key {
        return Err(RouterError::BadRequest(format!(
            "data.{key_name} is {row_key} but {key_name} is {key}: an update may not change the key"
        )));
    }
    let shard = shard_of(schema, ranges, key)?;
    Ok((key, Part::single(shard, key, Op::Update { key, row })))
}

/// `/del` body `{"Stud_id": 2255}` → the key and its one-op part.
pub fn plan_delete(
    schema: &Schema,
    ranges: &Ranges,
    body: &Map<String, Value>,
) -> Result<(i64, Vec<Part>), RouterError> {
    let key = request_key(schema, body)?;
    let shard = shard_of(schema, ranges, key)?;
    Ok((key, Part::single(shard, key, Op::Delete { key })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shard_server::schema::{DType, Value as Cell};

    fn schema() -> Schema {
        Schema::new(
            vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
            vec![DType::Number, DType::String, DType::String],
            None,
        )
        .unwrap()
    }

    /// sh0 [0, 100), sh1 [100, 200), sh2 [300, 400).
    fn ranges() -> Ranges {
        Ranges::new(vec![(0, 100), (100, 200), (300, 400)])
    }

    fn row(id: i64) -> Value {
        json!({"Stud_id": id, "Stud_name": format!("n{id}"), "Stud_marks": 50})
    }

    fn bad(rows: Vec<Value>) -> String {
        match plan_inserts(&schema(), &ranges(), &rows, UnroutedKeys::Reject) {
            Err(RouterError::BadRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_batch_is_grouped_by_shard_in_key_order() {
        let rows = vec![row(150), row(5), row(301), row(7)];
        let plan = plan_inserts(&schema(), &ranges(), &rows, UnroutedKeys::Reject).unwrap();
        assert_eq!((plan.routed(), plan.skipped.len()), (4, 0));
        let parts = plan.parts;
        let summary: Vec<(usize, Vec<i64>)> = parts.iter().map(|p| (p.shard, p.keys.clone())).collect();
        assert_eq!(summary, [(0, vec![5, 7]), (1, vec![150]), (2, vec![301])]);
        // The String column took a number as its decimal text.
        assert_eq!(
            parts[1].ops,
            [Op::Insert { row: Row(vec![Cell::Int(150), Cell::Text("n150".into()), Cell::Text("50".into())]) }]
        );
    }

    #[test]
    fn batch_problems_name_the_row_key_and_fault() {
        assert_eq!(
            bad(vec![row(1), json!({"Stud_id": 2, "Stud_name": "x"})]),
            "data[1] (Stud_id 2): column Stud_marks is missing"
        );
        assert_eq!(
            bad(vec![json!({"Stud_id": "3", "Stud_name": "x", "Stud_marks": 1})]),
            "data[0]: column Stud_id must be a Number (64-bit integer)"
        );
        assert_eq!(
            bad(vec![row(1), row(2), json!({"Stud_id": 4, "Stud_name": "x", "Stud_marks": 1, "age": 9})]),
            "data[2] (Stud_id 4): column age is not in the schema"
        );
        assert_eq!(bad(vec![json!([4, "x", 1])]), "data[0]: row is not a JSON object");
        assert_eq!(bad(vec![row(1), row(2), row(1)]), "data[2]: Stud_id 1 appears twice in the batch (also data[0])");
        assert_eq!(bad(vec![row(1), row(250)]), "data[1]: Stud_id 250 is in no shard; nothing was written");
        assert_eq!(bad(vec![row(-1)]), "data[0]: Stud_id -1 is in no shard; nothing was written");
    }

    #[test]
    fn a_database_that_skips_unrouted_keys_writes_the_others_and_names_the_skipped() {
        let rows = vec![row(250), row(5), row(-1), row(301)];
        let plan = plan_inserts(&schema(), &ranges(), &rows, UnroutedKeys::Skip).unwrap();
        assert_eq!(plan.skipped, [250, -1]);
        assert_eq!(plan.parts.iter().map(|p| p.keys.clone()).collect::<Vec<_>>(), [vec![5], vec![301]]);
        assert_eq!(plan.routed(), 2);
        // Every row is still validated, skipped or not: a bad row refuses the whole batch.
        let e = plan_inserts(&schema(), &ranges(), &[row(5), json!({"Stud_id": 250})], UnroutedKeys::Skip);
        assert!(
            matches!(e, Err(RouterError::BadRequest(m)) if m == "data[1] (Stud_id 250): column Stud_name is missing")
        );
        let e = plan_inserts(&schema(), &ranges(), &[row(250), row(250)], UnroutedKeys::Skip);
        assert!(matches!(e, Err(RouterError::BadRequest(m)) if m.contains("appears twice")));
    }

    #[test]
    fn an_empty_batch_writes_nothing() {
        for policy in [UnroutedKeys::Reject, UnroutedKeys::Skip] {
            assert_eq!(plan_inserts(&schema(), &ranges(), &[], policy).unwrap(), InsertPlan::default());
        }
    }

    #[test]
    fn update_checks_key_row_and_shard() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let (key, parts) = plan_update(&schema(), &ranges(), &m(json!({"Stud_id": 150, "data": row(150)}))).unwrap();
        assert_eq!(key, 150);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].shard, 1);
        assert!(matches!(parts[0].ops[0], Op::Update { key: 150, .. }));
        let err = |v: Value| plan_update(&schema(), &ranges(), &m(v)).unwrap_err().to_string();
        assert_eq!(
            err(json!({"Stud_id": 150, "data": row(151)})),
            "data.Stud_id is 151 but Stud_id is 150: an update may not change the key"
        );
        assert_eq!(err(json!({"Stud_id": 250, "data": row(250)})), "Stud_id 250 is in no shard");
        assert_eq!(err(json!({"data": row(1)})), "missing field Stud_id (the key of the row)");
        assert_eq!(err(json!({"Stud_id": 1})), "missing field data (the full new row)");
        assert_eq!(err(json!({"Stud_id": 1.5, "data": row(1)})), "column Stud_id must be a Number (64-bit integer)");
        assert_eq!(err(json!({"Stud_id": 1, "data": {"Stud_id": 1}})), "data: column Stud_name is missing");
    }

    #[test]
    fn delete_checks_key_and_shard() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let (key, parts) = plan_delete(&schema(), &ranges(), &m(json!({"Stud_id": 399}))).unwrap();
        assert_eq!((key, parts[0].shard, parts[0].ops.clone()), (399, 2, vec![Op::Delete { key: 399 }]));
        let err = |v: Value| plan_delete(&schema(), &ranges(), &m(v)).unwrap_err().to_string();
        assert_eq!(err(json!({"Stud_id": 400})), "Stud_id 400 is in no shard");
        assert_eq!(err(json!({"id": 4})), "missing field Stud_id (the key of the row)");
    }
}
