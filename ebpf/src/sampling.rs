//! On-CPU sampling: a perf_event program on the software cpu-clock, opened by
//! the agent on the target's threads only.
//!
//! For each sample: is the current process a target? Then, for a target
//! with frame pointers, record its user and kernel stack ids and add one
//! sample (and its period, the time weight) to the current generation's
//! aggregation map: nothing goes to userspace per sample. For a target
//! without frame pointers (DWARF mode), copy the user registers, the kernel
//! stack and a window of the user stack to the ring buffer instead, for the
//! agent to unwind with the binaries' .eh_frame (as `perf --call-graph
//! dwarf` does, but online).

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_USER_STACK, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_user, bpf_task_pt_regs},
    },
    maps::{PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext as _, PerfEventContext},
};
use flamewatch_common::{
    config_index, sample_flags, target_flags, SampleKey, SampleValue, StackSampleHeader, TargetStats,
    DEFAULT_STACK_WINDOW, FP_CHECK_EVERY, MAX_STACK_DEPTH, MAX_STACK_WINDOW, NO_STACK,
};

use crate::maps::{
    may_log, CONFIG, COUNTS_0, COUNTS_1, FOREIGN, SCRATCH, STACKS_0, STACKS_1, STACK_SAMPLES, TARGETS,
    TARGET_STATS,
};

const EEXIST: i32 = 17;

pub fn try_sample(ctx: &PerfEventContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;

    // SAFETY: plain map lookups; the values are Copy and read once.
    let Some(target) = (unsafe { TARGETS.get(&tgid) }).copied() else {
        if let Some(foreign) = FOREIGN.get_ptr_mut(0) {
            // SAFETY: per-CPU value, no concurrent writer on this CPU.
            unsafe { (*foreign).samples += 1 };
        }
        return Ok(());
    };
    let Some(stats) = TARGET_STATS.get_ptr_mut(target.slot) else {
        return Ok(());
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let stats: &mut TargetStats = unsafe { &mut *stats };

    let generation = CONFIG.get(config_index::GENERATION).copied().unwrap_or(0);
    let (counts, stacks): (&PerCpuHashMap<SampleKey, SampleValue>, &StackTrace) = if generation == 0 {
        (&COUNTS_0, &STACKS_0)
    } else {
        (&COUNTS_1, &STACKS_1)
    };

    // SAFETY: ctx points at the kernel's bpf_perf_event_data for this sample.
    let period = unsafe { (*ctx.ctx).sample_period };
    stats.samples += 1;
    stats.period_ns += period;
    let kernel = target.flags & target_flags::KERNEL_STACKS != 0;
    // Past the budget of the thread's probed call: a slow-call sample too.
    let slow = target.flags & target_flags::SLOW_CALLS != 0 && crate::probe::in_slow_call(tid);
    // One stack copy per sample at most, from one call site (the copy is
    // inlined: a second site would double the program).
    let copy = if target.flags & target_flags::DWARF != 0 {
        Some(if slow { sample_flags::SLOW } else { 0 })
    } else {
        let slow_counts = slow.then_some(if generation == 0 {
            &crate::probe::SLOW_COUNTS_0
        } else {
            &crate::probe::SLOW_COUNTS_1
        });
        fp_sample(
            ctx,
            target.flags,
            tgid,
            tid,
            period,
            (counts, slow_counts),
            stacks,
            stats,
        );
        // `--unwind auto`'s check of its choice: 1 sample in FP_CHECK_EVERY
        // (on this CPU) goes as a DWARF copy too.
        let no_leaf = if target.flags & target_flags::NO_LEAF_FIXUP != 0 {
            sample_flags::NO_LEAF_WORD
        } else {
            0
        };
        (target.flags & target_flags::FP_CHECK != 0 && stats.samples & (FP_CHECK_EVERY - 1) == 0)
            .then_some(sample_flags::FP_CHECK | no_leaf)
    };
    if let Some(flags) = copy {
        let kernel = kernel && flags & sample_flags::FP_CHECK == 0;
        dwarf_sample(ctx, tgid, tid, period, kernel, stats, flags);
    }
    Ok(())
}

/// Records a frame-pointer sample: its user and kernel stack ids and the
/// leaf fix-up's word, counted in the generation's aggregation map (and in
/// its slow-call map, for a sample of a call past its budget).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fp_sample(
    ctx: &PerfEventContext,
    flags: u32,
    tgid: u32,
    tid: u32,
    period: u64,
    (counts, slow_counts): (
        &PerCpuHashMap<SampleKey, SampleValue>,
        Option<&PerCpuHashMap<SampleKey, SampleValue>>,
    ),
    stacks: &StackTrace,
    stats: &mut TargetStats,
) {
    let user_stack_id = match ctx.get_stackid(stacks, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(err) => {
            if err == -EEXIST {
                stats.user_stack_collisions += 1;
            } else {
                stats.user_stack_errors += 1;
            }
            err
        }
    };
    let kernel_stack_id = if flags & target_flags::KERNEL_STACKS != 0 {
        match ctx.get_stackid(stacks, 0) {
            Ok(id) => id as i32,
            Err(err) => {
                if err == -EEXIST {
                    stats.kernel_stack_collisions += 1;
                } else {
                    // -EFAULT is the normal answer for a sample taken in user
                    // mode (no kernel stack): count only other failures.
                    if err != -14 {
                        stats.kernel_stack_errors += 1;
                    }
                }
                err
            }
        }
    } else {
        NO_STACK
    };

    // The leaf fix-up's word, for a user stack that was recorded.
    let (leaf_ret, leaf_offset) = if user_stack_id >= 0 && flags & target_flags::NO_LEAF_FIXUP == 0 {
        // SAFETY: the interrupted registers, inside the context the kernel passed.
        crate::leaf::leaf_word(crate::leaf::user_sp(Some(unsafe { &(*ctx.ctx).regs })))
    } else {
        (0, 0)
    };
    let key = SampleKey {
        tgid,
        tid,
        user_stack_id,
        kernel_stack_id,
        leaf_ret,
        leaf_offset,
        _pad: 0,
    };
    if let Some(slow_counts) = slow_counts {
        add_sample(ctx, slow_counts, &key, period, stats);
    }
    add_sample(ctx, counts, &key, period, stats);
}

