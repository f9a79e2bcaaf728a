//! The Postgres settings a `ShardedDatabase` may set (`spec.postgres.parameters`, passed to
//! Postgres as `-c name=value`), and the check of each. Pure.
//!
//! Only [`ALLOWED`] may be set, each value checked against its kind, because the shard server
//! depends on how its Postgres behaves: a setting that loses acknowledged writes, moves Postgres
//! away from where the shard server reaches it, cancels its statements or keeps Postgres from
//! starting would turn a typo into data loss or a crash loop. [`REFUSED`] names the settings
//! people reach for that are refused, with the reason; any other name is refused as not
//! allow-listed. Values are plain words (no quotes, spaces or separators), so they pass through
//! a command line as they are.

use super::tuning::TuningError;

/// What a Postgres setting's value must look like.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// `128MB`, `4GB`, `512kB` or a number of the setting's own unit.
    Memory,
    /// `30s`, `5min`, `250ms` or a number of the setting's own unit; `-1` where it disables.
    Time,
    /// A whole number in a range.
    Integer { min: i64, max: i64 },
    /// A decimal number in a range.
    Real { min: f64, max: f64 },
    /// `on` or `off` (or `true`/`false`).
    Bool,
    /// One of the listed words.
    Word(&'static [&'static str]),
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Memory => "a size like 64MB (units kB, MB, GB, TB)",
            Kind::Time => "a duration like 30s or 5min (units us, ms, s, min, h, d), or -1",
            Kind::Integer { .. } => "a whole number in the setting's range",
            Kind::Real { .. } => "a decimal number in the setting's range",
            Kind::Bool => "on or off",
            Kind::Word(_) => "one of the setting's words",
        }
    }

    fn accepts(self, value: &str) -> bool {
        let number_then = |units: &[&str]| {
            let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
            digits > 0 && digits <= 12 && units.contains(&&value[digits..])
        };
        match self {
            Kind::Memory => number_then(&["", "kB", "MB", "GB", "TB"]),
            Kind::Time => value == "-1" || number_then(&["", "us", "ms", "s", "min", "h", "d"]),
            Kind::Integer { min, max } => value.parse::<i64>().is_ok_and(|v| (min..=max).contains(&v)),
            Kind::Real { min, max } => {
                value.len() <= 16
                    && value.chars().all(|c| c.is_ascii_digit() || c == '.')
                    && value.parse::<f64>().is_ok_and(|v| (min..=max).contains(&v))
            }
            Kind::Bool => ["on", "off", "true", "false"].contains(&value),
            Kind::Word(words) => words.contains(&value),
        }
    }
}

/// The settings that may be set, with the kind of their value.
pub const ALLOWED: &[(&str, Kind)] = &[
    // Memory.
    ("shared_buffers", Kind::Memory),
    ("effective_cache_size", Kind::Memory),
    ("work_mem", Kind::Memory),
    ("maintenance_work_mem", Kind::Memory),
    ("temp_buffers", Kind::Memory),
    ("wal_buffers", Kind::Memory),
    // Checkpoints and WAL volume.
    ("max_wal_size", Kind::Memory),
    ("min_wal_size", Kind::Memory),
    ("checkpoint_timeout", Kind::Time),
    ("checkpoint_completion_target", Kind::Real { min: 0.0, max: 1.0 }),
    ("wal_compression", Kind::Word(&["on", "off", "pglz", "lz4", "zstd"])),
    // Planner.
    ("random_page_cost", Kind::Real { min: 0.0, max: 1000.0 }),
    ("seq_page_cost", Kind::Real { min: 0.0, max: 1000.0 }),
    ("effective_io_concurrency", Kind::Integer { min: 0, max: 1000 }),
    ("max_parallel_workers_per_gather", Kind::Integer { min: 0, max: 1024 }),
    ("jit", Kind::Bool),
    // Autovacuum.
    ("autovacuum_naptime", Kind::Time),
    ("autovacuum_vacuum_scale_factor", Kind::Real { min: 0.0, max: 100.0 }),
    ("autovacuum_analyze_scale_factor", Kind::Real { min: 0.0, max: 100.0 }),
    ("autovacuum_vacuum_cost_limit", Kind::Integer { min: -1, max: 10000 }),
    ("autovacuum_max_workers", Kind::Integer { min: 1, max: 64 }),
    // Logging.
    ("log_min_duration_statement", Kind::Time),
    ("log_autovacuum_min_duration", Kind::Time),
    ("log_checkpoints", Kind::Bool),
    ("log_lock_waits", Kind::Bool),
];

