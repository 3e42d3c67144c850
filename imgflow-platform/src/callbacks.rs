//! Webhooks: which targets a job's outcome may be delivered to, and the
//! record of delivering it.
//!
//! A job submitted with a `callback_url` gets a pending delivery the moment
//! it finishes (completed, failed or cancelled): the same `UPDATE` that
//! finishes it sets `callback_status = 'pending'` and `callback_next_at`
//! ([`crate::jobs`]), so a delivery is never lost between the two. A
//! deliverer claims due deliveries ([`Callbacks::claim`], each claim a
//! lease, so several API instances never try the same one at once), makes
//! the attempt, records it ([`Callbacks::record`]) and settles what comes
//! next ([`Callbacks::settle`]): delivered, another attempt later, or given
//! up.
//!
//! Targets: `http` or `https`, no credentials in the URL, and, unless
//! private targets are allowed (`CALLBACK_ALLOW_PRIVATE`), only public
//! addresses: a literal address is checked at submission, and every
//! address a name resolves to is checked when connecting ([`non_public`]),
//! so a name that later resolves to an internal address is refused too.

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use thiserror::Error;
use url::Url;
use uuid::Uuid;

use crate::jobs::JobRecord;

/// The longest callback URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Why a callback target is refused.
#[derive(Debug, Error)]
pub enum TargetError {
    /// Not a URL.
    #[error("callback_url is not a URL: {0}")]
    Malformed(String),
    /// Not http or https.
    #[error("callback_url must be http or https, not {0:?}")]
    Scheme(String),
    /// User name or password in the URL.
    #[error("callback_url must not carry a user name or password")]
    Credentials,
    /// Over [`MAX_URL_LEN`].
    #[error("callback_url is longer than {MAX_URL_LEN} characters")]
    TooLong,
    /// The target is (or resolves to) an address that is not public.
    #[error("{host} is {ip}, a {kind} address; callbacks go to public addresses only (CALLBACK_ALLOW_PRIVATE=true allows others)")]
    NotPublic {
        /// The URL's host.
        host: String,
        /// The address.
        ip: IpAddr,
        /// What kind of address it is.
        kind: &'static str,
    },
}

/// Why `ip` is not a public address (`Some(kind)`), or `None` if it is:
/// loopback, private (RFC 1918, unique local), link-local (cloud metadata
/// services live there), shared (CGNAT), unspecified, multicast, broadcast,
/// documentation and benchmarking ranges, and IPv4 inside IPv6 of any of
/// those.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || a >= 224 {
                Some("multicast or reserved")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (CGNAT)")
            } else if (a == 192 && b == 0 && (c == 0 || c == 2))
                || (a == 198 && b == 51 && c == 100)
                || (a == 203 && b == 0 && c == 113)
            {
                Some("special-purpose or documentation")
            } else if a == 198 && (b == 18 || b == 19) {
                Some("benchmarking")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("documentation")
            } else if first == 0x0064 && v6.segments()[1] == 0xff9b {
                Some("NAT64")
            } else {
                None
            }
        }
    }
}

/// Checks a callback URL as submitted: its form and, when its host is a
/// literal address, that address. A name is checked when connecting.
pub fn check_submitted(text: &str, allow_private: bool) -> Result<Url, TargetError> {
    if text.len() > MAX_URL_LEN {
        return Err(TargetError::TooLong);
    }
    let url = Url::parse(text).map_err(|e| TargetError::Malformed(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(TargetError::Malformed("no host".into())),
    };
    if let (false, Some(ip)) = (allow_private, ip) {
        check_address(url.host_str().unwrap_or_default(), ip)?;
    }
    Ok(url)
}

/// Refuses `ip` (an address of `host`) unless it is public.
pub fn check_address(host: &str, ip: IpAddr) -> Result<(), TargetError> {
    match non_public(ip) {
        Some(kind) => Err(TargetError::NotPublic {
            host: host.to_string(),
            ip,
            kind,
        }),
        None => Ok(()),
    }
}

/// What an attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The receiver's status code, if it answered.
    pub status_code: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it took.
    pub took: Duration,
}

impl Attempt {
    /// Whether the receiver took the delivery (a 2xx answer).
    pub fn delivered(&self) -> bool {
        self.error.is_none() && self.status_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// A recorded attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRecord {
    /// Its number, from 1.
    pub attempt: i32,
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The receiver's status code, if it answered.
    pub status_code: Option<i32>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub took_ms: f64,
}

/// What comes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// The receiver took it: nothing more.
    Delivered,
    /// Try again after this long.
    RetryIn(Duration),
    /// Stop trying (the retry time is spent).
    GiveUp,
}

