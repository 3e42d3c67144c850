//! Reading request bodies under a size limit.
//!
//! A body over the limit is answered with 413, but only after reading (and
//! discarding) what the client is still sending, up to twice the limit: an
//! HTTP/1 client that is still writing when the server answers and closes
//! would otherwise see a broken pipe instead of the 413 and its message.
//! A body that *declares* (`Content-Length`) more than that is not waited
//! for: it is answered at once, and the connection closed.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;

use crate::error::ApiError;

/// What reading a limited body found.
pub enum Limited {
    /// The whole body, within the limit.
    Body(Bytes),
    /// The body was over the limit (and was drained, as far as reasonable).
    TooLarge,
    /// The client went away, sent a broken body, or sent it too slowly
    /// (408): the answer to give.
    Broken(ApiError),
}

/// Whether the request declares (`Content-Length`) a body over `limit`, so
/// it can be refused before any of it is read into memory.
pub fn declared_over(headers: &HeaderMap, limit: usize) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|length| length > limit)
}

/// `checked`, or, when it is a refusal, that refusal once the request's
/// body has been read and dropped (up to about twice `limit`), so the
/// client reads the answer rather than a connection closed mid-upload.
/// Admission checks made before the body is read go through this.
pub async fn refuse_early<T>(
    checked: Result<T, ApiError>,
    request: Request,
    limit: usize,
) -> Result<(T, Request), ApiError> {
    match checked {
        Ok(value) => Ok((value, request)),
        Err(e) => {
            discard(request.into_body(), limit).await;
            Err(e)
        }
    }
}

/// The declared `Content-Length`, checked against `limit` (`setting` names
/// it in the refusal).
pub fn check_declared(headers: &HeaderMap, limit: usize, setting: &str) -> Result<(), ApiError> {
    if declared_over(headers, limit) {
        return Err(ApiError::too_large(limit, setting));
    }
    Ok(())
}

/// Reads `body` if it is at most `limit` bytes.
pub async fn read(body: Body, limit: usize) -> Limited {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Limited::Broken(read_error(&e)),
        };
        total = total.saturating_add(chunk.len());
        if total > limit {
            drain(stream, limit, total).await;
            return Limited::TooLarge;
        }
        buf.extend_from_slice(&chunk);
    }
    Limited::Body(buf.freeze())
}

/// Discards the rest of a body that will be refused, up to twice `limit`
/// (at least 1 MiB) in all.
pub async fn discard(body: Body, limit: usize) {
    drain(body.into_data_stream(), limit, 0).await;
}

async fn drain(mut stream: axum::body::BodyDataStream, limit: usize, mut seen: usize) {
    use http_body::Body as _;
    let cap = limit.saturating_mul(2).max(1 << 20);
    // A body declared larger than what would be drained is not waited for
    // (its client may never send it): the answer goes at once, and the
    // connection is closed after it.
    if stream.size_hint().lower() > (cap.saturating_sub(seen)) as u64 {
        return;
    }
    while seen <= cap {
        match stream.next().await {
            Some(Ok(chunk)) => seen = seen.saturating_add(chunk.len()),
            _ => return,
        }
    }
}

/// The answer to a multipart body that could not be read: 413 when it went
/// over `limit` (named by `setting`), 408 when it came too slowly, else 400.
pub fn multipart_error(
    e: axum::extract::multipart::MultipartError,
    limit: usize,
    setting: &str,
) -> crate::error::ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        crate::error::ApiError::too_large(limit, setting)
    } else {
        read_error(&e)
    }
}

/// The answer to a body that could not be read: 408 when the body read
/// timeout (`BODY_READ_TIMEOUT`) cut it, else 400.
fn read_error(e: &(dyn std::error::Error + 'static)) -> crate::error::ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut timed_out = false;
    while let Some(c) = cause {
        timed_out |= c.is::<BodyTimedOut>();
        cause = c.source();
    }
    // Multipart parsing keeps only the text of the error it met.
    timed_out |= e.to_string().contains(BODY_TIMED_OUT);
    if timed_out {
        crate::error::ApiError::new(
            imgflow_runtime::ErrorCode::RequestTimeout,
            "the request body did not arrive within BODY_READ_TIMEOUT",
        )
    } else {
        crate::error::ApiError::bad_request(format!("cannot read the request body: {e}"))
    }
}

const BODY_TIMED_OUT: &str = "the request body did not arrive within BODY_READ_TIMEOUT";

/// The error of a body cut by [`Deadline`].
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(BODY_TIMED_OUT)
    }
}

impl std::error::Error for BodyTimedOut {}

/// A request body that must arrive whole by a deadline: after it, reading
/// fails with [`BodyTimedOut`] (answered 408). Unlike a timeout between
/// chunks, a client cannot stretch it by trickling a byte at a time.
pub struct Deadline {
    body: Body,
    due: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    /// `body`, due within `timeout` from now.
    pub fn new(body: Body, timeout: std::time::Duration) -> Deadline {
        Deadline {
            body,
            due: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.due.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Middleware: every request body gets the `BODY_READ_TIMEOUT` deadline,
/// counted from when its headers were read.
pub async fn with_deadline(
    axum::extract::State(timeout): axum::extract::State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http_body::Body as _;
    // A request without a body (most of them) needs no timer.
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let request = request.map(|body| Body::new(Deadline::new(body, timeout)));
    next.run(request).await
}
