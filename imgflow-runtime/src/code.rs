//! Every error code imgflow answers, records or prints, in one place.
//!
//! A code is the stable, machine-readable half of an error: the API sends it
//! as `{"error": {"code": ...}}`, a failed job stores it in `error_code`, the
//! worker's `worker_job_failures_total{reason}` and the API's
//! `api_jobs_rejected_total{reason}` use it as a label, and the local runner
//! prints it first on its error line. Each code has one HTTP status (the one
//! the API answers with it) and says whether trying again later may succeed.
//!
//! Adding a code means adding one row to the table below: its string, status,
//! whether it is transient, and where it can occur ([`Scope`]). The metrics
//! create a zero-valued series for every code of their scope from
//! [`ErrorCode::ALL`], so a new code is never missing from a dashboard.

use std::fmt;

/// Where a code can occur; decides which metric series are created for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A job's recorded failure (`worker_job_failures_total{reason}`).
    Job,
    /// A refused job submission (`api_jobs_rejected_total{reason}`).
    Submission,
    /// Both: a submission refused for it, or a job that failed with it.
    SubmissionAndJob,
    /// Anything else: plugin management, reads, the local runner.
    Other,
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, $status:literal, $transient:literal, $scope:ident; )*) => {
        /// A stable error code. See the [module docs](self).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the table's order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The code as sent, stored and used as a label: `snake_case`.
            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $text, )* }
            }

            /// The HTTP status the API answers with this code.
            pub const fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// Whether the same request or job may succeed later (the
            /// service was unavailable or busy), as opposed to a refusal that
            /// will not change.
            pub const fn is_transient(self) -> bool {
                match self { $( ErrorCode::$variant => $transient, )* }
            }

            /// Where the code can occur.
            pub const fn scope(self) -> Scope {
                match self { $( ErrorCode::$variant => Scope::$scope, )* }
            }
        }
    };
}

