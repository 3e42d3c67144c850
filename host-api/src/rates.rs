//! Each client's rate of submissions: jobs a second with a burst, per
//! client key, shared by every API instance (an account in Redis,
//! [`Queue::take_rate`]); its daily quota of work, megapixels of input a
//! UTC day ([`Queue::charge_quota`]). A client reads its own in `GET
//! /v1/usage` ([`crate::usage`]).
//!
//! A key's rate is its own if an operator set one (`PUT
//! /v1/keys/{id}/limits`), else the API's default (`KEY_RATE_LIMIT`,
//! `KEY_RATE_BURST`); a rate of 0 is no limit, and then nothing is asked of
//! Redis. A job costs one, a batch one per image. Over the rate, `429
//! rate_limited` with `Retry-After` and the `RateLimit-Policy` and
//! `RateLimit` headers (IETF draft `draft-ietf-httpapi-ratelimit-headers`):
//! the policy's quota is the burst and its window the time to refill it.
//!
//! A key's quota is its own (`daily_megapixels`) or `KEY_DAILY_MEGAPIXELS`;
//! 0 is none. A submission is charged its images' megapixels once they are
//! validated, and given them back if it is not recorded (refused later, or
//! an earlier job returned for its `Idempotency-Key`). Over the quota, `429
//! quota_exceeded` until the next UTC day, with the same headers for the
//! policy `"megapixels"` (whole megapixels, a window of a day).

use axum::http::{HeaderName, HeaderValue};
use chrono::{Timelike as _, Utc};
use imgflow_platform::keys::{KeyLimits, Keys};
use imgflow_platform::queue::{Queue, RateTaken};
use imgflow_runtime::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;

/// The name of the rate in the `RateLimit` headers.
const POLICY: &str = "jobs";

/// The name of the daily quota in the `RateLimit` headers.
const QUOTA_POLICY: &str = "megapixels";

/// The rate limiter of submissions and keeper of daily quotas. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Rates {
    keys: Keys,
    queue: Queue,
    default: Rate,
    /// `KEY_DAILY_MEGAPIXELS` (0: none).
    default_quota: f64,
}

/// A charge to a client's daily quota ([`Rates::charge`]), to give back
/// ([`Rates::refund`]) if its submission is not recorded.
#[derive(Debug)]
#[must_use]
pub struct Charge(Option<(String, String, f64)>);

/// A rate in force: jobs a second, and how many at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Rate {
    /// Jobs a second (0: no limit).
    pub per_second: f64,
    /// How many jobs may be submitted at once.
    pub burst: u32,
}

impl Rate {
    /// A rate of `per_second` with `burst` (0: one second's worth).
    pub fn new(per_second: f64, burst: u32) -> Rate {
        let burst = if burst == 0 {
            per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
        } else {
            burst
        };
        Rate { per_second, burst }
    }

    /// Whether it limits anything.
    fn limits(self) -> bool {
        self.per_second > 0.0
    }

    /// How long the whole burst takes to refill, in whole seconds (the
    /// policy's window).
    fn window(self) -> u64 {
        (f64::from(self.burst) / self.per_second).ceil().max(1.0) as u64
    }
}

impl Rates {
    /// The limiter, with `KEY_RATE_LIMIT` and `KEY_RATE_BURST` as
    /// `default`, and `KEY_DAILY_MEGAPIXELS` as `default_quota`.
    pub fn new(keys: Keys, queue: Queue, default: Rate, default_quota: f64) -> Rates {
        Rates {
            keys,
            queue,
            default,
            default_quota,
        }
    }

    /// The rate and the daily quota `caller` submits under (`None` for an
    /// operator).
    async fn limits_of(&self, caller: Caller) -> Result<Option<(Rate, f64)>, ApiError> {
        Ok(match caller {
            Caller::Admin => None,
            Caller::Anonymous => Some((self.default, self.default_quota)),
            Caller::Client(id) => {
                let own = self.keys.limits(id).await?;
                let quota = own.daily_megapixels.unwrap_or(self.default_quota);
                Some((self.rate_with(own), quota))
            }
        })
    }

