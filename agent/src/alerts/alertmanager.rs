//! Alert records to Alertmanager's v2 API (`POST /api/v2/alerts`).
//!
//! Alertmanager expects active alerts to be sent again regularly (it
//! resolves an alert it has not heard of for `resolve_timeout`), as
//! Prometheus does on every evaluation: firing alerts are re-sent every
//! 30 s with their original start time; a resolved one is sent once with
//! its end time. Labels: alertname, target, severity (bounded); annotations:
//! the message and the flamegraph.

use std::{collections::HashMap, time::Duration};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use super::{AlertRecord, Status};

/// Re-send interval of active alerts.
pub const RESEND: Duration = Duration::from_secs(30);

/// One alert as Alertmanager's API takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmAlert {
    /// Identity of the alert.
    pub labels: HashMap<String, String>,
    /// Details.
    pub annotations: HashMap<String, String>,
    /// When it started (RFC 3339).
    pub starts_at: String,
    /// When it ended (resolved alerts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
}

impl AmAlert {
    /// The Alertmanager form of a record.
    pub fn from_record(r: &AlertRecord) -> Self {
        let severity = serde_json::to_value(r.severity)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        let labels = HashMap::from([
            ("alertname".to_owned(), r.rule.clone()),
            ("target".to_owned(), r.target.comm.clone()),
            ("severity".to_owned(), severity.unwrap_or_default()),
        ]);
        let mut annotations = HashMap::from([
            ("message".to_owned(), r.message.clone()),
            ("pid".to_owned(), r.target.pid.to_string()),
        ]);
        if let Some(p) = &r.profile {
            if !p.svg.is_empty() {
                annotations.insert("flamegraph".to_owned(), p.svg.clone());
            }
            if let Some(d) = &p.diff_svg {
                annotations.insert("differential_flamegraph".to_owned(), d.clone());
            }
            if let Some(c) = &p.crash {
                annotations.insert("crash_report".to_owned(), c.clone());
            }
        }
        if !r.stack.is_empty() {
            // Innermost first, as a backtrace reads; bounded like the record.
            annotations.insert("stack".to_owned(), r.stack.join("\n"));
        }
        Self {
            labels,
            annotations,
            starts_at: r.time.clone(),
            ends_at: None,
        }
    }
}

/// Spawns the task posting to `url` (the Alertmanager base URL).
pub fn spawn(url: String) -> mpsc::Sender<AlertRecord> {
    let (tx, rx) = mpsc::channel(super::sinks::WEBHOOK_QUEUE);
    tokio::spawn(task(url.trim_end_matches('/').to_owned() + "/api/v2/alerts", rx));
    tx
}

async fn task(endpoint: String, mut rx: mpsc::Receiver<AlertRecord>) {
    let Ok(client) = crate::http::client(Duration::from_secs(5)) else {
        warn!("Alertmanager: cannot build an HTTP client");
        return;
    };
    // Logged without its credentials (reqwest's errors name the URL too).
    let shown = super::redact_url(&endpoint);
    let mut active: HashMap<(u32, String), AmAlert> = HashMap::new();
    let mut resend = tokio::time::interval(RESEND);
    loop {
        let batch: Vec<AmAlert> = tokio::select! {
            record = rx.recv() => {
                let Some(r) = record else { return };
                let key = (r.target.pid, r.rule.clone());
                match r.status {
                    Status::Firing => {
                        let a = AmAlert::from_record(&r);
                        // A restart is an event, not a condition: sent once,
                        // Alertmanager ends it after its resolve_timeout.
                        if r.rule != crate::daemon::TARGET_RESTARTED {
                            active.insert(key, a.clone());
                        }
                        vec![a]
                    }
                    // The profile is ready: the same alert, now with its flamegraph.
                    Status::Profile => match active.get_mut(&key) {
                        Some(a) => {
                            let fresh = AmAlert::from_record(&r);
                            a.annotations.extend(fresh.annotations.into_iter().filter(|(k, _)| k.contains("flamegraph")));
                            vec![a.clone()]
                        }
                        None => Vec::new(),
                    },
                    Status::Resolved => match active.remove(&key) {
                        Some(mut a) => {
                            a.ends_at = Some(r.time.clone());
                            vec![a]
                        }
                        None => Vec::new(),
                    },
                }
            }
            _ = resend.tick() => active.values().cloned().collect(),
        };
        if batch.is_empty() {
            continue;
        }
        match client.post(&endpoint).json(&batch).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => warn!("Alertmanager {shown}: HTTP {}", r.status()),
            // Active alerts go out again at the next re-send.
            Err(e) => warn!("Alertmanager {shown}: {}", e.without_url()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        alerts::{AlertTarget, ProfileLinks},
        detect::Severity,
    };

    /// Test the Alertmanager form: bounded labels, message and flamegraph
    /// as annotations.
    #[test]
    fn alert_form() {
        let r = AlertRecord {
            time: "2026-11-22T03:00:00Z".into(),
            status: Status::Profile,
            target: AlertTarget {
                pid: 42,
                comm: "logcaster".into(),
            },
            rule: "cpu_high".into(),
            severity: Severity::Critical,
            metric: "cpu_pct".into(),
            value: 99.0,
            threshold: 80.0,
            message: "cpu_pct 99 above 80 for 10 s".into(),
            profile: Some(ProfileLinks {
                svg: "/p/a.svg".into(),
                json: "/p/a.json".into(),
                diff_svg: None,
                crash: None,
            }),
            blocked: Vec::new(),
            top_threads: Vec::new(),
            stack: Vec::new(),
        };
        let a = AmAlert::from_record(&r);
        assert_eq!(a.labels["alertname"], "cpu_high");
        assert_eq!(a.labels["severity"], "critical");
        assert_eq!(a.labels.len(), 3);
        assert_eq!(a.annotations["flamegraph"], "/p/a.svg");
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["startsAt"], "2026-11-22T03:00:00Z");
        assert!(json.get("endsAt").is_none());
    }
}
