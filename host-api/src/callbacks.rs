//! Delivering finished jobs to their `callback_url`: every API instance
//! runs a sender that claims due deliveries ([`Callbacks::claim`]),
//! POSTs each job's JSON, signed, and records the attempt. Deliveries run
//! apart from job processing (workers only mark them due), each bounded by
//! `CALLBACK_TIMEOUT`, at most `CALLBACK_CONCURRENCY` at once, so a slow or
//! failing receiver delays nothing but its own deliveries.
//!
//! The request: `POST` with `Content-Type: application/json`, the body the
//! job as `GET /v1/jobs/{id}` shows it, and
//!
//! - `Imgflow-Event`: `job.completed`, `job.failed` or `job.cancelled`;
//! - `Imgflow-Delivery`: the job's id, the same on every retry (receivers
//!   deduplicate on it);
//! - `Imgflow-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
//!   "<t>.<body>" with CALLBACK_SECRET>`.
//!
//! A 2xx answer delivers it; anything else (another status, a redirect,
//! which is never followed, a timeout, a refused target) is retried with
//! backoff ([`callbacks::backoff`]) until `CALLBACK_RETRY_FOR` after the job
//! finished. Targets are checked when connecting: every address the host
//! resolves to must be public unless `CALLBACK_ALLOW_PRIVATE=true`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use imgflow_platform::callbacks::{self, Attempt, Callbacks, Next, TargetError};
use imgflow_platform::jobs::JobRecord;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::auth::ResultUrls;
use crate::jobs::Job;
use crate::metrics::ApiMetrics;

/// How often due deliveries are looked for.
const POLL: Duration = Duration::from_millis(500);

/// What the sender needs.
pub struct WebhookSender {
    /// The pending deliveries.
    pub callbacks: Callbacks,
    /// Signs each delivery (`CALLBACK_SECRET`).
    pub secret: Vec<u8>,
    /// Makes the jobs' result URLs, as the API shows them.
    pub urls: ResultUrls,
    /// Whether targets may be private addresses (`CALLBACK_ALLOW_PRIVATE`).
    pub allow_private: bool,
    /// How long one attempt may take (`CALLBACK_TIMEOUT`).
    pub timeout: Duration,
    /// How long after a job finished its delivery is retried
    /// (`CALLBACK_RETRY_FOR`).
    pub retry_for: Duration,
    /// Attempts in flight at most (`CALLBACK_CONCURRENCY`).
    pub concurrency: usize,
    /// Counts the outcomes.
    pub metrics: Arc<ApiMetrics>,
}

