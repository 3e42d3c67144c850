//! Who is calling, and what they may see.
//!
//! - The **admin token** (`IMGFLOW_ADMIN_TOKEN`, and during a rotation
//!   `IMGFLOW_ADMIN_TOKEN_PREVIOUS`) manages plugins and client keys, and
//!   sees every job.
//! - A **client key** (`POST /v1/keys`) submits jobs and sees only its own:
//!   another client's job is answered 404, as if it did not exist.
//! - With `AUTH_REQUIRED=false` (local development), a request without
//!   credentials is **anonymous** and sees every job, as before keys
//!   existed; a request with a wrong credential is still refused.
//! - The **console** signs in once and keeps a server-side session
//!   ([`imgflow_platform::sessions`]) whose random id is its cookie
//!   ([`SESSION_COOKIE`]); the cookie is accepted wherever the header is (an
//!   `<img>` or an event stream cannot send a header), and holds no
//!   credential. Changes made with the cookie alone must carry
//!   [`CONSOLE_HEADER`] ([`session_guard`]).
//! - A **signed result URL** (`RESULT_URL_SECRET`) lets anyone holding it
//!   download one result until it expires: for a browser, an `<img>` tag or
//!   a CDN, which cannot send a key.
//!
//! Every secret is compared in constant time (`subtle`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac as _};
use imgflow_platform::jobs::JobRecord;
use imgflow_platform::keys::Keys;
use imgflow_platform::sessions::{self, SessionOwner, Sessions};
use imgflow_runtime::ErrorCode;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use crate::error::ApiError;

/// The shortest admin token the API accepts.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// Tokens that appear in documentation and examples, refused whatever
/// their length.
const DOCUMENTED_TOKENS: &[&str] = &[
    "change-me",
    "changeme",
    "change-me-change-me-change-me-change-me",
    "admin",
    "secret",
    "password",
    "token",
];

/// The owner recorded on a job the admin token submitted.
pub const ADMIN_OWNER: &str = "admin";
/// The owner recorded on a job submitted without credentials
/// (`AUTH_REQUIRED=false`).
pub const ANONYMOUS_OWNER: &str = "anonymous";

/// Who a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The operator (the admin token).
    Admin,
    /// A client, by its key's id.
    Client(Uuid),
    /// No credentials, with `AUTH_REQUIRED=false`.
    Anonymous,
}

impl Caller {
    /// The owner recorded on the jobs it submits.
    pub fn owner(self) -> String {
        match self {
            Caller::Admin => ADMIN_OWNER.to_string(),
            Caller::Client(id) => id.to_string(),
            Caller::Anonymous => ANONYMOUS_OWNER.to_string(),
        }
    }

    /// Whose jobs it may see: `None` for everyone's.
    pub fn scope(self) -> Option<String> {
        match self {
            Caller::Client(_) => Some(self.owner()),
            Caller::Admin | Caller::Anonymous => None,
        }
    }

    /// Whether it may see (and delete) `job`.
    pub fn may_see(self, job: &JobRecord) -> bool {
        self.scope().is_none_or(|owner| owner == job.owner)
    }
}

/// Checks an admin token: refused when shorter than
/// [`MIN_ADMIN_TOKEN_LEN`] or equal to a documented default.
pub fn check_admin_token(token: &str, setting: &str) -> Result<(), String> {
    if DOCUMENTED_TOKENS
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token.trim()))
    {
        return Err(format!(
            "{setting} is {token:?}, a default from the documentation; generate one, e.g. `head -c 32 /dev/urandom | base64`"
        ));
    }
    if token.len() < MIN_ADMIN_TOKEN_LEN {
        return Err(format!(
            "{setting} has {} characters; it needs at least {MIN_ADMIN_TOKEN_LEN} (e.g. `head -c 32 /dev/urandom | base64`)",
            token.len()
        ));
    }
    Ok(())
}

/// The credentials the API accepts.
#[derive(Clone)]
pub struct Auth {
    /// Whether `/v1/jobs` needs credentials.
    pub required: bool,
    /// The admin token, then the previous one during a rotation.
    admin_tokens: Vec<String>,
    keys: Keys,
    /// The console's sessions.
    pub sessions: Sessions,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("required", &self.required)
            .field("admin_tokens", &self.admin_tokens.len())
            .finish()
    }
}

impl Auth {
    /// The credentials: `admin_tokens` (current first; empty turns
    /// management off) and the client keys in `keys`.
    pub fn new(required: bool, admin_tokens: Vec<String>, keys: Keys, sessions: Sessions) -> Auth {
        Auth {
            required,
            admin_tokens,
            keys,
            sessions,
        }
    }

    /// Whether management is on (an admin token is configured).
    pub fn admin_enabled(&self) -> bool {
        !self.admin_tokens.is_empty()
    }

