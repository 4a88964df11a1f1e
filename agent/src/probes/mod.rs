//! Function latency probes, owned by the engine: a uprobe at a function's
//! entry and a uretprobe at its return, attached for one process only
//! (the kernel inserts the breakpoint into that process's memory alone, so
//! other processes running the same library are untouched). The kernel
//! keeps a log-linear histogram per probe (see `common/src/probe.rs`);
//! this module attaches, reads and detaches them, and turns histograms
//! into quantiles. `latency` and `watch` (`[[target.probe]]`, see
//! `daemon/probes.rs`) use it through the same engine calls.

pub mod calibrate;
pub mod resolve;

use std::{collections::HashMap, num::NonZeroU32, path::PathBuf};

use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use flamewatch_common::probe::{bucket_low, LatencyHist, ProbeConfig, HIST_BUCKETS, MAX_PROBES};
use serde::Serialize;

pub use resolve::{resolve, Location};

use crate::bpf::BpfError;

/// Program at function entry.
pub const ENTRY_PROG: &str = "flamewatch_probe_entry";
/// Program at function return.
pub const RETURN_PROG: &str = "flamewatch_probe_return";
/// The slot of the agent's own calibration probe.
pub const CALIBRATION_SLOT: u32 = MAX_PROBES - 1;

/// Errors of probing.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The function is not written `SYMBOL` or `LIB:SYMBOL`.
    #[error("function `{0}`: expected SYMBOL or LIB:SYMBOL (e.g. tick, libc:malloc)")]
    BadSpec(String),
    /// The target's /proc entries cannot be read.
    #[error("cannot read /proc/{pid}: {source}")]
    Proc {
        /// Process.
        pid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No mapped library of that name.
    #[error("process {pid} maps no library named `{lib}` (see /proc/{pid}/maps)")]
    UnknownLibrary {
        /// The name asked for.
        lib: String,
        /// Process.
        pid: u32,
    },
    /// The binary has no such function.
    #[error("no function `{symbol}` in {}", binary.display())]
    UnknownSymbol {
        /// The symbol asked for.
        symbol: String,
        /// Where it was looked for.
        binary: PathBuf,
    },
    /// The binary cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Every probe slot is taken.
    #[error("too many probes at once (at most {})", MAX_PROBES - 1)]
    TooMany,
    /// The calibration probe did not see the calls it timed.
    #[error("the calibration probe did not fire")]
    Calibration,
    /// Loading, attaching or a map failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// Handle of an attached probe (its slot).
pub type ProbeId = u32;

/// One attached probe.
struct Attached {
    links: Vec<(&'static str, UProbeLinkId)>,
}

/// The probes of an engine.
pub struct Probes {
    config: Array<MapData, ProbeConfig>,
    latency: PerCpuArray<MapData, LatencyHist>,
    attached: HashMap<ProbeId, Attached>,
    /// The last attachment's generation (`ProbeConfig::active`).
    generation: u32,
}

impl Probes {
    /// Loads the two programs and takes the probe maps out of `ebpf`.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        for name in [ENTRY_PROG, RETURN_PROG] {
            program(ebpf, name)?
                .load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        Ok(Self {
            config: take(ebpf, "PROBE_CONFIG")?,
            latency: take(ebpf, "LATENCY")?,
            attached: HashMap::new(),
            generation: 0,
        })
    }

    /// Attaches a probe on `location` for process `pid` (calls longer than
    /// `budget_ns` are over budget; 0: no budget) in a free slot.
    pub fn add(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        location: &Location,
        budget_ns: u64,
    ) -> Result<ProbeId, ProbeError> {
        let slot = (0..CALIBRATION_SLOT)
            .find(|s| !self.attached.contains_key(s))
            .ok_or(ProbeError::TooMany)?;
        self.add_in(ebpf, slot, pid, location, budget_ns)?;
        Ok(slot)
    }

    /// [`Probes::add`] in a given slot (its counters are cleared first).
    pub fn add_in(
        &mut self,
        ebpf: &mut Ebpf,
        slot: ProbeId,
        pid: u32,
        location: &Location,
        budget_ns: u64,
    ) -> Result<(), ProbeError> {
        let zero = vec![
            LatencyHist::default();
            aya::util::nr_cpus()
                .map_err(|(_, e)| map_io("LATENCY", aya::maps::MapError::IoError(e)))?
        ];
        let zero = aya::maps::PerCpuValues::try_from(zero).map_err(|e| map_io("LATENCY", e))?;
        self.latency.set(slot, zero, 0).map_err(map_err("LATENCY"))?;
        // Never 0 (a free slot).
        self.generation = self.generation.wrapping_add(1).max(1);
        let config = ProbeConfig {
            budget_ns,
            tgid: pid,
            active: self.generation,
        };
        self.config
            .set(slot, config, 0)
            .map_err(map_err("PROBE_CONFIG"))?;
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(ProbeError::TooMany)?);
        let mut links = Vec::new();
        // The return probe first: a call entered while only the entry
        // probe was attached would never be seen to return, and a few of
        // those (10 at 100 000 calls/s in the time an attachment takes)
        // fill the thread's call stack so that no later call is timed. A
        // return seen without its entry is only counted `unmatched`.
        for name in [RETURN_PROG, ENTRY_PROG] {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(location.offset),
                cookie: Some(u64::from(slot)),
            };
            match program(ebpf, name)?.attach(point, &location.open_path, scope) {
                Ok(link) => links.push((name, link)),
                Err(source) => {
                    detach(ebpf, links);
                    let _ = self.config.set(slot, ProbeConfig::default(), 0);
                    return Err(BpfError::Program { name, source }.into());
                }
            }
        }
        self.attached.insert(slot, Attached { links });
        Ok(())
    }

    /// Detaches probe `id` (its histogram stays readable until reused).
    pub fn remove(&mut self, ebpf: &mut Ebpf, id: ProbeId) {
        if let Some(a) = self.attached.remove(&id) {
            detach(ebpf, a.links);
        }
        let _ = self.config.set(id, ProbeConfig::default(), 0);
    }

    /// Detaches every probe.
    pub fn remove_all(&mut self, ebpf: &mut Ebpf) {
        let ids: Vec<ProbeId> = self.attached.keys().copied().collect();
        for id in ids {
            self.remove(ebpf, id);
        }
    }

    /// The histogram of probe `id`, summed over the CPUs.
    pub fn read(&self, id: ProbeId) -> Result<Latency, ProbeError> {
        let values = self.latency.get(&id, 0).map_err(map_err("LATENCY"))?;
        let mut out = Latency::default();
        for h in values.iter() {
            out.add(h);
        }
        Ok(out)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    let prog = ebpf.program_mut(name).ok_or(BpfError::MissingMap(name))?;
    Ok(prog
        .try_into()
        .map_err(|source| BpfError::Program { name, source })?)
}

