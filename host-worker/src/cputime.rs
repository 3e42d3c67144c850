//! The CPU time a job's image work takes: what its owner is charged.
//!
//! A job's owner is charged the worker time its job took (the queue's
//! fair order, [`imgflow_platform::queue`]). Wall time overcharged the
//! light keys: a small job that waited on the machine's other processes
//! for a core, or on a slow disk while its result was stored, was charged
//! the wait, and its key then waited behind a flood's jobs until the flood
//! had been charged as much. The CPU time the job's threads spent on it
//! is what it cost the worker: measured on each poll of its image work
//! ([`Meter::future`], the thread the poll runs on) and in each piece of
//! it sent to a blocking thread ([`Meter::call`]).
//!
//! A plugin that waits (a WASI clock) holds its slot without being
//! charged for the wait; its job's time limit bounds it. A job that ran
//! out of its time limit is charged at least its wall time since its image
//! work began ([`Meter::charge`]): a decode or encode past the deadline
//! goes on, uncounted, on its blocking thread.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The CPU time measured so far across the threads a job's work ran on,
/// and when its first poll began.
#[derive(Clone, Debug, Default)]
pub struct Meter(Arc<Measured>);

#[derive(Debug, Default)]
struct Measured {
    nanos: AtomicU64,
    began: OnceLock<Instant>,
}

impl Meter {
    /// The CPU time measured so far.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.0.nanos.load(Ordering::Relaxed))
    }

    /// What the job is charged: the CPU time measured, or, if it ran out
    /// of its time limit (`timed_out`), at least its wall time since its
    /// first poll of [`Meter::future`].
    pub fn charge(&self, timed_out: bool) -> Duration {
        let cpu = self.total();
        match self.0.began.get() {
            Some(began) if timed_out => cpu.max(began.elapsed()),
            _ => cpu,
        }
    }

    /// Runs `work` on this thread, adding the CPU time it takes.
    pub fn call<T>(&self, work: impl FnOnce() -> T) -> T {
        let before = thread_cpu();
        let out = work();
        self.add(thread_cpu().saturating_sub(before));
        out
    }

    /// `work`, adding the CPU time of each of its polls (on whichever
    /// thread polls it).
    pub fn future<F: Future>(&self, work: F) -> impl Future<Output = F::Output> {
        let meter = self.clone();
        let mut work = Box::pin(work);
        std::future::poll_fn(move |cx| {
            meter.0.began.get_or_init(Instant::now);
            meter.call(|| work.as_mut().poll(cx))
        })
    }

    fn add(&self, spent: Duration) {
        let nanos = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        self.0.nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins this thread until it has used `d` of CPU time (however busy
    /// the machine's cores are).
    fn spin(d: Duration) -> u64 {
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu().saturating_sub(start) < d {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        x
    }

    /// Work that waits is charged only for what it computed: a poll's
    /// CPU time counts, the sleep between polls does not.
    #[tokio::test]
    async fn a_future_is_charged_its_polls_not_its_waits() {
        let meter = Meter::default();
        meter
            .future(async {
                spin(Duration::from_millis(30));
                tokio::time::sleep(Duration::from_millis(200)).await;
                spin(Duration::from_millis(30));
            })
            .await;
        let charged = meter.total();
        assert!(
            charged >= Duration::from_millis(60) && charged < Duration::from_millis(200),
            "charged {charged:?} for 60 ms of CPU and a 200 ms wait"
        );
    }

    /// A job that ran out of its time limit is charged its wall time even
    /// where its CPU time went uncounted (a blocking thread still busy).
    #[tokio::test]
    async fn a_job_out_of_time_is_charged_at_least_its_wall_time() {
        let meter = Meter::default();
        meter
            .future(tokio::time::sleep(Duration::from_millis(100)))
            .await;
        assert!(meter.charge(false) < Duration::from_millis(20));
        assert!(meter.charge(true) >= Duration::from_millis(100));
    }

    /// Work on a blocking thread adds to the same meter.
    #[tokio::test]
    async fn work_on_a_blocking_thread_adds_to_the_meter() {
        let meter = Meter::default();
        let m = meter.clone();
        tokio::task::spawn_blocking(move || m.call(|| spin(Duration::from_millis(30))))
            .await
            .unwrap();
        let m = meter.clone();
        tokio::task::spawn_blocking(move || {
            m.call(|| std::thread::sleep(Duration::from_millis(100)))
        })
        .await
        .unwrap();
        let charged = meter.total();
        assert!(
            charged >= Duration::from_millis(30) && charged < Duration::from_millis(100),
            "charged {charged:?} for 30 ms of CPU and a 100 ms sleep"
        );
    }
}
