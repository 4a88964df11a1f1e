//! Calibrating what an entry+return probe pair costs a call.
//!
//! BPF statistics see our two programs, not the breakpoint trap, the
//! uprobe machinery and the return trampoline around them, which cost
//! several times more. So the agent probes a function of its own
//! ([`flamewatch_probe_calibration`]) and times blocks of calls,
//! alternately without and with the probes attached; the median slowdown
//! per call is the cost. Cached per boot like the sampling calibration.

use std::path::{Path, PathBuf};

use aya::Ebpf;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{Location, Probes, CALIBRATION_SLOT};
use crate::governor::cost::monotonic_ns;

/// Used when calibration fails: about what was measured on these VMs.
pub const DEFAULT_PER_CALL_NS: f64 = 5_000.0;
/// Calls per timed block, at most (a probed call costs ~5 µs here).
const CALLS: u64 = 5_000;
/// Calls of the first, sizing block.
const MIN_CALLS: u64 = 100;
/// What one probed block may take: where a probed call is slow (580 µs
/// in an emulated guest) full blocks would hold the engine for 30 s.
const BLOCK_NS: u64 = 40_000_000;
/// Off/on pairs of blocks.
const ROUNDS: usize = 7;

/// The function the calibration probes: small, never inlined, exported so
/// that it is in the symbol table.
#[no_mangle]
#[inline(never)]
pub extern "C" fn flamewatch_probe_calibration(x: u64) -> u64 {
    std::hint::black_box(x)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(7)
}

fn calls(n: u64) -> u64 {
    let mut x = 1;
    let t = monotonic_ns();
    for _ in 0..n {
        x = flamewatch_probe_calibration(x);
    }
    std::hint::black_box(x);
    monotonic_ns() - t
}

#[derive(Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    kernel: String,
    per_call_ns: f64,
}

/// Cache file of the probe calibration.
pub fn cache_path() -> PathBuf {
    PathBuf::from("/run/flamewatch/probe-calibration.json")
}

fn ids() -> (String, String) {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_owned();
    (
        read("/proc/sys/kernel/random/boot_id"),
        read("/proc/sys/kernel/osrelease"),
    )
}

/// The cached per-call cost of this boot (ns), or a fresh measurement.
pub fn per_call_ns(probes: &mut Probes, ebpf: &mut Ebpf) -> f64 {
    let (boot_id, kernel) = ids();
    if let Some(c) = load(&cache_path(), &boot_id, &kernel) {
        debug!("probe calibration from cache: {c:.0} ns per call");
        return c;
    }
    let per_call_ns = match measure(probes, ebpf) {
        Ok(ns) => ns,
        Err(e) => {
            warn!("probe calibration failed ({e}); assuming {DEFAULT_PER_CALL_NS:.0} ns per call");
            return DEFAULT_PER_CALL_NS;
        }
    };
    info!(
        "calibrated probe cost: {:.2} µs per call (entry + return)",
        per_call_ns / 1e3
    );
    let cached = Cached {
        boot_id,
        kernel,
        per_call_ns,
    };
    let path = cache_path();
    let saved = path
        .parent()
        .map_or(Ok(()), |d| {
            crate::fsafe::create_dir(d)
                .map(|_| ())
                .map_err(std::io::Error::other)
        })
        .and_then(|_| serde_json::to_vec(&cached).map_err(std::io::Error::other))
        .and_then(|b| crate::render::write_file(&path, &b).map_err(std::io::Error::other));
    if let Err(e) = saved {
        debug!("cannot cache the probe calibration: {e}");
    }
    per_call_ns
}

fn load(path: &Path, boot_id: &str, kernel: &str) -> Option<f64> {
    let c: Cached = serde_json::from_str(&crate::fsafe::read_nofollow(path).ok()?).ok()?;
    (c.boot_id == boot_id && c.kernel == kernel && c.per_call_ns.is_finite()).then_some(c.per_call_ns)
}

/// Times blocks of calls without and with the probes on the agent itself.
pub fn measure(probes: &mut Probes, ebpf: &mut Ebpf) -> Result<f64, super::ProbeError> {
    let me = std::process::id();
    let exe =
        std::fs::read_link("/proc/self/exe").map_err(|source| super::ProbeError::Proc { pid: me, source })?;
    let location = Location {
        spec: "flamewatch_probe_calibration".into(),
        symbol: "flamewatch_probe_calibration".into(),
        offset: super::resolve::symbol_offset(&exe, "flamewatch_probe_calibration")?,
        open_path: exe.clone(),
        binary: exe,
    };
    calls(CALLS); // warm up
    let mut round = |n: u64| -> Result<f64, super::ProbeError> {
        let off = calls(n);
        probes.add_in(ebpf, CALIBRATION_SLOT, me, &location, 0)?;
        let on = calls(n);
        let counted = probes.read(CALIBRATION_SLOT).map(|l| l.count).unwrap_or(0);
        probes.remove(ebpf, CALIBRATION_SLOT);
        if counted < n {
            return Err(super::ProbeError::Calibration);
        }
        Ok(on.saturating_sub(off) as f64 / n as f64)
    };
    let n = block_calls(round(MIN_CALLS)?);
    let mut diffs = (0..ROUNDS).map(|_| round(n)).collect::<Result<Vec<_>, _>>()?;
    diffs.sort_by(f64::total_cmp);
    Ok(diffs[diffs.len() / 2])
}

/// Calls per block for a probed call costing about `per_call_ns`: as many
/// as fit in [`BLOCK_NS`], between [`MIN_CALLS`] and [`CALLS`].
fn block_calls(per_call_ns: f64) -> u64 {
    ((BLOCK_NS as f64 / per_call_ns.max(1.0)) as u64).clamp(MIN_CALLS, CALLS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that a block holds every call where probes are cheap and few
    /// where they are slow, so that calibrating never stalls the engine.
    #[test]
    fn block_calls_bounded_by_time() {
        assert_eq!(block_calls(5_000.0), CALLS);
        assert_eq!(block_calls(580_000.0), MIN_CALLS);
        assert_eq!(block_calls(0.0), CALLS);
        let n = block_calls(20_000.0);
        assert_eq!(n, 2_000);
        assert!(n as f64 * 20_000.0 <= BLOCK_NS as f64);
    }
}
