//! Integration tests: real kube clients, watchers and a `Controller` against the fake API server.

mod controller;
mod crd;
mod objects;
mod watch;

use serde_json::Value;

/// The API status code and reason of a failed request.
pub fn api_error(err: &kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A typed object from JSON, so that test fixtures read like manifests.
pub fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("fixture matches the type")
}
