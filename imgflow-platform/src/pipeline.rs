//! A job's pipeline: the steps it runs, as recorded and as clients write
//! them.
//!
//! A job runs one or more steps in order, each a plugin version with its
//! validated parameters: the input is decoded once, each step's output is
//! the next step's input, and the last output is encoded once. A job named
//! by a single `action` is a one-step pipeline.
//!
//! Clients write steps as JSON (the multipart field `steps`, or the query
//! parameter when its value starts with `[`):
//!
//! ```json
//! [{"action": "resize", "params": {"width": 320}},
//!  {"action": "blur", "version": "0.1.0", "params": {"sigma": 1}}]
//! ```
//!
//! or, for curl, in the short form ([`parse`]): steps separated by `,`, a
//! step's action (optionally `@version`) then `:` and its parameters as
//! `name=value` separated by `;`:
//!
//! ```text
//! ?steps=resize:width=320;height=200,blur@0.1.0:sigma=1,grayscale
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One step of a job as recorded: the plugin version that runs and its
/// validated parameters (defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The plugin's name.
    pub action: String,
    /// The plugin version (pinned by the client or the active one at
    /// submission).
    pub version: String,
    /// That version's SHA-256.
    pub digest: String,
    /// The validated parameters.
    pub params: serde_json::Value,
    /// How long the plugin call took, in milliseconds, once it has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<f64>,
}

/// The columns that describe a job's pipeline as a whole, for listing and
/// for jobs made before pipelines: a one-step pipeline's are its step's;
/// a longer one's `action`, `version` and `digest` are its steps' joined
/// with `,` and its `params` are the array of its steps' parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `blur`, or `resize,blur`.
    pub action: String,
    /// `0.1.0`, or `0.1.0,0.2.0`.
    pub version: String,
    /// The digest, or the digests joined.
    pub digest: String,
    /// The parameters, or the array of each step's.
    pub params: serde_json::Value,
}

/// The [`Summary`] of `steps` (at least one).
pub fn summary(steps: &[Step]) -> Summary {
    if let [step] = steps {
        return Summary {
            action: step.action.clone(),
            version: step.version.clone(),
            digest: step.digest.clone(),
            params: step.params.clone(),
        };
    }
    let join = |f: fn(&Step) -> &str| steps.iter().map(f).collect::<Vec<_>>().join(",");
    Summary {
        action: join(|s| &s.action),
        version: join(|s| &s.version),
        digest: join(|s| &s.digest),
        params: serde_json::Value::Array(steps.iter().map(|s| s.params.clone()).collect()),
    }
}

/// The distinct actions of `steps`, in order: the labels a job's metrics
/// are counted under.
pub fn actions(steps: &[Step]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for step in steps {
        if !seen.contains(&step.action.as_str()) {
            seen.push(&step.action);
        }
    }
    seen
}

/// A step as a client asks for it, before it is validated against the
/// plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRequest {
    /// `name` (the active version) or `name@version` (pinned).
    pub action: String,
    /// Its parameters as the client wrote them.
    pub params: RequestedParams,
}

/// A step's parameters, unvalidated.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestedParams {
    /// A JSON object (JSON steps).
    Json(serde_json::Value),
    /// `name=value` pairs (the short form, or a one-step query).
    Pairs(Vec<(String, String)>),
}

/// Why a `steps` value could not be read.
#[derive(Debug, Error, PartialEq)]
pub enum StepsError {
    /// The value is empty.
    #[error("steps is empty; name at least one step")]
    Empty,
    /// More steps than allowed (reading stops at the first one over).
    #[error("more than {max} steps asked for; at most {max} are allowed (MAX_STEPS)")]
    TooMany {
        /// `MAX_STEPS`.
        max: usize,
    },
    /// The JSON form is malformed.
    #[error("steps is not a JSON array of {{\"action\": ..., \"params\": {{...}}}}: {0}")]
    Json(String),
    /// A step of the short form is malformed.
    #[error("step {index}: {message}")]
    Step {
        /// The step's position, from 1.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStep {
    action: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    params: Option<serde_json::Value>,
}

/// Reads a `steps` value: a JSON array when it starts with `[`, else the
/// short form. At most `max` steps: reading stops at the first step over
/// (nothing beyond it is parsed or kept), whatever the value's length.
pub fn parse(text: &str, max: usize) -> Result<Vec<StepRequest>, StepsError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(StepsError::Empty);
    }
    let steps = if text.starts_with('[') {
        parse_json(text, max)?
    } else {
        parse_short(text, max)?
    };
    if steps.is_empty() {
        return Err(StepsError::Empty);
    }
    Ok(steps)
}

/// The message a bounded JSON read stops with.
const TOO_MANY: &str = "imgflow: too many steps";

