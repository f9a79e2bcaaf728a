//! The admin contract between a router and its control plane: the seed's `/init`, `/add` and
//! `/rm`, already parsed and checked for shape by the router, as the control plane receives them.
//! Types only; pure.
//!
//! The router owns the seed's request shapes (field names, the `<key>_low` shard field, the
//! `n`-versus-list checks); the control plane owns everything that needs the declared
//! configuration (unknown servers and shards, generated names, the last replica of a shard). The
//! control plane answers with the final seed body (`{"message":..,"status":"success"}`, or an
//! `ErrorBody` with a 4xx), which the router relays unchanged.

use crate::limits::{MAX_SERVERS, MAX_SHARDS, bounded_vec, opt_placement, placement};
use crate::schema::SchemaSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One shard as `/init` and `/add` declare it: the half-open key range `[low, low + size)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDecl {
    pub id: String,
    pub low: i64,
    pub size: i64,
}

/// `POST /init`: the whole configuration of a database that has none yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// The number of servers.
    pub n: u32,
    pub schema: SchemaSpec,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub shards: Vec<ShardDecl>,
    /// Server name → the shards it holds; `None`: place copies automatically on `n` servers. A
    /// name like `Server[5]` asks for a generated name.
    #[serde(default, deserialize_with = "opt_placement")]
    pub servers: Option<BTreeMap<String, Vec<String>>>,
}

/// `POST /add`: new servers (each with the shards it holds), and possibly new shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub n: u32,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SHARDS>")]
    pub new_shards: Vec<ShardDecl>,
    /// New server name → the shards it holds. A name like `Server[5]` asks for a generated name.
    #[serde(deserialize_with = "placement")]
    pub servers: BTreeMap<String, Vec<String>>,
}

/// `DELETE /rm`: remove `n` servers, the named ones first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmRequest {
    pub n: u32,
    #[serde(deserialize_with = "bounded_vec::<_, _, MAX_SERVERS>")]
    pub servers: Vec<String>,
}

/// Whether `name` asks for a generated name (`Server[5]`): the part before `[` is the stem.
pub fn generated_stem(name: &str) -> Option<&str> {
    let (stem, rest) = name.split_once('[')?;
    rest.ends_with(']').then_some(stem)
}

/// How the seed's messages write a server name: `Server4` as `Server:4`; other names as they are.
pub fn seed_display(name: &str) -> String {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.is_empty() || stem.len() == name.len() {
        name.to_owned()
    } else {
        format!("{stem}:{}", &name[stem.len()..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_and_seed_display() {
        assert_eq!(generated_stem("Server[5]"), Some("Server"));
        assert_eq!(generated_stem("Server5"), None);
        assert_eq!(generated_stem("Server[5"), None);
        assert_eq!(seed_display("Server4"), "Server:4");
        assert_eq!(seed_display("Server58127"), "Server:58127");
        assert_eq!(seed_display("alpha"), "alpha");
        assert_eq!(seed_display("42"), "42");
    }
}
