//! Safety findings outlive a retry. Does I/O (a marker file in the temporary directory).
//!
//! nextest retries the fault-injection tests (`.config/nextest.toml`): they wait for heals,
//! failovers and progress within bounded limits on a shared machine, and a heal that outlasts its
//! limit while the machine is loaded says nothing about correctness. A retry must never turn a
//! safety finding (a lost or stale write, an invented value, copies that differ) into a pass,
//! though. So a failed safety check is recorded with [`violation`] in a marker named after the
//! nextest run and the test, and [`no_earlier_violation`] (called when a test starts a cluster)
//! makes every later attempt of that test in the same run fail at once with the first attempt's
//! finding. Outside nextest (`cargo test` never retries) nothing is recorded.

use anyhow::{Result, bail};
use std::path::PathBuf;

/// The marker of the running test in this nextest run, if this is a nextest run.
fn marker() -> Option<PathBuf> {
    let run = std::env::var("NEXTEST_RUN_ID").ok()?;
    let test = std::env::var("NEXTEST_TEST_NAME")
        .ok()
        .or_else(|| std::thread::current().name().map(str::to_owned))
        .unwrap_or_default();
    let binary = std::env::var("NEXTEST_BINARY_ID").unwrap_or_default();
    let name: String =
        format!("{binary}--{test}").chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    Some(std::env::temp_dir().join(format!("sharddb-safety-{run}")).join(name))
}

/// Records `error` as a safety finding of the running test, and returns it.
pub fn violation(error: anyhow::Error) -> anyhow::Error {
    if let Some(path) = marker() {
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, format!("{error:#}")));
        if let Err(e) = written {
            eprintln!("could not record the safety finding in {}: {e}", path.display());
        }
    }
    error
}

/// Fails if an earlier attempt of the running test in this nextest run recorded a safety finding.
pub fn no_earlier_violation() -> Result<()> {
    if let Some(finding) = marker().and_then(|path| std::fs::read_to_string(path).ok()) {
        bail!("an earlier attempt of this test found a safety violation; a retry cannot clear it:\n{finding}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_violation_fails_every_later_attempt_of_the_same_run() {
        if std::env::var_os("NEXTEST_RUN_ID").is_none() {
            // Outside nextest nothing is recorded, by design.
            violation(anyhow::anyhow!("x"));
            assert!(no_earlier_violation().is_ok());
            return;
        }
        assert!(no_earlier_violation().is_ok(), "nothing recorded yet");
        violation(anyhow::anyhow!("the copies of sh1 differ"));
        let later = no_earlier_violation().unwrap_err().to_string();
        assert!(later.contains("the copies of sh1 differ"), "{later}");
        std::fs::remove_file(marker().unwrap()).unwrap();
    }
}
