//! Test plugin `spin`: loops forever.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Spin;

impl Guest for Spin {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "spin".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: loops forever.".into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let _ = params;
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(image.width as u64));
        }
    }
}

export!(Spin);
fn params() -> Vec<ParamSpec> {
    Vec::new()
}
