//! Serving HTTP with limits a hostile client cannot get around.
//!
//! `axum::serve` has no timeouts: a client that trickles its headers, or
//! never sends its body, holds a connection (and its task) for ever, and a
//! graceful shutdown waits for it. Here every connection is served by
//! hyper with:
//!
//! - a **header read timeout** (`HEADER_READ_TIMEOUT`): the whole request
//!   head must arrive within it, or the connection is closed. It also bounds
//!   an idle keep-alive connection: the next request's head must arrive
//!   within it too.
//! - a **body read timeout** (`BODY_READ_TIMEOUT`, [`crate::body::Deadline`],
//!   a layer of the router): a body still arriving after it is cut, and
//!   answered 408.
//! - a **cap on connections** (`MAX_CONNECTIONS`): beyond it, new ones wait
//!   in the kernel's backlog until one closes.
//! - a **shutdown deadline** (`SHUTDOWN_TIMEOUT`): after the signal, no new
//!   connection is accepted, open ones are asked to finish their request and
//!   close, and whatever is still open at the deadline is dropped.
//! - a **cap on a request's head**: the request line and headers of an
//!   HTTP/1 request must fit in [`HttpLimits::max_fields_bytes`] plus
//!   [`HEADER_ROOM`] (hyper answers 431 beyond), so a connection's read
//!   buffer stays small; the query string alone is held to
//!   `MAX_FIELDS_BYTES` by the router (414).
//! - **HTTP/1 only** unless `HTTP2=true`: one HTTP/2 connection carries many
//!   requests at once, so the connection cap would not bound requests; with
//!   HTTP/2 on, each connection runs at most `HTTP2_MAX_STREAMS` at once
//!   (more are refused with `REFUSED_STREAM`).
//!
//! Each request carries its peer's address ([`axum::extract::ConnectInfo`]),
//! the only address the API believes (no forwarding header is trusted).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Layer as _;

pub use imgflow_settings::HttpLimits;

/// Room for a request's headers beside its query string in hyper's read
/// buffer (HTTP/1).
pub const HEADER_ROOM: usize = 32 * 1024;

/// How each connection is served: HTTP/1 with a header deadline and a
/// bounded read buffer; HTTP/2 (cleartext) only when `limits.http2`, with
/// its streams bounded.
fn connection_builder(limits: &HttpLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size((limits.max_fields_bytes as usize + HEADER_ROOM).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout.0))
        .keep_alive_timeout(limits.header_read_timeout.0)
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size((limits.max_fields_bytes as usize + HEADER_ROOM) as u32);
    if limits.http2 {
        builder
    } else {
        builder.http1_only()
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves,
/// then for at most the shutdown deadline.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let builder = Arc::new(connection_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1) as usize));
    let graceful = GracefulShutdown::new();
    // Past the deadline, every connection task is told to drop its
    // connection.
    let (kill, killed) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: not fatal; pause briefly.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            axum::Extension(axum::extract::ConnectInfo(peer)).layer(router.clone()),
        );
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let mut killed = killed.clone();
        tokio::spawn(async move {
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection closed with an error");
                },
                _ = killed.wait_for(|k| *k) => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    let deadline = limits.shutdown_timeout.0;
    tracing::info!(
        deadline_ms = deadline.as_millis() as u64,
        "API stopping: finishing requests in flight"
    );
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline are dropped");
    }
    let _ = kill.send(true);
    Ok(())
}
