//! Every setting of imgflow's services, in this one file: each is a clap
//! flag that also reads the environment variable of the same name (the
//! flag's long name is the variable in lower case with dashes:
//! `--max-body-bytes` is `MAX_BODY_BYTES`), with its default and what it
//! means. [`ApiSettings`] are host-api's, [`WorkerSettings`] are
//! `host-worker serve`'s; the groups both share ([`DatabaseArgs`],
//! [`RedisArgs`], [`StorageArgs`], [`SandboxArgs`], [`SweepArgs`],
//! [`LogArgs`], [`ThreadArgs`]) are flattened into both, and [`SandboxArgs`] also into the
//! plugin author's `imgflow` command. The names are the original stack's
//! where it had them (`DATABASE_URL` or `PG_*`, `REDIS_URL` or `REDIS_*`).
//!
//! This crate holds data and parsing only (clap, humantime, url): what a
//! setting turns into (a sandbox, a pool, a server) is built by the crate
//! that owns it.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use url::Url;

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// A duration written for humans: `7d`, `90s`, `1h 30m`, `500ms`, or `0`.
/// Used by the settings whose names do not end in `_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<HumanDuration, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(HumanDuration(Duration::ZERO));
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

/// The key that authenticates cache entries (`COMPILE_CACHE_SECRET`): at
/// least 16 bytes of text, shared by the processes that share a cache
/// directory. Never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheSecret(Vec<u8>);

impl CacheSecret {
    /// The shortest secret accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// Whether this is the empty secret (an empty setting), which turns the
    /// disk cache off like no setting at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for CacheSecret {
    type Err = String;

    /// Parses a secret; the empty string is [`CacheSecret::is_empty`].
    fn from_str(text: &str) -> Result<CacheSecret, String> {
        if !text.is_empty() && text.len() < CacheSecret::MIN_LEN {
            return Err(format!(
                "the compiled-code cache secret must be at least {} bytes (for example `openssl rand -hex 32`)",
                CacheSecret::MIN_LEN
            ));
        }
        Ok(CacheSecret(text.as_bytes().to_vec()))
    }
}

impl std::fmt::Debug for CacheSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheSecret(..)")
    }
}

impl CacheSecret {
    /// The secret's bytes (the key of the cache entries' tags).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// How hard PNG output is compressed (`PNG_COMPRESSION`): `fast` (the
/// default) spends a fraction of the time for files a little larger; `best`
/// the smallest files at several times the time (see docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PngCompression {
    /// The fastest zlib level, adaptive filtering.
    #[default]
    Fast,
    /// zlib's default level, adaptive filtering.
    Default,
    /// The smallest files.
    Best,
}

/// How a service writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line (for production and log collectors).
    Json,
    /// Plain text lines (for a terminal).
    Text,
}

/// The logging setting of the service binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: `json` (default) or `text`. `RUST_LOG` sets the level.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

/// The service's async runtime.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ThreadArgs {
    /// Threads of the async runtime (default: one per CPU). On a small
    /// host shared with PostgreSQL and Redis, fewer threads spend less CPU
    /// per small job. The worker's image work runs on `CONCURRENCY`
    /// threads of its own, not on these (README, "Fair share and
    /// priorities").
    #[arg(long, env = "RUNTIME_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub runtime_threads: Option<u16>,
}

// ---------------------------------------------------------------------------
// Groups shared by the services
// ---------------------------------------------------------------------------

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
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(100))
    }

    /// How long an entry must be missing before its job is queued again.
    pub fn after(&self) -> Duration {
        Duration::from_millis(self.sweep_after_ms)
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
    /// How much later than it was submitted a `normal` job is ordered
    /// among its client's jobs than a `high` one (a `low` one: twice as
    /// much): the most a lower priority waits behind a stream of higher
    /// ones of the same client, beyond the run time of those submitted
    /// before it. The same in every API instance and worker.
    #[arg(long, env = "PRIORITY_AGEING_MS", default_value_t = 30_000)]
    pub priority_ageing_ms: u64,
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
    /// How much of each pooled linear memory, in MiB, is restored in place
    /// when a job ends rather than returned to the kernel: the next job on
    /// that slot then takes no page faults there (more resident memory per
    /// slot, faster jobs; 0 returns it all). On Linux 6.7 and later only
    /// the pages the job touched are restored; older kernels zero this
    /// much whole after every job.
    #[arg(long, env = "POOL_KEEP_RESIDENT_MB", default_value_t = 16)]
    pub pool_keep_resident_mb: usize,
    /// Disable wasmtime's pooling allocator (slower instantiation, less
    /// virtual memory reserved up front).
    #[arg(long, env = "NO_POOLING", default_value_t = false)]
    pub no_pooling: bool,
}

