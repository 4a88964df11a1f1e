//! Latency probes of watched targets (`[[target.probe]]`): attached to
//! every process of a target when it is found (so again after a restart),
//! detached when it goes. Each interval turns the kernel histogram's
//! difference since the last read into the target's metrics (the first
//! probe's: `latency_p50_ms` … `over_budget_pct`) and exports every probe's
//! histogram. A probe whose calls cost more than the overhead budget for
//! [`OVER_BUDGET_TICKS`] intervals in a row is duty-cycled: attached one
//! interval in N, N chosen from its measured cost to land at 80 % of the
//! budget on average (re-measured at each attached interval), its metrics
//! held from the last attached interval between, with a warning record
//! saying so. Past [`MAX_EVERY`] it is taken off (as `flamewatch latency`
//! refuses it).

use std::time::Instant;

use tracing::{info, warn};

use super::{
    follow::{alert_target, event_rule, target_labels},
    Daemon,
};
use crate::{
    alerts::{AlertRecord, Status},
    config::latency::ProbeSpec,
    detect::Finding,
    engine::{Engine, EngineError},
    export::{FunctionLabels, TargetLabels},
    metrics::Metric,
    probes::{Latency, ProbeId},
    session::latency::cpu_ns,
    target::Target,
};

/// Rule name of the record saying a probe was taken off for its cost.
pub const PROBE_REMOVED: &str = "probe_removed";
/// Fewer calls than this in an interval say nothing about the cost.
const MIN_CALLS: u64 = 20;
/// Intervals over the budget in a row before a probe is duty-cycled.
const OVER_BUDGET_TICKS: u32 = 3;
/// Longest duty cycle (attached one interval in this many); a probe that
/// needs more is taken off: its metrics would be a minute old.
pub const MAX_EVERY: u32 = 60;
/// Rule name of the record saying a probe is attached only part of the time.
pub const PROBE_DUTY_CYCLED: &str = "probe_duty_cycled";

/// A probe of one process of a target.
pub(super) struct Attached {
    /// The function as configured.
    function: String,
    spec: ProbeSpec,
    /// Whether it has a budget (then `over_budget_pct` and slow samples).
    pub(super) budget: bool,
    /// None while detached by its duty cycle.
    id: Option<ProbeId>,
    /// The histogram at the previous interval (cumulative).
    last: Latency,
    at: Instant,
    /// The process's CPU time then, ns.
    cpu0: u64,
    /// Intervals over the overhead budget in a row.
    over: u32,
    /// Attached one interval in `every` (1: always).
    every: u32,
    /// Intervals detached so far in this cycle.
    off_for: u32,
    /// Calls of earlier attachments (exported with the current one's).
    base: Latency,
    /// The metrics of the last attached interval, held while detached.
    held: Vec<(Metric, f64)>,
}

/// Attaches `spec` to process `pid`.
fn attach(engine: &mut Engine, pid: u32, spec: &ProbeSpec) -> Result<Attached, EngineError> {
    // Calibrated once; later calls read the cached cost.
    engine.probe_cost_ns()?;
    let location = crate::probes::resolve(pid, &spec.function)?;
    let budget_ns = spec.budget.map_or(0, |b| b.as_nanos() as u64);
    let id = engine.add_probe(pid, &location, budget_ns)?;
    Ok(Attached {
        function: spec.function.clone(),
        spec: spec.clone(),
        budget: budget_ns > 0,
        id: Some(id),
        last: engine.probe_latency(id).unwrap_or_default(),
        at: Instant::now(),
        cpu0: cpu_ns(pid),
        over: 0,
        every: 1,
        off_for: 0,
        base: Latency::default(),
        held: Vec::new(),
    })
}

/// The duty cycle that brings a probe costing `pct` % (attached) to 80 %
/// of `budget` % on average.
fn duty_every(pct: f64, budget: f64) -> u32 {
    (pct / (0.8 * budget)).ceil().clamp(1.0, f64::from(u32::MAX)) as u32
}

fn function_labels(t: &TargetLabels, function: &str) -> FunctionLabels {
    FunctionLabels {
        target: t.target.clone(),
        pid: t.pid.clone(),
        function: function.to_owned(),
    }
}

/// Probing cost, percent of `cpu_ns` of the target's CPU time.
fn cost_pct(calls: u64, cost_ns: f64, cpu_ns: u64) -> f64 {
    if cpu_ns == 0 {
        return 0.0;
    }
    100.0 * calls as f64 * cost_ns / cpu_ns as f64
}

