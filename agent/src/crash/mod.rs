//! Crash, abort, OOM and failed-exit capture.
//!
//! The kernel side (ebpf/src/crash.rs) records, for the targets only, the
//! faulting thread's stacks when it raises a fatal signal, the OOM killer's
//! choice of a target, and a target's non-zero exit status. This module
//! attaches those programs once for the engine's life ([`CrashTracer`]),
//! decodes their events, and describes a captured [`Crash`] (symbolized by
//! the engine while the target's mappings are still known); [`report`]
//! writes it as `<stem>.crash.json` and `<stem>.crash.txt`.

pub mod report;

use std::{collections::BTreeMap, time::SystemTime};

use aya::{
    maps::{MapData, RingBuf},
    programs::TracePoint,
    Ebpf,
};
use flamewatch_common::crash::{CrashEvent, KIND_EXIT, KIND_OOM, KIND_SIGNAL};
use serde::Serialize;
use tracing::debug;

use crate::{
    bpf::BpfError,
    layout::{layouts, warn_missing_once, Feature},
};

/// The programs, their tracepoints, and the feature each serves.
const PROGRAMS: [(&str, &str, &str, Feature); 5] = [
    (
        "flamewatch_crash_signal",
        "signal",
        "signal_generate",
        Feature::CrashSignals,
    ),
    (
        "flamewatch_crash_fault",
        "exceptions",
        "page_fault_user",
        Feature::FaultAddresses,
    ),
    ("flamewatch_crash_oom", "oom", "mark_victim", Feature::OomKills),
    (
        "flamewatch_crash_exit_group",
        "syscalls",
        "sys_enter_exit_group",
        Feature::ExitCodes,
    ),
    (
        "flamewatch_crash_exit",
        "sched",
        "sched_process_exit",
        Feature::ProcessExits,
    ),
];

/// Crash events kept by the engine before a caller takes them: a crash
/// loop of many targets cannot grow the agent.
pub const MAX_PENDING: usize = 64;

/// Errors of the crash layer.
#[derive(Debug, thiserror::Error)]
pub enum CrashError {
    /// Loading or attaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// tracefs is needed to attach tracepoints.
    #[error("{0}")]
    Tracefs(String),
    /// Writing the report failed.
    #[error("writing the crash report {path}: {source}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The attached crash programs and their event ring.
pub struct CrashTracer {
    events: RingBuf<MapData>,
    /// Programs attached (by name), for the log.
    attached: Vec<&'static str>,
}

impl CrashTracer {
    /// Loads and attaches every crash program this kernel's records allow
    /// (a missing tracepoint or field turns off only its part, warned once).
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, CrashError> {
        crate::tcp::attach::ensure_tracefs().map_err(|e| CrashError::Tracefs(e.to_string()))?;
        let events: RingBuf<_> = crate::bpf::take_map(ebpf, "CRASH_EVENTS")?;
        let mut attached = Vec::new();
        for (prog, category, tracepoint, feature) in PROGRAMS {
            if let Some(why) = layouts().missing(feature) {
                warn_missing_once(feature, why);
                continue;
            }
            let program: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or(BpfError::MissingMap(prog))?
                .try_into()
                .map_err(|source| BpfError::Program { name: prog, source })?;
            program
                .load()
                .map_err(|source| BpfError::Program { name: prog, source })?;
            program
                .attach(category, tracepoint)
                .map_err(|source| BpfError::Program { name: prog, source })?;
            attached.push(prog);
        }
        debug!("crash programs attached: {}", attached.join(", "));
        Ok(Self { events, attached })
    }

