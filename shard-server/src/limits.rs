//! The limits on every count that sizes an allocation, in one place for every component (router,
//! shard server, operator), and the serde helpers that enforce them while a body is parsed. Pure.
//!
//! A request beyond a limit is refused at once with a 400 naming it: a list is cut off at its
//! `limit + 1`-th element while it is being parsed, so a huge count costs no more than the bytes
//! the body limit already admitted. The limits are far above any configuration or request these
//! components were built for; they exist so that one careless or hostile request cannot make a
//! process allocate without bound. They are documented in the README ("Limits").

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// Servers in one database (`spec.servers`, the seed's `N`, `/add`'s `n`, a placement's entries).
pub const MAX_SERVERS: usize = 256;
/// Shards in one database (`spec.shards`, the seed's `shards` and `new_shards`), and shard ids in
/// one request that lists them (`/config`, `/copy`, a lease request).
pub const MAX_SHARDS: usize = 1024;
/// Columns of a table.
pub const MAX_COLUMNS: usize = 64;
/// Rows (or operations) in one write request: the seed's `/write` on the router or a shard
/// server, one batch of `/v1/shards/{shard}/write`, or all the batches of one `write_batches`.
pub const MAX_ROWS: usize = 100_000;
/// Client batches in one `write_batches` request.
pub const MAX_BATCHES: usize = 4096;
/// Key ranges in one `read_ranges` request.
pub const MAX_READ_RANGES: usize = 4096;
/// Longest primary lease the operator may grant at once (`/v1/primary_lease`'s `lease_ms`).
pub const MAX_PRIMARY_LEASE_MS: u64 = 60_000;

/// A `Vec<T>` of at most `MAX` elements; parsing stops at the first one beyond (use with
/// `#[serde(deserialize_with = "bounded_vec::<_, _, MAX>")]`).
pub fn bounded_vec<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(SeqVisitor::<T, MAX>(PhantomData))
}

/// [`bounded_vec`] for an optional field.
pub fn bounded_opt_vec<'de, D, T, const MAX: usize>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Bounded<Vec<T>, MAX>>::deserialize(d).map(|o| o.map(|b| b.0))
}

/// A `BTreeMap<String, V>` of at most `MAX` entries; parsing stops at the first one beyond.
pub fn bounded_map<'de, D, V, const MAX: usize>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    d.deserialize_map(MapVisitor::<V, MAX>(PhantomData))
}

/// [`bounded_map`] for an optional field.
pub fn bounded_opt_map<'de, D, V, const MAX: usize>(d: D) -> Result<Option<BTreeMap<String, V>>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    Option::<Bounded<BTreeMap<String, V>, MAX>>::deserialize(d).map(|o| o.map(|b| b.0))
}

/// Batches of a `write_batches` request: at most [`MAX_BATCHES`] of them, with at most
/// [`MAX_ROWS`] elements in all.
pub fn bounded_batches<'de, D, T>(d: D) -> Result<Vec<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Batches<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Batches<T> {
        type Value = Vec<Vec<T>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX_BATCHES} batches")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<Vec<T>> = Vec::new();
            let mut total = 0;
            while let Some(Bounded(batch)) = seq.next_element::<Bounded<Vec<T>, MAX_ROWS>>()? {
                total += batch.len();
                if out.len() == MAX_BATCHES {
                    return Err(too_many("batches", MAX_BATCHES));
                }
                if total > MAX_ROWS {
                    return Err(too_many("operations in all batches", MAX_ROWS));
                }
                out.push(batch);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Batches(PhantomData))
}

/// A placement (server name → the shard ids it holds): at most [`MAX_SERVERS`] servers, each
/// listing at most [`MAX_SHARDS`] shards.
pub fn placement<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    let Bounded(map) = Bounded::<BTreeMap<String, Bounded<Vec<String>, MAX_SHARDS>>, MAX_SERVERS>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// [`placement`] for an optional field.
pub fn opt_placement<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, Vec<String>>>, D::Error> {
    #[derive(serde::Deserialize)]
    struct P(#[serde(deserialize_with = "placement")] BTreeMap<String, Vec<String>>);
    Option::<P>::deserialize(d).map(|o| o.map(|p| p.0))
}

/// A value parsed under a bound: `Bounded<Vec<T>, N>` or `Bounded<BTreeMap<String, V>, N>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounded<C, const MAX: usize>(pub C);

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<Vec<T>, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bounded_vec::<D, T, MAX>(d).map(Bounded)
    }
}

impl<'de, V: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<BTreeMap<String, V>, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bounded_map::<D, V, MAX>(d).map(Bounded)
    }
}

fn too_many<E: de::Error>(what: &str, max: usize) -> E {
    E::custom(format!("more than {max} {what}, the limit of one request"))
}

struct SeqVisitor<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for SeqVisitor<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {MAX} items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // The size hint comes from the input: trust it only up to a small bound.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(1024));
        while let Some(item) = seq.next_element()? {
            if out.len() == MAX {
                return Err(too_many("items in a list", MAX));
            }
            out.push(item);
        }
        Ok(out)
    }
}

struct MapVisitor<V, const MAX: usize>(PhantomData<V>);

impl<'de, V: Deserialize<'de>, const MAX: usize> Visitor<'de> for MapVisitor<V, MAX> {
    type Value = BTreeMap<String, V>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an object of at most {MAX} entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BTreeMap<String, V>, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, V>()? {
            if out.len() == MAX {
                return Err(too_many("entries in an object", MAX));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[serde(deserialize_with = "bounded_vec::<_, _, 3>")]
        list: Vec<u32>,
        #[serde(default, deserialize_with = "bounded_opt_map::<_, _, 2>")]
        map: Option<BTreeMap<String, Bounded<Vec<u8>, 2>>>,
    }

    #[test]
    fn lists_and_maps_are_cut_off_at_their_limit() {
        let ok: Body = serde_json::from_str(r#"{"list": [1, 2, 3], "map": {"a": [1, 2], "b": []}}"#).unwrap();
        assert_eq!(ok.list, [1, 2, 3]);
        assert_eq!(ok.map.unwrap()["a"].0, [1, 2]);
        let none: Body = serde_json::from_str(r#"{"list": []}"#).unwrap();
        assert!(none.map.is_none());
        let e = serde_json::from_str::<Body>(r#"{"list": [1, 2, 3, 4]}"#).unwrap_err().to_string();
        assert!(e.starts_with("more than 3 items in a list, the limit of one request"), "{e}");
        let e = serde_json::from_str::<Body>(r#"{"list": [], "map": {"a": [], "b": [], "c": []}}"#).unwrap_err();
        assert!(e.to_string().starts_with("more than 2 entries in an object"), "{e}");
        let e = serde_json::from_str::<Body>(r#"{"list": [], "map": {"a": [1, 2, 3]}}"#).unwrap_err();
        assert!(e.to_string().starts_with("more than 2 items in a list"), "{e}");
        assert!(serde_json::from_str::<Body>(r#"{"list": "x"}"#).is_err(), "types are still checked");
    }

    #[test]
    fn a_huge_list_stops_at_the_limit_without_reading_on() {
        // A list of ten million elements; parsing fails at element 4 (the garbage after it is
        // never reached).
        let mut text = String::from(r#"{"list": [1, 2, 3, 4, "#);
        text.push_str(&"5, ".repeat(10_000_000));
        let e = serde_json::from_str::<Body>(&text).unwrap_err();
        assert!(e.to_string().contains("more than 3 items"), "{e}");
        assert_eq!(e.column(), 22, "stopped right after the fourth element");
    }
}
