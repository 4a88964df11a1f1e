//! Alerts: rules, the per-(target, rule) state machine that turns findings
//! into firing and resolved records (persistence, hysteresis, cooldown),
//! and the records themselves.

pub mod alertmanager;
pub mod sinks;

use serde::{Deserialize, Serialize};

use crate::detect::{Check, Finding, Severity};

/// Query parameters whose values are secrets (matched as substrings of the
/// lowercased name: `api_key`, `access_token`, `X-Secret` …).
const SECRET_PARAMS: &[&str] = &["token", "key", "secret", "password", "passwd", "auth", "sig"];

/// `url` fit for logs and files: credentials (`user:pass@` → `***@`) and
/// the values of secret-looking query parameters (→ `***`) hidden. A URL
/// that does not parse is not shown at all: it could be anything.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparsable URL>".into();
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Only fails for URLs that cannot have credentials (then they have none).
        let _ = parsed.set_password(None);
        let _ = parsed.set_username("***");
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = SECRET_PARAMS.iter().any(|s| k.to_lowercase().contains(s));
                let v = if secret { "***".into() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// A rule of a target's configuration.
// No deny_unknown_fields here: serde cannot combine it with `flatten`; the
// check (which receives the remaining keys) denies unknown ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Name in alert records (e.g. `memory_growth`).
    pub name: String,
    /// How bad it is when it fires.
    pub severity: Severity,
    /// The condition must hold this long before the alert fires (s).
    #[serde(default)]
    pub persist_s: f64,
    /// …and must stay clear this long before it is resolved (s).
    #[serde(default = "default_clear")]
    pub clear_s: f64,
    /// After firing, the rule cannot fire again for this long (s).
    #[serde(default = "default_cooldown")]
    pub cooldown_s: f64,
    /// What to check.
    #[serde(flatten)]
    pub check: Check,
}

impl Rule {
    /// Checks the rule's times (seconds, at most a year) and its check's
    /// values; `target` names its target in errors.
    pub fn validate(&self, target: &str) -> Result<(), crate::config::ConfigError> {
        let what = |key: &str| format!("rule {:?} of {target}: {key}", self.name);
        if self.name.trim().is_empty() {
            return Err(crate::config::ConfigError::Invalid {
                what: format!("rule of {target}: name"),
                value: self.name.clone(),
                why: "must not be empty".into(),
            });
        }
        for (key, v) in [
            ("persist_s", self.persist_s),
            ("clear_s", self.clear_s),
            ("cooldown_s", self.cooldown_s),
        ] {
            crate::config::check_seconds(&what(key), v)?;
        }
        self.check.validate(&what(""))
    }
}

fn default_clear() -> f64 {
    10.0
}

fn default_cooldown() -> f64 {
    300.0
}

/// Where a (target, rule) pair stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    /// The condition holds since `since`.
    Pending {
        since: f64,
    },
    /// Fired; `clear_since` is when the condition last stopped holding.
    Firing {
        clear_since: Option<f64>,
    },
}

/// What a step of the state machine emits.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// The alert fires.
    Fire(Finding),
    /// The condition has cleared.
    Resolve,
}

/// The state of one rule on one target.
#[derive(Debug, Clone)]
pub struct AlertState {
    phase: Phase,
    last_fired: Option<f64>,
    last_finding: Option<Finding>,
}

impl Default for AlertState {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            last_fired: None,
            last_finding: None,
        }
    }
}

impl AlertState {
    /// Feeds the finding (or its absence) at time `now` (s).
    pub fn step(&mut self, rule: &Rule, now: f64, finding: Option<Finding>) -> Option<Transition> {
        let holds = finding.is_some();
        if let Some(f) = &finding {
            self.last_finding = Some(f.clone());
        }
        match (self.phase, holds) {
            (Phase::Idle, false) => None,
            (Phase::Idle, true) => {
                self.phase = Phase::Pending { since: now };
                self.try_fire(rule, now, now)
            }
            (Phase::Pending { .. }, false) => {
                self.phase = Phase::Idle;
                None
            }
            (Phase::Pending { since }, true) => self.try_fire(rule, now, since),
            (Phase::Firing { .. }, true) => {
                self.phase = Phase::Firing { clear_since: None };
                None
            }
            (Phase::Firing { clear_since }, false) => {
                let since = clear_since.unwrap_or(now);
                if now - since >= rule.clear_s {
                    self.phase = Phase::Idle;
                    Some(Transition::Resolve)
                } else {
                    self.phase = Phase::Firing {
                        clear_since: Some(since),
                    };
                    None
                }
            }
        }
    }

