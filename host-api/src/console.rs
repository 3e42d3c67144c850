//! The operator console: a page at `/console`, served from assets embedded
//! in the binary (plain HTML, CSS and JavaScript; nothing to build), and
//! its sign-in session.
//!
//! The page calls the same API as curl does. Signing in checks a client key
//! or the admin token once and starts a server-side session
//! ([`imgflow_platform::sessions`]) whose random id goes in an `HttpOnly`,
//! `SameSite=Strict` cookie ([`crate::auth::SESSION_COOKIE`]), so that
//! images and event streams, which cannot send an `Authorization` header,
//! are authorised too; the cookie holds no credential, and signing out ends
//! the session on the server. Failed sign-ins are counted per client
//! address (the connection's peer; an IPv6 address by its /64): after
//! `SIGN_IN_MAX_FAILURES` within `SIGN_IN_FAILURE_WINDOW`, that address is
//! answered 429 until the window ends.
//!
//! Everything it shows from plugins and jobs is untrusted: the page only
//! ever sets text (never HTML), and every console response carries a strict
//! `Content-Security-Policy` with no inline script or style.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use imgflow_runtime::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::auth::{self, Caller};
use crate::body::{self, Limited};
use crate::error::ApiError;
use crate::metrics::SignIn as SignInResult;
use crate::state::AppState;

/// The console's content security policy: scripts, styles and data only
/// from this origin; images also from `blob:` (the image being tried,
/// before it is uploaded); no frames, no plugins, no forms elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page, its script and its style sheet, embedded at build time.
const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The largest sign-in body.
const SESSION_MAX_BYTES: usize = 4096;

/// The console's routes (not part of the API's OpenAPI document): the
/// page, its assets, `/` redirecting to it, and `/console/session`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/console") }))
        .route(
            "/console",
            get(|| asset(INDEX_HTML, "text/html; charset=utf-8")),
        )
        .route(
            "/console/",
            get(|| async { Redirect::temporary("/console") }),
        )
        .route(
            "/console/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/console/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .route(
            "/console/session",
            get(session).post(sign_in).delete(sign_out),
        )
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Embedded in the binary: a new release brings new assets.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Middleware on every answer: the console's policy on its pages, and on
/// every answer `nosniff` (a result is shown only as the type it is sent
/// as), no referrer, no framing.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let console = request.uri().path().starts_with("/console");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if console {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    response
}

/// Who the console is signed in as.
#[derive(Debug, Serialize)]
struct Session {
    /// `admin`, `client`, `anonymous` (no credential, `AUTH_REQUIRED=false`)
    /// or `none` (must sign in).
    role: &'static str,
    /// The client key's id, for `client`.
    key_id: Option<String>,
    /// Whether jobs need credentials (`AUTH_REQUIRED`).
    auth_required: bool,
    /// Whether plugin management is on (`IMGFLOW_ADMIN_TOKEN` set).
    admin_enabled: bool,
}

impl Session {
    fn new(state: &AppState, caller: Option<Caller>) -> Session {
        let (role, key_id) = match caller {
            Some(Caller::Admin) => ("admin", None),
            Some(Caller::Client(id)) => ("client", Some(id.to_string())),
            Some(Caller::Anonymous) => ("anonymous", None),
            None => ("none", None),
        };
        Session {
            role,
            key_id,
            auth_required: state.auth.required,
            admin_enabled: state.auth.admin_enabled(),
        }
    }
}

