//! What the API server does to objects by itself (no I/O): Secret `stringData` folded into
//! `data`, and CRDs that serve their types and report themselves established.

use serde_json::{Value, json};

use super::Store;
use crate::registry::{self, ResourceType};

impl Store {
    /// What the real server does to objects itself. Secrets: write-only `stringData` is merged
    /// into `data`. CRDs: their types become servable at once and their status says so
    /// (`Established`), as `kubectl wait --for condition=established` expects.
    pub(super) fn server_side_defaults(&mut self, rt: &ResourceType, obj: &mut Value) {
        if rt.group.is_empty() && rt.plural == "secrets" {
            let map = obj.as_object_mut().unwrap(); // callers pass maps only
            if let Some(Value::Object(string_data)) = map.remove("stringData") {
                let data = map.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                let data = data.as_object_mut().unwrap();
                for (key, value) in string_data {
                    if let Some(text) = value.as_str() {
                        data.insert(key, json!(base64(text.as_bytes())));
                    }
                }
            }
            return;
        }
        if rt.group != "apiextensions.k8s.io" || rt.plural != "customresourcedefinitions" {
            return;
        }
        for t in registry::types_from_crd(obj) {
            self.registry.register(t);
        }
        let names = obj.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
        let stored: Vec<Value> = obj
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
            .filter_map(|v| v.get("name").cloned())
            .collect();
        let condition = |kind: &str, reason: &str, message: &str| json!({ "type": kind, "status": "True", "reason": reason, "message": message });
        let status = json!({
            "acceptedNames": names,
            "storedVersions": stored,
            "conditions": [
                condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
        });
        if let Some(map) = obj.as_object_mut() {
            map.insert("status".into(), status);
        }
    }
}

/// Standard base64 with padding, as Secret `data` holds it.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            let sextet = (n >> (18 - 6 * i)) & 63;
            out.push(if i <= chunk.len() { TABLE[sextet as usize] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        let cases = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("s3cret!?", "czNjcmV0IT8=")];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
