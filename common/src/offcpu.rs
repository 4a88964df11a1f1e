//! Off-CPU tracing ABI: what the `sched_switch` program keeps and sends.

/// Index in `OFFCPU_CONFIG` of the minimum block duration, ns (shorter
/// blocks are not recorded, like bcc offcputime's `--min-block-time`).
pub const CONFIG_MIN_BLOCK_NS: u32 = 0;

/// Index in `OFFCPU_CONFIG` of the switch-out sampling: record 1 block in
/// N (0 or 1: all), each standing for N. The governor's knob for off-CPU
/// cost, which grows with how often the target blocks, not with a rate.
pub const CONFIG_SAMPLE_EVERY: u32 = 1;

/// Bits of a target in `OFFCPU_TGIDS`: one per pid, 64 pids per word, so
/// the non-target path is an (inlined) array access, not a hash lookup.
pub const TGID_WORDS: u32 = 4_194_304 / 64;

/// A target thread that went off CPU, keyed by tid in `OFFCPU_START`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffStart {
    /// When it went off CPU (bpf_ktime_get_ns, CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Its process.
    pub tgid: u32,
    /// `prev_state` at the switch (0: preempted while runnable).
    pub state: u32,
    /// User stack id in `OFFCPU_STACKS` (frame-pointer targets), or errno.
    pub user_stack_id: i32,
    /// Kernel stack id in `OFFCPU_STACKS`, or errno.
    pub kernel_stack_id: i32,
    /// Sequence number joining a DWARF begin record to its end.
    pub seq: u32,
    /// Whether the user stack went out as a DWARF begin record.
    pub dwarf: u32,
    /// How many blocks this one stands for (the sampling in force).
    pub weight: u32,
    /// Where `leaf_ret` was, bytes above the user stack pointer.
    pub leaf_offset: u32,
    /// The leaf's return address candidate (see `SampleKey::leaf_ret`).
    pub leaf_ret: u64,
}

/// End of a DWARF-mode block, sent to `OFFCPU_ENDS`: the begin record with
/// the same (tid, seq) carried the stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffEnd {
    /// Process.
    pub tgid: u32,
    /// Thread.
    pub tid: u32,
    /// Joins the begin record.
    pub seq: u32,
    /// How many blocks it stands for.
    pub weight: u32,
    /// Time off CPU, ns.
    pub blocked_ns: u64,
    /// The part of it after the thread's probed call ran past its budget,
    /// ns (slow-call profiles; 0 otherwise).
    pub slow_ns: u64,
}

/// Per-target off-CPU counters (per CPU), indexed by target slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffStats {
    /// Blocks recorded (≥ the minimum).
    pub blocks: u64,
    /// Blocks shorter than the minimum.
    pub short: u64,
    /// Switch-outs not traced (sampling).
    pub unsampled: u64,
    /// Time blocked in recorded blocks, ns.
    pub blocked_ns: u64,
    /// Starts not recorded: `OFFCPU_START` full.
    pub start_full: u64,
    /// Records lost: ring buffer or count map full.
    pub lost: u64,
    /// Run time of the program on this target's switches, ns (the part of
    /// its cost the target pays; the rest runs for other processes).
    pub prog_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (see the asserts below).
    unsafe impl aya::Pod for super::OffStart {}
    unsafe impl aya::Pod for super::OffEnd {}
    unsafe impl aya::Pod for super::OffStats {}
}

const _: () = assert!(core::mem::size_of::<OffStart>() == 48);
const _: () = assert!(core::mem::size_of::<OffEnd>() == 32);
const _: () = assert!(core::mem::size_of::<OffStats>() == 56);
