//! One rule for the names Shoal is configured and driven with: tenants,
//! sandbox templates, model profiles, worker ids, and the `sandbox`,
//! `tenant` and `model` of a task. A name is 1 to 64 bytes of
//! `[A-Za-z0-9_.-]`: safe in a Redis key, a label value and a log line
//! (`.` and `..` are names: code that builds a path from one must still
//! refuse them).
//!
//! The namespace is a name with a narrower rule on top (see
//! [`Name::parse_namespace`]): it prefixes every queue and key, where a dot
//! or a capital would read as a separator or a different fleet.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// The longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 48;

/// A validated name: 1 to [`MAX_NAME_BYTES`] bytes of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

/// A string is not a [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{shown:?} is not a name: {rule}")]
pub struct NameError {
    /// The refused text, cut short (it may come from a request).
    shown: String,
    rule: &'static str,
}

const NAME_RULE: &str = "1-64 characters of [A-Za-z0-9_.-]";
const NAMESPACE_RULE: &str = "1-48 characters of [a-z0-9_-]";

impl Name {
    /// Whether `name` follows the rule for names.
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    }

    /// Whether `name` is a valid namespace: a name that is also lowercase,
    /// dot-free and at most [`MAX_NAMESPACE_BYTES`] long.
    pub fn is_valid_namespace(name: &str) -> bool {
        Self::is_valid(name)
            && name.len() <= MAX_NAMESPACE_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    }

    /// Checks `name` against the rule for names.
    pub fn parse(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if Self::is_valid(&name) {
            Ok(Self(name))
        } else {
            Err(NameError::new(&name, NAME_RULE))
        }
    }

    /// Checks `name` against the rule for namespaces.
    pub fn parse_namespace(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if Self::is_valid_namespace(&name) {
            Ok(Self(name))
        } else {
            Err(NameError::new(&name, NAMESPACE_RULE))
        }
    }

    /// A name written in the code (built-in profiles, tests); panics if it
    /// is not one, which is a bug in the literal.
    pub fn from_static(name: &'static str) -> Self {
        match Self::parse(name) {
            Ok(name) => name,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl NameError {
    fn new(name: &str, rule: &'static str) -> Self {
        const SHOWN: usize = 64;
        let shown = match name.char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("{}…", &name[..cut]),
            None => name.to_owned(),
        };
        Self { shown, rule }
    }

    /// What a name must look like, for error messages.
    pub fn rule(&self) -> &'static str {
        self.rule
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Maps keyed by [`Name`] are looked up with a plain `&str` (a `Name`
/// compares, orders and hashes exactly as its text).
impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;

    fn try_from(name: String) -> Result<Self, NameError> {
        Self::parse(name)
    }
}

impl TryFrom<&str> for Name {
    type Error = NameError;

    fn try_from(name: &str) -> Result<Self, NameError> {
        Self::parse(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_the_configs_and_tests_use_is_a_name() {
        for name in [
            "default",
            "local",
            "openai",
            "anthropic",
            "rl",
            "cloud",
            "tenant-a",
            "Team_B.prod",
            "w1",
            "host.example-1234",
            &"x".repeat(64),
        ] {
            assert!(Name::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn names_with_separators_spaces_or_too_long_are_refused() {
        for name in ["", "a b", "a/b", "a:b", "a\0b", "é", "a*", &"x".repeat(65)] {
            let err = Name::parse(name).unwrap_err();
            assert!(err.to_string().contains("is not a name"), "{err}");
        }
    }

    #[test]
    fn a_namespace_is_a_lowercase_dot_free_name_of_at_most_48_bytes() {
        for ok in ["shoal", "t-api-0123456789", "a_b", &"x".repeat(48)] {
            assert!(Name::parse_namespace(ok).is_ok(), "{ok}");
            assert!(Name::is_valid(ok), "a namespace is a name: {ok}");
        }
        for bad in ["Shoal", "a.b", "", "a b", &"x".repeat(49)] {
            assert!(Name::parse_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_huge_refused_name_is_cut_short_in_the_error() {
        let err = Name::parse("!".repeat(10_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
