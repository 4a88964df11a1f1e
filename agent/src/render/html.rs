//! The output folder's `index.html`: every session found in the folder
//! (newest first) with links to its flamegraphs, and the alerts timeline
//! from the folder's `alerts.jsonl`.
//!
//! The index is rebuilt from what is on disk (the JSON summaries and the
//! alerts file), not from what the calling process remembers, so it is
//! right whichever `record`, daemon or older agent version wrote into the
//! folder. It is one static file: inline CSS and a few lines of inline
//! script (relative times), no external asset, and only relative links, so
//! it works from `file://`, from a copied folder, or behind any web server.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::Deserialize;
use tracing::{debug, warn};

use super::{write_file, RenderError};
use crate::alerts::{AlertRecord, Status};

/// File name of the index in the output folder.
pub const INDEX: &str = "index.html";
/// File name of the alerts stream the index shows (the daemon's default).
pub const ALERTS: &str = "alerts.jsonl";
/// Sessions shown at most: a daemon on a 15-minute schedule writes ~100 a
/// day per target, and the page (and the scan) must stay quick.
const MAX_SESSIONS: usize = 500;
/// Alert records shown at most (newest).
const MAX_ALERTS: usize = 1000;
/// Most of alerts.jsonl read (its newest part): the file may grow to
/// `retention.alerts_max_bytes` before it rotates, and 1000 records are
/// well under a megabyte.
const MAX_ALERT_BYTES: u64 = 8 << 20;