    /// Names of the attached programs.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// The events sent since the last call (at most [`MAX_PENDING`]; the
    /// rest stay in the ring for the next).
    pub fn poll(&mut self) -> Vec<CrashEvent> {
        let mut out = Vec::new();
        while out.len() < MAX_PENDING {
            let Some(item) = self.events.next() else { break };
            if let Some(e) = decode(&item) {
                out.push(e);
            }
        }
        out
    }
}

/// A crash event record; `None` when too short.
pub fn decode(bytes: &[u8]) -> Option<CrashEvent> {
    if bytes.len() < std::mem::size_of::<CrashEvent>() {
        return None;
    }
    // SAFETY: the slice holds a CrashEvent (plain old data: any bytes are a
    // value), read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// What happened to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashKind {
    /// A fatal signal raised by the thread itself (fault or abort).
    Crashed,
    /// Chosen by the OOM killer.
    OomKilled,
    /// Exited with a non-zero status.
    Exited,
}

impl CrashKind {
    /// The alert rule's name.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Crashed => "crashed",
            Self::OomKilled => "oom_killed",
            Self::Exited => "exited",
        }
    }

    /// The kind of a raw event.
    pub fn of(kind: u32) -> Option<Self> {
        match kind {
            KIND_SIGNAL => Some(Self::Crashed),
            KIND_OOM => Some(Self::OomKilled),
            KIND_EXIT => Some(Self::Exited),
            _ => None,
        }
    }
}

/// The signal's name (`SIGSEGV`).
pub fn signal_name(sig: i32) -> String {
    match sig {
        4 => "SIGILL".into(),
        6 => "SIGABRT".into(),
        7 => "SIGBUS".into(),
        8 => "SIGFPE".into(),
        9 => "SIGKILL".into(),
        11 => "SIGSEGV".into(),
        n => format!("signal {n}"),
    }
}

/// The name of `si_code` `code` of signal `sig` (include/uapi/asm-generic/siginfo.h).
pub fn code_name(sig: i32, code: i32) -> String {
    let named = match (sig, code) {
        (_, 0) => Some("SI_USER"),
        (_, -6) => Some("SI_TKILL"),
        (_, -1) => Some("SI_QUEUE"),
        (_, 0x80) => Some("SI_KERNEL"),
        (11, 1) => Some("SEGV_MAPERR"),
        (11, 2) => Some("SEGV_ACCERR"),
        (7, 1) => Some("BUS_ADRALN"),
        (7, 2) => Some("BUS_ADRERR"),
        (7, 3) => Some("BUS_OBJERR"),
        (4, 1) => Some("ILL_ILLOPC"),
        (4, 2) => Some("ILL_ILLOPN"),
        (4, 5) => Some("ILL_PRVOPC"),
        (8, 1) => Some("FPE_INTDIV"),
        (8, 2) => Some("FPE_INTOVF"),
        (8, 3) => Some("FPE_FLTDIV"),
        _ => None,
    };
    named.map_or_else(|| format!("code {code}"), str::to_owned)
}

/// The fault address to report for a signal event: the thread's last user
/// page fault, when the signal is a memory fault and that fault is its
/// cause (same instruction as the crash, within a second).
pub fn fault_address(e: &CrashEvent) -> Option<u64> {
    use flamewatch_common::crash::crash_flags;
    let memory = matches!(e.signal, 7 | 11);
    let fresh = e.flags & crash_flags::FAULT != 0 && e.fault_age_ns < 1_000_000_000;
    let same_ip = e.user_frames == 0 || e.user_ips[0] == e.fault_ip;
    (e.kind == KIND_SIGNAL && memory && fresh && same_ip).then_some(e.fault_addr)
}

/// The NUL-terminated name of an event.
pub fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A stack of the profile before the crash: frames root first, samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoldedStack {
    /// Frames, root first, `;`-joined.
    pub stack: String,
    /// Samples.
    pub samples: u64,
}

