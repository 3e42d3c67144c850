//! What a submission says besides its images: one set of fields, read from
//! the query string and from a form alike.
//!
//! A client may put any field in the query (`?action=blur&wait=30s`), in a
//! multipart form (`-F action=blur`), or both: a field given in both places
//! with the same value is taken once; with different values, or twice in
//! one place, the request is refused naming the field. A name that is not
//! one of [`FIELDS`] is a plugin parameter (`sigma=3`), given instead of a
//! `params` JSON object.
//!
//! Values are kept as text here; what they mean is checked where the job is
//! made (the steps against their plugins, the format, the quality, ...).

use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// One field a submission may carry besides its images and plugin
/// parameters, with what the API's documentation says of it (the OpenAPI
/// document's query parameters and form fields are made from [`FIELDS`]).
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its name, in the query and in a form.
    pub name: &'static str,
    /// What it means (Markdown).
    pub about: &'static str,
    /// An example value.
    pub example: Option<&'static str>,
    /// Whether a batch (`POST /v1/batches`) takes it too.
    pub in_batch: bool,
}

/// The fields a submission may carry besides its images and plugin
/// parameters, in the order the request digest takes them.
pub const FIELDS: [Field; 9] = [
    Field {
        name: "action",
        about: "The plugin to run; `name@version` pins a version. Give `action` or `steps`. Any field not in this list is a plugin parameter (`sigma=2.5`), given instead of `params`.",
        example: Some("blur"),
        in_batch: true,
    },
    Field {
        name: "steps",
        about: "A pipeline instead of `action` (at most `MAX_STEPS` steps): steps separated by `,`, each an action (optionally `@version`), then `:` and its parameters as `name=value` separated by `;` (`resize:width=320;height=200,blur:sigma=1`), or a JSON array of steps (`[{\"action\": \"resize\", \"params\": {\"width\": 320}}, {\"action\": \"blur\", \"version\": \"0.1.0\"}]`). No other plugin parameters go with it.",
        example: Some("resize:width=320,blur:sigma=1"),
        in_batch: true,
    },
    Field {
        name: "params",
        about: "The plugin's parameters as a JSON object (with `action`); or give each as a field of its own (`sigma=2.5`), not both.",
        example: Some(r#"{"sigma": 2.5}"#),
        in_batch: true,
    },
    Field {
        name: "format",
        about: "The output format: `png`, `jpeg`, `webp` or `gif` (default: the input's).",
        example: None,
        in_batch: true,
    },
    Field {
        name: "quality",
        about: "Quality, 1 to 100: JPEG (default 90), or WebP written lossy at that quality (without it, WebP is lossless); refused with PNG and GIF.",
        example: None,
        in_batch: true,
    },
    Field {
        name: "auto_orient",
        about: "Whether the input is turned upright by its EXIF orientation before the plugin runs (JPEG, WebP, PNG): `true` (default) or `false`.",
        example: None,
        in_batch: true,
    },
    Field {
        name: "wait",
        about: "Wait up to this long (`30s`, `500ms`, or seconds; at most `MAX_WAIT`) for the job to finish: then the answer is the result itself (`200`, or the job's JSON with `Accept: application/json`), else the job as usual (`202`). Not for batches.",
        example: Some("30s"),
        in_batch: false,
    },
    Field {
        name: "callback_url",
        about: "When the job finishes (completed, failed or cancelled), POST its JSON here, signed with `Imgflow-Signature` (HMAC-SHA256 with `CALLBACK_SECRET`), retried with backoff for `CALLBACK_RETRY_FOR` (see the README's \"Webhooks\"). http or https, a public address unless `CALLBACK_ALLOW_PRIVATE`.",
        example: Some("https://example.com/hooks/imgflow"),
        in_batch: true,
    },
    Field {
        name: "priority",
        about: "`high`, `normal` (default) or `low`: the order among this client's own jobs (each client key gets a fair share of the workers whatever its priorities). A `normal` job is ordered as if submitted `PRIORITY_AGEING_MS` (30 s) later than a `high` one, a `low` one twice that: a lower priority never waits longer than that behind higher ones submitted after it.",
        example: Some("high"),
        in_batch: true,
    },
];

/// The names of [`FIELDS`], for messages.
fn field_names() -> String {
    FIELDS.map(|f| f.name).join(", ")
}

/// The name of the file fields of a form (one for a job, several for a
/// batch); never a plugin parameter.
pub const IMAGE_FIELD: &str = "image";

/// Where a field came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The URL's query string.
    Query,
    /// A field of a multipart form.
    Form,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Query => "the query",
            Source::Form => "the form",
        })
    }
}

