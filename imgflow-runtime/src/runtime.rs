//! The sandboxed plugin runtime.
//!
//! One [`Runtime`] per process holds the wasmtime [`Engine`] (component
//! model, pooling allocator, epoch interruption) and the WASI linker. Each
//! plugin is compiled once (or loaded from the on-disk [`cache`]) and kept as
//! a [`Plugin`], ready to instantiate. Each call gets a fresh store with its
//! own limits, so nothing leaks from one job to the next:
//!
//! - wall-clock time, enforced by epoch interruption (a background thread
//!   ticks the engine every [`EPOCH_TICK`]);
//! - linear memory and table sizes, and the number of instances, enforced by
//!   a resource limiter;
//! - the output image, checked for dimensions and buffer length.
//!
//! Each violation ends the call with its own [`RunError`].
//!
//! [`cache`]: crate::cache

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbaImage;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    WasmBacktrace,
};

use crate::cache::{sha256_hex, CacheSecret, CompiledCache};
use crate::codec::ImageLimits;
use crate::error::{LoadError, RunError, RuntimeError};
use crate::metadata::{self, Constraint, ParamKind, ParamSpec, ParamValue, PluginMetadata};
use crate::params::{self, Params};
use crate::sandbox::{Limits, Sandbox};

mod bindings {
    wasmtime::component::bindgen!({
        world: "filter",
        path: "../wit",
        exports: { default: async },
    });
}

use bindings::imgflow::filter::types as wit;

/// The name of the types-only interface plugins import.
const TYPES_INTERFACE: &str = "imgflow:filter/types@0.1.0";

/// The first 8 bytes of a binary WebAssembly component: magic, version 0x0d,
/// layer 1.
const COMPONENT_HEADER: &[u8] = b"\0asm\x0d\0\x01\0";
/// The first 8 bytes of a binary core WebAssembly module (version 1).
const CORE_MODULE_HEADER: &[u8] = b"\0asm\x01\0\0\0";

/// How often the engine's epoch advances; timeouts are accurate to this.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How much of each of a pooled instance's tables is reset in place after
/// a job rather than unmapped (a plugin's function table is a few hundred
/// entries of 8 bytes; unmapping and faulting it in again was a third of a
/// small job's sandbox overhead).
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// The limits and settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Wall-clock limit of one plugin call (default 10 s).
    pub timeout: Duration,
    /// Linear-memory limit of one job, in bytes (default 512 MiB).
    pub max_memory_bytes: usize,
    /// Largest table a plugin may grow (default 100 000 elements).
    pub max_table_elements: usize,
    /// Most instances, tables and memories one job may create (default 32).
    pub max_instances: usize,
    /// Use wasmtime's pooling allocator (default on): memory and instance
    /// slots are reserved up front, which makes instantiation much cheaper.
    pub pooling: bool,
    /// How many jobs may run at once in this process; sizes the pool
    /// (default 16).
    pub max_concurrent_jobs: u32,
    /// Where compiled plugins are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// The key that authenticates cache entries; `None` (or an empty
    /// secret) disables the cache (compiled code is trusted only if this
    /// process can prove it wrote it).
    pub cache_secret: Option<CacheSecret>,
    /// Most the cache directory may hold, in bytes (default 1 GiB).
    pub cache_max_bytes: u64,
    /// How much of a plugin's stdout and stderr is kept for the logs, per
    /// stream and call (default 64 KiB).
    pub output_cap_bytes: usize,
    /// Limits on the plugin's output image (the same as on inputs).
    pub image_limits: ImageLimits,
    /// With pooling: how much of each linear memory is zeroed in place
    /// (kept resident) when a job ends, instead of being returned to the
    /// kernel, so the next job on that slot takes no page faults there
    /// (default 16 MiB; see docs/BENCHMARKS.md).
    pub keep_resident_bytes: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            timeout: Duration::from_secs(10),
            max_memory_bytes: 512 * 1024 * 1024,
            max_table_elements: 100_000,
            max_instances: 32,
            pooling: true,
            max_concurrent_jobs: 16,
            cache_dir: None,
            cache_secret: None,
            cache_max_bytes: 1024 * 1024 * 1024,
            output_cap_bytes: 64 * 1024,
            image_limits: ImageLimits::default(),
            keep_resident_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A compiled plugin, ready to instantiate for each job.
