//! The dashboard's HTTP routes, its access check and its headers.

use std::{
    convert::Infallible, io::Read as _, os::unix::fs::OpenOptionsExt as _, path::Path, sync::Arc,
    time::Duration,
};

use axum::{
    extract::{Path as UrlPath, Query, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
    routing::get,
    Router,
};
use serde::Deserialize;

use super::Dashboard;
use crate::control;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.min.css");

/// The cookie a browser keeps the token in after `/?token=…`.
const COOKIE: &str = "flamewatch_token";
/// Largest file served from the output folder.
const MAX_FILE: u64 = 64 << 20;

/// Errors of the dashboard's setup.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// Serving beyond loopback without a token.
    #[error("metrics_addr = \"{0}\" serves beyond this machine: give --dashboard-token FILE (a bearer token), or use 127.0.0.1")]
    NeedsToken(String),
    /// The token file cannot be read, or holds no token.
    #[error("dashboard token {path}: {why}")]
    Token {
        /// File.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Reads the token of `path` (one line, at least 16 characters), refusing
/// a token needed but missing: serving beyond loopback requires one.
pub fn check_token(addr: &str, path: Option<&Path>) -> Result<Option<String>, DashboardError> {
    let loopback = addr
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    let Some(path) = path else {
        return if loopback || addr == "off" {
            Ok(None)
        } else {
            Err(DashboardError::NeedsToken(addr.to_owned()))
        };
    };
    let bad = |why: &str| DashboardError::Token {
        path: path.display().to_string(),
        why: why.to_owned(),
    };
    let text = crate::fsafe::read_nofollow(path).map_err(|e| bad(&e.to_string()))?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("want one line of at least 16 characters, no spaces"));
    }
    Ok(Some(token.to_owned()))
}

/// Equal in time independent of where they differ (a token compared with
/// `==` leaks its prefix through the response time).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries: `Authorization: Bearer`, or the cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_owned))
    })
}

/// Refuses requests without the token (when one is set), and sets the
/// security headers on every response.
async fn guard(State(d): State<Arc<Dashboard>>, req: Request, next: Next) -> Response {
    if let Some(token) = &d.token {
        let query_token = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_owned)
        });
        let ok = presented(req.headers())
            .or(query_token.clone())
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            let mut r = (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return secure(r);
        }
        // The page opened as /?token=…: keep it in a cookie, drop it from
        // the address bar.
        if query_token.is_some() && req.uri().path() == "/" {
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) =
                HeaderValue::from_str(&format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"))
            {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            return secure(r);
        }
    }
    secure(next.run(req).await)
}

/// The usual security headers; a page's scripts only from the daemon.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'none'",
            ),
        );
    }
    r
}

fn typed(content_type: &'static str, body: impl IntoResponse) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn bad_request(why: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, format!("{}\n", why.into())).into_response()
}

/// The dashboard's routes over `d`, and `also` (the `/metrics` route),
/// all behind the token check and the security headers.
pub fn router(d: Arc<Dashboard>, also: Router) -> Router {
    let pages: Router = Router::new()
        .route("/", get(|| async { typed("text/html; charset=utf-8", INDEX) }))
        .route(
            "/assets/app.js",
            get(|| async { typed("text/javascript", APP_JS) }),
        )
        .route("/assets/app.css", get(|| async { typed("text/css", APP_CSS) }))
        .route(
            "/assets/uplot.js",
            get(|| async { typed("text/javascript", UPLOT_JS) }),
        )
        .route(
            "/assets/uplot.css",
            get(|| async { typed("text/css", UPLOT_CSS) }),
        )
        .route("/api/targets", get(targets))
        .route("/api/targets/{name}/series", get(series))
        .route("/api/events", get(events))
        .route("/api/profile", get(profile))
        .route("/api/sessions", get(sessions))
        .route("/files/{name}", get(file))
        .with_state(d.clone());
    pages
        .merge(also)
        .layer(axum::middleware::from_fn_with_state(d, guard))
}

