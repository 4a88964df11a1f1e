//! Every map of the kernel side, with its size and why that size.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::TracePointContext,
    EbpfContext as _,
};
use flamewatch_common::{
    ForeignStats, SampleKey, SampleValue, StackSample, TargetInfo, TargetStats, MAX_TARGETS,
};

/// Reads a field of the tracepoint record: a direct context load, which
/// costs less than `bpf_probe_read_kernel` (what `read_at` calls).
///
/// # Safety
/// `offset` must be a field of the record of the program's tracepoint, of
/// type `T`, aligned to its size, at or past byte 8.
#[inline(always)]
pub unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the caller guarantees a constant, aligned, in-record offset,
    // which is what the verifier accepts for a direct context read.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

/// Reads the field at `offset` of the record, where `offset` comes from a
/// layout global (read-only data: a known constant to the verifier, which
/// explores only the branch taken). At the offset the program was compiled
/// for (`compiled`), a direct load; at another, a helper copy (any
/// alignment); at `ABSENT` (0, the common header: never a program's field),
/// zero.
///
/// # Safety
/// `compiled` must satisfy [`field`]'s contract for `T`; `offset` must be a
/// field of type `T` of the record, or `ABSENT`.
#[inline(always)]
pub unsafe fn field_at<T: Copy + Default>(ctx: &TracePointContext, offset: usize, compiled: usize) -> T {
    if offset == compiled {
        // SAFETY: the caller's contract.
        unsafe { field(ctx, compiled) }
    } else if offset == 0 {
        T::default()
    } else {
        // SAFETY: bpf_probe_read_kernel of the record; a bad offset reads
        // garbage, not out of bounds (the helper checks).
        unsafe { ctx.read_at::<T>(offset) }.unwrap_or_default()
    }
}

/// A field offset of a layout global, read so that the compiler cannot fold
/// in the default (the agent sets the value at load).
macro_rules! layout_offset {
    ($global:ident . $field:ident) => {
        // SAFETY: reading a plain static.
        (unsafe { core::ptr::read_volatile(&$global.$field) } as usize)
    };
}
pub(crate) use layout_offset;

/// When this CPU last logged (ns): kernel-side warnings are rate-limited.
#[map]
pub static LOG_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether this CPU may log now: one message a second at most, so that a
/// condition met on every sample (a full map) cannot flood the agent. The
/// counters keep the exact numbers; the log says it is happening.
#[inline(always)]
pub fn may_log() -> bool {
    let Some(last) = LOG_AT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < 1_000_000_000 {
            return false;
        }
        *last = now;
    }
    true
}

/// Whether an event sampled 1 in `every` is dropped. The draw is random
/// rather than every N-th event of a counter: a target whose events come
/// in a fixed cycle (two 1 ms sleeps in one caller, one in another) would
/// otherwise alias with N and always keep the same positions of the cycle
/// (N = 3 keeps one caller only). The kept events weigh `every`, so the
/// totals stay unbiased either way.
#[inline(always)]
pub fn sampled_out(every: u64) -> bool {
    if every <= 1 {
        return false;
    }
    // SAFETY: no preconditions.
    let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
    u64::from(r) % every != 0
}

/// The processes being profiled, keyed by tgid. Every program's first (and,
/// for non-targets, only) lookup.
#[map]
pub static TARGETS: HashMap<u32, TargetInfo> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Small global settings written by the agent (see `config_index`).
#[map]
pub static CONFIG: Array<u32> = Array::with_max_entries(4, 0);

/// Per-target counters, indexed by `TargetInfo::slot`. Per CPU because the
/// bpf target has no atomic fetch-add; the agent sums the CPUs.
#[map]
pub static TARGET_STATS: PerCpuArray<TargetStats> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// Samples of processes that inherited a target's perf event (forked
/// children): their cost is the target's profiling cost too.
#[map]
pub static FOREIGN: PerCpuArray<ForeignStats> = PerCpuArray::with_max_entries(1, 0);

/// Distinct (thread, user stack, kernel stack) per generation. 16 Ki keys is
/// ~16 s of 999 Hz samples with all-distinct stacks on one thread; the agent
/// drains a generation every second, and a full map is counted (`map_full`).
pub const SAMPLE_ENTRIES: u32 = 16384;

/// Sample counts, generation 0.
#[map]
pub static COUNTS_0: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(SAMPLE_ENTRIES, 0);
/// Sample counts, generation 1.
#[map]
pub static COUNTS_1: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(SAMPLE_ENTRIES, 0);

