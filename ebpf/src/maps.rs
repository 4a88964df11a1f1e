//! Every map of the kernel side, with its size and why that size.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};
use flamewatch_common::{
    ForeignStats, SampleKey, SampleValue, StackSample, TargetInfo, TargetStats, MAX_TARGETS,
};

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