async fn targets(State(d): State<Arc<Dashboard>>) -> Response {
    axum::Json(d.targets_json()).into_response()
}

async fn sessions(State(d): State<Arc<Dashboard>>) -> Response {
    let dir = d.output.clone();
    let list = tokio::task::spawn_blocking(move || crate::render::html::session_list(&dir))
        .await
        .unwrap_or_default();
    axum::Json(list).into_response()
}

#[derive(Debug, Deserialize)]
struct SeriesQuery {
    metric: String,
    since: Option<String>,
}

/// A duration like `5m` (at most a day), or why not.
fn parse_since(text: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(text) = text else { return Ok(default) };
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("since = {text:?}: {e}; examples: 30s, 5m, 1h"))?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("since = {text:?}: want between 1s and 24h"));
    }
    Ok(d)
}

async fn series(
    State(d): State<Arc<Dashboard>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<SeriesQuery>,
) -> Response {
    if !crate::metrics::Metric::ALL.iter().any(|m| m.name() == q.metric) {
        let names: Vec<&str> = crate::metrics::Metric::ALL.iter().map(|m| m.name()).collect();
        return bad_request(format!(
            "metric = {:?}: want one of {}",
            q.metric,
            names.join(", ")
        ));
    }
    let since = match parse_since(q.since.as_deref(), Duration::from_secs(3600)) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let from = super::unix_now() - since.as_secs_f64();
    match d.series_json(&name, &q.metric, from) {
        Some(j) => axum::Json(j).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no watched target {name:?}\n")).into_response(),
    }
}

async fn events(State(d): State<Arc<Dashboard>>) -> Response {
    let rx = d.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok((kind, text)) => {
                    return Some((Ok::<_, Infallible>(Event::default().event(kind).data(text)), rx));
                }
                // A slow browser skips what it missed.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Debug, Deserialize)]
struct ProfileQuery {
    target: Option<String>,
    pid: Option<u32>,
    since: Option<String>,
    format: Option<String>,
}

/// A profile of the last `since` of a target from the flight recorder:
/// `svg` (default), `folded`, `pprof` (gzipped protobuf, what `go tool
/// pprof http://…` reads), `json` (the summary) or `diff` (the
/// differential flamegraph against the target's latest healthy baseline).
async fn profile(State(d): State<Arc<Dashboard>>, Query(q): Query<ProfileQuery>) -> Response {
    let diff = q.format.as_deref() == Some("diff");
    let (ext, content_type) = match q.format.as_deref().unwrap_or("svg") {
        "svg" => ("svg", "image/svg+xml"),
        "folded" | "diff" => ("folded", "text/plain; charset=utf-8"),
        "pprof" => ("pb.gz", "application/octet-stream"),
        "json" => ("json", "application/json"),
        other => {
            return bad_request(format!(
                "format = {other:?}: want svg, folded, pprof, json or diff"
            ))
        }
    };
    if q.target.is_none() && q.pid.is_none() {
        return bad_request("give target=NAME or pid=PID");
    }
    let since = match parse_since(q.since.as_deref(), Duration::from_secs(300)) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let req = control::Request {
        process: q.target,
        pid: q.pid,
        since_s: Some(since.as_secs_f64().max(1.0)),
        pprof: ext == "pb.gz",
        ..control::Request::default()
    };
    let Some(reply) = d.ask(req).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response();
    };
    if let Some(why) = reply.error {
        return (StatusCode::CONFLICT, format!("{why}\n")).into_response();
    }
    let suffix = format!(".{ext}");
    let Some(path) = reply
        .files
        .iter()
        .find(|f| f.ends_with(&suffix) && !f.ends_with(".diff.svg") && !f.ends_with(".before-after.svg"))
    else {
        return (StatusCode::NOT_FOUND, format!("the profile has no {ext} file\n")).into_response();
    };
    let path = std::path::PathBuf::from(path);
    if diff {
        let Some(baseline) = reply.baseline.map(std::path::PathBuf::from) else {
            return (
                StatusCode::NOT_FOUND,
                "no healthy baseline of this target yet (a scheduled profile, or one taken while nothing fired)\n",
            )
                .into_response();
        };
        return match tokio::task::spawn_blocking(move || differential(&baseline, &path)).await {
            Ok(Some(svg)) => profile_response("image/svg+xml", "svg", svg),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render the differential\n",
            )
                .into_response(),
        };
    }
    match tokio::task::spawn_blocking(move || read_file(&path)).await {
        Ok(Ok(bytes)) => profile_response(content_type, ext, bytes),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the profile\n").into_response(),
    }
}

