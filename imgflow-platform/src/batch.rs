//! Doing many small writes as one: callers hand an item to a [`Batcher`]
//! and wait for its answer; a few flushing tasks each take every item that
//! is waiting (up to a maximum) and write them in one statement. A lone
//! item goes at once; items gather while the previous flush commits
//! (PostgreSQL's fsync, about 0.1 to 2 ms here), and, while items keep
//! coming (the previous group was flushed less than [`BUSY`] ago), a
//! flusher also waits up to its `linger` for more: at a steady moderate
//! rate that turns one statement per item into one per few items, at the
//! cost of that much latency.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::{Duration, Instant};

/// A flusher lingers for more items only if its previous group was taken
/// less than this long ago: under a steady load, not for a lone item.
pub const BUSY: Duration = Duration::from_millis(20);

/// Why an item got no answer.
#[derive(Debug, thiserror::Error)]
#[error("the batch writer stopped")]
pub struct Stopped;

/// Hands items to flushing tasks and returns each its answer.
pub struct Batcher<T, R> {
    tx: mpsc::Sender<(T, oneshot::Sender<R>)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts `flushers` tasks that each take up to `max` waiting items at
    /// a time (waiting up to `linger` for more while busy) and pass them to
    /// `flush`, which returns one answer per item, in order. The tasks end
    /// when every [`Batcher`] handle is dropped.
    pub fn start<F, Fut>(max: usize, flushers: usize, linger: Duration, flush: F) -> Batcher<T, R>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send,
    {
        let (tx, rx) = mpsc::channel::<(T, oneshot::Sender<R>)>(max.max(1) * 4);
        let rx = Arc::new(Mutex::new(rx));
        let flush = Arc::new(flush);
        for _ in 0..flushers.max(1) {
            let (rx, flush) = (rx.clone(), flush.clone());
            tokio::spawn(async move {
                let mut last_group = Instant::now() - BUSY;
                loop {
                    let mut group = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(first) => group.push(first),
                            None => return,
                        }
                        let busy = last_group.elapsed() < BUSY;
                        let until = Instant::now() + linger;
                        while group.len() < max.max(1) {
                            match rx.try_recv() {
                                Ok(item) => group.push(item),
                                Err(_) if busy && !linger.is_zero() => {
                                    match tokio::time::timeout_at(until, rx.recv()).await {
                                        Ok(Some(item)) => group.push(item),
                                        _ => break,
                                    }
                                }
                                Err(_) => break,
                            }
                        }
                        last_group = Instant::now();
                    }
                    let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) =
                        group.into_iter().unzip();
                    let answers = flush(items).await;
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Batcher { tx }
    }

    /// Hands `item` over and waits for its answer.
    pub async fn call(&self, item: T) -> Result<R, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }

    /// Hands `item` over without waiting for its answer.
    pub async fn send(&self, item: T) -> Result<(), Stopped> {
        let (reply, _answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_gather_while_a_flush_runs_and_each_gets_its_answer() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = flushes.clone();
        let batcher = Batcher::start(64, 1, Duration::ZERO, move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                items.into_iter().map(|i| i * 2).collect()
            }
        });
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, i * 2);
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!(
            (4..200).contains(&n),
            "{n} flushes for 200 items of at most 64"
        );
    }
}
