//! Anomaly detectors: pure functions of a target's metric series (and, for
//! the stuck detector, of what /proc says about its blocked threads). Each
//! returns a [`Finding`] when its condition holds at the latest point;
//! persistence, hysteresis and cooldown are the alert layer's job.

use serde::{Deserialize, Serialize};

use crate::metrics::{Metric, Series, TargetMetrics};

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Look at it soon.
    Warning,
    /// Look at it now (starts an emergency profile).
    Critical,
    /// The service is down or about to be.
    Emergency,
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The metric judged.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// The threshold crossed.
    pub threshold: f64,
    /// One line for humans.
    pub message: String,
}

/// What a rule checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    /// `metric` above (or below) a value for `for_s` seconds.
    Threshold {
        /// Metric.
        metric: Metric,
        /// Fires above this.
        #[serde(default)]
        above: Option<f64>,
        /// Fires below this.
        #[serde(default)]
        below: Option<f64>,
        /// Every point of the last `for_s` seconds must cross it.
        #[serde(default)]
        for_s: f64,
    },
    /// The latest value is `sigma` standard deviations from the mean of the
    /// window before it.
    Zscore {
        /// Metric.
        metric: Metric,
        /// Standard deviations.
        #[serde(default = "default_sigma")]
        sigma: f64,
        /// Window, seconds.
        #[serde(default = "default_z_window")]
        window_s: f64,
        /// Points needed before judging.
        #[serde(default = "default_z_points")]
        min_points: usize,
    },
    /// RSS climbing steadily: least-squares slope over the window, with a fit
    /// good enough (R²) that a sawtooth (garbage collection) is not a leak.
    /// A steep, clean climb is judged before the window is full, from
    /// `min_window_s` on (see [`early_growth`]).
    MemoryGrowth {
        /// Window, seconds.
        #[serde(default = "default_growth_window")]
        window_s: f64,
        /// Shortest span that may fire, seconds, for a climb far steeper than
        /// `min_mb_per_min` and nearly a straight line.
        #[serde(default = "default_growth_min_window")]
        min_window_s: f64,
        /// Slowest growth reported, MB per minute.
        #[serde(default = "default_growth_rate")]
        min_mb_per_min: f64,
        /// Fit quality needed.
        #[serde(default = "default_r2")]
        min_r2: f64,
        /// Memory limit, for the time-to-limit estimate (bytes).
        #[serde(default)]
        limit_bytes: Option<f64>,
        /// The memory profile its emergency takes, `growth` or `heap`
        /// (default: `[emergency] memory_mode`).
        #[serde(default)]
        profile: Option<crate::config::MemoryMode>,
    },
    /// TIME_WAIT sockets piling up: count, or entries per second.
    TimeWait {
        /// Fires at this many sockets in TIME_WAIT.
        #[serde(default = "default_tw_count")]
        above: f64,
        /// Or at this many entries per second (averaged over 10 s).
        #[serde(default = "default_tw_rate")]
        rate_above: f64,
    },
    /// Not making progress: requests sit unread in its sockets while it
    /// uses nearly no CPU; or busy, then idle with clients still connected;
    /// or every worker thread blocked, all for `for_s` seconds.
    Stuck {
        /// "Busy" before: mean CPU % over the minute before.
        #[serde(default = "default_busy")]
        busy_cpu_pct: f64,
        /// "Idle" now: CPU % at most this for `for_s`.
        #[serde(default = "default_idle")]
        idle_cpu_pct: f64,
        /// Seconds.
        #[serde(default = "default_stuck_for")]
        for_s: f64,
        /// Threads whose name starts with this are workers.
        #[serde(default)]
        worker_prefix: Option<String>,
    },
}

fn default_sigma() -> f64 {
    3.0
}
fn default_z_window() -> f64 {
    300.0
}
fn default_z_points() -> usize {
    30
}
fn default_growth_window() -> f64 {
    60.0
}
fn default_growth_min_window() -> f64 {
    20.0
}
fn default_growth_rate() -> f64 {
    10.0
}
fn default_r2() -> f64 {
    0.9
}
fn default_tw_count() -> f64 {
    1000.0
}
fn default_tw_rate() -> f64 {
    100.0
}
fn default_busy() -> f64 {
    20.0
}
fn default_idle() -> f64 {
    2.0
}
fn default_stuck_for() -> f64 {
    5.0
}

