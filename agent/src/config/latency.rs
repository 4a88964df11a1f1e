//! Settings of `flamewatch latency`: their defaults, and the checks the
//! command line and `[[target.probe]]` in TOML share.

use std::{path::PathBuf, time::Duration};

use super::{check_duration, ConfigError, RecordConfig};

/// Settings of one latency session (`flamewatch latency`).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyConfig {
    /// The function: `SYMBOL` (the executable's) or `LIB:SYMBOL`.
    pub function: String,
    /// Calls longer than this are over budget, and the CPU samples taken
    /// while a call has run past it make the slow-call profile.
    pub budget: Option<Duration>,
    /// Session length; `None` runs until Ctrl-C (or the target exits).
    pub duration: Option<Duration>,
    /// Folder the files are written to.
    pub output: PathBuf,
    /// Prefix of the file names; the target's comm when unset.
    pub label: Option<String>,
    /// Sampling rate of the slow-call profile, Hz.
    pub freq_hz: u64,
    /// Overhead budget (probes and sampling), percent of the target's CPU.
    pub max_overhead_pct: f64,
    /// Record kernel stacks in the slow-call profile.
    pub kernel_stacks: bool,
    /// Trace off-CPU time for the slow-call profile (with a budget): the
    /// time a late call spends blocked, so a frame late on a lock shows
    /// the lock.
    pub off_cpu: bool,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        let record = RecordConfig::default();
        Self {
            function: String::new(),
            budget: None,
            duration: record.duration,
            output: record.output,
            label: None,
            // Slow stretches are a small part of the time: sample them
            // densely enough to fill a flamegraph in a short session.
            freq_hz: 199,
            max_overhead_pct: record.max_overhead_pct,
            kernel_stacks: true,
            off_cpu: true,
        }
    }
}

impl LatencyConfig {
    /// The settings of the sampling side, for the engine and the slow-call
    /// profile's files.
    pub fn record_config(&self) -> RecordConfig {
        RecordConfig {
            freq_hz: self.freq_hz,
            duration: self.duration,
            output: self.output.clone(),
            label: self.label.clone(),
            kernel_stacks: self.kernel_stacks,
            max_overhead_pct: self.max_overhead_pct,
            ..RecordConfig::default()
        }
    }
}

/// Longest budget accepted: a call past an hour is not a frame.
pub const MAX_BUDGET: Duration = Duration::from_secs(3600);

/// Checks a call budget: more than zero, at most [`MAX_BUDGET`].
pub fn check_budget(what: &str, d: Duration) -> Result<Duration, ConfigError> {
    check_duration(what, d, false)?;
    if d > MAX_BUDGET {
        return Err(ConfigError::Range {
            what: what.into(),
            value: humantime::format_duration(d).to_string(),
            range: "at most 1h",
        });
    }
    Ok(d)
}

/// Checks a function name: `SYMBOL` or `LIB:SYMBOL`.
pub fn check_function(what: &str, text: &str) -> Result<String, ConfigError> {
    crate::probes::resolve::split_spec(text).map_err(|e| ConfigError::Invalid {
        what: what.into(),
        value: text.into(),
        why: e.to_string(),
    })?;
    Ok(text.to_owned())
}

/// `16.7ms`, `500us`, `2s` (a bare number is milliseconds, as frame
/// budgets are usually written); checked by [`check_budget`]. The flag
/// and `[[target.probe]] budget` share it.
pub fn parse_budget(text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let bad = |why: String| ConfigError::Invalid {
        what: "budget".into(),
        value: text.into(),
        why: format!("{why}; examples: 16.7ms, 500us, 2s"),
    };
    let d = match t.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 => {
            Duration::try_from_secs_f64(ms / 1e3).map_err(|e| bad(e.to_string()))?
        }
        Ok(_) => return Err(bad("must be positive".into())),
        Err(_) => parse_fractional(t).ok_or_else(|| bad("not a duration".into()))?,
    };
    check_budget("budget", d)
}

/// humantime takes no fractions (`16.7ms`): a number and a unit.
fn parse_fractional(t: &str) -> Option<Duration> {
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        _ => return humantime::parse_duration(t).ok(),
    };
    (v.is_finite() && v > 0.0)
        .then(|| Duration::try_from_secs_f64(v * scale).ok())
        .flatten()
}

/// Probes per target at most (`[[target.probe]]`): each takes a kernel
/// probe slot per process of the target, and the slots are few.
pub const MAX_PROBES_PER_TARGET: usize = 8;

/// A latency probe of a watched target (`[[target.probe]]`): per-target
/// metrics `latency_p50_ms` … `over_budget_pct`, a Prometheus histogram,
/// and slow-call emergency profiles.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// `SYMBOL` (the executable's) or `LIB:SYMBOL`.
    pub function: String,
    /// Calls longer than this are over budget (`16.7ms`); without one there
    /// is no `over_budget_pct` and no slow-call profile.
    #[serde(default, with = "budget_serde", skip_serializing_if = "Option::is_none")]
    pub budget: Option<Duration>,
}

impl ProbeSpec {
    /// Checks the function's form (the budget was checked as it was read).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_function("target.probe.function", &self.function).map(|_| ())
    }
}

/// Budgets in TOML as strings read by [`parse_budget`].
mod budget_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        // humantime's words (`16ms 700us`) read back exactly.
        s.serialize_str(&humantime::format_duration(d.unwrap_or_default()).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_budget(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that budgets must be positive and at most an hour.
    #[test]
    fn budgets_checked() {
        assert!(check_budget("budget", Duration::from_micros(16_700)).is_ok());
        assert!(check_budget("budget", Duration::ZERO).is_err());
        assert!(check_budget("budget", Duration::from_secs(7200)).is_err());
    }

    /// Test that function names take SYMBOL or LIB:SYMBOL only.
    #[test]
    fn functions_checked() {
        assert_eq!(check_function("function", "libc:malloc").unwrap(), "libc:malloc");
        assert!(check_function("function", "").is_err());
        assert!(check_function("function", "a:").is_err());
    }
}
