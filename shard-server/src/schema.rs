//! The table schema (columns, dtypes, shard key) and typed rows: parsing seed-format JSON rows,
//! validating identifiers. Pure; no I/O.

use crate::limits::{MAX_COLUMNS, bounded_vec};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest identifier we accept; Postgres truncates at 63 bytes and tables get a `shard_` prefix.
const MAX_IDENT: usize = 48;

/// A column type of the seed API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    /// A 64-bit signed integer.
    Number,
    /// UTF-8 text. Also accepts a JSON number, stored as its decimal text (the seed's own client
    /// declares `Stud_marks` as `String` and sends numbers).
    String,
}

impl DType {
    pub fn sql_type(self) -> &'static str {
        match self {
            DType::Number => "BIGINT",
            DType::String => "TEXT",
        }
    }
}

/// The schema as it travels on the wire (seed format plus an optional `key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSpec {
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_COLUMNS>")]
    pub columns: Vec<String>,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_COLUMNS>")]
    pub dtypes: Vec<DType>,
    /// The shard key column; the first column when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A validated schema: unique, well-formed column names, one dtype each, a `Number` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    columns: Vec<String>,
    dtypes: Vec<DType>,
    key: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("schema has no columns")]
    NoColumns,
    #[error("schema has {0} columns; at most {MAX_COLUMNS} are allowed")]
    TooManyColumns(usize),
    #[error("schema has {columns} columns but {dtypes} dtypes")]
    LengthMismatch { columns: usize, dtypes: usize },
    #[error("{0}")]
    BadIdentifier(#[from] IdentError),
    #[error("column {0} appears twice")]
    DuplicateColumn(String),
    #[error("key column {0} is not in the schema")]
    UnknownKey(String),
    #[error("key column {0} must have dtype Number")]
    KeyNotNumber(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{what} {name:?} is not a valid identifier (letters, digits, _ and -, starting with a letter or _, at most {MAX_IDENT} characters)"
)]
pub struct IdentError {
    pub what: &'static str,
    pub name: String,
}

/// Checks an identifier (column, shard id, server name) against the strict pattern
/// `[A-Za-z_][A-Za-z0-9_-]{0,47}`. Everything spliced into SQL passes here first, and is quoted too.
pub fn check_ident(what: &'static str, name: &str) -> Result<(), IdentError> {
    let mut chars = name.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            name.len() <= MAX_IDENT && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(IdentError { what, name: name.to_owned() }) }
}

/// Quotes an identifier that already passed [`check_ident`] (so it holds no `"`).
pub fn quote(ident: &str) -> String {
    debug_assert!(!ident.contains('"'));
    format!("\"{ident}\"")
}

impl TryFrom<SchemaSpec> for Schema {
    type Error = SchemaError;
    fn try_from(spec: SchemaSpec) -> Result<Self, SchemaError> {
        Schema::new(spec.columns, spec.dtypes, spec.key.as_deref())
    }
}

impl Schema {
    pub fn new(columns: Vec<String>, dtypes: Vec<DType>, key: Option<&str>) -> Result<Self, SchemaError> {
        if columns.is_empty() {
            return Err(SchemaError::NoColumns);
        }
        if columns.len() > MAX_COLUMNS {
            return Err(SchemaError::TooManyColumns(columns.len()));
        }
        if columns.len() != dtypes.len() {
            return Err(SchemaError::LengthMismatch { columns: columns.len(), dtypes: dtypes.len() });
        }
        for (i, c) in columns.iter().enumerate() {
            check_ident("column", c)?;
            if columns[..i].iter().any(|o| o.eq_ignore_ascii_case(c)) {
                return Err(SchemaError::DuplicateColumn(c.clone()));
            }
        }
        let key = match key {
            None => 0,
            Some(k) => columns.iter().position(|c| c == k).ok_or_else(|| SchemaError::UnknownKey(k.to_owned()))?,
        };
        if dtypes[key] != DType::Number {
            return Err(SchemaError::KeyNotNumber(columns[key].clone()));
        }
        Ok(Schema { columns, dtypes, key })
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }
    pub fn dtypes(&self) -> &[DType] {
        &self.dtypes
    }
    /// Index of the key column.
    pub fn key_index(&self) -> usize {
        self.key
    }
    pub fn key_name(&self) -> &str {
        &self.columns[self.key]
    }

    pub fn to_spec(&self) -> SchemaSpec {
        SchemaSpec {
            columns: self.columns.clone(),
            dtypes: self.dtypes.clone(),
            key: (self.key != 0).then(|| self.columns[self.key].clone()),
        }
    }

    /// Parses a seed-format row (`{"Stud_id":1,"Stud_name":"A","Stud_marks":2}`) into a typed row.
    /// Every column must be present exactly once with a value of its dtype.
    pub fn parse_row(&self, value: &serde_json::Value) -> Result<Row, RowError> {
        let obj = value.as_object().ok_or(RowError::NotAnObject)?;
        for name in obj.keys() {
            if !self.columns.iter().any(|c| c == name) {
                return Err(RowError::UnknownColumn(name.clone()));
            }
        }
        let mut values = Vec::with_capacity(self.columns.len());
        for (col, dtype) in self.columns.iter().zip(&self.dtypes) {
            let v = obj.get(col).ok_or_else(|| RowError::MissingColumn(col.clone()))?;
            values.push(parse_value(col, *dtype, v)?);
        }
        Ok(Row(values))
    }

