//! Test plugin `hog`: allocates memory without bound.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Hog;

impl Guest for Hog {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "hog".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: allocates memory without bound.".into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let _ = params;
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page so the memory is really used.
            hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
            if hoard.len() == usize::MAX {
                return Ok(image);
            }
        }
    }
}

export!(Hog);
fn params() -> Vec<ParamSpec> {
    Vec::new()
}
