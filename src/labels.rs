//! Labels and label selectors, with Kubernetes' rules so they read the way
//! people already know: keys `[prefix/]name`, values of up to 63 characters,
//! and selectors such as `owner=alice,job!=7,tier in (a,b),!debug`.
//!
//! As in Kubernetes, `k!=v` and `k notin (...)` also match an object without
//! the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A sandbox's labels: at most [`MAX_LABELS`], each checked by [`check_label`].
pub type Labels = BTreeMap<String, String>;

pub const MAX_LABELS: usize = 64;
const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;
/// A selector longer than this is refused before it is parsed.
const MAX_SELECTOR: usize = 4096;

/// Why a label or a selector was refused: said so that the caller can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LabelError(String);

fn bad(msg: impl Into<String>) -> LabelError {
    LabelError(msg.into())
}

/// One word of letters, digits, `-`, `_` and `.`, beginning and ending with
/// a letter or digit, at most 63 characters.
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS subdomain: lowercase labels of letters, digits and `-`, joined by dots.
fn is_prefix(s: &str) -> bool {
    s.len() <= MAX_PREFIX
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_NAME
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

pub fn check_key(key: &str) -> Result<(), LabelError> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_prefix(prefix) && is_name(name),
        None => is_name(key),
    };
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "label key {key:?} is not valid: use [prefix/]name, the name at most 63 letters, \
             digits, '-', '_' or '.', beginning and ending with a letter or digit"
        )))
    }
}

pub fn check_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() || is_name(value) {
        Ok(())
    } else {
        Err(bad(format!(
            "label {key}: value {value:?} is not valid: at most 63 letters, digits, '-', '_' \
             or '.', beginning and ending with a letter or digit (or empty)"
        )))
    }
}

pub fn check_label(key: &str, value: &str) -> Result<(), LabelError> {
    check_key(key)?;
    check_value(key, value)
}

pub fn check_labels(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(bad(format!("at most {MAX_LABELS} labels")));
    }
    labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

/// Parses `key=value` (the CLI's `--label`).
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| bad(format!("label {s:?} must be key=value")))?;
    check_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::Absent(k) => write!(f, "!{k}"),
        }
    }
}

/// Requirements that must all hold; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

impl std::str::FromStr for Selector {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, LabelError> {
        if s.len() > MAX_SELECTOR {
            return Err(bad(format!(
                "label selector is longer than {MAX_SELECTOR} bytes"
            )));
        }
        split_top_level(s)?
            .into_iter()
            .map(|part| parse_requirement(part.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map(Selector)
    }
}

/// Splits at the commas that are not inside `( )`.
fn split_top_level(s: &str) -> Result<Vec<&str>, LabelError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let (mut parts, mut depth, mut start) = (Vec::new(), 0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err(bad("label selector: nested '(' is not allowed")),
            ')' if depth == 1 => depth = 0,
            ')' => return Err(bad("label selector: ')' without '('")),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad("label selector: '(' is never closed"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, LabelError> {
    if part.is_empty() {
        return Err(bad(
            "label selector has an empty requirement (two commas in a row?)",
        ));
    }
    let key_ok = |k: &str| check_key(k).map(|_| k.to_string());
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::Absent(key_ok(key.trim())?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        check_value(k, v)?;
        return Ok(Requirement::NotEquals(key_ok(k)?, v.to_string()));
    }
    if let Some((k, v)) = part.split_once('=') {
        let v = v.strip_prefix('=').unwrap_or(v);
        let (k, v) = (k.trim(), v.trim());
        check_value(k, v)?;
        return Ok(Requirement::Equals(key_ok(k)?, v.to_string()));
    }
    if let Some(open) = part.find('(') {
        let head: Vec<&str> = part[..open].split_whitespace().collect();
        let inner = part[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| bad(format!("label selector: {part:?} must end with ')'")))?;
        let values = inner
            .split(',')
            .map(|v| {
                let v = v.trim();
                check_value(head.first().copied().unwrap_or(""), v).map(|_| v.to_string())
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        return match head.as_slice() {
            [k, "in"] => Ok(Requirement::In(key_ok(k)?, values)),
            [k, "notin"] => Ok(Requirement::NotIn(key_ok(k)?, values)),
            _ => Err(bad(format!(
                "label selector: {part:?} must be 'key in (a,b)' or 'key notin (a,b)'"
            ))),
        };
    }
    Ok(Requirement::Exists(key_ok(part).map_err(|_| {
        bad(format!(
            "label selector: {part:?} is not a requirement: use key=value, key!=value, \
             key in (a,b), key notin (a,b), key or !key"
        ))
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let alice = labels(&[("owner", "alice"), ("job", "42"), ("tier", "gpu")]);
        let bob = labels(&[("owner", "bob")]);
        for (s, a, b) in [
            ("", true, true),
            ("owner=alice", true, false),
            ("owner==alice", true, false),
            ("owner=alice,job!=7", true, false),
            ("job!=42", false, true), // bob has no job: != matches
            ("tier in (gpu, cpu)", true, false),
            ("tier notin (gpu)", false, true),
            ("job", true, false),
            ("!job", false, true),
            (" owner = bob , !job ", false, true),
        ] {
            assert_eq!(sel(s).matches(&alice), a, "{s} on alice");
            assert_eq!(sel(s).matches(&bob), b, "{s} on bob");
        }
    }

    #[test]
    fn bad_selectors_are_refused_with_a_reason() {
        for (s, says) in [
            ("owner=alice,,job=1", "empty requirement"),
            ("tier in (a,b", "never closed"),
            ("tier in ((a))", "nested"),
            ("tier has (a)", "key in (a,b)"),
            ("a b", "not a requirement"),
            ("-bad=1", "label key"),
            ("owner=al ice", "value"),
            ("owner=x)", "without '('"),
        ] {
            let err = s.parse::<Selector>().unwrap_err().to_string();
            assert!(err.contains(says), "{s}: {err}");
        }
        assert!("a=b,".repeat(2000).parse::<Selector>().is_err());
    }

    #[test]
    fn selectors_print_back_as_they_parse() {
        let s = sel("owner=alice,job!=7,tier in (b,a),!x,y");
        assert_eq!(s.to_string(), "owner=alice,job!=7,tier in (a,b),!x,y");
        assert_eq!(sel(&s.to_string()), s);
    }

    #[test]
    fn label_keys_and_values_follow_the_rules() {
        assert!(check_label("example.com/owner", "alice").is_ok());
        assert!(check_label("owner", "").is_ok());
        for (k, v) in [
            ("", "x"),
            ("Example.com/owner", "x"),
            ("owner/", "x"),
            (&"k".repeat(64), "x"),
            ("owner", "-x"),
            ("owner", &"v".repeat(64)),
            ("own er", "x"),
        ] {
            assert!(check_label(k, v).is_err(), "{k:?}={v:?}");
        }
        assert_eq!(parse_label("job=42").unwrap(), ("job".into(), "42".into()));
        assert!(parse_label("job").is_err());
        let many: Labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_labels(&many).is_err());
    }
}