    /// Parses a key given in a request (`"Stud_id": 2255`).
    pub fn parse_key(&self, value: Option<&serde_json::Value>) -> Result<i64, RowError> {
        let name = self.key_name();
        match value {
            None => Err(RowError::MissingColumn(name.to_owned())),
            Some(v) => match parse_value(name, DType::Number, v)? {
                Value::Int(k) => Ok(k),
                Value::Text(_) => unreachable!("Number parses to Int"),
            },
        }
    }

    /// The seed-format JSON object of a typed row.
    pub fn row_to_json(&self, row: &Row) -> serde_json::Value {
        let map = self
            .columns
            .iter()
            .zip(&row.0)
            .map(|(c, v)| {
                let j = match v {
                    Value::Int(i) => serde_json::Value::from(*i),
                    Value::Text(s) => serde_json::Value::from(s.clone()),
                };
                (c.clone(), j)
            })
            .collect();
        serde_json::Value::Object(map)
    }

    /// Checks that a positional row (from replication or a snapshot) has this schema's shape.
    pub fn check_positional(&self, row: &Row) -> Result<(), RowError> {
        if row.0.len() != self.columns.len() {
            return Err(RowError::Arity { expected: self.columns.len(), got: row.0.len() });
        }
        for ((col, dtype), v) in self.columns.iter().zip(&self.dtypes).zip(&row.0) {
            let ok = matches!((dtype, v), (DType::Number, Value::Int(_)) | (DType::String, Value::Text(_)));
            if !ok {
                return Err(RowError::WrongType { column: col.clone(), expected: *dtype });
            }
            if matches!(v, Value::Text(t) if t.contains('\0')) {
                return Err(RowError::Nul(col.clone()));
            }
        }
        Ok(())
    }
}

fn parse_value(col: &str, dtype: DType, v: &serde_json::Value) -> Result<Value, RowError> {
    let wrong = || RowError::WrongType { column: col.to_owned(), expected: dtype };
    match dtype {
        DType::Number => v.as_i64().map(Value::Int).ok_or_else(wrong),
        DType::String => match v {
            serde_json::Value::String(s) if s.contains('\0') => Err(RowError::Nul(col.to_owned())),
            serde_json::Value::String(s) => Ok(Value::Text(s.clone())),
            serde_json::Value::Number(n) => Ok(Value::Text(n.to_string())),
            _ => Err(wrong()),
        },
    }
}

/// A cell value. On the wire a JSON number or string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Text(String),
}

