//! Retention: an output folder a daemon writes into for weeks stays within
//! `[retention]` (sessions, bytes, age).
//!
//! A session is the set of files sharing a stem `<label>-<pid>-<timestamp>`
//! (`.svg`, `.folded`, `.json`, `.pb.gz`, `.diff.svg`, and an emergency's
//! `.before-after.svg` and `.baseline.folded`; a memory profile's
//! `.alloc.*`, `.leaked.*`, `.extend.*`): it is kept or removed
//! whole. The newest are kept while every limit holds; once one does not,
//! every older session goes, except the protected ones (the profiles of
//! alerts that still fire, the daemon's baselines), which are always kept.
//! Files that are not the agent's (other names, symlinks, folders) are
//! never touched.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tracing::{debug, info, warn};

use crate::{
    alerts::{AlertRecord, Status},
    config::RetentionConfig,
};

/// Extensions of a session's files, longest first (`.diff.svg` before `.svg`).
const EXTENSIONS: &[&str] = &[
    ".before-after.svg",
    ".baseline.folded",
    ".crash.json",
    ".crash.txt",
    ".diff.svg",
    // Memory and heap profiles' extra views (`memory::report`).
    ".extend.folded",
    ".leaked.folded",
    ".alloc.folded",
    ".extend.svg",
    ".leaked.svg",
    ".alloc.svg",
    ".pb.gz",
    ".folded",
    ".json",
    ".svg",
];
/// A temporary file older than this was left by a writer that died.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Most of alerts.jsonl read to find the firing alerts (its newest part).
const ALERTS_TAIL: u64 = 8 << 20;

/// Errors of pruning.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The folder cannot be listed.
    #[error("pruning {path}: {source}")]
    Read {
        /// The folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Rewriting the index after pruning failed.
    #[error(transparent)]
    Index(#[from] crate::render::RenderError),
}

/// What a prune did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneStats {
    /// Sessions kept.
    pub kept: usize,
    /// Bytes of the sessions kept.
    pub kept_bytes: u64,
    /// Sessions removed.
    pub removed: usize,
    /// Files removed (temporary files of dead writers included).
    pub removed_files: usize,
    /// Bytes removed.
    pub removed_bytes: u64,
}

/// The files of one session.
#[derive(Debug)]
struct Session {
    stem: String,
    files: Vec<PathBuf>,
    bytes: u64,
    /// Newest modification time of its files.
    modified: SystemTime,
}

/// The session stem of a file name, when it is one of the agent's report
/// names: `<label>-<pid>-<YYYYMMDDTHHMMSSZ>.<ext>`.
pub fn stem_of(name: &str) -> Option<&str> {
    let stem = EXTENSIONS.iter().find_map(|ext| name.strip_suffix(ext))?;
    let mut parts = stem.rsplitn(3, '-');
    let (ts, pid, label) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ts_ok = ts.len() == 16
        && ts.as_bytes()[8] == b'T'
        && ts.ends_with('Z')
        && digits(&ts[..8])
        && digits(&ts[9..15]);
    (ts_ok && digits(pid) && !label.is_empty()).then_some(stem)
}

/// The stems named by `protected` (stems, file names or paths).
fn protected_stems(protected: &HashSet<String>) -> HashSet<String> {
    protected
        .iter()
        .map(|p| {
            let name = Path::new(p)
                .file_name()
                .map_or_else(|| p.clone(), |n| n.to_string_lossy().into_owned());
            stem_of(&name).map_or(name.clone(), str::to_owned)
        })
        .collect()
}

/// Removes the oldest sessions of `dir` until it holds at most
/// `max_sessions` sessions and `max_bytes` bytes of them, and none older
/// than `max_age`; sessions named in `protected` (stems, or paths of their
/// files) stay. Temporary files left by dead writers (over an hour old) go.
pub fn prune(
    dir: &Path,
    cfg: &RetentionConfig,
    protected: &HashSet<String>,
) -> Result<PruneStats, RetentionError> {
    prune_at(dir, cfg, protected, SystemTime::now())
}

