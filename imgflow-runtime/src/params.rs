//! Validating a job's parameters against a plugin's declared schema.
//!
//! The host checks parameters before a job is accepted, from the plugin's
//! [`PluginMetadata`](crate::metadata::PluginMetadata) alone, so a bad
//! request is refused at once instead of failing later in a worker. The
//! result, [`Params`], holds every declared parameter (defaults filled in),
//! which is exactly what a plugin's `apply` receives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::metadata::{Constraint, ParamKind, ParamSpec, ParamValue};

/// A complete, validated set of parameters: every declared parameter, once,
/// with its value of the declared kind and within its constraint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(BTreeMap<String, ParamValue>);

impl Params {
    /// The parameters as `(name, value)` pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of parameter `name`, if declared.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }
}

/// Why a job's parameters were refused. Messages name the parameter and what
/// it accepts, so a client can fix the request from the message alone.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ParamError {
    /// A parameter the plugin does not declare.
    #[error("unknown parameter {name:?}; {plugin} accepts {}", list_or_none(.known))]
    Unknown {
        /// The parameter given.
        name: String,
        /// The plugin's name.
        plugin: String,
        /// The parameters the plugin declares.
        known: Vec<String>,
    },
    /// A value that is not of the declared kind (or does not parse as it).
    #[error("parameter {name:?} must be {article} {kind}, got {got}")]
    WrongKind {
        /// The parameter.
        name: String,
        /// Its declared kind.
        kind: ParamKind,
        /// "a" or "an".
        article: &'static str,
        /// What was given, as text.
        got: String,
    },
    /// A value outside the declared constraint.
    #[error("parameter {name:?} must be {allowed}, got {got}")]
    NotAllowed {
        /// The parameter.
        name: String,
        /// The constraint, as text (for example `(0, 50]`).
        allowed: String,
        /// What was given.
        got: String,
    },
    /// The request's parameters are not a JSON object.
    #[error("params must be a JSON object of name: value, got {0}")]
    NotAnObject(String),
    /// A text value with a NUL or another control character, or longer
    /// than [`MAX_TEXT_CHARS`].
    #[error("parameter {name:?} must be at most {MAX_TEXT_CHARS} characters of text without control characters")]
    BadText {
        /// The parameter.
        name: String,
    },
}

/// The longest text parameter value, in characters.
pub const MAX_TEXT_CHARS: usize = 1024;

/// A text value, checked: no control characters (NUL included, which no
/// database column can hold), at most [`MAX_TEXT_CHARS`].
fn text(name: &str, value: &str) -> Result<ParamValue, ParamError> {
    if value.chars().count() > MAX_TEXT_CHARS || value.chars().any(char::is_control) {
        return Err(ParamError::BadText {
            name: name.to_string(),
        });
    }
    Ok(ParamValue::Text(value.to_string()))
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no parameters".to_string()
    } else {
        names.join(", ")
    }
}

fn article(kind: ParamKind) -> &'static str {
    if kind == ParamKind::Integer {
        "an"
    } else {
        "a"
    }
}

/// Validates parameters given as JSON (the API's `params` field).
///
/// Integers are accepted for float parameters; a float with no fractional
/// part (`3.0`) is accepted for an integer parameter.
pub fn from_json(
    plugin: &str,
    specs: &[ParamSpec],
    given: &serde_json::Value,
) -> Result<Params, ParamError> {
    let object = match given {
        serde_json::Value::Object(o) => o,
        serde_json::Value::Null => return complete(plugin, specs, BTreeMap::new()),
        other => return Err(ParamError::NotAnObject(other.to_string())),
    };
    let mut values = BTreeMap::new();
    for (name, raw) in object {
        let spec = find(plugin, specs, name)?;
        let wrong = || ParamError::WrongKind {
            name: name.clone(),
            kind: spec.kind,
            article: article(spec.kind),
            got: raw.to_string(),
        };
        let value = match (spec.kind, raw) {
            (ParamKind::Float, serde_json::Value::Number(n)) => {
                ParamValue::Float(n.as_f64().ok_or_else(wrong)?)
            }
            (ParamKind::Integer, serde_json::Value::Number(n)) => match n.as_i64() {
                Some(i) => ParamValue::Integer(i),
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                        ParamValue::Integer(f as i64)
                    }
                    _ => return Err(wrong()),
                },
            },
            (ParamKind::Boolean, serde_json::Value::Bool(b)) => ParamValue::Boolean(*b),
            (ParamKind::Text, serde_json::Value::String(s)) => text(name, s)?,
            _ => return Err(wrong()),
        };
        values.insert(name.clone(), value);
    }
    complete(plugin, specs, values)
}