impl SandboxArgs {
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
}

// ---------------------------------------------------------------------------
// The API (host-api)
// ---------------------------------------------------------------------------

/// The API's settings (`host-api`).
#[derive(Debug, Clone, Args)]
pub struct ApiSettings {
    /// Address to listen on.
    #[arg(long, env = "API_ADDR", default_value = "0.0.0.0:8080")]
    pub api_addr: SocketAddr,
    /// Where PostgreSQL is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Where Redis is.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Where images and components are kept.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The sandbox that validates uploads, and the image limits.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The operators' bearer token: plugin management, client keys, every
    /// job. At least 32 characters, and not a documented default (the API
    /// refuses to start otherwise). Unset: management is refused (403).
    #[arg(
        long = "imgflow-admin-token",
        value_name = "IMGFLOW_ADMIN_TOKEN",
        alias = "admin-token",
        env = "IMGFLOW_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// The previous admin token, still accepted while clients move to the
    /// new one (a rotation); unset it afterwards.
    #[arg(
        long = "imgflow-admin-token-previous",
        value_name = "IMGFLOW_ADMIN_TOKEN_PREVIOUS",
        env = "IMGFLOW_ADMIN_TOKEN_PREVIOUS",
        hide_env_values = true
    )]
    pub admin_token_previous: Option<String>,
    /// Whether `/v1/jobs` needs a client key or the admin token. `false` is
    /// for local development only: anyone who reaches the API sees every
    /// job (a warning is logged at start).
    #[arg(long, env = "AUTH_REQUIRED", default_value_t = true, action = clap::ArgAction::Set)]
    pub auth_required: bool,
    /// The secret that signs result URLs (at least 32 characters; the same
    /// on every API instance). Unset: result URLs are plain and need
    /// credentials.
    #[arg(long, env = "RESULT_URL_SECRET", hide_env_values = true)]
    pub result_url_secret: Option<String>,
    /// How long a signed result URL stays valid.
    #[arg(long, env = "RESULT_URL_TTL", default_value = "1h")]
    pub result_url_ttl: HumanDuration,
    /// Unfinished jobs one client key may have (429 beyond), so one client
    /// cannot fill the queue.
    #[arg(long, env = "KEY_MAX_UNFINISHED_JOBS", default_value_t = 1000)]
    pub key_max_unfinished_jobs: u32,
    /// Jobs a second one client key may submit, across every API instance
    /// (429 `rate_limited` beyond); 0: no limit. An operator sets a key's
    /// own with `PUT /v1/keys/{id}/limits`. Operators are not limited; with
    /// `AUTH_REQUIRED=false`, the anonymous clients share one rate.
    #[arg(long, env = "KEY_RATE_LIMIT", default_value_t = 0.0, value_parser = rate_value)]
    pub key_rate_limit: f64,
    /// How many jobs a client key may submit at once, above its rate
    /// (its burst); 0: one second's worth of `KEY_RATE_LIMIT`.
    #[arg(long, env = "KEY_RATE_BURST", default_value_t = 0)]
    pub key_rate_burst: u32,
    /// Megapixels of input images one client key may submit a UTC day
    /// (429 `quota_exceeded` beyond, until midnight UTC); 0: no quota. An
    /// operator sets a key's own with `PUT /v1/keys/{id}/limits`.
    #[arg(long, env = "KEY_DAILY_MEGAPIXELS", default_value_t = 0.0, value_parser = quota_value)]
    pub key_daily_megapixels: f64,
    /// Whether a job equal to a completed job of the same client (same
    /// input bytes, plugin digest, parameters and output format) is
    /// completed from that job's result without running. Plugins marked not
    /// cacheable always run.
    #[arg(long, env = "RESULT_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub result_cache: bool,
    /// Signs callback (webhook) deliveries with HMAC-SHA256 (at least 32
    /// characters; the same on every API instance). Unset: jobs with a
    /// `callback_url` are refused.
    #[arg(long, env = "CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,
    /// Let callbacks go to loopback, private and link-local addresses (for
    /// tests and closed networks; never on a network you do not trust).
    #[arg(long, env = "CALLBACK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub callback_allow_private: bool,
    /// How long one delivery attempt may take.
    #[arg(long, env = "CALLBACK_TIMEOUT", default_value = "10s")]
    pub callback_timeout: HumanDuration,
    /// How long after a job finished its delivery is retried.
    #[arg(long, env = "CALLBACK_RETRY_FOR", default_value = "1h")]
    pub callback_retry_for: HumanDuration,
    /// Delivery attempts in flight at once, per API instance.
    #[arg(long, env = "CALLBACK_CONCURRENCY", default_value_t = 16)]
    pub callback_concurrency: u32,
    /// Memory for submitted images, in MiB: a submission reserves its body
    /// (its declared length, if over 64 KiB) before reading it, and its
    /// decoded size (from the header) before decoding it to validate it.
    #[arg(long, env = "API_DECODE_MEMORY_MB", default_value_t = 1024)]
    pub api_decode_memory_mb: u32,
    /// How long a submission waits for room in API_DECODE_MEMORY_MB (for its
    /// body, then for its decode) before it is answered 503 `decode_busy`.
    #[arg(long, env = "API_DECODE_WAIT", default_value = "2s")]
    pub api_decode_wait: HumanDuration,
    /// Finished jobs (rows, inputs, results, idempotency keys) are deleted
    /// this long after they finished; `0` keeps them for ever.
    #[arg(long, env = "JOB_RETENTION", default_value = "7d")]
    pub job_retention: HumanDuration,
    /// How often the retention sweep runs (one API instance at a time).
    #[arg(long, env = "RETENTION_SWEEP_INTERVAL", default_value = "1m")]
    pub retention_sweep_interval: HumanDuration,
    /// Each retention round also deletes job files (inputs, results) that no
    /// job needs, made more than this long ago: left by a process killed
    /// between a job's row and its files, or by storage or PostgreSQL
    /// failing between the two. It must be longer than a submission takes
    /// to record its job after storing its input.
    #[arg(long, env = "ORPHAN_GRACE", default_value = "1h")]
    pub orphan_grace: HumanDuration,
    /// How often the API asks PostgreSQL, Redis and storage whether they
    /// answer (storage with a small write): `api_dependency_up` and the
    /// alert `ImgflowDependencyDown` follow the answers.
    #[arg(long, env = "DEPENDENCY_PROBE_INTERVAL", default_value = "5s")]
    pub dependency_probe_interval: HumanDuration,
    /// HTTP timeouts and limits.
    #[command(flatten)]
    pub http: HttpLimits,
    /// Largest accepted plugin upload, in bytes (413 beyond).
    #[arg(long, env = "PLUGIN_MAX_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub plugin_max_bytes: usize,
    /// How long compiling an uploaded plugin may take, in milliseconds.
    #[arg(long, env = "PLUGIN_COMPILE_TIMEOUT_MS", default_value_t = 60_000)]
    pub plugin_compile_timeout_ms: u64,
    /// Uploads compiled at once; an upload that finds every slot taken is
    /// answered 503 `busy` with `Retry-After`. A slot is returned when its
    /// compile really ends, not when the upload gives up waiting.
    #[arg(long, env = "PLUGIN_COMPILE_SLOTS", default_value_t = 2)]
    pub plugin_compile_slots: u32,
    /// The longest a client may wait for a job in one request (`?wait=` on
    /// submit and read; longer waits are cut to this). Also how long an
    /// event stream (`/v1/jobs/{id}/events`) stays open at most.
    #[arg(long, env = "MAX_WAIT", default_value = "60s")]
    pub max_wait: HumanDuration,
    /// The sweeper (`SWEEP_INTERVAL_MS`, `SWEEP_AFTER_MS`).
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// The most images one batch (`POST /v1/batches`) may carry.
    #[arg(long, env = "MAX_BATCH_IMAGES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch_images: u32,
    /// The most steps one job's pipeline may have (`steps`).
    #[arg(long, env = "MAX_STEPS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_steps: u32,
    /// Submissions are refused (429) while this many jobs are unfinished.
    #[arg(long, env = "QUEUE_MAX_DEPTH", default_value_t = 10_000)]
    pub queue_max_depth: u64,
    /// Event streams and waits one client key may hold open at once on
    /// this instance (429 `too_many_streams` beyond); operators are not
    /// limited.
    #[arg(long, env = "KEY_MAX_STREAMS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub key_max_streams: u32,
    /// The console's sessions and sign-in limits.
    #[command(flatten)]
    pub console: ConsoleSettings,
    /// How logs are written.
    #[command(flatten)]
    pub log: LogArgs,
    /// The async runtime's threads.
    #[command(flatten)]
    pub threads: ThreadArgs,
}
/// The API's HTTP timeouts and limits.
#[derive(Debug, Clone, Args)]
pub struct HttpLimits {
    /// How long a client has to send a request's headers (and, on a
    /// keep-alive connection, to start its next request) before the
    /// connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: HumanDuration,
    /// How long a client has to send a request's body; a body still
    /// arriving after it is answered 408 and the connection closed.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "60s")]
    pub body_read_timeout: HumanDuration,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u32,
    /// After a shutdown signal, how long requests in flight may take before
    /// their connections are dropped.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: HumanDuration,
    /// The most bytes of a request's query string, and of the fields of a
    /// form other than its files, together (414 or 413 beyond).
    #[arg(long, env = "MAX_FIELDS_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_fields_bytes: u32,
    /// Whether clients may speak HTTP/2 without TLS (prior knowledge).
    /// Off, every connection is HTTP/1 and `MAX_CONNECTIONS` bounds the
    /// requests served at once.
    #[arg(long = "http2", env = "HTTP2", default_value_t = false, action = clap::ArgAction::Set)]
    pub http2: bool,
    /// With `HTTP2=true`, the most requests one HTTP/2 connection runs at
    /// once.
    #[arg(long, env = "HTTP2_MAX_STREAMS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub http2_max_streams: u32,
}

