//! The adaptive sampling governor: profiling may cost a target at most its
//! budget (default 5 % of the target's own CPU time).
//!
//! [`Governor`] is the controller, pure and unit-tested on simulated cost
//! curves; [`cost`] measures what an interval cost; [`calibrate`] measures
//! the per-sample interrupt cost the kernel does not report; [`budget`]
//! shares one budget per target between sessions and agents.
//!
//! The control law, every interval (1 s):
//! - **over budget** (measured > budget): cut at once to the rate predicted
//!   to land at `SETPOINT` of the budget (cost is proportional to the rate);
//! - **well under** (< `GROW_BELOW` of the budget): grow by at most
//!   `MAX_GROWTH`, and never past the rate predicted to reach the setpoint or
//!   past the requested rate;
//! - **in between**: hold. The setpoint sits inside the hold band, so the
//!   rate settles instead of oscillating.
//! - At the minimum rate and still over: pause, then probe again after a
//!   back-off that doubles while the probe fails.

pub mod budget;
pub mod calibrate;
pub mod cost;

/// Fraction of the budget the controller aims for.
pub const SETPOINT: f64 = 0.8;
/// Below this fraction of the budget the rate may grow.
pub const GROW_BELOW: f64 = 0.5;
/// Largest growth factor per interval ("grow gently").
pub const MAX_GROWTH: f64 = 1.25;
/// Intervals to wait before the first probe after pausing.
pub const FIRST_BACKOFF: u32 = 5;
/// Longest back-off between probes.
pub const MAX_BACKOFF: u32 = 60;
/// An interval with less target CPU than this says nothing about the cost.
pub const MIN_SIGNAL_CPU_NS: u64 = 1_000_000;

/// The governor's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GovernorConfig {
    /// Budget, percent of the target's CPU time.
    pub budget_pct: f64,
    /// Requested rate: the ceiling.
    pub ceiling_hz: u64,
    /// Lowest rate before pausing.
    pub min_hz: u64,
}

/// What one interval measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Rate in force during the interval (0 when paused).
    pub hz: u64,
    /// Overhead the profiling cost the target, percent of its CPU time.
    pub overhead_pct: f64,
    /// Target CPU time in the interval.
    pub target_cpu_ns: u64,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep the current rate.
    Keep,
    /// Change the sampling rate.
    SetRate(u64),
    /// Stop sampling: even the minimum rate is over budget.
    Pause,
    /// Resume sampling at this rate (a probe).
    Resume(u64),
}

/// The controller of one target's sampling rate.
#[derive(Debug, Clone)]
pub struct Governor {
    config: GovernorConfig,
    hz: u64,
    paused: bool,
    /// Smoothed cost, percent of target CPU per Hz.
    cost_per_hz: Option<f64>,
    backoff: u32,
    wait: u32,
}

impl Governor {
    /// Starts at the requested rate.
    pub fn new(config: GovernorConfig) -> Self {
        let config = GovernorConfig {
            min_hz: config.min_hz.max(1),
            ceiling_hz: config.ceiling_hz.max(config.min_hz.max(1)),
            ..config
        };
        Self {
            config,
            hz: config.ceiling_hz,
            paused: false,
            cost_per_hz: None,
            backoff: FIRST_BACKOFF,
            wait: 0,
        }
    }

    /// The starting rate given what is already known of the cost (e.g. from
    /// calibration): the requested rate, or less if that is predicted over
    /// budget. Avoids a first interval over budget.
    pub fn start_with_estimate(&mut self, cost_per_hz_pct: f64) -> u64 {
        if cost_per_hz_pct > 0.0 {
            self.cost_per_hz = Some(cost_per_hz_pct);
            let predicted = self.config.ceiling_hz as f64 * cost_per_hz_pct;
            if predicted > self.config.budget_pct {
                self.hz = self.safe_hz(cost_per_hz_pct).max(self.config.min_hz);
            }
        }
        self.hz
    }

    /// Current rate (0 when paused).
    pub fn hz(&self) -> u64 {
        if self.paused {
            0
        } else {
            self.hz
        }
    }

    /// Whether sampling is paused.
    #[cfg(test)]
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Changes the budget (e.g. another session took part of it).
    pub fn set_budget(&mut self, budget_pct: f64) {
        self.config.budget_pct = budget_pct;
    }

    /// Changes the requested rate (a session boosts it for a while, or its
    /// boost ends). Lowering takes effect at once; raising goes as high as
    /// the known cost allows within the budget. Returns the new rate when it
    /// changed (nothing while paused: the next probe starts low anyway).
    pub fn set_ceiling(&mut self, hz: u64) -> Option<u64> {
        let hz = hz.max(self.config.min_hz);
        if hz == self.config.ceiling_hz {
            return None;
        }
        self.config.ceiling_hz = hz;
        if self.paused {
            self.hz = self.hz.min(hz);
            return None;
        }
        let new = if hz < self.hz {
            hz
        } else {
            self.cost_per_hz
                .map_or(hz, |c| self.safe_hz(c).max(self.hz))
                .min(hz)
        };
        (new != self.hz).then(|| {
            self.hz = new;
            new
        })
    }