    /// The rate in force for a key with limits `own`.
    fn rate_with(&self, own: KeyLimits) -> Rate {
        let KeyLimits {
            rate_per_second,
            rate_burst,
            ..
        } = own;
        match rate_per_second {
            Some(per_second) => Rate::new(per_second, rate_burst.unwrap_or(0).max(0) as u32),
            None => match rate_burst {
                Some(burst) => Rate::new(self.default.per_second, burst.max(0) as u32),
                None => self.default,
            },
        }
    }

    /// The rate `caller` submits under: `None` for an operator, or when it
    /// is no limit.
    pub async fn rate_of(&self, caller: Caller) -> Result<Option<Rate>, ApiError> {
        let limits = self.limits_of(caller).await?;
        Ok(limits.map(|(rate, _)| rate).filter(|rate| rate.limits()))
    }

    /// The daily quota of megapixels `caller` submits under: `None` for
    /// an operator, or when it has none.
    pub(crate) async fn quota_of(&self, caller: Caller) -> Result<Option<f64>, ApiError> {
        let limits = self.limits_of(caller).await?;
        Ok(limits.map(|(_, quota)| quota).filter(|quota| *quota > 0.0))
    }

    /// Charges `megapixels` to `caller`'s quota for today (UTC), or refuses
    /// with `429 quota_exceeded` (or, for more than a whole day's quota,
    /// which could never pass, `422 image_too_large`).
    pub async fn charge(&self, caller: Caller, megapixels: f64) -> Result<Charge, ApiError> {
        let Some(quota) = self.quota_of(caller).await? else {
            return Ok(Charge(None));
        };
        if megapixels > quota {
            return Err(ApiError::new(
                ErrorCode::ImageTooLarge,
                format!("{megapixels:.3} megapixels is more than this client's daily quota of {quota} megapixels"),
            ));
        }
        let owner = caller.owner();
        let (day, left_today) = today();
        let (charged, used) = self
            .queue
            .charge_quota(&owner, &day, megapixels, quota)
            .await?;
        if charged {
            return Ok(Charge(Some((owner, day, megapixels))));
        }
        Err(over_quota(quota, used, left_today))
    }

    /// Refuses `caller` with `429 quota_exceeded` if its quota for today
    /// is used up: a cheap check before its body is read and its images
    /// decoded ([`Rates::charge`] charges them afterwards).
    pub async fn check_quota(&self, caller: Caller) -> Result<(), ApiError> {
        let Some(quota) = self.quota_of(caller).await? else {
            return Ok(());
        };
        let (day, left_today) = today();
        let used = self.queue.quota_used(&caller.owner(), &day).await?;
        if used < quota {
            return Ok(());
        }
        Err(over_quota(quota, used, left_today))
    }

    /// Gives back a charge whose submission was not recorded.
    pub async fn refund(&self, charge: Charge) {
        let Some((owner, day, megapixels)) = charge.0 else {
            return;
        };
        if let Err(e) = self.queue.refund_quota(&owner, &day, megapixels).await {
            tracing::warn!(owner, error = %e, "cannot give back a refused submission's quota");
        }
    }

    /// Takes `cost` jobs from `caller`'s rate, or refuses with `429
    /// rate_limited` (or, for more jobs at once than its burst, which
    /// could never pass, `400 invalid_request`).
    pub async fn take(&self, caller: Caller, cost: u32) -> Result<(), ApiError> {
        let Some(rate) = self.rate_of(caller).await? else {
            return Ok(());
        };
        if cost > rate.burst {
            return Err(ApiError::bad_request(format!(
                "{cost} jobs at once is more than this client's burst of {} (its rate: {} jobs a second); send them in smaller batches",
                rate.burst, rate.per_second
            )));
        }
        let taken = self
            .queue
            .take_rate(&caller.owner(), rate.per_second, rate.burst, cost)
            .await?;
        if taken.allowed {
            return Ok(());
        }
        let wait = taken.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let error = ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "this client may submit {} jobs a second, {} at once; try again in {wait} s",
                rate.per_second, rate.burst
            ),
        )
        .retry_after(wait);
        Err(headers(rate, taken)
            .into_iter()
            .fold(error, |e, (name, value)| e.with_header(name, value)))
    }

    /// What `caller`'s rate has left, without taking anything.
    pub(crate) async fn left(&self, caller: Caller, rate: Rate) -> Result<RateTaken, ApiError> {
        Ok(self
            .queue
            .take_rate(&caller.owner(), rate.per_second, rate.burst, 0)
            .await?)
    }
}