/// Why the fields of a submission are refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FieldError {
    /// The same field twice in one place.
    #[error("{name} is given twice in {place}; give it once")]
    Twice {
        /// The field.
        name: String,
        /// Where.
        place: Source,
    },
    /// The same field in the query and the form, with different values.
    #[error("{name} is given in the query and in the form with different values; give it once")]
    Conflict {
        /// The field.
        name: String,
    },
    /// A field whose name cannot be a plugin parameter either.
    #[error("unexpected field {0}; expected image, {fields} or a plugin parameter", fields = field_names())]
    Unexpected(String),
    /// `image` in the query.
    #[error("the image goes in the body (a raw image, or an `image` file field of a form), not in the query")]
    ImageInQuery,
}

/// A submission's fields, as text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SubmitFields {
    /// `action`: the plugin, `name` or `name@version`.
    pub action: Option<String>,
    /// `steps`: a pipeline (JSON or the short form), unparsed.
    pub steps: Option<String>,
    /// `params`: the plugin's parameters as a JSON object, unparsed.
    pub params: Option<String>,
    /// `format`: the output format.
    pub format: Option<String>,
    /// `quality`: JPEG or lossy WebP quality.
    pub quality: Option<String>,
    /// `auto_orient`: `true` or `false`.
    pub auto_orient: Option<String>,
    /// `wait`: how long the client waits for the job.
    pub wait: Option<String>,
    /// `callback_url`: where the finished job is POSTed.
    pub callback_url: Option<String>,
    /// `priority`: `high`, `normal` or `low`, among the client's jobs.
    pub priority: Option<String>,
    /// Plugin parameters given as fields of their own (`sigma=3`), in the
    /// order given.
    pub plugin_params: Vec<(String, String)>,
}

/// Whether `name` can name a plugin parameter (a lowercase identifier).
fn is_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

