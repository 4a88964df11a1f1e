//! Latency probes of watched targets (`[[target.probe]]`): attached to
//! every process of a target when it is found (so again after a restart),
//! detached when it goes. Each interval turns the kernel histogram's
//! difference since the last read into the target's metrics (the first
//! probe's: `latency_p50_ms` … `over_budget_pct`) and exports every probe's
//! histogram. A probe whose calls cost more than the overhead budget for
//! [`OVER_BUDGET_TICKS`] intervals in a row is taken off, with a warning
//! record (as `flamewatch latency` does).

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
/// Intervals over the budget in a row before a probe is taken off.
const OVER_BUDGET_TICKS: u32 = 3;

/// A probe attached to one process of a target.
pub(super) struct Attached {
    /// The function as configured.
    function: String,
    /// Whether it has a budget (then `over_budget_pct` and slow samples).
    pub(super) budget: bool,
    id: ProbeId,
    /// The histogram at the previous interval (cumulative).
    last: Latency,
    at: Instant,
    /// The process's CPU time then, ns.
    cpu0: u64,
    /// Intervals over the overhead budget in a row.
    over: u32,
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
        budget: budget_ns > 0,
        id,
        last: engine.probe_latency(id).unwrap_or_default(),
        at: Instant::now(),
        cpu0: cpu_ns(pid),
        over: 0,
    })
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
            if let Some(e) = self.engine.as_mut() {
                e.remove_probe(p.id);
            }
            self.exporter
                .remove_function(&function_labels(&labels, &p.function));
        }
    }

    /// One interval of slot `i`'s probes: the first probe's metrics (none
    /// without probes); every probe's histogram is exported, and those over
    /// the overhead budget for long enough are taken off.
    pub(super) fn probe_values(&mut self, i: usize, t: &Target) -> Vec<(Metric, f64)> {
        let labels = target_labels(&self.watched[i], t);
        let budget_pct = self.config.max_overhead_pct;
        let Some(engine) = self.engine.as_mut() else {
            return Vec::new();
        };
        let cost_ns = engine.probe_cost_ns().unwrap_or(0.0);
        let (cpu, mut values, mut off) = (cpu_ns(t.pid), Vec::new(), Vec::new());
        for (k, p) in self.watched[i].probes.iter_mut().enumerate() {
            let Some(now) = engine.probe_latency(p.id) else {
                continue;
            };
            let d = now.since(&p.last);
            let pct = cost_pct(d.count, cost_ns, cpu.saturating_sub(p.cpu0));
            if k == 0 {
                values = interval_values(&d, p.at.elapsed().as_secs_f64(), p.budget);
            }
            self.exporter
                .set_function(&function_labels(&labels, &p.function), &now);
            (p.last, p.at, p.cpu0) = (now, Instant::now(), cpu);
            // A 100 % budget takes any cost.
            let over = d.count >= MIN_CALLS && pct > budget_pct && budget_pct < 100.0;
            p.over = if over { p.over + 1 } else { 0 };
            if p.over >= OVER_BUDGET_TICKS {
                off.push((k, pct));
            }
        }
        for (k, pct) in off.into_iter().rev() {
            self.take_off(i, t, k, pct);
        }
        values
    }

    /// Takes probe `k` of slot `i` off: it cost `pct` % of the target's CPU.
    fn take_off(&mut self, i: usize, t: &Target, k: usize, pct: f64) {
        let p = self.watched[i].probes.remove(k);
        if let Some(e) = self.engine.as_mut() {
            e.remove_probe(p.id);
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

    fn get_none(v: &[(Metric, f64)]) -> Option<f64> {
        v.iter()
            .find(|(m, _)| *m == Metric::OverBudgetPct)
            .map(|(_, v)| *v)
    }
}
