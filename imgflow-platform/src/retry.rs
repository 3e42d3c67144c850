//! Retrying transient failures: capped exponential backoff with jitter
//! (`backon`), so many processes hitting the same outage do not retry in
//! lockstep. Delays start at 100 ms and are capped at 5 s.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// The first delay.
const BASE: Duration = Duration::from_millis(100);
/// The longest delay.
const CAP: Duration = Duration::from_secs(5);

fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(BASE)
        .with_max_delay(CAP)
        .with_jitter()
}

/// Runs `op` up to `attempts` times while it fails, sleeping between tries;
/// returns the last error.
pub async fn retry<T, E, F, Fut>(what: &str, attempts: u32, op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let times = attempts.saturating_sub(1) as usize;
    op.retry(policy().with_max_times(times))
        .notify(|e, delay| {
            tracing::warn!(what, error = %e, delay_ms = delay.as_millis() as u64, "transient failure, retrying");
        })
        .await
}

/// Runs `op` until it succeeds, or until `give_up()` says so after a
/// failure (then the last error is returned). For waiting on a service at
/// start.
pub async fn until_ok<T, E, F, Fut>(what: &str, op: F, give_up: impl Fn() -> bool) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    op.retry(policy().without_max_times())
        .when(|_| !give_up())
        .notify(|e, delay| {
            tracing::warn!(what, error = %e, delay_ms = delay.as_millis() as u64, "waiting for a service");
        })
        .await
}

/// The delays of a loop that retries by itself (a reader reconnecting):
/// call [`Backoff::next_delay`] after each failure and [`Backoff::reset`]
/// after a success.
pub struct Backoff(ExponentialBackoff);

impl Backoff {
    /// A fresh sequence.
    pub fn new() -> Backoff {
        Backoff(policy().without_max_times().build())
    }

    /// The delay before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next().unwrap_or(CAP)
    }

    /// Starts again from the first delay.
    pub fn reset(&mut self) {
        *self = Backoff::new();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..30).map(|_| backoff.next_delay()).collect();
        // With jitter, a delay is up to twice its step.
        assert!(delays.iter().all(|d| *d <= CAP * 2), "{delays:?}");
        assert!(delays[0] <= BASE * 2, "{delays:?}");
        assert!(delays[29] >= CAP, "{delays:?}");
    }

    #[tokio::test]
    async fn retries_until_success_or_the_limit() {
        let mut calls = 0;
        let r: Result<u32, String> = retry("test", 3, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(format!("fail {n}"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(3));
        let mut calls = 0;
        let r: Result<u32, String> = retry("test", 2, || {
            calls += 1;
            async { Err("always".to_string()) }
        })
        .await;
        assert_eq!((r, calls), (Err("always".to_string()), 2));
    }
}