/// The metrics of one interval's calls `d` over `secs` seconds.
pub(super) fn interval_values(d: &Latency, secs: f64, budget: bool) -> Vec<(Metric, f64)> {
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut v = vec![
        (Metric::LatencyP50Ms, ms(d.quantile(0.5))),
        (Metric::LatencyP99Ms, ms(d.quantile(0.99))),
        (Metric::LatencyMaxMs, ms(d.max_ns)),
        (Metric::CallsPerS, d.count as f64 / secs.max(1e-3)),
    ];
    if budget {
        v.push((Metric::OverBudgetPct, d.over_budget_pct()));
    }
    v
}

/// Attaches probe `p` of process `pid` again for one interval of its duty
/// cycle (its function resolved again: the process may have loaded or
/// unloaded the library meanwhile).
fn reattach(engine: &mut Engine, pid: u32, p: &mut Attached) {
    match attach(engine, pid, &p.spec) {
        Ok(a) => {
            tracing::debug!(
                pid,
                "probe on {} attached again for an interval of its cycle",
                p.function
            );
            (p.id, p.last, p.at, p.cpu0) = (a.id, a.last, a.at, a.cpu0);
        }
        Err(e) => warn!(pid, "cannot probe {} again: {e}", p.function),
    }
}

impl Daemon {
    /// Attaches target slot `i`'s probes to its (new) process `t`; a
    /// function it does not have is said once per process.
    pub(super) fn attach_probes(&mut self, i: usize, t: &Target) {
        let specs = self.watched[i].spec.probes.clone();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        for spec in specs {
            match attach(engine, t.pid, &spec) {
                Ok(a) => {
                    info!(pid = t.pid, "probing {} of {}", spec.function, t.comm);
                    self.watched[i].probes.push(a);
                }
                Err(e) => warn!(pid = t.pid, "cannot probe {} of {}: {e}", spec.function, t.comm),
            }
        }
    }

    /// Detaches slot `i`'s probes (its process `t` went away).
    pub(super) fn detach_probes(&mut self, i: usize, t: &Target) {
        let labels = target_labels(&self.watched[i], t);
        for p in std::mem::take(&mut self.watched[i].probes) {
            if let (Some(e), Some(id)) = (self.engine.as_mut(), p.id) {
                e.remove_probe(id);
            }
            self.exporter
                .remove_function(&function_labels(&labels, &p.function));
        }
    }

    /// One interval of slot `i`'s probes: the first probe's metrics (none
    /// without probes; held from its last attached interval while its duty
    /// cycle has it detached); every probe's histogram is exported, and
    /// those over the overhead budget for long enough are duty-cycled.
    pub(super) fn probe_values(&mut self, i: usize, t: &Target) -> Vec<(Metric, f64)> {
        let labels = target_labels(&self.watched[i], t);
        let budget_pct = self.config.max_overhead_pct;
        let Some(engine) = self.engine.as_mut() else {
            return Vec::new();
        };
        let cost_ns = engine.probe_cost_ns().unwrap_or(0.0);
        let (cpu, mut values, mut cycled) = (cpu_ns(t.pid), Vec::new(), Vec::new());
        for (k, p) in self.watched[i].probes.iter_mut().enumerate() {
            let Some(id) = p.id else {
                p.off_for += 1;
                if p.off_for + 1 >= p.every {
                    reattach(engine, t.pid, p);
                }
                if k == 0 {
                    values = p.held.clone();
                }
                continue;
            };
            let Some(now) = engine.probe_latency(id) else {
                continue;
            };
            let d = now.since(&p.last);
            let pct = cost_pct(d.count, cost_ns, cpu.saturating_sub(p.cpu0));
            p.held = interval_values(&d, p.at.elapsed().as_secs_f64(), p.budget);
            if k == 0 {
                values = p.held.clone();
            }
            self.exporter
                .set_function(&function_labels(&labels, &p.function), &p.base.plus(&now));
            (p.last, p.at, p.cpu0) = (now, Instant::now(), cpu);
            // A 100 % budget takes any cost.
            let over = d.count >= MIN_CALLS && pct > budget_pct && budget_pct < 100.0;
            p.over = if over { p.over + 1 } else { 0 };
            if p.every > 1 || p.over >= OVER_BUDGET_TICKS {
                // Re-judged at each attached interval of a cycle: the load
                // (and so the cost) may have changed.
                let every = if d.count >= MIN_CALLS {
                    duty_every(pct, budget_pct)
                } else {
                    p.every
                };
                if every > 1 {
                    engine.remove_probe(id);
                    p.base = p.base.plus(&p.last);
                    (p.id, p.off_for, p.over, p.last) = (None, 0, 0, Latency::default());
                }
                // Said when it starts or stops cycling, not at each new N.
                if (every > 1) != (p.every > 1) || every > MAX_EVERY {
                    cycled.push((k, pct, every));
                }
                p.every = every;
            }
        }
        for &(k, pct, every) in cycled.iter().rev() {
            self.cycled(i, t, k, pct, every);
        }
        values
    }

