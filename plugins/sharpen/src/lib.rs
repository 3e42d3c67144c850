//! The `sharpen` plugin: an unsharp mask, `in + amount * (in - blur(in,
//! sigma))` on each colour channel, alpha kept. The math lives in
//! [`imgflow_filters::sharpen`]; this crate only adapts it to the
//! `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue, Range};
use imgflow_filters::{sharpen, BlurError, MAX_AMOUNT};

const DEFAULT_SIGMA: f64 = 1.0;
const DEFAULT_AMOUNT: f64 = 1.0;

struct Sharpen;

fn range(min: f64, min_inclusive: bool, max: f64) -> Constraint {
    Constraint::Within(Range {
        min: Some(min),
        min_inclusive,
        max: Some(max),
        max_inclusive: true,
    })
}

fn number(params: &[Param], name: &str, default: f64) -> f64 {
    match params.iter().find(|p| p.name == name).map(|p| &p.value) {
        Some(ParamValue::Float(v)) => *v,
        Some(ParamValue::Integer(v)) => *v as f64,
        _ => default,
    }
}

impl Guest for Sharpen {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "sharpen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Unsharp mask: each colour pushed away from its Gaussian blur, alpha kept.".into(),
            params: vec![
                ParamSpec {
                    name: "sigma".into(),
                    kind: ParamKind::Float,
                    default: ParamValue::Float(DEFAULT_SIGMA),
                    allowed: range(0.0, false, 10.0),
                    description: "Radius of the blur the image is compared with (its standard deviation), in pixels.".into(),
                },
                ParamSpec {
                    name: "amount".into(),
                    kind: ParamKind::Float,
                    default: ParamValue::Float(DEFAULT_AMOUNT),
                    allowed: range(0.0, true, MAX_AMOUNT),
                    description: "How strongly edges are enhanced: 0 changes nothing, 1 doubles the local contrast.".into(),
                },
            ],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let sigma = number(&params, "sigma", DEFAULT_SIGMA);
        let amount = number(&params, "amount", DEFAULT_AMOUNT);
        match sharpen(image.width, image.height, &image.pixels, sigma, amount) {
            Ok(pixels) => Ok(Image { pixels, ..image }),
            Err(e @ BlurError::BufferLength { .. }) => {
                Err(FilterError::UnsupportedInput(e.to_string()))
            }
            Err(e) => Err(FilterError::InvalidParams(e.to_string())),
        }
    }
}

export!(Sharpen);
