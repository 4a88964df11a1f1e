//! Function latency: a uprobe at a function's entry pushes the time on the
//! thread's stack of in-flight calls, the uretprobe at its return pops it
//! and adds the duration to the probe's log-linear histogram. The bpf
//! cookie of an attachment is its probe slot. A probe with a budget also
//! publishes the thread's outermost call in `SLOW_CALLS`, which the CPU
//! sampler reads to tell slow-call samples apart.
//!
//! The maps of this module live here rather than in maps.rs: they are only
//! the probes' (and the sampler's one lookup).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_attach_cookie},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    EbpfContext,
};
use flamewatch_common::{
    probe::{
        bucket_of, InFlight, InFlightKey, LatencyHist, ProbeConfig, SlowCall, HIST_BUCKETS, MAX_CALL_DEPTH,
        MAX_PROBES,
    },
    SampleKey, SampleValue,
};

/// Threads with calls in flight, per probe. LRU: a thread that exits (or
/// a probe detached) mid-call leaves an entry nobody removes; 16 Ki
/// threads in calls at once is far past any target's.
#[map]
pub static IN_FLIGHT: LruHashMap<InFlightKey, InFlight> = LruHashMap::with_max_entries(16384, 0);

/// Each thread's outermost in-flight call of a probe with a budget (see
/// the module doc). Same bound and reason as `IN_FLIGHT`.
#[map]
pub static SLOW_CALLS: LruHashMap<u32, SlowCall> = LruHashMap::with_max_entries(16384, 0);

/// Probe settings by slot, written by the agent.
#[map]
pub static PROBE_CONFIG: Array<ProbeConfig> = Array::with_max_entries(MAX_PROBES, 0);

/// Histogram and counters by slot; per CPU (no atomic add on this target).
/// 7.8 KiB per slot and CPU.
#[map]
pub static LATENCY: PerCpuArray<LatencyHist> = PerCpuArray::with_max_entries(MAX_PROBES, 0);

/// Slow-call samples: the sampler's keys (stack ids of the generation's
/// stack map) of samples taken past the budget. Far fewer distinct keys
/// than the whole profile: 4 Ki per generation, full counted (`map_full`).
pub const SLOW_ENTRIES: u32 = 4096;

/// Slow-call samples, generation 0.
#[map]
pub static SLOW_COUNTS_0: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(SLOW_ENTRIES, 0);
/// Slow-call samples, generation 1.
#[map]
pub static SLOW_COUNTS_1: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(SLOW_ENTRIES, 0);

/// The probe slot of this attachment and its settings, if it is one of
/// the agent's and this is its process.
#[inline(always)]
fn probe<C: EbpfContext>(ctx: &C, tgid: u32) -> Option<(u32, ProbeConfig)> {
    // SAFETY: the context of a kprobe-type program.
    let slot = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let config = *PROBE_CONFIG.get(slot)?;
    (config.active != 0 && config.tgid == tgid).then_some((slot, config))
}

/// Function entry.
pub fn try_enter<C: EbpfContext>(ctx: &C) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some((slot, config)) = probe(ctx, tgid) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = InFlightKey { tid, slot };
    let depth = match IN_FLIGHT.get_ptr_mut(&key) {
        Some(f) => {
            // SAFETY: only this thread (running here) writes its own entry.
            let f = unsafe { &mut *f };
            if f.generation != config.active {
                // Left by an earlier attachment of the slot: its calls'
                // returns were never seen.
                f.depth = 0;
                f.generation = config.active;
            }
            let d = f.depth as usize;
            if d < MAX_CALL_DEPTH {
                f.starts[d] = now;
            } else {
                count(slot, |h| h.too_deep += 1);
            }
            f.depth += 1;
            d
        }
        None => {
            let mut f = InFlight::default();
            f.depth = 1;
            f.generation = config.active;
            f.starts[0] = now;
            if IN_FLIGHT.insert(&key, &f, 0).is_err() {
                count(slot, |h| h.lost += 1);
                return Ok(());
            }
            0
        }
    };
    if depth == 0 && config.budget_ns != 0 {
        publish_slow(tid, slot, now, &config);
    }
    Ok(())
}

