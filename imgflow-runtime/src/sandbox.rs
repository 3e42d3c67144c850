//! The per-job sandbox: the state of one wasmtime `Store`.
//!
//! Every job gets a fresh store, so nothing a plugin does survives the job.
//! WASI is granted with no capabilities at all: no preopened directories, no
//! environment variables, no arguments, no network (sockets and name lookups
//! are denied), and stdin is empty. Standard output and error are captured
//! up to a cap and handed to `tracing` after the call.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Limits applied to one store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_memory_bytes: usize,
    pub max_table_elements: usize,
    pub max_instances: usize,
}

/// The data of a job's `Store`.
pub(crate) struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: JobLimiter,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
}

impl Sandbox {
    /// A sandbox with no capabilities, `limits`, and output capped at
    /// `output_cap` bytes a stream.
    pub fn new(limits: Limits, output_cap: usize) -> Sandbox {
        let stdout = CapturedOutput::new(output_cap);
        let stderr = CapturedOutput::new(output_cap);
        // WasiCtxBuilder starts with nothing: no preopens, no env, no args,
        // no network and no name lookups; only clocks and random are live.
        let wasi = {
            let mut b = WasiCtxBuilder::new();
            b.stdout(stdout.clone())
                .stderr(stderr.clone())
                .allow_ip_name_lookup(false)
                .allow_tcp(false)
                .allow_udp(false)
                .build()
        };
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            limiter: JobLimiter {
                limits,
                memory_bytes: 0,
                exceeded: None,
            },
            stdout,
            stderr,
        }
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Enforces the memory, table and instance limits, and remembers whether a
/// limit was hit so the failure is reported as `out_of_memory` whatever shape
/// the resulting error takes (a trap, an allocation-failure abort, an
/// instantiation error).
///
/// The memory limit is one budget for the whole job: the sum of every linear
/// memory of every core instance in the component, so a component made of
/// several instances (or with several memories) cannot multiply it.
pub(crate) struct JobLimiter {
    pub limits: Limits,
    /// The bytes of linear memory the job's memories hold together.
    memory_bytes: usize,
    /// What was asked for beyond the limit, if anything.
    pub exceeded: Option<String>,
}

impl ResourceLimiter for JobLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A new memory is reported growing from 0 to its initial size, so
        // the sum covers every memory from its creation.
        let total = self
            .memory_bytes
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.limits.max_memory_bytes {
            let mib = |b: usize| b.div_ceil(1024 * 1024);
            let detail = if total == desired {
                format!("asked for {} MiB of linear memory", mib(desired))
            } else {
                format!(
                    "asked for {} MiB of linear memory in all (one memory growing to {} MiB while the others hold {} MiB)",
                    mib(total),
                    mib(desired),
                    mib(total - desired)
                )
            };
            self.exceeded = Some(detail.clone());
            return Err(wasmtime::format_err!("memory limit exceeded: {detail}"));
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.max_table_elements {
            let detail = format!(
                "asked for a table of {desired} elements, over the limit of {}",
                self.limits.max_table_elements
            );
            self.exceeded = Some(detail.clone());
            return Err(wasmtime::format_err!("table limit exceeded: {detail}"));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.max_instances
    }

    fn tables(&self) -> usize {
        self.limits.max_instances
    }

    fn memories(&self) -> usize {
        self.limits.max_instances
    }
}

/// A plugin's stdout or stderr: kept in memory up to a cap, beyond which
/// writes still succeed (so a chatty plugin does not crash) but are dropped.
#[derive(Clone)]
pub(crate) struct CapturedOutput(Arc<Mutex<Capture>>);

struct Capture {
    data: Vec<u8>,
    cap: usize,
    dropped: usize,
}

impl CapturedOutput {
    fn new(cap: usize) -> CapturedOutput {
        CapturedOutput(Arc::new(Mutex::new(Capture {
            data: Vec::new(),
            cap,
            dropped: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Capture> {
        // A poisoned lock only means another thread panicked mid-write; the
        // bytes are still fine to read.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.lock();
        let room = c.cap.saturating_sub(c.data.len());
        let keep = bytes.len().min(room);
        c.data.extend_from_slice(&bytes[..keep]);
        c.dropped += bytes.len() - keep;
    }

    /// The captured text (lossy UTF-8) and how many bytes were dropped.
    pub fn take(&self) -> (String, usize) {
        let mut c = self.lock();
        let text = String::from_utf8_lossy(&c.data).into_owned();
        c.data.clear();
        (text, std::mem::take(&mut c.dropped))
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
