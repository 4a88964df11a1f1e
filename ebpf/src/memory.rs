//! Resident-memory growth by stack: new anonymous pages, and the brk/mmap
//! calls that extend anonymous memory.
//!
//! `exceptions:page_fault_user` fires before the fault is handled. A write
//! to a page that is not present brings in a new anonymous page (a fresh
//! one in anonymous memory, a private copy in a private file mapping); a
//! read of a missing anonymous page maps the shared zero page, and a read
//! of a file page reads the page cache: neither grows anonymous memory.
//! Writes into the target's shared mappings (files, shmem; the agent lists
//! them in `MEM_SHARED`) are left out. Each recorded page weighs the page
//! size; at high fault rates 1 page in N is recorded, weighing N.
//!
//! Stacks are collected as the CPU sampler's: for frame-pointer targets,
//! stack ids with the leaf fix-up's word, aggregated in the kernel like
//! off-CPU blocks; for DWARF targets, a stack copy per recorded event to the
//! ring buffer (`sample_flags::MEMORY`, the weight in bytes in
//! `period_ns`), which the agent unwinds into the memory profile. The
//! user registers are the ones saved at kernel entry (the fault or the
//! syscall): `copy_stack`'s in-kernel path.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext as _, TracePointContext},
    EbpfContext as _,
};
use flamewatch_common::{
    memory::{
        kinds, MemLayout, MemRange, MemStats, MemTarget, CONFIG_FAULT_EVERY, CONFIG_PAGE_SIZE, SHARED_RANGES,
    },
    sample_flags, target_flags, SampleKey, SampleValue, MAX_TARGETS, NO_STACK,
};

use crate::{
    maps::{field_at, layout_offset, sampled_out, TARGETS},
    sampling::{copy_stack, Copied},
};

/// Memory-profiled processes. Its own table: memory profiling is asked for
/// per target, independently of CPU sampling.
#[map]
pub static MEM_TARGETS: HashMap<u32, MemTarget> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Per-target counters, indexed by `MemTarget::slot`.
#[map]
pub static MEM_STATS: PerCpuArray<MemStats> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Settings (`memory::CONFIG_*`).
#[map]
pub static MEM_CONFIG: Array<u64> = Array::with_max_entries(4, 0);

/// Shared mappings of each target: `SHARED_RANGES` per slot.
#[map]
pub static MEM_SHARED: Array<MemRange> = Array::with_max_entries(MAX_TARGETS * SHARED_RANGES, 0);

/// New pages by (thread, user stack, kernel stack): `count` pages,
/// `period_ns` bytes. Allocation sites are few: 8 Ki keys per drain.
#[map]
pub static MEM_COUNTS: PerCpuHashMap<SampleKey, SampleValue> = PerCpuHashMap::with_max_entries(8192, 0);

/// brk/mmap extensions by stack: `count` calls, `period_ns` bytes.
#[map]
pub static MEM_EXTENDS: PerCpuHashMap<SampleKey, SampleValue> = PerCpuHashMap::with_max_entries(4096, 0);

/// Stacks of growth (not generational, like off-CPU's: stacks repeat and
/// the agent drains counts, not stacks). Sized by the agent at load.
#[map]
pub static MEM_STACKS: StackTrace = StackTrace::with_max_entries(8192, 0);

/// The last brk of each target, to weigh the next one by its increment.
#[map]
pub static MEM_BRK: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Offsets of this kernel's records, set by the agent at load.
#[unsafe(no_mangle)]
static MEM_LAYOUT: MemLayout = MemLayout::DEFAULT;

const MAP_ANONYMOUS: u64 = 0x20;

/// The counters of `tgid` when it is a target of `kind`, and its sampler
/// flags (`target_flags`: kernel stacks, DWARF).
#[inline(always)]
pub fn target_of(tgid: u32, kind: u32) -> Option<(&'static mut MemStats, u32)> {
    // SAFETY: plain map lookup of a Copy value.
    let t = unsafe { MEM_TARGETS.get(&tgid) }.copied()?;
    if t.kinds & kind == 0 {
        return None;
    }
    let stats = MEM_STATS.get_ptr_mut(t.slot)?;
    // SAFETY: plain map lookup of a Copy value.
    let flags = unsafe { TARGETS.get(&tgid) }.map_or(0, |i| i.flags);
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    Some((unsafe { &mut *stats }, flags))
}

fn slot_of(tgid: u32) -> u32 {
    // SAFETY: plain map lookup of a Copy value.
    unsafe { MEM_TARGETS.get(&tgid) }.map_or(0, |t| t.slot)
}

fn in_shared(slot: u32, addr: u64) -> bool {
    for i in 0..SHARED_RANGES {
        let Some(r) = MEM_SHARED.get(slot * SHARED_RANGES + i) else {
            return false;
        };
        if r.end == 0 {
            return false;
        }
        if addr >= r.start && addr < r.end {
            return true;
        }
    }
    false
}