/// The console's sessions and sign-in limits.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleSettings {
    /// Whether the session cookie is marked `Secure` (sent only over
    /// HTTPS): set it when the console is reached through a TLS proxy. No
    /// request header decides it.
    #[arg(long, env = "COOKIE_SECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub cookie_secure: bool,
    /// A console session unused for this long ends.
    #[arg(long, env = "CONSOLE_SESSION_IDLE", default_value = "30m")]
    pub console_session_idle: HumanDuration,
    /// A console session ends this long after it started, however much it
    /// is used.
    #[arg(long, env = "CONSOLE_SESSION_LIFETIME", default_value = "12h")]
    pub console_session_lifetime: HumanDuration,
    /// Failed sign-ins from one address (an IPv6 /64) after which it is
    /// refused (429) until its window ends.
    #[arg(long, env = "SIGN_IN_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub sign_in_max_failures: u64,
    /// The window failed sign-ins are counted in, from an address's first
    /// failure.
    #[arg(long, env = "SIGN_IN_FAILURE_WINDOW", default_value = "15m")]
    pub sign_in_failure_window: HumanDuration,
}

/// How sign-ins are limited, and how the cookie is marked.
#[derive(Debug, Clone, Copy)]
pub struct SignInPolicy {
    /// `SIGN_IN_MAX_FAILURES`.
    pub max_failures: u64,
    /// `SIGN_IN_FAILURE_WINDOW`.
    pub failure_window: Duration,
    /// `COOKIE_SECURE`.
    pub cookie_secure: bool,
}

