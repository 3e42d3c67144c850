//! The `crop` plugin: the `width` x `height` rectangle at (`x`, `y`), which
//! must lie inside the image. The math lives in [`imgflow_filters::crop`];
//! this crate only adapts it to the `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue, Range};
use imgflow_filters::{crop, GeometryError, MAX_SIDE};

struct Crop;

fn integer(params: &[Param], name: &str) -> u32 {
    match params.iter().find(|p| p.name == name).map(|p| &p.value) {
        Some(ParamValue::Integer(v)) => u32::try_from(*v).unwrap_or(0),
        _ => 0,
    }
}

fn spec(name: &str, min: f64, description: &str) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        kind: ParamKind::Integer,
        default: ParamValue::Integer(min as i64),
        allowed: Constraint::Within(Range {
            min: Some(min),
            min_inclusive: true,
            max: Some(f64::from(MAX_SIDE)),
            max_inclusive: true,
        }),
        description: description.into(),
    }
}

impl Guest for Crop {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "crop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Crops to a rectangle that lies inside the image.".into(),
            params: vec![
                spec(
                    "x",
                    0.0,
                    "Left edge of the rectangle, in pixels from the left.",
                ),
                spec(
                    "y",
                    0.0,
                    "Top edge of the rectangle, in pixels from the top.",
                ),
                spec("width", 1.0, "Width of the rectangle, in pixels."),
                spec("height", 1.0, "Height of the rectangle, in pixels."),
            ],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let [x, y, w, h] = ["x", "y", "width", "height"].map(|n| integer(&params, n));
        match crop(image.width, image.height, &image.pixels, x, y, w, h) {
            Ok((width, height, pixels)) => Ok(Image {
                width,
                height,
                pixels,
            }),
            Err(e @ GeometryError::BufferLength { .. }) => {
                Err(FilterError::UnsupportedInput(e.to_string()))
            }
            Err(e) => Err(FilterError::InvalidParams(e.to_string())),
        }
    }
}

export!(Crop);
