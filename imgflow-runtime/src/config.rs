//! What the sandbox's settings make: [`SandboxArgs`] (the flags, defined
//! with every other setting in `imgflow-settings`) turned into the
//! runtime's configuration and the image limits.

use std::time::Duration;

pub use imgflow_settings::SandboxArgs;

use crate::codec::ImageLimits;
use crate::runtime::RuntimeConfig;

impl From<&SandboxArgs> for ImageLimits {
    fn from(args: &SandboxArgs) -> ImageLimits {
        ImageLimits {
            max_side: args.max_image_side,
            max_pixels: args.max_image_pixels,
        }
    }
}

impl RuntimeConfig {
    /// The runtime configuration these settings make, for
    /// `max_concurrent_jobs` parallel calls.
    pub fn for_sandbox(args: &SandboxArgs, max_concurrent_jobs: u32) -> RuntimeConfig {
        RuntimeConfig {
            timeout: Duration::from_millis(args.timeout_ms.max(1)),
            max_memory_bytes: args.max_memory_mb.max(1).saturating_mul(1024 * 1024),
            pooling: !args.no_pooling,
            max_concurrent_jobs,
            cache_dir: args.cache_dir(),
            cache_secret: args.compile_cache_secret.clone(),
            cache_max_bytes: args.compile_cache_max_mb.saturating_mul(1024 * 1024),
            image_limits: ImageLimits::from(args),
            keep_resident_bytes: args.pool_keep_resident_mb.saturating_mul(1024 * 1024),
            ..RuntimeConfig::default()
        }
    }
}
