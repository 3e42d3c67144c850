//! Test plugin `hostile-text`: everything it says about itself, and the
//! error it fails with, holds HTML and script, as an uploader who attacks
//! the console's users would write. The console must show it as text. It
//! also declares one parameter of each kind the console builds a form
//! for (one-of, an integer with an exclusive bound, a boolean, a float).
//! With `mode=fail` it fails; otherwise it returns the image unchanged.
//! Never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue, Range};

/// The markup the console must show as text.
const MARKUP: &str =
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";

struct HostileText;

impl Guest for HostileText {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "hostile-text".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: format!("{MARKUP} Test plugin: shows markup as text."),
            params: vec![
                ParamSpec {
                    name: "mode".into(),
                    kind: ParamKind::Text,
                    default: ParamValue::Text("pass".into()),
                    allowed: Constraint::OneOf(vec!["pass".into(), "fail".into()]),
                    description: format!("<b>pass</b> or fail {MARKUP}"),
                },
                ParamSpec {
                    name: "strength".into(),
                    kind: ParamKind::Integer,
                    default: ParamValue::Integer(5),
                    allowed: Constraint::Within(Range {
                        min: Some(0.0),
                        min_inclusive: false,
                        max: Some(10.0),
                        max_inclusive: true,
                    }),
                    description: "Ignored; more than 0, at most 10.".into(),
                },
                ParamSpec {
                    name: "keep_alpha".into(),
                    kind: ParamKind::Boolean,
                    default: ParamValue::Boolean(true),
                    allowed: Constraint::Any,
                    description: "Ignored.".into(),
                },
                ParamSpec {
                    name: "amount".into(),
                    kind: ParamKind::Float,
                    default: ParamValue::Float(0.5),
                    allowed: Constraint::Within(Range {
                        min: Some(0.0),
                        min_inclusive: true,
                        max: Some(1.0),
                        max_inclusive: true,
                    }),
                    description: "Ignored; 0 to 1.".into(),
                },
            ],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let fail = params
            .iter()
            .any(|p| p.name == "mode" && matches!(&p.value, ParamValue::Text(m) if m == "fail"));
        if fail {
            return Err(FilterError::Failed(format!(
                "{MARKUP} failed on purpose (mode=fail)"
            )));
        }
        Ok(image)
    }
}

export!(HostileText);
