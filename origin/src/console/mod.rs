//! The web console (issue 17), served by `origin serve --console ADDR` with axum, beside the
//! metrics and health endpoints on the same address.
//!
//! - [`session`]: server-side sessions (random 256-bit ids in an HttpOnly, SameSite=Strict
//!   cookie) and their CSRF tokens.
//! - [`limiter`]: login rate limiting per name and per address.
//! - [`overview`]: what the overview shows, read from the state the CLI commands read.
//! - [`page`]: the HTML, rendered on the server, with nothing loaded from elsewhere.
//! - [`pages`]: sites, nodes, bundles, prepare operations and the audit log, each with a JSON
//!   twin under `/api/`.
//! - [`live`]: `GET /api/events`, server-sent events of the overview and the rollout's
//!   per-site progress, and what the rollout page shows.
//!
//! Every state-changing route needs a session (else 401), its CSRF token in the `csrf` form
//! field or the `X-CSRF-Token` header (else 403) and an admin account (else 403), and writes
//! the account's name to the audit log with the change. Bodies over [`MAX_BODY_BYTES`] get 413.
//! [`router`] is the seam for more pages: merge routes into it.

pub mod limiter;
pub mod live;
pub mod overview;
pub mod page;
pub mod pages;
pub mod session;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Form, Json, Router};
use proto::wire::RolloutAction;
use serde::Deserialize;

use crate::accounts;
use crate::control::CommandError;
use crate::db::{AccountRole, Audit};
use crate::server::Origin;
use limiter::LoginLimiter;
use session::{account_fingerprint, tokens_equal, Session, Sessions};

/// Largest request body accepted, in bytes; a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Password checks run at once (each takes Argon2's 19 MiB and tens of milliseconds of CPU);
/// more logins wait.
pub const MAX_CONCURRENT_LOGINS: usize = 4;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "stagecoach_session";

/// The header that may carry the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The form field that may carry the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// Where the stylesheet is served.
pub const CSS_PATH: &str = "/console.css";

/// Where the live pages' script is served.
pub const JS_PATH: &str = "/console.js";

/// The audit log's role for what a console account did.
pub const AUDIT_ROLE: &str = "console";

/// Every console page's Content-Security-Policy: only the origin's own stylesheet and script,
/// requests (the event stream, the buttons' fetches) and forms to the origin, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// Why the console cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleConfigError {
    /// A console address other than loopback, without TLS.
    #[error("--console {0}: non-loopback console needs --console-tls-cert/--console-tls-key (PEM files) or --console-tls-mesh; or listen on 127.0.0.1 (and reach it through an SSH tunnel)")]
    NeedsTls(SocketAddr),
    /// The dummy hash could not be made.
    #[error(transparent)]
    Account(#[from] accounts::AccountError),
}

/// Refuses a console address that is not loopback unless it has TLS: without it, cookies and
/// passwords would cross the network in the clear.
pub fn check_listen(addr: SocketAddr, tls: bool) -> Result<(), ConsoleConfigError> {
    if tls || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ConsoleConfigError::NeedsTls(addr))
    }
}

/// The console of a running origin.
pub struct Console {
    origin: Arc<Origin>,
    sessions: Sessions,
    limiter: LoginLimiter,
    logins: tokio::sync::Semaphore,
    live: live::Live,
    secure_cookies: bool,
    /// Checked against when the name is unknown, so a wrong name costs as long as a wrong
    /// password and names cannot be told apart by timing.
    dummy_hash: String,
}

