//! Reading request bodies under a size limit.
//!
//! A body over the limit is answered with 413, but only after reading (and
//! discarding) what the client is still sending, up to twice the limit: an
//! HTTP/1 client that is still writing when the server answers and closes
//! would otherwise see a broken pipe instead of the 413 and its message.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;

/// What reading a limited body found.
pub enum Limited {
    /// The whole body, within the limit.
    Body(Bytes),
    /// The body was over the limit (and was drained, as far as reasonable).
    TooLarge,
    /// The client went away or sent a broken body.
    Broken(String),
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

/// Reads `body` if it is at most `limit` bytes.
pub async fn read(body: Body, limit: usize) -> Limited {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Limited::Broken(e.to_string()),
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
    let cap = limit.saturating_mul(2).max(1 << 20);
    while seen <= cap {
        match stream.next().await {
            Some(Ok(chunk)) => seen = seen.saturating_add(chunk.len()),
            _ => return,
        }
    }
}

/// The answer to a multipart body that could not be read: 413 when it went
/// over `limit` (named by `setting`), else 400.
pub fn multipart_error(
    e: axum::extract::multipart::MultipartError,
    limit: usize,
    setting: &str,
) -> crate::error::ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        crate::error::ApiError::too_large(limit, setting)
    } else {
        crate::error::ApiError::bad_request(e.body_text())
    }
}
