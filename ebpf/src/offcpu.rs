//! Off-CPU tracing: where target threads wait.
//!
//! On `sched/sched_switch` (which runs in the context of the thread leaving
//! the CPU): if it belongs to a target, remember when and with which stacks
//! it left; if the thread coming in left while we watched, add the time it
//! was away to those stacks. Frame-pointer targets aggregate in the kernel
//! (as bcc's offcputime does); for DWARF targets the stacks go out as a
//! begin record and the duration as an end record, joined by the agent.
//!
//! The tracepoint fires on every context switch of the machine, so the
//! path for other processes is one inlined array read (a bit per pid) and
//! one hash lookup for the incoming thread.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{tracing::StackIdContext as _, TracePointContext},
    EbpfContext as _,
};
use flamewatch_common::{
    offcpu::{OffEnd, OffStart, OffStats, CONFIG_MIN_BLOCK_NS, CONFIG_SAMPLE_EVERY, TGID_WORDS},
    sample_flags, target_flags,
    tcp::{layout::sched_switch, SchedLayout},
    SampleKey, SampleValue, MAX_TARGETS, NO_STACK,
};

use crate::{
    maps::{field_at, layout_offset, may_log, sampled_out, TARGETS},
    sampling::{copy_stack, Copied},
};

/// Target processes, a bit per pid (pid_max is at most 2^22): 512 KiB.
#[map]
pub static OFFCPU_TGIDS: Array<u64> = Array::with_max_entries(TGID_WORDS, 0);

/// Target threads currently off CPU. 16 Ki blocked threads at once is far
/// beyond what the targets we watch run; a full map is counted.
#[map]
pub static OFFCPU_START: HashMap<u32, OffStart> = HashMap::with_max_entries(16384, 0);

/// Blocked time by (thread, user stack, kernel stack): `count` blocks,
/// `period_ns` nanoseconds. Blocking points are few, so this stays small.
#[map]
pub static OFFCPU_COUNTS: PerCpuHashMap<SampleKey, SampleValue> = PerCpuHashMap::with_max_entries(16384, 0);

/// Stacks of the blocks (frame-pointer targets). Not generational: a block
/// can outlast any drain interval, and its stack must still be there.
#[map]
pub static OFFCPU_STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// The late part of blocks inside a probed call past its budget, by the
/// same key as `OFFCPU_COUNTS` (frame-pointer targets with a budgeted
/// probe): the slow-call profile's off-CPU side. Drained with it.
#[map]
pub static OFFCPU_SLOW: PerCpuHashMap<SampleKey, SampleValue> = PerCpuHashMap::with_max_entries(4096, 0);

/// Ends of DWARF-mode blocks (32 bytes each).
#[map]
pub static OFFCPU_ENDS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Settings (see `offcpu::CONFIG_*`).
#[map]
pub static OFFCPU_CONFIG: Array<u64> = Array::with_max_entries(2, 0);

/// Per-target counters, indexed by `TargetInfo::slot`.
#[map]
pub static OFFCPU_STATS: PerCpuArray<OffStats> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Offsets in this kernel's sched_switch record, set by the agent at load
/// from /sys/kernel/tracing/events/sched/sched_switch/format.
#[unsafe(no_mangle)]
static SCHED_LAYOUT: SchedLayout = SchedLayout::DEFAULT;

fn is_target(tgid: u32) -> bool {
    let word = OFFCPU_TGIDS.get(tgid / 64).copied().unwrap_or(0);
    word & (1u64 << (tgid % 64)) != 0
}

pub fn try_sched_switch(ctx: &TracePointContext) -> Result<(), i64> {
    // Other processes' switches: one helper call, one inlined array read,
    // a direct load from the record and one hash lookup; the clock is read
    // only on a target's paths.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != 0 && is_target(tgid) {
        // SAFETY: no preconditions.
        switch_out(ctx, tgid, pid_tgid as u32, unsafe { bpf_ktime_get_ns() });
    }
    // SAFETY: next_pid is an aligned i32 of the sched_switch record.
    let offset = layout_offset!(SCHED_LAYOUT.next_pid);
    // SAFETY: as above, at this kernel's offset.
    let next = unsafe { field_at::<i32>(ctx, offset, sched_switch::NEXT_PID) } as u32;
    // SAFETY: plain map lookup; the value is copied out before the delete.
    if let Some(start) = unsafe { OFFCPU_START.get(&next) }.copied() {
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = OFFCPU_START.remove(&next);
        switch_in(next, start, now);
    }
    Ok(())
}

/// Charges the time since `since` to the target's counters (only target
/// paths pay this extra clock read).
fn charge(stats: &mut OffStats, since: u64) {
    // SAFETY: no preconditions.
    let end = unsafe { bpf_ktime_get_ns() };
    stats.prog_ns += end.saturating_sub(since);
}

fn stats_of(tgid: u32) -> Option<(&'static mut OffStats, u32)> {
    // SAFETY: plain map lookup of a Copy value.
    let target = unsafe { TARGETS.get(&tgid) }.copied()?;
    let stats = OFFCPU_STATS.get_ptr_mut(target.slot)?;
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    Some((unsafe { &mut *stats }, target.flags))
}

