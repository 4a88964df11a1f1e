//! The daemon's live dashboard: one page served from the binary, and the
//! JSON API it (and anyone with `curl` or `go tool pprof`) reads.
//!
//! The daemon owns the truth; it hands the dashboard what it sees each
//! interval ([`Dashboard::tick`]), every alert record ([`Dashboard::alert`])
//! and every session start and end. The dashboard keeps a bounded history
//! per metric and streams events to the browsers connected
//! (`/api/events`). A profile asked for through `/api/profile` goes back to
//! the daemon as a trigger over the flight recorder ([`ProfileAsk`]).
//!
//! Bounds: [`MAX_POINTS`] points per series, [`MAX_TARGETS`] processes,
//! [`EVENTS`] events buffered per browser (a slow one skips ahead).

mod routes;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use routes::{check_token, router, DashboardError};

use crate::{
    alerts::{AlertRecord, Status},
    control,
    metrics::Metric,
};

/// Points kept per series: an hour at a one-second interval.
pub const MAX_POINTS: usize = 3600;
/// Processes shown at most (the daemon watches at most 64 per target).
pub const MAX_TARGETS: usize = 512;
/// Events buffered for each browser.
pub const EVENTS: usize = 256;
/// Profile requests waiting for the daemon.
const ASKS: usize = 8;

/// A profile wanted by a browser: a trigger over the flight recorder, and
/// where its reply goes.
pub type ProfileAsk = (control::Request, oneshot::Sender<control::Reply>);

/// A rule's line on a chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleLine {
    /// Rule name.
    pub rule: String,
    /// Metric it judges.
    pub metric: String,
    /// Threshold drawn.
    pub value: f64,
    /// `above` or `below`.
    pub side: &'static str,
    /// Severity, for the colour.
    pub severity: String,
}

/// A session running now, as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Target name.
    pub target: String,
    /// Process.
    pub pid: u32,
    /// on-demand, scheduled, emergency.
    pub kind: String,
    /// Share of its window done, percent.
    pub progress_pct: f64,
    /// Sampling rate now, Hz.
    pub hz: f64,
    /// Seconds left.
    pub left_s: f64,
}

/// An alert firing now.
#[derive(Debug, Clone, Serialize)]
struct Firing {
    rule: String,
    severity: String,
    since: String,
    message: String,
}

/// One watched process.
#[derive(Debug, Default)]
struct Proc {
    target: String,
    comm: String,
    latest: BTreeMap<&'static str, f64>,
    series: HashMap<&'static str, VecDeque<(f64, f64)>>,
    firing: BTreeMap<String, Firing>,
}

#[derive(Debug, Default)]
struct Inner {
    procs: BTreeMap<u32, Proc>,
    rules: BTreeMap<String, Vec<RuleLine>>,
    sessions: Vec<SessionView>,
}