/// Records one memory event of the current thread weighing `count` events
/// and `bytes`: a stack copy for a DWARF target (`extend`: a brk/mmap
/// extension), else its stack ids counted in `map`.
// Inlined: one call site per program (the stack copy is large).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &TracePointContext,
    map: &PerCpuHashMap<SampleKey, SampleValue>,
    stats: &mut MemStats,
    (tgid, tid): (u32, u32),
    flags: u32,
    count: u64,
    bytes: u64,
    extend: bool,
) {
    let kernel = flags & target_flags::KERNEL_STACKS != 0;
    if flags & target_flags::DWARF != 0 {
        let kind = if extend {
            sample_flags::MEMORY | sample_flags::MEM_EXTEND
        } else {
            sample_flags::MEMORY
        };
        match copy_stack(ctx.as_ptr(), None, tgid, tid, bytes, kernel, kind, count as u32) {
            Copied::Sent { .. } => stats.dwarf_copies += 1,
            Copied::Lost => {
                stats.dwarf_lost += 1;
                stats.lost += 1;
            }
        }
        return;
    }
    let key = key_of(ctx, tgid, tid, kernel);
    if !add(map, &key, count, bytes) {
        stats.lost += 1;
    }
}

/// The aggregation key of the current thread's stacks.
#[inline(always)]
fn key_of(ctx: &TracePointContext, tgid: u32, tid: u32, kernel: bool) -> SampleKey {
    let user_stack_id = match ctx.get_stackid(&MEM_STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(e) => e as i32,
    };
    let (leaf_ret, leaf_offset) = if user_stack_id >= 0 {
        crate::leaf::leaf_word(crate::leaf::user_sp(None))
    } else {
        (0, 0)
    };
    let kernel_stack_id = if kernel {
        match ctx.get_stackid(&MEM_STACKS, 0) {
            Ok(id) => id as i32,
            Err(e) => e as i32,
        }
    } else {
        NO_STACK
    };
    SampleKey {
        tgid,
        tid,
        user_stack_id,
        kernel_stack_id,
        leaf_ret,
        leaf_offset,
        _pad: 0,
    }
}

#[inline(always)]
fn add(map: &PerCpuHashMap<SampleKey, SampleValue>, key: &SampleKey, count: u64, bytes: u64) -> bool {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*v).count += count;
            (*v).period_ns += bytes;
        }
        true
    } else {
        map.insert(
            key,
            &SampleValue {
                count,
                period_ns: bytes,
            },
            0,
        )
        .is_ok()
    }
}

fn charge(stats: &mut MemStats, since: u64) {
    // SAFETY: no preconditions.
    let end = unsafe { bpf_ktime_get_ns() };
    stats.prog_ns += end.saturating_sub(since);
}

pub fn try_page_fault(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, flags)) = target_of(tgid, kinds::GROWTH) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    stats.faults += 1;
    // SAFETY: error_code is an aligned u64 of the record, at this kernel's offset.
    let error_at = layout_offset!(MEM_LAYOUT.pf_error_code);
    // SAFETY: see above.
    let error = unsafe { field_at::<u64>(ctx, error_at, 24) };
    // x86 page fault error code: bit 0 protection (page present), bit 1 write.
    if error & 3 != 2 {
        charge(stats, now);
        return Ok(());
    }
    // SAFETY: as above.
    let addr_at = layout_offset!(MEM_LAYOUT.pf_address);
    // SAFETY: see above.
    let addr = unsafe { field_at::<u64>(ctx, addr_at, 8) };
    if in_shared(slot_of(tgid), addr) {
        stats.shared += 1;
        charge(stats, now);
        return Ok(());
    }
    stats.new_pages += 1;
    let every = MEM_CONFIG.get(CONFIG_FAULT_EVERY).copied().unwrap_or(1).max(1);
    if sampled_out(every) {
        stats.unsampled += 1;
        charge(stats, now);
        return Ok(());
    }
    let page = MEM_CONFIG.get(CONFIG_PAGE_SIZE).copied().unwrap_or(4096);
    let ids = (tgid, pid_tgid as u32);
    record(ctx, &MEM_COUNTS, stats, ids, flags, every, page * every, false);
    charge(stats, now);
    Ok(())
}

pub fn try_mmap(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, tflags)) = target_of(tgid, kinds::GROWTH) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: aligned u64 fields of the record, at this kernel's offsets.
    let flags_at = layout_offset!(MEM_LAYOUT.mmap_flags);
    // SAFETY: see above.
    let flags = unsafe { field_at::<u64>(ctx, flags_at, 40) };
    // SAFETY: as above.
    let len_at = layout_offset!(MEM_LAYOUT.mmap_len);
    // SAFETY: see above.
    let len = unsafe { field_at::<u64>(ctx, len_at, 24) };
    if flags & MAP_ANONYMOUS != 0 && len != 0 {
        extend(ctx, stats, (tgid, pid_tgid as u32), tflags, len);
    }
    charge(stats, now);
    Ok(())
}

pub fn try_brk(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some((stats, flags)) = target_of(tgid, kinds::GROWTH) else {
        return Ok(());
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: an aligned u64 field of the record, at this kernel's offset.
    let brk_at = layout_offset!(MEM_LAYOUT.brk_brk);
    // SAFETY: see above.
    let brk = unsafe { field_at::<u64>(ctx, brk_at, 16) };
    // brk(0) asks where the break is.
    if brk != 0 {
        // SAFETY: plain map lookup of a Copy value.
        let last = unsafe { MEM_BRK.get(&tgid) }.copied().unwrap_or(0);
        if last != 0 && brk > last {
            extend(ctx, stats, (tgid, pid_tgid as u32), flags, brk - last);
        }
        let _ = MEM_BRK.insert(&tgid, &brk, 0);
    }
    charge(stats, now);
    Ok(())
}

#[inline(always)]
fn extend(ctx: &TracePointContext, stats: &mut MemStats, ids: (u32, u32), flags: u32, bytes: u64) {
    stats.extends += 1;
    record(ctx, &MEM_EXTENDS, stats, ids, flags, 1, bytes, true);
}
