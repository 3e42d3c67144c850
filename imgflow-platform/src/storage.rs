//! Where images and plugin components are kept: a local directory
//! ([`LocalDir`]), or an S3-compatible bucket through the `object_store`
//! crate.
//!
//! Keys: `inputs/<job id>`, `outputs/<job id>.<ext>`, `plugins/<sha256>.wasm`.
//! Outputs are named by job id alone, so running a job twice writes the same
//! object twice instead of leaving two results.
//!
//! A local directory is the operator's alone: directories are created (and,
//! if they exist, set) `0700` and files `0600`, whatever the process's
//! umask, so another user of the machine reads no client's image.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use thiserror::Error;
use uuid::Uuid;

use imgflow_runtime::codec::ImageFormat;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StorageError {
    /// `STORAGE_URL` is not usable.
    #[error("invalid STORAGE_URL {url:?}: {message}")]
    Config {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The object does not exist.
    #[error("object {0} not found in storage")]
    NotFound(String),
    /// The store failed (I/O, network, permissions).
    #[error("storage error on {key}: {source}")]
    Backend {
        /// The key.
        key: String,
        /// The store's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The object store, shared by the API and the workers.
#[derive(Debug, Clone)]
pub struct Storage {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(LocalDir),
    Object(Arc<dyn ObjectStore>),
}

impl Storage {
    /// Opens the storage named by `url`: a local path (created if missing),
    /// `file:///abs/path`, or an `s3://bucket/prefix` URL configured from the
    /// `AWS_*` environment variables.
    pub fn open(url: &str) -> Result<Storage, StorageError> {
        let config = |message: String| StorageError::Config {
            url: url.to_string(),
            message,
        };
        let local = |dir: &str| -> Result<Storage, StorageError> {
            let dir =
                LocalDir::open(dir.into()).map_err(|e| config(format!("cannot use {dir}: {e}")))?;
            Ok(Storage {
                backend: Backend::Local(dir),
            })
        };
        if let Some(path) = url.strip_prefix("file://") {
            return local(path);
        }
        if !url.contains("://") {
            return local(url);
        }
        let parsed = url::Url::parse(url).map_err(|e| config(e.to_string()))?;
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, options).map_err(|e| config(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(Storage {
            backend: Backend::Object(store),
        })
    }

    /// Writes `bytes` at `key`, replacing what was there.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.put(key, bytes).await,
            Backend::Object(store) => store
                .put(&Path::from(key), PutPayload::from_bytes(bytes))
                .await
                .map(|_| ())
                .map_err(|source| backend(key, source)),
        }
    }

    /// Reads the object at `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.get(key).await,
            Backend::Object(store) => {
                let result = store
                    .get(&Path::from(key))
                    .await
                    .map_err(|source| backend(key, source))?;
                result.bytes().await.map_err(|source| backend(key, source))
            }
        }
    }

    /// Opens the object at `key` to be read as a stream of chunks, so it can
    /// be sent on without being held in memory whole.
    pub async fn read_stream(&self, key: &str) -> Result<Object, StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.read_stream(key).await,
            Backend::Object(store) => {
                let result = store
                    .get(&Path::from(key))
                    .await
                    .map_err(|source| backend(key, source))?;
                let size = result.meta.size;
                let owned = key.to_string();
                let chunks = result
                    .into_stream()
                    .map(move |chunk| chunk.map_err(|source| backend(&owned, source)))
                    .boxed();
                Ok(Object { size, chunks })
            }
        }
    }

    /// Deletes the object at `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.delete(key).await,
            Backend::Object(store) => match store.delete(&Path::from(key)).await {
                Ok(()) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(source) => Err(backend(key, source)),
            },
        }
    }

    /// Up to `limit` keys in folder `folder` (`inputs/`, `outputs/`), in
    /// order, each after `after` if given: a page of a walk through the
    /// folder that costs one page, whatever the folder's size (S3's
    /// `ListObjectsV2` with `start-after`; a local directory is read whole).
    /// A local directory's staging files are not listed.
    pub async fn list_after(
        &self,
        folder: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.list_after(folder, after, limit).await,
            Backend::Object(store) => {
                let prefix = Path::from(folder);
                let listing = match after {
                    Some(after) => store.list_with_offset(Some(&prefix), &Path::from(after)),
                    None => store.list(Some(&prefix)),
                };
                let metas: Vec<object_store::ObjectMeta> = listing
                    .take(limit)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .map_err(|source| backend(folder, source))?;
                let mut keys: Vec<String> =
                    metas.into_iter().map(|m| m.location.to_string()).collect();
                keys.sort();
                Ok(keys)
            }
        }
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.exists(key).await,
            Backend::Object(store) => match store.head(&Path::from(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(source) => Err(backend(key, source)),
            },
        }
    }
}

/// Storage in a local directory, private to the process's user: every
/// directory `0700`, every file `0600`. A write goes to a temporary file
/// beside its target, then is renamed over it, so a reader never sees half
/// an object.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: Arc<PathBuf>,
    /// The directories this process made (or found) already.
    made: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
}

/// Objects up to this size are read and written on the calling thread.
const SMALL: usize = 64 * 1024;

/// The mode of every directory of a [`LocalDir`].
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file of a [`LocalDir`].
pub const FILE_MODE: u32 = 0o600;

/// The size of the chunks a local object is streamed in.
const CHUNK: usize = 256 * 1024;

