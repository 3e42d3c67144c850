//! Client API keys: created and revoked by an operator, checked on every
//! request of a client.
//!
//! A key reads `ifk_<id>_<secret>`: the id (a UUID, 32 hex digits) finds
//! the record, the secret (256 random bits, 64 hex digits) proves the
//! holder. Only the secret's SHA-256 is stored, and it is compared in
//! constant time. The full key is shown once, when it is created.

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

/// What every key starts with, so a leaked key is recognisable (and
/// secret scanners can be taught it).
pub const PREFIX: &str = "ifk_";

/// A key as listed: everything but the secret.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRecord {
    /// The key's id: the owner recorded on its jobs.
    pub id: Uuid,
    /// What the operator called it.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Its own limits, where an operator set them.
    #[sqlx(flatten)]
    pub limits: KeyLimits,
}

/// A client key's own limits, set by an operator; each `None` is the API's
/// default (`KEY_RATE_LIMIT`, `KEY_RATE_BURST`, `KEY_DAILY_MEGAPIXELS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, sqlx::FromRow)]
pub struct KeyLimits {
    /// Jobs a second (0: no limit).
    pub rate_per_second: Option<f64>,
    /// Jobs it may send at once.
    pub rate_burst: Option<i32>,
    /// Megapixels of input a UTC day (0: no quota).
    pub daily_megapixels: Option<f64>,
    /// Its share of the workers' time (`None`: 1, as every key): with
    /// several keys waiting, each gets worker time in proportion to its
    /// share ([`crate::queue::Queue::set_shares`]).
    pub share: Option<f64>,
}

/// Why the keys' shares could not be given to the queue
/// ([`Keys::apply_shares`]).
#[derive(Debug, thiserror::Error)]
pub enum SharesError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis failed.
    #[error("queue: {0}")]
    Queue(#[from] crate::queue::QueueError),
}

/// The columns of a [`KeyRecord`], as statements select and return them.
const RECORD: &str =
    "id, name, created_at, revoked_at, rate_per_second, rate_burst, daily_megapixels, share";

/// A key just created: the record and the secret key, shown only now.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The record.
    pub record: KeyRecord,
    /// The whole key, `ifk_<id>_<secret>`, for the client.
    pub key: String,
}

/// How long a verified key is believed without asking PostgreSQL again:
/// a revocation takes effect on every API instance within it (and at once
/// on the instance that revoked it, and for any job being recorded: the
/// insert checks the key, [`crate::jobs::Jobs::submit`]).
pub const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The most keys remembered at once (the memory is emptied when full, so
/// a flood of wrong keys costs lookups, not memory).
const REMEMBERED: usize = 10_000;

/// The key store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Keys {
    db: PgPool,
    /// Keys verified lately.
    verified: std::sync::Arc<std::sync::Mutex<Verified>>,
    /// Keys' limits read lately.
    limits: std::sync::Arc<std::sync::Mutex<Limits>>,
}

/// Keys' limits read lately, by key id; and when.
type Limits = std::collections::HashMap<Uuid, (KeyLimits, std::time::Instant)>;

/// Keys verified lately, by the SHA-256 of the whole key: its id, or
/// `None` if it is not a live key; and when.
type Verified = std::collections::HashMap<[u8; 32], (Option<Uuid>, std::time::Instant)>;

impl Keys {
    /// The store in this database.
    pub fn new(db: PgPool) -> Keys {
        Keys {
            db,
            verified: Default::default(),
            limits: Default::default(),
        }
    }

    /// Creates a key called `name`.
    pub async fn create(&self, name: &str) -> Result<NewKey, sqlx::Error> {
        let id = Uuid::now_v7();
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let secret = hex::encode(secret);
        let record: KeyRecord = sqlx::query_as(&format!(
            "INSERT INTO api_keys (id, name, hash) VALUES ($1, $2, $3) RETURNING {RECORD}"
        ))
        .bind(id)
        .bind(name)
        .bind(hash(&secret).as_slice())
        .fetch_one(&self.db)
        .await?;
        Ok(NewKey {
            record,
            key: format!("{PREFIX}{}_{secret}", id.simple()),
        })
    }