/// By hand rather than `#[serde(untagged)]`, which buffers each value and, for every string,
/// builds (and formats) a failed attempt at a number first: every replicated row is decoded this
/// way on each copy.
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
                i64::try_from(v)
                    .map(Value::Int)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::Text(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// A typed row: values in schema column order. Positional on the internal wire (compact).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// The key value, given the schema's key index.
    pub fn key(&self, schema: &Schema) -> i64 {
        match &self.0[schema.key_index()] {
            Value::Int(k) => *k,
            Value::Text(_) => unreachable!("validated rows have a Number key"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("row is not a JSON object")]
    NotAnObject,
    #[error("column {0} is missing")]
    MissingColumn(String),
    #[error("column {0} is not in the schema")]
    UnknownColumn(String),
    #[error("column {column} must be a {}", expected_text(*.expected))]
    WrongType { column: String, expected: DType },
    #[error("row has {got} values, expected {expected}")]
    Arity { expected: usize, got: usize },
    /// Postgres stores no NUL character in text, so such a row could never be written.
    #[error("column {0} contains a NUL character (\\u0000), which the database cannot store")]
    Nul(String),
}

fn expected_text(d: DType) -> &'static str {
    match d {
        DType::Number => "Number (64-bit integer)",
        DType::String => "String (or a number)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn students() -> Schema {
        Schema::new(
            vec!["Stud_id".into(), "Stud_name".into(), "Stud_marks".into()],
            vec![DType::Number, DType::String, DType::Number],
            None,
        )
        .unwrap()
    }

    #[test]
    fn values_decode_from_json_numbers_and_strings_only() {
        let row: Row = serde_json::from_str(r#"[7, "Ann \"A\"", -3, "12", 9223372036854775807]"#).unwrap();
        assert_eq!(
            row.0,
            vec![
                Value::Int(7),
                Value::Text("Ann \"A\"".into()),
                Value::Int(-3),
                Value::Text("12".into()),
                Value::Int(i64::MAX)
            ]
        );
        assert_eq!(serde_json::from_str::<Row>(&serde_json::to_string(&row).unwrap()).unwrap(), row);
        for bad in ["9223372036854775808", "1.5", "null", "true", "[1]", "{}"] {
            let e = serde_json::from_str::<Value>(bad).unwrap_err().to_string();
            assert!(e.contains("an integer or a string"), "{bad}: {e}");
        }
    }

    #[test]
    fn identifiers_follow_the_strict_pattern() {
        for ok in ["Stud_id", "sh1", "_x", "Server-0", "a"] {
            assert!(check_ident("column", ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(49);
        for bad in ["", "1abc", "a b", "a\"b", "a;drop", "ä", "-x", long.as_str()] {
            assert!(check_ident("column", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn schema_validation_names_the_problem() {
        let s =
            |c: &[&str], d: Vec<DType>, k: Option<&str>| Schema::new(c.iter().map(|s| s.to_string()).collect(), d, k);
        assert_eq!(s(&[], vec![], None), Err(SchemaError::NoColumns));
        assert_eq!(
            s(&["a", "b"], vec![DType::Number], None),
            Err(SchemaError::LengthMismatch { columns: 2, dtypes: 1 })
        );
        assert_eq!(
            s(&["a", "A"], vec![DType::Number, DType::Number], None),
            Err(SchemaError::DuplicateColumn("A".into()))
        );
        assert_eq!(s(&["a"], vec![DType::String], None), Err(SchemaError::KeyNotNumber("a".into())));
        assert_eq!(s(&["a"], vec![DType::Number], Some("b")), Err(SchemaError::UnknownKey("b".into())));
        let keyed = s(&["name", "id"], vec![DType::String, DType::Number], Some("id")).unwrap();
        assert_eq!(keyed.key_name(), "id");
        assert!(matches!(s(&["x y"], vec![DType::Number], None), Err(SchemaError::BadIdentifier(_))));
    }

    #[test]
    fn rows_parse_with_seed_leniency_and_strict_types() {
        let s = students();
        let row = s.parse_row(&json!({"Stud_id": 5, "Stud_name": "A", "Stud_marks": 7})).unwrap();
        assert_eq!(row, Row(vec![Value::Int(5), Value::Text("A".into()), Value::Int(7)]));
        assert_eq!(row.key(&s), 5);
        // A String column accepts a number, stored as its decimal text.
        let row = s.parse_row(&json!({"Stud_id": 5, "Stud_name": 12, "Stud_marks": 7})).unwrap();
        assert_eq!(row.0[1], Value::Text("12".into()));
        let err = |v| s.parse_row(&v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"Stud_id": "5", "Stud_name": "A", "Stud_marks": 7})),
            "column Stud_id must be a Number (64-bit integer)"
        );
        assert_eq!(
            err(json!({"Stud_id": 5.5, "Stud_name": "A", "Stud_marks": 7})),
            "column Stud_id must be a Number (64-bit integer)"
        );
        assert_eq!(
            err(json!({"Stud_id": 5, "Stud_name": {}, "Stud_marks": 7})),
            "column Stud_name must be a String (or a number)"
        );
        assert_eq!(err(json!({"Stud_id": 5, "Stud_marks": 7})), "column Stud_name is missing");
        assert_eq!(
            err(json!({"Stud_id": 5, "Stud_name": "A", "Stud_marks": 7, "x": 1})),
            "column x is not in the schema"
        );
        assert_eq!(err(json!([1, 2])), "row is not a JSON object");
    }

    #[test]
    fn what_postgres_cannot_store_is_refused_naming_the_column() {
        let s = students();
        let e = s.parse_row(&json!({"Stud_id": 5, "Stud_name": "a\u{0}b", "Stud_marks": 7})).unwrap_err();
        assert_eq!(e, RowError::Nul("Stud_name".into()));
        assert_eq!(
            e.to_string(),
            "column Stud_name contains a NUL character (\\u0000), which the database cannot store"
        );
        // The positional rows of our own endpoints and of replication are checked the same way.
        let row = Row(vec![Value::Int(5), Value::Text("\0".into()), Value::Int(7)]);
        assert_eq!(s.check_positional(&row), Err(RowError::Nul("Stud_name".into())));
        // Beyond 64 bits a key is refused as not a Number (BIGINT), never wrapped.
        let e = s.parse_row(&json!({"Stud_id": 9223372036854775808u64, "Stud_name": "a", "Stud_marks": 7}));
        assert_eq!(e, Err(RowError::WrongType { column: "Stud_id".into(), expected: DType::Number }));
        let many: Vec<String> = (0..=MAX_COLUMNS).map(|i| format!("c{i}")).collect();
        let dtypes = vec![DType::Number; many.len()];
        assert_eq!(Schema::new(many, dtypes, None), Err(SchemaError::TooManyColumns(MAX_COLUMNS + 1)));
    }

    #[test]
    fn rows_round_trip_to_seed_json_and_positional_wire() {
        let s = students();
        let j = json!({"Stud_id": 5, "Stud_name": "A", "Stud_marks": 7});
        let row = s.parse_row(&j).unwrap();
        assert_eq!(s.row_to_json(&row), j);
        let wire = serde_json::to_string(&row).unwrap();
        assert_eq!(wire, r#"[5,"A",7]"#);
        let back: Row = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, row);
        s.check_positional(&back).unwrap();
        let bad: Row = serde_json::from_str(r#"["5","A",7]"#).unwrap();
        assert!(s.check_positional(&bad).is_err());
    }
}
