//! The Secret holding the Postgres credentials of every server's database. Pure.
//!
//! The password is an input: the controller generates one only when the Secret does not exist
//! yet and otherwise passes the stored one back, so reconciles never rotate it under running pods.

use super::{Owner, names};
use k8s_openapi::api::core::v1::Secret;
use std::collections::BTreeMap;

pub fn postgres_secret(owner: &Owner, password: &str) -> Secret {
    Secret {
        metadata: owner.meta(names::postgres_secret(&owner.name), BTreeMap::new()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (names::SECRET_USER_KEY.to_owned(), names::POSTGRES_USER.to_owned()),
            (names::SECRET_PASSWORD_KEY.to_owned(), password.to_owned()),
        ])),
        ..Secret::default()
    }
}

/// The password stored in an existing Secret, if it has one.
pub fn stored_password(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(names::SECRET_PASSWORD_KEY)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|p| !p.is_empty())
}

/// A fresh random password: 32 alphanumeric characters (about 190 bits).
pub fn generate_password() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng().sample_iter(&Alphanumeric).take(32).map(char::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::testing::{assert_child_meta, owner};
    use k8s_openapi::ByteString;

    #[test]
    fn carries_the_given_password_and_user() {
        let s = postgres_secret(&owner(), "pw");
        assert_child_meta(&s.metadata, "students-postgres");
        let data = s.string_data.unwrap();
        assert_eq!(data["password"], "pw");
        assert_eq!(data["username"], "sharddb");
    }

    #[test]
    fn a_stored_password_is_reused_and_generated_ones_differ() {
        let mut stored = Secret::default();
        assert_eq!(stored_password(&stored), None);
        stored.data = Some(BTreeMap::from([("password".into(), ByteString(b"kept".to_vec()))]));
        assert_eq!(stored_password(&stored).as_deref(), Some("kept"));
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
