//! Crash, abort, OOM and exit capture ABI: what the crash programs keep and
//! send (ebpf/src/crash.rs, agent/src/crash/).

use crate::MAX_STACK_DEPTH;

/// [`CrashEvent::kind`]: a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
/// SIGABRT) raised in a target thread's own context.
pub const KIND_SIGNAL: u32 = 1;
/// [`CrashEvent::kind`]: the OOM killer chose a target (`oom:mark_victim`).
pub const KIND_OOM: u32 = 2;
/// [`CrashEvent::kind`]: a target's last thread exited with a non-zero
/// `exit_group` status.
pub const KIND_EXIT: u32 = 3;

/// Bits of [`CrashEvent::flags`].
pub mod crash_flags {
    /// `fault_*` hold the thread's last user page fault.
    pub const FAULT: u32 = 1 << 0;
    /// A DWARF stack copy went to `STACK_SAMPLES` with the sample flag
    /// [`crate::sample_flags::CRASH`] and this event's `seq`.
    pub const DWARF: u32 = 1 << 1;
    /// The DWARF copy was lost (ring full).
    pub const DWARF_LOST: u32 = 1 << 2;
}

/// A thread's last user page fault, by tid in `CRASH_FAULTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// Faulting data address.
    pub addr: u64,
    /// Instruction that faulted.
    pub ip: u64,
    /// When (bpf_ktime_get_ns).
    pub ts_ns: u64,
}

/// One captured crash, OOM kill or failed exit, sent to `CRASH_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CrashEvent {
    /// [`KIND_SIGNAL`], [`KIND_OOM`] or [`KIND_EXIT`].
    pub kind: u32,
    /// Process.
    pub tgid: u32,
    /// Thread (the faulting one for signals).
    pub tid: u32,
    /// Signal number (signals).
    pub signal: i32,
    /// `si_code` (signals).
    pub code: i32,
    /// `exit_group` status (exits).
    pub exit_code: i32,
    /// When (bpf_ktime_get_ns, CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Faulting address of the last user page fault ([`crash_flags::FAULT`]).
    pub fault_addr: u64,
    /// Instruction of that fault.
    pub fault_ip: u64,
    /// Time from that fault to the signal, ns.
    pub fault_age_ns: u64,
    /// Anonymous resident memory of an OOM victim, KiB.
    pub anon_rss_kb: u64,
    /// Joins the DWARF stack copy ([`crash_flags::DWARF`]).
    pub seq: u32,
    /// [`crash_flags`] bits.
    pub flags: u32,
    /// Thread name.
    pub comm: [u8; 16],
    /// Leaf fix-up word (see `SampleKey::leaf_ret`).
    pub leaf_ret: u64,
    /// Where it was, bytes above the user stack pointer.
    pub leaf_offset: u32,
    /// Valid entries of `user_ips`.
    pub user_frames: u32,
    /// Valid entries of `kernel_ips`.
    pub kernel_frames: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// User stack by frame pointers, leaf (the faulting instruction) first.
    pub user_ips: [u64; MAX_STACK_DEPTH],
    /// Kernel stack, leaf first.
    pub kernel_ips: [u64; MAX_STACK_DEPTH],
}

/// Offsets in this kernel's records of the crash tracepoints, set by the
/// agent at load (agent/src/layout.rs) as the `CRASH_LAYOUT` global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashLayout {
    /// `signal_generate`: `int sig`.
    pub sig: u32,
    /// `signal_generate`: `int code`.
    pub code: u32,
    /// `signal_generate`: `pid_t pid` (the receiving thread).
    pub sig_pid: u32,
    /// `page_fault_user`: `unsigned long address`.
    pub pf_address: u32,
    /// `page_fault_user`: `unsigned long ip`.
    pub pf_ip: u32,
    /// `mark_victim`: `int pid`.
    pub oom_pid: u32,
    /// `mark_victim`: `unsigned long anon_rss` (optional).
    pub oom_anon_rss: u32,
    /// `sys_enter_exit_group`: `int error_code` (8 bytes in the record).
    pub exit_error_code: u32,
    /// `sched_process_exit`: `bool group_dead` (optional: without it, a
    /// thread that is its process's leader counts as the process).
    pub exit_group_dead: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// The record offsets the programs are compiled for (Linux 6.x).
pub mod layout {
    /// `signal/signal_generate`.
    pub mod signal_generate {
        /// `int sig`.
        pub const SIG: usize = 8;
        /// `int code`.
        pub const CODE: usize = 16;
        /// `pid_t pid`.
        pub const PID: usize = 36;
    }
    /// `exceptions/page_fault_user`.
    pub mod page_fault_user {
        /// `unsigned long address`.
        pub const ADDRESS: usize = 8;
        /// `unsigned long ip`.
        pub const IP: usize = 16;
    }
    /// `oom/mark_victim`.
    pub mod mark_victim {
        /// `int pid`.
        pub const PID: usize = 8;
        /// `unsigned long anon_rss`.
        pub const ANON_RSS: usize = 24;
    }
    /// `syscalls/sys_enter_exit_group`.
    pub mod exit_group {
        /// `int error_code` (an 8-byte syscall argument slot).
        pub const ERROR_CODE: usize = 16;
    }
    /// `sched/sched_process_exit`.
    pub mod process_exit {
        /// `bool group_dead` (6.10+).
        pub const GROUP_DEAD: usize = 32;
    }
}

impl CrashLayout {
    /// The compiled-for layout.
    pub const DEFAULT: Self = Self {
        sig: layout::signal_generate::SIG as u32,
        code: layout::signal_generate::CODE as u32,
        sig_pid: layout::signal_generate::PID as u32,
        pf_address: layout::page_fault_user::ADDRESS as u32,
        pf_ip: layout::page_fault_user::IP as u32,
        oom_pid: layout::mark_victim::PID as u32,
        oom_anon_rss: layout::mark_victim::ANON_RSS as u32,
        exit_error_code: layout::exit_group::ERROR_CODE as u32,
        exit_group_dead: layout::process_exit::GROUP_DEAD as u32,
        _pad: 0,
    };
}

impl Default for CrashLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (see the asserts below).
    unsafe impl aya::Pod for super::Fault {}
    unsafe impl aya::Pod for super::CrashEvent {}
    unsafe impl aya::Pod for super::CrashLayout {}
}

const _: () = assert!(core::mem::size_of::<Fault>() == 24);
const _: () = assert!(core::mem::size_of::<CrashEvent>() == 112 + 16 * MAX_STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<CrashLayout>() == 40);
