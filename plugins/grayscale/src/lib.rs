//! The `grayscale` plugin: replaces each pixel's colour by its Rec. 709 luma,
//! `Y = 0.2126 R + 0.7152 G + 0.0722 B` rounded to the nearest integer, and
//! keeps alpha. The math lives in [`imgflow_filters::luma`]; this crate only
//! adapts it to the `imgflow:filter` world.

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

struct Grayscale;

impl Guest for Grayscale {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "grayscale".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Converts to grayscale with Rec. 709 luma (0.2126 R + 0.7152 G + 0.0722 B), keeping alpha.".into(),
            params: Vec::new(),
        }
    }

    fn apply(mut image: Image, _params: Vec<Param>) -> Result<Image, FilterError> {
        let expected = image.width as usize * image.height as usize * 4;
        if image.pixels.len() != expected {
            return Err(FilterError::UnsupportedInput(format!(
                "pixel buffer holds {} bytes, expected {expected}",
                image.pixels.len()
            )));
        }
        imgflow_filters::grayscale_in_place(&mut image.pixels);
        Ok(image)
    }
}

export!(Grayscale);
