//! Live heap allocations by allocating stack, from allocator uprobes
//! attached to one target's address space only.
//!
//! Sampling by bytes, as tcmalloc and ddprof do: a per-CPU countdown of
//! bytes to the next sample, drawn from an exponential distribution with
//! the configured mean (the agent fills `HEAP_RAND` with variates). Only a
//! sampled call records its stack and, at return, its pointer in
//! `HEAP_LIVE`; free() looks the pointer up and removes it. A sampled
//! allocation of `s` bytes stands for `s / (1 - exp(-s / mean))` bytes (the
//! agent's `HEAP_WEIGHTS` table), which makes the estimates unbiased.
//!
//! The stack of a sampled call is a stack map id for a frame-pointer
//! target; for a DWARF target it is a stack copy (`sample_flags::HEAP`,
//! the probe's registers are the user's) with an id of its own, which the
//! agent unwinds and joins with the allocation by that id.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_probe_read_user,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext as _, ProbeContext, RetProbeContext},
    EbpfContext as _,
};
use flamewatch_common::{
    memory::{
        kinds, HeapLive, HeapPending, HeapPtr, HeapValue, MemStats, CONFIG_HEAP_MEAN, HEAP_BINS_PER_MEAN,
        HEAP_TABLE,
    },
    sample_flags, target_flags, SampleKey, DWARF_STACK, NO_STACK,
};

use crate::{
    memory::{target_of, MEM_CONFIG},
    sampling::{copy_stack, Copied},
};

/// Exponential variates of the sampling interval, bytes (the agent's).
#[map]
pub static HEAP_RAND: Array<u64> = Array::with_max_entries(HEAP_TABLE, 0);

/// Unbiased byte weight of a sampled allocation by size bin (the agent's).
#[map]
pub static HEAP_WEIGHTS: Array<u64> = Array::with_max_entries(HEAP_TABLE, 0);

/// Bytes to the next sample on this CPU.
#[map]
pub static HEAP_COUNTDOWN: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Sampled calls between entry and return, by thread: at most one per
/// thread at once; 4 Ki threads in an allocator at the same instant.
#[map]
pub static HEAP_PENDING: HashMap<u32, HeapPending> = HashMap::with_max_entries(4096, 0);

/// Sampled allocations still live. Sized by the agent at load (a page-sized
/// table when heap mode is off); full: counted (`live_full`).
#[map]
pub static HEAP_LIVE: HashMap<HeapPtr, HeapLive> = HashMap::with_max_entries(16384, 0);

/// Sampled allocations by stack, drained every interval.
#[map]
pub static HEAP_ALLOCS: PerCpuHashMap<SampleKey, HeapValue> = PerCpuHashMap::with_max_entries(4096, 0);

/// Stacks of sampled allocations (not generational: live allocations keep
/// referring to them). Sized by the agent at load.
#[map]
pub static HEAP_STACKS: StackTrace = StackTrace::with_max_entries(4096, 0);

/// Stack copies of sampled allocations sent on this CPU (their ids).
#[map]
pub static HEAP_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Sends the stack of a DWARF target's sampled call (weight `weight`
/// bytes) as a copy; its (user, kernel) stack ids: a fresh id and
/// `DWARF_STACK`, or an errno when the ring buffer was full.
#[inline(always)]
fn dwarf_stack(ctx: &ProbeContext, stats: &mut MemStats, (tgid, tid): (u32, u32), weight: u64) -> (i32, i32) {
    let Some(seq) = HEAP_SEQ.get_ptr_mut(0) else {
        return (-2, NO_STACK);
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // Unique per process for 2^24 samples per CPU (8 TiB at the default
    // mean); non-negative, as stack ids are.
    let id = ((n & 0xff_ffff) << 7 | (cpu & 0x7f)) as i32;
    // SAFETY: the probe's registers are the user's.
    let regs = unsafe { &*ctx.regs };
    match copy_stack(
        ctx.as_ptr(),
        Some(regs),
        tgid,
        tid,
        weight,
        false,
        sample_flags::HEAP,
        id as u32,
    ) {
        Copied::Sent { .. } => {
            stats.dwarf_copies += 1;
            (id, DWARF_STACK)
        }
        Copied::Lost => {
            stats.dwarf_lost += 1;
            (-28, NO_STACK)
        }
    }
}

fn heap_charge(stats: &mut MemStats, since: u64) {
    // SAFETY: no preconditions.
    let end = unsafe { bpf_ktime_get_ns() };
    stats.heap_prog_ns += end.saturating_sub(since);
}

/// Entry of an allocation of `size` bytes (`memptr`: posix_memalign's out
/// pointer, else 0).
#[inline(always)]
pub fn on_alloc(ctx: &ProbeContext, size: u64, memptr: u64) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, flags)) = target_of(tgid, kinds::HEAP) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    stats.calls += 1;
    let Some(cd) = HEAP_COUNTDOWN.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let left = unsafe {
        *cd -= size as i64;
        *cd
    };
    if left > 0 {
        heap_charge(stats, now);
        return Ok(());
    }
    // SAFETY: no preconditions.
    let r = unsafe { bpf_get_prandom_u32() } % HEAP_TABLE;
    let next = HEAP_RAND.get(r).copied().unwrap_or(512 * 1024).max(1);
    // SAFETY: as above.
    unsafe { *cd = next as i64 };
    let mean = MEM_CONFIG
        .get(CONFIG_HEAP_MEAN)
        .copied()
        .unwrap_or(512 * 1024)
        .max(1);
    // Past the table (16 means) a sampled allocation weighs its size.
    let weight = if size >= mean * (u64::from(HEAP_TABLE) / HEAP_BINS_PER_MEAN) {
        size
    } else {
        let bin = (size * HEAP_BINS_PER_MEAN / mean) as u32;
        HEAP_WEIGHTS.get(bin).copied().unwrap_or(size).max(size)
    };
    let (user_stack_id, kernel_stack_id, (leaf_ret, leaf_offset)) = if flags & target_flags::DWARF != 0 {
        let (u, k) = dwarf_stack(ctx, stats, (tgid, pid_tgid as u32), weight);
        (u, k, (0, 0))
    } else {
        fp_stack(ctx)
    };
    let pending = HeapPending {
        size,
        weight,
        memptr,
        leaf_ret,
        leaf_offset,
        user_stack_id,
        kernel_stack_id,
        tgid,
    };
    if HEAP_PENDING.insert(&(pid_tgid as u32), &pending, 0).is_err() {
        stats.live_full += 1;
    }
    stats.sampled += 1;
    heap_charge(stats, now);
    Ok(())
}

