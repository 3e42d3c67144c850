//! The errors of the plugin runtime.

use std::time::Duration;

use thiserror::Error;

use crate::code::{ErrorCode, Failure};

/// Why a plugin run ended without an image. Each variant has a stable
/// [`code`](RunError::code) for APIs, metrics and exit messages.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RunError {
    /// The plugin ran past its wall-clock limit and was interrupted.
    #[error("plugin exceeded its time limit of {} ms", .limit.as_millis())]
    Timeout {
        /// The limit.
        limit: Duration,
    },
    /// The plugin tried to grow its memory (or tables) beyond the limit.
    #[error("plugin exceeded its memory limit of {} MiB ({detail})", .limit_bytes / (1024 * 1024))]
    OutOfMemory {
        /// The limit, in bytes.
        limit_bytes: usize,
        /// What it asked for.
        detail: String,
    },
    /// The plugin crashed: a WebAssembly trap, including panics and stack
    /// overflows. The message carries the trap, the plugin's last words on
    /// stderr (a panic message, for Rust plugins) and where it happened.
    #[error("plugin crashed: {message}")]
    Trap {
        /// What happened.
        message: String,
    },
    /// The plugin returned an image the host cannot accept.
    #[error("plugin returned an invalid image: {0}")]
    InvalidOutput(String),
    /// The plugin refused the parameters (`filter-error::invalid-params`).
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// The plugin cannot process this image (`filter-error::unsupported-input`).
    #[error("plugin cannot process this image: {0}")]
    InvalidInput(String),
    /// The plugin reported a failure of its own (`filter-error::failed`).
    #[error("plugin failed: {0}")]
    PluginFailed(String),
    /// The host could not run the plugin (for example, every sandbox slot is
    /// in use). Not the plugin's fault; worth retrying.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RunError {
    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::Timeout { .. } => ErrorCode::Timeout,
            RunError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
            RunError::Trap { .. } => ErrorCode::Trap,
            RunError::InvalidOutput(_) => ErrorCode::InvalidOutput,
            RunError::InvalidParams(_) => ErrorCode::InvalidParams,
            RunError::InvalidInput(_) => ErrorCode::InvalidInput,
            RunError::PluginFailed(_) => ErrorCode::PluginFailed,
            RunError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Whether running the same job again could succeed. Plugin failures are
    /// deterministic and are not retried; host-side failures are.
    pub fn is_transient(&self) -> bool {
        matches!(self, RunError::Internal(_))
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read plugin {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component (perhaps a core module, or
    /// not WebAssembly at all).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// The component failed to compile.
    #[error("the component does not compile: {0}")]
    Compile(String),
    /// The component imports something the host does not provide (only WASI
    /// preview 2 is provided).
    #[error("the component imports something beyond WASI preview 2: {0}")]
    ForbiddenImport(String),
    /// The component does not export the `imgflow:filter` world.
    #[error("the component does not export the imgflow:filter world: {0}")]
    WrongWorld(String),
    /// Calling `metadata()` failed.
    #[error("metadata() failed: {0}")]
    Metadata(#[source] RunError),
    /// `metadata()` returned something unacceptable.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
}

impl LoadError {
    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            LoadError::Read { .. } => ErrorCode::ReadFailed,
            LoadError::NotAComponent(_) => ErrorCode::NotAComponent,
            LoadError::Compile(_) => ErrorCode::CompileFailed,
            LoadError::ForbiddenImport(_) => ErrorCode::ForbiddenImport,
            LoadError::WrongWorld(_) => ErrorCode::WrongWorld,
            LoadError::Metadata(_) => ErrorCode::MetadataFailed,
            LoadError::InvalidMetadata(_) => ErrorCode::InvalidMetadata,
        }
    }
}

/// Why the runtime itself could not start.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The wasmtime engine rejected the configuration.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
}

impl From<RunError> for Failure {
    fn from(e: RunError) -> Failure {
        Failure {
            code: e.code(),
            message: e.to_string(),
            transient: e.is_transient(),
        }
    }
}

impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Failure {
        Failure::new(e.code(), e.to_string())
    }
}
