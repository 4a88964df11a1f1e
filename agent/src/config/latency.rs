//! Settings of `flamewatch latency`: their defaults, and the checks the
//! command line (and later `[[target.probe]]` in TOML) share.

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
