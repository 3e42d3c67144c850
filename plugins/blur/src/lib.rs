//! The `blur` plugin: a Gaussian blur with parameter `sigma` (pixels, default
//! 2.0, allowed `(0, 50]`), alpha-correct and with clamped edges. The math
//! lives in [`imgflow_filters::gaussian_blur`]; this crate only adapts it to
//! the `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue, Range};
use imgflow_filters::{gaussian_blur, BlurError, MAX_SIGMA};

/// `sigma` when a job does not set it.
const DEFAULT_SIGMA: f64 = 2.0;

struct Blur;

impl Guest for Blur {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "blur".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Gaussian blur (alpha-correct, edges clamped).".into(),
            params: vec![ParamSpec {
                name: "sigma".into(),
                kind: ParamKind::Float,
                default: ParamValue::Float(DEFAULT_SIGMA),
                allowed: Constraint::Within(Range {
                    min: Some(0.0),
                    min_inclusive: false,
                    max: Some(MAX_SIGMA),
                    max_inclusive: true,
                }),
                description: "Standard deviation of the Gaussian, in pixels.".into(),
            }],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let sigma = match params.iter().find(|p| p.name == "sigma").map(|p| &p.value) {
            None => DEFAULT_SIGMA,
            Some(ParamValue::Float(s)) => *s,
            Some(ParamValue::Integer(s)) => *s as f64,
            Some(_) => return Err(FilterError::InvalidParams("sigma must be a number".into())),
        };
        match gaussian_blur(image.width, image.height, &image.pixels, sigma) {
            Ok(pixels) => Ok(Image { pixels, ..image }),
            Err(e @ (BlurError::InvalidSigma(_) | BlurError::InvalidAmount { .. })) => {
                Err(FilterError::InvalidParams(e.to_string()))
            }
            Err(e @ BlurError::BufferLength { .. }) => {
                Err(FilterError::UnsupportedInput(e.to_string()))
            }
        }
    }
}

export!(Blur);
