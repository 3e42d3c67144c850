//! Keeping a running job's lease: while the job runs, its queue entry is
//! re-claimed every third of `LEASE_MS`, so no other worker takes it over;
//! but only until the job's deadline (plus a tick): a job still running
//! then is wedged, and its lease lapses so another worker takes it over and
//! the attempt counts. Each renewal also checks the job: one cancelled or
//! deleted meanwhile (an announcement lost) is reported, so its worker
//! abandons it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use imgflow_platform::jobs::{JobStatus, Jobs};
use imgflow_platform::queue::Queue;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Who holds leases, where, and for how long.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The jobs (to check one is still wanted).
    pub jobs: Jobs,
    /// The queue whose entries are leased.
    pub queue: Queue,
    /// The consumer holding the leases (`WORKER_ID`).
    pub worker_id: String,
    /// How long a lease lasts unrenewed (`LEASE_MS`).
    pub lease: Duration,
}

/// Keeps job `id`'s lease on `entry` until the returned task is aborted,
/// or the job's `deadline` (set once it starts running) is a second past.
/// The receiver hears `()` if the job was found cancelled or deleted.
pub fn keep(
    ctx: Holder,
    id: Uuid,
    entry: String,
    deadline: Arc<OnceLock<Instant>>,
) -> (JoinHandle<()>, oneshot::Receiver<()>) {
    let (gone_tx, gone) = oneshot::channel::<()>();
    let renewer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ctx.lease / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            match ctx.jobs.status(id).await {
                Ok(None) | Ok(Some(JobStatus::Cancelled)) => {
                    let _ = gone_tx.send(());
                    return;
                }
                _ => {}
            }
            if deadline
                .get()
                .is_some_and(|d: &Instant| d.elapsed() > Duration::from_secs(1))
            {
                tracing::warn!("the job is past its deadline; no longer renewing its lease");
                return;
            }
            if let Err(e) = ctx.queue.renew(&ctx.worker_id, &entry).await {
                tracing::warn!(error = %e, "cannot renew the job's lease");
            }
        }
    });
    (renewer, gone)
}