/// Validates parameters given as `name=value` text (query strings and the
/// runner's `--param`), parsing each value as its declared kind.
pub fn from_pairs<'a>(
    plugin: &str,
    specs: &[ParamSpec],
    given: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Params, ParamError> {
    let mut values = BTreeMap::new();
    for (name, raw) in given {
        let spec = find(plugin, specs, name)?;
        let wrong = || ParamError::WrongKind {
            name: name.to_string(),
            kind: spec.kind,
            article: article(spec.kind),
            got: format!("{raw:?}"),
        };
        let value = match spec.kind {
            ParamKind::Float => ParamValue::Float(raw.trim().parse().map_err(|_| wrong())?),
            ParamKind::Integer => ParamValue::Integer(raw.trim().parse().map_err(|_| wrong())?),
            ParamKind::Boolean => match raw.trim() {
                "true" | "1" | "yes" => ParamValue::Boolean(true),
                "false" | "0" | "no" => ParamValue::Boolean(false),
                _ => return Err(wrong()),
            },
            ParamKind::Text => text(name, raw)?,
        };
        values.insert(name.to_string(), value);
    }
    complete(plugin, specs, values)
}

fn find<'s>(plugin: &str, specs: &'s [ParamSpec], name: &str) -> Result<&'s ParamSpec, ParamError> {
    specs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ParamError::Unknown {
            name: name.to_string(),
            plugin: plugin.to_string(),
            known: specs.iter().map(|s| s.name.clone()).collect(),
        })
}

/// Checks each given value against its constraint and fills in defaults.
fn complete(
    plugin: &str,
    specs: &[ParamSpec],
    mut values: BTreeMap<String, ParamValue>,
) -> Result<Params, ParamError> {
    for spec in specs {
        let value = values
            .entry(spec.name.clone())
            .or_insert_with(|| spec.default.clone());
        check(spec, value)?;
    }
    if let Some(extra) = values.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
        return Err(ParamError::Unknown {
            name: extra.clone(),
            plugin: plugin.to_string(),
            known: specs.iter().map(|s| s.name.clone()).collect(),
        });
    }
    Ok(Params(values))
}