fn prune_at(
    dir: &Path,
    cfg: &RetentionConfig,
    protected: &HashSet<String>,
    now: SystemTime,
) -> Result<PruneStats, RetentionError> {
    let (mut sessions, stale) = scan(dir, now)?;
    let protected = protected_stems(protected);
    let mut stats = PruneStats::default();
    for path in stale {
        if std::fs::remove_file(&path).is_ok() {
            stats.removed_files += 1;
        }
    }
    // Newest first; the stem (its start time) breaks ties.
    sessions.sort_by(|a, b| b.modified.cmp(&a.modified).then(b.stem.cmp(&a.stem)));
    let mut full = false;
    for s in sessions {
        let age = now.duration_since(s.modified).unwrap_or_default();
        full = full
            || stats.kept >= cfg.max_sessions
            || stats.kept_bytes + s.bytes > cfg.max_bytes
            || age > cfg.max_age;
        if !full || protected.contains(&s.stem) {
            stats.kept += 1;
            stats.kept_bytes += s.bytes;
            continue;
        }
        debug!("retention: removing session {} ({} bytes)", s.stem, s.bytes);
        stats.removed += 1;
        for f in &s.files {
            // unlink: never follows a link; a file gone meanwhile is fine.
            if std::fs::remove_file(f).is_ok() {
                stats.removed_files += 1;
            }
        }
        stats.removed_bytes += s.bytes;
    }
    Ok(stats)
}

/// The sessions in `dir` (regular files with report names only), and the
/// temporary files of dead writers.
fn scan(dir: &Path, now: SystemTime) -> Result<(Vec<Session>, Vec<PathBuf>), RetentionError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RetentionError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut by_stem: HashMap<String, Session> = HashMap::new();
    let mut stale = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // DirEntry::metadata does not follow symlinks.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with('.') && name.ends_with(".tmp") {
            if now.duration_since(modified).unwrap_or_default() > STALE_TMP {
                stale.push(entry.path());
            }
            continue;
        }
        let Some(stem) = stem_of(&name) else { continue };
        let s = by_stem.entry(stem.to_owned()).or_insert_with(|| Session {
            stem: stem.to_owned(),
            files: Vec::new(),
            bytes: 0,
            modified: SystemTime::UNIX_EPOCH,
        });
        s.files.push(entry.path());
        s.bytes += meta.len();
        s.modified = s.modified.max(modified);
    }
    Ok((by_stem.into_values().collect(), stale))
}

/// The profiles (file paths) linked from alerts that still fire, in the
/// newest part of the alerts file at `alerts`: a firing record's `profile`
/// follow-up links them, and its `resolved` record releases them.
pub fn firing_profiles(alerts: &Path) -> HashSet<String> {
    let Ok(text) = crate::fsafe::read_tail(alerts, ALERTS_TAIL) else {
        return HashSet::new();
    };
    let mut firing: HashMap<(u32, String), Vec<String>> = HashMap::new();
    for line in text.lines() {
        let Ok(r) = serde_json::from_str::<AlertRecord>(line) else {
            continue;
        };
        let key = (r.target.pid, r.rule.clone());
        match r.status {
            Status::Firing => {
                // A crash alert links its report in the firing record.
                let crash = r.profile.and_then(|p| p.crash);
                firing.insert(key, crash.into_iter().collect());
            }
            Status::Resolved => {
                firing.remove(&key);
            }
            Status::Profile => {
                if let (Some(links), Some(paths)) = (r.profile, firing.get_mut(&key)) {
                    paths.extend([links.svg, links.json].into_iter().chain(links.diff_svg));
                }
            }
        }
    }
    firing.into_values().flatten().filter(|p| !p.is_empty()).collect()
}

/// Prunes `dir` ([`prune`]), keeping `keep` and the profiles of the alerts
/// still firing in `alerts`, then rewrites the folder's index when a
/// session went. Blocking: file system work.
pub fn prune_and_refresh(
    dir: &Path,
    cfg: &RetentionConfig,
    alerts: &Path,
    keep: &HashSet<String>,
) -> Result<PruneStats, RetentionError> {
    let mut protected = firing_profiles(alerts);
    protected.extend(keep.iter().cloned());
    let stats = prune(dir, cfg, &protected)?;
    if stats.removed > 0 {
        info!(
            "retention: removed {} old sessions ({} files, {} bytes) from {}; {} kept",
            stats.removed,
            stats.removed_files,
            stats.removed_bytes,
            dir.display(),
            stats.kept
        );
        crate::render::html::refresh(dir)?;
    }
    Ok(stats)
}