fn switch_out(ctx: &TracePointContext, tgid: u32, tid: u32, now: u64) {
    let Some((stats, flags)) = stats_of(tgid) else {
        return;
    };
    let every = OFFCPU_CONFIG
        .get(CONFIG_SAMPLE_EVERY)
        .copied()
        .unwrap_or(1)
        .max(1);
    if sampled_out(every) {
        stats.unsampled += 1;
        charge(stats, now);
        return;
    }
    // SAFETY: prev_state is an aligned i64 of the sched_switch record.
    let offset = layout_offset!(SCHED_LAYOUT.prev_state);
    // SAFETY: at this kernel's offset.
    let state = unsafe { field_at::<i64>(ctx, offset, sched_switch::PREV_STATE) } as u32;
    let kernel = flags & target_flags::KERNEL_STACKS != 0;
    let mut start = OffStart {
        ts_ns: now,
        tgid,
        state,
        user_stack_id: NO_STACK,
        kernel_stack_id: NO_STACK,
        seq: now as u32,
        dwarf: 0,
        weight: every as u32,
        leaf_offset: 0,
        leaf_ret: 0,
    };
    if flags & target_flags::DWARF != 0 {
        start.dwarf = 1;
        let copied = copy_stack(
            ctx.as_ptr(),
            None,
            tgid,
            tid,
            0,
            kernel,
            sample_flags::OFFCPU_BEGIN,
            start.seq,
        );
        if matches!(copied, Copied::Lost) {
            stats.lost += 1;
            return;
        }
    } else {
        start.user_stack_id = match ctx.get_stackid(&OFFCPU_STACKS, u64::from(BPF_F_USER_STACK)) {
            Ok(id) => id as i32,
            Err(e) => e,
        };
        if start.user_stack_id >= 0 && flags & target_flags::NO_LEAF_FIXUP == 0 {
            // The leaf is a syscall wrapper, which sets up no frame.
            (start.leaf_ret, start.leaf_offset) = crate::leaf::leaf_word(crate::leaf::user_sp(None));
        }
        if kernel {
            start.kernel_stack_id = match ctx.get_stackid(&OFFCPU_STACKS, 0) {
                Ok(id) => id as i32,
                Err(e) => e,
            };
        }
    }
    if let Err(e) = OFFCPU_START.insert(&tid, &start, 0) {
        stats.start_full += 1;
        if may_log() {
            aya_log_ebpf::warn!(
                ctx,
                "off-CPU start of pid {} not recorded (error {}): its block is lost (counted in off_cpu.lost)",
                tgid,
                e
            );
        }
    }
    charge(stats, now);
}

fn switch_in(tid: u32, start: OffStart, now: u64) {
    let Some((stats, flags)) = stats_of(start.tgid) else {
        return;
    };
    let blocked = now.saturating_sub(start.ts_ns);
    let weight = u64::from(start.weight.max(1));
    let min = OFFCPU_CONFIG.get(CONFIG_MIN_BLOCK_NS).copied().unwrap_or(0);
    // A short block is not recorded (the agent drops a DWARF one): only a
    // recorded one looks its thread's probed call up.
    let late = if blocked >= min && flags & target_flags::SLOW_CALLS != 0 {
        crate::probe::late_ns(tid, start.ts_ns, now)
    } else {
        0
    };
    if blocked < min {
        stats.short += 1;
        if start.dwarf == 0 {
            charge(stats, now);
            return;
        }
    } else {
        stats.blocks += 1;
        stats.blocked_ns += blocked;
    }
    if start.dwarf != 0 {
        // The agent drops the begin record when the block was short.
        let end = OffEnd {
            tgid: start.tgid,
            tid,
            seq: start.seq,
            weight: weight as u32,
            blocked_ns: blocked,
            slow_ns: late,
        };
        if OFFCPU_ENDS
            .output::<OffEnd>(&end, u64::from(BPF_RB_NO_WAKEUP))
            .is_err()
        {
            stats.lost += 1;
        }
        charge(stats, now);
        return;
    }
    let key = SampleKey {
        tgid: start.tgid,
        tid,
        user_stack_id: start.user_stack_id,
        kernel_stack_id: start.kernel_stack_id,
        leaf_ret: start.leaf_ret,
        leaf_offset: start.leaf_offset,
        _pad: 0,
    };
    if !add(&OFFCPU_COUNTS, &key, weight, blocked * weight) {
        stats.lost += 1;
    }
    if late > 0 && !add(&OFFCPU_SLOW, &key, weight, late * weight) {
        stats.lost += 1;
    }
    charge(stats, now);
}

/// Adds `count` blocks of `ns` to `key` of `map`; false when it is full.
#[inline(always)]
fn add(map: &PerCpuHashMap<SampleKey, SampleValue>, key: &SampleKey, count: u64, ns: u64) -> bool {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*v).count += count;
            (*v).period_ns += ns;
        }
        return true;
    }
    map.insert(key, &SampleValue { count, period_ns: ns }, 0).is_ok()
}
