//! Test plugin `panicky`: panics.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Panicky;

impl Guest for Panicky {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "panicky".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: panics.".into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let _ = (image, params);
        panic!("the panicky test plugin panicked on purpose")
    }
}

export!(Panicky);
fn params() -> Vec<ParamSpec> {
    Vec::new()
}
