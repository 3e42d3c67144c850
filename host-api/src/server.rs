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

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use imgflow_platform::config::HumanDuration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The HTTP limits; each flag also reads the environment variable of the
/// same name.
#[derive(Debug, Clone, Args)]
pub struct HttpLimits {
    /// How long a client has to send a request's headers (and, on a
    /// keep-alive connection, to start its next request) before the
    /// connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: HumanDuration,
    /// How long a client has to send a request's body; a body still
    /// arriving after it is answered 408 and the connection closed.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "60s")]
    pub body_read_timeout: HumanDuration,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u32,
    /// After a shutdown signal, how long requests in flight may take before
    /// their connections are dropped.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: HumanDuration,
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves,
/// then for at most the shutdown deadline.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout.0))
        .keep_alive_timeout(limits.header_read_timeout.0);
    let builder = Arc::new(builder);
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
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
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