    /// Says that probe `k` of slot `i` is now attached one interval in
    /// `every` (it cost `pct` % attached), or takes it off past
    /// [`MAX_EVERY`].
    fn cycled(&mut self, i: usize, t: &Target, k: usize, pct: f64, every: u32) {
        if every > MAX_EVERY {
            return self.take_off(i, t, k, pct);
        }
        let function = self.watched[i].probes[k].function.clone();
        let budget = self.config.max_overhead_pct;
        let message = if every == 1 {
            format!(
                "probe on {function} attached all the time again: it costs {pct:.1} % of the target's CPU"
            )
        } else {
            format!(
                "probe on {function} costs {pct:.1} % of the target's CPU attached, over the {budget:.1} % budget: \
                 attached one interval in {every} (about {:.1} %); its metrics are held between",
                pct / f64::from(every)
            )
        };
        warn!(pid = t.pid, "{message}");
        let f = Finding {
            metric: "probe_cost_pct".into(),
            value: pct,
            threshold: budget,
            message,
        };
        self.sinks.emit(&AlertRecord::new(
            Status::Firing,
            alert_target(t),
            &event_rule(PROBE_DUTY_CYCLED),
            &f,
        ));
    }

    /// Takes probe `k` of slot `i` off: it cost `pct` % of the target's CPU.
    fn take_off(&mut self, i: usize, t: &Target, k: usize, pct: f64) {
        let p = self.watched[i].probes.remove(k);
        if let (Some(e), Some(id)) = (self.engine.as_mut(), p.id) {
            e.remove_probe(id);
        }
        let labels = target_labels(&self.watched[i], t);
        self.exporter
            .remove_function(&function_labels(&labels, &p.function));
        let budget = self.config.max_overhead_pct;
        let f = Finding {
            metric: "probe_cost_pct".into(),
            value: pct,
            threshold: budget,
            message: format!(
                "probe on {} taken off: it cost {pct:.1} % of the target's CPU, over the {budget:.1} % budget",
                p.function
            ),
        };
        warn!(pid = t.pid, "{}", f.message);
        self.sinks.emit(&AlertRecord::new(
            Status::Firing,
            alert_target(t),
            &event_rule(PROBE_REMOVED),
            &f,
        ));
    }

    /// Whether slot `i` has a probe with a budget (its samples past the
    /// budget make slow-call profiles).
    pub(super) fn has_budget_probe(&self, i: usize) -> bool {
        self.watched[i].probes.iter().any(|p| p.budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that an interval's values are the first probe's quantiles,
    /// rate and over-budget share, the latter only with a budget.
    #[test]
    fn interval_metrics() {
        let mut d = Latency::default();
        for k in 0..100u64 {
            d.record(if k % 10 == 9 { 30_000_000 } else { 2_000_000 });
        }
        d.over_budget = 10;
        let v = interval_values(&d, 2.0, true);
        let get = |m: Metric| v.iter().find(|(x, _)| *x == m).map(|(_, v)| *v);
        assert!((get(Metric::LatencyP50Ms).unwrap() - 2.0).abs() < 0.1, "{v:?}");
        assert!((get(Metric::LatencyP99Ms).unwrap() - 30.0).abs() < 1.5, "{v:?}");
        assert_eq!(get(Metric::LatencyMaxMs), Some(30.0));
        assert_eq!(get(Metric::CallsPerS), Some(50.0));
        assert_eq!(get(Metric::OverBudgetPct), Some(10.0));
        assert_eq!(get_none(&interval_values(&d, 1.0, false)), None);
        assert!((cost_pct(1000, 2000.0, 1_000_000_000) - 0.2).abs() < 1e-9);
    }

    /// Test that the duty cycle lands a probe's average cost at 80 % of
    /// the budget or under: 28.7 % against 5 % is one interval in 8.
    #[test]
    fn duty_cycle_from_cost() {
        assert_eq!(duty_every(28.7, 5.0), 8);
        assert!(28.7 / f64::from(duty_every(28.7, 5.0)) <= 4.0);
        assert_eq!(duty_every(3.0, 5.0), 1);
        assert_eq!(duty_every(4.1, 5.0), 2);
    }

    /// Test that two attachments' histograms add up.
    #[test]
    fn attachments_add_up() {
        let (mut a, mut b) = (Latency::default(), Latency::default());
        a.record(1_000);
        b.record(5_000_000);
        b.record(2_000);
        let both = a.plus(&b);
        assert_eq!((both.count, both.sum_ns, both.max_ns), (3, 5_003_000, 5_000_000));
        assert_eq!(both.buckets.iter().sum::<u64>(), 3);
    }

    fn get_none(v: &[(Metric, f64)]) -> Option<f64> {
        v.iter()
            .find(|(m, _)| *m == Metric::OverBudgetPct)
            .map(|(_, v)| *v)
    }
}
