//! The on-disk cache of compiled plugins.
//!
//! Compiling a component with Cranelift takes far longer than loading it, so
//! compiled code is kept in files named by the component's SHA-256 and the
//! engine's compatibility hash: a restart (or another worker sharing the
//! directory) loads instead of recompiling, and a wasmtime upgrade or a
//! different engine configuration never picks up incompatible code.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A [`Hasher`] that feeds SHA-256, so the engine's compatibility hash is
/// stable across processes and Rust versions (unlike `DefaultHasher`).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        // Unused: the digest is read with `finalize`.
        0
    }
}

/// 16 hex digits identifying everything about `engine` that compiled code
/// depends on (wasmtime version, target, settings).
pub fn engine_fingerprint(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    fingerprint: String,
}

impl CompiledCache {
    /// A cache in `dir` (which must exist) for code compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &Engine) -> CompiledCache {
        CompiledCache {
            dir,
            fingerprint: engine_fingerprint(engine),
        }
    }

    /// The file that holds (or will hold) the compiled form of the component
    /// with SHA-256 `digest`.
    pub fn path_for(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", self.fingerprint))
    }

    /// Loads the compiled component with SHA-256 `digest` if it is cached.
    /// An unreadable or stale entry is removed and reported as a miss.
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path_for(digest);
        if !path.is_file() {
            return None;
        }
        // Read into memory rather than `deserialize_file`, which maps the
        // file: a mapped file truncated by someone else kills the process
        // with SIGBUS, a copy cannot.
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read compiled-code cache entry");
                return None;
            }
        };
        // SAFETY: the cache directory belongs to the operator (it is
        // configuration, like the binary itself), and entries are only ever
        // written by `store` below, from `Component::serialize` of an engine
        // with the same fingerprint; wasmtime additionally checks the
        // header's version and settings before using the code.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled-code cache entry");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the compiled form of `component`. Failures are logged, not
    /// returned: the cache only saves time.
    pub fn store(&self, digest: &str, component: &Component) {
        let path = self.path_for(digest);
        let result = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-code cache entry");
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into
/// place, so readers never see a partial file. The temporary name is random:
/// workers in containers sharing the directory all have process id 1.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