/// `GET /console/session`: who the cookie (or header) says the caller is.
/// A cookie whose session ended reads as `none`, and is cleared.
async fn session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.auth.caller(&headers).await {
        Ok(caller) => Json(Session::new(&state, Some(caller))).into_response(),
        Err(e) if e.code() == ErrorCode::Unauthorized => (
            [(header::SET_COOKIE, auth::session_cookie_cleared())],
            Json(Session::new(&state, None)),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Body of `POST /console/session`.
#[derive(Debug, Deserialize)]
struct SignIn {
    /// A client key or the admin token.
    credential: String,
}

/// Whose failures a sign-in counts under: the connection's peer address,
/// an IPv6 address by its /64 (one host usually has a whole /64). A
/// request with no peer (the router called in-process) counts as
/// `local`.
fn failure_scope(peer: Option<SocketAddr>) -> String {
    match peer.map(|p| p.ip()) {
        Some(IpAddr::V4(v4)) => format!("sign-in:{v4}"),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("sign-in:{v4}"),
            None => {
                let s = v6.segments();
                format!("sign-in:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        None => "sign-in:local".to_string(),
    }
}

/// `POST /console/session`: checks the credential and starts a session,
/// whose id goes in the cookie. Needs the console header (a page of
/// another site cannot sign a browser in). An address with
/// `SIGN_IN_MAX_FAILURES` failed sign-ins in the current window is
/// answered 429 without its credential being looked at.
async fn sign_in(
    State(state): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    if !headers.contains_key(auth::CONSOLE_HEADER) {
        body::discard(request.into_body(), 0).await;
        return Err(ApiError::bad_request(
            "signing in needs the X-Imgflow-Console header (the console sends it)",
        ));
    }
    let scope = failure_scope(peer.map(|p| p.0 .0));
    let (failures, left) = state.queue.failures(&scope).await?;
    if failures >= state.sign_in.max_failures {
        body::discard(request.into_body(), SESSION_MAX_BYTES).await;
        state.metrics.sign_in(SignInResult::Throttled);
        tracing::warn!(scope, failures, "console sign-in throttled");
        return Err(throttled(left));
    }
    let raw = match body::read(request.into_body(), SESSION_MAX_BYTES).await {
        Limited::Body(bytes) => bytes,
        Limited::TooLarge => return Err(ApiError::too_large(SESSION_MAX_BYTES, "4 KiB")),
        Limited::Broken(e) => return Err(e),
    };
    let SignIn { credential } = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"credential\": \"...\"}}: {e}")))?;
    let credential = credential.trim();
    let owner = match state.auth.identify(credential).await? {
        Some(caller) => state
            .auth
            .session_owner(caller, credential)
            .map(|o| (caller, o)),
        None => None,
    };
    let Some((caller, owner)) = owner else {
        let (failures, left) = state
            .queue
            .count_failure(&scope, state.sign_in.failure_window)
            .await?;
        state.metrics.sign_in(SignInResult::Refused);
        tracing::info!(scope, failures, "console sign-in refused");
        if failures >= state.sign_in.max_failures {
            return Err(throttled(left));
        }
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "that is neither a live client key nor the admin token",
        ));
    };
    let id = state.auth.sessions.start(&owner).await?;
    state.metrics.sign_in(SignInResult::Ok);
    tracing::info!(owner = %caller.owner(), "console signed in");
    Ok((
        StatusCode::OK,
        [(
            header::SET_COOKIE,
            auth::session_cookie(&id, state.sign_in.cookie_secure),
        )],
        Json(Session::new(&state, Some(caller))),
    )
        .into_response())
}

/// The answer to an address over its failed sign-ins: 429 until its
/// window ends.
fn throttled(left: std::time::Duration) -> ApiError {
    ApiError::new(
        ErrorCode::SignInThrottled,
        "too many failed sign-ins from this address; try again later",
    )
    .retry_after(left.as_secs_f64().ceil() as u64)
}

/// `DELETE /console/session`: ends the session on the server (the cookie
/// can no longer be used, wherever it was copied) and clears the cookie.
async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(id) = auth::session_id(&headers) {
        if state.auth.sessions.end(&id).await? {
            tracing::info!("console signed out");
        }
    }
    Ok((
        [(header::SET_COOKIE, auth::session_cookie_cleared())],
        Json(Session::new(&state, None)),
    )
        .into_response())
}
