//! The declared configuration of local mode: what `/init`, `/add` and `/rm` changed (or the spec
//! file), kept in `DIR/declared.json` so that a restart resumes it. Reads and writes that file.

use super::spec::read_spec;
use super::{DECLARED_FILE, LocalError};
use crate::brain::placement::{Placement, place};
use crate::brain::validate::{SpecError, ValidatedDb, validate};
use crate::crd::ShardedDatabaseSpec;
use std::path::Path;

/// The declared configuration with what the brain derives from it.
#[derive(Clone, Debug)]
pub struct Declared {
    pub spec: ShardedDatabaseSpec,
    pub db: ValidatedDb,
    pub placement: Placement,
}

impl Declared {
    pub fn new(spec: ShardedDatabaseSpec) -> Result<Declared, SpecError> {
        let db = validate(&spec)?;
        let placement = place(&db);
        Ok(Declared { spec, db, placement })
    }
}

/// What to run at start: `DIR/declared.json` if a previous run left one (it holds the admin
/// changes made since), else the spec file (then saved as `declared.json`), else nothing.
pub(super) fn initial_declaration(dir: &Path, spec: Option<&Path>) -> Result<Option<Declared>, LocalError> {
    let path = dir.join(DECLARED_FILE);
    if path.is_file() {
        let bytes =
            std::fs::read(&path).map_err(|source| LocalError::Io { action: "read", path: path.clone(), source })?;
        let declared: ShardedDatabaseSpec =
            serde_json::from_slice(&bytes).map_err(|source| LocalError::BadDeclared { path: path.clone(), source })?;
        if spec.is_some() {
            tracing::info!(path = %path.display(), "resuming the declared configuration; the spec file is not read");
        }
        return Declared::new(declared).map(Some).map_err(|source| LocalError::InvalidDeclared { path, source });
    }
    let Some(spec) = spec else { return Ok(None) };
    let (resource, db) = read_spec(spec)?;
    tracing::info!(database = resource.metadata.name.as_deref().unwrap_or("sharddb"), "spec read");
    save_declared(dir, &resource.spec)?;
    let placement = place(&db);
    Ok(Some(Declared { spec: resource.spec, db, placement }))
}

/// Writes `declared.json` atomically (temporary file + rename).
pub(super) fn save_declared(dir: &Path, spec: &ShardedDatabaseSpec) -> Result<(), LocalError> {
    let path = dir.join(DECLARED_FILE);
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_string_pretty(spec).expect("a spec serialises");
    std::fs::write(&tmp, json + "\n").and_then(|()| std::fs::rename(&tmp, &path)).map_err(|source| LocalError::Io {
        action: "write",
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brain::declare;

    #[test]
    fn the_declared_configuration_wins_over_a_spec_file_given_again() {
        let dir = tempfile::tempdir().unwrap();
        assert!(initial_declaration(dir.path(), None).unwrap().is_none(), "no spec: wait for /init");
        let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/students.yaml");
        let first = initial_declaration(dir.path(), Some(&spec)).unwrap().unwrap();
        assert_eq!(first.placement.servers.len(), 6);
        assert!(dir.path().join(DECLARED_FILE).is_file(), "saved for the next start");

        let (changed, _) =
            declare::rm(Some(&first.spec), &shard_server::admin::RmRequest { n: 1, servers: vec!["Server2".into()] })
                .unwrap();
        save_declared(dir.path(), &changed).unwrap();
        let resumed = initial_declaration(dir.path(), Some(&spec)).unwrap().unwrap();
        assert_eq!(resumed.spec, changed);
        assert!(!resumed.placement.servers.contains(&"Server2".to_owned()));
        assert_eq!(initial_declaration(dir.path(), None).unwrap().unwrap().spec, changed);

        std::fs::write(dir.path().join(DECLARED_FILE), "{").unwrap();
        let e = initial_declaration(dir.path(), None).unwrap_err().to_string();
        assert!(e.ends_with("declared.json is not a valid declared configuration"), "{e}");
    }
}