pub struct Plugin {
    digest: String,
    size: usize,
    metadata: PluginMetadata,
    pre: bindings::FilterPre<Sandbox>,
}

impl Plugin {
    /// The SHA-256 of the component, as hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The component's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What the plugin said about itself at load time.
    pub fn metadata(&self) -> &PluginMetadata {
        &self.metadata
    }

    /// Validates JSON parameters against the plugin's schema.
    pub fn params_from_json(
        &self,
        given: &serde_json::Value,
    ) -> Result<Params, params::ParamError> {
        params::from_json(&self.metadata.name, &self.metadata.params, given)
    }

    /// Validates `name=value` parameters against the plugin's schema.
    pub fn params_from_pairs<'a>(
        &self,
        given: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Params, params::ParamError> {
        params::from_pairs(&self.metadata.name, &self.metadata.params, given)
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.metadata.name)
            .field("version", &self.metadata.version)
            .field("digest", &self.digest)
            .finish()
    }
}

/// A compiled and linked plugin whose `metadata()` has not been read yet
/// ([`Runtime::compile`]); [`Runtime::describe`] makes it a [`Plugin`].
pub struct Compiled {
    digest: String,
    size: usize,
    pre: bindings::FilterPre<Sandbox>,
}

impl Compiled {
    /// The SHA-256 of the component, as hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// What bounds one plugin call ([`Runtime::apply_by`]).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// When the call is abandoned.
    pub deadline: Instant,
    /// The time limit the deadline stands for, as a timeout reports it.
    pub limit: Duration,
    /// The linear memory the call's sandbox may hold (at most the
    /// runtime's `max_memory_bytes`: a smaller one is a plugin's own
    /// limit).
    pub max_memory_bytes: usize,
}

/// The result of a successful call, with where the time went.
#[derive(Debug)]
pub struct Applied {
    /// The plugin's output.
    pub image: RgbaImage,
    /// Time to create the store and instantiate the plugin.
    pub instantiate_time: Duration,
    /// Time in the plugin's `apply`, including moving pixels in and out.
    pub run_time: Duration,
}

/// The process-wide plugin runtime. Cheap to share behind an `Arc`; every
/// method takes `&self` and may be called from many threads at once.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Sandbox>,
    config: RuntimeConfig,
    cache: Option<CompiledCache>,
    ticker: EpochTicker,
}