impl ConsoleSettings {
    /// The sign-in policy these settings make.
    pub fn policy(&self) -> SignInPolicy {
        SignInPolicy {
            max_failures: self.sign_in_max_failures,
            failure_window: self.sign_in_failure_window.0.max(Duration::from_secs(1)),
            cookie_secure: self.cookie_secure,
        }
    }
}

// ---------------------------------------------------------------------------
// The worker (host-worker serve)
// ---------------------------------------------------------------------------

/// The worker's settings (`host-worker serve`).
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Where PostgreSQL is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Where Redis is.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Where images and components are kept.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// The sandbox's limits.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Directory of the built-in plugins (*.wasm), registered at start.
    #[arg(long, env = "PLUGINS_DIR", default_value = "target/builtin-plugins")]
    pub plugins_dir: PathBuf,
    /// Address of the worker's metrics and health endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_addr: SocketAddr,
    /// Jobs doing image work (decoding, plugin calls, encoding) at once in
    /// this worker; up to four times as many are started at once (reading
    /// their input, storing their result, being recorded meanwhile).
    /// Default: the number of CPUs.
    #[arg(long, env = "CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Memory the worker's jobs may hold together, in MiB: a job starts
    /// only when its estimated working set fits. Default: three quarters of
    /// the cgroup's memory limit, or of the machine's memory.
    #[arg(long, env = "WORKER_MEMORY_MB")]
    pub worker_memory_mb: Option<u32>,
    /// A job whose worker has not renewed it for this long is taken over
    /// by another worker, in milliseconds.
    #[arg(long, env = "LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// A job delivered more than this many times fails as `max_attempts`.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// The sweeper (`SWEEP_INTERVAL_MS`, `SWEEP_AFTER_MS`).
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// On SIGTERM, how long in-flight jobs may take to finish, in
    /// milliseconds; unfinished ones are left for other workers.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,
    /// How often the worker reconciles its loaded plugins with PostgreSQL,
    /// in milliseconds (uploads are also announced on Redis pub/sub, which
    /// is faster; this catches a missed notice).
    #[arg(long, env = "PLUGIN_RECONCILE_MS", default_value_t = 10_000)]
    pub plugin_reconcile_ms: u64,
    /// This worker's name in Redis and in job records. Default: host name,
    /// process id and a random suffix.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// How logs are written.
    #[command(flatten)]
    pub log: LogArgs,
    /// The async runtime's threads.
    #[command(flatten)]
    pub threads: ThreadArgs,
}