error_codes! {
    // The request itself.
    /// The request is malformed: a missing field, bad query, bad header.
    InvalidRequest = "invalid_request", 400, false, Submission;
    /// The request body is over its limit.
    BodyTooLarge = "body_too_large", 413, false, Submission;
    /// The fields of a form other than its files are over
    /// `MAX_FIELDS_BYTES` together.
    FieldsTooLarge = "fields_too_large", 413, false, Submission;
    /// The query string is over `MAX_FIELDS_BYTES`.
    UriTooLong = "uri_too_long", 414, false, Submission;
    /// The body's content type is not one the route accepts.
    UnsupportedMediaType = "unsupported_media_type", 415, false, Submission;
    // Submitting a job.
    /// No active plugin has this name.
    UnknownAction = "unknown_action", 404, false, Submission;
    /// The plugin has no such version.
    VersionNotFound = "version_not_found", 404, false, Submission;
    /// Parameters refused by the plugin's schema or by the plugin itself.
    InvalidParams = "invalid_params", 422, false, SubmissionAndJob;
    /// An output format imgflow does not write.
    InvalidFormat = "invalid_format", 422, false, Submission;
    /// A `callback_url` that is not an allowed target, or callbacks are
    /// off (no `CALLBACK_SECRET`).
    InvalidCallback = "invalid_callback", 422, false, Submission;
    /// The queue is at `QUEUE_MAX_DEPTH`.
    QueueFull = "queue_full", 429, true, Submission;
    /// The client key submitted more jobs than its rate allows
    /// (`KEY_RATE_LIMIT`, or its own); `Retry-After` says when it may again.
    RateLimited = "rate_limited", 429, true, Submission;
    /// The client key used its day's quota of work (`KEY_DAILY_MEGAPIXELS`,
    /// or its own); `Retry-After` says when the next UTC day starts.
    QuotaExceeded = "quota_exceeded", 429, true, Submission;
    /// Another request with the same idempotency key is being recorded.
    Conflict = "conflict", 409, true, Submission;
    // Images.
    /// Not PNG, JPEG, WebP or GIF.
    UnsupportedFormat = "unsupported_format", 415, false, Submission;
    /// The image does not decode.
    CorruptImage = "corrupt_image", 422, false, Submission;
    /// The image is over `MAX_IMAGE_SIDE` or `MAX_IMAGE_PIXELS`.
    ImageTooLarge = "image_too_large", 422, false, Submission;
    /// The result could not be encoded.
    EncodeFailed = "encode_failed", 500, false, Job;
    // A job's run.
    /// The plugin ran past its time limit.
    Timeout = "timeout", 500, false, Job;
    /// The plugin tried to grow its memory (or a table) past the limit.
    OutOfMemory = "out_of_memory", 500, false, Job;
    /// The plugin crashed (panic, stack overflow, `unreachable`, ...).
    Trap = "trap", 500, false, Job;
    /// The plugin returned an image of the wrong size or over the limits.
    InvalidOutput = "invalid_output", 500, false, Job;
    /// The plugin cannot process this image (`unsupported-input`).
    InvalidInput = "invalid_input", 422, false, Job;
    /// The plugin returned `failed`.
    PluginFailed = "plugin_failed", 500, false, Job;
    /// The job's plugin was deleted after the job was submitted.
    PluginDeleted = "plugin_deleted", 410, false, Job;
    /// The job's plugin cannot be loaded by the worker.
    PluginUnavailable = "plugin_unavailable", 500, false, Job;
    /// The job's estimated working set is larger than the worker's whole
    /// `WORKER_MEMORY_MB`.
    OverMemoryBudget = "over_memory_budget", 422, false, Job;
    /// The job was delivered more than `MAX_ATTEMPTS` times.
    MaxAttempts = "max_attempts", 500, false, Job;
    /// The host failed (a thread, a sandbox slot, storage during a job).
    Internal = "internal", 500, true, SubmissionAndJob;
    // Services.
    /// PostgreSQL is unreachable or failing.
    DatabaseUnavailable = "database_unavailable", 503, true, Submission;
    /// Redis is unreachable or failing.
    QueueUnavailable = "queue_unavailable", 503, true, Submission;
    /// The object store is failing.
    StorageUnavailable = "storage_unavailable", 503, true, Submission;
    /// The `Idempotency-Key` was used before, by this client, for a
    /// different request.
    IdempotencyKeyReused = "idempotency_key_reused", 422, false, Submission;
    /// The API's budget for submitted images (`API_DECODE_MEMORY_MB`) is spent; retry.
    DecodeBusy = "decode_busy", 503, true, Submission;
    /// The client sent the request body too slowly (`BODY_READ_TIMEOUT`).
    RequestTimeout = "request_timeout", 408, false, Submission;
    /// The client key already holds `KEY_MAX_STREAMS` event streams and
    /// waits open.
    TooManyStreams = "too_many_streams", 429, true, Other;
    /// Too many failed sign-ins from this address; try again later.
    SignInThrottled = "sign_in_throttled", 429, true, Other;
    /// No such route.
    NotFound = "not_found", 404, false, Other;
    /// The route exists but not with this method.
    MethodNotAllowed = "method_not_allowed", 405, false, Other;
    // Reading jobs.
    /// No such job.
    JobNotFound = "job_not_found", 404, false, Other;
    /// The job failed, so it has no result.
    JobFailed = "job_failed", 409, false, Other;
    /// The job has not finished yet.
    JobNotFinished = "job_not_finished", 409, true, Other;
    /// The job was cancelled, so it has no result.
    JobCancelled = "job_cancelled", 409, false, Other;
    /// The job has finished, so it cannot be cancelled.
    JobFinished = "job_finished", 409, false, Other;
    /// The job's stored image (its input or its result) is gone from
    /// storage: lost in a crash of the host before it was written to disk,
    /// or removed outside imgflow. It will not come back.
    ImageMissing = "image_missing", 410, false, Other;
    /// Only a failed or cancelled job can be retried.
    JobNotRetryable = "job_not_retryable", 409, false, Other;
    /// No such batch (or none of its jobs is the caller's).
    BatchNotFound = "batch_not_found", 404, false, Other;
    // Plugin management.
    /// No `IMGFLOW_ADMIN_TOKEN` is configured, so management is off.
    AdminDisabled = "admin_disabled", 403, false, Other;
    /// A missing, wrong or revoked bearer token.
    Unauthorized = "unauthorized", 401, false, Other;
    /// A signed result URL whose signature is wrong or whose time is up.
    InvalidSignature = "invalid_signature", 403, false, Other;
    /// No such client key.
    KeyNotFound = "key_not_found", 404, false, Other;
    /// The plugin version is active or an unfinished job needs it.
    VersionInUse = "version_in_use", 409, false, Other;
    /// Not a plugin name (`[a-z][a-z0-9_-]*`, at most 64 characters).
    InvalidName = "invalid_name", 400, false, Other;
    /// No such plugin.
    PluginNotFound = "plugin_not_found", 404, false, Other;
    /// The component's metadata names another plugin than the URL.
    NameMismatch = "name_mismatch", 422, false, Other;
    /// This version exists with other bytes.
    VersionConflict = "version_conflict", 409, false, Other;
    /// Every compile slot (`PLUGIN_COMPILE_SLOTS`) is taken; retry later.
    Busy = "busy", 503, true, Other;
    /// Compiling the component took longer than `PLUGIN_COMPILE_TIMEOUT_MS`.
    CompileTimeout = "compile_timeout", 422, false, Other;
    // Loading a plugin.
    /// The plugin file could not be read (local runner).
    ReadFailed = "read_failed", 400, false, Other;
    /// The bytes are not a WebAssembly component.
    NotAComponent = "not_a_component", 400, false, Other;
    /// The component does not compile.
    CompileFailed = "compile_failed", 422, false, Other;
    /// The component imports something beyond WASI preview 2.
    ForbiddenImport = "forbidden_import", 422, false, Other;
    /// The component does not export the `imgflow:filter` world.
    WrongWorld = "wrong_world", 422, false, Other;
    /// The component's `metadata()` failed.
    MetadataFailed = "metadata_failed", 422, false, Other;
    /// The component's `metadata()` returned something unacceptable.
    InvalidMetadata = "invalid_metadata", 422, false, Other;
    // The local runner.
    /// The output file could not be written.
    WriteFailed = "write_failed", 500, false, Other;
    /// The runtime could not start.
    RuntimeUnavailable = "runtime", 500, false, Other;
}

impl ErrorCode {
    /// Parses a code, as stored in a job's `error_code`.
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == text)
    }

    /// Whether a job can fail with this code.
    pub fn is_job_failure(self) -> bool {
        matches!(self.scope(), Scope::Job | Scope::SubmissionAndJob)
    }

    /// Whether a job submission can be refused with this code.
    pub fn is_submission_rejection(self) -> bool {
        matches!(self.scope(), Scope::Submission | Scope::SubmissionAndJob)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why something failed: a code and a message for humans, and whether
/// trying again may succeed (by default what the code says; a caller that
/// knows better, such as a worker that could not reach storage, sets it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub transient: bool,
}

impl Failure {
    /// A failure with `code`, transient if the code is.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            transient: code.is_transient(),
        }
    }

    /// A failure that will happen again if tried again.
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            transient: false,
            ..Failure::new(code, message)
        }
    }

    /// A failure of the host, not of the job: worth another attempt.
    pub fn transient(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            transient: true,
            ..Failure::new(code, message)
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{text}"
            );
            assert_eq!(ErrorCode::parse(text), Some(code));
            assert!((400..600).contains(&code.http_status()), "{text}");
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