/// Adds one sample of `period` ns to `key` of `counts`.
#[inline(always)]
fn add_sample(
    ctx: &PerfEventContext,
    counts: &PerCpuHashMap<SampleKey, SampleValue>,
    key: &SampleKey,
    period: u64,
    stats: &mut TargetStats,
) {
    let tgid = key.tgid;
    if let Some(value) = counts.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*value).count += 1;
            (*value).period_ns += period;
        }
    } else {
        let value = SampleValue {
            count: 1,
            period_ns: period,
        };
        // BPF_ANY: a key inserted meanwhile by another CPU only sets this
        // CPU's slot (per-CPU hash), which is still what we want.
        if counts.insert(key, &value, 0).is_err() {
            stats.map_full += 1;
            if may_log() {
                aya_log_ebpf::warn!(
                    ctx,
                    "aggregation map full: samples of pid {} are being lost (counted as lost_samples)",
                    tgid
                );
            }
        }
    }
}

/// Sends a DWARF sample of the interrupted thread (`flags`: 0, or
/// `FP_CHECK` for the check copy of a frame-pointer sample) and counts the
/// outcome.
#[inline(always)]
fn dwarf_sample(
    ctx: &PerfEventContext,
    tgid: u32,
    tid: u32,
    period: u64,
    kernel: bool,
    stats: &mut TargetStats,
    flags: u32,
) {
    // SAFETY: the interrupted registers, inside the context the kernel passed.
    let regs = unsafe { &(*ctx.ctx).regs };
    // Interrupted in user mode: these are the user registers.
    let user_regs = if regs.cs & 3 == 3 { Some(regs) } else { None };
    let copied = copy_stack(ctx.ctx.cast(), user_regs, tgid, tid, period, kernel, flags, 0);
    if flags & sample_flags::FP_CHECK != 0 {
        match copied {
            Copied::Sent { .. } => stats.fp_checks += 1,
            Copied::Lost => stats.fp_checks_lost += 1,
        }
        return;
    }
    match copied {
        Copied::Sent { stack: true } => stats.dwarf_samples += 1,
        Copied::Sent { stack: false } => {
            stats.dwarf_samples += 1;
            stats.dwarf_stack_unreadable += 1;
        }
        Copied::Lost => stats.dwarf_lost += 1,
    }
}

/// For `--unwind auto`'s check: the user stack as the frame-pointer walk
/// sees it (in `kernel_ips`, which a check record does not otherwise use)
/// and the leaf fix-up's word, as a frame-pointer sample records them.
#[inline(always)]
fn fp_walk(ctx: *mut core::ffi::c_void, h: &mut StackSampleHeader, sp: u64, leaf: bool) {
    // SAFETY: bpf_get_stack writes at most the given size into our buffer.
    let n = unsafe {
        bpf_get_stack(
            ctx,
            h.kernel_ips.as_mut_ptr().cast(),
            (MAX_STACK_DEPTH * 8) as u32,
            u64::from(BPF_F_USER_STACK),
        )
    };
    h.kernel_frames = if n > 0 { (n as u32) / 8 } else { 0 };
    if leaf {
        (h.leaf_ret, h.leaf_offset) = crate::leaf::leaf_word(sp);
    }
}

