//! The sandbox's settings, as clap arguments that also read the
//! environment: each flag's long name is its environment variable in
//! lower case with dashes (`--job-timeout-ms` is `JOB_TIMEOUT_MS`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cache::CacheSecret;
use crate::codec::{ImageLimits, PngCompression};
use crate::runtime::RuntimeConfig;

/// Limits applied to every plugin call and every image.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Wall-clock limit of one plugin call, in milliseconds.
    #[arg(
        long = "job-timeout-ms",
        value_name = "JOB_TIMEOUT_MS",
        alias = "timeout-ms",
        env = "JOB_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,
    /// Linear-memory limit of one plugin call, in MiB.
    #[arg(
        long = "job-max-memory-mb",
        value_name = "JOB_MAX_MEMORY_MB",
        alias = "max-memory-mb",
        env = "JOB_MAX_MEMORY_MB",
        default_value_t = 512
    )]
    pub max_memory_mb: usize,
    /// Largest accepted image width or height, in pixels (inputs and outputs).
    #[arg(long, env = "MAX_IMAGE_SIDE", default_value_t = 16_384)]
    pub max_image_side: u32,
    /// Largest accepted image area, in pixels (inputs and outputs).
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 64 * 1024 * 1024)]
    pub max_image_pixels: u64,
    /// Directory for compiled plugins, so restarts do not recompile.
    /// Default: `$XDG_CACHE_HOME/imgflow/compiled` or
    /// `~/.cache/imgflow/compiled`; `off` disables the cache.
    #[arg(long, env = "COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,
    /// Key that authenticates compiled-code cache entries (at least 16
    /// bytes; processes sharing a cache directory need the same one).
    /// Without it (or empty), compiled plugins are not cached on disk.
    #[arg(long, env = "COMPILE_CACHE_SECRET", hide_env_values = true)]
    pub compile_cache_secret: Option<CacheSecret>,
    /// Most the compiled-code cache directory may hold, in MiB; beyond it
    /// the least recently used entries are deleted.
    #[arg(long, env = "COMPILE_CACHE_MAX_MB", default_value_t = 1024)]
    pub compile_cache_max_mb: u64,
    /// How hard PNG results are compressed: fast, default or best.
    #[arg(long, env = "PNG_COMPRESSION", value_enum, default_value_t = PngCompression::Fast)]
    pub png_compression: PngCompression,
    /// How much of each pooled linear memory, in MiB, is zeroed in place
    /// when a job ends rather than returned to the kernel: the next job on
    /// that slot then takes no page faults there (more resident memory per
    /// slot, faster jobs; 0 returns it all).
    #[arg(long, env = "POOL_KEEP_RESIDENT_MB", default_value_t = 16)]
    pub pool_keep_resident_mb: usize,
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

    /// The compiled-code cache directory, if any: the flag, else the user's
    /// cache directory; `off` (or empty) disables it.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        match &self.compile_cache_dir {
            Some(dir) if dir.as_os_str().is_empty() || dir.as_os_str() == "off" => None,
            Some(dir) => Some(dir.clone()),
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|h| !h.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                })
                .map(|base| base.join("imgflow").join("compiled")),
        }
    }

    /// The runtime configuration for `max_concurrent_jobs` parallel calls.
    pub fn runtime_config(&self, max_concurrent_jobs: u32) -> RuntimeConfig {
        RuntimeConfig {
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            max_memory_bytes: self.max_memory_mb.max(1).saturating_mul(1024 * 1024),
            pooling: !self.no_pooling,
            max_concurrent_jobs,
            cache_dir: self.cache_dir(),
            cache_secret: self.compile_cache_secret.clone(),
            cache_max_bytes: self.compile_cache_max_mb.saturating_mul(1024 * 1024),
            image_limits: self.image_limits(),
            keep_resident_bytes: self.pool_keep_resident_mb.saturating_mul(1024 * 1024),
            ..RuntimeConfig::default()
        }
    }
}
