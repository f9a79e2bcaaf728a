//! Label and field selectors (pure): parsing the `labelSelector` / `fieldSelector` query
//! parameters and matching objects against them.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`: equality (`a=b`, `a==b`, `a!=b`) and set-based (`a in (x,y)`,
/// `a notin (x)`, `a`, `!a`) requirements, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

/// A parsed `fieldSelector`: `path=value`, `path==value` or `path!=value` terms over dotted JSON
/// paths (`metadata.name`, `status.phase`); a missing field reads as the empty string.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(Vec<String>, bool, String)>);

/// Splits on commas that are not inside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|t| !t.is_empty()).collect()
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        terms(s).into_iter().map(parse_requirement).collect::<Result<_, _>>().map(Self)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: {term:?}");
    let valid_key = |k: &str| !k.is_empty() && !k.contains(char::is_whitespace);
    if let Some(open) = term.find('(') {
        let close = term.rfind(')').filter(|&c| c > open).ok_or_else(bad)?;
        let mut head = term[..open].split_whitespace();
        let (key, op) = (head.next().ok_or_else(bad)?, head.next().ok_or_else(bad)?);
        let values = term[open + 1..close].split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
        return match op {
            "in" => Ok(Requirement::In(key.into(), values)),
            "notin" => Ok(Requirement::NotIn(key.into(), values)),
            _ => Err(bad()),
        };
    }
    let pair = |sep: &str| term.split_once(sep).map(|(k, v)| (k.trim().to_string(), v.trim().to_string()));
    let requirement = if let Some((k, v)) = pair("!=") {
        Requirement::NotEquals(k, v)
    } else if let Some((k, v)) = pair("==").or_else(|| pair("=")) {
        Requirement::Equals(k, v)
    } else if let Some(k) = term.strip_prefix('!') {
        Requirement::NotExists(k.trim().into())
    } else {
        Requirement::Exists(term.into())
    };
    let key = match &requirement {
        Requirement::Equals(k, _) | Requirement::NotEquals(k, _) => k,
        Requirement::Exists(k) | Requirement::NotExists(k) => k,
        Requirement::In(k, _) | Requirement::NotIn(k, _) => k,
    };
    if valid_key(key) { Ok(requirement) } else { Err(bad()) }
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parse_term = |term: &str| {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            let path: Vec<String> = path.trim().split('.').map(String::from).collect();
            Ok((path, equal, value.trim().to_string()))
        };
        terms(s).into_iter().map(parse_term).collect::<Result<_, _>>().map(Self)
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let found = path.iter().try_fold(object, |v, k| v.get(k));
            let text = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (text == *want) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let obj = json!({"metadata": {"name": "x", "labels": {"app": "db", "tier": "data"}}});
        let yes =
            ["app=db", "app==db,tier=data", "app!=web", "app in (db, web)", "env notin (prod)", "app", "!env", ""];
        let no = ["app=web", "app=db,tier=web", "app!=db", "app in (web)", "tier notin (data,x)", "env", "!app"];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&obj), "{s} should match");
        }
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&obj), "{s} should not match");
        }
        assert!(LabelSelector::parse("a in (b").is_err());
        assert!(LabelSelector::parse("a foo (b)").is_err());
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let obj = json!({"metadata": {"name": "x", "namespace": "ns"}, "status": {"phase": "Running"}});
        assert!(FieldSelector::parse("metadata.name=x,metadata.namespace==ns").unwrap().matches(&obj));
        assert!(FieldSelector::parse("status.phase!=Pending").unwrap().matches(&obj));
        assert!(!FieldSelector::parse("metadata.name=y").unwrap().matches(&obj));
        assert!(FieldSelector::parse("spec.nodeName=").unwrap().matches(&obj));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