/// [`prune_and_refresh`] on a blocking thread, without waiting (for the
/// daemon, after a session finished); failures are logged.
pub fn prune_later(dir: &Path, cfg: &RetentionConfig, alerts: &Path, keep: HashSet<String>) {
    let (dir, cfg, alerts) = (dir.to_owned(), cfg.clone(), alerts.to_owned());
    let run = move || {
        if let Err(e) = prune_and_refresh(&dir, &cfg, &alerts, &keep) {
            warn!("{e}");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(run)),
        Err(_) => run(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{File, FileTimes};

    use super::*;

    const T0: u64 = 1_795_317_300;

    /// Writes the files of session `stem` (`bytes` each), modified `age_s`
    /// seconds before `now`.
    fn session(dir: &Path, stem: &str, exts: &[&str], bytes: usize, now: SystemTime, age_s: u64) {
        for ext in exts {
            let path = dir.join(format!("{stem}.{ext}"));
            std::fs::write(&path, vec![b'x'; bytes]).unwrap();
            let t = now - Duration::from_secs(age_s);
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_times(FileTimes::new().set_modified(t))
                .unwrap();
        }
    }

    fn stems(dir: &Path) -> Vec<String> {
        let mut s: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .collect();
        s.sort();
        s
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
    }

    fn cfg(max_sessions: usize, max_bytes: u64, max_age_s: u64) -> RetentionConfig {
        RetentionConfig {
            max_sessions,
            max_bytes,
            max_age: Duration::from_secs(max_age_s),
            ..RetentionConfig::default()
        }
    }

    /// Test that report names give their session's stem and that other
    /// names (the index, alerts, configs, temp files) are not sessions.
    #[test]
    fn stems_of_report_names() {
        let s = "logcaster-emergency-4242-20261122T031500Z";
        for ext in [
            "svg",
            "folded",
            "json",
            "pb.gz",
            "diff.svg",
            "before-after.svg",
            "baseline.folded",
            "crash.json",
            "crash.txt",
            "alloc.svg",
            "leaked.folded",
            "extend.svg",
        ] {
            assert_eq!(stem_of(&format!("{s}.{ext}")), Some(s), "{ext}");
        }
        for other in [
            "index.html",
            "alerts.jsonl",
            "alerts.jsonl.1",
            "calibration.json",
            "flamewatch.json",
            "x-12-2026.svg",
            "-12-20261122T031500Z.svg",
            "a-b-20261122T031500Z.svg",
            ".a-1-20261122T031500Z.svg.Xy12.tmp",
            "a-1-20261122T031500Z.txt",
        ] {
            assert_eq!(stem_of(other), None, "{other}");
        }
    }

    /// Test that the oldest sessions go first, whole, under each limit
    /// (count, bytes, age), and that other files are left alone.
    #[test]
    fn prunes_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let all = ["svg", "folded", "json"];
        // a is the oldest, e the newest.
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let stem = format!("{name}-1-20261122T03150{i}Z");
            session(d, &stem, &all, 100, now(), 1000 * (5 - i as u64));
        }
        std::fs::write(d.join("index.html"), "i").unwrap();
        std::fs::write(d.join("alerts.jsonl"), "").unwrap();
        std::fs::write(d.join("notes.json"), "{}").unwrap();
        let stats = prune_at(d, &cfg(3, u64::MAX, 1 << 30), &HashSet::new(), now()).unwrap();
        assert_eq!((stats.kept, stats.removed, stats.removed_files), (3, 2, 6));
        assert_eq!(stats.removed_bytes, 600);
        let left = stems(d);
        assert!(
            left.iter().all(|n| !n.starts_with("a-") && !n.starts_with("b-")),
            "{left:?}"
        );
        assert!(left.contains(&"index.html".into()) && left.contains(&"notes.json".into()));
        assert_eq!(left.len(), 9 + 3);
        // Bytes: two sessions of 300 fit in 700.
        let stats = prune_at(d, &cfg(10, 700, 1 << 30), &HashSet::new(), now()).unwrap();
        assert_eq!((stats.kept, stats.removed, stats.kept_bytes), (2, 1, 600));
        assert!(stems(d).iter().all(|n| !n.starts_with("c-")));
        // Age: d is 2000 s old, e 1000 s.
        let stats = prune_at(d, &cfg(10, u64::MAX, 1500), &HashSet::new(), now()).unwrap();
        assert_eq!((stats.kept, stats.removed), (1, 1));
        assert!(stems(d).iter().any(|n| n.starts_with("e-")));
    }

    /// Test that a protected session stays (named by stem or by a file's
    /// path) while newer unprotected ones beyond the limit go, and that
    /// the profiles of alerts still firing are the protected ones.
    #[test]
    fn protected_sessions_stay() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = "logcaster-emergency-7-20261122T031500Z";
        let mid = "logcaster-baseline-7-20261122T031600Z";
        let new = "logcaster-trigger-7-20261122T031700Z";
        session(d, old, &["svg", "folded", "json", "diff.svg"], 10, now(), 300);
        session(d, mid, &["svg", "folded", "json"], 10, now(), 200);
        session(d, new, &["svg", "folded", "json"], 10, now(), 100);
        let by_path: HashSet<String> = [d.join(format!("{old}.svg")).display().to_string()].into();
        let stats = prune_at(d, &cfg(1, u64::MAX, 1 << 30), &by_path, now()).unwrap();
        assert_eq!((stats.kept, stats.removed), (2, 1));
        assert!(d.join(format!("{old}.diff.svg")).exists());
        assert!(!d.join(format!("{mid}.json")).exists());
        assert!(d.join(format!("{new}.json")).exists());
        // Alerts: cpu_high on pid 7 fires with the old profile; a resolved
        // rule's profile is not protected.
        let line = |status: &str, rule: &str, svg: Option<&str>| {
            let profile = svg.map_or_else(String::new, |s| {
                format!(
                    r#","profile":{{"svg":"{s}","json":"{}","diff_svg":null}}"#,
                    s.replace(".svg", ".json")
                )
            });
            format!(
                r#"{{"time":"2026-11-22T03:15:00Z","status":"{status}","target":{{"pid":7,"comm":"logcaster"}},"rule":"{rule}","severity":"critical","metric":"cpu_pct","value":1.0,"threshold":0.5,"message":"m"{profile}}}"#
            )
        };
        let alerts = d.join("alerts.jsonl");
        let text = [
            line("firing", "cpu_high", None),
            line("profile", "cpu_high", Some(&format!("{old}.svg"))),
            line("firing", "fd_leak", None),
            line("profile", "fd_leak", Some(&format!("{new}.svg"))),
            line("resolved", "fd_leak", None),
        ]
        .join("\n");
        std::fs::write(&alerts, text + "\n").unwrap();
        let firing = firing_profiles(&alerts);
        assert_eq!(
            firing,
            [format!("{old}.svg"), format!("{old}.json")]
                .into_iter()
                .collect::<HashSet<_>>()
        );
    }

    /// Test that symlinks with report names and stale temporary files are
    /// handled: links are never removed or followed, dead writers' temp
    /// files go, fresh ones stay.
    #[test]
    fn links_and_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("v");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("x-1-20261122T031500Z.svg")).unwrap();
        session(d, ".x.svg.ab12", &["tmp"], 5, now(), 7200);
        session(d, ".y.svg.cd34", &["tmp"], 5, now(), 10);
        let stats = prune_at(d, &cfg(1, 1, 1), &HashSet::new(), now()).unwrap();
        assert_eq!((stats.kept, stats.removed, stats.removed_files), (0, 0, 1));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(stems(d), [".y.svg.cd34.tmp", "x-1-20261122T031500Z.svg"]);
    }
}
