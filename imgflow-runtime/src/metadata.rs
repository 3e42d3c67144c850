//! What a plugin says about itself: its name, version, description and
//! parameters, as plain Rust types that serialise to the JSON the API shows.
//!
//! These mirror the records of `wit/filter.wit`; [`crate::runtime`] converts
//! between the two.

use serde::{Deserialize, Serialize};

/// A plugin's self-description, returned by its `metadata()` export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginMetadata {
    /// The plugin's name, which is also the job `action` that runs it.
    pub name: String,
    /// The plugin's semantic version.
    pub version: String,
    /// One line describing what the filter does.
    pub description: String,
    /// Every parameter the filter accepts.
    pub params: Vec<ParamSpec>,
}

/// The declaration of one parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// The parameter's name.
    pub name: String,
    /// The value's type.
    pub kind: ParamKind,
    /// The value used when a job does not set the parameter.
    pub default: ParamValue,
    /// The allowed values.
    pub allowed: Constraint,
    /// What the parameter does, for humans.
    pub description: String,
}

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// A finite 64-bit float.
    Float,
    /// A 64-bit signed integer.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A string.
    Text,
}

impl std::fmt::Display for ParamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParamKind::Float => "float",
            ParamKind::Integer => "integer",
            ParamKind::Boolean => "boolean",
            ParamKind::Text => "text",
        })
    }
}

/// A parameter's value; in JSON simply a number, boolean or string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// A boolean.
    Boolean(bool),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A string.
    Text(String),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Boolean(b) => write!(f, "{b}"),
            ParamValue::Integer(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Which values a parameter accepts beyond its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// Any value of the parameter's kind.
    Any,
    /// A number within an interval; an absent bound is unbounded.
    Within {
        /// The lower bound.
        min: Option<f64>,
        /// Whether `min` itself is allowed.
        min_inclusive: bool,
        /// The upper bound.
        max: Option<f64>,
        /// Whether `max` itself is allowed.
        max_inclusive: bool,
    },
    /// One of these strings.
    OneOf {
        /// The allowed strings.
        values: Vec<String>,
    },
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Constraint::Any => f.write_str("any value"),
            Constraint::Within {
                min,
                min_inclusive,
                max,
                max_inclusive,
            } => {
                let open = if *min_inclusive { '[' } else { '(' };
                let close = if *max_inclusive { ']' } else { ')' };
                let lo = min.map_or("-inf".to_string(), |m| m.to_string());
                let hi = max.map_or("inf".to_string(), |m| m.to_string());
                write!(f, "{open}{lo}, {hi}{close}")
            }
            Constraint::OneOf { values } => write!(f, "one of {}", values.join(", ")),
        }
    }
}

/// Names a plugin parameter may not have: a submission's query or form
/// carries them beside the plugin's parameters
/// (`?action=blur&sigma=2&wait=30s`, `-F image=@photo.png -F sigma=2`).
pub const RESERVED_PARAMS: &[&str] = &[
    "action",
    "format",
    "quality",
    "steps",
    "wait",
    "callback_url",
    "auto_orient",
    "priority",
    "params",
    "image",
];

/// Whether `name` is acceptable as a plugin name (and so as a job action and
/// a storage key): `[a-z][a-z0-9_-]*`, at most 64 characters.
pub fn is_valid_plugin_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

/// Whether `version` is a semantic version (`MAJOR.MINOR.PATCH`, with an
/// optional `-pre` or `+build` suffix), at most 64 characters.
pub fn is_valid_version(version: &str) -> bool {
    version.len() <= 64 && semver::Version::parse(version).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_are_safe_identifiers() {
        for ok in ["blur", "grayscale", "sepia-2", "a_b"] {
            assert!(is_valid_plugin_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Blur",
            "../etc",
            "a/b",
            "1abc",
            "a.b",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_plugin_name(bad), "{bad}");
        }
    }

    #[test]
    fn versions_are_semver() {
        for ok in ["0.1.0", "1.22.333", "1.0.0-rc.1", "1.0.0+abc"] {
            assert!(is_valid_version(ok), "{ok}");
        }
        for bad in ["", "1", "1.0", "1.0.x", "v1.0.0", "1..0"] {
            assert!(!is_valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn values_serialise_as_plain_json() {
        let v: Vec<ParamValue> = serde_json::from_str(r#"[true, 3, 2.5, "x"]"#).unwrap();
        assert_eq!(
            v,
            vec![
                ParamValue::Boolean(true),
                ParamValue::Integer(3),
                ParamValue::Float(2.5),
                ParamValue::Text("x".into())
            ]
        );
        let c = Constraint::Within {
            min: Some(0.0),
            min_inclusive: false,
            max: Some(50.0),
            max_inclusive: true,
        };
        assert_eq!(c.to_string(), "(0, 50]");
    }
}