/// The differential flamegraph of the window `after` (folded) against the
/// baseline `before`, normalized to each profile's total; not written to
/// the output folder (the window's own files are). None if either file
/// cannot be read or the picture cannot be drawn.
fn differential(before: &Path, after: &Path) -> Option<Vec<u8>> {
    let text = |p: &Path| String::from_utf8(read_file(p).ok()?).ok();
    let (b, a) = (text(before)?, text(after)?);
    let name = before
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = crate::render::flamegraph::Title {
        title: "differential: the window vs the healthy baseline".into(),
        subtitle: format!("red grew, blue shrank (normalized to each profile's total); baseline {name}"),
        count_name: "samples".into(),
    };
    crate::render::flamegraph::render_diff(&b, &a, &title).ok()
}

fn profile_response(content_type: &'static str, ext: &str, bytes: Vec<u8>) -> Response {
    let mut r = typed(content_type, bytes);
    if ext == "svg" {
        // inferno's flamegraphs script their own zoom and search.
        r.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'self'"),
        );
    }
    r
}

/// A regular file's bytes, not through a symlink, at most [`MAX_FILE`].
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A file of the output folder by name: a session's flamegraph, folded
/// stacks, summary or pprof, and the index. Nothing else, nothing outside.
async fn file(State(d): State<Arc<Dashboard>>, UrlPath(name): UrlPath<String>) -> Response {
    let kinds: [(&str, &str); 5] = [
        (".svg", "image/svg+xml"),
        (".folded", "text/plain; charset=utf-8"),
        (".json", "application/json"),
        (".pb.gz", "application/octet-stream"),
        (".html", "text/html; charset=utf-8"),
    ];
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']);
    let Some((ext, content_type)) = kinds.iter().copied().find(|(e, _)| plain && name.ends_with(e)) else {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    };
    let path = d.output.join(&name);
    match tokio::task::spawn_blocking(move || read_file(&path)).await {
        Ok(Ok(bytes)) => profile_response(content_type, ext.trim_start_matches('.'), bytes),
        _ => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that tokens compare equal only when identical, whatever the length.
    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    /// Test that serving beyond loopback needs a token, and loopback does not.
    #[test]
    fn beyond_loopback_needs_a_token() {
        assert!(check_token("127.0.0.1:9464", None).unwrap().is_none());
        assert!(check_token("off", None).unwrap().is_none());
        let e = check_token("0.0.0.0:9464", None).unwrap_err().to_string();
        assert!(e.contains("--dashboard-token"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("t");
        std::fs::write(&short, "abc\n").unwrap();
        assert!(check_token("0.0.0.0:1", Some(&short)).is_err());
        std::fs::write(&short, "0123456789abcdef0123\n").unwrap();
        assert_eq!(
            check_token("0.0.0.0:1", Some(&short)).unwrap().as_deref(),
            Some("0123456789abcdef0123")
        );
    }

    /// Test that the bearer header and the cookie both carry the token.
    #[test]
    fn token_from_header_or_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sekrit"));
        assert_eq!(presented(&h).as_deref(), Some("sekrit"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; flamewatch_token=xyz"),
        );
        assert_eq!(presented(&h).as_deref(), Some("xyz"));
    }
}