/// The dashboard's state, shared by the daemon and the HTTP handlers.
#[derive(Debug)]
pub struct Dashboard {
    inner: Mutex<Inner>,
    /// Events as (kind, JSON text): the kind names the SSE event.
    events: broadcast::Sender<(&'static str, String)>,
    asks: mpsc::Sender<ProfileAsk>,
    /// The daemon's output folder (past sessions' files).
    pub output: PathBuf,
    /// The bearer token, when serving beyond loopback.
    pub token: Option<String>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Dashboard {
    /// A dashboard over `output`, and the receiving end of its profile
    /// requests (the daemon's loop answers them).
    pub fn new(output: PathBuf, token: Option<String>) -> (Self, mpsc::Receiver<ProfileAsk>) {
        let (asks, rx) = mpsc::channel(ASKS);
        let (events, _) = broadcast::channel(EVENTS);
        let d = Self {
            inner: Mutex::new(Inner::default()),
            events,
            asks,
            output,
            token,
        };
        (d, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, kind: &'static str, data: serde_json::Value) {
        // No browser connected is not an error.
        let text = serde_json::json!({ "type": kind, "data": data }).to_string();
        let _ = self.events.send((kind, text));
    }

    /// The rules of `target`, drawn on its charts.
    pub fn set_rules(&self, target: &str, lines: Vec<RuleLine>) {
        self.lock().rules.insert(target.to_owned(), lines);
    }

    /// Whether the rules of `target` are known.
    pub fn has_rules(&self, target: &str) -> bool {
        self.lock().rules.contains_key(target)
    }

    /// One interval's metrics of a process.
    pub fn tick(&self, target: &str, pid: u32, comm: &str, values: &[(Metric, f64)]) {
        let t = unix_now();
        {
            let mut inner = self.lock();
            if !inner.procs.contains_key(&pid) && inner.procs.len() >= MAX_TARGETS {
                return;
            }
            let p = inner.procs.entry(pid).or_default();
            p.target = target.to_owned();
            p.comm = comm.to_owned();
            for &(m, v) in values {
                p.latest.insert(m.name(), v);
                let s = p.series.entry(m.name()).or_default();
                if s.len() == MAX_POINTS {
                    s.pop_front();
                }
                s.push_back((t, v));
            }
        }
        let values: BTreeMap<&str, f64> = values.iter().map(|&(m, v)| (m.name(), v)).collect();
        self.send(
            "tick",
            serde_json::json!({ "target": target, "pid": pid, "time": t, "values": values }),
        );
    }

    /// A process is no longer watched.
    pub fn remove(&self, pid: u32) {
        self.lock().procs.remove(&pid);
    }

    /// An alert record (firing, resolved, or a profile attached).
    pub fn alert(&self, record: &AlertRecord) {
        {
            let mut inner = self.lock();
            if let Some(p) = inner.procs.get_mut(&record.target.pid) {
                match record.status {
                    Status::Firing => {
                        p.firing.insert(
                            record.rule.clone(),
                            Firing {
                                rule: record.rule.clone(),
                                severity: format!("{:?}", record.severity).to_lowercase(),
                                since: record.time.clone(),
                                message: record.message.clone(),
                            },
                        );
                    }
                    Status::Resolved => {
                        p.firing.remove(&record.rule);
                    }
                    Status::Profile => {}
                }
            }
        }
        self.send("alert", serde_json::to_value(record).unwrap_or_default());
    }

    /// The sessions running now.
    pub fn set_sessions(&self, sessions: Vec<SessionView>) {
        self.lock().sessions = sessions;
    }

    /// A session started or ended (`what`), with its files when it ended.
    pub fn session_event(&self, what: &str, target: &str, pid: u32, kind: &str, files: &[String]) {
        self.send(
            "session",
            serde_json::json!({ "event": what, "target": target, "pid": pid, "kind": kind, "files": files }),
        );
    }

    /// Every process, its latest metrics, alerts firing and sessions.
    pub fn targets_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let mut by_target: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
        for (pid, p) in &inner.procs {
            let sessions: Vec<&SessionView> = inner.sessions.iter().filter(|s| s.pid == *pid).collect();
            by_target.entry(&p.target).or_default().push(serde_json::json!({
                "pid": pid,
                "comm": p.comm,
                "metrics": p.latest,
                "firing": p.firing.values().collect::<Vec<_>>(),
                "sessions": sessions,
            }));
        }
        let targets: Vec<serde_json::Value> = by_target
            .into_iter()
            .map(|(name, pids)| {
                serde_json::json!({
                    "name": name,
                    "pids": pids,
                    "rules": inner.rules.get(name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        serde_json::json!({ "time": unix_now(), "targets": targets })
    }

    /// `metric`'s points of every process of `target` since `since` (unix
    /// seconds); None when no process of that name is watched.
    pub fn series_json(&self, target: &str, metric: &str, since: f64) -> Option<serde_json::Value> {
        let inner = self.lock();
        let procs: Vec<(&u32, &Proc)> = inner.procs.iter().filter(|(_, p)| p.target == target).collect();
        if procs.is_empty() {
            return None;
        }
        let series: Vec<serde_json::Value> = procs
            .into_iter()
            .map(|(pid, p)| {
                let points: Vec<[f64; 2]> = p
                    .series
                    .get(metric)
                    .map(|s| {
                        s.iter()
                            .filter(|(t, _)| *t >= since)
                            .map(|&(t, v)| [t, v])
                            .collect()
                    })
                    .unwrap_or_default();
                serde_json::json!({ "pid": pid, "points": points })
            })
            .collect();
        Some(serde_json::json!({ "target": target, "metric": metric, "series": series }))
    }

    /// A receiver of the event stream.
    pub fn subscribe(&self) -> broadcast::Receiver<(&'static str, String)> {
        self.events.subscribe()
    }

    /// Hands a profile request to the daemon.
    pub async fn ask(&self, req: control::Request) -> Option<control::Reply> {
        let (tx, rx) = oneshot::channel();
        self.asks.send((req, tx)).await.ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that a series keeps at most MAX_POINTS points, newest last, and
    /// that `since` filters them.
    #[test]
    fn series_are_bounded() {
        let (d, _rx) = Dashboard::new(PathBuf::from("/nonexistent"), None);
        for i in 0..(MAX_POINTS + 10) {
            d.tick("nginx", 7, "nginx", &[(Metric::CpuPct, i as f64)]);
        }
        let j = d.series_json("nginx", "cpu_pct", 0.0).unwrap();
        let points = j["series"][0]["points"].as_array().unwrap();
        assert_eq!(points.len(), MAX_POINTS);
        assert_eq!(points.last().unwrap()[1].as_f64(), Some((MAX_POINTS + 9) as f64));
        let later = d.series_json("nginx", "cpu_pct", unix_now() + 10.0).unwrap();
        assert!(later["series"][0]["points"].as_array().unwrap().is_empty());
        assert!(d.series_json("other", "cpu_pct", 0.0).is_none());
    }

    /// Test that processes are grouped by target with their latest metrics
    /// and firing alerts, and that a resolved alert leaves the list.
    #[test]
    fn targets_group_pids_and_alerts() {
        use crate::{
            alerts::{AlertTarget, Rule},
            detect::{Check, Finding, Severity},
        };
        let (d, _rx) = Dashboard::new(PathBuf::from("/nonexistent"), None);
        d.tick("nginx", 10, "nginx", &[(Metric::CpuPct, 1.0)]);
        d.tick("nginx", 11, "nginx", &[(Metric::CpuPct, 97.3)]);
        let rule = Rule {
            name: "cpu_high".into(),
            severity: Severity::Critical,
            persist_s: 0.0,
            clear_s: 0.0,
            cooldown_s: 0.0,
            check: Check::Threshold {
                metric: Metric::CpuPct,
                above: Some(90.0),
                below: None,
                for_s: 0.0,
            },
        };
        let f = Finding {
            metric: "cpu_pct".into(),
            value: 97.3,
            threshold: 90.0,
            message: "hot".into(),
        };
        let target = AlertTarget {
            pid: 11,
            comm: "nginx".into(),
        };
        let mut events = d.subscribe();
        d.alert(&AlertRecord::new(Status::Firing, target.clone(), &rule, &f));
        let j = d.targets_json();
        assert_eq!(j["targets"].as_array().unwrap().len(), 1);
        let pids = j["targets"][0]["pids"].as_array().unwrap();
        assert_eq!(pids.len(), 2);
        assert_eq!(pids[1]["metrics"]["cpu_pct"].as_f64(), Some(97.3));
        assert_eq!(pids[1]["firing"][0]["rule"], "cpu_high");
        assert!(events.try_recv().unwrap().1.contains("\"type\":\"alert\""));
        d.alert(&AlertRecord::new(Status::Resolved, target, &rule, &f));
        assert!(d.targets_json()["targets"][0]["pids"][1]["firing"]
            .as_array()
            .unwrap()
            .is_empty());
    }
}