    /// The budget in force.
    pub fn budget_pct(&self) -> f64 {
        self.config.budget_pct
    }

    fn safe_hz(&self, cost_per_hz: f64) -> u64 {
        if cost_per_hz <= 0.0 {
            return self.config.ceiling_hz;
        }
        ((SETPOINT * self.config.budget_pct / cost_per_hz).floor() as u64).min(self.config.ceiling_hz)
    }

    /// Takes one interval's measurement and decides the next rate.
    pub fn observe(&mut self, obs: Observation) -> Decision {
        if self.paused {
            return self.observe_paused();
        }
        let budget = self.config.budget_pct;
        // No samples, no information: an idle target costs nothing at any
        // rate, so neither cut nor grow on it.
        if obs.target_cpu_ns < MIN_SIGNAL_CPU_NS || obs.hz == 0 {
            return Decision::Keep;
        }
        let cost = obs.overhead_pct / obs.hz as f64;
        if obs.overhead_pct > budget {
            // Believe the bad news at once; the smoothed estimate must not
            // lag behind a step up in cost.
            self.cost_per_hz = Some(self.cost_per_hz.map_or(cost, |c| c.max(cost)));
            if self.hz <= self.config.min_hz {
                self.paused = true;
                self.wait = self.backoff;
                return Decision::Pause;
            }
            let target = (self.hz as f64 * SETPOINT * budget / obs.overhead_pct).floor() as u64;
            let new = target.clamp(self.config.min_hz, self.hz - 1);
            self.hz = new;
            return Decision::SetRate(new);
        }
        // Good news is smoothed, so one quiet interval cannot trigger a jump.
        let smoothed = self.cost_per_hz.map_or(cost, |c| 0.5 * c + 0.5 * cost);
        self.cost_per_hz = Some(smoothed);
        self.backoff = FIRST_BACKOFF;
        if obs.overhead_pct < GROW_BELOW * budget && self.hz < self.config.ceiling_hz {
            let gentle = ((self.hz as f64 * MAX_GROWTH).floor() as u64).max(self.hz + 1);
            let new = gentle.min(self.safe_hz(smoothed)).min(self.config.ceiling_hz);
            if new > self.hz {
                self.hz = new;
                return Decision::SetRate(new);
            }
        }
        Decision::Keep
    }

    fn observe_paused(&mut self) -> Decision {
        if self.wait > 1 {
            self.wait -= 1;
            return Decision::Keep;
        }
        // Probe at the minimum rate; a failed probe pauses again for longer.
        self.paused = false;
        self.hz = self.config.min_hz;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Decision::Resume(self.hz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that a boost raises the rate only as far as the known cost
    /// allows, and that its end lowers it back at once.
    #[test]
    fn boost_within_budget_and_back() {
        let mut gov = Governor::new(GovernorConfig {
            budget_pct: 5.0,
            ceiling_hz: 19,
            min_hz: 1,
        });
        // 0.003 % per Hz: 5 % allows SETPOINT x 5 / 0.003 Hz.
        assert_eq!(gov.start_with_estimate(0.003), 19);
        assert_eq!(gov.set_ceiling(499), Some(499));
        let capped = gov.set_ceiling(20_000).expect("raised");
        assert!(capped < 20_000 && capped > 499, "{capped}");
        assert_eq!(gov.set_ceiling(19), Some(19));
        assert_eq!(gov.set_ceiling(19), None);
        assert_eq!(gov.hz(), 19);
    }

    /// A simulated target: overhead = rate x per-Hz cost (+ optional noise).
    struct Sim {
        cost_per_hz: f64,
    }

    impl Sim {
        fn observe(&self, hz: u64, noise: f64) -> Observation {
            Observation {
                hz,
                overhead_pct: hz as f64 * self.cost_per_hz * (1.0 + noise),
                target_cpu_ns: 1_000_000_000,
            }
        }
    }

    fn config(ceiling_hz: u64) -> GovernorConfig {
        GovernorConfig {
            budget_pct: 5.0,
            ceiling_hz,
            min_hz: 1,
        }
    }

    /// Runs `steps` intervals; returns the rates and overheads seen.
    fn run(gov: &mut Governor, sim: &Sim, steps: usize, noise: impl Fn(usize) -> f64) -> Vec<(u64, f64)> {
        (0..steps)
            .map(|i| {
                let hz = gov.hz();
                let obs = sim.observe(hz, noise(i));
                gov.observe(obs);
                (hz, obs.overhead_pct)
            })
            .collect()
    }

    /// Test that a cheap target keeps the requested rate (never above it).
    #[test]
    fn cheap_target_stays_at_request() {
        // 30 µs a sample is 0.003 % per Hz: 99 Hz costs 0.3 %.
        let mut gov = Governor::new(config(99));
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.003 }, 30, |_| 0.0);
        assert!(trace.iter().all(|&(hz, _)| hz == 99), "{trace:?}");
    }