/// A rate of jobs a second: 0 (no limit), or from [`MIN_RATE`] to
/// [`MAX_RATE`].
pub fn rate_value(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if rate == 0.0 || (rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate)) {
        Ok(rate)
    } else {
        Err(format!(
            "{text:?}: a rate is 0 (no limit) or from {MIN_RATE} to {MAX_RATE} jobs a second"
        ))
    }
}

/// The smallest rate of jobs a second a key may be given (one job in
/// 1,000 s), other than 0.
pub const MIN_RATE: f64 = 0.001;

/// A daily quota of megapixels: a finite number from 0 to 10^12.
pub fn quota_value(text: &str) -> Result<f64, String> {
    let quota: f64 = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if quota.is_finite() && (0.0..=MAX_DAILY_MEGAPIXELS).contains(&quota) {
        Ok(quota)
    } else {
        Err(format!(
            "{text:?}: a daily quota is from 0 to {MAX_DAILY_MEGAPIXELS} megapixels"
        ))
    }
}

/// The largest daily quota of megapixels a key may be given.
pub const MAX_DAILY_MEGAPIXELS: f64 = 1e12;

/// The largest rate of jobs a second a key may be given (a limit that
/// high is none).
pub const MAX_RATE: f64 = 1_000_000.0;

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
            priority_ageing_ms: 30_000,
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
        let parse = |t: &str| t.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("soon").unwrap_err().contains("7d"));
        assert_eq!(HumanDuration(Duration::from_secs(120)).to_string(), "2m");
    }
}
