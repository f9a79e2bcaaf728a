//! Reading a `ShardedDatabase` resource from a YAML file (what `kubectl apply` takes): parsing,
//! checking its kind and its fields, validating its spec. Reads one file.

use crate::brain::validate::{SpecError, ValidatedDb, validate};
use crate::crd::ShardedDatabase;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a ShardedDatabase resource", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{} holds a {kind} of {api_version}, not a ShardedDatabase of sharddb.io/v1alpha1", path.display())]
    WrongKind { path: PathBuf, api_version: String, kind: String },
    #[error("{}: unknown field {field}", path.display())]
    UnknownField { path: PathBuf, field: String },
    #[error("{}: invalid spec", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
}

/// Reads and validates a `ShardedDatabase` YAML file (the resource Kubernetes takes).
pub fn read_spec(path: &Path) -> Result<(ShardedDatabase, ValidatedDb), SpecFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecFileError::Read { path: path.to_owned(), source })?;
    let parse_error = |source| SpecFileError::Parse { path: path.to_owned(), source: Box::new(source) };
    // The derived type ignores apiVersion and kind; check them first so that another kind of
    // resource is named as such rather than reported as a ShardedDatabase with missing fields.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeHeader {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let header: TypeHeader = serde_saphyr::from_str(&text).map_err(parse_error)?;
    if header.api_version != "sharddb.io/v1alpha1" || header.kind != "ShardedDatabase" {
        return Err(SpecFileError::WrongKind {
            path: path.to_owned(),
            api_version: header.api_version,
            kind: header.kind,
        });
    }
    let resource: ShardedDatabase = serde_saphyr::from_str(&text).map_err(parse_error)?;
    // Kubernetes rejects unknown fields (kubectl's strict validation); serde would silently drop
    // them, so a misspelt `replica: 3` would fall back to a default without a word.
    let raw: serde_json::Value = serde_saphyr::from_str(&text).map_err(parse_error)?;
    let known = serde_json::to_value(&resource.spec).expect("spec serialises");
    if let Some(field) = unknown_field(&raw["spec"], &known, "spec") {
        return Err(SpecFileError::UnknownField { path: path.to_owned(), field });
    }
    let db = validate(&resource.spec).map_err(|source| SpecFileError::Invalid { path: path.to_owned(), source })?;
    Ok((resource, db))
}

/// The first field of `given` that did not survive a parse (`known` is the parsed value written
/// back), as a path like `spec.shards[1].sizee`. Explicit nulls count as absent.
fn unknown_field(given: &serde_json::Value, known: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => g.iter().find_map(|(name, v)| match k.get(name) {
            Some(kv) => unknown_field(v, kv, &format!("{at}.{name}")),
            None if v.is_null() => None,
            None => Some(format!("{at}.{name}")),
        }),
        (Value::Array(g), Value::Array(k)) => {
            g.iter().zip(k).enumerate().find_map(|(i, (gv, kv))| unknown_field(gv, kv, &format!("{at}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = "apiVersion: sharddb.io/v1alpha1
kind: ShardedDatabase
metadata:
  name: t
spec:
  schema:
    columns: [id, name]
    dtypes: [Number, String]
  shards:
    - { id: a, low: 0, size: 10 }
    - { id: b, low: 10, size: 10 }
  replicas: 2
  servers: 3
";

    #[test]
    fn reads_a_resource() {
        let dir = tempfile::tempdir().unwrap();
        let (res, db) = read_spec(&write(dir.path(), "ok.yaml", GOOD)).unwrap();
        assert_eq!(res.metadata.name.as_deref(), Some("t"));
        assert_eq!(db.server_count(), 3);
    }

    #[test]
    fn spec_errors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let err = |name: &str, text: &str| {
            let e = read_spec(&write(dir.path(), name, text)).unwrap_err();
            format!("{:#}", anyhow::Error::from(e))
        };
        let overlap = err("overlap.yaml", &GOOD.replace("low: 10,", "low: 5,"));
        assert!(overlap.ends_with("overlap.yaml: invalid spec: spec.shards[1] (b) overlaps a"), "{overlap}");
        let kind = err("kind.yaml", &GOOD.replace("kind: ShardedDatabase", "kind: Deployment"));
        assert!(kind.contains("holds a Deployment of sharddb.io/v1alpha1, not a ShardedDatabase"), "{kind}");
        let missing = err("missing.yaml", &GOOD.replace("  servers: 3\n", ""));
        assert!(missing.contains("is not a ShardedDatabase resource"), "{missing}");
        assert!(missing.contains("servers"), "{missing}");
        let typo = err("typo.yaml", &GOOD.replace("  replicas: 2", "  replica: 2"));
        assert!(typo.ends_with("typo.yaml: unknown field spec.replica"), "{typo}");
        let typo = err("typo2.yaml", &GOOD.replace("size: 10 }\n", "size: 10, sizee: 1 }\n"));
        assert!(typo.ends_with("typo2.yaml: unknown field spec.shards[0].sizee"), "{typo}");
        let nulls = GOOD.replace("  servers: 3", "  servers: 3\n  placement: null\n  router: {}");
        read_spec(&write(dir.path(), "nulls.yaml", &nulls)).unwrap();
        let absent = read_spec(&dir.path().join("absent.yaml")).unwrap_err().to_string();
        assert!(absent.starts_with("failed to read") && absent.ends_with("absent.yaml"), "{absent}");
    }
}