impl Check {
    /// Checks the values of the check; `what` prefixes the key in errors
    /// (`rule "cpu" of x: `). Windows must fit in the metrics history.
    pub fn validate(&self, what: &str) -> Result<(), crate::config::ConfigError> {
        use crate::config::{check_range, ConfigError};
        let key = |k: &str| format!("{what}{k}");
        let hist = crate::metrics::HISTORY.as_secs_f64();
        let window =
            |k: &str, v: f64| check_range(&key(k), v, 0.0, hist, "seconds in [0, 3600] (the history)");
        let num = |k: &str, v: f64| check_range(&key(k), v, f64::MIN, f64::MAX, "a finite number");
        let pos = |k: &str, v: f64| check_range(&key(k), v, f64::MIN_POSITIVE, f64::MAX, "positive");
        match self {
            Check::Threshold {
                above, below, for_s, ..
            } => {
                window("for_s", *for_s)?;
                if above.is_none() && below.is_none() {
                    return Err(ConfigError::Invalid {
                        what: key("above"),
                        value: String::new(),
                        why: "a threshold rule needs `above` or `below`".into(),
                    });
                }
                above.map(|v| num("above", v)).transpose()?;
                below.map(|v| num("below", v)).transpose()?;
            }
            Check::Zscore {
                sigma,
                window_s,
                min_points,
                ..
            } => {
                pos("sigma", *sigma)?;
                window("window_s", *window_s)?;
                check_range(
                    &key("min_points"),
                    *min_points as f64,
                    1.0,
                    100_000.0,
                    "in [1, 100000]",
                )?;
            }
            Check::MemoryGrowth {
                window_s,
                min_window_s,
                min_mb_per_min,
                min_r2,
                limit_bytes,
                ..
            } => {
                window("window_s", *window_s)?;
                pos("window_s", *window_s)?;
                window("min_window_s", *min_window_s)?;
                pos("min_window_s", *min_window_s)?;
                num("min_mb_per_min", *min_mb_per_min)?;
                check_range(&key("min_r2"), *min_r2, 0.0, 1.0, "in [0, 1]")?;
                limit_bytes.map(|v| pos("limit_bytes", v)).transpose()?;
            }
            Check::TimeWait { above, rate_above } => {
                check_range(&key("above"), *above, 0.0, f64::MAX, "at least 0")?;
                check_range(&key("rate_above"), *rate_above, 0.0, f64::MAX, "at least 0")?;
            }
            Check::Stuck {
                busy_cpu_pct,
                idle_cpu_pct,
                for_s,
                ..
            } => {
                window("for_s", *for_s)?;
                check_range(
                    &key("busy_cpu_pct"),
                    *busy_cpu_pct,
                    0.0,
                    100_000.0,
                    "a CPU % at least 0",
                )?;
                check_range(
                    &key("idle_cpu_pct"),
                    *idle_cpu_pct,
                    0.0,
                    100_000.0,
                    "a CPU % at least 0",
                )?;
            }
        }
        Ok(())
    }
}

/// Facts beyond the series that some checks need.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Local port with the most TIME_WAIT sockets, and how many.
    pub top_time_wait_port: Option<(u16, u64)>,
    /// Threads of the target, with how long each has been blocked (s; 0 when
    /// running): (name, blocked seconds).
    pub threads: Vec<(String, f64)>,
}

/// How much steeper than `min_mb_per_min` a climb must be to fire before
/// its window is full.
pub const EARLY_STEEPNESS: f64 = 4.0;
/// The fit an early judgement needs: nearly a straight line.
pub const EARLY_MIN_R2: f64 = 0.98;
/// A climb still going: its last third at least this share of its slope (a
/// cache filling up slows down as it fills).
pub const EARLY_NOT_SLOWING: f64 = 0.75;
/// The largest fall within the span, as a share of the climb (a sawtooth
/// has fallen at least once).
pub const EARLY_MAX_DROP: f64 = 0.1;

