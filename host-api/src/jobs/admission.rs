//! Admission: the checks every submission passes, a job or a batch, in
//! one order, cheapest first ([`admit`]): credentials, the client's rate
//! ([`crate::rates`]), the declared size,
//! the queue's room (and the client's share of it), then the body is read
//! ([`read_submission`]: a form or a raw image, its fields from the query
//! and the form alike), and its shape checked. What the submission asks
//! for is validated next, by [`super::recipe`].

use axum::extract::{FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use imgflow_platform::budget::Reservation;
use imgflow_platform::jobs::JobRecord;
use imgflow_platform::submission::{Source, SubmitFields, IMAGE_FIELD};
use imgflow_runtime::ErrorCode;
use sha2::{Digest as _, Sha256};

use crate::auth::Caller;
use crate::body::{self, Limited};
use crate::error::ApiError;
use crate::state::AppState;

/// What is submitted: one job (`POST /v1/jobs`) or a batch of them
/// (`POST /v1/batches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One image, a form or a raw body; may carry `Idempotency-Key` and
    /// `wait`.
    Job,
    /// One or more images (at most `MAX_BATCH_IMAGES`), a form only.
    Batch,
}

/// A submission past admission.
pub(crate) struct Admitted {
    /// Who sent it.
    pub(crate) caller: Caller,
    /// The job an earlier request with the same `Idempotency-Key` made:
    /// then nothing new is made.
    pub(crate) earlier: Option<JobRecord>,
    /// What it carries.
    pub(crate) submission: Submission,
}

/// Admission, cheapest first: credentials, what the headers allow for this
/// kind, the client's rate for one job ([`crate::rates`]), the declared size, the queue's room (and this client's share of
/// it) for one job, room in `API_DECODE_MEMORY_MB` for the body
/// ([`reserve_body`]), then the body is read and its shape checked, and for a
/// batch the rate and the room for every image. Every refusal before the body is read
/// still reads (and drops) what the client is sending, so it sees the
/// answer ([`body::refuse_early`]). The request is validated and the
/// images decoded afterwards ([`super::recipe`]).
pub(crate) async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
    kind: Kind,
) -> Result<Admitted, ApiError> {
    let limit = state.max_body_bytes;
    let (caller, request) =
        body::refuse_early(state.auth.caller(headers).await, request, 0).await?;
    let ((), request) = body::refuse_early(kind.check_headers(headers), request, limit).await?;
    let ((), request) = body::refuse_early(
        body::check_declared(headers, limit, "MAX_BODY_BYTES"),
        request,
        limit,
    )
    .await?;
    // A job counts against the client's rate before anything else is
    // looked up (a batch once its images are counted, below).
    let request = match kind {
        Kind::Job => {
            body::refuse_early(state.rates.take(caller, 1).await, request, limit)
                .await?
                .1
        }
        Kind::Batch => request,
    };
    // A client whose quota for today is used up is refused before its
    // images are read and decoded.
    let ((), request) =
        body::refuse_early(state.rates.check_quota(caller).await, request, limit).await?;
    // A repeated request (same Idempotency-Key) is answered with its job
    // even when the queue is full; only a new job needs room.
    let (earlier, request) =
        body::refuse_early(earlier_job(state, caller, headers).await, request, limit).await?;
    let request = match earlier {
        Some(_) => request,
        None => {
            body::refuse_early(room(state, caller, 1).await, request, limit)
                .await?
                .1
        }
    };
    let (memory, request) =
        body::refuse_early(reserve_body(state, headers).await, request, limit).await?;
    let mut submission = read_submission(state, headers, request).await?;
    submission.memory = memory;
    kind.check(state, &submission)?;
    if kind == Kind::Batch {
        let images = submission.images.len();
        state
            .rates
            .take(caller, u32::try_from(images).unwrap_or(u32::MAX))
            .await?;
        room(state, caller, images as u64).await?;
    }
    Ok(Admitted {
        caller,
        earlier,
        submission,
    })
}

/// Counts a refused submission (`api_jobs_rejected_total{reason}`) and
/// logs it; passes the answer on.
pub(crate) fn counted(
    state: &AppState,
    kind: Kind,
    answer: Result<axum::response::Response, ApiError>,
) -> Result<axum::response::Response, ApiError> {
    if let Err(e) = &answer {
        state.metrics.rejected(e.code());
        tracing::info!(code = %e.code(), kind = ?kind, "submission rejected");
    }
    answer
}