/// Settings people reach for that are refused, and why.
pub const REFUSED: &[(&str, &str)] = &[
    ("fsync", DURABILITY),
    ("synchronous_commit", DURABILITY),
    ("full_page_writes", DURABILITY),
    ("wal_sync_method", DURABILITY),
    ("listen_addresses", LOCATION),
    ("port", LOCATION),
    ("unix_socket_directories", LOCATION),
    ("data_directory", LAYOUT),
    ("config_file", LAYOUT),
    ("hba_file", LAYOUT),
    ("ident_file", LAYOUT),
    ("max_connections", CONNECTIONS),
    ("statement_timeout", STATEMENTS),
    ("lock_timeout", STATEMENTS),
    ("idle_in_transaction_session_timeout", STATEMENTS),
    ("transaction_timeout", STATEMENTS),
    ("default_transaction_isolation", STATEMENTS),
    ("default_transaction_read_only", STATEMENTS),
    ("shared_preload_libraries", LIBRARIES),
    ("session_preload_libraries", LIBRARIES),
    ("local_preload_libraries", LIBRARIES),
    ("ssl", TLS),
    ("wal_level", PHYSICAL),
    ("archive_mode", PHYSICAL),
    ("archive_command", PHYSICAL),
    ("max_wal_senders", PHYSICAL),
    ("hot_standby", PHYSICAL),
    ("primary_conninfo", PHYSICAL),
    ("restore_command", PHYSICAL),
];

const DURABILITY: &str =
    "an acknowledged write must survive a crash of its pod, and turning this off can lose or corrupt committed data";
const LOCATION: &str =
    "the shard server reaches its Postgres on the pod's loopback at port 5432, which the operator sets";
const LAYOUT: &str = "the data directory and configuration files are laid out by the image and the operator";
const CONNECTIONS: &str = "the shard server keeps a fixed pool of 16 connections, which Postgres' default of 100 serves; a lower value fails the server at start";
const STATEMENTS: &str = "the shard server relies on its statements running to the end in its own transactions (a snapshot of a large shard runs for minutes)";
const LIBRARIES: &str = "a library the image lacks keeps Postgres from starting, a crash loop";
const TLS: &str =
    "Postgres is reached only on the pod's loopback; TLS between components is the operator's to configure";
const PHYSICAL: &str = "sharddb replicates shards itself; Postgres' own replication and archiving are not used";

pub fn check_parameter(name: &str, value: &str) -> Result<(), TuningError> {
    if let Some((_, kind)) = ALLOWED.iter().find(|(n, _)| *n == name) {
        if kind.accepts(value) {
            return Ok(());
        }
        return Err(TuningError::ParameterValue { name: name.into(), value: value.into(), kind: kind.describe() });
    }
    let refused = REFUSED.iter().find(|(n, _)| *n == name).map(|(_, why)| *why);
    let refused = refused.or_else(|| name.starts_with("ssl_").then_some(TLS));
    match refused {
        Some(why) => Err(TuningError::RefusedParameter { name: name.into(), why }),
        None => Err(TuningError::UnknownParameter {
            name: name.into(),
            allowed: ALLOWED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_setting_takes_a_value_of_its_kind() {
        for (name, kind) in ALLOWED {
            let good = match kind {
                Kind::Memory => "64MB",
                Kind::Time => "30s",
                Kind::Integer { min, .. } => &min.to_string(),
                Kind::Real { max, .. } => &max.to_string(),
                Kind::Bool => "off",
                Kind::Word(words) => words[0],
            };
            assert_eq!(check_parameter(name, good), Ok(()), "{name} = {good}");
            let err = check_parameter(name, "1; DROP").unwrap_err().to_string();
            assert!(err.starts_with(&format!("spec.postgres.parameters.{name}: \"1; DROP\" is not")), "{err}");
        }
        assert!(REFUSED.iter().all(|(n, _)| !ALLOWED.iter().any(|(a, _)| a == n)), "no setting is both");
    }

    #[test]
    fn refused_and_unknown_settings_say_why() {
        let e = |n: &str, v: &str| check_parameter(n, v).unwrap_err().to_string();
        assert!(e("fsync", "off").starts_with("spec.postgres.parameters.fsync: not settable: an acknowledged write"));
        assert!(e("port", "5433").contains("loopback at port 5432"));
        assert!(e("statement_timeout", "1s").contains("statements running to the end"));
        assert!(e("shared_preload_libraries", "pg_stat_statements").contains("crash loop"));
        assert!(e("ssl_cert_file", "x").contains("TLS"));
        let unknown = e("enable_seqscan", "off");
        assert!(unknown.starts_with("spec.postgres.parameters.enable_seqscan: not a setting sharddb lets you change"));
        assert!(unknown.contains("shared_buffers, effective_cache_size"), "{unknown}");
    }

    #[test]
    fn values_of_each_kind() {
        for ok in ["1", "128MB", "4GB", "512kB"] {
            assert!(Kind::Memory.accepts(ok), "{ok}");
        }
        for bad in ["", "MB", "128 MB", "128mb", "1.5GB", "-1", "128MB;", "9999999999999MB"] {
            assert!(!Kind::Memory.accepts(bad), "{bad:?}");
        }
        for ok in ["-1", "0", "250ms", "30s", "5min", "1h"] {
            assert!(Kind::Time.accepts(ok), "{ok}");
        }
        assert!(!Kind::Time.accepts("5m"), "m is not a Postgres time unit");
        let real = Kind::Real { min: 0.0, max: 1.0 };
        assert!(real.accepts("0.9") && real.accepts("1") && !real.accepts("1.5") && !real.accepts("1e-3"));
        assert!(Kind::Integer { min: -1, max: 10 }.accepts("-1") && !Kind::Integer { min: 0, max: 10 }.accepts("11"));
    }
}