/// Outcome of [`copy_stack`].
pub enum Copied {
    /// In the ring buffer (with or without a user stack).
    Sent {
        /// The user stack could be read.
        stack: bool,
    },
    /// The ring buffer was full.
    Lost,
}

/// Builds a DWARF record of the current thread in the per-CPU scratch —
/// user registers, kernel stack, a window of the user stack — and sends the
/// used part to `STACK_SAMPLES`. `user_regs` are the interrupted registers
/// when they are the user's; otherwise the thread is in the kernel and its
/// user registers are the ones saved at kernel entry.
// Inlined: a BPF function takes at most five arguments in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn copy_stack(
    ctx: *mut core::ffi::c_void,
    user_regs: Option<&pt_regs>,
    tgid: u32,
    tid: u32,
    period: u64,
    kernel: bool,
    extra_flags: u32,
    seq: u32,
) -> Copied {
    let Some(sample) = SCRATCH.get_ptr_mut(0) else {
        return Copied::Lost;
    };
    // SAFETY: per-CPU scratch, not shared with any other program run on this CPU.
    let sample = unsafe { &mut *sample };
    let h = &mut sample.header;
    h.tgid = tgid;
    h.tid = tid;
    h.period_ns = period;
    h.flags = extra_flags;
    h.kernel_frames = 0;
    h.stack_len = 0;
    h._pad = seq;

    let user = match user_regs {
        Some(r) => (r.rip, r.rsp, r.rbp),
        None => {
            h.flags |= sample_flags::IN_KERNEL;
            if kernel {
                // SAFETY: bpf_get_stack writes at most the given size into our buffer.
                let n = unsafe {
                    bpf_get_stack(
                        ctx,
                        h.kernel_ips.as_mut_ptr().cast(),
                        (MAX_STACK_DEPTH * 8) as u32,
                        0,
                    )
                };
                if n > 0 {
                    h.kernel_frames = (n as u32) / 8;
                }
            }
            // The user registers saved at kernel entry (task_pt_regs), see
            // bpf_task_pt_regs in kernel/trace/bpf_trace.c.
            // SAFETY: BTF task pointer of the current task, then a checked copy.
            let saved = unsafe {
                let task = bpf_get_current_task_btf();
                let regs = bpf_task_pt_regs(task) as *const pt_regs;
                bpf_probe_read_kernel(regs)
            };
            match saved {
                Ok(r) => (r.rip, r.rsp, r.rbp),
                Err(_) => {
                    h.flags |= sample_flags::NO_USER_REGS;
                    (0, 0, 0)
                }
            }
        }
    };
    h.ip = user.0;
    h.sp = user.1;
    h.bp = user.2;
    h.leaf_ret = 0;
    h.leaf_offset = 0;
    h._pad2 = 0;
    if extra_flags & sample_flags::FP_CHECK != 0 {
        fp_walk(ctx, h, user.1, extra_flags & sample_flags::NO_LEAF_WORD == 0);
    }

    // The window above sp; halve it until the read stays inside mapped
    // memory (a thread's stack may hold less than the window).
    let window = CONFIG
        .get(config_index::STACK_WINDOW)
        .copied()
        .filter(|w| *w != 0)
        .unwrap_or(DEFAULT_STACK_WINDOW as u32);
    let mut len = if window as usize > MAX_STACK_WINDOW {
        MAX_STACK_WINDOW as u32
    } else {
        window
    };
    let mut copied: u32 = 0;
    if user.1 != 0 {
        for _ in 0..6 {
            if len < 64 || len as usize > MAX_STACK_WINDOW {
                break;
            }
            // SAFETY: len ≤ MAX_STACK_WINDOW bytes into the scratch's stack array.
            let ret = unsafe {
                bpf_probe_read_user(
                    sample.stack.as_mut_ptr().cast(),
                    len,
                    user.1 as *const core::ffi::c_void,
                )
            };
            if ret == 0 {
                copied = len;
                break;
            }
            len /= 2;
        }
    }
    sample.header.stack_len = copied;
    let size = core::mem::size_of::<StackSampleHeader>() + copied as usize;
    if size > core::mem::size_of_val(sample) {
        return Copied::Lost;
    }
    // SAFETY: `size` bytes from the start of the scratch value, all inside it.
    let bytes = unsafe { core::slice::from_raw_parts(sample as *const _ as *const u8, size) };
    // No wakeup per record: the agent polls, so the sampled thread never
    // pays for waking it.
    match STACK_SAMPLES.output::<[u8]>(bytes, u64::from(BPF_RB_NO_WAKEUP)) {
        Ok(()) => Copied::Sent { stack: copied != 0 },
        Err(_) => Copied::Lost,
    }
}
