//! The cluster shapes the benchmark runs on (the seed's layouts and variants with
//! larger shards), rendered as `ShardedDatabase` YAML for the local mode. Pure.

use std::fmt::Write as _;

/// Shards × replicas on servers, with every shard the same size and the shards laid end to end
/// from key 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Short name used in reports (`A-1`).
    pub name: String,
    pub shards: usize,
    pub replicas: usize,
    pub servers: usize,
    pub shard_size: i64,
}

/// The seed's shard size.
pub const SEED_SHARD_SIZE: i64 = 4096;

impl Shape {
    fn new(name: &str, shards: usize, replicas: usize, servers: usize) -> Shape {
        Shape { name: name.into(), shards, replicas, servers, shard_size: SEED_SHARD_SIZE }
    }

    /// The seed's benchmark layout: 4 shards × 3 replicas on 6 servers.
    pub fn a1() -> Shape {
        Shape::new("A-1", 4, 3, 6)
    }

    /// 4 shards × 7 replicas on 7 servers.
    pub fn a2() -> Shape {
        Shape::new("A-2", 4, 7, 7)
    }

    /// 6 shards × 8 replicas on 10 servers.
    pub fn a3() -> Shape {
        Shape::new("A-3", 6, 8, 10)
    }

    /// One large shard with 2 replicas on 2 servers, for the snapshot stream.
    pub fn copy(rows: usize) -> Shape {
        Shape::new("copy", 1, 2, 2).with_capacity(rows)
    }

    /// One shard with 2 replicas on 2 servers, one of which is wiped and healed.
    pub fn heal(rows: usize) -> Shape {
        Shape::new("heal", 1, 2, 2).with_capacity(rows)
    }

    /// Grows the shard size (never below the seed's) so that the shards hold `keys` keys.
    pub fn with_capacity(mut self, keys: usize) -> Shape {
        let per_shard = keys.div_ceil(self.shards.max(1)) as i64;
        self.shard_size = self.shard_size.max(per_shard);
        self
    }

    /// Sets the shard size to at least `size`.
    pub fn with_min_shard_size(mut self, size: i64) -> Shape {
        self.shard_size = self.shard_size.max(size);
        self
    }

    pub fn key_space(&self) -> i64 {
        self.shards as i64 * self.shard_size
    }

    /// `A-1: 4 shards × 3 replicas on 6 servers, shard size 4096`.
    pub fn describe(&self) -> String {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        format!(
            "{}: {} shard{} × {} replica{} on {} server{}, shard size {}",
            self.name,
            self.shards,
            s(self.shards),
            self.replicas,
            s(self.replicas),
            self.servers,
            s(self.servers),
            self.shard_size
        )
    }

    /// The `ShardedDatabase` resource for this shape, with the seed's student table.
    pub fn yaml(&self) -> String {
        let name: String =
            self.name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let mut y = String::new();
        let _ = writeln!(y, "apiVersion: sharddb.io/v1alpha1");
        let _ = writeln!(y, "kind: ShardedDatabase");
        let _ = writeln!(y, "metadata:\n  name: bench-{name}");
        let _ = writeln!(y, "spec:");
        let _ = writeln!(
            y,
            "  schema:\n    columns: [Stud_id, Stud_name, Stud_marks]\n    dtypes: [Number, String, Number]"
        );
        let _ = writeln!(y, "  shards:");
        for i in 0..self.shards {
            let _ = writeln!(
                y,
                "    - {{ id: sh{}, low: {}, size: {} }}",
                i + 1,
                i as i64 * self.shard_size,
                self.shard_size
            );
        }
        let _ = writeln!(y, "  replicas: {}", self.replicas);
        let _ = writeln!(y, "  servers: {}", self.servers);
        y
    }
}

impl Shape {
    /// The seed's `/init` body for this shape, as its client sent it: the student table with
    /// `Stud_marks` declared `String` (the client sends numbers for it), shards laid end to end
    /// from key 0, and an explicit placement (copy `j` of shard `i` on server `(i × replicas + j)
    /// mod servers`, so each shard's copies are on distinct servers and the load is spread).
    pub fn init_body(&self) -> serde_json::Value {
        let shards: Vec<serde_json::Value> = (0..self.shards)
            .map(|i| {
                serde_json::json!({"Stud_id_low": i as i64 * self.shard_size, "Shard_id": format!("sh{}", i + 1),
                                   "Shard_size": self.shard_size})
            })
            .collect();
        let mut servers: std::collections::BTreeMap<String, Vec<String>> =
            (0..self.servers).map(|s| (format!("Server{s}"), Vec::new())).collect();
        for i in 0..self.shards {
            for j in 0..self.replicas {
                let server = (i * self.replicas + j) % self.servers;
                servers.get_mut(&format!("Server{server}")).expect("listed").push(format!("sh{}", i + 1));
            }
        }
        serde_json::json!({
            "N": self.servers,
            "schema": {"columns": ["Stud_id", "Stud_name", "Stud_marks"], "dtypes": ["Number", "String", "String"]},
            "shards": shards,
            "servers": servers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1_is_the_seed_layout() {
        let y = Shape::a1().yaml();
        assert!(y.contains("kind: ShardedDatabase"));
        assert!(y.contains("- { id: sh1, low: 0, size: 4096 }"));
        assert!(y.contains("- { id: sh4, low: 12288, size: 4096 }"));
        assert!(y.contains("replicas: 3\n  servers: 6\n"));
        assert_eq!(Shape::a1().key_space(), 16384);
        assert_eq!(Shape::a1().describe(), "A-1: 4 shards × 3 replicas on 6 servers, shard size 4096");
        assert_eq!(Shape::copy(10).describe(), "copy: 1 shard × 2 replicas on 2 servers, shard size 4096");
    }

    #[test]
    fn init_bodies_place_every_copy_on_a_distinct_server() {
        for shape in [Shape::a1(), Shape::a2(), Shape::a3()] {
            let body = shape.init_body();
            assert_eq!(body["N"], shape.servers);
            assert_eq!(body["shards"].as_array().unwrap().len(), shape.shards);
            let servers = body["servers"].as_object().unwrap();
            assert_eq!(servers.len(), shape.servers);
            for i in 1..=shape.shards {
                let id = format!("sh{i}");
                let holders = servers.values().filter(|h| h.as_array().unwrap().iter().any(|s| *s == id.as_str()));
                assert_eq!(holders.count(), shape.replicas, "{} {id}", shape.name);
            }
        }
        let a1 = Shape::a1().init_body();
        assert_eq!(a1["shards"][3], serde_json::json!({"Stud_id_low": 12288, "Shard_id": "sh4", "Shard_size": 4096}));
    }

    #[test]
    fn capacity_grows_shards_but_never_shrinks_them() {
        assert_eq!(Shape::a1().with_capacity(10_000).shard_size, 4096);
        assert_eq!(Shape::a1().with_capacity(40_000).shard_size, 10_000);
        assert_eq!(Shape::a3().with_capacity(40_001).shard_size, 6_667);
        assert_eq!(Shape::copy(200_000).shard_size, 200_000);
    }
}