/// A resolver that refuses names resolving to an address that is not
/// public, so the check holds when connecting (a name that resolved to a
/// public address at submission and to an internal one now is refused).
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for addr in &addrs {
                callbacks::check_address(&host, addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The outcome of one attempt, with the reason.
fn failed(error: impl std::fmt::Display, took: Duration) -> Attempt {
    Attempt {
        status_code: None,
        error: Some(error.to_string()),
        took,
    }
}

impl WebhookSender {
    /// Delivers for ever (abort the task to stop it).
    pub async fn run(self) {
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(self.timeout)
            .user_agent(concat!("imgflow/", env!("CARGO_PKG_VERSION")));
        if !self.allow_private {
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        let client = match client.build() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the callback client; callbacks are not delivered");
                return;
            }
        };
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.concurrency.max(1)));
        // A claim outlasts the attempt it covers.
        let lease = this.timeout + Duration::from_secs(30);
        loop {
            let free = slots.available_permits() as i64;
            let due = if free > 0 {
                match this.callbacks.claim(lease, free).await {
                    Ok(due) => due,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim callback deliveries; trying again");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let busy = due.len() as i64 == free && free > 0;
            for job in due {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (this, client) = (this.clone(), client.clone());
                tokio::spawn(async move {
                    this.deliver(&client, job).await;
                    drop(slot);
                });
            }
            if !busy {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Makes one attempt on `job`'s delivery, records it and settles what
    /// comes next.
    async fn deliver(&self, client: &reqwest::Client, job: JobRecord) {
        let Some(url) = job.callback_url.clone() else {
            return;
        };
        let started = Instant::now();
        let attempt = self.attempt(client, &url, &job).await;
        let recorded = self.callbacks.record(job.id, &attempt).await;
        let n = match recorded {
            Ok(n) => n,
            Err(e) => {
                // The job was deleted meanwhile (its attempts went with it),
                // or the database is down: the claim lapses and, if the job
                // is still there, it is tried again.
                tracing::warn!(job_id = %job.id, error = %e, "cannot record a callback attempt");
                return;
            }
        };
        let finished = job.finished_at.unwrap_or_else(chrono::Utc::now);
        let age = (chrono::Utc::now() - finished).to_std().unwrap_or_default();
        let next = if attempt.delivered() {
            Next::Delivered
        } else {
            let wait = callbacks::backoff(n as u32);
            if age + wait > self.retry_for {
                Next::GiveUp
            } else {
                Next::RetryIn(wait)
            }
        };
        self.metrics.callback(match next {
            Next::Delivered => "delivered",
            Next::RetryIn(_) => "failed",
            Next::GiveUp => "gave_up",
        });
        match next {
            Next::Delivered => {
                tracing::info!(job_id = %job.id, attempt = n, took_ms = started.elapsed().as_millis() as u64, "callback delivered")
            }
            _ => {
                tracing::warn!(job_id = %job.id, attempt = n, status = ?attempt.status_code, error = ?attempt.error, next = ?next, "callback not delivered")
            }
        }
        if let Err(e) = self.callbacks.settle(job.id, next).await {
            tracing::warn!(job_id = %job.id, error = %e, "cannot record the callback's next step");
        }
    }

    async fn attempt(&self, client: &reqwest::Client, url: &str, job: &JobRecord) -> Attempt {
        let started = Instant::now();
        // The address is checked again here: a literal one was checked at
        // submission, but CALLBACK_ALLOW_PRIVATE may have changed since.
        let target = match callbacks::check_submitted(url, self.allow_private) {
            Ok(target) => target,
            Err(e) => return failed(e, started.elapsed()),
        };
        let body = match serde_json::to_vec(&Job::new(job, &self.urls)) {
            Ok(body) => body,
            Err(e) => return failed(e, started.elapsed()),
        };
        let t = chrono::Utc::now().timestamp();
        let signature = sign(&self.secret, t, &body);
        let sent = client
            .post(target)
            .header("content-type", "application/json")
            .header("imgflow-event", format!("job.{}", job.status.as_str()))
            .header("imgflow-delivery", job.id.to_string())
            .header("imgflow-signature", format!("t={t},v1={signature}"))
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status();
                Attempt {
                    status_code: Some(status.as_u16()),
                    error: (!status.is_success()).then(|| {
                        if status.is_redirection() {
                            format!("answered {status} (redirects are not followed)")
                        } else {
                            format!("answered {status}")
                        }
                    }),
                    took: started.elapsed(),
                }
            }
            Err(e) => {
                let reason = refused_target(&e).map_or_else(|| describe(&e), |t| t.to_string());
                failed(reason, started.elapsed())
            }
        }
    }
}

/// The target refusal behind a request error, if that is what it was.
fn refused_target(error: &reqwest::Error) -> Option<&TargetError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<TargetError>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

/// A request error with its causes, for the attempt's record.
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out (CALLBACK_TIMEOUT)".to_string()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The hex HMAC-SHA256 of `"<t>.<body>"` with `secret`: what a receiver
/// recomputes to check `Imgflow-Signature`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_time_dot_body() {
        // RFC 4231-style check against an independent computation.
        let sig = sign(b"secret", 1700000000, b"{\"id\":1}");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"secret").unwrap();
        mac.update(b"1700000000.{\"id\":1}");
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
    }
}