    /// Every key that is not revoked, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {RECORD} FROM api_keys WHERE revoked_at IS NULL ORDER BY id"
        ))
        .fetch_all(&self.db)
        .await
    }

    /// Revokes a key: it stops working at once, and its console sessions
    /// end with it. Returns false if there is no such live key.
    pub async fn revoke(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM console_sessions WHERE key_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // Forgotten here at once (other instances within VERIFIED_FOR).
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (answer, _)| *answer != Some(id));
        Ok(done.rows_affected() == 1)
    }

    /// The id of the live key `key`, or `None` if it is not one (malformed,
    /// unknown, revoked or a wrong secret; which, the caller is not told).
    /// An answer is remembered for [`VERIFIED_FOR`].
    pub async fn verify(&self, key: &str) -> Result<Option<Uuid>, sqlx::Error> {
        let Some((id, secret)) = parse(key) else {
            return Ok(None);
        };
        let digest = hash(key);
        let remembered = {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            verified
                .get(&digest)
                .filter(|(_, at)| at.elapsed() < VERIFIED_FOR)
                .map(|(answer, _)| *answer)
        };
        if let Some(answer) = remembered {
            return Ok(answer);
        }
        let answer = self.look_up(id, secret).await?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= REMEMBERED {
            verified.clear();
        }
        verified.insert(digest, (answer, std::time::Instant::now()));
        Ok(answer)
    }

    /// The key `id`'s own limits (all `None` for no such key). An answer
    /// is remembered for [`VERIFIED_FOR`], so a change made on another API
    /// instance takes effect here within it.
    pub async fn limits(&self, id: Uuid) -> Result<KeyLimits, sqlx::Error> {
        let remembered = {
            let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            limits
                .get(&id)
                .filter(|(_, at)| at.elapsed() < VERIFIED_FOR)
                .map(|(limits, _)| *limits)
        };
        if let Some(limits) = remembered {
            return Ok(limits);
        }
        let limits: KeyLimits = sqlx::query_as(
            "SELECT rate_per_second, rate_burst, daily_megapixels, share FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await?
        .unwrap_or_default();
        let mut remembered = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if remembered.len() >= REMEMBERED {
            remembered.clear();
        }
        remembered.insert(id, (limits, std::time::Instant::now()));
        Ok(limits)
    }

    /// Sets the live key `id`'s own limits (they take effect at once on
    /// this instance, within [`VERIFIED_FOR`] on the others). Returns the
    /// key, or `None` if there is no such live key.
    pub async fn set_limits(
        &self,
        id: Uuid,
        limits: KeyLimits,
    ) -> Result<Option<KeyRecord>, sqlx::Error> {
        let record: Option<KeyRecord> = sqlx::query_as(&format!(
            "UPDATE api_keys SET rate_per_second = $2, rate_burst = $3, daily_megapixels = $4,
                    share = $5
             WHERE id = $1 AND revoked_at IS NULL
             RETURNING {RECORD}"
        ))
        .bind(id)
        .bind(limits.rate_per_second)
        .bind(limits.rate_burst)
        .bind(limits.daily_megapixels)
        .bind(limits.share)
        .fetch_optional(&self.db)
        .await?;
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(record)
    }

    /// The share of every live key whose share was set (the others have
    /// 1), by owner: what the queue weighs worker time with.
    pub async fn shares(&self) -> Result<Vec<(String, f64)>, sqlx::Error> {
        let rows: Vec<(Uuid, f64)> = sqlx::query_as(
            "SELECT id, share FROM api_keys WHERE revoked_at IS NULL AND share IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, s)| (id.to_string(), s))
            .collect())
    }

    /// Gives `queue` every key's share ([`Keys::shares`]), replacing the
    /// ones it had: after a change, and at every worker's reconciliation
    /// (so a Redis that lost them has them again).
    pub async fn apply_shares(&self, queue: &crate::queue::Queue) -> Result<(), SharesError> {
        let shares = self.shares().await?;
        queue.set_shares(&shares).await?;
        Ok(())
    }

    async fn look_up(&self, id: Uuid, secret: &str) -> Result<Option<Uuid>, sqlx::Error> {
        let stored: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT hash FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(&self.db)
                .await?;
        Ok(stored
            .filter(|(stored,)| bool::from(stored.as_slice().ct_eq(hash(secret).as_slice())))
            .map(|_| id))
    }
}

/// Splits `ifk_<id>_<secret>`, checking its shape (so nothing malformed
/// reaches the database).
fn parse(key: &str) -> Option<(Uuid, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_well_formed_keys() {
        let id = Uuid::now_v7();
        let secret = "ab".repeat(32);
        let key = format!("{PREFIX}{}_{secret}", id.simple());
        assert_eq!(parse(&key), Some((id, secret.as_str())));
        assert_eq!(parse(&key[1..]), None);
        assert_eq!(parse(&format!("{key}0")), None);
        assert_eq!(parse(&key.replace('a', "\0")), None);
        assert_eq!(parse("ifk__"), None);
    }
}
