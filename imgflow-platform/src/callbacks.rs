//! Webhooks: which targets a job's outcome may be delivered to, and the
//! record of delivering it.
//!
//! A job submitted with a `callback_url` gets a pending delivery the moment
//! it finishes (completed, failed or cancelled): the same `UPDATE` that
//! finishes it sets `callback_status = 'pending'` and `callback_next_at`
//! ([`crate::jobs`]), so a delivery is never lost between the two. A
//! sender claims due deliveries ([`Callbacks::claim`], each claim a
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
    /// The target names this machine (`localhost`, `*.localhost`).
    #[error("{0} names this machine; callbacks go to public addresses only (CALLBACK_ALLOW_PRIVATE=true allows others)")]
    LocalName(String),
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

/// Why `ip` is not a public address (`Some(kind)`), or `None` if it is.
///
/// Every range of IANA's IPv4 and IPv6 special-purpose address registries
/// (RFC 6890 and its updates) is refused, with multicast and the reserved
/// 240.0.0.0/4. An IPv6 address must be global unicast (`2000::/3`), and
/// every IPv6 form that carries an IPv4 address inside it (IPv4-mapped
/// `::ffff:0:0/96`, IPv4-compatible `::/96`, IPv4-translated
/// `::ffff:0:0:0/96`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4
/// `2002::/16`, Teredo `2001::/32`) is refused whatever the IPv4 address
/// is: a receiver is given by its own IPv4 or IPv6 address.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

/// IPv4 ranges that are not public: `(network, prefix length, kind)`.
const SPECIAL_V4: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 8, "\"this network\" (unspecified)"),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "shared (CGNAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "IETF protocol assignment"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 31, 196, 0], 24, "AS112"),
    ([192, 52, 193, 0], 24, "AMT"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast"),
    ([192, 168, 0, 0], 16, "private"),
    ([192, 175, 48, 0], 24, "AS112 direct delegation"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
    ([255, 255, 255, 255], 32, "broadcast"),
];

fn non_public_v4(ip: std::net::Ipv4Addr) -> Option<&'static str> {
    let bits = u32::from(ip);
    SPECIAL_V4.iter().find_map(|(net, len, kind)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        (bits & mask == u32::from_be_bytes(*net) & mask).then_some(*kind)
    })
}

/// IPv6 ranges that are not public, checked in order (the first match
/// names the kind): `(network, prefix length, kind)`.
const SPECIAL_V6: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    (0xffff_0000_0000, 96, "IPv4-mapped"),
    (0xffff_0000_0000_0000, 96, "IPv4-translated"),
    (0, 96, "IPv4-compatible"),
    (0x0064_ff9b << 96, 96, "NAT64"),
    (
        (0x0064_ff9b_u128 << 96) | (1 << 80),
        48,
        "NAT64 (local use)",
    ),
    (0x0100 << 112, 64, "discard-only"),
    (0x2001_0000 << 96, 32, "Teredo"),
    (0x2001_0db8 << 96, 32, "documentation"),
    (0x2001 << 112, 23, "IETF protocol assignment"),
    (0x2002 << 112, 16, "6to4"),
    ((0x2620_004f_8000_u128) << 80, 48, "AS112 direct delegation"),
    (0x3fff << 112, 20, "documentation"),
    (0x5f00 << 112, 16, "segment routing (SRv6)"),
    (0xfc00 << 112, 7, "private (unique local)"),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local"),
    (0xff00 << 112, 8, "multicast"),
];

fn non_public_v6(ip: std::net::Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    let special = SPECIAL_V6.iter().find_map(|(net, len, kind)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
        (bits & mask == net & mask).then_some(*kind)
    });
    // Beyond the registry: only global unicast (2000::/3) is routed.
    special.or_else(|| (bits >> 125 != 0b001).then_some("not global unicast"))
}

/// Host names that always mean this machine (RFC 6761), refused at
/// submission without looking them up.
fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
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
        Some(url::Host::Domain(name)) => {
            if !allow_private && is_local_name(name) {
                return Err(TargetError::LocalName(name.to_string()));
            }
            None
        }
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

/// Pending deliveries, for the sender. Cheap to clone.
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
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "192.0.0.170",
            "192.0.2.1",
            "192.31.196.1",
            "192.52.193.1",
            "192.88.99.1",
            "192.175.48.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:8.8.8.8",
            "::ffff:0:7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::808:808",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:20::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:808:808::1",
            "2620:4f:8000::1",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "4000::1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(non_public(ip).is_some(), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.254",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert_eq!(non_public(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn submitted_urls() {
        assert!(check_submitted("https://example.com/hook", false).is_ok());
        assert!(
            check_submitted("http://receiver.example:9/hook", false).is_ok(),
            "a name is checked at connect"
        );
        for bad in [
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "http://127.0.0.1/",
            "http://[::1]:8080/",
            "http://[::127.0.0.1]/",
            "http://[2002:7f00:1::1]/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://localhost:9/hook",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://169.254.169.254/latest/meta-data",
            "not a url",
        ] {
            assert!(check_submitted(bad, false).is_err(), "{bad}");
        }
        assert!(check_submitted("http://127.0.0.1:9/", true).is_ok());
        assert!(check_submitted("http://localhost:9/", true).is_ok());
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
