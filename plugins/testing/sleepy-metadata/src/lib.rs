//! Test plugin `sleepy-metadata`: sleeps for an hour in `metadata()`, so
//! loading it (an upload, a worker's start) never finishes on its own.
//! It misbehaves on purpose so the host's sandbox can be tested; never deploy it.

wit_bindgen::generate!({ world: "filter", path: "../../../wit" });

struct SleepyMetadata;

impl Guest for SleepyMetadata {
    fn metadata() -> PluginMetadata {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        PluginMetadata {
            name: "sleepy-metadata".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Test plugin: sleeps for an hour in metadata().".into(),
            params: Vec::new(),
        }
    }

    fn apply(image: Image, _params: Vec<Param>) -> Result<Image, FilterError> {
        Ok(image)
    }
}

export!(SleepyMetadata);
