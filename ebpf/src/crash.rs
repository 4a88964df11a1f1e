//! Crash, abort, OOM and exit capture.
//!
//! - `signal/signal_generate`: a SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT
//!   sent to the current thread (a fault or `raise`, not another process's
//!   `kill`) of a target: its user stack (frame pointers, with the leaf
//!   fix-up's word; plus a DWARF stack copy for DWARF targets), kernel
//!   stack, signal, code, name, and its last user page fault.
//! - `exceptions/page_fault_user`: a target thread's last fault (address,
//!   instruction, time), for the address of the SIGSEGV that follows.
//! - `oom/mark_victim`: the OOM killer chose a target.
//! - `syscalls/sys_enter_exit_group` + `sched/sched_process_exit`: the last
//!   thread of a target exits with the non-zero status it gave exit_group.
//!
//! All attach once for the engine's life; every path starts with one
//! `TARGETS` lookup, so other processes pay a hash lookup (page faults) or
//! less (other signals are filtered by number first).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{LruHashMap, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use flamewatch_common::{
    crash::{
        crash_flags,
        layout::{exit_group, mark_victim, page_fault_user, process_exit, signal_generate},
        CrashEvent, CrashLayout, Fault, KIND_EXIT, KIND_OOM, KIND_SIGNAL,
    },
    sample_flags, target_flags, TargetInfo, MAX_STACK_DEPTH,
};

use crate::{
    maps::{field_at, layout_offset, TARGETS},
    sampling::{copy_stack, Copied},
};

/// Last user page fault per target thread. 4 Ki threads: an LRU, so the
/// threads faulting now are the ones kept.
#[map]
pub static CRASH_FAULTS: LruHashMap<u32, Fault> = LruHashMap::with_max_entries(4096, 0);

/// `exit_group` status per target process, until its last thread exits.
#[map]
pub static CRASH_EXIT_CODES: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// Size of [`CRASH_EVENTS`]: 30 events of 2.1 KiB. Crashes are rare; the
/// agent drains it every second (and at once when it removes a target).
pub const CRASH_EVENTS_BYTES: u32 = 64 * 1024;

/// Captured crashes, OOM kills and failed exits, to the agent.
#[map]
pub static CRASH_EVENTS: RingBuf = RingBuf::with_byte_size(CRASH_EVENTS_BYTES, 0);

/// Offsets in this kernel's records, set by the agent at load from the
/// tracefs format files.
#[unsafe(no_mangle)]
static CRASH_LAYOUT: CrashLayout = CrashLayout::DEFAULT;

const SIGILL: i32 = 4;
const SIGABRT: i32 = 6;
const SIGBUS: i32 = 7;
const SIGFPE: i32 = 8;
const SIGSEGV: i32 = 11;

fn target(tgid: u32) -> Option<TargetInfo> {
    // SAFETY: plain map lookup of a Copy value.
    unsafe { TARGETS.get(&tgid) }.copied()
}

/// Reserves an event and fills what every kind has. The stack arrays are
/// left as they are: `bpf_get_stack` writes (and zero-fills) them, and the
/// agent reads only `user_frames`/`kernel_frames` entries.
#[inline(always)]
fn begin(kind: u32, tgid: u32, tid: u32) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<CrashEvent>> {
    let mut entry = CRASH_EVENTS.reserve::<CrashEvent>(0)?;
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, exclusively owned record.
    unsafe {
        (*e).kind = kind;
        (*e).tgid = tgid;
        (*e).tid = tid;
        (*e).signal = 0;
        (*e).code = 0;
        (*e).exit_code = 0;
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).fault_addr = 0;
        (*e).fault_ip = 0;
        (*e).fault_age_ns = 0;
        (*e).anon_rss_kb = 0;
        (*e).seq = 0;
        (*e).flags = 0;
        (*e).comm = [0; 16];
        (*e).leaf_ret = 0;
        (*e).leaf_offset = 0;
        (*e).user_frames = 0;
        (*e).kernel_frames = 0;
        (*e)._pad = 0;
    }
    Some(entry)
}

