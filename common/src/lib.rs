//! The ABI shared by the eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields where alignment would add some) and is `Copy`, so the kernel and
//! userspace agree on the bytes. With the `user` feature the types also
//! implement `aya::Pod` so the agent can read them out of maps.
#![no_std]

pub mod crash;

pub mod offcpu;

pub mod memory;

pub mod tcp;

pub mod probe;

/// Maximum frames of one stack (the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// Number of sample-count/stack-map pairs. The agent flips between them so it
/// can drain one while the kernel fills the other (see `ebpf/src/maps.rs`).
pub const GENERATIONS: u32 = 2;

/// Maximum number of target processes at once (size of the target slot table).
pub const MAX_TARGETS: u32 = 64;

/// Bits of [`TargetInfo::flags`].
pub mod target_flags {
    /// Record kernel stacks for this target.
    pub const KERNEL_STACKS: u32 = 1 << 0;
    /// Copy registers and a window of the user stack to userspace for DWARF
    /// unwinding, instead of walking frame pointers in the kernel.
    pub const DWARF: u32 = 1 << 1;
    /// Do not keep the leaf fix-up's word (`--no-leaf-fixup`).
    pub const NO_LEAF_FIXUP: u32 = 1 << 2;
    /// Frame-pointer target under `--unwind auto`: also send 1 sample in
    /// [`super::FP_CHECK_EVERY`] as a DWARF copy (flag
    /// [`super::sample_flags::FP_CHECK`]) for the agent to check the walk.
    pub const FP_CHECK: u32 = 1 << 3;
    /// A latency probe of this target has a budget: the sampler looks up
    /// the thread's in-flight call (`SLOW_CALLS`) to find slow-call samples.
    /// A high bit, to stay clear of flags added alongside.
    pub const SLOW_CALLS: u32 = 1 << 8;
}

/// A frame-pointer target checked by `--unwind auto` sends 1 sample in this
/// many (per CPU) as a DWARF copy too. Power of two (a mask in the kernel).
/// Cost: one stack copy (the DWARF window, 16 KiB by default) and one
/// userspace unwind per 16 samples, ~1/16 of DWARF mode's extra cost.
pub const FP_CHECK_EVERY: u64 = 16;

/// Index into [`GlobalConfig`]-array entries (`CONFIG` map).
pub mod config_index {
    /// Which generation of the sample maps the kernel writes to (0 or 1).
    pub const GENERATION: u32 = 0;
    /// Bytes of user stack copied per DWARF sample (≤ [`super::MAX_STACK_WINDOW`]).
    pub const STACK_WINDOW: u32 = 1;
}

/// Largest user stack window a DWARF sample can carry. A [`StackSample`]
/// lives in a per-CPU array, whose values are limited to 32 KiB.
pub const MAX_STACK_WINDOW: usize = 30 * 1024;

/// Default user stack window (`--stack-window`).
pub const DEFAULT_STACK_WINDOW: usize = 16 * 1024;

/// Bits of [`StackSampleHeader::flags`].
pub mod sample_flags {
    /// The sample interrupted kernel code; the user registers come from the
    /// task's saved user context (the syscall or interrupt entry).
    pub const IN_KERNEL: u32 = 1 << 0;
    /// The user registers could not be read.
    pub const NO_USER_REGS: u32 = 1 << 1;
    /// Not a CPU sample: the stacks of a target thread going off CPU; the
    /// header's `_pad` carries the sequence number of the block, and an
    /// [`super::offcpu::OffEnd`] with that number follows when it ends.
    pub const OFFCPU_BEGIN: u32 = 1 << 2;
    /// Not a CPU sample: the stack of a target thread raising a fatal
    /// signal; `_pad` carries the `seq` of its [`super::crash::CrashEvent`].
    pub const CRASH: u32 = 1 << 3;
    /// Not a sample to aggregate: the copy of a frame-pointer sample (which
    /// the aggregation map already counted) for `--unwind auto`'s check.
    /// `kernel_ips` holds the *user* stack as the kernel's frame-pointer
    /// walk saw it (`kernel_frames` of them, leaf first; no kernel stack),
    /// `leaf_ret`/`leaf_offset` the leaf fix-up's word.
    pub const FP_CHECK: u32 = 1 << 4;
    /// With `FP_CHECK`: the target's leaf fix-up is off, so no leaf word is
    /// kept (the check compares what the profile gets).
    pub const NO_LEAF_WORD: u32 = 1 << 5;
    /// Not a CPU sample: a memory event of a DWARF target (a new anonymous
    /// page, or with [`MEM_EXTEND`] a brk/mmap extension). `period_ns`
    /// carries its weight in bytes, `_pad` how many events it stands for
    /// (pages, or 1 for an extension; N under 1-in-N sampling).
    pub const MEMORY: u32 = 1 << 6;
    /// With [`MEMORY`]: a brk/mmap extension rather than a page fault.
    pub const MEM_EXTEND: u32 = 1 << 7;
    /// Not a sample to aggregate: the stack of a sampled allocation of a
    /// DWARF target in heap mode; `_pad` carries its id, the
    /// `user_stack_id` of its `HEAP_ALLOCS` and `HEAP_LIVE` entries (with
    /// `kernel_stack_id` [`super::DWARF_STACK`]).
    pub const HEAP: u32 = 1 << 9;
    /// Taken while the thread's probed call had run past its budget (a
    /// slow-call sample: it counts in the slow-call profile too).
    pub const SLOW: u32 = 1 << 8;
}