/// Stack map buckets per generation. A stack map is a table of buckets
/// indexed by hash: a different stack in the same bucket is a collision
/// (`-EEXIST`), counted, never overwritten (BPF_F_REUSE_STACKID would silently
/// re-attribute older samples). Draining every second keeps the number of
/// live stacks, hence collisions, low; each bucket holds 127 frames (1 KiB).
pub const STACK_ENTRIES: u32 = 16384;

/// User and kernel stacks, generation 0.
#[map]
pub static STACKS_0: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);
/// User and kernel stacks, generation 1.
#[map]
pub static STACKS_1: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

/// Scratch space to build one DWARF sample (registers, kernel stack, user
/// stack window) before it is copied to the ring buffer: ~31 KiB is far more
/// than the 512-byte BPF stack, and per-CPU values cap at 32 KiB.
#[map]
pub static SCRATCH: PerCpuArray<StackSample> = PerCpuArray::with_max_entries(1, 0);

/// DWARF samples on their way to the agent's unwinder. The agent sizes it at
/// load time (`EbpfLoader::set_max_entries`): a page when no target needs
/// DWARF, and ~0.5 s of samples at the requested rate otherwise.
#[map]
pub static STACK_SAMPLES: RingBuf = RingBuf::with_byte_size(4096, 0);

// ---- TCP state tracking (ebpf/src/tcp.rs) ----
// Its own target table: `flamewatch tcp` and `watch` track TCP on processes
// they do not sample, so membership differs from `TARGETS`.

/// Targets of TCP tracking: tgid → slot in `TCP_STATS`. Same bound as the
/// sampler's table.
#[map]
pub static TCP_TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Live sockets of the targets: socket address → owner, recorded when a
/// target connects, listens, closes, or a connection arrives on its
/// listening port; forgotten at CLOSE (the address is reused at once).
/// 64 Ki live connections across all targets (LogCaster collapses past ~1000;
/// a busy proxy holds tens of thousands); ~4 MiB preallocated. A failed
/// insert is counted (`untracked_sockets`).
pub const TCP_SOCK_ENTRIES: u32 = 65536;

/// See [`TCP_SOCK_ENTRIES`].
#[map]
pub static TCP_SOCKS: HashMap<u64, flamewatch_common::tcp::TcpSock> =
    HashMap::with_max_entries(TCP_SOCK_ENTRIES, 0);

/// Listening ports of the targets → tgid: connections accepted on them are
/// the target's, whoever's context the handshake runs in. A process listens
/// on a handful of ports: 16 per target. Overflow counted (`listen_map_full`).
#[map]
pub static TCP_LISTEN: HashMap<u32, u32> = HashMap::with_max_entries(16 * MAX_TARGETS, 0);

/// Target sockets that just went to CLOSE, for the reset the kernel sends
/// *after* setting CLOSE (tcp_disconnect, __tcp_close): an entry is needed
/// for microseconds, so an LRU of 4 Ki covers any burst of closes; losing an
/// old one only loses the attribution of a late reset.
#[map]
pub static TCP_RECENT_CLOSE: aya_ebpf::maps::LruHashMap<u64, flamewatch_common::tcp::TcpRecentClose> =
    aya_ebpf::maps::LruHashMap::with_max_entries(4096, 0);

/// Per-target TCP counters, indexed by the slot of `TCP_TARGETS`. Per CPU
/// (no atomic fetch-add on the bpf target); 1.4 KiB per target and CPU.
#[map]
pub static TCP_STATS: PerCpuArray<flamewatch_common::tcp::TcpStats> =
    PerCpuArray::with_max_entries(MAX_TARGETS, 0);

/// TCP counters not tied to a target (index 0).
#[map]
pub static TCP_GLOBAL: PerCpuArray<flamewatch_common::tcp::TcpGlobalStats> =
    PerCpuArray::with_max_entries(1, 0);

/// TCP settings written by the agent (`tcp_config_index`).
#[map]
pub static TCP_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Size of [`TCP_EVENTS`]: 16 Ki events of 64 bytes (56 + the 8-byte ring
/// header). The kernel wakes the agent when a quarter is filled (else it
/// reads every 100 ms), leaving 12 Ki events of headroom for its latency.
pub const TCP_EVENTS_BYTES: u32 = 1 << 20;

/// Individual TCP events of the targets (TIME_WAIT entries; everything in
/// detail mode). Full ring: counted per target (`lost_events`).
#[map]
pub static TCP_EVENTS: RingBuf = RingBuf::with_byte_size(TCP_EVENTS_BYTES, 0);
