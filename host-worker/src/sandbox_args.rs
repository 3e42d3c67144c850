//! The sandbox and image limits, as command-line flags and environment
//! variables shared by every subcommand that runs plugins.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use imgflow_core::codec::ImageLimits;
use imgflow_core::runtime::RuntimeConfig;

/// Limits applied to every plugin call and every image.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Wall-clock limit of one plugin call, in milliseconds.
    #[arg(long, env = "JOB_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Linear-memory limit of one plugin call, in MiB.
    #[arg(long, env = "JOB_MAX_MEMORY_MB", default_value_t = 512)]
    pub max_memory_mb: usize,
    /// Largest accepted image width or height, in pixels (inputs and outputs).
    #[arg(long, env = "MAX_IMAGE_SIDE", default_value_t = 16_384)]
    pub max_image_side: u32,
    /// Largest accepted image area, in pixels (inputs and outputs).
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 64 * 1024 * 1024)]
    pub max_image_pixels: u64,
    /// Directory for compiled plugins, so restarts do not recompile.
    /// Unset: no cache.
    #[arg(long, env = "COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,
    /// Disable wasmtime's pooling allocator (slower instantiation, less
    /// virtual memory reserved up front).
    #[arg(long, env = "NO_POOLING", default_value_t = false)]
    pub no_pooling: bool,
}

impl SandboxArgs {
    /// The image limits.
    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_side: self.max_image_side,
            max_pixels: self.max_image_pixels,
        }
    }

    /// The runtime configuration for `max_concurrent_jobs` parallel calls.
    pub fn runtime_config(&self, max_concurrent_jobs: u32) -> RuntimeConfig {
        RuntimeConfig {
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            max_memory_bytes: self.max_memory_mb.max(1).saturating_mul(1024 * 1024),
            pooling: !self.no_pooling,
            max_concurrent_jobs,
            cache_dir: self.compile_cache_dir.clone(),
            image_limits: self.image_limits(),
            ..RuntimeConfig::default()
        }
    }
}
