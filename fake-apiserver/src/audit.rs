//! What tests observe and steer (no I/O): the log of write requests, with whether each one
//! changed anything, and the failures a test injected for requests to come.

use crate::error::ApiError;

/// The Kubernetes verb of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub fn is_write(self) -> bool {
        matches!(self, Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection)
    }
}

/// One write request as the server saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRecord {
    pub verb: Verb,
    /// API group; empty for the core group.
    pub group: String,
    /// Plural resource name, e.g. `secrets`.
    pub resource: String,
    /// `status` or `scale` for subresource writes.
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub field_manager: Option<String>,
    /// HTTP status code of the response.
    pub code: u16,
    /// Whether the request changed stored state (a new resourceVersion). A no-op update, a
    /// re-apply of the same content and every failed request are `false`.
    pub changed: bool,
}

/// A failure to inject: the next `times` requests that match get `code` with a `Status` body.
///
/// Note that kube's client retries 429, 503 and 504 on its own by default
/// (`kube::Config::default_retry`); use 500 or 409 to reach an error policy directly.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    code: u16,
    verb: Option<Verb>,
    resource: Option<String>,
    name: Option<String>,
    times: usize,
    message: String,
}

impl Failure {
    /// Fails the next request of any kind with `code`.
    pub fn new(code: u16) -> Self {
        Self { code, verb: None, resource: None, name: None, times: 1, message: format!("injected failure ({code})") }
    }

    /// Only requests with this verb.
    pub fn verb(mut self, verb: Verb) -> Self {
        self.verb = Some(verb);
        self
    }

    /// Only this resource: a plural (`secrets`, which also covers its subresources) or
    /// `plural/subresource` (`widgets/status`).
    pub fn resource(mut self, resource: &str) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Only requests naming this object.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The next `n` matching requests (default 1).
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }

    /// Every matching request until `FakeApiServer::clear_failures`.
    pub fn always(self) -> Self {
        self.times(usize::MAX)
    }

    pub fn message(mut self, message: &str) -> Self {
        self.message = message.into();
        self
    }

    fn matches(&self, verb: Verb, resource: &str, subresource: Option<&str>, name: Option<&str>) -> bool {
        let resource_matches = self.resource.as_deref().is_none_or(|r| match r.split_once('/') {
            Some((plural, sub)) => plural == resource && subresource == Some(sub),
            None => r == resource,
        });
        self.verb.is_none_or(|v| v == verb) && resource_matches && self.name.as_deref().is_none_or(|n| name == Some(n))
    }
}

#[derive(Debug, Default)]
pub(crate) struct Audit {
    pub writes: Vec<WriteRecord>,
    failures: Vec<Failure>,
}

impl Audit {
    pub fn inject(&mut self, failure: Failure) {
        if failure.times > 0 {
            self.failures.push(failure);
        }
    }

    pub fn clear_failures(&mut self) {
        self.failures.clear();
    }

    /// The injected failure this request gets, if any; uses up one of its times.
    pub fn take_failure(
        &mut self,
        verb: Verb,
        resource: &str,
        subresource: Option<&str>,
        name: Option<&str>,
    ) -> Option<ApiError> {
        let index = self.failures.iter().position(|f| f.matches(verb, resource, subresource, name))?;
        let failure = &mut self.failures[index];
        let error = ApiError::injected(failure.code, &failure.message);
        failure.times -= 1;
        if failure.times == 0 {
            self.failures.remove(index);
        }
        Some(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_match_and_run_out() {
        let mut audit = Audit::default();
        audit.inject(Failure::new(500).verb(Verb::Patch).resource("widgets/status").times(2));
        assert!(audit.take_failure(Verb::Patch, "widgets", None, Some("w")).is_none());
        assert!(audit.take_failure(Verb::Get, "widgets", Some("status"), Some("w")).is_none());
        assert_eq!(audit.take_failure(Verb::Patch, "widgets", Some("status"), Some("w")).unwrap().code, 500);
        assert!(audit.take_failure(Verb::Patch, "widgets", Some("status"), None).is_some());
        assert!(audit.take_failure(Verb::Patch, "widgets", Some("status"), None).is_none());
    }
}
