//! On-CPU sampling: a perf_event program on the software cpu-clock, opened by
//! the agent on the target's threads only.
//!
//! For each sample: is the current process a target? record its user and
//! kernel stack ids and add one sample (and its period, the time weight) to
//! the current generation's aggregation map. Nothing goes to userspace per
//! sample.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::bpf_get_current_pid_tgid,
    maps::{PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext as _, PerfEventContext},
};
use flamewatch_common::{config_index, target_flags, SampleKey, SampleValue, TargetStats, NO_STACK};

use crate::maps::{CONFIG, COUNTS_0, COUNTS_1, FOREIGN, STACKS_0, STACKS_1, TARGETS, TARGET_STATS};

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
    let kernel_stack_id = if target.flags & target_flags::KERNEL_STACKS != 0 {
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

    stats.samples += 1;
    stats.period_ns += period;

    let key = SampleKey {
        tgid,
        tid,
        user_stack_id,
        kernel_stack_id,
    };
    if let Some(value) = counts.get_ptr_mut(&key) {
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
        if counts.insert(&key, &value, 0).is_err() {
            stats.map_full += 1;
        }
    }
    Ok(())
}
