//! The operator console: a page at `/console`, served from assets embedded
//! in the binary (plain HTML, CSS and JavaScript; nothing to build), and
//! its sign-in session.
//!
//! The page calls the same API as curl does. Signing in checks a client key
//! or the admin token once and keeps it in an `HttpOnly`, `SameSite=Strict`
//! session cookie ([`crate::auth::SESSION_COOKIE`]), so that images and
//! event streams, which cannot send an `Authorization` header, are
//! authorised too, and no page script can read the credential.
//!
//! Everything it shows from plugins and jobs is untrusted: the page only
//! ever sets text (never HTML), and every console response carries a strict
//! `Content-Security-Policy` with no inline script or style.

use axum::extract::{Request, State};
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
/// A cookie whose key was revoked reads as `none`, and is cleared.
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

/// `POST /console/session`: checks the credential and keeps it in the
/// session cookie. Needs the console header (a page of another site cannot
/// sign a browser in).
async fn sign_in(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    if !headers.contains_key(auth::CONSOLE_HEADER) {
        body::discard(request.into_body(), 0).await;
        return Err(ApiError::bad_request(
            "signing in needs the X-Imgflow-Console header (the console sends it)",
        ));
    }
    let raw = match body::read(request.into_body(), SESSION_MAX_BYTES).await {
        Limited::Body(bytes) => bytes,
        Limited::TooLarge => return Err(ApiError::too_large(SESSION_MAX_BYTES, "4 KiB")),
        Limited::Broken(e) => return Err(e),
    };
    let SignIn { credential } = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"credential\": \"...\"}}: {e}")))?;
    let credential = credential.trim();
    let Some(caller) = state.auth.identify(credential).await? else {
        tracing::info!("console sign-in refused");
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "that is neither a live client key nor the admin token",
        ));
    };
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    tracing::info!(owner = %caller.owner(), "console signed in");
    Ok((
        StatusCode::OK,
        [(header::SET_COOKIE, auth::session_cookie(credential, secure))],
        Json(Session::new(&state, Some(caller))),
    )
        .into_response())
}

/// `DELETE /console/session`: forgets the credential.
async fn sign_out(State(state): State<AppState>) -> Response {
    (
        [(header::SET_COOKIE, auth::session_cookie_cleared())],
        Json(Session::new(&state, None)),
    )
        .into_response()
}