impl LocalDir {
    /// The directory `root`, created if missing; its mode (and that of
    /// the directories below it) is set to [`DIR_MODE`].
    pub fn open(root: PathBuf) -> std::io::Result<LocalDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(DIR_MODE))?;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(DIR_MODE))?;
            }
        }
        Ok(LocalDir {
            root: Arc::new(root),
            made: Default::default(),
        })
    }

    /// The file of `key`: keys are relative paths of plain names (as this
    /// module makes them); anything else is refused.
    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        let plain = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty() && part != "." && part != ".." && !part.contains('\\')
            });
        if !plain {
            return Err(StorageError::Backend {
                key: key.to_string(),
                source: "not a storage key".into(),
            });
        }
        Ok(self.root.join(key))
    }

    /// Runs file work `work` for `key`: here when it is `small` (a few
    /// system calls on a small file cost less than handing them to a
    /// blocking thread), else on a blocking thread.
    async fn run<T: Send + 'static>(
        key: &str,
        small: bool,
        work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let result = if small {
            work()
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| StorageError::Backend {
                    key: key.to_string(),
                    source: e.into(),
                })?
        };
        result.map_err(|e| io_error(key, e))
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let small = bytes.len() <= SMALL;
        let made = self.made.clone();
        Self::run(key, small, move || {
            let dir = path.parent().unwrap_or(&path).to_path_buf();
            // Each directory is made once per process (`inputs/` and
            // `outputs/` hold every job's file).
            let known = made
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&dir);
            if !known {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(&dir)?;
                made.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(dir.clone());
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let staging = dir.join(format!(".{name}.{}", Uuid::now_v7().simple()));
            let written = (|| {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .open(&staging)?;
                file.write_all(&bytes)?;
                std::fs::rename(&staging, &path)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&staging);
                // The directory may have been removed behind our back.
                made.lock().unwrap_or_else(|e| e.into_inner()).remove(&dir);
            }
            written
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        use std::io::Read as _;
        let path = self.path(key)?;
        // Opened here; read here when small, else on a blocking thread.
        let mut file = std::fs::File::open(&path).map_err(|e| io_error(key, e))?;
        let size = file.metadata().map_err(|e| io_error(key, e))?.len();
        Self::run(key, size <= SMALL as u64, move || {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)?;
            Ok(Bytes::from(bytes))
        })
        .await
    }

    async fn read_stream(&self, key: &str) -> Result<Object, StorageError> {
        use tokio::io::AsyncReadExt as _;
        let path = self.path(key)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(key, e))?;
        let size = file.metadata().await.map_err(|e| io_error(key, e))?.len();
        let owned = key.to_string();
        let chunks = futures::stream::try_unfold(file, move |mut file| {
            let key = owned.clone();
            async move {
                let mut buf = bytes::BytesMut::with_capacity(CHUNK);
                let read = file
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| io_error(&key, e))?;
                Ok((read > 0).then(|| (buf.freeze(), file)))
            }
        })
        .boxed();
        Ok(Object { size, chunks })
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(key, e)),
            _ => Ok(()),
        }
    }

    async fn list_after(
        &self,
        folder: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        let folder = folder.trim_end_matches('/').to_string();
        let path = self.path(&folder)?;
        let after = after.map(str::to_string);
        Self::run(&folder.clone(), false, move || {
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut keys = Vec::new();
            for entry in entries {
                let name = entry?.file_name();
                let Some(name) = name.to_str() else { continue };
                let key = format!("{folder}/{name}");
                if !name.starts_with('.') && after.as_ref().is_none_or(|a| key > *a) {
                    keys.push(key);
                }
            }
            keys.sort();
            keys.truncate(limit);
            Ok(keys)
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(path).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(key, e)),
        }
    }
}

fn io_error(key: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::NotFound(key.to_string())
    } else {
        StorageError::Backend {
            key: key.to_string(),
            source: e.into(),
        }
    }
}

/// An object being read (see [`Storage::read_stream`]).
pub struct Object {
    /// Its size in bytes.
    pub size: u64,
    /// Its bytes, a chunk at a time.
    pub chunks: futures::stream::BoxStream<'static, Result<Bytes, StorageError>>,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object").field("size", &self.size).finish()
    }
}

fn backend(key: &str, source: object_store::Error) -> StorageError {
    match source {
        object_store::Error::NotFound { .. } => StorageError::NotFound(key.to_string()),
        source => StorageError::Backend {
            key: key.to_string(),
            source: source.into(),
        },
    }
}

/// The key of a job's input image.
pub fn input_key(job: Uuid) -> String {
    format!("inputs/{job}")
}

/// The key of a job's result.
pub fn output_key(job: Uuid, format: ImageFormat) -> String {
    format!("outputs/{job}.{}", format.extension())
}

/// The job a job's file is named by (`inputs/<id>`, `outputs/<id>.<ext>`),
/// or `None` for another key.
pub fn maker(key: &str) -> Option<Uuid> {
    let name = key
        .strip_prefix("inputs/")
        .or_else(|| key.strip_prefix("outputs/"))?;
    let id = name.split_once('.').map_or(name, |(id, _)| id);
    Uuid::try_parse(id).ok()
}

/// The key of a plugin component with SHA-256 `digest`.
pub fn plugin_key(digest: &str) -> String {
    format!("plugins/{digest}.wasm")
}
