//! The `flip` plugin: mirrors the image, `direction` `horizontal` (left and
//! right swap) or `vertical` (top and bottom swap). The math lives in
//! [`imgflow_filters::flip`]; this crate only adapts it to the
//! `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};
use imgflow_filters::{flip, Flip as Direction};

struct Flip;

impl Guest for Flip {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "flip".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Mirrors horizontally or vertically.".into(),
            params: vec![ParamSpec {
                name: "direction".into(),
                kind: ParamKind::Text,
                default: ParamValue::Text("horizontal".into()),
                allowed: Constraint::OneOf(vec!["horizontal".into(), "vertical".into()]),
                description: "horizontal (left and right swap) or vertical (top and bottom swap)."
                    .into(),
            }],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let direction = match params
            .iter()
            .find(|p| p.name == "direction")
            .map(|p| &p.value)
        {
            Some(ParamValue::Text(t)) if t == "vertical" => Direction::Vertical,
            _ => Direction::Horizontal,
        };
        let (width, height, pixels) = flip(image.width, image.height, &image.pixels, direction)
            .map_err(|e| FilterError::UnsupportedInput(e.to_string()))?;
        Ok(Image {
            width,
            height,
            pixels,
        })
    }
}

export!(Flip);
