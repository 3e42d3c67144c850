//! Connection settings shared by both binaries, as clap arguments that also
//! read the environment; each flag's long name is its variable's name in
//! lower case with dashes. The names are the original stack's: `DATABASE_URL`
//! or `PG_HOST`/`PG_PORT`/`PG_USER`/`PG_PASSWORD`/`PG_DBNAME`; `REDIS_URL` or
//! `REDIS_HOST`/`REDIS_PORT`/`REDIS_PASSWORD`; `IMGFLOW_QUEUE`;
//! `STORAGE_URL`. The sandbox's limits are `imgflow_runtime::config`.
//! [`HumanDuration`] reads the durations written like `7d`.

use clap::Args;
use url::Url;

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
    /// The most PostgreSQL connections this process holds (default: 20 for
    /// the API, CONCURRENCY + 4 for a worker); idle ones are closed after
    /// a minute. Size it so every process together stays under the
    /// server's max_connections.
    #[arg(long, env = "DB_POOL_SIZE", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: Option<u32>,
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

/// The sweeper's settings, the same in the API and the worker (both
/// sweep, so it goes on with either alone).
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// How often the sweeper looks for unfinished jobs missing from Redis,
    /// in milliseconds (at least 100).
    #[arg(long, env = "SWEEP_INTERVAL_MS", default_value_t = 10_000)]
    pub sweep_interval_ms: u64,
    /// An unfinished job is re-queued if its queue entry has been missing
    /// for this long, in milliseconds.
    #[arg(long, env = "SWEEP_AFTER_MS", default_value_t = 60_000)]
    pub sweep_after_ms: u64,
}

impl SweepArgs {
    /// How often it sweeps.
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sweep_interval_ms.max(100))
    }

    /// How long an entry must be missing before its job is queued again.
    pub fn after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sweep_after_ms)
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
    #[arg(
        long = "imgflow-queue",
        value_name = "IMGFLOW_QUEUE",
        alias = "queue",
        env = "IMGFLOW_QUEUE",
        default_value = "imgflow"
    )]
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

/// A duration written for humans: `7d`, `90s`, `1h 30m`, `500ms`, or `0`.
/// Used by the settings whose names do not end in `_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub std::time::Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<HumanDuration, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(HumanDuration(std::time::Duration::ZERO));
        }
        humantime::parse_duration(text)
            .map(HumanDuration)
            .map_err(|e| {
                format!("{text:?} is not a duration ({e}); write it like 7d, 12h, 90s or 500ms")
            })
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
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
            db_pool_size: None,
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

    #[test]
    fn reads_human_durations() {
        use std::time::Duration;
        let parse = |t: &str| t.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("soon").unwrap_err().contains("7d"));
        assert_eq!(HumanDuration(Duration::from_secs(120)).to_string(), "2m");
    }
}
