//! The on-disk cache of compiled plugins.
//!
//! Compiling a component with Cranelift takes far longer than loading it, so
//! compiled code is kept in files named by the component's SHA-256 and the
//! engine's compatibility hash: a restart (or another worker sharing the
//! directory) loads instead of recompiling, and a wasmtime upgrade or a
//! different engine configuration never picks up incompatible code.
//!
//! An entry is native code that the process will run, so it is trusted only
//! if it is ours: each file starts with an HMAC-SHA256 tag over the
//! component's digest, the engine fingerprint and the code, keyed with the
//! cache secret (`COMPILE_CACHE_SECRET`; without one there is no disk
//! cache). A file written by anyone without the secret, or another plugin's
//! code copied under this plugin's name, fails the check, is removed, and
//! the component is compiled again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
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

/// The key that authenticates cache entries (`COMPILE_CACHE_SECRET`),
/// defined with the other settings.
pub use imgflow_settings::CacheSecret;

/// The length of an entry's authentication tag, in bytes.
const TAG_LEN: usize = 32;

/// A directory of compiled components, each entry authenticated.
#[derive(Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    fingerprint: String,
    key: Vec<u8>,
    max_bytes: u64,
    evicted: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for CompiledCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledCache")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CompiledCache {
    /// A cache in `dir` (which must exist) for code compiled by `engine`,
    /// whose entries are authenticated with `secret`, holding at most
    /// `max_bytes` (the least recently used entries are evicted beyond).
    pub fn new(
        dir: PathBuf,
        engine: &Engine,
        secret: &CacheSecret,
        max_bytes: u64,
    ) -> CompiledCache {
        CompiledCache {
            dir,
            fingerprint: engine_fingerprint(engine),
            key: secret.as_bytes().to_vec(),
            max_bytes,
            evicted: Default::default(),
        }
    }

    /// How many entries this process evicted to stay within the size cap.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Evicts the least recently used entries (by modification time, which
    /// a hit renews) until the directory's entries fit in the cap; `keep`
    /// is never evicted. Every process sharing the directory does this, so
    /// the cap holds for the directory as a whole.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                self.evicted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(path = %path.display(), "evicted a compiled-code cache entry (COMPILE_CACHE_MAX_MB)");
            }
        }
    }

    /// The tag of `code` stored as the compiled form of `digest`.
    fn mac(&self, digest: &str, code: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length; `new_from_slice` cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        for part in [digest.as_bytes(), b"\n", self.fingerprint.as_bytes(), b"\n"] {
            mac.update(part);
        }
        mac.update(code);
        mac
    }

    /// The file that holds (or will hold) the compiled form of the component
    /// with SHA-256 `digest`.
    pub fn path_for(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", self.fingerprint))
    }

    /// Loads the compiled component with SHA-256 `digest` if it is cached
    /// and its tag proves this cache's key wrote it for this digest. An
    /// unreadable, unauthenticated or stale entry is removed and reported
    /// as a miss.
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
        let authentic = bytes.len() > TAG_LEN && {
            let (tag, code) = bytes.split_at(TAG_LEN);
            self.mac(digest, code).verify_slice(tag).is_ok()
        };
        if !authentic {
            tracing::warn!(path = %path.display(), digest, "refusing a compiled-code cache entry this process cannot authenticate (written with another COMPILE_CACHE_SECRET, or tampered with); compiling again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: the tag proves the entry was written by `store` below, by
        // a process holding the cache key, from `Component::serialize` of the
        // component with this digest on an engine with the same fingerprint;
        // wasmtime additionally checks the header's version and settings.
        match unsafe { Component::deserialize(engine, &bytes[TAG_LEN..]) } {
            Ok(component) => {
                // Recently used: the last to be evicted.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(component)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled-code cache entry");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the compiled form of `component`, tagged. Failures are
    /// logged, not returned: the cache only saves time.
    pub fn store(&self, digest: &str, component: &Component) {
        let path = self.path_for(digest);
        let result = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|code| {
                let tag = self.mac(digest, &code).finalize().into_bytes();
                let mut entry = Vec::with_capacity(TAG_LEN + code.len());
                entry.extend_from_slice(&tag);
                entry.extend_from_slice(&code);
                write_atomically(&path, &entry).map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => self.evict(&path),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-code cache entry")
            }
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