impl SubmitFields {
    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "action" => &mut self.action,
            "steps" => &mut self.steps,
            "params" => &mut self.params,
            "format" => &mut self.format,
            "quality" => &mut self.quality,
            "auto_orient" => &mut self.auto_orient,
            "wait" => &mut self.wait,
            "callback_url" => &mut self.callback_url,
            "priority" => &mut self.priority,
            _ => return None,
        })
    }

    /// The fields of one place: `pairs` as they came (names and values),
    /// each name at most once.
    pub fn read(
        pairs: impl IntoIterator<Item = (String, String)>,
        source: Source,
    ) -> Result<SubmitFields, FieldError> {
        let mut fields = SubmitFields::default();
        for (name, value) in pairs {
            if name == IMAGE_FIELD {
                return Err(FieldError::ImageInQuery);
            }
            let twice = || FieldError::Twice {
                name: name.clone(),
                place: source,
            };
            if let Some(slot) = fields.slot(&name) {
                if slot.is_some() {
                    return Err(twice());
                }
                *slot = Some(value);
            } else if is_param_name(&name) {
                if fields.plugin_params.iter().any(|(n, _)| *n == name) {
                    return Err(twice());
                }
                fields.plugin_params.push((name, value));
            } else {
                return Err(FieldError::Unexpected(imgflow_runtime::text::excerpt(
                    &name,
                )));
            }
        }
        Ok(fields)
    }

    /// The query's fields and the form's together: a field in both must
    /// have the same value in both.
    pub fn merge(self, form: SubmitFields) -> Result<SubmitFields, FieldError> {
        let mut merged = self;
        for name in FIELDS.map(|f| f.name) {
            let theirs = form.clone().slot_value(name);
            let ours = merged.slot(name).expect("a known field");
            match (ours.as_deref(), theirs) {
                (Some(a), Some(b)) if a != b => {
                    return Err(FieldError::Conflict {
                        name: name.to_string(),
                    })
                }
                (None, Some(b)) => *ours = Some(b),
                _ => {}
            }
        }
        for (name, value) in form.plugin_params {
            match merged.plugin_params.iter().find(|(n, _)| *n == name) {
                Some((_, v)) if *v != value => return Err(FieldError::Conflict { name }),
                Some(_) => {}
                None => merged.plugin_params.push((name, value)),
            }
        }
        Ok(merged)
    }

    fn slot_value(mut self, name: &str) -> Option<String> {
        self.slot(name).and_then(Option::take)
    }

    /// A digest of everything submitted that decides the job (every field
    /// but `wait`) and of the image, so a reused idempotency key can be told
    /// apart from a repeated request. Each part is length-prefixed.
    pub fn digest(&self, image_sha256: &[u8]) -> String {
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(self.action.as_deref().unwrap_or("").as_bytes());
        part(self.format.as_deref().unwrap_or("").as_bytes());
        // The optional fields only when set, so the digests of requests
        // without them stay as they were before the fields existed.
        for (name, value) in [
            ("steps", &self.steps),
            ("callback_url", &self.callback_url),
            ("quality", &self.quality),
            ("auto_orient", &self.auto_orient),
            ("priority", &self.priority),
        ] {
            if let Some(value) = value {
                part(name.as_bytes());
                part(value.as_bytes());
            }
        }
        match &self.params {
            Some(json) => match serde_json::from_str::<serde_json::Value>(json) {
                Ok(value) => part(value.to_string().as_bytes()),
                Err(_) => part(json.as_bytes()),
            },
            None => {
                let mut pairs = self.plugin_params.clone();
                pairs.sort();
                for (k, v) in pairs {
                    part(k.as_bytes());
                    part(v.as_bytes());
                }
            }
        }
        part(image_sha256);
        hex::encode(hash.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plugins_may_not_declare_a_submission_field_as_a_parameter() {
        // The sandbox crate refuses these names in a plugin's declaration
        // (it cannot see this list): the two must say the same.
        let mut fields: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        fields.push(IMAGE_FIELD);
        fields.sort_unstable();
        let mut reserved = imgflow_runtime::metadata::RESERVED_PARAMS.to_vec();
        reserved.sort_unstable();
        assert_eq!(fields, reserved);
    }

    #[test]
    fn known_fields_and_plugin_parameters() {
        let fields = SubmitFields::read(
            pairs(&[("action", "blur"), ("sigma", "3"), ("wait", "30s")]),
            Source::Query,
        )
        .unwrap();
        assert_eq!(fields.action.as_deref(), Some("blur"));
        assert_eq!(fields.wait.as_deref(), Some("30s"));
        assert_eq!(fields.plugin_params, pairs(&[("sigma", "3")]));
    }

    #[test]
    fn a_field_twice_is_refused_naming_it() {
        for list in [
            &[("action", "blur"), ("action", "grayscale")][..],
            &[("sigma", "1"), ("sigma", "2")][..],
        ] {
            let e = SubmitFields::read(pairs(list), Source::Form).unwrap_err();
            assert!(matches!(e, FieldError::Twice { .. }), "{e}");
            assert!(e.to_string().contains(list[0].0), "{e}");
        }
        assert_eq!(
            SubmitFields::read(pairs(&[("image", "x")]), Source::Query).unwrap_err(),
            FieldError::ImageInQuery
        );
        assert!(matches!(
            SubmitFields::read(pairs(&[("Bad Name", "x")]), Source::Form).unwrap_err(),
            FieldError::Unexpected(_)
        ));
    }

    #[test]
    fn query_and_form_merge_unless_they_disagree() {
        let query =
            SubmitFields::read(pairs(&[("wait", "30s"), ("action", "blur")]), Source::Query)
                .unwrap();
        let form =
            SubmitFields::read(pairs(&[("action", "blur"), ("sigma", "2")]), Source::Form).unwrap();
        let merged = query.clone().merge(form).unwrap();
        assert_eq!(merged.action.as_deref(), Some("blur"));
        assert_eq!(merged.wait.as_deref(), Some("30s"));
        assert_eq!(merged.plugin_params, pairs(&[("sigma", "2")]));
        let other = SubmitFields::read(pairs(&[("action", "grayscale")]), Source::Form).unwrap();
        assert_eq!(
            query.merge(other).unwrap_err(),
            FieldError::Conflict {
                name: "action".into()
            }
        );
    }

    #[test]
    fn the_digest_ignores_wait_and_the_order_of_parameters() {
        let a = SubmitFields::read(
            pairs(&[("action", "blur"), ("sigma", "2"), ("x", "1")]),
            Source::Query,
        )
        .unwrap();
        let b = SubmitFields::read(
            pairs(&[
                ("x", "1"),
                ("action", "blur"),
                ("sigma", "2"),
                ("wait", "5s"),
            ]),
            Source::Form,
        )
        .unwrap();
        assert_eq!(a.digest(b"img"), b.digest(b"img"));
        assert_ne!(a.digest(b"img"), a.digest(b"other"));
    }
}
