//! Where images and plugin components are kept: a local directory or an
//! S3-compatible bucket, through the `object_store` crate.
//!
//! Keys: `inputs/<job id>`, `outputs/<job id>.<ext>`, `plugins/<sha256>.wasm`.
//! Outputs are named by job id alone, so running a job twice writes the same
//! object twice instead of leaving two results.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::local::LocalFileSystem;
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
        source: object_store::Error,
    },
}

/// The object store, shared by the API and the workers.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
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
            std::fs::create_dir_all(dir)
                .map_err(|e| config(format!("cannot create {dir}: {e}")))?;
            let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| config(e.to_string()))?;
            Ok(Storage {
                store: Arc::new(fs),
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
        Ok(Storage { store })
    }

    /// Writes `bytes` at `key`, replacing what was there.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.store
            .put(&Path::from(key), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|source| backend(key, source))
    }

    /// Reads the object at `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let result = self
            .store
            .get(&Path::from(key))
            .await
            .map_err(|source| backend(key, source))?;
        result.bytes().await.map_err(|source| backend(key, source))
    }

    /// Opens the object at `key` to be read as a stream of chunks, so it can
    /// be sent on without being held in memory whole.
    pub async fn read_stream(&self, key: &str) -> Result<Object, StorageError> {
        let result = self
            .store
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

    /// Deletes the object at `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(backend(key, source)),
        }
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match self.store.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(backend(key, source)),
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
            source,
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

/// The key of a plugin component with SHA-256 `digest`.
pub fn plugin_key(digest: &str) -> String {
    format!("plugins/{digest}.wasm")
}
