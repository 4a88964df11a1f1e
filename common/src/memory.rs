//! Memory profiling ABI: resident-memory growth (page faults, brk/mmap) and
//! live heap allocations (allocator uprobes). See ebpf/src/memory.rs and
//! ebpf/src/heap.rs.

/// [`MemTarget::kinds`] bits.
pub mod kinds {
    /// Record new anonymous pages and heap extensions (growth mode).
    pub const GROWTH: u32 = 1 << 0;
    /// Record sampled allocations (heap mode).
    pub const HEAP: u32 = 1 << 1;
}

/// A target of memory profiling, keyed by tgid in `MEM_TARGETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemTarget {
    /// Index of its counters in `MEM_STATS` (the sampler's slot).
    pub slot: u32,
    /// [`kinds`] bits.
    pub kinds: u32,
}

/// Shared (file or shmem) mappings excluded from growth, per target: a write
/// fault there brings in a file page, not an anonymous one.
pub const SHARED_RANGES: u32 = 16;

/// A `[start, end)` address range of `MEM_SHARED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

/// Index in `MEM_CONFIG` of the fault sampling: record 1 new page in N,
/// each standing for N (0 or 1: all). The governor's knob.
pub const CONFIG_FAULT_EVERY: u32 = 0;
/// Index in `MEM_CONFIG` of the page size, bytes.
pub const CONFIG_PAGE_SIZE: u32 = 1;
/// Index in `MEM_CONFIG` of the heap sampling mean, bytes.
pub const CONFIG_HEAP_MEAN: u32 = 2;

/// Entries of `HEAP_RAND` (exponential variates) and `HEAP_WEIGHTS`.
pub const HEAP_TABLE: u32 = 1024;
/// `HEAP_WEIGHTS` bins per sampling mean: the bin of a size is
/// `size * HEAP_BINS_PER_MEAN / mean`; sizes past the table weigh their size.
pub const HEAP_BINS_PER_MEAN: u64 = 64;

/// Offsets in this kernel's page-fault and syscall records (set at load from
/// tracefs format files).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemLayout {
    /// `exceptions:page_fault_user` `unsigned long address`.
    pub pf_address: u32,
    /// Its `unsigned long error_code`.
    pub pf_error_code: u32,
    /// `syscalls:sys_enter_mmap` `unsigned long len`.
    pub mmap_len: u32,
    /// Its `unsigned long flags`.
    pub mmap_flags: u32,
    /// `syscalls:sys_enter_brk` `unsigned long brk`.
    pub brk_brk: u32,
    /// Explicit padding.
    pub _pad: u32,
}

impl MemLayout {
    /// The x86-64 layouts of 5.x and 6.x kernels (the compiled direct loads).
    pub const DEFAULT: Self = Self {
        pf_address: 8,
        pf_error_code: 24,
        mmap_len: 24,
        mmap_flags: 40,
        brk_brk: 16,
        _pad: 0,
    };
}

impl Default for MemLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Per-target memory counters (per CPU), indexed by target slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// User page faults of the target seen (any kind).
    pub faults: u64,
    /// Faults that brought in a new anonymous page (recorded or not).
    pub new_pages: u64,
    /// New pages not recorded (1-in-N sampling).
    pub unsampled: u64,
    /// Faults in shared mappings (file pages, not counted).
    pub shared: u64,
    /// Records lost: count map full.
    pub lost: u64,
    /// brk/mmap calls that extended anonymous memory.
    pub extends: u64,
    /// Run time of the growth programs on this target, ns.
    pub prog_ns: u64,
    /// Allocator calls seen by the entry probes.
    pub calls: u64,
    /// Allocations sampled.
    pub sampled: u64,
    /// free() calls seen (and realloc of a non-null pointer).
    pub frees: u64,
    /// Frees of a sampled allocation.
    pub sampled_frees: u64,
    /// Sampled allocations not tracked: `HEAP_LIVE` full.
    pub live_full: u64,
    /// Return probes run.
    pub returns: u64,
    /// Run time of the heap programs on this target, ns.
    pub heap_prog_ns: u64,
    /// Memory events of DWARF targets sent as stack copies.
    pub dwarf_copies: u64,
    /// Of those, copies lost: ring buffer full.
    pub dwarf_lost: u64,
}

/// A sampled allocator call between its entry and return, keyed by tid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapPending {
    /// Bytes asked for.
    pub size: u64,
    /// Bytes it stands for (the sampling's unbiased weight).
    pub weight: u64,
    /// posix_memalign's `memptr` (0: the pointer is the return value).
    pub memptr: u64,
    /// The leaf's return address candidate (see `SampleKey::leaf_ret`).
    pub leaf_ret: u64,
    /// Its offset above the user stack pointer.
    pub leaf_offset: u32,
    /// User stack id in `HEAP_STACKS`, or errno.
    pub user_stack_id: i32,
    /// Kernel stack id (always `NO_STACK`: the allocator runs in user mode).
    pub kernel_stack_id: i32,
    /// Process.
    pub tgid: u32,
}

/// Key of `HEAP_LIVE`: a sampled allocation still live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeapPtr {
    /// Address returned by the allocator.
    pub ptr: u64,
    /// Process.
    pub tgid: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// A sampled live allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapLive {
    /// When it was allocated (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    /// Bytes asked for.
    pub size: u64,
    /// Bytes it stands for.
    pub weight: u64,
    /// Leaf return address candidate.
    pub leaf_ret: u64,
    /// Its offset.
    pub leaf_offset: u32,
    /// User stack id in `HEAP_STACKS`, or errno.
    pub user_stack_id: i32,
    /// Thread that allocated it.
    pub tid: u32,
    /// `NO_STACK`, or `DWARF_STACK` when `user_stack_id` is the id of a
    /// DWARF stack copy.
    pub kernel_stack_id: i32,
}

/// Allocations by stack (per CPU), in `HEAP_ALLOCS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapValue {
    /// Sampled allocations.
    pub samples: u64,
    /// Bytes they stand for.
    pub bytes: u64,
    /// Allocations they stand for, thousandths.
    pub milli_objects: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (see the asserts below).
    unsafe impl aya::Pod for super::MemTarget {}
    unsafe impl aya::Pod for super::MemRange {}
    unsafe impl aya::Pod for super::MemLayout {}
    unsafe impl aya::Pod for super::MemStats {}
    unsafe impl aya::Pod for super::HeapPending {}
    unsafe impl aya::Pod for super::HeapPtr {}
    unsafe impl aya::Pod for super::HeapLive {}
    unsafe impl aya::Pod for super::HeapValue {}
}

const _: () = assert!(core::mem::size_of::<MemTarget>() == 8);
const _: () = assert!(core::mem::size_of::<MemRange>() == 16);
const _: () = assert!(core::mem::size_of::<MemLayout>() == 24);
const _: () = assert!(core::mem::size_of::<MemStats>() == 128);
const _: () = assert!(core::mem::size_of::<HeapPending>() == 48);
const _: () = assert!(core::mem::size_of::<HeapPtr>() == 16);
const _: () = assert!(core::mem::size_of::<HeapLive>() == 48);
const _: () = assert!(core::mem::size_of::<HeapValue>() == 24);
