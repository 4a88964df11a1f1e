//! Function latency probes (uprobe at entry, uretprobe at return): the ABI
//! of their maps, and the log-linear histogram both sides index the same way.

/// Probes at once, all targets together (the bpf cookie of an attachment
/// is its slot). The last slot is the agent's own calibration probe.
pub const MAX_PROBES: u32 = 16;

/// Nested (or recursive) calls of one probed function on one thread whose
/// start times are kept; deeper calls are counted (`too_deep`), not timed.
pub const MAX_CALL_DEPTH: usize = 8;

/// Sub-buckets per power of two, as a bit count: 16 sub-buckets bound a
/// bucket's width to 1/16 of its lower edge, so its midpoint is within
/// 3.2 % of any value in it.
pub const SUB_BITS: u32 = 4;
/// Sub-buckets per power of two.
pub const SUBS: usize = 1 << SUB_BITS;
/// Buckets of [`LatencyHist`]: values below 16 ns one each, then 16 per
/// power of two up to 2^64 ns.
pub const HIST_BUCKETS: usize = SUBS + (64 - SUB_BITS as usize) * SUBS;

/// The bucket of a duration in ns.
#[inline(always)]
pub fn bucket_of(ns: u64) -> usize {
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros();
    let sub = (ns >> (e - SUB_BITS)) as usize & (SUBS - 1);
    (e - SUB_BITS + 1) as usize * SUBS + sub
}

/// The lowest duration (ns) of bucket `i`; bucket `i` ends where `i + 1`
/// begins.
pub fn bucket_low(i: usize) -> u64 {
    if i < 2 * SUBS {
        return i as u64;
    }
    let e = (i / SUBS) as u32 + SUB_BITS - 1;
    ((SUBS + i % SUBS) as u64) << (e - SUB_BITS)
}

/// Per-probe settings, `PROBE_CONFIG[slot]`, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Calls longer than this count as over budget and make the samples
    /// taken meanwhile slow-call samples (0: no budget).
    pub budget_ns: u64,
    /// The process probed (a forked child's hits are ignored).
    pub tgid: u32,
    /// Non-zero while the slot is in use: the attachment's generation
    /// (new at each attachment), which in-flight entries carry so that
    /// those an earlier attachment left (its return probe detached while
    /// a call ran) are not taken for this one's.
    pub active: u32,
}

/// Key of a thread's in-flight calls of one probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InFlightKey {
    /// Thread id.
    pub tid: u32,
    /// Probe slot.
    pub slot: u32,
}

/// A thread's in-flight calls of one probe: a stack of start times.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Calls entered and not returned (may exceed [`MAX_CALL_DEPTH`]).
    pub depth: u32,
    /// The attachment that recorded them ([`ProbeConfig::active`]).
    pub generation: u32,
    /// Entry times (ns, CLOCK_MONOTONIC), outermost first.
    pub starts: [u64; MAX_CALL_DEPTH],
}

/// The outermost in-flight call with a budget of a thread, for the CPU
/// sampler's slow-call check (one lookup by tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowCall {
    /// Entry time (ns), 0 when no call is in flight.
    pub start_ns: u64,
    /// Its probe's budget, ns.
    pub budget_ns: u64,
    /// Its probe's slot (only that probe's return clears it).
    pub slot: u32,
    /// The attachment that published it ([`ProbeConfig::active`]): a
    /// call whose return probe was detached is not in flight any more.
    pub generation: u32,
}

/// Per-probe histogram and counters (per CPU, summed by the agent).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LatencyHist {
    /// Calls timed.
    pub count: u64,
    /// Sum of their durations, ns.
    pub sum_ns: u64,
    /// Longest, ns.
    pub max_ns: u64,
    /// Calls longer than the budget.
    pub over_budget: u64,
    /// Returns without a recorded entry (attached mid-call; lost entries).
    pub unmatched: u64,
    /// Calls nested deeper than [`MAX_CALL_DEPTH`] (not timed).
    pub too_deep: u64,
    /// Entries whose in-flight record could not be stored (map full).
    pub lost: u64,
    /// Explicit padding.
    pub _pad: u64,
    /// Calls per bucket (see [`bucket_of`]).
    pub buckets: [u64; HIST_BUCKETS],
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            max_ns: 0,
            over_budget: 0,
            unmatched: 0,
            too_deep: 0,
            lost: 0,
            _pad: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (sizes asserted below).
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::InFlightKey {}
    unsafe impl aya::Pod for super::InFlight {}
    unsafe impl aya::Pod for super::SlowCall {}
    unsafe impl aya::Pod for super::LatencyHist {}
}

const _: () = assert!(core::mem::size_of::<ProbeConfig>() == 16);
const _: () = assert!(core::mem::size_of::<InFlightKey>() == 8);
const _: () = assert!(core::mem::size_of::<InFlight>() == 8 + 8 * MAX_CALL_DEPTH);
const _: () = assert!(core::mem::size_of::<SlowCall>() == 24);
const _: () = assert!(core::mem::size_of::<LatencyHist>() == 64 + 8 * HIST_BUCKETS);
// A per-CPU array value is limited to 32 KiB.
const _: () = assert!(core::mem::size_of::<LatencyHist>() <= 32 * 1024);
