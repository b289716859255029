//! Label selectors (`labelSelector`) and the field selectors kubectl sends
//! (`fieldSelector=metadata.name=NAME`, `metadata.namespace`).

use serde_json::Value;

use super::status::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label or field selector; all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, ch) in text.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_set(key: &str, rest: &str, text: &str) -> Result<(String, Vec<String>), ApiError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| invalid(text))?;
    let values = inner.split(',').map(|v| v.trim().to_string()).collect();
    Ok((key.trim().to_string(), values))
}

fn invalid(text: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: invalid selector {text:?}"
    ))
}

impl Selector {
    /// Parses the selector syntax: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`,
    /// `!k`, joined by commas.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let requirement = if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = term.split_once("==") {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = term.split_once('=') {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                let (key, values) = parse_set(key, rest, text)?;
                Requirement::NotIn(key, values)
            } else if let Some((key, rest)) = term.split_once(" in ") {
                let (key, values) = parse_set(key, rest, text)?;
                Requirement::In(key, values)
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().into())
            } else if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
                return Err(invalid(text));
            } else {
                Requirement::Exists(term.into())
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Checks the selector against `lookup`, which returns a key's value when it is set.
    fn matches_with(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(key, value) => lookup(key).as_deref() == Some(value.as_str()),
                Requirement::NotEquals(key, value) => {
                    lookup(key).as_deref() != Some(value.as_str())
                }
                Requirement::In(key, values) => lookup(key).is_some_and(|v| values.contains(&v)),
                Requirement::NotIn(key, values) => lookup(key).is_none_or(|v| !values.contains(&v)),
                Requirement::Exists(key) => lookup(key).is_some(),
                Requirement::NotExists(key) => lookup(key).is_none(),
            })
    }

    /// Checks the object's labels.
    pub fn matches_labels(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        self.matches_with(|key| {
            labels
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
    }

    /// Checks the fields a field selector may name; every core resource supports
    /// `metadata.name` and `metadata.namespace`.
    pub fn matches_fields(&self, object: &Value) -> bool {
        self.matches_with(|key| {
            let pointer = match key {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                "status.phase" => "/status/phase",
                "spec.nodeName" => "/spec/nodeName",
                _ => return None,
            };
            Some(
                object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        })
    }

    /// Rejects field selectors on fields the server does not index, as the real server does.
    pub fn check_fields(&self) -> Result<(), ApiError> {
        for requirement in &self.requirements {
            let key = match requirement {
                Requirement::Equals(key, _) | Requirement::NotEquals(key, _) => key,
                _ => {
                    return Err(ApiError::bad_request(
                        "field selectors support only =, == and !=".to_string(),
                    ));
                }
            };
            if !matches!(
                key.as_str(),
                "metadata.name" | "metadata.namespace" | "status.phase" | "spec.nodeName"
            ) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_forms_match() {
        let object = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let cases = [
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("app in (web,db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing=x", false),
        ];
        for (text, expected) in cases {
            let selector = Selector::parse(text).expect(text);
            assert_eq!(selector.matches_labels(&object), expected, "{text}");
        }
    }

    #[test]
    fn malformed_selector_is_bad_request() {
        let error = Selector::parse("app in web").expect_err("no parentheses");
        assert_eq!(error.code, 400);
    }
}