impl Runtime {
    /// Builds the engine, the WASI linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(1024 * 1024)
            // Calls run on their own stack (a fiber), so a call can be
            // abandoned wherever it is, even blocked in a host call.
            .async_stack_size(2 * 1024 * 1024);
        if config.pooling {
            let n = config.max_concurrent_jobs.max(1);
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(32))
                .max_core_instances_per_component(32)
                .total_memories(n.saturating_mul(2))
                .max_memories_per_component(2)
                .total_tables(n.saturating_mul(8))
                .max_tables_per_component(8)
                .table_elements(config.max_table_elements)
                .max_memory_size(config.max_memory_bytes)
                .linear_memory_keep_resident(config.keep_resident_bytes)
                // A slot is reset for the next job by restoring only the
                // pages this job touched (found with Linux's PAGEMAP_SCAN
                // ioctl, 6.7 and later; older kernels zero the first
                // keep-resident bytes whole), and its tables' first pages
                // in place instead of unmapping them: the 1x1 job's
                // overhead fell from 32 to 7 µs (docs/BENCHMARKS.md).
                .pagemap_scan(Enabled::Auto)
                .table_keep_resident(TABLE_KEEP_RESIDENT)
                .total_stacks(n);
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&wasm).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        // The contract's types-only interface has nothing to link, but a
        // plugin that uses its types imports it, so it must exist.
        linker
            .instance(TYPES_INTERFACE)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;

        // The cache only saves time: a directory that cannot be created is
        // reported, and the runtime works without it. Its entries are native
        // code, used only if authenticated with the secret: no secret, no
        // disk cache.
        let cache = match (&config.cache_dir, &config.cache_secret) {
            (Some(dir), Some(secret)) if !secret.is_empty() => match std::fs::create_dir_all(dir) {
                Ok(()) => Some(CompiledCache::new(
                    dir.clone(),
                    &engine,
                    secret,
                    config.cache_max_bytes,
                )),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot create the compiled-code cache directory; compiling without a cache");
                    None
                }
            },
            (Some(dir), _) => {
                tracing::info!(dir = %dir.display(), "no COMPILE_CACHE_SECRET: compiled plugins are not cached on disk (set one to reuse them across restarts)");
                None
            }
            (None, _) => None,
        };
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Runtime {
            engine,
            linker,
            config,
            cache,
            ticker,
        })
    }

    /// The runtime's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// An upper estimate of the memory the host holds for one job of
    /// `steps` plugin calls (a pipeline; at least one) on an image whose
    /// file is `input_len` bytes and decodes to `width` x `height`, in
    /// bytes: the file, plus the larger of the two peaks —
    ///
    /// - decoding: `decode_bytes`, what decoding the file holds at once
    ///   ([`crate::codec::DecodeCost::decode_bytes`]: the decoder's own
    ///   buffers for the frame it decodes, and the 8-bit RGBA copies);
    /// - a plugin call: its input, the plugin's memories (at most the memory
    ///   cap, summed over all of them) and the copy of its output (which
    ///   came out of those memories, so at most the cap too). The first
    ///   step's input is the decoded image; a later step's is the previous
    ///   step's output, so at most the cap: however a step enlarges the
    ///   image (a resize to the largest size allowed), the estimate holds.
    ///
    /// Encoding holds the output and its encoding, less than a call's peak.
    /// The caller reserves this much from its memory budget.
    pub fn job_working_set(
        &self,
        input_len: usize,
        decode_bytes: u64,
        (width, height): (u32, u32),
        steps: usize,
    ) -> u64 {
        let decoded = u64::from(width) * u64::from(height) * 4;
        let cap = self.config.max_memory_bytes as u64;
        let largest_input = if steps > 1 { decoded.max(cap) } else { decoded };
        let calling = largest_input + 2 * cap;
        input_len as u64 + decode_bytes.max(calling)
    }

    /// How many compiled-code cache entries this process evicted to keep
    /// the cache within its size cap.
    pub fn cache_evictions(&self) -> u64 {
        self.cache.as_ref().map_or(0, CompiledCache::evicted)
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads a plugin from a file; see [`Runtime::load`].
    pub async fn load_file(&self, path: &Path) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load(&bytes).await
    }

    /// Checks, compiles (or loads from the cache), links and describes a
    /// plugin: [`Runtime::compile`], then [`Runtime::describe`]. The compile
    /// runs on the calling thread: from async code with a large component,
    /// run [`Runtime::compile`] on a blocking thread first.
    pub async fn load(&self, wasm: &[u8]) -> Result<Plugin, LoadError> {
        let compiled = self.compile(wasm)?;
        self.describe(compiled).await
    }

    /// Checks and compiles (or loads from the cache) and links a plugin:
    /// the bytes must be a component that exports the `imgflow:filter`
    /// world and imports nothing beyond WASI preview 2. CPU-bound and
    /// blocking.
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, LoadError> {
        if !wasm.starts_with(COMPONENT_HEADER) {
            let what = if wasm.starts_with(CORE_MODULE_HEADER) {
                "this is a core WebAssembly module; build it as a component (cargo component build, or cargo build --target wasm32-wasip2)"
            } else {
                "the bytes do not start with the WebAssembly component header"
            };
            return Err(LoadError::NotAComponent(what.into()));
        }
        let digest = sha256_hex(wasm);
        let component = self.compile_component(wasm, &digest)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::ForbiddenImport(format!("{e:#}")))?;
        let pre = bindings::FilterPre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(Compiled {
            digest,
            size: wasm.len(),
            pre,
        })
    }

    /// Calls the compiled plugin's `metadata()` in a fresh sandbox, under
    /// the same time and memory limits as a job, and checks what it says
    /// (a safe name, a semantic version, valid parameters). A `metadata()`
    /// that does not return in time, even blocked in a host call, is
    /// abandoned and fails as a timeout.
    pub async fn describe(&self, compiled: Compiled) -> Result<Plugin, LoadError> {
        let Compiled { digest, size, pre } = compiled;
        let mut store = self.new_store(self.config.max_memory_bytes);
        let call = async {
            let filter = pre.instantiate_async(&mut store).await?;
            filter.call_metadata(&mut store).await
        };
        let result = tokio::time::timeout(self.config.timeout, call).await;
        let stderr = drain_output(&store, "(loading)");
        let raw = match result {
            Err(_) => {
                return Err(LoadError::Metadata(RunError::Timeout {
                    limit: self.config.timeout,
                }))
            }
            Ok(result) => {
                result.map_err(|e| LoadError::Metadata(self.classify(&store, e, &stderr)))?
            }
        };
        let metadata = validate_metadata(raw)?;
        Ok(Plugin {
            digest,
            size,
            metadata,
            pre,
        })
    }

    fn compile_component(&self, wasm: &[u8], digest: &str) -> Result<Component, LoadError> {
        if let Some(component) = self
            .cache
            .as_ref()
            .and_then(|c| c.load(&self.engine, digest))
        {
            tracing::debug!(digest, "loaded compiled plugin from cache");
            return Ok(component);
        }
        let started = Instant::now();
        let component =
            Component::new(&self.engine, wasm).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        tracing::info!(
            digest,
            ms = started.elapsed().as_millis() as u64,
            "compiled plugin"
        );
        if let Some(cache) = &self.cache {
            cache.store(digest, &component);
        }
        Ok(component)
    }

    /// A store for one call whose memories may hold `max_memory_bytes`.
    fn new_store(&self, max_memory_bytes: usize) -> Store<Sandbox> {
        let limits = Limits {
            max_memory_bytes,
            max_table_elements: self.config.max_table_elements,
            max_instances: self.config.max_instances,
        };
        let mut store = Store::new(
            &self.engine,
            Sandbox::new(limits, self.config.output_cap_bytes),
        );
        store.limiter(|s| &mut s.limiter);
        // What the host copies out of the guest in one call (the output
        // image, at most) is bounded by wasmtime's hostcall fuel, 128 MiB by
        // default: less than the largest image the limits allow (64
        // megapixels are 256 MiB of RGBA), which then failed as a trap.
        // Whatever is copied out lives in the guest's memories, already
        // capped at the memory limit, so that is the bound.
        store.set_hostcall_fuel(self.config.max_memory_bytes.max(128 << 20));
        // Running code yields to the executor at every epoch tick, so the
        // deadline around the call (a timer) can end it; the call's future
        // is then dropped with the store.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    /// Runs `plugin` on `image` with already validated `params`, in a fresh
    /// sandbox, within the time limit: a call still running at the
    /// deadline, whether computing or blocked in a host call, is abandoned
    /// (its store and instance dropped) and fails as [`RunError::Timeout`].
    pub async fn apply(
        &self,
        plugin: &Plugin,
        image: RgbaImage,
        params: &Params,
    ) -> Result<Applied, RunError> {
        self.apply_observed(plugin, image, params, |_| {}).await
    }

    /// [`Runtime::apply`], calling `on_instantiated` with the time the
    /// sandbox took to instantiate the plugin as soon as it is known, so the
    /// caller can measure it even when the call then fails.
    pub async fn apply_observed(
        &self,
        plugin: &Plugin,
        image: RgbaImage,
        params: &Params,
        on_instantiated: impl FnOnce(Duration),
    ) -> Result<Applied, RunError> {
        let bounds = Bounds {
            deadline: Instant::now() + self.config.timeout,
            limit: self.config.timeout,
            max_memory_bytes: self.config.max_memory_bytes,
        };
        self.apply_by(plugin, image, params, bounds, on_instantiated)
            .await
    }

    /// [`Runtime::apply_observed`] within `bounds` rather than the
    /// runtime's own limits from now: a caller whose time limit covers more
    /// than the plugin call (the worker's covers decoding and encoding too)
    /// passes the job's deadline, and a call past it fails as
    /// [`RunError::Timeout`] with `bounds.limit`; a plugin with a smaller
    /// memory limit of its own passes it, and a call over it fails as
    /// [`RunError::OutOfMemory`] with it.
    pub async fn apply_by(
        &self,
        plugin: &Plugin,
        image: RgbaImage,
        params: &Params,
        bounds: Bounds,
        on_instantiated: impl FnOnce(Duration),
    ) -> Result<Applied, RunError> {
        let memory = bounds.max_memory_bytes.min(self.config.max_memory_bytes);
        let call = self.call_apply(plugin, image, params, memory, on_instantiated);
        match tokio::time::timeout_at(bounds.deadline.into(), call).await {
            Ok(result) => result,
            Err(_) => Err(RunError::Timeout {
                limit: bounds.limit,
            }),
        }
    }

    async fn call_apply(
        &self,
        plugin: &Plugin,
        image: RgbaImage,
        params: &Params,
        max_memory_bytes: usize,
        on_instantiated: impl FnOnce(Duration),
    ) -> Result<Applied, RunError> {
        let (width, height) = image.dimensions();
        let input = wit::Image {
            width,
            height,
            pixels: image.into_raw(),
        };
        let wit_params: Vec<wit::Param> = params
            .iter()
            .map(|(name, value)| wit::Param {
                name: name.to_string(),
                value: to_wit_value(value),
            })
            .collect();

        let started = Instant::now();
        let mut store = self.new_store(max_memory_bytes);
        let instance = plugin.pre.instantiate_async(&mut store).await;
        let instantiate_time = started.elapsed();
        on_instantiated(instantiate_time);
        let filter = match instance {
            Ok(filter) => filter,
            Err(e) => {
                let stderr = drain_output(&store, &plugin.metadata.name);
                return Err(match self.classify(&store, e, &stderr) {
                    RunError::Trap { message } => {
                        RunError::Internal(format!("cannot instantiate the plugin: {message}"))
                    }
                    other => other,
                });
            }
        };
        let started = Instant::now();
        let result = filter.call_apply(&mut store, &input, &wit_params).await;
        let run_time = started.elapsed();
        let stderr = drain_output(&store, &plugin.metadata.name);
        let output = match result {
            Ok(Ok(output)) => output,
            Ok(Err(wit::FilterError::InvalidParams(m))) => return Err(RunError::InvalidParams(m)),
            Ok(Err(wit::FilterError::UnsupportedInput(m))) => {
                return Err(RunError::InvalidInput(m))
            }
            Ok(Err(wit::FilterError::Failed(m))) => return Err(RunError::PluginFailed(m)),
            Err(e) => return Err(self.classify(&store, e, &stderr)),
        };
        let image = self.check_output(output)?;
        Ok(Applied {
            image,
            instantiate_time,
            run_time,
        })
    }

    fn check_output(&self, output: wit::Image) -> Result<RgbaImage, RunError> {
        let (w, h) = (output.width, output.height);
        self.config
            .image_limits
            .check(w, h)
            .map_err(|e| RunError::InvalidOutput(e.to_string()))?;
        let expected = u64::from(w) * u64::from(h) * 4;
        let actual = output.pixels.len() as u64;
        if actual != expected {
            return Err(RunError::InvalidOutput(format!(
                "pixel buffer holds {actual} bytes, but a {w}x{h} RGBA image needs {expected} (width x height x 4)"
            )));
        }
        RgbaImage::from_raw(w, h, output.pixels).ok_or_else(|| {
            RunError::InvalidOutput(format!("cannot build a {w}x{h} image from the buffer"))
        })
    }

    /// Names the failure of a call from the error, what the store saw, and
    /// what the plugin wrote to stderr.
    fn classify(&self, store: &Store<Sandbox>, error: wasmtime::Error, stderr: &str) -> RunError {
        if let Some(detail) = &store.data().limiter.exceeded {
            return RunError::OutOfMemory {
                limit_bytes: store.data().limiter.limits.max_memory_bytes,
                detail: detail.clone(),
            };
        }
        let trap = error.downcast_ref::<Trap>().copied();
        if trap == Some(Trap::Interrupt) {
            return RunError::Timeout {
                limit: self.config.timeout,
            };
        }
        let mut message = match trap {
            Some(Trap::StackOverflow) => {
                "stack overflow (call stack exhausted; unbounded recursion?)".to_string()
            }
            Some(t) => t.to_string(),
            None => format!("{error:#}"),
        };
        if let Some(words) = last_words(stderr) {
            message.push_str(&format!("; plugin said: {words}"));
        }
        if let Some(bt) = error.downcast_ref::<WasmBacktrace>() {
            let frames: Vec<String> = bt
                .frames()
                .iter()
                .filter_map(|f| f.func_name())
                .map(|name| format!("{:#}", rustc_demangle::demangle(name)))
                .filter(|name| !is_runtime_frame(name))
                .take(3)
                .collect();
            if !frames.is_empty() {
                message.push_str(&format!("; in {}", frames.join(" <- ")));
            }
        }
        RunError::Trap { message }
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish()
    }
}