/// Checks one value against its spec: kind, finiteness, constraint.
pub fn check(spec: &ParamSpec, value: &ParamValue) -> Result<(), ParamError> {
    let not_allowed = || ParamError::NotAllowed {
        name: spec.name.clone(),
        allowed: spec.allowed.to_string(),
        got: value.to_string(),
    };
    let number = match (spec.kind, value) {
        (ParamKind::Float, ParamValue::Float(f)) => Some(*f),
        (ParamKind::Integer, ParamValue::Integer(i)) => Some(*i as f64),
        (ParamKind::Boolean, ParamValue::Boolean(_)) | (ParamKind::Text, ParamValue::Text(_)) => {
            None
        }
        _ => {
            return Err(ParamError::WrongKind {
                name: spec.name.clone(),
                kind: spec.kind,
                article: article(spec.kind),
                got: value.to_string(),
            })
        }
    };
    if let Some(n) = number {
        if !n.is_finite() {
            return Err(not_allowed());
        }
    }
    match (&spec.allowed, number, value) {
        (Constraint::Any, _, _) => Ok(()),
        (
            Constraint::Within {
                min,
                min_inclusive,
                max,
                max_inclusive,
            },
            Some(n),
            _,
        ) => {
            let above = match min {
                Some(m) if *min_inclusive => n >= *m,
                Some(m) => n > *m,
                None => true,
            };
            let below = match max {
                Some(m) if *max_inclusive => n <= *m,
                Some(m) => n < *m,
                None => true,
            };
            if above && below {
                Ok(())
            } else {
                Err(not_allowed())
            }
        }
        (Constraint::OneOf { values }, _, ParamValue::Text(t)) if values.contains(t) => Ok(()),
        _ => Err(not_allowed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sigma() -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "sigma".into(),
            kind: ParamKind::Float,
            default: ParamValue::Float(2.0),
            allowed: Constraint::Within {
                min: Some(0.0),
                min_inclusive: false,
                max: Some(50.0),
                max_inclusive: true,
            },
            description: String::new(),
        }]
    }

    #[test]
    fn fills_defaults() {
        let p = from_json("blur", &sigma(), &json!({})).unwrap();
        assert_eq!(p.get("sigma"), Some(&ParamValue::Float(2.0)));
        let p = from_pairs("blur", &sigma(), []).unwrap();
        assert_eq!(p.get("sigma"), Some(&ParamValue::Float(2.0)));
    }

    #[test]
    fn accepts_integers_for_floats_and_checks_ranges() {
        let p = from_json("blur", &sigma(), &json!({"sigma": 50})).unwrap();
        assert_eq!(p.get("sigma"), Some(&ParamValue::Float(50.0)));
        for bad in [
            json!({"sigma": 0}),
            json!({"sigma": 50.5}),
            json!({"sigma": -1}),
        ] {
            let e = from_json("blur", &sigma(), &bad).unwrap_err();
            assert!(matches!(e, ParamError::NotAllowed { .. }), "{e}");
            assert!(e.to_string().contains("(0, 50]"), "{e}");
        }
    }

    #[test]
    fn rejects_wrong_kinds_unknown_names_and_non_objects() {
        let e = from_json("blur", &sigma(), &json!({"sigma": "big"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter \"sigma\" must be a float, got \"big\""
        );
        let e = from_json("blur", &sigma(), &json!({"radius": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown parameter \"radius\"; blur accepts sigma"
        );
        let e = from_pairs("grayscale", &[], [("x", "1")]).unwrap_err();
        assert!(
            e.to_string().contains("grayscale accepts no parameters"),
            "{e}"
        );
        assert!(matches!(
            from_json("blur", &sigma(), &json!([1])),
            Err(ParamError::NotAnObject(_))
        ));
        let e = from_pairs("blur", &sigma(), [("sigma", "NaN")]).unwrap_err();
        assert!(matches!(e, ParamError::NotAllowed { .. }), "{e}");
        let e = from_pairs("blur", &sigma(), [("sigma", "inf")]).unwrap_err();
        assert!(matches!(e, ParamError::NotAllowed { .. }), "{e}");
    }

    #[test]
    fn text_values_hold_no_control_characters() {
        let specs = vec![ParamSpec {
            name: "label".into(),
            kind: ParamKind::Text,
            default: ParamValue::Text(String::new()),
            allowed: Constraint::Any,
            description: String::new(),
        }];
        for bad in ["a\0b", "line\nbreak", &"x".repeat(MAX_TEXT_CHARS + 1)] {
            let e = from_pairs("p", &specs, [("label", bad)]).unwrap_err();
            assert!(matches!(e, ParamError::BadText { .. }), "{e}");
            let e = from_json("p", &specs, &json!({ "label": bad })).unwrap_err();
            assert!(matches!(e, ParamError::BadText { .. }), "{e}");
        }
        assert!(from_pairs("p", &specs, [("label", "é ok")]).is_ok());
    }

    #[test]
    fn one_of_and_integer_kinds() {
        let specs = vec![
            ParamSpec {
                name: "mode".into(),
                kind: ParamKind::Text,
                default: ParamValue::Text("a".into()),
                allowed: Constraint::OneOf {
                    values: vec!["a".into(), "b".into()],
                },
                description: String::new(),
            },
            ParamSpec {
                name: "n".into(),
                kind: ParamKind::Integer,
                default: ParamValue::Integer(1),
                allowed: Constraint::Any,
                description: String::new(),
            },
        ];
        let p = from_pairs("x", &specs, [("mode", "b"), ("n", "7")]).unwrap();
        assert_eq!(p.get("mode"), Some(&ParamValue::Text("b".into())));
        assert_eq!(p.get("n"), Some(&ParamValue::Integer(7)));
        assert!(from_pairs("x", &specs, [("mode", "c")]).is_err());
        assert!(from_json("x", &specs, &json!({"n": 1.5})).is_err());
        assert!(from_json("x", &specs, &json!({"n": 2.0})).is_ok());
    }
}