impl Kind {
    /// What the headers must say: a batch is a form, without
    /// `Idempotency-Key`.
    fn check_headers(self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self == Kind::Job {
            return Ok(());
        }
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.to_ascii_lowercase().starts_with("multipart/form-data"));
        if !is_form {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "a batch is a multipart/form-data form: one `image` field per image, and `action` or `steps`",
            ));
        }
        if headers.contains_key("idempotency-key") {
            return Err(ApiError::bad_request(
                "Idempotency-Key is not supported for batches; submit the jobs one by one to use it",
            ));
        }
        Ok(())
    }

    /// The submission's shape: how many images, and `wait` for jobs only.
    fn check(self, state: &AppState, submission: &Submission) -> Result<(), ApiError> {
        let count = submission.images.len();
        match self {
            Kind::Job if count > 1 => Err(ApiError::bad_request(format!(
                "the form has {count} image fields; a job takes one (POST /v1/batches takes several)"
            ))),
            Kind::Batch if submission.fields.wait.is_some() => Err(ApiError::bad_request(
                "wait is not supported for batches; wait for each job, or poll GET /v1/batches/{id}",
            )),
            Kind::Batch if count > state.max_batch_images => Err(ApiError::bad_request(format!(
                "{count} images; a batch takes at most {} (MAX_BATCH_IMAGES)",
                state.max_batch_images
            ))),
            _ => Ok(()),
        }
    }
}

/// What a submission carries, whatever its encoding: its images and its
/// fields (from the query and the form alike, [`SubmitFields`]).
pub(crate) struct Submission {
    /// The images (`image` fields, or the raw body): one for a job, one
    /// or more for a batch.
    pub(crate) images: Vec<Bytes>,
    /// Everything else it says.
    pub(crate) fields: SubmitFields,
    /// The body's room in `API_DECODE_MEMORY_MB` ([`reserve_body`]), given
    /// back when the submission is dropped.
    pub(crate) memory: Option<Reservation>,
}

/// Bodies up to this size are read without a reservation: however many
/// connections send them at once (`MAX_CONNECTIONS`), they hold little.
pub(crate) const SMALL_BODY: u64 = 64 * 1024;

/// Reserves room for the request's body in `API_DECODE_MEMORY_MB` before
/// it is read, so bodies being received count with images being decoded:
/// many large uploads at once (or held open, sent slowly) cannot take the
/// API past its budget. The declared `Content-Length` is reserved, or
/// `MAX_BODY_BYTES` when none is declared; a body of at most
/// [`SMALL_BODY`] is read without one. Waits at most `API_DECODE_WAIT`,
/// then `503 decode_busy`.
async fn reserve_body(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Reservation>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = declared.unwrap_or(state.max_body_bytes as u64);
    if bytes <= SMALL_BODY {
        return Ok(None);
    }
    state
        .decode_budget
        .reserve_within(bytes, state.decode_wait)
        .await
        .map(Some)
        .map_err(|e| ApiError::over_budget(e, "receiving this body"))
}

/// The job the caller submitted earlier with this request's
/// `Idempotency-Key`, if any.
async fn earlier_job(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
) -> Result<Option<JobRecord>, ApiError> {
    match idempotency_key(headers)? {
        Some(key) => Ok(state.jobs.by_idempotency_key(&caller.owner(), &key).await?),
        None => Ok(None),
    }
}

/// Whether the queue, and the caller's share of it, has room for `n` more
/// jobs: a check before the body is read. (A client's share is taken
/// atomically when each job is recorded, [`Jobs::submit`].) A client is
/// told of its own share only, never of the queue's depth.
pub(crate) async fn room(state: &AppState, caller: Caller, n: u64) -> Result<(), ApiError> {
    let cap = unfinished_cap(state, caller);
    let owner = cap.map(|_| caller.owner());
    let (depth, held) = state.queue.room(owner.as_deref()).await?;
    if depth + n > state.queue_max_depth {
        let message = match caller {
            Caller::Client(_) => "the queue is full; try again later".to_string(),
            _ => format!(
                "the queue holds {depth} jobs, its limit (QUEUE_MAX_DEPTH); try again later"
            ),
        };
        return Err(ApiError::new(ErrorCode::QueueFull, message));
    }
    if let Some(cap) = cap {
        if held + n > cap {
            return Err(ApiError::from(imgflow_platform::jobs::JobsError::OverCap {
                held,
            }));
        }
    }
    Ok(())
}