/// Reads a JSON array of steps, at most `max` of them.
struct Bounded(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Bounded {
    type Value = Vec<JsonStep>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Bounded {
    type Value = Vec<JsonStep>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of steps")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut steps = Vec::new();
        while let Some(step) = seq.next_element::<JsonStep>()? {
            if steps.len() == self.0 {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            steps.push(step);
        }
        Ok(steps)
    }
}

fn parse_json(text: &str, max: usize) -> Result<Vec<StepRequest>, StepsError> {
    use serde::de::DeserializeSeed as _;
    let mut de = serde_json::Deserializer::from_str(text);
    let steps = Bounded(max)
        .deserialize(&mut de)
        .and_then(|steps| de.end().map(|()| steps))
        .map_err(|e| {
            if e.to_string().starts_with(TOO_MANY) {
                StepsError::TooMany { max }
            } else {
                StepsError::Json(e.to_string())
            }
        })?;
    steps
        .into_iter()
        .enumerate()
        .map(|(i, step)| {
            let action = match step.version {
                Some(version) if step.action.contains('@') => {
                    return Err(StepsError::Step {
                        index: i + 1,
                        message: format!(
                        "action {:?} pins a version and version {version:?} pins another; give one",
                        step.action
                    ),
                    })
                }
                Some(version) => format!("{}@{version}", step.action),
                None => step.action,
            };
            let params = step
                .params
                .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
            Ok(StepRequest {
                action,
                params: RequestedParams::Json(params),
            })
        })
        .collect()
}

fn parse_short(text: &str, max: usize) -> Result<Vec<StepRequest>, StepsError> {
    text.split(',')
        .enumerate()
        .map(|(i, step)| {
            if i == max {
                return Err(StepsError::TooMany { max });
            }
            let bad = |message: String| StepsError::Step {
                index: i + 1,
                message,
            };
            let (action, params) = match step.split_once(':') {
                Some((action, params)) => (action.trim(), params),
                None => (step.trim(), ""),
            };
            if action.is_empty() {
                return Err(bad(format!(
                    "{} names no action (write action:name=value;name=value)",
                    imgflow_runtime::text::excerpt(step)
                )));
            }
            let pairs = params
                .split(';')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((name, value)) => Ok((name.trim().to_string(), value.trim().to_string())),
                    None => Err(bad(format!(
                        "parameter {} of {} is not name=value",
                        imgflow_runtime::text::excerpt(pair),
                        imgflow_runtime::text::excerpt(action)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(StepRequest {
                action: action.to_string(),
                params: RequestedParams::Pairs(pairs),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(p: &[(&str, &str)]) -> RequestedParams {
        RequestedParams::Pairs(
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn short_form() {
        let steps = parse(
            "resize:width=320;height=200,blur@0.1.0:sigma=1,grayscale",
            8,
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                StepRequest {
                    action: "resize".into(),
                    params: pairs(&[("width", "320"), ("height", "200")])
                },
                StepRequest {
                    action: "blur@0.1.0".into(),
                    params: pairs(&[("sigma", "1")])
                },
                StepRequest {
                    action: "grayscale".into(),
                    params: pairs(&[])
                },
            ]
        );
    }

    #[test]
    fn json_form() {
        let steps = parse(
            r#"[{"action":"resize","params":{"width":320}},{"action":"blur","version":"0.1.0"}]"#,
            8,
        )
        .unwrap();
        assert_eq!(
            steps[0].params,
            RequestedParams::Json(json!({"width": 320}))
        );
        assert_eq!(steps[1].action, "blur@0.1.0");
        assert_eq!(steps[1].params, RequestedParams::Json(json!({})));
    }

    #[test]
    fn refusals_name_the_step() {
        assert_eq!(parse("  ", 8), Err(StepsError::Empty));
        assert_eq!(parse("[]", 8), Err(StepsError::Empty));
        assert_eq!(parse("a,b,c", 2), Err(StepsError::TooMany { max: 2 }));
        assert_eq!(
            parse(&format!("[{}]", [r#"{"action":"a"}"#; 3].join(",")), 2),
            Err(StepsError::TooMany { max: 2 })
        );
        // Reading stops at the first step over: a huge value costs nothing
        // beyond it (an unparseable tail is never seen).
        let huge = format!("a,b,c,{}", "\u{0}".repeat(1 << 20));
        assert_eq!(parse(&huge, 2), Err(StepsError::TooMany { max: 2 }));
        let huge = format!(
            r#"[{{"action":"a"}},{{"action":"b"}},{{"action":"c"}},{}"#,
            "[".repeat(1 << 20)
        );
        assert_eq!(parse(&huge, 2), Err(StepsError::TooMany { max: 2 }));
        let e = parse("resize:width=1,blur:sigma", 8).unwrap_err();
        assert!(e.to_string().starts_with("step 2:"), "{e}");
        let e = parse("resize,:x=1", 8).unwrap_err();
        assert!(e.to_string().starts_with("step 2:"), "{e}");
        assert!(matches!(
            parse(r#"[{"action":"a","colour":1}]"#, 8),
            Err(StepsError::Json(_))
        ));
    }

    #[test]
    fn summaries() {
        let step = |a: &str, v: &str| Step {
            action: a.into(),
            version: v.into(),
            digest: format!("d-{a}"),
            params: json!({"n": a}),
            run_ms: None,
        };
        let one = summary(&[step("blur", "0.1.0")]);
        assert_eq!(one.action, "blur");
        assert_eq!(one.params, json!({"n": "blur"}));
        let two = summary(&[step("resize", "1.0.0"), step("blur", "0.1.0")]);
        assert_eq!(two.action, "resize,blur");
        assert_eq!(two.version, "1.0.0,0.1.0");
        assert_eq!(two.digest, "d-resize,d-blur");
        assert_eq!(two.params, json!([{"n": "resize"}, {"n": "blur"}]));
        assert_eq!(
            actions(&[step("blur", "1"), step("resize", "1"), step("blur", "1")]),
            vec!["blur", "resize"]
        );
    }
}
