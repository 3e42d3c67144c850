//! Connection settings shared by both binaries, as clap arguments that also
//! read the environment. The names are the original stack's: `DATABASE_URL`
//! or `PG_HOST`/`PG_PORT`/`PG_USER`/`PG_PASSWORD`/`PG_DBNAME`; `REDIS_URL` or
//! `REDIS_HOST`/`REDIS_PORT`/`REDIS_PASSWORD`; `IMGFLOW_QUEUE`;
//! `STORAGE_URL`; and the sandbox limits (`JOB_TIMEOUT_MS`, ...).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use url::Url;

use crate::codec::ImageLimits;
use crate::runtime::RuntimeConfig;

/// Where PostgreSQL is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Full PostgreSQL URL; when unset it is built from the PG_* settings.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL host (used when DATABASE_URL is unset).
    #[arg(long, env = "PG_HOST", default_value = "127.0.0.1")]
    pub pg_host: String,
    /// PostgreSQL port.
    #[arg(long, env = "PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,
    /// PostgreSQL user.
    #[arg(long, env = "PG_USER", default_value = "postgres")]
    pub pg_user: String,
    /// PostgreSQL password (none by default).
    #[arg(long, env = "PG_PASSWORD", hide_env_values = true)]
    pub pg_password: Option<String>,
    /// PostgreSQL database name.
    #[arg(long, env = "PG_DBNAME", default_value = "imgflow")]
    pub pg_dbname: String,
}

impl DatabaseArgs {
    /// The connection URL.
    pub fn url(&self) -> String {
        if let Some(url) = &self.database_url {
            return url.clone();
        }
        build_url(
            "postgres",
            &self.pg_host,
            self.pg_port,
            Some(&self.pg_user),
            self.pg_password.as_deref(),
            &self.pg_dbname,
        )
    }
}

/// Where Redis is, and which keys are ours.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Full Redis URL; when unset it is built from the REDIS_* settings.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis host (used when REDIS_URL is unset).
    #[arg(long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    pub redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    /// Redis password (none by default).
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Prefix of every Redis key, so several deployments (or tests) can
    /// share one Redis.
    #[arg(long, env = "IMGFLOW_QUEUE", default_value = "imgflow")]
    pub queue: String,
}

impl RedisArgs {
    /// The connection URL.
    pub fn url(&self) -> String {
        if let Some(url) = &self.redis_url {
            return url.clone();
        }
        build_url(
            "redis",
            &self.redis_host,
            self.redis_port,
            None,
            self.redis_password.as_deref(),
            "0",
        )
    }
}

/// Where images and plugin components are kept.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// A local directory (`./storage`, `/var/lib/imgflow`, `file:///...`) or
    /// an S3-compatible bucket (`s3://bucket/prefix`, configured by the usual
    /// `AWS_*` variables such as `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`). Every API and worker process
    /// must see the same storage.
    #[arg(long, env = "STORAGE_URL", default_value = "./storage")]
    pub storage_url: String,
}

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
    /// Default: `$XDG_CACHE_HOME/imgflow/compiled` or
    /// `~/.cache/imgflow/compiled`; `off` disables the cache.
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
            image_limits: self.image_limits(),
            ..RuntimeConfig::default()
        }
    }
}

fn build_url(
    scheme: &str,
    host: &str,
    port: u16,
    user: Option<&str>,
    password: Option<&str>,
    path: &str,
) -> String {
    let fallback = format!("{scheme}://{host}:{port}/{path}");
    let Ok(mut url) = Url::parse(&fallback) else {
        return fallback;
    };
    if let Some(user) = user {
        let _ = url.set_username(user);
    }
    if let Some(password) = password.filter(|p| !p.is_empty()) {
        // `set_password` percent-encodes, so any character is safe.
        let _ = url.set_password(Some(password));
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls_from_parts_and_escapes_passwords() {
        let db = DatabaseArgs {
            database_url: None,
            pg_host: "db".into(),
            pg_port: 5433,
            pg_user: "app".into(),
            pg_password: Some("p@ss/word".into()),
            pg_dbname: "imgflow".into(),
        };
        assert_eq!(db.url(), "postgres://app:p%40ss%2Fword@db:5433/imgflow");
        let redis = RedisArgs {
            redis_url: None,
            redis_host: "cache".into(),
            redis_port: 6380,
            redis_password: None,
            queue: "imgflow".into(),
        };
        assert_eq!(redis.url(), "redis://cache:6380/0");
        let explicit = DatabaseArgs {
            database_url: Some("postgres://x/y".into()),
            ..db
        };
        assert_eq!(explicit.url(), "postgres://x/y");
    }
}