/// The thread's outermost call, unless another probe's is in flight.
#[inline(always)]
fn publish_slow(tid: u32, slot: u32, now: u64, config: &ProbeConfig) {
    if let Some(s) = SLOW_CALLS.get_ptr_mut(&tid) {
        // SAFETY: only this thread writes its own entry.
        let s = unsafe { &mut *s };
        if s.start_ns == 0 || s.slot == slot || !current(s) {
            s.start_ns = now;
            s.budget_ns = config.budget_ns;
            s.slot = slot;
            s.generation = config.active;
        }
        return;
    }
    let s = SlowCall {
        start_ns: now,
        budget_ns: config.budget_ns,
        slot,
        generation: config.active,
    };
    let _ = SLOW_CALLS.insert(&tid, &s, 0);
}

/// Whether the attachment that published `s` is still the one in its
/// slot (else its return probe is gone and the call will never be seen
/// to end).
#[inline(always)]
fn current(s: &SlowCall) -> bool {
    PROBE_CONFIG
        .get(s.slot)
        .is_some_and(|c| c.active != 0 && c.active == s.generation)
}

/// Function return.
pub fn try_return<C: EbpfContext>(ctx: &C) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some((slot, config)) = probe(ctx, tgid) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = InFlightKey { tid, slot };
    let Some(f) = IN_FLIGHT.get_ptr_mut(&key) else {
        count(slot, |h| h.unmatched += 1);
        return Ok(());
    };
    // SAFETY: only this thread writes its own entry.
    let f = unsafe { &mut *f };
    if f.depth == 0 || f.generation != config.active {
        count(slot, |h| h.unmatched += 1);
        return Ok(());
    }
    f.depth -= 1;
    let d = f.depth as usize;
    if d == 0 && config.budget_ns != 0 {
        if let Some(s) = SLOW_CALLS.get_ptr_mut(&tid) {
            // SAFETY: only this thread writes its own entry.
            let s = unsafe { &mut *s };
            if s.slot == slot {
                s.start_ns = 0;
            }
        }
    }
    if d >= MAX_CALL_DEPTH {
        return Ok(());
    }
    let ns = now.saturating_sub(f.starts[d]);
    // Laundered through memory: the compiler knows bucket_of's range and
    // would drop the bound check below, which the verifier needs (it cannot
    // follow the leading-zeros arithmetic).
    let bucket = bucket_of(ns);
    // SAFETY: reading a local.
    let bucket = unsafe { core::ptr::read_volatile(&bucket) };
    let over = config.budget_ns != 0 && ns > config.budget_ns;
    count(slot, |h| {
        h.count += 1;
        h.sum_ns += ns;
        if ns > h.max_ns {
            h.max_ns = ns;
        }
        if over {
            h.over_budget += 1;
        }
        if bucket < HIST_BUCKETS {
            h.buckets[bucket] += 1;
        }
    });
    Ok(())
}

/// Updates this CPU's histogram of `slot`.
#[inline(always)]
fn count(slot: u32, f: impl FnOnce(&mut LatencyHist)) {
    if let Some(h) = LATENCY.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        f(unsafe { &mut *h });
    }
}

/// Whether the current thread's probed call has run past its budget (the
/// sampler's check: one hash lookup, for targets with a budgeted probe).
#[inline(always)]
pub fn in_slow_call(tid: u32) -> bool {
    // SAFETY: a plain lookup; the value is read once.
    let Some(s) = (unsafe { SLOW_CALLS.get(&tid) }) else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    s.start_ns != 0 && now.saturating_sub(s.start_ns) > s.budget_ns && current(s)
}

/// How much of a block from `since` to `now` came after the thread's
/// probed call ran past its budget, ns (0 without a call in flight, or when
/// it was still on time): that part of the wait goes to the slow-call
/// profile, so a frame late on a lock shows the lock.
#[inline(always)]
pub fn late_ns(tid: u32, since: u64, now: u64) -> u64 {
    // SAFETY: a plain lookup; the value is read once.
    let Some(s) = (unsafe { SLOW_CALLS.get(&tid) }) else {
        return 0;
    };
    if s.start_ns == 0 || !current(s) {
        return 0;
    }
    let deadline = s.start_ns.saturating_add(s.budget_ns);
    if now <= deadline {
        return 0;
    }
    now - if since > deadline { since } else { deadline }
}