/// Whether `pts` (a span shorter than the rule's window), fitted with
/// `slope` (bytes/s) and `r2`, is a leak beyond doubt already: far steeper
/// than the rule's rate, nearly a straight line, not slowing down, and never
/// falling back. A warm-up (slowing as it fills), a sawtooth (it falls) and
/// a one-time jump (not a line) wait for the full window, where they fit no
/// steady climb.
pub fn early_growth(pts: &[(f64, f64)], slope: f64, r2: f64, min_mb_per_min: f64) -> bool {
    let mb_per_min = slope * 60.0 / 1e6;
    if mb_per_min < EARLY_STEEPNESS * min_mb_per_min.max(1.0) || r2 < EARLY_MIN_R2 {
        return false;
    }
    let (t0, t1) = (pts[0].0, pts[pts.len() - 1].0);
    let tail: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|p| p.0 >= t1 - (t1 - t0) / 3.0)
        .collect();
    let slowing = linear_fit(&tail).is_none_or(|(tail_slope, _)| tail_slope < EARLY_NOT_SLOWING * slope);
    let climb = slope * (t1 - t0);
    let mut peak = f64::MIN;
    let mut drop = 0.0_f64;
    for &(_, v) in pts {
        peak = peak.max(v);
        drop = drop.max(peak - v);
    }
    !slowing && drop <= EARLY_MAX_DROP * climb
}