impl Console {
    /// The console of `origin`; `secure_cookies` when served over TLS. Takes tens of
    /// milliseconds of CPU (one Argon2 hash).
    pub fn new(origin: Arc<Origin>, secure_cookies: bool) -> Result<Arc<Self>, ConsoleConfigError> {
        let dummy_hash = accounts::hash_password(&session::random_token())?;
        Ok(Arc::new(Self {
            origin,
            sessions: Sessions::default(),
            limiter: LoginLimiter::default(),
            logins: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOGINS),
            live: live::Live::default(),
            secure_cookies,
            dummy_hash,
        }))
    }

    /// The session the request's cookie names, if it is live and its account unchanged.
    fn authenticate(&self, headers: &HeaderMap) -> Result<(String, Session), ApiError> {
        let id = session_cookie(headers).ok_or(ApiError::Unauthenticated)?;
        self.authenticate_id(id)
    }

    /// Whether the session `id` is still live (an event stream ends when it is not).
    fn session_live(&self, id: &str) -> bool {
        self.authenticate_id(id.to_owned()).is_ok()
    }

    fn authenticate_id(&self, id: String) -> Result<(String, Session), ApiError> {
        let session = self
            .sessions
            .get(&id, Instant::now())
            .ok_or(ApiError::Unauthenticated)?;
        let account =
            tokio::task::block_in_place(|| self.origin.control().db().account(&session.account))
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        match account {
            Some(a)
                if account_fingerprint(a.role, &a.password_hash) == session.account_fingerprint =>
            {
                Ok((id, session))
            }
            _ => {
                // Replaced or gone: this session ends.
                self.sessions.remove(&id);
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// A state-changing request: a session, its CSRF token, and (with `admin`) an admin.
    fn authorize_change(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        admin: bool,
    ) -> Result<(String, Session), ApiError> {
        let (id, session) = self.authenticate(headers)?;
        let token = csrf_token(headers, body).ok_or(ApiError::Csrf)?;
        if !tokens_equal(&token, &session.csrf) {
            return Err(ApiError::Csrf);
        }
        if admin && session.role != AccountRole::Admin {
            return Err(ApiError::Viewer);
        }
        Ok((id, session))
    }

    fn audit(&self, account: &str, action: &str, detail: String) -> Result<(), ApiError> {
        tokio::task::block_in_place(|| {
            self.origin
                .control()
                .db()
                .commit(&[], Some(Audit::new(account, AUDIT_ROLE, action, detail)))
        })
        .map(|_| ())
        .map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn cookie(&self, id: &str) -> String {
        format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            session::SESSION_MAX_AGE.as_secs(),
            if self.secure_cookies { "; Secure" } else { "" }
        )
    }

    fn cleared_cookie(&self) -> String {
        format!(
            "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            if self.secure_cookies { "; Secure" } else { "" }
        )
    }
}

/// The console's routes, for [`proto::metrics::serve_router`] (merge the metrics router into
/// it to serve both on one address; the client's address must be given to handlers as
/// `ConnectInfo<SocketAddr>`, as `serve_router` does).
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/api/overview", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route(CSS_PATH, get(css))
        .route(JS_PATH, get(js))
        .route("/rollouts/{id}", get(rollout))
        .route("/api/rollouts/{id}", get(rollout))
        .route("/api/events", get(api_events))
        .route("/api/rollouts/{id}/{action}", post(rollout_action))
        .merge(pages::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(security_headers))
        .with_state(console)
}

/// Whether a request asks for a page (HTML) or its JSON twin: every view is served by one
/// handler at both paths, and the twin is the one under `/api/`.
pub(super) struct Format {
    pub(super) html: bool,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Format {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Format {
            html: !parts.uri.path().starts_with("/api/"),
        })
    }
}

/// What a console request is refused for.
#[derive(Debug)]
enum ApiError {
    /// No session, or a forged, expired or ended one.
    Unauthenticated,
    /// No CSRF token, or not the session's.
    Csrf,
    /// A viewer asked for a change.
    Viewer,
    /// No such thing.
    NotFound(String),
    /// Too many event streams are open.
    Busy(String),
    /// The rollout is not in a state that takes the action.
    Conflict(String),
    /// The database or the rollout service failed.
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "not logged in, or the session ended: log in at /login".to_owned(),
            ),
            ApiError::Csrf => (
                StatusCode::FORBIDDEN,
                format!("missing or wrong CSRF token (form field `{CSRF_FIELD}` or header `X-CSRF-Token`)"),
            ),
            ApiError::Viewer => (
                StatusCode::FORBIDDEN,
                "viewer accounts cannot change anything".to_owned(),
            ),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, what),
            ApiError::Busy(what) => (StatusCode::SERVICE_UNAVAILABLE, what),
            ApiError::Conflict(what) => (StatusCode::CONFLICT, what),
            ApiError::Internal(what) => {
                tracing::error!(error = %what, "console request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, what)
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether a browser says the request comes from another site's page. Browsers since 2023
/// send `Sec-Fetch-Site`, which decides (`same-origin`, or `none` for a typed address, pass);
/// without it, an `Origin` other than this console's own (`null` included) is another site's.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        return site != "same-origin" && site != "none";
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (None, _) => false,
        (Some(origin), Some(host)) => {
            origin != format!("http://{host}") && origin != format!("https://{host}")
        }
        (Some(_), None) => true,
    }
}

