//! Test plugin `bad-output`: returns a pixel buffer one byte shorter than width x height x 4.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct BadOutput;

impl Guest for BadOutput {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "bad-output".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description:
                "Test plugin: returns a pixel buffer one byte shorter than width x height x 4."
                    .into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let _ = params;
        let mut pixels = image.pixels;
        pixels.pop();
        Ok(Image {
            width: image.width,
            height: image.height,
            pixels,
        })
    }
}

export!(BadOutput);
fn params() -> Vec<ParamSpec> {
    Vec::new()
}