/// `429 quota_exceeded`: `used` of `quota` megapixels today, which has
/// `left_today` seconds left.
fn over_quota(quota: f64, used: f64, left_today: u64) -> ApiError {
    let error = ApiError::new(
        ErrorCode::QuotaExceeded,
        format!(
            "this client used {used:.3} of its {quota} megapixels for today (UTC), and this submission would pass it; the quota starts again in {left_today} s"
        ),
    )
    .retry_after(left_today);
    let left = (quota - used).max(0.0).floor() as u64;
    quota_headers(quota, left, left_today)
        .into_iter()
        .fold(error, |e, (name, value)| e.with_header(name, value))
}

/// Today's UTC date, and the whole seconds left of it.
pub(crate) fn today() -> (String, u64) {
    let now = Utc::now();
    let left = 86_400 - u64::from(now.num_seconds_from_midnight());
    (now.format("%Y-%m-%d").to_string(), left.max(1))
}

/// The `RateLimit-Policy` and `RateLimit` headers of `rate` as `taken`
/// left it.
fn headers(rate: Rate, taken: RateTaken) -> Vec<(HeaderName, HeaderValue)> {
    let reset = taken.full_in.as_secs_f64().ceil() as u64;
    pair(
        POLICY,
        u64::from(rate.burst),
        rate.window(),
        taken.remaining,
        reset,
    )
}

/// The same headers for a daily quota of `quota` megapixels with `left`
/// left for `reset` more seconds.
fn quota_headers(quota: f64, left: u64, reset: u64) -> Vec<(HeaderName, HeaderValue)> {
    pair(QUOTA_POLICY, quota.floor() as u64, 86_400, left, reset)
}

/// `RateLimit-Policy: "<name>";q=<quota>;w=<window>` and
/// `RateLimit: "<name>";r=<left>;t=<reset>`.
fn pair(
    name: &str,
    quota: u64,
    window: u64,
    left: u64,
    reset: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let policy = format!("\"{name}\";q={quota};w={window}");
    let state = format!("\"{name}\";r={left};t={reset}");
    [("ratelimit-policy", policy), ("ratelimit", state)]
        .into_iter()
        .filter_map(|(name, value)| {
            Some((
                HeaderName::from_static(name),
                HeaderValue::from_str(&value).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_zero_is_one_seconds_worth() {
        assert_eq!(Rate::new(2.5, 0).burst, 3);
        assert_eq!(Rate::new(0.2, 0).burst, 1);
        assert_eq!(Rate::new(5.0, 20).burst, 20);
        assert!(!Rate::new(0.0, 0).limits());
    }

    #[test]
    fn headers_say_the_quota_window_and_what_is_left() {
        let taken = RateTaken {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_millis(400),
            full_in: Duration::from_millis(1_400),
        };
        let headers = headers(Rate::new(2.0, 3), taken);
        assert_eq!(headers[0].0, "ratelimit-policy");
        assert_eq!(headers[0].1, "\"jobs\";q=3;w=2");
        assert_eq!(headers[1].0, "ratelimit");
        assert_eq!(headers[1].1, "\"jobs\";r=0;t=2");
    }

    #[test]
    fn a_quota_is_said_in_whole_megapixels_over_a_day() {
        let headers = quota_headers(1.5, 0, 3_600);
        assert_eq!(headers[0].1, "\"megapixels\";q=1;w=86400");
        assert_eq!(headers[1].1, "\"megapixels\";r=0;t=3600");
        let (day, left) = today();
        assert_eq!(day.len(), 10);
        assert!((1..=86_400).contains(&left));
    }
}