/// Detaches in the reverse order of attachment: the entry probe first.
fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (name, link) in links.into_iter().rev() {
        if let Ok(p) = program(ebpf, name) {
            let _ = p.detach(link);
        }
    }
}

/// Takes map `name` out of `ebpf` (see [`crate::bpf::take_map`]).
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, ProbeError> {
    Ok(crate::bpf::take_map(ebpf, name)?)
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |source| BpfError::Map { name, source }.into()
}

fn map_io(name: &'static str, e: impl Into<aya::maps::MapError>) -> ProbeError {
    BpfError::Map {
        name,
        source: e.into(),
    }
    .into()
}

/// A probe's histogram and counters (summed over CPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    /// Calls timed.
    pub count: u64,
    /// Their total duration, ns.
    pub sum_ns: u64,
    /// Longest, ns.
    pub max_ns: u64,
    /// Calls over the budget.
    pub over_budget: u64,
    /// Returns without a recorded entry.
    pub unmatched: u64,
    /// Calls nested too deep to time.
    pub too_deep: u64,
    /// Entries lost (in-flight map full).
    pub lost: u64,
    /// Calls per bucket (empty until something is added).
    pub buckets: Vec<u64>,
}

/// One bucket of a histogram, for the JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Lowest duration in it, ns.
    pub low_ns: u64,
    /// Where it ends (exclusive), ns.
    pub high_ns: u64,
    /// Calls.
    pub count: u64,
}