/// The session id of the request's cookie, if it has one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The CSRF token of a request: its header, else the form field of a form body.
fn csrf_token(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(value) = headers.get(CSRF_HEADER) {
        return value.to_str().ok().map(str::to_owned);
    }
    if !is_form(headers) {
        return None;
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == CSRF_FIELD)
        .map(|(_, value)| value)
}

/// Whether the body is an HTML form's (then the answer is a redirect back to the page).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

fn see_other(location: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        page::CSS,
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        page::JS,
    )
}

async fn login_page() -> Html<String> {
    Html(page::login(""))
}

/// The login form's fields.
#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
}

async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // Login CSRF: another site's page must not log a browser into an account of its choosing.
    // Browsers say where a form was submitted from; clients that say nothing are not browsers.
    if cross_site(&headers) {
        tracing::warn!(%peer, "console login from another site's page refused");
        return (
            StatusCode::FORBIDDEN,
            Html(page::login(
                "This login came from another site's page; open the console's own login page.",
            )),
        )
            .into_response();
    }
    match try_login(&console, peer.ip(), form).await {
        Ok(response) => response,
        Err(LoginRefused::Wrong) => (
            StatusCode::UNAUTHORIZED,
            Html(page::login("Wrong name or password.")),
        )
            .into_response(),
        Err(LoginRefused::Wait(wait)) => {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, seconds.to_string())],
                Html(page::login(&format!(
                    "Too many wrong passwords: try again in {seconds} s."
                ))),
            )
                .into_response()
        }
        Err(LoginRefused::Failed(error)) => error.into_response(),
    }
}

enum LoginRefused {
    Wrong,
    Wait(std::time::Duration),
    Failed(ApiError),
}

async fn try_login(
    console: &Console,
    addr: IpAddr,
    form: LoginForm,
) -> Result<Response, LoginRefused> {
    let valid_name = accounts::check_name(&form.name).is_ok();
    // Invalid names share one entry, so they cannot grow the limiter's table.
    let limit_key = if valid_name { form.name.as_str() } else { "" };
    console
        .limiter
        .begin(limit_key, addr, Instant::now())
        .map_err(LoginRefused::Wait)?;
    let account = if valid_name {
        tokio::task::block_in_place(|| console.origin.control().db().account(&form.name))
            .map_err(|e| LoginRefused::Failed(ApiError::Internal(e.to_string())))?
    } else {
        None
    };
    let hash = account
        .as_ref()
        .map_or_else(|| console.dummy_hash.clone(), |a| a.password_hash.clone());
    let matches = {
        let _permit = console
            .logins
            .acquire()
            .await
            .map_err(|e| LoginRefused::Failed(ApiError::Internal(e.to_string())))?;
        let password = form.password;
        tokio::task::spawn_blocking(move || accounts::verify_password(&password, &hash))
            .await
            .unwrap_or(false)
    };
    let Some(account) = account.filter(|_| matches) else {
        tracing::warn!(name = %form.name.chars().take(64).collect::<String>(), %addr, "console login refused");
        return Err(LoginRefused::Wrong);
    };
    console.limiter.succeeded(limit_key, addr);
    console
        .audit(
            &account.name,
            "console.login",
            format!("{} from {addr}", account.role),
        )
        .map_err(LoginRefused::Failed)?;
    let (id, _) = console.sessions.create(
        &account.name,
        account.role,
        account_fingerprint(account.role, &account.password_hash),
        Instant::now(),
    );
    tracing::info!(account = %account.name, role = %account.role, %addr, "console login");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, console.cookie(&id)),
        ],
    )
        .into_response())
}

async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let (id, session) = match console.authorize_change(&headers, &body, false) {
        Ok(found) => found,
        Err(error) => return error.into_response(),
    };
    console.sessions.remove(&id);
    if let Err(error) = console.audit(&session.account, "console.logout", String::new()) {
        return error.into_response();
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_owned()),
            (header::SET_COOKIE, console.cleared_cookie()),
        ],
    )
        .into_response()
}

