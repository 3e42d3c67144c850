//! The `resize` plugin: to a `width` and/or `height` (0: from the other,
//! keeping the aspect ratio), fitted by `fit` (`contain`, `cover`, `fill`)
//! with `filter` (`lanczos3` or the faster `triangle`), on premultiplied
//! alpha. The math lives in [`imgflow_filters::resize`]; this crate only
//! adapts it to the `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue, Range};
use imgflow_filters::{resize, Filter, Fit, GeometryError, MAX_SIDE};

struct Resize;

fn integer(params: &[Param], name: &str) -> i64 {
    match params.iter().find(|p| p.name == name).map(|p| &p.value) {
        Some(ParamValue::Integer(v)) => *v,
        _ => 0,
    }
}

fn text<'a>(params: &'a [Param], name: &str, default: &'a str) -> &'a str {
    match params.iter().find(|p| p.name == name).map(|p| &p.value) {
        Some(ParamValue::Text(v)) => v,
        _ => default,
    }
}

fn side(name: &str, what: &str) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        kind: ParamKind::Integer,
        default: ParamValue::Integer(0),
        allowed: Constraint::Within(Range {
            min: Some(0.0),
            min_inclusive: true,
            max: Some(f64::from(MAX_SIDE)),
            max_inclusive: true,
        }),
        description: format!(
            "The {what} in pixels; 0 derives it from the other side, keeping the aspect ratio."
        ),
    }
}

fn choice(name: &str, default: &str, values: &[&str], description: &str) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        kind: ParamKind::Text,
        default: ParamValue::Text(default.into()),
        allowed: Constraint::OneOf(values.iter().map(|v| v.to_string()).collect()),
        description: description.into(),
    }
}

impl Guest for Resize {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "resize".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Resizes to a width and/or height (Lanczos3 or triangle filter, premultiplied alpha).".into(),
            params: vec![
                side("width", "width"),
                side("height", "height"),
                choice("fit", "contain", &["contain", "cover", "fill"], "With both sides: contain (within them, aspect kept), cover (exactly them, aspect kept, overflow cropped) or fill (stretched)."),
                choice("filter", "lanczos3", &["lanczos3", "triangle"], "The resampling filter: lanczos3 (sharp) or triangle (faster, softer)."),
            ],
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let side = |name| {
            u32::try_from(integer(&params, name))
                .ok()
                .filter(|&v| v > 0)
        };
        let fit = match text(&params, "fit", "contain") {
            "cover" => Fit::Cover,
            "fill" => Fit::Fill,
            _ => Fit::Contain,
        };
        let filter = match text(&params, "filter", "lanczos3") {
            "triangle" => Filter::Triangle,
            _ => Filter::Lanczos3,
        };
        let resized = resize(
            image.width,
            image.height,
            &image.pixels,
            side("width"),
            side("height"),
            fit,
            filter,
        );
        match resized {
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

export!(Resize);