    fn try_fire(&mut self, rule: &Rule, now: f64, since: f64) -> Option<Transition> {
        if now - since < rule.persist_s {
            return None;
        }
        // Within the cooldown a flapping condition stays quiet: one alert.
        if self.last_fired.is_some_and(|t| now - t < rule.cooldown_s) {
            return None;
        }
        self.phase = Phase::Firing { clear_since: None };
        self.last_fired = Some(now);
        self.last_finding.clone().map(Transition::Fire)
    }

    /// Whether the alert is firing (fired and not yet resolved).
    pub fn is_firing(&self) -> bool {
        matches!(self.phase, Phase::Firing { .. })
    }

    /// The last finding (for resolved records).
    pub fn last_finding(&self) -> Option<&Finding> {
        self.last_finding.as_ref()
    }
}

/// `firing`, `resolved`, or `profile` (a follow-up linking the emergency
/// profile to its alert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The condition holds.
    Firing,
    /// It has cleared.
    Resolved,
    /// The profile of a firing alert is ready.
    Profile,
}

/// Which process an alert is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertTarget {
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub comm: String,
}

/// Files of the profile attached to an alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileLinks {
    /// Flamegraph (empty for a crash report alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub svg: String,
    /// Summary (empty for a crash report alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub json: String,
    /// Differential flamegraph against the latest baseline, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff_svg: Option<String>,
    /// The crash report (`<stem>.crash.json`) of a `crashed`, `oom_killed`
    /// or `exited` alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<String>,
}

/// A stuck thread, as evidence in an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockedEvidence {
    /// Thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// Seconds blocked.
    pub blocked_s: f64,
    /// Stack, root first.
    pub stack: Vec<String>,
}

/// A busy thread, as evidence in a CPU alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadCpu {
    /// Thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// CPU use over the last interval, percent of one core.
    pub cpu_pct: f64,
}

/// One line of the alerts JSONL stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// RFC 3339.
    pub time: String,
    /// What happened.
    pub status: Status,
    /// The process.
    pub target: AlertTarget,
    /// Rule name.
    pub rule: String,
    /// Severity.
    pub severity: Severity,
    /// Metric judged.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// One line for humans.
    pub message: String,
    /// The emergency profile, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileLinks>,
    /// Blocked threads (stuck alerts).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub blocked: Vec<BlockedEvidence>,
    /// The busiest threads (CPU alerts).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub top_threads: Vec<ThreadCpu>,
    /// The crashing thread's stack, innermost first (crash alerts; at most
    /// [`MAX_STACK_FRAMES`] frames).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub stack: Vec<String>,
}

/// Frames of a crash stack carried in an alert record.
pub const MAX_STACK_FRAMES: usize = 64;

