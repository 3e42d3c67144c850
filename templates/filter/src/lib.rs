//! A template imgflow filter: halves the brightness of every pixel, or
//! scales it by the `factor` parameter. Replace the pixel loop with yours.

// `cargo component build` writes the bindings for wit/filter.wit here.
#[allow(warnings)]
mod bindings;

use bindings::imgflow::filter::types::{
    Constraint, FilterError, Image, Param, ParamKind, ParamSpec, ParamValue, PluginMetadata, Range,
};
use bindings::Guest;

struct MyFilter;

impl Guest for MyFilter {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            // The job action that runs this plugin: [a-z][a-z0-9_-]*.
            name: "my-filter".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Scales brightness by a factor.".into(),
            params: vec![ParamSpec {
                name: "factor".into(),
                kind: ParamKind::Float,
                default: ParamValue::Float(0.5),
                allowed: Constraint::Within(Range {
                    min: Some(0.0),
                    min_inclusive: true,
                    max: Some(4.0),
                    max_inclusive: true,
                }),
                description: "Brightness multiplier.".into(),
            }],
        }
    }

    fn apply(mut image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        // The host has validated the parameters against metadata() and
        // filled in defaults, so every declared parameter is present.
        let factor = match params.iter().find(|p| p.name == "factor").map(|p| &p.value) {
            Some(ParamValue::Float(f)) => *f as f32,
            _ => return Err(FilterError::InvalidParams("factor must be a number".into())),
        };
        // RGBA, 4 bytes a pixel, row-major; leave alpha (px[3]) alone.
        for px in image.pixels.chunks_exact_mut(4) {
            for c in &mut px[..3] {
                *c = (f32::from(*c) * factor).round().min(255.0) as u8;
            }
        }
        Ok(image)
    }
}

bindings::export!(MyFilter with_types_in bindings);
