//! The previous release's binaries, for the upgrade test: built from the git history by
//! `scripts/build-previous-release.sh` (once; cached under the target directory), or taken from
//! `SHARDDB_PREVIOUS_BIN_DIR` when set (binaries built elsewhere). Does I/O (runs the script).

use anyhow::{Context, Result, bail, ensure};
use std::path::PathBuf;
use std::process::Command;

/// The commit of the previous release (`tests/previous-release`).
pub fn commit() -> &'static str {
    include_str!("../previous-release").trim()
}

/// The directory holding the previous release's `sharddb-operator`, `sharddb-router` and
/// `sharddb-shard-server`, built if need be.
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("SHARDDB_PREVIOUS_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => build()?,
    };
    for bin in ["sharddb-operator", "sharddb-router", "sharddb-shard-server"] {
        ensure!(dir.join(bin).is_file(), "{bin} of the previous release is missing from {}", dir.display());
    }
    Ok(dir)
}

/// Runs the build script with the target directory this test's own binaries are in, so the
/// previous release's build shares its dependencies and its cache with every run.
fn build() -> Result<PathBuf> {
    let script = crate::repo_root().join("scripts/build-previous-release.sh");
    let target = crate::bin_dir().parent().context("the binaries' directory has no parent")?.to_owned();
    let out = Command::new(&script)
        .env("CARGO_TARGET_DIR", &target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}); see its output above", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}
