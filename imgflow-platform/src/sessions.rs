//! The console's sign-in sessions, kept server-side.
//!
//! Signing in to the console checks a credential (a client key or the admin
//! token) once and starts a session: the browser's cookie holds only the
//! session's id, 256 random bits, and PostgreSQL only that id's SHA-256, so
//! neither a copied cookie nor a read of the table gives a credential away.
//! A session ends
//!
//! - when its browser signs out ([`Sessions::end`]),
//! - after `idle` without a request, or `lifetime` after it started,
//!   whichever comes first ([`Sessions::find`] refuses it; the retention
//!   sweep deletes it, [`Sessions::expire`]),
//! - when its client key is revoked (the revocation deletes them in the
//!   same transaction, [`crate::keys::Keys::revoke`]),
//! - for an operator, when the admin token it signed in with is no longer
//!   configured (a rotation): the session records which token, as a hash.

use std::time::Duration;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// Who a session was started by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOwner {
    /// An operator, with the admin token whose SHA-256 this is.
    Admin {
        /// SHA-256 of the admin token signed in with.
        token_sha256: [u8; 32],
    },
    /// A client, by its key's id.
    Client(Uuid),
}

/// A live session, as found by its cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Who started it.
    pub owner: SessionOwner,
}

/// The sessions store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sessions {
    db: PgPool,
    idle: Duration,
    lifetime: Duration,
}

/// How stale a session's `last_seen_at` may get before a request records
/// it again: a busy console writes once a minute, not on every request.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// SHA-256 of a secret (a session id or an admin token).
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Sessions {
    /// Sessions in this database that end after `idle` without use or
    /// `lifetime` after they start.
    pub fn new(db: PgPool, idle: Duration, lifetime: Duration) -> Sessions {
        Sessions { db, idle, lifetime }
    }

    /// Starts a session for `owner`; returns its id, for the cookie (64
    /// hex digits).
    pub async fn start(&self, owner: &SessionOwner) -> Result<String, sqlx::Error> {
        let mut id = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut id);
        let id = hex::encode(id);
        let (key_id, token) = match owner {
            SessionOwner::Admin { token_sha256 } => (None, Some(token_sha256.to_vec())),
            SessionOwner::Client(key) => (Some(*key), None),
        };
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, key_id, admin_token_hash, expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        )
        .bind(sha256(&id).as_slice())
        .bind(key_id)
        .bind(token)
        .bind(self.lifetime.as_secs_f64())
        .execute(&self.db)
        .await?;
        Ok(id)
    }

    /// The live session with this id: not ended, not idle for longer than
    /// `idle`, not past its lifetime, and (for a client) its key not
    /// revoked. Records the use, at most once a minute.
    pub async fn find(&self, id: &str) -> Result<Option<Session>, sqlx::Error> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let found: Option<(Option<Uuid>, Option<Vec<u8>>, bool)> = sqlx::query_as(
            "SELECT s.key_id, s.admin_token_hash,
                    s.last_seen_at < now() - make_interval(secs => $3) AS stale
             FROM console_sessions s
             LEFT JOIN api_keys k ON k.id = s.key_id
             WHERE s.id_hash = $1
               AND s.expires_at > now()
               AND s.last_seen_at > now() - make_interval(secs => $2)
               AND (s.key_id IS NULL OR k.revoked_at IS NULL AND k.id IS NOT NULL)",
        )
        .bind(sha256(id).as_slice())
        .bind(self.idle.as_secs_f64())
        .bind(TOUCH_EVERY.as_secs_f64())
        .fetch_optional(&self.db)
        .await?;
        let Some((key_id, token, stale)) = found else {
            return Ok(None);
        };
        if stale {
            sqlx::query("UPDATE console_sessions SET last_seen_at = now() WHERE id_hash = $1")
                .bind(sha256(id).as_slice())
                .execute(&self.db)
                .await?;
        }
        let owner = match (key_id, token) {
            (Some(key), _) => SessionOwner::Client(key),
            (None, Some(token)) => match <[u8; 32]>::try_from(token.as_slice()) {
                Ok(token_sha256) => SessionOwner::Admin { token_sha256 },
                Err(_) => return Ok(None),
            },
            (None, None) => return Ok(None),
        };
        Ok(Some(Session { owner }))
    }

    /// Ends the session with this id (signing out). Returns whether there
    /// was one.
    pub async fn end(&self, id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(sha256(id).as_slice())
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes the sessions that can no longer be used (idle or past their
    /// lifetime). Returns how many.
    pub async fn expire(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM console_sessions
             WHERE expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $1)",
        )
        .bind(self.idle.as_secs_f64())
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected())
    }
}