/// The frame-pointer stack of an allocator call: its stack map id, no
/// kernel stack, and the leaf fix-up's word.
#[inline(always)]
fn fp_stack(ctx: &ProbeContext) -> (i32, i32, (u64, u32)) {
    let user_stack_id = match ctx.get_stackid(&HEAP_STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(e) => e as i32,
    };
    // At the allocator's first instruction the return address into its
    // caller is the word at the stack pointer; the frame-pointer walk
    // skips that caller (the leaf fix-up inserts it).
    // SAFETY: the probe's registers are the user's.
    let sp = unsafe { (*ctx.regs).rsp };
    let leaf = if user_stack_id >= 0 {
        crate::leaf::leaf_word(sp)
    } else {
        (0, 0)
    };
    (user_stack_id, NO_STACK, leaf)
}

/// Return of an allocator: the pointer of a sampled call goes live.
pub fn on_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, _)) = target_of(tgid, kinds::HEAP) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    stats.returns += 1;
    // SAFETY: plain map lookup; copied out before the delete.
    let Some(p) = (unsafe { HEAP_PENDING.get(&tid) }).copied() else {
        heap_charge(stats, now);
        return Ok(());
    };
    let _ = HEAP_PENDING.remove(&tid);
    let ptr: u64 = if p.memptr != 0 {
        let ret: i64 = ctx.ret();
        let mut out: u64 = 0;
        // SAFETY: a checked read of user memory into a local.
        let r = unsafe {
            bpf_probe_read_user(
                (&mut out as *mut u64).cast(),
                8,
                p.memptr as *const core::ffi::c_void,
            )
        };
        if ret != 0 || r != 0 {
            0
        } else {
            out
        }
    } else {
        ctx.ret()
    };
    if ptr == 0 {
        heap_charge(stats, now);
        return Ok(());
    }
    let live = HeapLive {
        ts_ns: now,
        size: p.size,
        weight: p.weight,
        leaf_ret: p.leaf_ret,
        leaf_offset: p.leaf_offset,
        user_stack_id: p.user_stack_id,
        tid,
        kernel_stack_id: p.kernel_stack_id,
    };
    let key = HeapPtr { ptr, tgid, _pad: 0 };
    if HEAP_LIVE.insert(&key, &live, 0).is_err() {
        stats.live_full += 1;
    }
    let skey = SampleKey {
        tgid,
        tid,
        user_stack_id: p.user_stack_id,
        kernel_stack_id: p.kernel_stack_id,
        leaf_ret: p.leaf_ret,
        leaf_offset: p.leaf_offset,
        _pad: 0,
    };
    let milli = p.weight.wrapping_mul(1000) / p.size.max(1);
    if let Some(v) = HEAP_ALLOCS.get_ptr_mut(&skey) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*v).samples += 1;
            (*v).bytes += p.weight;
            (*v).milli_objects += milli;
        }
    } else if HEAP_ALLOCS
        .insert(
            &skey,
            &HeapValue {
                samples: 1,
                bytes: p.weight,
                milli_objects: milli,
            },
            0,
        )
        .is_err()
    {
        stats.live_full += 1;
    }
    heap_charge(stats, now);
    Ok(())
}

/// free(ptr), and the old pointer of realloc.
#[inline(always)]
pub fn on_free(ptr: u64) -> Result<(), i64> {
    if ptr == 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, _)) = target_of(tgid, kinds::HEAP) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    stats.frees += 1;
    if HEAP_LIVE.remove(&HeapPtr { ptr, tgid, _pad: 0 }).is_ok() {
        stats.sampled_frees += 1;
    }
    heap_charge(stats, now);
    Ok(())
}
