//! Test plugin `escape`: tries to read a file, an environment variable or the network.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Escape;

impl Guest for Escape {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "escape".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description:
                "Test plugin: tries to read a file, an environment variable or the network.".into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let text = |name: &str| {
            params
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| match &p.value {
                    ParamValue::Text(t) => Some(t.clone()),
                    _ => None,
                })
        };
        let probe = text("probe").unwrap_or_default();
        let target = text("target").unwrap_or_default();
        // Each probe returns the image unchanged if the access worked (the
        // sandbox leaked) and `failed` with the reason if it was denied.
        let outcome = match probe.as_str() {
            "file" => std::fs::read(&target)
                .map(|b| format!("read {} bytes", b.len()))
                .map_err(|e| e.to_string()),
            "env" => {
                let visible = std::env::vars().count();
                match std::env::var(&target) {
                    Ok(v) => Ok(format!("read {} characters", v.len())),
                    Err(e) => Err(format!("{e} ({visible} variables visible)")),
                }
            }
            "net" => std::net::TcpStream::connect(target.as_str())
                .map(|_| "connected".to_string())
                .map_err(|e| e.to_string()),
            other => {
                return Err(FilterError::InvalidParams(format!(
                    "unknown probe {other:?}"
                )))
            }
        };
        match outcome {
            Ok(_) => Ok(image),
            Err(reason) => Err(FilterError::Failed(format!(
                "{probe} access denied: {reason}"
            ))),
        }
    }
}

export!(Escape);

fn params() -> Vec<ParamSpec> {
    vec![
        ParamSpec {
            name: "probe".into(),
            kind: ParamKind::Text,
            default: ParamValue::Text("file".into()),
            allowed: Constraint::OneOf(vec!["file".into(), "env".into(), "net".into()]),
            description:
                "What to try: read a file, an environment variable, or open a TCP connection."
                    .into(),
        },
        ParamSpec {
            name: "target".into(),
            kind: ParamKind::Text,
            default: ParamValue::Text("/etc/hostname".into()),
            allowed: Constraint::Any,
            description: "The path, variable name, or host:port to try.".into(),
        },
    ]
}