    /// Who sent the request. No credential: anonymous when
    /// credentials are not required, else 401. A header that is not a
    /// valid admin token or live client key: 401 either way.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if let Some(given) = bearer(headers)? {
            return self
                .identify(&given)
                .await?
                .ok_or_else(|| unauthorized("the bearer token is not a live client key"));
        }
        if let Some(id) = session_id(headers) {
            return self.session(&id).await?.ok_or_else(|| {
                unauthorized("the console session has ended (signed out, expired, or its key revoked); sign in again")
            });
        }
        if self.required {
            Err(unauthorized(
                "this route needs `Authorization: Bearer <client key>` (keys are created by an operator with POST /v1/keys)",
            ))
        } else {
            Ok(Caller::Anonymous)
        }
    }

    /// Who the console session `id` belongs to, if it is live: a client
    /// whose key is live, or an operator whose admin token is still
    /// configured.
    pub async fn session(&self, id: &str) -> Result<Option<Caller>, ApiError> {
        let Some(session) = self.sessions.find(id).await? else {
            return Ok(None);
        };
        Ok(match session.owner {
            SessionOwner::Client(key) => Some(Caller::Client(key)),
            SessionOwner::Admin { token_sha256 } => self
                .admin_tokens
                .iter()
                .fold(false, |found, t| {
                    found | bool::from(sessions::sha256(t).ct_eq(&token_sha256))
                })
                .then_some(Caller::Admin),
        })
    }

    /// What a console session started with `given` (already identified as
    /// `caller`) records of it: the key's id, or which admin token.
    pub fn session_owner(&self, caller: Caller, given: &str) -> Option<SessionOwner> {
        match caller {
            Caller::Client(key) => Some(SessionOwner::Client(key)),
            Caller::Admin => Some(SessionOwner::Admin {
                token_sha256: sessions::sha256(given),
            }),
            Caller::Anonymous => None,
        }
    }

    /// Whose credential `given` is: the admin token, a live client key, or
    /// neither (`None`).
    pub async fn identify(&self, given: &str) -> Result<Option<Caller>, ApiError> {
        if self.is_admin(given) {
            return Ok(Some(Caller::Admin));
        }
        Ok(self.keys.verify(given).await?.map(Caller::Client))
    }

    /// Checks that the request carries the admin token, or the cookie of
    /// an operator's console session.
    pub async fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.admin_tokens.is_empty() {
            return Err(ApiError::new(
                ErrorCode::AdminDisabled,
                "management is disabled: set IMGFLOW_ADMIN_TOKEN on the API and send it as `Authorization: Bearer <token>`",
            ));
        }
        let admin = match bearer(headers)? {
            Some(given) => self.is_admin(&given),
            None => match session_id(headers) {
                Some(id) => self.session(&id).await? == Some(Caller::Admin),
                None => false,
            },
        };
        if admin {
            Ok(())
        } else {
            Err(unauthorized(
                "missing or wrong `Authorization: Bearer` admin token",
            ))
        }
    }

    fn is_admin(&self, given: &str) -> bool {
        // Every token is compared, so the time taken does not tell which
        // one (or how much of one) matched.
        self.admin_tokens
            .iter()
            .fold(false, |found, t| found | constant_time_eq(given, t))
    }
}

/// The credential of a request: its `Authorization: Bearer` token, if it
/// has one.
fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| Some(v.trim().to_string()))
        .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))
}

/// The cookie in which the console keeps its sign-in: the session's random
/// id (64 hex digits; never a credential), `HttpOnly` (page scripts cannot
/// read it), `SameSite=Strict` (other sites' pages do not send it), with no
/// expiry (the browser forgets it when it closes; the server ends the
/// session after its idle time or lifetime anyway), `Secure` when
/// `COOKIE_SECURE` is set.
pub const SESSION_COOKIE: &str = "imgflow_session";

/// The header every request that changes something must carry when it is
/// authenticated by the session cookie: a page of another origin cannot
/// add it without a CORS preflight, which the API never grants.
pub const CONSOLE_HEADER: &str = "x-imgflow-console";