/// How many unfinished jobs `caller` may have (`KEY_MAX_UNFINISHED_JOBS`
/// for a client key; operators and anonymous callers have no share).
pub(crate) fn unfinished_cap(state: &AppState, caller: Caller) -> Option<u64> {
    matches!(caller, Caller::Client(_)).then_some(state.key_max_unfinished)
}

/// Reads a submission, a form or a raw image body, up to `MAX_BODY_BYTES`,
/// with its fields from the query and the form ([`SubmitFields`]), those
/// together within `MAX_FIELDS_BYTES`.
async fn read_submission(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Submission, ApiError> {
    let limit = state.max_body_bytes;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query = Query::<Vec<(String, String)>>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .and_then(|Query(pairs)| {
            SubmitFields::read(pairs, Source::Query)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        });
    let (query, request) = body::refuse_early(query, request, limit).await?;
    let (images, fields) = if content_type.starts_with("multipart/form-data") {
        let (images, form) = read_form(state, request).await?;
        let fields = query
            .merge(form)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        (images, fields)
    } else if content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream")
    {
        let image = match body::read(request.into_body(), limit).await {
            Limited::Body(bytes) => bytes,
            Limited::TooLarge => return Err(ApiError::too_large(limit, "MAX_BODY_BYTES")),
            Limited::Broken(e) => return Err(e),
        };
        (vec![image], query)
    } else {
        body::discard(request.into_body(), limit).await;
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send multipart/form-data (image, action or steps, params) or a raw image/* body with ?action=NAME or ?steps=...",
        ));
    };
    if images.is_empty() {
        return Err(ApiError::bad_request("the form has no `image` file field"));
    }
    if fields.action.is_none() && fields.steps.is_none() {
        return Err(ApiError::bad_request(
            "name an action (or steps), in the query (?action=NAME) or the form (-F action=NAME)",
        ));
    }
    Ok(Submission {
        images,
        fields,
        memory: None,
    })
}

/// Reads a multipart form: its `image` files (each within the body limit,
/// enforced while streaming) and its other fields as text, all of those
/// together within `MAX_FIELDS_BYTES` (read a chunk at a time, so an
/// oversized field is never held). A bad field is reported after the whole
/// form is read, so the client sees the answer instead of a connection
/// closed mid-upload.
async fn read_form(
    state: &AppState,
    request: Request,
) -> Result<(Vec<Bytes>, SubmitFields), ApiError> {
    let limit = state.max_body_bytes;
    let mut left = state.max_fields_bytes;
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut images = Vec::new();
    let mut pairs = Vec::new();
    let mut bad_field = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(body::multipart_error(e, limit, "MAX_BODY_BYTES")),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == IMAGE_FIELD {
            let data = field
                .bytes()
                .await
                .map_err(|e| body::multipart_error(e, limit, "MAX_BODY_BYTES"))?;
            images.push(data);
            continue;
        }
        left = left.saturating_sub(name.len());
        let mut value = Vec::new();
        let mut over = false;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| body::multipart_error(e, limit, "MAX_BODY_BYTES"))?
        {
            if over || chunk.len() > left {
                over = true;
                continue;
            }
            left -= chunk.len();
            value.extend_from_slice(&chunk);
        }
        let parsed = if over {
            Err(ApiError::new(
                ErrorCode::FieldsTooLarge,
                format!(
                    "the form's fields other than image are over {} bytes together (MAX_FIELDS_BYTES); {} is too long",
                    state.max_fields_bytes,
                    imgflow_runtime::text::excerpt(&name)
                ),
            ))
        } else {
            String::from_utf8(value)
                .map(|text| pairs.push((name.clone(), text.trim().to_string())))
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "field {} is not UTF-8 text",
                        imgflow_runtime::text::excerpt(&name)
                    ))
                })
        };
        if let Err(e) = parsed {
            bad_field.get_or_insert(e);
        }
    }
    if let Some(e) = bad_field {
        return Err(e);
    }
    let fields = SubmitFields::read(pairs, Source::Form)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((images, fields))
}

/// The idempotency key of a request, checked: 1 to 200 visible ASCII
/// characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if (1..=200).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            Ok(Some(key.to_string()))
        }
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 200 printable ASCII characters",
        )),
    }
}

impl Submission {
    /// The SHA-256 of the (first) image (the request digest and the
    /// result-cache key are made from it).
    pub(crate) fn image_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.images[0]).into()
    }
}