impl AlertRecord {
    /// A record for `finding` of `rule` on `target` now.
    pub fn new(status: Status, target: AlertTarget, rule: &Rule, finding: &Finding) -> Self {
        Self {
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            status,
            target,
            rule: rule.name.clone(),
            severity: rule.severity,
            metric: finding.metric.clone(),
            value: finding.value,
            threshold: finding.threshold,
            message: finding.message.clone(),
            profile: None,
            blocked: Vec::new(),
            top_threads: Vec::new(),
            stack: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that credentials and secret query parameters are hidden in
    /// URLs, and the rest of the URL kept.
    #[test]
    fn urls_are_redacted() {
        let cases = [
            ("http://u:p@host:9093/x", "http://***@host:9093/x"),
            ("https://user@h/hook", "https://***@h/hook"),
            ("https://h/hook?token=abc&x=1", "https://h/hook?token=***&x=1"),
            (
                "https://h/?api_key=k&Secret=s&password=p",
                "https://h/?api_key=***&Secret=***&password=***",
            ),
            ("http://127.0.0.1:8080/alerts", "http://127.0.0.1:8080/alerts"),
            ("not a url p@ss", "<unparsable URL>"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
    use crate::metrics::Metric;

    fn rule(persist_s: f64, clear_s: f64, cooldown_s: f64) -> Rule {
        Rule {
            name: "cpu_high".into(),
            severity: Severity::Critical,
            persist_s,
            clear_s,
            cooldown_s,
            check: Check::Threshold {
                metric: Metric::CpuPct,
                above: Some(80.0),
                below: None,
                for_s: 0.0,
            },
        }
    }

    fn finding() -> Finding {
        Finding {
            metric: "cpu_pct".into(),
            value: 99.0,
            threshold: 80.0,
            message: "hot".into(),
        }
    }

    /// Runs a boolean trace, one step per second; returns the transitions.
    fn run(rule: &Rule, trace: &[bool]) -> Vec<(usize, Transition)> {
        let mut s = AlertState::default();
        trace
            .iter()
            .enumerate()
            .filter_map(|(t, &h)| s.step(rule, t as f64, h.then(finding)).map(|tr| (t, tr)))
            .collect()
    }

    /// Test that an alert fires only after the condition persisted, and
    /// resolves only after it stayed clear.
    #[test]
    fn persistence_and_hysteresis() {
        let r = rule(3.0, 5.0, 300.0);
        let mut trace = vec![false; 2];
        trace.extend([true; 2]); // too short to fire
        trace.extend([false; 2]);
        trace.extend([true; 10]); // fires at the 4th second
        trace.extend([false, false, true]); // a dip shorter than clear_s
        trace.extend([false; 8]); // clears
        let t = run(&r, &trace);
        assert_eq!(t.len(), 2, "{t:?}");
        assert!(matches!(t[0], (9, Transition::Fire(_))), "{t:?}");
        assert!(matches!(t[1], (24, Transition::Resolve)), "{t:?}");
    }

    /// Test that a flapping metric yields one alert per cooldown, not one per
    /// flap.
    #[test]
    fn flapping_makes_one_alert() {
        let r = rule(0.0, 2.0, 300.0);
        let trace: Vec<bool> = (0..200).map(|t| (t / 5) % 2 == 0).collect();
        let fires = run(&r, &trace)
            .iter()
            .filter(|(_, tr)| matches!(tr, Transition::Fire(_)))
            .count();
        assert_eq!(fires, 1);
        // After the cooldown it may fire again.
        let r = rule(0.0, 2.0, 50.0);
        let fires = run(&r, &trace)
            .iter()
            .filter(|(_, tr)| matches!(tr, Transition::Fire(_)))
            .count();
        assert!((2..=5).contains(&fires), "{fires}");
    }

    /// Test that `is_firing` holds from the fire to the resolve, not while
    /// pending or clearing has not finished.
    #[test]
    fn is_firing_follows_the_phases() {
        let r = rule(2.0, 3.0, 300.0);
        let mut s = AlertState::default();
        let mut firing = Vec::new();
        for (t, h) in [true, true, true, false, false, false, false]
            .into_iter()
            .enumerate()
        {
            s.step(&r, t as f64, h.then(finding));
            firing.push(s.is_firing());
        }
        assert_eq!(firing, [false, false, true, true, true, true, false]);
    }

    /// Test that rules read from TOML with defaults filled in.
    #[test]
    fn rule_from_toml() {
        let r: Rule = toml::from_str(
            r#"
            name = "leak"
            severity = "critical"
            kind = "memory_growth"
            window_s = 60
            "#,
        )
        .expect("parses");
        assert_eq!(r.clear_s, 10.0);
        assert!(matches!(r.check, Check::MemoryGrowth { min_r2, profile: None, .. } if min_r2 == 0.9));
        assert!(toml::from_str::<Rule>("name='x'\nseverity='critical'\nkind='nope'").is_err());
    }

    /// Test that a leak rule names its emergency's memory profile, and
    /// that an unknown one is refused.
    #[test]
    fn leak_rule_profile() {
        let rule = |p: &str| {
            toml::from_str::<Rule>(&format!(
                "name='l'\nseverity='critical'\nkind='memory_growth'\nprofile='{p}'"
            ))
        };
        assert!(matches!(
            rule("heap").expect("parses").check,
            Check::MemoryGrowth {
                profile: Some(crate::config::MemoryMode::Heap),
                ..
            }
        ));
        assert!(rule("cpu").is_err());
    }
}
