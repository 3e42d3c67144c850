//! The `rotate` plugin: turns the image clockwise by `degrees` (90, 180 or
//! 270). The math lives in [`imgflow_filters::rotate`]; this crate only
//! adapts it to the `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};
use imgflow_filters::{rotate, Rotation};

struct Rotate;

impl Guest for Rotate {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "rotate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Rotates clockwise by 90, 180 or 270 degrees.".into(),
            params: vec![ParamSpec {
                name: "degrees".into(),
                kind: ParamKind::Text,
                default: ParamValue::Text("90".into()),
                allowed: Constraint::OneOf(vec!["90".into(), "180".into(), "270".into()]),
                description: "The clockwise turn: 90, 180 or 270.".into(),
            }],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let degrees = match params
            .iter()
            .find(|p| p.name == "degrees")
            .map(|p| &p.value)
        {
            Some(ParamValue::Text(t)) => t.parse::<i64>().unwrap_or(0),
            None => 90,
            Some(_) => 0,
        };
        let rotation = Rotation::from_degrees(degrees).ok_or_else(|| {
            FilterError::InvalidParams(format!("degrees must be 90, 180 or 270, got {degrees}"))
        })?;
        let (width, height, pixels) = rotate(image.width, image.height, &image.pixels, rotation)
            .map_err(|e| FilterError::UnsupportedInput(e.to_string()))?;
        Ok(Image {
            width,
            height,
            pixels,
        })
    }
}

export!(Rotate);