/// What a DWARF sample sends to userspace: registers, kernel stack, and the
/// number of user stack bytes that follow the header in [`StackSample`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackSampleHeader {
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Sampling period, ns of CPU time (the sample's weight).
    pub period_ns: u64,
    /// User instruction pointer.
    pub ip: u64,
    /// User stack pointer (the copied window starts here).
    pub sp: u64,
    /// User frame pointer (rbp), for frames without unwind info.
    pub bp: u64,
    /// Bytes of user stack copied after the header.
    pub stack_len: u32,
    /// Kernel frames in `kernel_ips` (0 for a sample in user mode).
    pub kernel_frames: u32,
    /// [`sample_flags`] bits.
    pub flags: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// [`sample_flags::FP_CHECK`] records: the leaf fix-up's word (as
    /// [`SampleKey::leaf_ret`]); 0 otherwise.
    pub leaf_ret: u64,
    /// Where `leaf_ret` was: bytes above `sp`.
    pub leaf_offset: u32,
    /// Explicit padding.
    pub _pad2: u32,
    /// Kernel instruction pointers, leaf first.
    pub kernel_ips: [u64; MAX_STACK_DEPTH],
}

/// A DWARF sample as built in the kernel's per-CPU scratch: only the header
/// and `stack_len` bytes of `stack` are sent.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSample {
    /// Registers and kernel stack.
    pub header: StackSampleHeader,
    /// The user stack from `header.sp` up.
    pub stack: [u8; MAX_STACK_WINDOW],
}

/// What the kernel knows of one target process, keyed by tgid in `TARGETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    /// Index of this target's counters in `TARGET_STATS` (< [`MAX_TARGETS`]).
    pub slot: u32,
    /// [`target_flags`] bits.
    pub flags: u32,
}

/// Key of the in-kernel sample aggregation: one entry per distinct
/// (thread, user stack, kernel stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    /// Process id (tgid).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Id in the generation's stack map, or a negative errno when the stack
    /// could not be recorded (`-EEXIST`: bucket collision, `-EFAULT`: unreadable).
    pub user_stack_id: i32,
    /// Same for the kernel stack; [`NO_STACK`] when kernel stacks are off.
    pub kernel_stack_id: i32,
    /// Frame-pointer stacks: the first of the [`LEAF_WORDS`] words at the
    /// user stack pointer that looks like a return address (0: none). When
    /// the leaf function has set up no frame, it is the return address into
    /// the leaf's caller, which the frame-pointer walk skips; the agent
    /// checks that against the leaf's CFA rule (see `agent/src/unwind/leaf.rs`).
    pub leaf_ret: u64,
    /// Where `leaf_ret` was: bytes above the user stack pointer.
    pub leaf_offset: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Words above the user stack pointer searched for the leaf's return
/// address: a leaf that set up no frame has pushed or reserved at most this
/// much (glibc's cancellable syscall wrappers reserve 40 bytes, CFA =
/// rsp+48; its select() pushes six registers and reserves 56 bytes, CFA =
/// rsp+112).
pub const LEAF_WORDS: usize = 16;

/// `SampleKey::kernel_stack_id` when no kernel stack was asked for.
pub const NO_STACK: i32 = i32::MIN;

/// `kernel_stack_id` of a heap record whose `user_stack_id` is the id of a
/// DWARF stack copy ([`sample_flags::HEAP`]), not a stack map id.
pub const DWARF_STACK: i32 = i32::MIN + 1;

/// Value of the in-kernel sample aggregation (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleValue {
    /// Number of samples.
    pub count: u64,
    /// Sum of the sampling periods of these samples, in nanoseconds of CPU
    /// time: the time-proportional weight when the rate changes mid-session.
    pub period_ns: u64,
}

/// Per-target counters (per CPU, summed by the agent), in `TARGET_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetStats {
    /// Samples taken of this target.
    pub samples: u64,
    /// Sum of their periods (ns of CPU time).
    pub period_ns: u64,
    /// Samples whose user stack collided in the stack map (`-EEXIST`).
    pub user_stack_collisions: u64,
    /// Samples whose user stack could not be read (other errors).
    pub user_stack_errors: u64,
    /// Same as above for kernel stacks.
    pub kernel_stack_collisions: u64,
    /// Same as above for kernel stacks.
    pub kernel_stack_errors: u64,
    /// Samples lost because the aggregation map was full.
    pub map_full: u64,
    /// DWARF samples sent to userspace.
    pub dwarf_samples: u64,
    /// DWARF samples lost: ring buffer full.
    pub dwarf_lost: u64,
    /// DWARF samples whose user stack could not be read at all.
    pub dwarf_stack_unreadable: u64,
    /// Copies of frame-pointer samples sent for `--unwind auto`'s check.
    pub fp_checks: u64,
    /// Of those, copies lost: ring buffer full.
    pub fp_checks_lost: u64,
}

/// Samples that hit a process inheriting a target's perf event without being
/// a target itself (a child forked by the target). Index 0 of `FOREIGN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForeignStats {
    /// Samples dropped because their tgid is not a target.
    pub samples: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (checked by
    // the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::TargetInfo {}
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::SampleValue {}
    unsafe impl aya::Pod for super::TargetStats {}
    unsafe impl aya::Pod for super::ForeignStats {}
    unsafe impl aya::Pod for super::StackSampleHeader {}
}

// No padding surprises: each size is the sum of its fields.
const _: () = assert!(core::mem::size_of::<TargetInfo>() == 8);
const _: () = assert!(core::mem::size_of::<SampleKey>() == 32);
const _: () = assert!(core::mem::size_of::<SampleValue>() == 16);
const _: () = assert!(core::mem::size_of::<StackSampleHeader>() == 72 + 8 * MAX_STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<StackSample>() <= 32 * 1024);
const _: () = assert!(core::mem::size_of::<TargetStats>() == 96);
