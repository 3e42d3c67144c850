//! The worker's image-work slots (`CONCURRENCY`), handed out fairly
//! across client keys.
//!
//! A worker takes up to a few jobs per slot from the queue, so that
//! reading inputs, storing results and recording outcomes overlap with
//! other jobs' image work. The jobs it holds wait here for a slot. The
//! queue already orders jobs fairly across keys; without this, a key's
//! job taken right after another key's flood would still wait behind the
//! flood's jobs the worker took before it. When a slot frees, it goes to
//! the waiting job whose key has the fewest jobs in image work now; among
//! those, to the one that has waited longest.
//!
//! A slot's work runs on image-work threads ([`Slot::run`], a runtime of
//! one thread per slot), not on the worker's async threads: decoding, a
//! plugin call (which yields only at each epoch tick) and encoding hold a
//! thread for milliseconds, and on the async threads they held up the
//! worker's reads of the queue, its lease renewals and its outcome
//! recording meanwhile. (Large decodes and encodes still go to blocking
//! threads, and every thread shares the machine's cores.)

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use tracing::Instrument as _;

/// The image-work slots of one worker, and the threads their work runs on.
#[derive(Clone)]
pub struct Slots {
    inner: Arc<Mutex<State>>,
    threads: Arc<Threads>,
}

/// The image-work threads: a runtime of one thread per slot. Stopped
/// without waiting when the last [`Slots`] goes (work still running there
/// is past its job's deadline or abandoned).
struct Threads(Option<tokio::runtime::Runtime>);

impl Drop for Threads {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Free slots, jobs in image work by key, and the jobs waiting.
struct State {
    free: usize,
    busy: HashMap<String, usize>,
    waiting: VecDeque<Waiter>,
}

/// A job waiting for a slot.
struct Waiter {
    owner: String,
    grant: oneshot::Sender<Slot>,
}

/// A slot held by a job of `owner`; given back when dropped.
pub struct Slot {
    /// `None` once counted out without being given back.
    slots: Option<Slots>,
    owner: String,
}

/// The slots are gone (the worker is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the worker's image-work slots are closed")]
pub struct Closed;

impl Slots {
    /// `count` slots (at least one), each with a thread of its own.
    pub fn new(count: usize) -> std::io::Result<Slots> {
        let count = count.max(1);
        let threads = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(count)
            .thread_name("imgflow-image")
            // A plugin that computes wakes itself at every epoch tick and
            // these threads seldom park: check the timers (the job's
            // deadline) at every scheduling, not every 61st.
            .event_interval(1)
            .enable_all()
            .build()?;
        Ok(Slots {
            inner: Arc::new(Mutex::new(State {
                free: count,
                busy: HashMap::new(),
                waiting: VecDeque::new(),
            })),
            threads: Arc::new(Threads(Some(threads))),
        })
    }

    /// The state; a panic elsewhere while it was held leaves it usable
    /// (each change to it is complete before anything can panic).
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot for a job of `owner`. Cancel-safe: a slot handed
    /// to a waiter that has gone is given back.
    pub async fn acquire(&self, owner: &str) -> Result<Slot, Closed> {
        let waiting = {
            let mut state = self.state();
            state.waiting.retain(|w| !w.grant.is_closed());
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                *state.busy.entry(owner.to_string()).or_default() += 1;
                return Ok(Slot {
                    slots: Some(self.clone()),
                    owner: owner.to_string(),
                });
            }
            let (grant, waiting) = oneshot::channel();
            state.waiting.push_back(Waiter {
                owner: owner.to_string(),
                grant,
            });
            waiting
        };
        waiting.await.map_err(|_| Closed)
    }

    /// Jobs in image work now, of every key.
    pub fn busy(&self) -> usize {
        self.state().busy.values().sum()
    }