/// A captured crash, OOM kill or failed exit, symbolized.
#[derive(Debug, Clone, Serialize)]
pub struct Crash {
    /// What happened (`crashed`, `oom_killed`, `exited`).
    pub kind: CrashKind,
    /// RFC 3339, when the kernel saw it.
    pub time: String,
    /// The same as a time value.
    #[serde(skip)]
    pub at: SystemTime,
    /// Process.
    pub pid: u32,
    /// Its name.
    pub comm: String,
    /// The thread that crashed (the process for OOM kills and exits).
    pub tid: u32,
    /// That thread's name.
    pub thread: String,
    /// Signal number (crashes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Its name (`SIGSEGV`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_name: Option<String>,
    /// `si_code` and its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Faulting address, hex (memory faults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_address: Option<String>,
    /// Exit status (exits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Anonymous resident memory when chosen, bytes (OOM kills).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anon_rss_bytes: Option<u64>,
    /// How the user stack was unwound (`frame pointers`, `DWARF`), or why
    /// there is none.
    pub unwind: String,
    /// The crashing thread's user stack, innermost (the faulting function)
    /// first, as a debugger's backtrace shows it.
    pub stack: Vec<String>,
    /// Its kernel stack, innermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel_stack: Vec<String>,
    /// Seconds of CPU profile before the crash in `profile` (the flight
    /// recorder's last minute, or less when it holds less).
    pub profile_seconds: f64,
    /// Samples in it.
    pub profile_samples: u64,
    /// Its heaviest stacks ([`report::MAX_PROFILE_STACKS`] at most).
    pub profile: Vec<FoldedStack>,
    /// The target's last metrics before it went (daemon), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl Crash {
    /// One line: what, where, and the innermost function.
    pub fn headline(&self) -> String {
        let who = format!("{} (pid {})", self.comm, self.pid);
        match self.kind {
            CrashKind::Crashed => {
                let at = self
                    .fault_address
                    .as_ref()
                    .map_or_else(String::new, |a| format!(" at {a}"));
                let sig = self.signal_name.clone().unwrap_or_default();
                let code = self.code.as_ref().map_or_else(String::new, |c| format!(" ({c})"));
                let top = self
                    .stack
                    .first()
                    .map_or_else(String::new, |f| format!(" in {f}"));
                format!(
                    "{who} crashed: {sig}{code}{at} in thread {} (tid {}){top}",
                    self.thread, self.tid
                )
            }
            CrashKind::OomKilled => format!(
                "{who} was killed by the OOM killer{}",
                self.anon_rss_bytes
                    .map_or_else(String::new, |b| format!(" ({} MiB anonymous memory)", b >> 20))
            ),
            CrashKind::Exited => format!("{who} exited with status {}", self.exit_code.unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flamewatch_common::{crash::crash_flags, MAX_STACK_DEPTH};

    fn event() -> CrashEvent {
        CrashEvent {
            kind: KIND_SIGNAL,
            tgid: 10,
            tid: 11,
            signal: 11,
            code: 1,
            exit_code: 0,
            ts_ns: 5_000,
            fault_addr: 0,
            fault_ip: 0x401000,
            fault_age_ns: 2_000,
            anon_rss_kb: 0,
            seq: 1,
            flags: crash_flags::FAULT,
            comm: *b"parser\0\0\0\0\0\0\0\0\0\0",
            leaf_ret: 0,
            leaf_offset: 0,
            user_frames: 2,
            kernel_frames: 0,
            _pad: 0,
            user_ips: [0x401000; MAX_STACK_DEPTH],
            kernel_ips: [0; MAX_STACK_DEPTH],
        }
    }

    /// Test that a SIGSEGV's address is its thread's last fault only when
    /// that fault is fresh and at the crashing instruction.
    #[test]
    fn fault_address_only_from_the_causing_fault() {
        let e = event();
        assert_eq!(fault_address(&e), Some(0));
        let stale = CrashEvent {
            fault_age_ns: 5_000_000_000,
            ..e
        };
        assert_eq!(fault_address(&stale), None);
        let elsewhere = CrashEvent {
            fault_ip: 0x402000,
            ..e
        };
        assert_eq!(fault_address(&elsewhere), None);
        let abort = CrashEvent { signal: 6, ..e };
        assert_eq!(fault_address(&abort), None);
        let none = CrashEvent { flags: 0, ..e };
        assert_eq!(fault_address(&none), None);
    }

    /// Test that a record shorter than an event is refused, and a whole
    /// one decodes with its name.
    #[test]
    fn decodes_events() {
        let e = event();
        // SAFETY: viewing a POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const CrashEvent).cast::<u8>(),
                std::mem::size_of::<CrashEvent>(),
            )
        };
        assert!(decode(&bytes[..100]).is_none());
        let d = decode(bytes).unwrap();
        assert_eq!((d.tgid, d.tid, d.signal), (10, 11, 11));
        assert_eq!(comm(&d.comm), "parser");
        assert_eq!(code_name(11, 1), "SEGV_MAPERR");
        assert_eq!(code_name(6, -6), "SI_TKILL");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(CrashKind::of(KIND_OOM), Some(CrashKind::OomKilled));
    }
}
