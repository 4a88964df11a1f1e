//! Where alert records go: a JSON-lines file, the log, and a webhook.
//!
//! The webhook is served by its own task from a bounded queue, with a
//! timeout, retries and backoff: a slow or dead receiver never blocks the
//! daemon's loop (records that do not fit the queue are dropped and counted).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{AlertRecord, Status};
use crate::detect::Severity;

/// Records waiting for the webhook at most.
pub const WEBHOOK_QUEUE: usize = 1024;
/// Attempts per record.
pub const WEBHOOK_ATTEMPTS: u32 = 4;
/// Timeout of one attempt.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of the webhook.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Records delivered.
    pub sent: AtomicU64,
    /// Records given up on after every attempt.
    pub failed: AtomicU64,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// All the sinks of the daemon.
pub struct Sinks {
    jsonl: PathBuf,
    /// alerts.jsonl is rotated before it grows past this many bytes…
    rotate_at: u64,
    /// …keeping this many old files (`.1` newest).
    keep: usize,
    webhook: Option<mpsc::Sender<AlertRecord>>,
    alertmanager: Option<mpsc::Sender<AlertRecord>>,
    /// Webhook counters.
    pub webhook_stats: Arc<WebhookStats>,
    /// The live dashboard, which shows every record as it is emitted.
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
}

impl Sinks {
    /// Sinks writing to `jsonl`, and POSTing to `webhook` and to
    /// `alertmanager` (its base URL) when given.
    pub fn new(jsonl: &Path, webhook: Option<String>, alertmanager: Option<String>) -> Self {
        let stats = Arc::new(WebhookStats::default());
        let webhook = webhook.map(|url| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tokio::spawn(webhook_task(url, rx, stats.clone()));
            tx
        });
        let alertmanager = alertmanager.map(super::alertmanager::spawn);
        let retention = crate::config::RetentionConfig::default();
        Self {
            jsonl: jsonl.to_owned(),
            rotate_at: retention.alerts_max_bytes,
            keep: retention.alerts_keep,
            webhook,
            alertmanager,
            webhook_stats: stats,
            dashboard: None,
        }
    }

    /// Rotates the JSON-lines file at `retention.alerts_max_bytes`, keeping
    /// `retention.alerts_keep` old files (the defaults until this is called).
    pub fn with_rotation(mut self, retention: &crate::config::RetentionConfig) -> Self {
        self.rotate_at = retention.alerts_max_bytes;
        self.keep = retention.alerts_keep;
        self
    }

    /// Emits a record everywhere.
    pub fn emit(&self, record: &AlertRecord) {
        let line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                error!("serializing an alert: {e}");
                return;
            }
        };
        let who = format!("{} (pid {})", record.target.comm, record.target.pid);
        match (record.status, record.severity) {
            (Status::Resolved, _) => info!("RESOLVED {} on {who}: {}", record.rule, record.message),
            (Status::Profile, _) => {
                info!(
                    "profile of {} on {who}: {}",
                    record.rule,
                    record.profile.as_ref().map_or("", |p| &p.svg)
                )
            }
            (Status::Firing, Severity::Warning) => {
                warn!("ALERT {} on {who}: {}", record.rule, record.message)
            }
            (Status::Firing, _) => error!(
                "ALERT {} ({:?}) on {who}: {}",
                record.rule, record.severity, record.message
            ),
        }
        if let Some(d) = &self.dashboard {
            d.alert(record);
        }
        if let Err(e) = append_line(&self.jsonl, &line, self.rotate_at, self.keep) {
            error!("writing {}: {e}", self.jsonl.display());
        }
        if let Some(tx) = &self.webhook {
            if tx.try_send(record.clone()).is_err() {
                self.webhook_stats.dropped.fetch_add(1, Ordering::Relaxed);
                warn!("webhook queue full: alert record dropped");
            }
        }
        if let Some(tx) = &self.alertmanager {
            if tx.try_send(record.clone()).is_err() {
                warn!("Alertmanager queue full: alert record dropped");
            }
        }
    }
}

