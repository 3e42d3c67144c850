//! Deleting finished jobs after `JOB_RETENTION`: their rows, inputs,
//! results and idempotency keys. Every API instance runs the sweep; a lock
//! in Redis lets one of them work each round, and each job is deleted by
//! exactly one ([`Jobs::expire`]). Each round also deletes the console
//! sessions that have ended by time ([`Sessions::expire`]) and a page of
//! job files no job needs ([`Jobs::sweep_orphans`]).

use std::sync::Arc;
use std::time::Duration;

use imgflow_platform::jobs::Jobs;
use imgflow_platform::sessions::Sessions;
use imgflow_platform::OrphanWalk;

use crate::metrics::{ApiMetrics, Deletion};

/// The most jobs deleted in one round (the next round goes on).
const BATCH: i64 = 500;

/// The most files of each folder the orphan sweep looks at in one round.
const ORPHAN_BATCH: usize = 1000;

/// The retention sweep.
pub struct Retention {
    /// The jobs.
    pub jobs: Jobs,
    /// The console's sessions.
    pub sessions: Sessions,
    /// Counts what was deleted.
    pub metrics: Arc<ApiMetrics>,
    /// How long finished jobs are kept; zero keeps them for ever.
    pub keep: Duration,
    /// How often to sweep.
    pub every: Duration,
    /// How old a job file no job needs must be to be deleted (`ORPHAN_GRACE`).
    pub orphan_grace: Duration,
}

impl Retention {
    /// Sweeps every `every` (for ever; abort the task to stop it). Does
    /// nothing when jobs are kept for ever.
    pub async fn run(self) {
        if self.keep.is_zero() {
            tracing::info!("JOB_RETENTION=0: finished jobs are kept for ever");
        }
        let every = self.every.max(Duration::from_millis(100));
        let holder = format!("api-{}", uuid::Uuid::now_v7().simple());
        // The first round one interval after start, once the migrations
        // have run.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut walk = OrphanWalk::default();
        loop {
            tick.tick().await;
            match self
                .jobs
                .sweep_orphans(&holder, every, self.orphan_grace, ORPHAN_BATCH, &mut walk)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.deleted(Deletion::OrphanFile, n);
                    tracing::info!(deleted = n, "deleted job files no job needs");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "orphan sweep failed; trying again next round")
                }
            }
            match self.sessions.expire().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "deleted ended console sessions"),
                Err(e) => tracing::warn!(error = %e, "cannot delete ended console sessions"),
            }
            if self.keep.is_zero() {
                continue;
            }
            // A full batch means more are due: go on at once.
            loop {
                match self.jobs.expire(&holder, every, self.keep, BATCH).await {
                    Ok(0) => break,
                    Ok(n) => {
                        self.metrics.deleted(Deletion::JobExpired, n);
                        tracing::info!(deleted = n, "deleted jobs past JOB_RETENTION");
                        if (n as i64) < BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed; trying again next round");
                        break;
                    }
                }
            }
        }
    }
}