/// The fields of a JSON summary the index shows. Every field has a default
/// so that summaries of older or newer agents still make a row; fields the
/// index does not show are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SummaryDoc {
    session: SessionDoc,
    targets: Vec<TargetDoc>,
    sampling: SamplingDoc,
    mode: String,
    off_cpu: Option<OffCpuDoc>,
    overhead: OverheadDoc,
    top_functions: Vec<FunctionDoc>,
    files: FilesDoc,
    warnings: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SessionDoc {
    kind: String,
    started_at: String,
    duration_s: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TargetDoc {
    pid: u32,
    comm: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SamplingDoc {
    requested_hz: u64,
    effective_hz: f64,
    samples: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OffCpuDoc {
    blocks: u64,
    blocked_s: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OverheadDoc {
    budget_pct: f64,
    measured_pct: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FunctionDoc {
    name: String,
    self_pct: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FilesDoc {
    svg: String,
}

/// One session row: a summary and the files beside it.
#[derive(Debug)]
struct SessionRow {
    /// `<label>-<pid>-<timestamp>`, the summary's file name without `.json`.
    stem: String,
    doc: SummaryDoc,
    /// File name of the flamegraph, when it is in the folder.
    svg: Option<String>,
    /// File name of the differential flamegraph, when there is one.
    diff_svg: Option<String>,
    /// Other files of the session (`folded`, `json`, pprof…): (label, name).
    others: Vec<(String, String)>,
}

/// One alert record, and when its condition was resolved (firing records).
#[derive(Debug)]
struct AlertRow {
    record: AlertRecord,
    resolved_at: Option<String>,
    /// File names of the attached profile's flamegraphs in the folder.
    svg: Option<String>,
    diff_svg: Option<String>,
}

/// What the index shows, read from a folder.
#[derive(Debug)]
struct Index {
    /// Machine the folder is on (an engineer may have several tabs open).
    host: String,
    /// When the index was written, RFC 3339.
    generated_at: String,
    sessions: Vec<SessionRow>,
    /// Summaries beyond [`MAX_SESSIONS`], not shown.
    older_sessions: usize,
    alerts: Vec<AlertRow>,
    /// Records beyond [`MAX_ALERTS`], not shown.
    older_alerts: usize,
    /// Lines of alerts.jsonl that are not alert records.
    bad_alert_lines: usize,
    /// Whether alerts.jsonl exists.
    has_alerts_file: bool,
}

/// Rewrites `dir/index.html` from the summaries and alerts in `dir`, and
/// returns its path.
pub fn refresh(dir: &Path) -> Result<PathBuf, RenderError> {
    let err = |source| RenderError::Write {
        path: dir.to_owned(),
        source,
    };
    // Writers in other processes (a `record` beside a daemon) and threads
    // take turns on an advisory lock of the folder: otherwise two writers
    // share the temp file, and an older scan renamed last could drop the
    // newest session from the index.
    let lock = File::open(dir).map_err(err)?;
    lock.lock().map_err(err)?;
    let index = Index::scan(dir, SystemTime::now());
    let path = dir.join(INDEX);
    write_file(&path, render(&index).as_bytes())?;
    debug!("wrote {}", path.display());
    Ok(path)
}

/// [`refresh`] on a blocking thread, awaited: for async callers (a
/// session's end), so the scan and the write never hold a runtime worker.
pub async fn refresh_off_runtime(dir: &Path) -> Result<PathBuf, RenderError> {
    let owned = dir.to_owned();
    tokio::task::spawn_blocking(move || refresh(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(RenderError::Write {
                path: dir.to_owned(),
                source: std::io::Error::other(e),
            })
        })
}

/// Folders whose refresh is queued but not started.
static QUEUED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Refreshes `dir`'s index on a blocking thread, without waiting (for the
/// daemon's loop). Requests made while one is queued and not yet started
/// are folded into it: that scan will see their changes too.
pub fn refresh_later(dir: &Path) {
    let dir = dir.to_owned();
    if !QUEUED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(dir.clone())
    {
        return;
    }
    let run = move || {
        QUEUED.lock().unwrap_or_else(|e| e.into_inner()).remove(&dir);
        if let Err(e) = refresh(&dir) {
            warn!("cannot write the index of {}: {e}", dir.display());
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(run)),
        Err(_) => run(),
    }
}

/// Length and modification time of an alerts file.
type FileStamp = (u64, Option<SystemTime>);

/// Each folder's alerts file when last seen.
static ALERTS_SEEN: Mutex<Option<HashMap<PathBuf, FileStamp>>> = Mutex::new(None);

/// Refreshes `dir`'s index (in the background) when `dir/alerts.jsonl`
/// changed since the last call, and on the first call. A `stat` a call:
/// cheap enough for every daemon interval.
pub fn refresh_if_alerts_changed(dir: &Path) {
    let now = std::fs::metadata(dir.join(ALERTS)).map_or((0, None), |m| (m.len(), m.modified().ok()));
    let changed = {
        let mut seen = ALERTS_SEEN.lock().unwrap_or_else(|e| e.into_inner());
        seen.get_or_insert_with(HashMap::new).insert(dir.to_owned(), now) != Some(now)
    };
    if changed {
        refresh_later(dir);
    }
}

impl Index {
    /// Reads the summaries and alerts of `dir`.
    fn scan(dir: &Path, now: SystemTime) -> Self {
        let names: BTreeSet<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        let (sessions, older_sessions) = sessions(dir, &names);
        let mut index = Self {
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            generated_at: humantime::format_rfc3339_seconds(now).to_string(),
            sessions,
            older_sessions,
            alerts: Vec::new(),
            older_alerts: 0,
            bad_alert_lines: 0,
            has_alerts_file: false,
        };
        if let Ok(text) = crate::fsafe::read_tail(&dir.join(ALERTS), MAX_ALERT_BYTES) {
            index.has_alerts_file = true;
            let (alerts, older, bad) = alerts(&text, &names);
            (index.alerts, index.older_alerts, index.bad_alert_lines) = (alerts, older, bad);
        }
        index
    }
}

/// The sessions of `dir` as JSON, newest first (at most [`MAX_SESSIONS`]):
/// what the index lists, for the dashboard.
pub fn session_list(dir: &Path) -> serde_json::Value {
    let index = Index::scan(dir, SystemTime::now());
    let rows: Vec<serde_json::Value> = index
        .sessions
        .iter()
        .map(|r| {
            let target = r.doc.targets.first();
            serde_json::json!({
                "stem": r.stem,
                "kind": r.doc.session.kind,
                "mode": r.doc.mode,
                "started_at": r.doc.session.started_at,
                "duration_s": r.doc.session.duration_s,
                "pid": target.map(|t| t.pid),
                "comm": target.map(|t| t.comm.clone()),
                "samples": r.doc.sampling.samples,
                "top": r.doc.top_functions.first().map(|f| (f.name.clone(), f.self_pct)),
                "svg": r.svg,
                "diff_svg": r.diff_svg,
                "files": r.others.iter().map(|(_, name)| name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "sessions": rows, "older": index.older_sessions })
}

/// `20261122T031500Z` at the end of a summary's stem, for ordering files
/// before parsing them.
fn stem_timestamp(stem: &str) -> &str {
    let ts = stem.rsplit('-').next().unwrap_or("");
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let ok = ts.len() == 16
        && ts.as_bytes()[8] == b'T'
        && ts.ends_with('Z')
        && digits(&ts[..8])
        && digits(&ts[9..15]);
    if ok {
        ts
    } else {
        ""
    }
}

/// The session rows of the newest summaries among `names`, newest first,
/// and how many summaries were left out. At most [`MAX_SESSIONS`]
/// summaries are read: the scan is bounded whatever the folder holds.
fn sessions(dir: &Path, names: &BTreeSet<String>) -> (Vec<SessionRow>, usize) {
    let mut stems: Vec<&str> = names.iter().filter_map(|n| n.strip_suffix(".json")).collect();
    // Newest by file name first, so a huge folder is not parsed whole.
    stems.sort_by(|a, b| stem_timestamp(b).cmp(stem_timestamp(a)).then(b.cmp(a)));
    let mut rows = Vec::new();
    let mut older = 0;
    for (i, stem) in stems.iter().copied().enumerate() {
        if rows.len() == MAX_SESSIONS {
            // Not read: the session files among the rest (other JSON
            // files have no timestamp in their names).
            older = stems[i..]
                .iter()
                .filter(|s| !stem_timestamp(s).is_empty())
                .count();
            break;
        }
        let path = dir.join(format!("{stem}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // Other JSON files (not summaries) lack `session` and are skipped.
        let doc = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v.get("session").is_some() && v.get("sampling").is_some() => {
                match serde_json::from_value::<SummaryDoc>(v) {
                    Ok(doc) => doc,
                    Err(e) => {
                        debug!("{}: not a summary: {e}", path.display());
                        continue;
                    }
                }
            }
            _ => continue,
        };
        rows.push(session_row(stem, doc, names));
    }
    rows.sort_by(|a, b| {
        b.doc
            .session
            .started_at
            .cmp(&a.doc.session.started_at)
            .then(b.stem.cmp(&a.stem))
    });
    (rows, older)
}

/// The row of the summary `<stem>.json`, with the files beside it.
fn session_row(stem: &str, doc: SummaryDoc, names: &BTreeSet<String>) -> SessionRow {
    let prefix = format!("{stem}.");
    let svg_name = format!("{stem}.svg");
    let diff_name = format!("{stem}.diff.svg");
    // The summary names its flamegraph; it is in this folder when the
    // summary is (both are written side by side).
    let svg =
        in_folder(&doc.files.svg, names).or_else(|| names.contains(&svg_name).then_some(svg_name.clone()));
    let diff_svg = names.contains(&diff_name).then_some(diff_name.clone());
    let others = names
        .range(prefix.clone()..)
        .take_while(|n| n.starts_with(&prefix))
        .filter(|n| Some(n.as_str()) != svg.as_deref() && **n != diff_name && !n.ends_with(".tmp"))
        .map(|n| {
            let label = match &n[prefix.len()..] {
                "pb.gz" => "pprof",
                other => other,
            };
            (label.to_owned(), n.clone())
        })
        .collect();
    SessionRow {
        stem: stem.to_owned(),
        doc,
        svg,
        diff_svg,
        others,
    }
}

/// The file name of `path` when a file of that name is in the folder.
fn in_folder(path: &str, names: &BTreeSet<String>) -> Option<String> {
    let name = Path::new(path).file_name()?.to_str()?;
    names.contains(name).then(|| name.to_owned())
}

/// The alert rows of an alerts.jsonl text, newest first; how many older
/// records were left out, and how many lines were not records.
fn alerts(text: &str, names: &BTreeSet<String>) -> (Vec<AlertRow>, usize, usize) {
    let mut bad = 0;
    let records: Vec<AlertRecord> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).inspect_err(|_| bad += 1).ok())
        .collect();
    // A firing record is resolved by the next resolved record of the same
    // rule on the same process, and gets the links of the emergency profile
    // it started (the `profile` follow-up), so its row has them too.
    let mut rows: Vec<AlertRow> = Vec::with_capacity(records.len());
    let mut open: HashMap<(u32, String), usize> = HashMap::new();
    let mut last_fired: HashMap<(u32, String), usize> = HashMap::new();
    for record in records {
        let key = (record.target.pid, record.rule.clone());
        let links = record.profile.as_ref();
        let svg = links.and_then(|p| in_folder(&p.svg, names));
        let diff_svg = links
            .and_then(|p| p.diff_svg.as_deref())
            .and_then(|d| in_folder(d, names));
        match record.status {
            Status::Firing => {
                open.insert(key.clone(), rows.len());
                last_fired.insert(key, rows.len());
            }
            Status::Resolved => {
                if let Some(i) = open.remove(&key) {
                    rows[i].resolved_at = Some(record.time.clone());
                }
            }
            Status::Profile => {
                if let Some(&i) = last_fired.get(&key) {
                    if rows[i].svg.is_none() {
                        (rows[i].svg, rows[i].diff_svg) = (svg.clone(), diff_svg.clone());
                    }
                }
            }
        }
        rows.push(AlertRow {
            svg,
            diff_svg,
            record,
            resolved_at: None,
        });
    }
    // Lines are appended in time order; the stable sort keeps that order
    // between records of the same second.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| rows[b].record.time.cmp(&rows[a].record.time).then(b.cmp(&a)));
    let older = order.len().saturating_sub(MAX_ALERTS);
    order.truncate(MAX_ALERTS);
    let mut slots: Vec<Option<AlertRow>> = rows.into_iter().map(Some).collect();
    let rows = order.into_iter().filter_map(|i| slots[i].take()).collect();
    (rows, older, bad)
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters, so a file name is
/// one relative path segment (a `:` cannot make it a scheme) and a query
/// value survives `decodeURIComponent`.
fn pct(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Escapes regular expression syntax (inferno's search takes a regexp).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\^$.|?*+()[]{}/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A relative link to a file of the folder.
fn link(name: &str, label: &str, class: &str) -> String {
    format!(
        "<a class=\"{class}\" href=\"{}\">{}</a>",
        esc(&pct(name)),
        esc(label)
    )
}

/// The flamegraph `svg` opened with `function` highlighted: inferno's
/// script runs its search on the `s` parameter. The frame titles read
/// `name (N samples, P%)`, so the anchored pattern matches that frame only.
fn search_href(svg: &str, function: &str) -> String {
    let pattern = format!("^{} \\(", regex_escape(function));
    format!("{}?s={}", pct(svg), pct(&pattern))
}

/// `2026-11-22T03:00:00Z` as `2026-11-22 03:00:00`, in a `<time>` element
/// (the inline script adds how long ago it was).
fn time(rfc3339: &str) -> String {
    let shown = rfc3339.replacen('T', " ", 1);
    let shown = shown.trim_end_matches('Z');
    format!("<time datetime=\"{}\">{}</time>", esc(rfc3339), esc(shown))
}

/// `1 session`, `2 sessions`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// `12345` as `12 345` (narrow no-break space).
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// A float for humans: no needless digits on large values.
fn num(x: f64) -> String {
    if x.abs() >= 1e6 {
        format!("{x:.3e}")
    } else if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fff; --muted: #666; --line: #ddd; --head: #f4f4f6;
  --warn-bg: #fff3cd; --warn-fg: #7a4d00; --crit-bg: #fdd; --crit-fg: #a00; --emer-bg: #a00; --emer-fg: #fff;
  --ok-bg: #dff3e3; --ok-fg: #17602a; --info-bg: #e1ecfb; --info-fg: #1b4f9c; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8ea; --bg: #16171a; --muted: #a0a0a8; --line: #33353b; --head: #22242a;
    --warn-bg: #4a3a10; --warn-fg: #ffd977; --crit-bg: #5a1a1a; --crit-fg: #ffb3b3; --emer-bg: #d32f2f; --emer-fg: #fff;
    --ok-bg: #1d3b25; --ok-fg: #9fe0b0; --info-bg: #1c2e4a; --info-fg: #a9c8f5; }
}
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); margin: 1.2em 2em; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.2em; margin: 1.6em 0 .5em; }
.meta, .note, .ago, small { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--head); position: sticky; top: 0; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.t, .nw { white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.kind-emergency td:first-child { box-shadow: inset 4px 0 var(--crit-fg); }
.fn { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .92em; word-break: break-all; }
.badge { display: inline-block; padding: 0 .5em; border-radius: .8em; font-size: .85em; font-weight: 600; white-space: nowrap; }
.sev-warning { background: var(--warn-bg); color: var(--warn-fg); }
.sev-critical { background: var(--crit-bg); color: var(--crit-fg); }
.sev-emergency { background: var(--emer-bg); color: var(--emer-fg); }
.st-firing { background: var(--crit-bg); color: var(--crit-fg); }
.st-resolved { background: var(--ok-bg); color: var(--ok-fg); }
.st-profile { background: var(--info-bg); color: var(--info-fg); }
.kind-emergency .badge.kind { background: var(--crit-bg); color: var(--crit-fg); }
.kind-scheduled .badge.kind { background: var(--info-bg); color: var(--info-fg); }
.kind-on-demand .badge.kind { background: var(--head); color: var(--fg); }
.over { color: var(--crit-fg); font-weight: 700; }
.near { color: var(--warn-fg); font-weight: 600; }
a { color: var(--info-fg); }
a.svg { font-weight: 600; }
.files a { margin-right: .6em; white-space: nowrap; }
details summary { cursor: pointer; color: var(--muted); }
pre { margin: .3em 0; font-size: .85em; white-space: pre-wrap; }
"#;

/// Adds "(5 min ago)" after every time: the page may be read long after it
/// was written, and relative times are what a tired reader needs.
const SCRIPT: &str = r#"
(function () {
  var now = Date.now();
  var times = document.querySelectorAll("time[datetime]");
  for (var i = 0; i < times.length; i++) {
    var t = Date.parse(times[i].getAttribute("datetime"));
    if (isNaN(t) || t > now + 60000) continue;
    var s = Math.max(0, Math.round((now - t) / 1000));
    var ago = s < 90 ? s + " s" : s < 5400 ? Math.round(s / 60) + " min" :
      s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " days";
    var span = document.createElement("span");
    span.className = "ago";
    span.textContent = " (" + ago + " ago)";
    times[i].parentNode.insertBefore(span, times[i].nextSibling);
  }
})();
"#;

/// The page.
fn render(index: &Index) -> String {
    let mut h = String::new();
    let host = if index.host.is_empty() {
        String::new()
    } else {
        format!(" on {}", esc(&index.host))
    };
    let emergencies = index
        .sessions
        .iter()
        .filter(|s| s.doc.session.kind == "emergency")
        .count();
    let firing = index
        .alerts
        .iter()
        .filter(|a| a.record.status == Status::Firing)
        .count();
    let unresolved = index
        .alerts
        .iter()
        .filter(|a| {
            a.record.status == Status::Firing
                && a.resolved_at.is_none()
                && a.record.severity >= crate::detect::Severity::Critical
        })
        .count();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>flamewatch{host}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>flamewatch{host}</h1>\n<p class=\"meta\">{} ({emergencies} emergency) · \
         {}{} · index written {} from the files in this folder</p>\n",
        plural(index.sessions.len() + index.older_sessions, "session"),
        plural(firing, "alert") + " fired",
        if unresolved > 0 {
            format!(", <span class=\"over\">{unresolved} critical without a resolved record</span>")
        } else {
            String::new()
        },
        time(&index.generated_at),
    );
    sessions_table(&mut h, index);
    alerts_table(&mut h, index);
    let _ = write!(
        h,
        "<p class=\"note\">Newest first. Flamegraphs: click a frame to zoom, Ctrl-F or \
         “Search” to highlight a function; a “top function” link opens the flamegraph with \
         it highlighted. Differential flamegraphs: red grew, blue shrank since the latest \
         baseline.</p>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    h
}

fn sessions_table(h: &mut String, index: &Index) {
    h.push_str("<h2 id=\"sessions\">Sessions</h2>\n");
    if index.sessions.is_empty() {
        h.push_str("<p class=\"note\">No session summaries in this folder yet.</p>\n");
        return;
    }
    h.push_str(
        "<table>\n<thead><tr><th>Start (UTC)</th><th>Target</th><th>Kind</th><th>Duration</th>\
         <th>Samples</th><th>Rate</th><th>Overhead</th><th>Top function</th><th>Files</th></tr></thead>\n<tbody>\n",
    );
    for s in &index.sessions {
        let d = &s.doc;
        let kind = if d.session.kind.is_empty() {
            "unknown"
        } else {
            &d.session.kind
        };
        let target = d.targets.first().map_or_else(
            || esc(&s.stem),
            |t| format!("{} <small class=\"nw\">pid {}</small>", esc(&t.comm), t.pid),
        );
        let warnings = if d.warnings.is_empty() {
            String::new()
        } else {
            format!(
                "<br><small title=\"{}\">⚠ {}</small>",
                esc(&d.warnings.join("\n")),
                esc(&d.warnings[0])
            )
        };
        let mode = match d.mode.as_str() {
            "" | "cpu" => String::new(),
            "offcpu" => " <small>off-CPU</small>".into(),
            m => format!(" <small>{}</small>", esc(m)),
        };
        let blocked = d.off_cpu.as_ref().map_or_else(String::new, |o| {
            format!(
                "<br><small>{:.1} s blocked in {} blocks</small>",
                o.blocked_s,
                thousands(o.blocks)
            )
        });
        let o = &d.overhead;
        let level = if o.budget_pct > 0.0 && o.measured_pct > o.budget_pct {
            " class=\"n over\""
        } else if o.budget_pct > 0.0 && o.measured_pct > 0.8 * o.budget_pct {
            " class=\"n near\""
        } else {
            " class=\"n\""
        };
        let top = d.top_functions.first().map_or_else(String::new, |f| {
            let name = match &s.svg {
                Some(svg) => format!(
                    "<a href=\"{}\" title=\"open the flamegraph with it highlighted\">{}</a>",
                    esc(&search_href(svg, &f.name)),
                    esc(&f.name)
                ),
                None => esc(&f.name),
            };
            format!(
                "<span class=\"fn\">{name}</span> <small class=\"nw\">{:.1} %</small>",
                f.self_pct
            )
        });
        let mut files = String::new();
        match &s.svg {
            Some(svg) => files.push_str(&link(svg, "flamegraph", "svg")),
            None => files.push_str("<small>no flamegraph</small> "),
        }
        if let Some(diff) = &s.diff_svg {
            files.push_str(&link(diff, "diff", "diff"));
        }
        for (label, name) in &s.others {
            files.push_str(&link(name, label, "other"));
        }
        let _ = writeln!(
            h,
            "<tr class=\"kind-{kind_class}\"><td class=\"t\">{start}</td><td>{target}{warnings}</td>\
             <td><span class=\"badge kind\">{kind}</span>{mode}</td><td class=\"n\">{dur}</td>\
             <td class=\"n\">{samples}{blocked}</td><td class=\"n\" title=\"requested {req} Hz\">{rate:.0} Hz</td>\
             <td{level} title=\"budget {budget} %\">{pct:.2} %</td><td>{top}</td><td class=\"files\">{files}</td></tr>",
            kind_class = esc(kind),
            start = time(&d.session.started_at),
            kind = esc(kind),
            dur = duration(d.session.duration_s),
            samples = thousands(d.sampling.samples),
            req = d.sampling.requested_hz,
            rate = d.sampling.effective_hz,
            budget = num(o.budget_pct),
            pct = o.measured_pct,
        );
    }
    h.push_str("</tbody>\n</table>\n");
    if index.older_sessions > 0 {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} older sessions are not listed; their files are in this folder.</p>",
            index.older_sessions
        );
    }
}

fn alerts_table(h: &mut String, index: &Index) {
    h.push_str("<h2 id=\"alerts\">Alerts</h2>\n");
    if !index.has_alerts_file {
        let _ = writeln!(
            h,
            "<p class=\"note\">No {ALERTS} in this folder (alerts are written by <code>flamewatch watch</code>).</p>"
        );
        return;
    }
    if index.alerts.is_empty() {
        h.push_str("<p class=\"note\">No alerts recorded.</p>\n");
    } else {
        h.push_str(
            "<table>\n<thead><tr><th>Time (UTC)</th><th>Status</th><th>Severity</th><th>Target</th>\
             <th>Rule</th><th>Message</th><th>Value</th><th>Profile</th></tr></thead>\n<tbody>\n",
        );
        for a in &index.alerts {
            let r = &a.record;
            let status = format!("{:?}", r.status).to_lowercase();
            let severity = format!("{:?}", r.severity).to_lowercase();
            let resolved = a.resolved_at.as_deref().map_or_else(String::new, |t| {
                format!("<br><small>resolved {}</small>", time(t))
            });
            let mut profile = String::new();
            if let Some(svg) = &a.svg {
                profile.push_str(&link(svg, "flamegraph", "svg"));
            }
            if let Some(diff) = &a.diff_svg {
                profile.push_str(&link(diff, "diff", "diff"));
            }
            let blocked = if r.blocked.is_empty() {
                String::new()
            } else {
                let mut d = format!("<details><summary>blocked threads: {}</summary>", r.blocked.len());
                for b in &r.blocked {
                    let _ = write!(
                        d,
                        "<pre>{} (tid {}), blocked {:.1} s\n  {}</pre>",
                        esc(&b.comm),
                        b.tid,
                        b.blocked_s,
                        esc(&b.stack.join("\n  "))
                    );
                }
                d.push_str("</details>");
                d
            };
            let value = if r.metric.is_empty() {
                String::new()
            } else {
                format!(
                    "<small>{}</small> {} <small>/ {}</small>",
                    esc(&r.metric),
                    num(r.value),
                    num(r.threshold)
                )
            };
            let _ = writeln!(
                h,
                "<tr class=\"st-row-{status}\"><td class=\"t\">{time}</td>\
                 <td><span class=\"badge st-{status}\">{status}</span>{resolved}</td>\
                 <td><span class=\"badge sev-{severity}\">{severity}</span></td>\
                 <td>{comm} <small class=\"nw\">pid {pid}</small></td><td>{rule}</td><td>{message}{blocked}</td>\
                 <td class=\"n\">{value}</td><td class=\"files\">{profile}</td></tr>",
                time = time(&r.time),
                comm = esc(&r.target.comm),
                pid = r.target.pid,
                rule = esc(&r.rule),
                message = esc(&r.message),
            );
        }
        h.push_str("</tbody>\n</table>\n");
    }
    if index.older_alerts > 0 {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} older alert records are not listed; see {ALERTS}.</p>",
            index.older_alerts
        );
    }
    if index.bad_alert_lines > 0 {
        let _ = writeln!(
            h,
            "<p class=\"note\">Lines of {ALERTS} that are not alert records (skipped): {}.</p>",
            index.bad_alert_lines
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{AlertTarget, BlockedEvidence, ProfileLinks};
    use crate::detect::Severity;

    /// A summary as the agent writes it, trimmed to what varies here.
    #[allow(clippy::too_many_arguments)]
    fn summary(
        dir: &Path,
        stem: &str,
        comm: &str,
        pid: u32,
        kind: &str,
        started_at: &str,
        mode: &str,
        top: &str,
        pct: f64,
    ) -> String {
        let json = serde_json::json!({
            "version": 1,
            "session": {"id": format!("{kind}_{pid}"), "kind": kind, "started_at": started_at, "duration_s": 30.012},
            "targets": [{"pid": pid, "comm": comm, "exe": "/usr/bin/x"}],
            "sampling": {"requested_hz": 499, "effective_hz": 431.7, "samples": 12950, "lost_samples": 0},
            "mode": mode,
            "overhead": {"budget_pct": 5.0, "measured_pct": pct, "max_pct": 6.0, "timeline": []},
            "top_functions": [{"name": top, "self_pct": 61.234, "total_pct": 70.0, "self_samples": 7000}],
            "files": {
                "svg": dir.join(format!("{stem}.svg")).display().to_string(),
                "folded": dir.join(format!("{stem}.folded")).display().to_string(),
                "json": dir.join(format!("{stem}.json")).display().to_string()
            },
            "warnings": []
        });
        serde_json::to_string_pretty(&json).expect("json")
    }

    fn alert(time: &str, status: Status, rule: &str, severity: Severity, message: &str) -> AlertRecord {
        AlertRecord {
            time: time.into(),
            status,
            target: AlertTarget {
                pid: 4242,
                comm: "logcaster".into(),
            },
            rule: rule.into(),
            severity,
            metric: "cpu_pct".into(),
            value: 99.5,
            threshold: 80.0,
            message: message.into(),
            profile: None,
            blocked: Vec::new(),
            top_threads: Vec::new(),
            stack: Vec::new(),
        }
    }

    /// A folder with three sessions (one emergency with a differential
    /// flamegraph), a non-summary JSON file and an alerts stream.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let sessions = [
            (
                "logcaster-baseline-4242-20261122T030000Z",
                "logcaster",
                4242,
                "scheduled",
                "2026-11-22T03:00:00Z",
                "cpu",
                "parse_line",
                0.41,
            ),
            (
                "logcaster-emergency-4242-20261122T031500Z",
                "logcaster",
                4242,
                "emergency",
                "2026-11-22T03:15:00Z",
                "cpu",
                "std::vector<T>::push_back<int&>",
                4.6,
            ),
            (
                "game-server-77-20261122T031000Z",
                "game-server",
                77,
                "on-demand",
                "2026-11-22T03:10:00Z",
                "offcpu",
                "a & b <c>",
                7.25,
            ),
        ];
        for (stem, comm, pid, kind, at, mode, top, pct) in sessions {
            std::fs::write(
                d.join(format!("{stem}.json")),
                summary(d, stem, comm, pid, kind, at, mode, top, pct),
            )
            .expect("write");
            for ext in ["svg", "folded", "pb.gz"] {
                std::fs::write(d.join(format!("{stem}.{ext}")), "x").expect("write");
            }
        }
        std::fs::write(d.join("logcaster-emergency-4242-20261122T031500Z.diff.svg"), "x").expect("write");
        std::fs::write(d.join("calibration.json"), "{\"interrupt_ns\": 1}").expect("write");
        let mut lines = Vec::new();
        let mut firing = alert(
            "2026-11-22T03:14:58Z",
            Status::Firing,
            "cpu_high",
            Severity::Critical,
            "CPU 99.5 % > 80 % for 10 s",
        );
        lines.push(serde_json::to_string(&firing).expect("json"));
        firing.status = Status::Profile;
        firing.time = "2026-11-22T03:15:31Z".into();
        firing.message = "emergency profile of cpu_high".into();
        firing.profile = Some(ProfileLinks {
            svg: d
                .join("logcaster-emergency-4242-20261122T031500Z.svg")
                .display()
                .to_string(),
            json: d
                .join("logcaster-emergency-4242-20261122T031500Z.json")
                .display()
                .to_string(),
            diff_svg: Some("/elsewhere/baseline-gone.diff.svg".into()),
            crash: None,
        });
        lines.push(serde_json::to_string(&firing).expect("json"));
        lines.push(
            serde_json::to_string(&alert(
                "2026-11-22T03:16:10Z",
                Status::Resolved,
                "cpu_high",
                Severity::Critical,
                "cpu_high cleared",
            ))
            .expect("json"),
        );
        let mut stuck = alert(
            "2026-11-22T03:17:00Z",
            Status::Firing,
            "stuck",
            Severity::Emergency,
            "all 4 workers blocked for 30 s",
        );
        stuck.blocked = vec![BlockedEvidence {
            tid: 4250,
            comm: "worker-1".into(),
            blocked_s: 31.5,
            stack: vec!["main".into(), "lock<Mutex>".into(), "futex_wait_[k]".into()],
        }];
        lines.push(serde_json::to_string(&stuck).expect("json"));
        lines.push("not json".into());
        std::fs::write(d.join(ALERTS), lines.join("\n") + "\n").expect("write");
        dir
    }

    fn fixed_index(dir: &Path) -> Index {
        let mut index = Index::scan(dir, SystemTime::UNIX_EPOCH);
        index.host = "prod-7".into();
        index.generated_at = "2026-11-22T03:20:00Z".into();
        index
    }

    /// Test that the index of a fixed folder (summaries, a differential
    /// flamegraph, alerts) matches the golden file.
    #[test]
    fn index_golden() {
        let dir = fixture();
        crate::render::assert_golden("index.html", &render(&fixed_index(dir.path())));
    }

    /// Test that sessions and alerts are listed newest first, and that a
    /// resolved record marks its firing record.
    #[test]
    fn newest_first() {
        let dir = fixture();
        let index = fixed_index(dir.path());
        let starts: Vec<&str> = index
            .sessions
            .iter()
            .map(|s| s.doc.session.started_at.as_str())
            .collect();
        assert_eq!(
            starts,
            [
                "2026-11-22T03:15:00Z",
                "2026-11-22T03:10:00Z",
                "2026-11-22T03:00:00Z"
            ]
        );
        let times: Vec<&str> = index.alerts.iter().map(|a| a.record.time.as_str()).collect();
        assert_eq!(
            times,
            [
                "2026-11-22T03:17:00Z",
                "2026-11-22T03:16:10Z",
                "2026-11-22T03:15:31Z",
                "2026-11-22T03:14:58Z"
            ]
        );
        assert_eq!(
            index.alerts[3].resolved_at.as_deref(),
            Some("2026-11-22T03:16:10Z")
        );
        assert_eq!(index.alerts[0].resolved_at, None);
        // The firing record links the emergency profile it started.
        assert_eq!(
            index.alerts[3].svg.as_deref(),
            Some("logcaster-emergency-4242-20261122T031500Z.svg")
        );
        assert_eq!(index.bad_alert_lines, 1);
    }

    /// Test that function names, messages and stacks are escaped, so a C++
    /// name cannot open a tag and `&` is an entity.
    #[test]
    fn escaping() {
        assert_eq!(esc("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
        let dir = fixture();
        let html = render(&fixed_index(dir.path()));
        assert!(
            html.contains("std::vector&lt;T&gt;::push_back&lt;int&amp;&gt;"),
            "{html}"
        );
        assert!(html.contains("a &amp; b &lt;c&gt;"));
        assert!(html.contains("lock&lt;Mutex&gt;"));
        assert!(!html.contains("<c>") && !html.contains("<T>") && !html.contains("<Mutex>"));
        // The search link carries the name percent-encoded, regexp-escaped.
        assert_eq!(
            search_href("x y.svg", "a<b>(c)"),
            "x%20y.svg?s=%5Ea%3Cb%3E%5C%28c%5C%29%20%5C%28"
        );
    }

    /// Test that every link is relative to the folder: no absolute path, no
    /// scheme, and a profile outside the folder is not linked.
    #[test]
    fn links_are_relative() {
        let dir = fixture();
        let html = render(&fixed_index(dir.path()));
        let hrefs: Vec<&str> = html
            .split("href=\"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').expect("closing quote")])
            .collect();
        assert!(hrefs.len() >= 10, "{hrefs:?}");
        for href in &hrefs {
            assert!(
                !href.starts_with('/') && !href.contains(':') && !href.contains(".."),
                "{href}"
            );
            let file = href.split('?').next().expect("path");
            assert!(
                dir.path().join(file).exists(),
                "{href} points at a file of the folder"
            );
        }
        assert!(
            !html.contains(&dir.path().display().to_string()),
            "no absolute path in the page"
        );
        // The profile record's diff_svg is not in the folder: not linked.
        let profile_row = html
            .lines()
            .find(|l| l.contains("emergency profile of cpu_high"))
            .expect("row");
        assert!(profile_row.contains("href=\"logcaster-emergency-4242-20261122T031500Z.svg\""));
        assert!(!profile_row.contains(".diff.svg"));
        assert_eq!(pct("a:b/c"), "a%3Ab%2Fc");
        // No external asset: nothing is loaded from anywhere.
        assert!(!html.contains("src=") && !html.contains("<link") && !html.contains("url("));
    }

    /// Test that `refresh` writes index.html atomically into the folder (no
    /// temp file left) and that an empty folder gets an index too.
    #[test]
    fn refresh_writes_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = refresh(dir.path()).expect("refresh");
        assert_eq!(path, dir.path().join(INDEX));
        let html = std::fs::read_to_string(&path).expect("read");
        assert!(html.contains("No session summaries in this folder yet."));
        assert!(html.contains("No alerts.jsonl in this folder"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [INDEX]);
    }

    /// Test that a folder with more summaries than the index shows is
    /// scanned up to the bound only: the newest are rows, the rest counted
    /// unread (a broken old summary is not even opened).
    #[test]
    fn bounded_scan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = std::fs::read_to_string(
            fixture()
                .path()
                .join("logcaster-emergency-4242-20261122T031500Z.json"),
        )
        .expect("fixture summary");
        let stem = |i: usize| format!("t-1-2026{:02}{:02}T000000Z", 1 + i / 28, 1 + i % 28);
        for i in 0..MAX_SESSIONS + 7 {
            // The oldest is no JSON at all: it must not be read.
            let body = if i == 0 { "{".to_owned() } else { text.clone() };
            std::fs::write(dir.path().join(format!("{}.json", stem(i))), body).expect("write");
        }
        let index = Index::scan(dir.path(), SystemTime::UNIX_EPOCH);
        assert_eq!(index.sessions.len(), MAX_SESSIONS);
        assert_eq!(index.older_sessions, 7);
        assert_eq!(index.sessions[0].stem, stem(MAX_SESSIONS + 6));
    }

    /// Test that the index is rebuilt on a blocking thread for async
    /// callers, also from a single-threaded runtime.
    #[tokio::test(flavor = "current_thread")]
    async fn refresh_off_the_runtime() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = refresh_off_runtime(dir.path()).await.expect("refresh");
        assert!(path.is_file());
        assert!(refresh_off_runtime(&dir.path().join("none")).await.is_err());
    }

    /// Test that only the newest sessions are read from a huge folder, by
    /// the timestamp in their file names.
    #[test]
    fn stems_order_by_timestamp() {
        assert_eq!(stem_timestamp("a-b-1-20261122T031500Z"), "20261122T031500Z");
        assert_eq!(stem_timestamp("calibration"), "");
        assert_eq!(stem_timestamp("x-2026112XT031500Z"), "");
        assert_eq!(duration(30.012), "30.0 s");
        assert_eq!(duration(125.0), "2 min 05 s");
        assert_eq!(duration(7300.0), "2 h 01 min");
        assert_eq!(thousands(1234567), "1\u{202f}234\u{202f}567");
    }
}