    /// Test that an expensive request converges under budget within one
    /// interval and then holds still.
    #[test]
    fn converges_below_budget() {
        let mut gov = Governor::new(config(20_000));
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.003 }, 30, |_| 0.0);
        // First interval at the request is the measurement; then under budget.
        assert!(trace[0].1 > 5.0);
        assert!(trace[1..].iter().all(|&(_, pct)| pct <= 5.0), "{trace:?}");
        let settled: Vec<u64> = trace[5..].iter().map(|&(hz, _)| hz).collect();
        assert!(
            settled.windows(2).all(|w| w[0] == w[1]),
            "no oscillation: {settled:?}"
        );
        let pct = trace.last().unwrap().1;
        assert!((3.0..=5.0).contains(&pct), "uses the budget sensibly: {pct}");
    }

    /// Test that a calibration estimate avoids even the first interval over budget.
    #[test]
    fn estimate_starts_under_budget() {
        let mut gov = Governor::new(config(20_000));
        let hz = gov.start_with_estimate(0.003);
        assert!(hz < 20_000);
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.003 }, 10, |_| 0.0);
        assert!(trace.iter().all(|&(_, pct)| pct <= 5.0), "{trace:?}");
    }

    /// Test that after a step up in cost the budget is exceeded for at most
    /// one interval, and that after a step down the rate grows back gently.
    #[test]
    fn step_changes() {
        let mut gov = Governor::new(config(5_000));
        run(&mut gov, &Sim { cost_per_hz: 0.002 }, 20, |_| 0.0);
        let before = gov.hz();
        // The target gets 4x more expensive to sample (e.g. deep stacks).
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.008 }, 20, |_| 0.0);
        let over = trace.iter().filter(|&&(_, pct)| pct > 5.0).count();
        assert!(over <= 1, "over budget {over} intervals: {trace:?}");
        assert!(gov.hz() < before);
        // And cheap again: growth is gradual (≤ 25 % per interval) back up.
        let low = gov.hz();
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.002 }, 40, |_| 0.0);
        for w in trace.windows(2) {
            assert!(
                w[1].0 as f64 <= (w[0].0 as f64 * MAX_GROWTH).max(w[0].0 as f64 + 1.0),
                "{trace:?}"
            );
        }
        assert!(gov.hz() > low);
        assert!(trace.iter().all(|&(_, pct)| pct <= 5.0));
    }

    /// Test that measurement noise of ±15 % does not make the rate oscillate.
    #[test]
    fn noise_does_not_oscillate() {
        let mut gov = Governor::new(config(20_000));
        // Deterministic pseudo-noise in [-0.15, 0.15].
        let noise = |i: usize| (((i * 7919) % 31) as f64 / 30.0 - 0.5) * 0.3;
        let trace = run(&mut gov, &Sim { cost_per_hz: 0.003 }, 100, noise);
        let changes = trace[10..].windows(2).filter(|w| w[0].0 != w[1].0).count();
        assert!(changes <= 3, "{changes} rate changes in 90 intervals: {trace:?}");
        let over = trace[10..].iter().filter(|&&(_, pct)| pct > 5.0).count();
        assert_eq!(over, 0, "{trace:?}");
    }

    /// Test that when even 1 Hz is over budget sampling pauses, probes with
    /// growing back-off, and resumes once it fits.
    #[test]
    fn pauses_and_resumes() {
        let mut gov = Governor::new(GovernorConfig {
            budget_pct: 5.0,
            ceiling_hz: 4,
            min_hz: 1,
        });
        let costly = Sim { cost_per_hz: 6.0 };
        let mut decisions = Vec::new();
        for _ in 0..40 {
            let obs = costly.observe(gov.hz(), 0.0);
            decisions.push(gov.observe(obs));
        }
        assert!(decisions.contains(&Decision::Pause));
        let probes = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Resume(_)))
            .count();
        assert!((2..=4).contains(&probes), "back-off grows: {decisions:?}");
        assert!(gov.paused() || gov.hz() == 1);
        // The cost drops: the next probe succeeds and sampling continues.
        let cheap = Sim { cost_per_hz: 0.5 };
        for _ in 0..200 {
            let obs = cheap.observe(gov.hz(), 0.0);
            gov.observe(obs);
        }
        assert!(!gov.paused());
        assert!(gov.hz() >= 1);
        assert!(gov.hz() as f64 * 0.5 <= 5.0);
    }

    /// Test that an idle interval (no target CPU) changes nothing.
    #[test]
    fn idle_interval_keeps_rate() {
        let mut gov = Governor::new(config(999));
        let d = gov.observe(Observation {
            hz: 999,
            overhead_pct: 0.0,
            target_cpu_ns: 0,
        });
        assert_eq!(d, Decision::Keep);
        assert_eq!(gov.hz(), 999);
    }

    /// Test that a smaller share of the budget (another session holds the
    /// rest) lowers the rate accordingly.
    #[test]
    fn shared_budget() {
        let mut gov = Governor::new(config(20_000));
        let sim = Sim { cost_per_hz: 0.003 };
        run(&mut gov, &sim, 10, |_| 0.0);
        gov.set_budget(2.0);
        let trace = run(&mut gov, &sim, 10, |_| 0.0);
        assert!(trace[1..].iter().all(|&(_, pct)| pct <= 2.0), "{trace:?}");
    }
}