    /// Gives `owner`'s slot back: to the waiting job whose key has the
    /// fewest jobs in image work, or to the free ones.
    fn release(&self, owner: &str) {
        let mut state = self.state();
        state.done(owner);
        loop {
            // Waiters whose job has gone (cancelled, deadline) are dropped.
            state.waiting.retain(|w| !w.grant.is_closed());
            let next = {
                let busy = &state.busy;
                state
                    .waiting
                    .iter()
                    .enumerate()
                    .min_by_key(|(i, w)| (busy.get(&w.owner).copied().unwrap_or(0), *i))
                    .map(|(i, _)| i)
            };
            let Some(waiter) = next.and_then(|i| state.waiting.remove(i)) else {
                state.free += 1;
                return;
            };
            *state.busy.entry(waiter.owner.clone()).or_default() += 1;
            let slot = Slot {
                slots: Some(self.clone()),
                owner: waiter.owner.clone(),
            };
            // `send` never drops the slot here (the lock is held): it is
            // handed back if the receiver has gone, and a receiver that
            // goes after the send drops it on its own side (tokio's
            // oneshot), which gives it back through `release`.
            match waiter.grant.send(slot) {
                Ok(()) => return,
                Err(mut slot) => {
                    // It went between the check and the send: count it
                    // out here (the lock is held) and try the next.
                    slot.slots = None;
                    state.done(&waiter.owner);
                }
            }
        }
    }
}

impl State {
    /// One job of `owner` is out of image work.
    fn done(&mut self, owner: &str) {
        if let Some(n) = self.busy.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.busy.remove(owner);
            }
        }
    }
}

impl Slot {
    /// Runs `work` on the image-work threads, in the current span, and
    /// waits for it. The slot goes with the work: it is given back once the
    /// work has ended or, if the returned future is dropped (the job
    /// cancelled or deleted), once the work has stopped at its next yield.
    /// A panic in `work` panics here.
    pub async fn run<F>(self, work: F) -> Result<F::Output, Closed>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let threads = self.slots.as_ref().and_then(|s| s.threads.0.as_ref());
        let Some(threads) = threads.map(|t| t.handle().clone()) else {
            return Err(Closed);
        };
        let work = async move {
            let _slot = self;
            work.await
        };
        let task = tokio_util::task::AbortOnDropHandle::new(threads.spawn(work.in_current_span()));
        match task.await {
            Ok(out) => Ok(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Closed),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(&self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A key's job taken after another key's waiting jobs gets the next
    /// slot; jobs of one key go in the order they came.
    #[tokio::test]
    async fn the_next_slot_goes_to_the_key_with_fewest_in_image_work() {
        let slots = Slots::new(2).unwrap();
        let held = slots.acquire("a").await.unwrap();
        let also_held = slots.acquire("a").await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, owner) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = slots.acquire(owner).await.unwrap();
                tx.send((i, owner)).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            });
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let first = rx.recv().await.unwrap();
        drop(also_held);
        let mut order = vec![first];
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, vec![(3, "b"), (0, "a"), (1, "a"), (2, "a")]);
        // The last job still holds its slot for a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(slots.busy(), 0);
    }

    /// A waiter that goes away (its job cancelled) does not keep a slot.
    #[tokio::test]
    async fn a_slot_handed_to_a_waiter_that_went_is_given_back() {
        let slots = Slots::new(1).unwrap();
        let held = slots.acquire("a").await.unwrap();
        let gone = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("b").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(1), slots.acquire("c")).await;
        assert!(again.is_ok(), "the slot was lost");
        drop(again);
        assert_eq!(slots.busy(), 0);
    }

    /// A slot's work runs on an image-work thread; dropping its future
    /// aborts it there.
    #[tokio::test]
    async fn a_slots_work_runs_on_its_own_threads_and_stops_when_dropped() {
        let slots = Slots::new(1).unwrap();
        let slot = slots.acquire("a").await.unwrap();
        let name = slot
            .run(async { std::thread::current().name().map(String::from) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("imgflow-image"));
        assert_eq!(slots.busy(), 0, "the slot came back with the work");
        let (tx, rx) = oneshot::channel::<()>();
        let slot = slots.acquire("a").await.unwrap();
        let abandoned = slot.run(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        let _ = tokio::time::timeout(Duration::from_millis(20), abandoned).await;
        // The work was aborted: its sender is dropped without a send, and
        // the slot is free again.
        let gone = tokio::time::timeout(Duration::from_secs(1), rx).await;
        assert!(matches!(gone, Ok(Err(_))), "the abandoned work still runs");
        let again = tokio::time::timeout(Duration::from_secs(1), slots.acquire("b")).await;
        assert!(again.is_ok(), "the abandoned work kept its slot");
    }
}
