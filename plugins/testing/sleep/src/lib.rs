//! Test plugin `sleep`: sleeps for an hour in `apply`. The sleep is a WASI
//! clock subscription and a `poll`, a host call that blocks without running
//! any WebAssembly, so only a deadline around the whole call can stop it.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

struct Sleep;

impl Guest for Sleep {
    fn metadata() -> PluginMetadata {
        PluginMetadata {
            name: "sleep".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: sleeps for an hour in apply.".into(),
            params: Vec::new(),
        }
    }

    fn apply(image: Image, _params: Vec<Param>) -> Result<Image, FilterError> {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Ok(image)
    }
}

export!(Sleep);