impl Latency {
    fn add(&mut self, h: &LatencyHist) {
        self.count += h.count;
        self.sum_ns += h.sum_ns;
        self.max_ns = self.max_ns.max(h.max_ns);
        self.over_budget += h.over_budget;
        self.unmatched += h.unmatched;
        self.too_deep += h.too_deep;
        self.lost += h.lost;
        if self.buckets.is_empty() {
            self.buckets = vec![0; HIST_BUCKETS];
        }
        for (b, n) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *b += n;
        }
    }

    /// Adds a duration (tests and userspace aggregation).
    pub fn record(&mut self, ns: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; HIST_BUCKETS];
        }
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        self.buckets[flamewatch_common::probe::bucket_of(ns)] += 1;
    }

    /// This histogram and `other`'s together (two attachments of a probe
    /// taken on and off, each counted from zero).
    pub fn plus(&self, other: &Latency) -> Latency {
        let n = self.buckets.len().max(other.buckets.len());
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        Latency {
            count: self.count + other.count,
            sum_ns: self.sum_ns + other.sum_ns,
            max_ns: self.max_ns.max(other.max_ns),
            over_budget: self.over_budget + other.over_budget,
            unmatched: self.unmatched + other.unmatched,
            too_deep: self.too_deep + other.too_deep,
            lost: self.lost + other.lost,
            buckets: (0..n)
                .map(|i| at(&self.buckets, i) + at(&other.buckets, i))
                .collect(),
        }
    }

    /// The calls since `earlier` (a previous read of the same probe): the
    /// counters' and buckets' differences. The maximum is cumulative in the
    /// kernel, so the interval's is the new maximum when it rose, else the
    /// top of the highest bucket that gained calls.
    pub fn since(&self, earlier: &Latency) -> Latency {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, &n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        let top = buckets.iter().rposition(|&n| n > 0);
        let max_ns = match top {
            None => 0,
            Some(_) if self.max_ns > earlier.max_ns => self.max_ns,
            Some(i) => bucket_high(i).saturating_sub(1).min(self.max_ns),
        };
        Latency {
            count: self.count.saturating_sub(earlier.count),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            max_ns,
            over_budget: self.over_budget.saturating_sub(earlier.over_budget),
            unmatched: self.unmatched.saturating_sub(earlier.unmatched),
            too_deep: self.too_deep.saturating_sub(earlier.too_deep),
            lost: self.lost.saturating_sub(earlier.lost),
            buckets,
        }
    }

    /// Mean duration, ns.
    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    /// The `q` quantile (0..=1), ns: interpolated inside its bucket,
    /// never past the maximum seen. 0 without calls.
    pub fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
        let mut before = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (before + n) as f64 >= rank {
                let (low, high) = (bucket_low(i), bucket_high(i));
                let within = ((rank - before as f64 - 0.5) / n as f64).clamp(0.0, 1.0);
                let v = low as f64 + within * (high - low) as f64;
                return (v.round() as u64).min(self.max_ns.max(low));
            }
            before += n;
        }
        self.max_ns
    }

    /// The non-empty buckets.
    pub fn nonempty(&self) -> Vec<Bucket> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| Bucket {
                low_ns: bucket_low(i),
                high_ns: bucket_high(i),
                count: n,
            })
            .collect()
    }

    /// Calls over the budget, percent of all.
    pub fn over_budget_pct(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            100.0 * self.over_budget as f64 / self.count as f64
        }
    }
}

/// Where bucket `i` ends (exclusive).
pub fn bucket_high(i: usize) -> u64 {
    if i + 1 >= HIST_BUCKETS {
        u64::MAX
    } else {
        bucket_low(i + 1)
    }
}

#[cfg(test)]
mod tests {
    use flamewatch_common::probe::bucket_of;

    use super::*;

    /// Test that every value falls in the bucket whose edges hold it, and
    /// buckets are at most 1/16 of their lower edge wide.
    #[test]
    fn buckets_hold_their_values() {
        let mut v = 0u64;
        while v < u64::MAX / 3 {
            let i = bucket_of(v);
            assert!(bucket_low(i) <= v && v < bucket_high(i), "{v} in {i}");
            if v >= 16 {
                assert!((bucket_high(i) - bucket_low(i)) * 16 <= bucket_low(i), "{i}");
            }
            // v + v/8 (v * 9 / 8 would overflow and wrap near the top).
            v = v + v / 8 + 1;
        }
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
        for i in 1..HIST_BUCKETS {
            assert!(bucket_low(i) > bucket_low(i - 1), "{i}");
        }
    }

    /// Test that the difference of two reads holds only the calls between
    /// them, with the interval's own maximum.
    #[test]
    fn since_is_the_interval() {
        let mut before = Latency::default();
        for _ in 0..100 {
            before.record(2_000_000);
        }
        before.record(50_000_000);
        let mut after = before.clone();
        for _ in 0..10 {
            after.record(30_000_000);
        }
        let d = after.since(&before);
        assert_eq!((d.count, d.sum_ns), (10, 300_000_000));
        let q = d.quantile(0.5) as f64;
        assert!((q - 30e6).abs() / 30e6 < 0.05, "{q}");
        assert!(d.max_ns >= 30_000_000 && d.max_ns < 32_000_000, "{}", d.max_ns);
        assert_eq!(after.since(&after).count, 0);
        assert_eq!(after.since(&after).max_ns, 0);
        assert_eq!(after.since(&Latency::default()).max_ns, 50_000_000);
    }

    /// Test that quantiles of a known mix are within 5 % of the exact ones.
    #[test]
    fn quantiles_within_five_percent() {
        let mut h = Latency::default();
        let mut exact = Vec::new();
        for k in 0..10_000u64 {
            // 90 % around 2 ms, 10 % around 30 ms, with spread.
            let ns = if k % 10 == 9 {
                30_000_000 + k * 37
            } else {
                2_000_000 + (k * 7919) % 200_000
            };
            h.record(ns);
            exact.push(ns);
        }
        exact.sort_unstable();
        for q in [0.5, 0.9, 0.99, 0.999] {
            let want = exact[((q * exact.len() as f64).ceil() as usize).max(1) - 1] as f64;
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want <= 0.05, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), h.max_ns);
        assert_eq!(Latency::default().quantile(0.5), 0);
    }
}