/// Appends `line` to `path`, first rotating the file when the line would
/// take it past `rotate_at` bytes.
fn append_line(path: &Path, line: &str, rotate_at: u64, keep: usize) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsafe::create_dir(dir).map_err(std::io::Error::other)?;
    }
    let text = format!("{line}\n");
    // O_NOFOLLOW: a symlink planted at the name is an error, not a target.
    let mut f = crate::fsafe::open_append(path)?;
    let len = f.metadata()?.len();
    if len > 0 && len + text.len() as u64 > rotate_at {
        drop(f);
        rotate(path, keep)?;
        f = crate::fsafe::open_append(path)?;
    }
    // One write per record: lines of concurrent writers do not interleave.
    f.write_all(text.as_bytes())
}

/// `path.N-1` → `path.N` … `path` → `path.1`, dropping `path.keep`. Only
/// renames and an unlink, which act on names: a link planted at one of
/// them is moved or removed, never written through.
fn rotate(path: &Path, keep: usize) -> std::io::Result<()> {
    let old = |n: usize| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    match std::fs::remove_file(old(keep)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    for n in (1..keep).rev() {
        match std::fs::rename(old(n), old(n + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, old(1))
}

async fn webhook_task(url: String, mut rx: mpsc::Receiver<AlertRecord>, stats: Arc<WebhookStats>) {
    let client = match crate::http::client(WEBHOOK_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            error!("webhook client: {e}");
            return;
        }
    };
    // Logged without its credentials (reqwest's errors name the URL too).
    let shown = super::redact_url(&url);
    while let Some(record) = rx.recv().await {
        let mut delay = Duration::from_millis(500);
        let mut delivered = false;
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            match client.post(&url).json(&record).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => warn!("webhook {shown}: HTTP {} (attempt {attempt})", r.status()),
                Err(e) => warn!("webhook {shown}: {} (attempt {attempt})", e.without_url()),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let counter = if delivered { &stats.sent } else { &stats.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertTarget;

    fn record() -> AlertRecord {
        AlertRecord {
            time: "2026-11-22T03:00:00Z".into(),
            status: Status::Firing,
            target: AlertTarget {
                pid: 1,
                comm: "x".into(),
            },
            rule: "r".into(),
            severity: Severity::Critical,
            metric: "cpu_pct".into(),
            value: 1.0,
            threshold: 0.5,
            message: "m".into(),
            profile: None,
            blocked: Vec::new(),
            top_threads: Vec::new(),
            stack: Vec::new(),
        }
    }

    /// Test that records are appended as one JSON object per line.
    #[tokio::test]
    async fn jsonl_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/alerts.jsonl");
        let sinks = Sinks::new(&path, None, None);
        sinks.emit(&record());
        sinks.emit(&record());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let back: AlertRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, record());
    }

    /// Test that alerts.jsonl rotates before a record would take it past
    /// the limit, keeping `alerts_keep` old files, newest in `.1`.
    #[tokio::test]
    async fn jsonl_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut r = record();
        r.message = "m0".into();
        // Bytes of one record's line (every message below is as long).
        let one = serde_json::to_string(&r).unwrap().len() as u64 + 1;
        let retention = crate::config::RetentionConfig {
            alerts_max_bytes: 2 * one,
            alerts_keep: 2,
            ..crate::config::RetentionConfig::default()
        };
        let sinks = Sinks::new(&path, None, None).with_rotation(&retention);
        for i in 0..7 {
            r.message = format!("m{i}");
            sinks.emit(&r);
        }
        let messages = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<AlertRecord>(l).unwrap().message)
                .collect()
        };
        assert_eq!(messages(&path), ["m6"]);
        assert_eq!(messages(&dir.path().join("alerts.jsonl.1")), ["m4", "m5"]);
        assert_eq!(messages(&dir.path().join("alerts.jsonl.2")), ["m2", "m3"]);
        assert!(!dir.path().join("alerts.jsonl.3").exists());
        for f in std::fs::read_dir(dir.path()).unwrap() {
            assert!(f.unwrap().metadata().unwrap().len() <= 2 * one);
        }
    }

    /// Test that an unreachable webhook is retried, then counted as failed,
    /// without blocking `emit`.
    #[tokio::test(start_paused = true)]
    async fn webhook_failure_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        // Port 9 (discard) on loopback: refused at once.
        let sinks = Sinks::new(
            &dir.path().join("a.jsonl"),
            Some("http://127.0.0.1:9/".into()),
            None,
        );
        let t = std::time::Instant::now();
        sinks.emit(&record());
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "emit does not wait for the webhook"
        );
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if sinks.webhook_stats.failed.load(Ordering::Relaxed) == 1 {
                return;
            }
        }
        panic!("webhook failure never counted");
    }
}