/// Least-squares fit of `points`: (slope per second, R²).
pub fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in points {
        sxx += (x - mx) * (x - mx);
        sxy += (x - mx) * (y - my);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    // A flat series fits a flat line perfectly.
    let r2 = if syy == 0.0 {
        1.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    Some((slope, r2))
}

fn finding(metric: &str, value: f64, threshold: f64, message: String) -> Option<Finding> {
    Some(Finding {
        metric: metric.to_owned(),
        value,
        threshold,
        message,
    })
}

fn series(m: &TargetMetrics, metric: Metric) -> Option<&Series> {
    m.get(metric).filter(|s| !s.is_empty())
}

impl Check {
    /// The finding, if the condition holds at the latest point.
    pub fn evaluate(&self, m: &TargetMetrics, ctx: &Context) -> Option<Finding> {
        match self {
            Check::Threshold {
                metric,
                above,
                below,
                for_s,
            } => {
                let s = series(m, *metric)?;
                let last = s.last()?;
                // Need the whole duration covered, not one lucky point: in
                // seconds, whatever the interval between points.
                let window: Vec<f64> = s.window(for_s.max(1.0)).map(|(_, v)| v).collect();
                if *for_s > 0.0 && !s.covers(*for_s) {
                    return None;
                }
                let name = metric.name();
                if let Some(a) = *above {
                    if window.iter().all(|&v| v > a) {
                        return finding(
                            name,
                            last,
                            a,
                            format!("{name} {} above {} for {for_s:.0} s", fmt(last), fmt(a)),
                        );
                    }
                }
                if let Some(b) = *below {
                    if window.iter().all(|&v| v < b) {
                        return finding(
                            name,
                            last,
                            b,
                            format!("{name} {} below {} for {for_s:.0} s", fmt(last), fmt(b)),
                        );
                    }
                }
                None
            }
            Check::Zscore {
                metric,
                sigma,
                window_s,
                min_points,
            } => {
                let s = series(m, *metric)?;
                let pts: Vec<f64> = s.window(*window_s).map(|(_, v)| v).collect();
                let (last, before) = pts.split_last()?;
                if before.len() < *min_points {
                    return None;
                }
                let n = before.len() as f64;
                let mean = before.iter().sum::<f64>() / n;
                let sd = (before.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
                // A perfectly flat history has no spread to measure against.
                if sd < 1e-9 * mean.abs().max(1.0) {
                    return None;
                }
                let z = (last - mean) / sd;
                (z.abs() > *sigma).then(|| Finding {
                    metric: metric.name().into(),
                    value: *last,
                    threshold: mean + sigma * sd * z.signum(),
                    message: format!(
                        "{} {} is {z:+.1} σ from its {window_s:.0} s mean {}",
                        metric.name(),
                        fmt(*last),
                        fmt(mean)
                    ),
                })
            }
            Check::MemoryGrowth {
                window_s,
                min_window_s,
                min_mb_per_min,
                min_r2,
                limit_bytes,
                ..
            } => {
                let s = series(m, Metric::RssBytes)?;
                let pts: Vec<(f64, f64)> = s.window(*window_s).collect();
                let span = pts.last()?.0 - pts.first()?.0;
                let (slope, r2) = linear_fit(&pts)?;
                let mb_per_min = slope * 60.0 / 1e6;
                let full = span >= window_s * 0.9 && mb_per_min >= *min_mb_per_min && r2 >= *min_r2;
                let early = span < window_s * 0.9
                    && span >= *min_window_s
                    && early_growth(&pts, slope, r2, *min_mb_per_min);
                if !full && !early {
                    return None;
                }
                let rss = pts.last()?.1;
                let eta = limit_bytes
                    .filter(|l| *l > rss)
                    .map(|l| format!("; limit in {:.0} min", (l - rss) / slope / 60.0))
                    .unwrap_or_default();
                finding(
                    "rss_bytes",
                    rss,
                    limit_bytes.unwrap_or(0.0),
                    format!("RSS growing {mb_per_min:.0} MB/min (R²={r2:.2}){eta}"),
                )
            }
            Check::TimeWait { above, rate_above } => {
                let now = series(m, Metric::TimeWait).and_then(Series::last).unwrap_or(0.0);
                let rate = series(m, Metric::TimeWaitPerS)
                    .map(|s| {
                        let w: Vec<f64> = s.window(10.0).map(|(_, v)| v).collect();
                        w.iter().sum::<f64>() / w.len().max(1) as f64
                    })
                    .unwrap_or(0.0);
                if now < *above && rate < *rate_above {
                    return None;
                }
                let port = ctx
                    .top_time_wait_port
                    .map(|(p, n)| format!(", most on port {p} ({n})"))
                    .unwrap_or_default();
                finding(
                    "time_wait",
                    now,
                    *above,
                    format!("{now:.0} sockets in TIME_WAIT, {rate:.0} more per second{port}"),
                )
            }
            Check::Stuck {
                busy_cpu_pct,
                idle_cpu_pct,
                for_s,
                worker_prefix,
            } => {
                // Requests wait unread in the target's sockets: work is
                // pending. Without it, sleeping workers and an idle process
                // are a lull (a pool waiting for jobs), not a hang.
                let queued: Vec<f64> = series(m, Metric::RecvQueueBytes)
                    .map(|q| q.window(*for_s).map(|(_, v)| v).collect())
                    .unwrap_or_default();
                let pending = queued.last().is_some_and(|&b| b > 0.0);
                // All workers blocked for the duration, with work pending.
                if let (Some(prefix), true) = (worker_prefix, pending) {
                    let workers: Vec<f64> = ctx
                        .threads
                        .iter()
                        .filter(|(n, _)| n.starts_with(prefix.as_str()))
                        .map(|&(_, b)| b)
                        .collect();
                    if !workers.is_empty() && workers.iter().all(|&b| b >= *for_s) {
                        let min = workers.iter().copied().fold(f64::MAX, f64::min);
                        return finding(
                            "blocked_workers",
                            workers.len() as f64,
                            *for_s,
                            format!(
                                "all {} {prefix}* threads blocked for at least {min:.0} s, {:.0} bytes of \
                                 requests unread",
                                workers.len(),
                                queued.last().copied().unwrap_or(0.0)
                            ),
                        );
                    }
                }
                let cpu = series(m, Metric::CpuPct)?;
                let recent: Vec<f64> = cpu.window(*for_s).map(|(_, v)| v).collect();
                if !cpu.covers(*for_s) || recent.iter().any(|&v| v > *idle_cpu_pct) {
                    return None;
                }
                // Idle, yet requests wait unread: nobody is reading them.
                let queue_covered = series(m, Metric::RecvQueueBytes).is_some_and(|q| q.covers(*for_s));
                if queue_covered && queued.iter().all(|&b| b > 0.0) {
                    let bytes = queued.last().copied().unwrap_or(0.0);
                    return finding(
                        "recv_queue_bytes",
                        bytes,
                        0.0,
                        format!(
                            "no progress: {bytes:.0} bytes of requests unread for {for_s:.0} s while using \
                             {:.1} % CPU",
                            recent.iter().copied().fold(0.0, f64::max)
                        ),
                    );
                }
                // Busy before, idle now, clients still there and requests
                // arriving (some unread data during the window).
                let before: Vec<f64> = cpu
                    .window(60.0 + for_s)
                    .filter(|(t, _)| cpu.window(*for_s).all(|(r, _)| r != *t))
                    .map(|(_, v)| v)
                    .collect();
                let busy = before.iter().sum::<f64>() / before.len().max(1) as f64;
                let clients = series(m, Metric::TcpEstablished)
                    .and_then(Series::last)
                    .unwrap_or(0.0);
                if before.len() < 5
                    || busy < *busy_cpu_pct
                    || clients < 1.0
                    || !queued.iter().any(|&b| b > 0.0)
                {
                    return None;
                }
                finding(
                    "cpu_pct",
                    recent.iter().copied().fold(0.0, f64::max),
                    *idle_cpu_pct,
                    format!(
                        "was busy ({busy:.0} % CPU), now idle for {for_s:.0} s with {clients:.0} clients connected"
                    ),
                )
            }
        }
    }
}

/// Compact numbers for messages (bytes in MB when large).
fn fmt(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(metric: Metric, values: impl IntoIterator<Item = f64>) -> TargetMetrics {
        let mut m = TargetMetrics::default();
        for (t, v) in values.into_iter().enumerate() {
            m.record(t as f64, &[(metric, v)]);
        }
        m
    }

    /// Test that a threshold needs the whole duration above it.
    #[test]
    fn threshold_needs_duration() {
        let rule = Check::Threshold {
            metric: Metric::CpuPct,
            above: Some(80.0),
            below: None,
            for_s: 10.0,
        };
        let brief = metrics(Metric::CpuPct, (0..30).map(|i| if i > 25 { 99.0 } else { 10.0 }));
        assert!(rule.evaluate(&brief, &Context::default()).is_none());
        let long = metrics(Metric::CpuPct, (0..30).map(|i| if i >= 15 { 99.0 } else { 10.0 }));
        let f = rule.evaluate(&long, &Context::default()).expect("fires");
        assert_eq!(f.value, 99.0);
        assert!(f.message.contains("above 80"), "{}", f.message);
    }

    /// Test that `for_s` is seconds, not points: at a 5 s interval a 10 s
    /// threshold fires after 10 s above (it never did while it counted
    /// points), and not after 5 s.
    #[test]
    fn threshold_for_s_is_seconds_at_any_interval() {
        let rule = Check::Threshold {
            metric: Metric::CpuPct,
            above: Some(80.0),
            below: None,
            for_s: 10.0,
        };
        let every_5s = |values: &[f64]| {
            let mut m = TargetMetrics::default();
            for (i, v) in values.iter().enumerate() {
                m.record(i as f64 * 5.0, &[(Metric::CpuPct, *v)]);
            }
            m
        };
        let hot = every_5s(&[10.0, 10.0, 99.0, 99.0, 99.0]);
        assert!(
            rule.evaluate(&hot, &Context::default()).is_some(),
            "10 s above at 5 s"
        );
        let brief = every_5s(&[10.0, 10.0, 10.0, 99.0]);
        assert!(
            rule.evaluate(&brief, &Context::default()).is_none(),
            "one point above"
        );
        let young = every_5s(&[99.0]);
        assert!(
            rule.evaluate(&young, &Context::default()).is_none(),
            "no 10 s of history"
        );
    }

    /// Test that a z-score judges only with enough history, and flags a spike.
    #[test]
    fn zscore_spike() {
        let rule = Check::Zscore {
            metric: Metric::Fds,
            sigma: 3.0,
            window_s: 300.0,
            min_points: 30,
        };
        let noise = |i: usize| 100.0 + ((i * 7) % 5) as f64;
        let short = metrics(Metric::Fds, (0..20).map(noise).chain([400.0]));
        assert!(
            rule.evaluate(&short, &Context::default()).is_none(),
            "fewer than 30 points"
        );
        let spike = metrics(Metric::Fds, (0..100).map(noise).chain([400.0]));
        assert!(rule.evaluate(&spike, &Context::default()).is_some());
        let calm = metrics(Metric::Fds, (0..100).map(noise).chain([103.0]));
        assert!(rule.evaluate(&calm, &Context::default()).is_none());
    }

    fn growth() -> Check {
        Check::MemoryGrowth {
            window_s: 60.0,
            min_window_s: 20.0,
            min_mb_per_min: 10.0,
            min_r2: 0.9,
            limit_bytes: Some(2e9),
            profile: None,
        }
    }

    /// Test that a steady climb is a leak, with its rate and time to the limit.
    #[test]
    fn steady_climb_is_a_leak() {
        // 42 MB/min = 0.7 MB/s from 500 MB, with a little noise.
        let m = metrics(
            Metric::RssBytes,
            (0..90).map(|t| 5e8 + 0.7e6 * t as f64 + ((t * 13) % 7) as f64 * 1e4),
        );
        let f = growth().evaluate(&m, &Context::default()).expect("leak");
        assert!(f.message.starts_with("RSS growing 42 MB/min"), "{}", f.message);
        // (2000 MB - 562 MB) at 42 MB/min.
        assert!(f.message.contains("limit in 34 min"), "{}", f.message);
    }

    /// Test that a garbage-collection sawtooth (up 60 MB, back down, every
    /// 20 s) is not a leak, and neither is a flat line.
    #[test]
    fn sawtooth_is_not_a_leak() {
        let saw = metrics(Metric::RssBytes, (0..120).map(|t| 5e8 + 3e6 * (t % 20) as f64));
        assert!(growth().evaluate(&saw, &Context::default()).is_none());
        let flat = metrics(Metric::RssBytes, (0..120).map(|_| 5e8));
        assert!(growth().evaluate(&flat, &Context::default()).is_none());
    }

    /// Test that a steep, clean climb (5 MB/s) fires once `min_window_s`
    /// shows it, before the window is full; a gentle one (1 MB/s, over the
    /// rate but not 4 times over) waits for the full window.
    #[test]
    fn steep_climb_fires_early() {
        let noise = |t: usize| ((t * 13) % 7) as f64 * 1e4;
        let steep = metrics(Metric::RssBytes, (0..25).map(|t| 5e8 + 5e6 * t as f64 + noise(t)));
        let f = growth().evaluate(&steep, &Context::default()).expect("early");
        assert!(f.message.starts_with("RSS growing 300 MB/min"), "{}", f.message);
        let young = metrics(Metric::RssBytes, (0..15).map(|t| 5e8 + 5e6 * t as f64));
        assert!(
            growth().evaluate(&young, &Context::default()).is_none(),
            "before min_window_s"
        );
        let gentle = |n: usize| {
            metrics(
                Metric::RssBytes,
                (0..n).map(|t| 5e8 + 0.5e6 * t as f64 + noise(t)),
            )
        };
        assert!(growth().evaluate(&gentle(30), &Context::default()).is_none());
        assert!(growth().evaluate(&gentle(61), &Context::default()).is_some());
    }

    /// Test that a warm-up (a cache filling to 300 MB, slowing as it fills,
    /// then flat), a sawtooth faster than `min_window_s` and a one-time jump
    /// never fire, at any point of a 3-minute series.
    #[test]
    fn warm_up_sawtooth_and_jump_never_fire() {
        let warm = |t: usize| 5e7 + 3e8 * (1.0 - (-(t as f64) / 10.0).exp());
        let saw = |t: usize| 5e8 + 5e6 * (t % 10) as f64;
        let jump = |t: usize| if t < 40 { 5e8 } else { 8e8 };
        for (name, f) in [
            ("warm-up", &warm as &dyn Fn(usize) -> f64),
            ("sawtooth", &saw),
            ("jump", &jump),
        ] {
            for n in 3..180 {
                let m = metrics(Metric::RssBytes, (0..n).map(f));
                let fired = growth().evaluate(&m, &Context::default());
                assert!(fired.is_none(), "{name} fired after {n} s: {fired:?}");
            }
        }
    }

    /// Test the least-squares fit on an exact line and on noise.
    #[test]
    fn fit() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 2.0 * x as f64 + 1.0)).collect();
        let (slope, r2) = linear_fit(&line).unwrap();
        assert!((slope - 2.0).abs() < 1e-12 && (r2 - 1.0).abs() < 1e-12);
        let zigzag: Vec<(f64, f64)> = (0..10)
            .map(|x| (x as f64, if x % 2 == 0 { 0.0 } else { 1.0 }))
            .collect();
        assert!(linear_fit(&zigzag).unwrap().1 < 0.1);
    }

    /// Test that TIME_WAIT accumulation fires on the count or on the rate,
    /// and names the port.
    #[test]
    fn time_wait_names_port() {
        let rule = Check::TimeWait {
            above: 1000.0,
            rate_above: 100.0,
        };
        let mut m = metrics(Metric::TimeWait, (0..5).map(|i| 400.0 * i as f64));
        let ctx = Context {
            top_time_wait_port: Some((9999, 1600)),
            ..Default::default()
        };
        let f = rule.evaluate(&m, &ctx).expect("fires on the count");
        assert!(f.message.contains("port 9999"), "{}", f.message);
        m.clear();
        m.record(0.0, &[(Metric::TimeWait, 10.0), (Metric::TimeWaitPerS, 5.0)]);
        assert!(rule.evaluate(&m, &ctx).is_none());
        // Few sockets yet, but entering fast (mean of the last 10 s): fires
        // on the rate before the count is reached.
        m.clear();
        for t in 0..10 {
            m.record(
                f64::from(t),
                &[
                    (Metric::TimeWait, 150.0 * f64::from(t)),
                    (Metric::TimeWaitPerS, 150.0),
                ],
            );
        }
        let f = rule.evaluate(&m, &ctx).expect("fires on the rate");
        assert!(f.message.contains("150 more per second"), "{}", f.message);
    }

    /// Test the ways of being stuck: busy then idle with clients connected
    /// and requests arriving, every worker blocked with requests waiting,
    /// requests piling up unread; and that a lull (idle clients, a worker
    /// pool waiting for jobs) is none of them.
    #[test]
    fn stuck() {
        let rule = Check::Stuck {
            busy_cpu_pct: 20.0,
            idle_cpu_pct: 2.0,
            for_s: 5.0,
            worker_prefix: Some("worker".into()),
        };
        let mut m = TargetMetrics::default();
        let mut lull = TargetMetrics::default();
        for t in 0..40 {
            let cpu = if t < 33 { 60.0 } else { 0.5 };
            // A request now and then, no longer read once it is idle.
            let queue = if t >= 37 { 300.0 } else { 0.0 };
            m.record(
                f64::from(t),
                &[
                    (Metric::CpuPct, cpu),
                    (Metric::TcpEstablished, 4.0),
                    (Metric::RecvQueueBytes, queue),
                ],
            );
            lull.record(
                f64::from(t),
                &[
                    (Metric::CpuPct, cpu),
                    (Metric::TcpEstablished, 4.0),
                    (Metric::RecvQueueBytes, 0.0),
                ],
            );
        }
        assert!(rule.evaluate(&m, &Context::default()).is_some(), "busy then idle");
        assert!(
            rule.evaluate(&lull, &Context::default()).is_none(),
            "busy then idle, clients connected but sending nothing: a lull"
        );
        // Idle all along is just idle.
        let mut quiet = TargetMetrics::default();
        for t in 0..40 {
            quiet.record(
                f64::from(t),
                &[(Metric::CpuPct, 0.5), (Metric::TcpEstablished, 4.0)],
            );
        }
        assert!(rule.evaluate(&quiet, &Context::default()).is_none());
        let threads = |b: f64| Context {
            threads: vec![
                ("worker-0".into(), b),
                ("worker-1".into(), b + 3.0),
                ("main".into(), 0.0),
            ],
            ..Default::default()
        };
        assert!(
            rule.evaluate(&quiet, &threads(6.0)).is_none(),
            "a worker pool waiting for jobs, nothing queued: idle"
        );
        let mut waiting = TargetMetrics::default();
        for t in 0..40 {
            waiting.record(
                f64::from(t),
                &[(Metric::CpuPct, 30.0), (Metric::RecvQueueBytes, 2048.0)],
            );
        }
        let f = rule
            .evaluate(&waiting, &threads(6.0))
            .expect("all workers blocked 6 s with requests waiting");
        assert_eq!(f.metric, "blocked_workers");
        assert!(rule.evaluate(&waiting, &threads(1.0)).is_none());
        // Idle with requests piling up unread: stuck. Idle with drained
        // sockets: just idle.
        let mut piling = TargetMetrics::default();
        for t in 0..10 {
            piling.record(
                f64::from(t),
                &[
                    (Metric::CpuPct, 0.0),
                    (Metric::RecvQueueBytes, 4096.0 * f64::from(t + 1)),
                ],
            );
        }
        let f = rule
            .evaluate(&piling, &Context::default())
            .expect("requests unread");
        assert!(f.message.contains("unread"), "{}", f.message);
        let mut drained = TargetMetrics::default();
        for t in 0..10 {
            drained.record(
                f64::from(t),
                &[(Metric::CpuPct, 0.0), (Metric::RecvQueueBytes, 0.0)],
            );
        }
        assert!(rule.evaluate(&drained, &Context::default()).is_none());
    }
}
