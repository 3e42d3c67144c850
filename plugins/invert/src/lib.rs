//! The `invert` plugin: replaces each colour channel `c` by `255 - c`, keeping
//! alpha. It is not built in: it is the example of a plugin an operator
//! uploads (see the README, "Write a plugin").

wit_bindgen::generate!({ world: "filter", path: "../../wit" });

struct Invert;

impl Guest for Invert {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "invert".into(),
            // IMGFLOW_PLUGIN_VERSION at build time overrides the version, so the
            // tests can build a second version of the same plugin.
            version: option_env!("IMGFLOW_PLUGIN_VERSION")
                .unwrap_or(env!("CARGO_PKG_VERSION"))
                .into(),
            description: "Inverts red, green and blue (255 - c), keeping alpha.".into(),
            params: Vec::new(),
        }
    }

    fn apply(mut image: Image, _params: Vec<Param>) -> Result<Image, FilterError> {
        for px in image.pixels.chunks_exact_mut(4) {
            px[0] = 255 - px[0];
            px[1] = 255 - px[1];
            px[2] = 255 - px[2];
        }
        Ok(image)
    }
}

export!(Invert);
