//! Hearing that a job changed, without asking PostgreSQL over and over.
//!
//! Every change of a job's state ([`crate::jobs`]) is announced on Redis
//! pub/sub ([`Queue::announce_job_change`]) as the job's id and what it
//! became. Each process that waits for jobs (the API's `?wait=` and event
//! streams, a worker watching for cancellation) holds one subscription,
//! [`JobEvents`], and hands out a [`JobWatch`] per job being waited for: a
//! waiting client costs one read when it starts and one when its job
//! changes, however long it waits.
//!
//! Pub/sub delivers only to whoever is subscribed at that moment: a change
//! announced while the subscription is down (Redis restarting) is lost. So
//! when the subscription is (re)established every watch hears
//! [`JobChange::Unknown`] and reads the job again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

pub use crate::jobs::JobChange;
use crate::jobs::{JobRecord, Jobs, JobsError};
use crate::queue::Queue;

/// One subscription to job changes, shared by every waiter in a process.
/// Cheap to clone; the subscription ends when the last clone is dropped.
#[derive(Clone)]
pub struct JobEvents {
    inner: Arc<Inner>,
}

struct Inner {
    /// One channel per job someone is watching, removed with its last watch.
    watched: Mutex<HashMap<Uuid, watch::Sender<JobChange>>>,
    /// Bumped when changes may have been missed: every watch reads again.
    resync: watch::Sender<u64>,
    /// Dropped with the last handle, which stops the listening task.
    _alive: watch::Sender<()>,
}

impl std::fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEvents")
            .field("watched", &self.watched_count())
            .finish()
    }
}

impl JobEvents {
    /// Subscribes to `queue`'s job changes, in a task that reconnects (with
    /// backoff) whenever the subscription drops.
    pub fn start(queue: Queue) -> JobEvents {
        let (alive, mut stopped) = watch::channel(());
        let inner = Arc::new(Inner {
            watched: Mutex::new(HashMap::new()),
            resync: watch::channel(0).0,
            _alive: alive,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            tokio::select! {
                () = listen(weak, queue) => {}
                _ = stopped.changed() => {}
            }
        });
        JobEvents { inner }
    }

    /// Starts watching job `id`. Watch first, then read the job: a change
    /// after the read is then always heard.
    pub fn watch(&self, id: Uuid) -> JobWatch {
        let own = {
            let mut watched = lock(&self.inner.watched);
            watched
                .entry(id)
                .or_insert_with(|| watch::channel(JobChange::Unknown).0)
                .subscribe()
        };
        JobWatch {
            id,
            own,
            resync: self.inner.resync.subscribe(),
            inner: self.inner.clone(),
        }
    }

    /// How many jobs are being watched now.
    pub fn watched_count(&self) -> usize {
        lock(&self.inner.watched).len()
    }

    /// Waits until job `id` finishes or `until` passes, whichever is first;
    /// returns the job as last read (`None`: it does not exist, or was
    /// deleted). Reads PostgreSQL once, then only when the job finished or
    /// changes may have been missed.
    pub async fn wait_finished(
        &self,
        jobs: &Jobs,
        id: Uuid,
        until: Instant,
    ) -> Result<Option<JobRecord>, JobsError> {
        let watch = self.watch(id);
        let job = jobs.get(id).await?;
        watch.until_finished(jobs, job, until).await
    }
}

/// Lost subscriptions are retried after this long at first, doubling up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

async fn listen(events: Weak<Inner>, queue: Queue) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match queue.job_changes().await {
            Ok(mut changes) => {
                backoff = FIRST_BACKOFF;
                // Anything announced before now was missed: read again.
                match events.upgrade() {
                    Some(inner) => inner.resync.send_modify(|n| *n += 1),
                    None => return,
                }
                while let Some((id, what)) = changes.next().await {
                    let Some(inner) = events.upgrade() else {
                        return;
                    };
                    let watched = lock(&inner.watched);
                    if let Some(sender) = watched.get(&id) {
                        sender.send_replace(JobChange::parse(&what));
                    }
                    drop(watched);
                }
                tracing::warn!("lost the job-change subscription; subscribing again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to job changes; retrying");
            }
        }
        match events.upgrade() {
            Some(inner) => inner.resync.send_modify(|n| *n += 1),
            None => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hears the changes of one job (see [`JobEvents::watch`]).
pub struct JobWatch {
    id: Uuid,
    own: watch::Receiver<JobChange>,
    resync: watch::Receiver<u64>,
    inner: Arc<Inner>,
}

impl JobWatch {
    /// Waits for the next change: what the job became (the latest, when
    /// several came at once), or [`JobChange::Unknown`] when changes may
    /// have been missed.
    pub async fn changed(&mut self) -> JobChange {
        tokio::select! {
            Ok(()) = self.own.changed() => *self.own.borrow_and_update(),
            Ok(()) = self.resync.changed() => JobChange::Unknown,
            else => std::future::pending().await,
        }
    }
}

impl JobWatch {
    /// Waits until the job finishes or `until` passes, from `job` as read
    /// after this watch began; returns the job as last read (`None`: it is
    /// gone). Reads PostgreSQL again only when the job finished, or changes
    /// may have been missed.
    pub async fn until_finished(
        mut self,
        jobs: &Jobs,
        mut job: Option<JobRecord>,
        until: Instant,
    ) -> Result<Option<JobRecord>, JobsError> {
        loop {
            match &job {
                Some(j) if !j.status.is_finished() => {}
                _ => return Ok(job),
            }
            tokio::select! {
                change = self.changed() => {
                    if change.is_final() || change == JobChange::Unknown {
                        job = jobs.get(self.id).await?;
                    }
                }
                () = tokio::time::sleep_until(until) => return Ok(job),
            }
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut watched = lock(&self.inner.watched);
        // This watch's receiver is still alive here: the last one counts 1.
        if watched
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            watched.remove(&self.id);
        }
    }
}