/// The backoff before attempt `n + 1` after `n` failed ones: 1 s doubling
/// to at most 5 minutes, with up to a quarter more at random so receivers
/// that come back are not hit by every retry at once. (A persisted
/// schedule, one step at a time, rather than `backon`'s in-process loop.)
pub fn backoff(failed: u32) -> Duration {
    let base =
        Duration::from_secs(1 << failed.saturating_sub(1).min(8)).min(Duration::from_secs(300));
    let jitter = rand::random::<f64>() * 0.25;
    base.mul_f64(1.0 + jitter)
}

/// Pending deliveries, for the deliverer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Callbacks {
    db: PgPool,
}

impl Callbacks {
    /// The deliveries in this database.
    pub fn new(db: PgPool) -> Callbacks {
        Callbacks { db }
    }

    /// Claims up to `limit` due deliveries for `lease` (another claimer
    /// skips them meanwhile; an attempt that dies is retried when the lease
    /// lapses). Returns their jobs.
    pub async fn claim(&self, lease: Duration, limit: i64) -> Result<Vec<JobRecord>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE jobs SET callback_next_at = now() + make_interval(secs => $1)
             WHERE id IN (SELECT id FROM jobs
                          WHERE callback_next_at <= now() AND callback_status = 'pending'
                          ORDER BY callback_next_at
                          LIMIT $2
                          FOR UPDATE SKIP LOCKED)
             RETURNING *",
        )
        .bind(lease.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.db)
        .await
    }

    /// Records an attempt on `job`'s delivery; returns its number (from 1).
    pub async fn record(&self, job: Uuid, attempt: &Attempt) -> Result<i32, sqlx::Error> {
        let (n,): (i32,) = sqlx::query_as(
            "INSERT INTO callback_attempts (job_id, attempt, status_code, error, took_ms)
             SELECT $1, COALESCE(max(attempt), 0) + 1, $2, $3, $4
             FROM callback_attempts WHERE job_id = $1
             RETURNING attempt",
        )
        .bind(job)
        .bind(attempt.status_code.map(i32::from))
        .bind(&attempt.error)
        .bind(attempt.took.as_secs_f64() * 1000.0)
        .fetch_one(&self.db)
        .await?;
        Ok(n)
    }

    /// Settles `job`'s delivery after an attempt.
    pub async fn settle(&self, job: Uuid, next: Next) -> Result<(), sqlx::Error> {
        let (status, retry_in) = match next {
            Next::Delivered => ("delivered", None),
            Next::GiveUp => ("gave_up", None),
            Next::RetryIn(after) => ("pending", Some(after.as_secs_f64())),
        };
        sqlx::query(
            "UPDATE jobs SET callback_status = $2,
                             callback_next_at = now() + make_interval(secs => $3)
             WHERE id = $1",
        )
        .bind(job)
        .bind(status)
        .bind(retry_in)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Every attempt on `job`'s delivery, oldest first.
    pub async fn attempts(&self, job: Uuid) -> Result<Vec<AttemptRecord>, sqlx::Error> {
        sqlx::query_as(
            "SELECT attempt, at, status_code, error, took_ms FROM callback_attempts
             WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(job)
        .fetch_all(&self.db)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(non_public(ip).is_some(), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"] {
            assert_eq!(non_public(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn submitted_urls() {
        assert!(check_submitted("https://example.com/hook", false).is_ok());
        assert!(
            check_submitted("http://localhost:9/hook", false).is_ok(),
            "a name is checked at connect"
        );
        for bad in [
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "http://127.0.0.1/",
            "http://[::1]:8080/",
            "http://169.254.169.254/latest/meta-data",
            "not a url",
        ] {
            assert!(check_submitted(bad, false).is_err(), "{bad}");
        }
        assert!(check_submitted("http://127.0.0.1:9/", true).is_ok());
        assert!(
            check_submitted(&format!("https://example.com/{}", "a".repeat(3000)), false).is_err()
        );
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let secs = |n| backoff(n).as_secs_f64();
        assert!((1.0..=1.25).contains(&secs(1)));
        assert!((2.0..=2.5).contains(&secs(2)));
        assert!((8.0..=10.0).contains(&secs(4)));
        assert!((256.0..=375.0).contains(&secs(20)));
    }
}