/// Whether a backtrace frame belongs to the language runtime's panic and
/// abort machinery rather than to the plugin's own code.
fn is_runtime_frame(name: &str) -> bool {
    [
        "std::", "core::", "alloc::", "__rust", "rust_", "abort", "<std::", "<core::", "<alloc::",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

/// The gist of what a crashing plugin wrote to stderr: for a Rust panic, the
/// panic message; otherwise its last non-empty line. At most 300 characters.
fn last_words(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let words = match lines.iter().position(|l| l.contains("panicked at")) {
        Some(i) => lines[i..]
            .iter()
            .take(2)
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
        None => lines.last()?.to_string(),
    };
    Some(words.chars().take(300).collect())
}

/// Sends what the plugin wrote to stdout and stderr to the logs, and returns
/// the stderr text (for the error message, should the call have failed).
fn drain_output(store: &Store<Sandbox>, plugin: &str) -> String {
    let mut stderr = String::new();
    for (stream, captured) in [
        ("stdout", &store.data().stdout),
        ("stderr", &store.data().stderr),
    ] {
        let (text, dropped) = captured.take();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(target: "imgflow::plugin", plugin, stream, "{line}");
        }
        if dropped > 0 {
            tracing::warn!(target: "imgflow::plugin", plugin, stream, dropped, "plugin output over the cap was dropped");
        }
        if stream == "stderr" {
            stderr = text;
        }
    }
    stderr
}

fn to_wit_value(value: &ParamValue) -> wit::ParamValue {
    match value {
        ParamValue::Float(f) => wit::ParamValue::Float(*f),
        ParamValue::Integer(i) => wit::ParamValue::Integer(*i),
        ParamValue::Boolean(b) => wit::ParamValue::Boolean(*b),
        ParamValue::Text(t) => wit::ParamValue::Text(t.clone()),
    }
}

fn from_wit_value(value: wit::ParamValue) -> ParamValue {
    match value {
        wit::ParamValue::Float(f) => ParamValue::Float(f),
        wit::ParamValue::Integer(i) => ParamValue::Integer(i),
        wit::ParamValue::Boolean(b) => ParamValue::Boolean(b),
        wit::ParamValue::Text(t) => ParamValue::Text(t),
    }
}

/// Converts and checks what `metadata()` returned: a safe name, a semantic
/// version, a one-line description, and parameters with unique names whose
/// defaults satisfy their own constraints.
fn validate_metadata(raw: wit::PluginMetadata) -> Result<PluginMetadata, LoadError> {
    let bad = |m: String| Err(LoadError::InvalidMetadata(m));
    if !metadata::is_valid_plugin_name(&raw.name) {
        return bad(format!(
            "name {:?} is not a lowercase identifier ([a-z][a-z0-9_-]*, at most 64 characters)",
            raw.name
        ));
    }
    if !metadata::is_valid_version(&raw.version) {
        return bad(format!(
            "version {:?} is not a semantic version such as 1.0.0",
            raw.version
        ));
    }
    if raw.description.contains('\n') || raw.description.len() > 300 {
        return bad("description must be one line of at most 300 bytes".into());
    }
    let mut specs: Vec<ParamSpec> = Vec::new();
    for p in raw.params {
        let spec = ParamSpec {
            kind: match p.kind {
                wit::ParamKind::Float => ParamKind::Float,
                wit::ParamKind::Integer => ParamKind::Integer,
                wit::ParamKind::Boolean => ParamKind::Boolean,
                wit::ParamKind::Text => ParamKind::Text,
            },
            default: from_wit_value(p.default),
            allowed: match p.allowed {
                wit::Constraint::Any => Constraint::Any,
                wit::Constraint::Within(r) => Constraint::Within {
                    min: r.min,
                    min_inclusive: r.min_inclusive,
                    max: r.max,
                    max_inclusive: r.max_inclusive,
                },
                wit::Constraint::OneOf(values) => Constraint::OneOf { values },
            },
            description: p.description,
            name: p.name,
        };
        if !metadata::is_valid_plugin_name(&spec.name)
            || metadata::RESERVED_PARAMS.contains(&spec.name.as_str())
        {
            return bad(format!(
                "parameter name {:?} must be a lowercase identifier other than {}",
                spec.name,
                metadata::RESERVED_PARAMS.join(", ")
            ));
        }
        if specs.iter().any(|s| s.name == spec.name) {
            return bad(format!("parameter {:?} is declared twice", spec.name));
        }
        if let Err(e) = params::check(&spec, &spec.default) {
            return bad(format!(
                "the default of parameter {:?} is not acceptable: {e}",
                spec.name
            ));
        }
        specs.push(spec);
    }
    Ok(PluginMetadata {
        name: raw.name,
        version: raw.version,
        description: raw.description,
        params: specs,
    })
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`], which is
/// what interrupts a plugin past its deadline. Stopped when dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<EpochTicker, RuntimeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("imgflow-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Stop the ticker before the engine goes (field order would do it
        // too; this makes the intent explicit).
        self.ticker.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_param(name: &str) -> wit::PluginMetadata {
        wit::PluginMetadata {
            name: "edge".into(),
            version: "1.0.0".into(),
            description: "A test.".into(),
            params: vec![wit::ParamSpec {
                name: name.into(),
                kind: wit::ParamKind::Float,
                default: wit::ParamValue::Float(1.0),
                allowed: wit::Constraint::Any,
                description: "A parameter.".into(),
            }],
        }
    }

    #[test]
    fn parameters_may_not_take_the_names_a_submission_reserves() {
        assert!(validate_metadata(with_param("sigma")).is_ok());
        for reserved in metadata::RESERVED_PARAMS {
            match validate_metadata(with_param(reserved)) {
                Err(LoadError::InvalidMetadata(m)) => assert!(m.contains(reserved), "{m}"),
                other => panic!("{reserved}: {other:?}"),
            }
        }
    }
}