async fn gather(console: &Console, session: &Session) -> Result<overview::Overview, ApiError> {
    overview::gather(
        &console.origin,
        overview::AccountView {
            name: session.account.clone(),
            role: session.role.name().to_owned(),
        },
    )
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `GET /` and `GET /api/overview`: sites, stagers, edges up, bundles and rollouts.
async fn overview(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    headers: HeaderMap,
) -> Response {
    let session = match console.authenticate(&headers) {
        Ok((_, session)) => session,
        Err(ApiError::Unauthenticated) if html => return see_other("/login"),
        Err(error) => return error.into_response(),
    };
    match gather(&console, &session).await {
        Ok(view) if html => {
            Html(page::overview(&view, session.role, &session.csrf)).into_response()
        }
        Ok(view) => Json(view).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /api/events`: the live state as server-sent events, while the session lasts.
async fn api_events(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let id = match console.authenticate(&headers) {
        Ok((id, _)) => id,
        Err(error) => return error.into_response(),
    };
    let Some(permit) = console.live.admit() else {
        return ApiError::Busy(format!(
            "{} event streams are open, the most this origin serves; close a console tab",
            live::MAX_EVENT_STREAMS
        ))
        .into_response();
    };
    live::events(console.clone(), id, permit)
        .await
        .into_response()
}

/// `GET /rollouts/{id}` and `GET /api/rollouts/{id}`: the rollout's waves, per-site
/// progress, chart and failures.
async fn rollout(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match console.authenticate(&headers) {
        Ok((_, session)) => session,
        Err(ApiError::Unauthenticated) if html => return see_other("/login"),
        Err(error) => return error.into_response(),
    };
    let progress = live::latest_rollout(console.origin.control(), console.origin.catalog()).await;
    match progress {
        Ok(Some(progress)) if progress.id == id => {
            if html {
                Html(page::rollout(
                    &progress,
                    &session.account,
                    session.role,
                    &session.csrf,
                ))
                .into_response()
            } else {
                Json(progress).into_response()
            }
        }
        Ok(_) => ApiError::NotFound(
            "no rollout installs this bundle id; the overview links the latest".into(),
        )
        .into_response(),
        Err(error) => ApiError::Internal(error.to_string()).into_response(),
    }
}

async fn rollout_action(
    State(console): State<Arc<Console>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = is_form(&headers);
    match act_on_rollout(&console, &id, &action, &headers, &body).await {
        Ok(_) if form => see_other("/"),
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

/// Pauses, resumes or aborts the rollout `id` through the rollout service `origin rollout`
/// uses, audited with the account's name; answers its status as JSON.
async fn act_on_rollout(
    console: &Console,
    id: &str,
    action: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, ApiError> {
    let (_, session) = console.authorize_change(headers, body, true)?;
    let action = match action {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        other => {
            return Err(ApiError::NotFound(format!(
                "no rollout action `{}`: use pause, resume or abort",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    let control = console.origin.control();
    let current = control.rollout_keep().map(|kept| kept.target.to_string());
    if current.as_deref() != Some(id) {
        return Err(ApiError::NotFound(
            "no running or paused rollout has this id; GET /api/overview lists it".into(),
        ));
    }
    let account = session.account.clone();
    let reply = control
        .rollout_act(action, &|what, detail| {
            Audit::new(account.as_str(), AUDIT_ROLE, what, detail)
        })
        .await
        .map_err(|error| match error {
            CommandError::Rollout(e) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
    tracing::info!(account = %session.account, ?action, "console rollout action");
    Ok(reply.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_session_cookie_and_the_csrf_token() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; stagecoach_session=abc123; c=d"),
        );
        assert_eq!(session_cookie(&headers).as_deref(), Some("abc123"));
        assert_eq!(csrf_token(&headers, b"csrf=zz"), None, "not a form");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(csrf_token(&headers, b"x=1&csrf=zz").as_deref(), Some("zz"));
        assert_eq!(csrf_token(&headers, b"\xff\xfe"), None);
        headers.insert(CSRF_HEADER, HeaderValue::from_static("hh"));
        assert_eq!(csrf_token(&headers, b"csrf=zz").as_deref(), Some("hh"));
        assert!(session_cookie(&HeaderMap::new()).is_none());
    }

    #[test]
    fn only_loopback_without_tls() {
        check_listen("127.0.0.1:8080".parse().expect("addr"), false).expect("loopback");
        check_listen("[::1]:8080".parse().expect("addr"), false).expect("loopback");
        check_listen("0.0.0.0:8080".parse().expect("addr"), true).expect("with TLS");
        let error = check_listen("0.0.0.0:8080".parse().expect("addr"), false)
            .expect_err("needs TLS")
            .to_string();
        assert!(
            error.contains("--console-tls-cert/--console-tls-key"),
            "{error}"
        );
    }
}
