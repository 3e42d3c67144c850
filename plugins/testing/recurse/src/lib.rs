//! Test plugin `recurse`: recurses without bound.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

#[allow(unused_imports)]
use imgflow::filter::types::{Constraint, ParamKind, ParamSpec, ParamValue};

struct Recurse;

impl Guest for Recurse {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "recurse".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: recurses without bound.".into(),
            params: params(),
        }
    }

    fn apply(image: Image, params: Vec<Param>) -> Result<Image, FilterError> {
        let _ = params;
        let depth = deeper(std::hint::black_box(u64::from(image.width)));
        Err(FilterError::Failed(format!("returned from depth {depth}")))
    }
}

export!(Recurse);

fn params() -> Vec<ParamSpec> {
    Vec::new()
}

/// Calls itself until the stack runs out (the base case is unreachable).
#[inline(never)]
fn deeper(n: u64) -> u64 {
    if n == u64::MAX {
        return n;
    }
    deeper(std::hint::black_box(n + 1)).wrapping_add(n)
}
