//! API errors: JSON `{"error": {"code": "...", "message": "..."}}` with a
//! stable [`ErrorCode`] and the status that code carries. Transient codes
//! (a service unavailable, the queue full) add `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use imgflow_platform::budget::BudgetError;
use imgflow_platform::jobs::JobsError;
use imgflow_platform::plugins::CatalogueError;
use imgflow_platform::queue::QueueError;
use imgflow_platform::steps::StepError;
use imgflow_platform::storage::StorageError;
use imgflow_runtime::codec::CodecError;
use imgflow_runtime::{ErrorCode, LoadError};
use serde::Serialize;
use utoipa::ToSchema;

/// How long a client should wait before retrying a transient error, in
/// seconds.
const RETRY_AFTER_SECONDS: u64 = 5;

/// The longest error message answered: whatever a message quotes of a
/// request, the answer stays small.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// `Retry-After` in seconds, when the default does not fit.
    retry_after: Option<u64>,
    /// More headers the answer carries.
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code (see the README's "Error codes").
    pub code: String,
    /// What went wrong, for humans.
    pub message: String,
}

impl ApiError {
    /// An error with `code` (which decides the status) and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// The error, answered with header `name` set to `value`.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// The error, answered with `Retry-After: seconds` (at least 1).
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    /// The host failed in a way the client cannot fix.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    /// The request body is over the limit named by `setting`.
    pub fn too_large(limit: usize, setting: &str) -> ApiError {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body is over the limit of {limit} bytes ({setting})"),
        )
    }

    /// The error, said of step `index` (from 1) of a pipeline, whose
    /// action is `action`.
    pub fn in_step(self, index: usize, action: &str) -> ApiError {
        ApiError {
            message: format!("step {index} ({action}): {}", self.message),
            ..self
        }
    }

    /// The error, said of image `index` (from 1) of a batch.
    pub fn in_image(self, index: usize) -> ApiError {
        ApiError {
            message: format!("image {index}: {}", self.message),
            ..self
        }
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    fn unavailable(code: ErrorCode, what: &str, error: &dyn std::fmt::Display) -> ApiError {
        if code.is_transient() {
            tracing::error!(error = %error, "{what} error");
            ApiError::new(code, format!("the {what} is unavailable; try again later"))
        } else {
            ApiError::new(
                code,
                format!("the request was refused by the {what}: {error}"),
            )
        }
    }
}

impl From<StepError> for ApiError {
    fn from(e: StepError) -> ApiError {
        match e {
            StepError::Database(e) => e.into(),
            other => ApiError::new(other.code(), other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        let code = if imgflow_platform::db::is_bad_input(&e) {
            ErrorCode::InvalidRequest
        } else {
            ErrorCode::DatabaseUnavailable
        };
        ApiError::unavailable(code, "database", &e)
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> ApiError {
        ApiError::unavailable(ErrorCode::QueueUnavailable, "job queue", &e)
    }
}

impl ApiError {
    /// `API_DECODE_MEMORY_MB` had no room for `what` (receiving a body,
    /// decoding an image): `422 image_too_large` if it never could, else
    /// `503 decode_busy` (with `Retry-After`).
    pub fn over_budget(e: BudgetError, what: &str) -> ApiError {
        match e {
            BudgetError::Never { .. } => ApiError::new(
                ErrorCode::ImageTooLarge,
                format!("{what} takes more memory than the API may use: {e}"),
            ),
            BudgetError::Busy { .. } => ApiError::new(
                ErrorCode::DecodeBusy,
                format!("the API is receiving and decoding other images ({what}: {e}); try again shortly"),
            ),
        }
    }
}

impl From<StorageError> for ApiError {
    /// A missing object is `410 image_missing` (asking again will not bring
    /// it back); anything else is storage being unavailable (`503`).
    fn from(e: StorageError) -> ApiError {
        match e {
            StorageError::NotFound(key) => ApiError::new(
                ErrorCode::ImageMissing,
                format!(
                    "the job's stored image {key:?} is gone from storage (lost in a crash of the host before it reached the disk, or removed outside imgflow)"
                ),
            ),
            e => ApiError::unavailable(ErrorCode::StorageUnavailable, "image storage", &e),
        }
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> ApiError {
        match e {
            JobsError::Database(e) => e.into(),
            JobsError::Queue(e) => e.into(),
            JobsError::Storage(e) => e.into(),
            JobsError::Conflict => ApiError::new(ErrorCode::Conflict, e.to_string()),
            JobsError::OverCap { .. } => ApiError::new(ErrorCode::QueueFull, e.to_string()),
            JobsError::Revoked => ApiError::new(
                ErrorCode::Unauthorized,
                "the client key was revoked; nothing was recorded",
            ),
            JobsError::Stopping => ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the API is stopping; try again",
            ),
        }
    }
}

impl From<CatalogueError> for ApiError {
    fn from(e: CatalogueError) -> ApiError {
        match e {
            CatalogueError::Database(e) => e.into(),
            CatalogueError::Storage(e) => e.into(),
            other => ApiError::new(other.code(), other.to_string()),
        }
    }
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: imgflow_runtime::text::bounded(self.message, MAX_MESSAGE_BYTES),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection cannot be
            // reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"imgflow\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.retry_after.unwrap_or(RETRY_AFTER_SECONDS)),
            );
        }
        response
    }
}