/// The session id in the request's cookie, if it has one.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// The `Set-Cookie` value that keeps session `id` for this browser
/// session; `secure` adds `Secure` (the console is served over HTTPS:
/// `COOKIE_SECURE`).
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session.
pub fn session_cookie_cleared() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Refuses a request that changes something with only the session cookie
/// as its credential and without [`CONSOLE_HEADER`] (cross-site request
/// forgery); requests with an `Authorization` header, and reads, pass.
pub async fn session_guard(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::Method;
    use axum::response::IntoResponse as _;
    let headers = request.headers();
    let reads = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !reads
        && !headers.contains_key(header::AUTHORIZATION)
        && !headers.contains_key(CONSOLE_HEADER)
        && session_id(headers).is_some()
    {
        // Read what the client is still sending (up to 1 MiB; nothing is
        // kept), so it sees this answer instead of a reset connection.
        crate::body::discard(request.into_body(), 0).await;
        return unauthorized(
            "a request authenticated by the console's session cookie must carry the X-Imgflow-Console header",
        )
        .into_response();
    }
    next.run(request).await
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

/// Compares two secrets without an early exit.
fn constant_time_eq(a: &str, b: &str) -> bool {
    // `ct_eq` on slices of different lengths is false at once; the length
    // of a token is not the secret.
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Signs and checks result URLs: `/v1/jobs/<id>/result?expires=<unix
/// seconds>&sig=<hex HMAC-SHA256 of "<id>:<expires>">`, under
/// `RESULT_URL_SECRET` (the same on every API instance).
#[derive(Clone)]
pub struct ResultUrls {
    /// The HMAC keyed with the secret, cloned for each signature.
    mac: Option<Hmac<Sha256>>,
    ttl: Duration,
}

impl std::fmt::Debug for ResultUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultUrls")
            .field("signed", &self.mac.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// A signed result URL's query parameters.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Signature {
    /// When a signed URL expires (seconds since 1970); from `result_url`.
    pub expires: Option<u64>,
    /// A signed URL's signature; from `result_url`.
    pub sig: Option<String>,
}

impl ResultUrls {
    /// Signed URLs valid for `ttl` under `secret`; with no secret, result
    /// URLs are plain and need credentials.
    pub fn new(secret: Option<String>, ttl: Duration) -> ResultUrls {
        ResultUrls {
            // HMAC takes a key of any length, so this only skips no secret.
            mac: secret
                .filter(|s| !s.is_empty())
                .and_then(|s| Hmac::<Sha256>::new_from_slice(s.as_bytes()).ok()),
            ttl,
        }
    }

    /// The URL of a job's result: signed when a secret is set.
    pub fn url(&self, job: Uuid) -> String {
        let path = format!("/v1/jobs/{job}/result");
        match &self.mac {
            Some(mac) => {
                let expires = now() + self.ttl.as_secs().max(1);
                format!("{path}?expires={expires}&sig={}", sign(mac, job, expires))
            }
            None => path,
        }
    }

    /// Checks a signature for `job`; `Ok(seconds left)` if it is good.
    pub fn check(&self, job: Uuid, signature: &Signature) -> Result<u64, ApiError> {
        let invalid = |why: &str| ApiError::new(ErrorCode::InvalidSignature, why);
        let Some(mac) = &self.mac else {
            return Err(invalid(
                "result URLs are not signed here (no RESULT_URL_SECRET); send credentials",
            ));
        };
        let (Some(expires), Some(sig)) = (signature.expires, signature.sig.as_deref()) else {
            return Err(invalid("a signed URL needs both `expires` and `sig`"));
        };
        if !constant_time_eq(&sign(mac, job, expires), sig) {
            return Err(invalid("the signature does not match"));
        }
        let now = now();
        if expires <= now {
            return Err(invalid(
                "the signed URL has expired; read the job again for a new one",
            ));
        }
        Ok(expires - now)
    }
}

/// The hex HMAC of `"<job>:<expires>"`.
fn sign(mac: &Hmac<Sha256>, job: Uuid, expires: u64) -> String {
    let mut mac = mac.clone();
    mac.update(format!("{job}:{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_weak_admin_tokens() {
        assert!(check_admin_token("change-me", "T")
            .unwrap_err()
            .contains("default"));
        assert!(check_admin_token("short", "T").unwrap_err().contains("32"));
        assert!(check_admin_token(&"x".repeat(32), "T").is_ok());
    }

    #[test]
    fn signs_and_checks_result_urls() {
        let urls = ResultUrls::new(Some("s".repeat(32)), Duration::from_secs(60));
        let job = Uuid::now_v7();
        let url = urls.url(job);
        let query = url.split_once('?').unwrap().1;
        let mut expires = None;
        let mut sig = None;
        for pair in query.split('&') {
            match pair.split_once('=').unwrap() {
                ("expires", v) => expires = v.parse().ok(),
                ("sig", v) => sig = Some(v.to_string()),
                _ => {}
            }
        }
        let good = Signature {
            expires,
            sig: sig.clone(),
        };
        assert!((59..=60).contains(&urls.check(job, &good).unwrap()));
        assert!(urls.check(Uuid::now_v7(), &good).is_err(), "another job");
        let later = Signature {
            expires: expires.map(|e| e + 1),
            sig,
        };
        assert!(urls.check(job, &later).is_err(), "a changed expiry");
        let plain = ResultUrls::new(None, Duration::from_secs(60));
        assert_eq!(plain.url(job), format!("/v1/jobs/{job}/result"));
    }
}
