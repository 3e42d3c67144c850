//! Retrying transient failures with capped exponential backoff and jitter.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// The first delay.
const BASE: Duration = Duration::from_millis(100);
/// The longest delay.
const CAP: Duration = Duration::from_secs(5);

/// The delay before retry number `attempt` (0-based): `BASE * 2^attempt`,
/// capped at `CAP`, then "full jitter" (a random delay up to that), so many
/// workers hitting the same outage do not retry in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1u32 << attempt.min(16)).min(CAP);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis.max(1)))
}

/// Runs `op` up to `attempts` times while it fails, sleeping [`backoff`]
/// between tries; returns the last error.
pub async fn retry<T, E, F, Fut>(what: &str, attempts: u32, mut op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt + 1 >= attempts => return Err(e),
            Err(e) => {
                let delay = backoff(attempt);
                tracing::warn!(what, attempt = attempt + 1, error = %e, delay_ms = delay.as_millis() as u64, "transient failure, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..30 {
            let d = backoff(attempt);
            assert!(d <= CAP, "{attempt}: {d:?}");
        }
        assert!(backoff(0) <= BASE);
        assert!(backoff(20) >= CAP / 2);
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