pub fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i64> {
    let offset = layout_offset!(CRASH_LAYOUT.sig);
    // SAFETY: an aligned i32 of the record, at this kernel's offset.
    let sig = unsafe { field_at::<i32>(ctx, offset, signal_generate::SIG) };
    if !matches!(sig, SIGSEGV | SIGBUS | SIGILL | SIGFPE | SIGABRT) {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(info) = target(tgid) else {
        return Ok(());
    };
    let offset = layout_offset!(CRASH_LAYOUT.sig_pid);
    // SAFETY: as above.
    let to = unsafe { field_at::<i32>(ctx, offset, signal_generate::PID) };
    // Raised in the thread's own context (a fault, raise, abort): the
    // current registers and stack are the crash's.
    if to as u32 != tid {
        return Ok(());
    }
    let offset = layout_offset!(CRASH_LAYOUT.code);
    // SAFETY: as above.
    let code = unsafe { field_at::<i32>(ctx, offset, signal_generate::CODE) };
    let Some(mut entry) = begin(KIND_SIGNAL, tgid, tid) else {
        return Ok(());
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved record; the helpers write at most the
    // given sizes into its arrays.
    unsafe {
        (*e).signal = sig;
        (*e).code = code;
        (*e).seq = (*e).ts_ns as u32;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        if let Some(f) = CRASH_FAULTS.get(&tid) {
            (*e).flags |= crash_flags::FAULT;
            (*e).fault_addr = f.addr;
            (*e).fault_ip = f.ip;
            (*e).fault_age_ns = (*e).ts_ns.saturating_sub(f.ts_ns);
        }
        let n = aya_ebpf::helpers::generated::bpf_get_stack(
            ctx.as_ptr(),
            (*e).user_ips.as_mut_ptr().cast(),
            (MAX_STACK_DEPTH * 8) as u32,
            u64::from(aya_ebpf::bindings::BPF_F_USER_STACK),
        );
        if n > 0 {
            (*e).user_frames = (n as u32) / 8;
            ((*e).leaf_ret, (*e).leaf_offset) = crate::leaf::leaf_word(crate::leaf::user_sp(None));
        }
        if info.flags & target_flags::KERNEL_STACKS != 0 {
            let n = aya_ebpf::helpers::generated::bpf_get_stack(
                ctx.as_ptr(),
                (*e).kernel_ips.as_mut_ptr().cast(),
                (MAX_STACK_DEPTH * 8) as u32,
                0,
            );
            if n > 0 {
                (*e).kernel_frames = (n as u32) / 8;
            }
        }
        if info.flags & target_flags::DWARF != 0 {
            let seq = (*e).seq;
            (*e).flags |= match copy_stack(ctx.as_ptr(), None, tgid, tid, 0, false, sample_flags::CRASH, seq)
            {
                Copied::Sent { .. } => crash_flags::DWARF,
                Copied::Lost => crash_flags::DWARF_LOST,
            };
        }
    }
    entry.submit(0);
    Ok(())
}

pub fn try_page_fault_user(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if target((pid_tgid >> 32) as u32).is_none() {
        return Ok(());
    }
    let (addr_at, ip_at) = (
        layout_offset!(CRASH_LAYOUT.pf_address),
        layout_offset!(CRASH_LAYOUT.pf_ip),
    );
    // SAFETY: aligned u64 fields of the record, at this kernel's offsets.
    let fault = unsafe {
        Fault {
            addr: field_at::<u64>(ctx, addr_at, page_fault_user::ADDRESS),
            ip: field_at::<u64>(ctx, ip_at, page_fault_user::IP),
            ts_ns: bpf_ktime_get_ns(),
        }
    };
    let _ = CRASH_FAULTS.insert(&(pid_tgid as u32), &fault, 0);
    Ok(())
}

pub fn try_mark_victim(ctx: &TracePointContext) -> Result<(), i64> {
    let offset = layout_offset!(CRASH_LAYOUT.oom_pid);
    // SAFETY: an aligned i32 of the record, at this kernel's offset.
    let pid = unsafe { field_at::<i32>(ctx, offset, mark_victim::PID) } as u32;
    // The victim is chosen among processes (their leader's pid).
    if target(pid).is_none() {
        return Ok(());
    }
    let Some(mut entry) = begin(KIND_OOM, pid, pid) else {
        return Ok(());
    };
    let e = entry.as_mut_ptr();
    let offset = layout_offset!(CRASH_LAYOUT.oom_anon_rss);
    // SAFETY: the reserved record; an aligned u64 of the tracepoint's.
    unsafe {
        (*e).anon_rss_kb = field_at::<u64>(ctx, offset, mark_victim::ANON_RSS);
    }
    entry.submit(0);
    Ok(())
}

pub fn try_exit_group(ctx: &TracePointContext) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if target(tgid).is_none() {
        return Ok(());
    }
    let offset = layout_offset!(CRASH_LAYOUT.exit_error_code);
    // SAFETY: the 8-byte argument slot of the record, at this kernel's offset.
    let code = unsafe { field_at::<u64>(ctx, offset, exit_group::ERROR_CODE) };
    // The status the parent sees is the low byte.
    let _ = CRASH_EXIT_CODES.insert(&tgid, &((code & 0xff) as u32), 0);
    Ok(())
}

pub fn try_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if target(tgid).is_none() {
        return Ok(());
    }
    let _ = CRASH_FAULTS.remove(&tid);
    let offset = layout_offset!(CRASH_LAYOUT.exit_group_dead);
    let last = if offset == 0 {
        tid == tgid
    } else {
        // SAFETY: a bool of the record, at this kernel's offset.
        let dead = unsafe { field_at::<u8>(ctx, offset, process_exit::GROUP_DEAD) };
        dead != 0
    };
    if !last {
        return Ok(());
    }
    // SAFETY: plain map lookup of a Copy value.
    let Some(code) = (unsafe { CRASH_EXIT_CODES.get(&tgid) }).copied() else {
        return Ok(());
    };
    let _ = CRASH_EXIT_CODES.remove(&tgid);
    if code == 0 {
        return Ok(());
    }
    let Some(mut entry) = begin(KIND_EXIT, tgid, tid) else {
        return Ok(());
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved record.
    unsafe {
        (*e).exit_code = code as i32;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    entry.submit(0);
    Ok(())
}
