//! The running kernel's tracepoint record layouts, read once from the
//! format files (/sys/kernel/tracing/events/<category>/<name>/format) and
//! handed to the programs as the load-time globals `TCP_LAYOUT`,
//! `SCHED_LAYOUT` and `CRASH_LAYOUT` (ebpf/src/tcp.rs, ebpf/src/offcpu.rs,
//! ebpf/src/crash.rs).
//!
//! A field the programs need but this kernel lacks turns off the feature
//! that reads it (warned once, naming the feature and the kernel); the rest
//! carries on. Optional fields (families, addresses) read as zero.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Mutex, OnceLock},
};

use flamewatch_common::{
    crash::CrashLayout,
    memory::MemLayout,
    tcp::{send_reset_form, SchedLayout, TcpLayout, ABSENT},
};
use tracing::warn;

use crate::tcp::attach::{ensure_tracefs, parse_format, Format};

/// A feature resting on one tracepoint program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// TCP state tracking (`sock/inet_sock_set_state`): `tcp`, TIME_WAIT.
    TcpStates,
    /// Resets received (`tcp/tcp_receive_reset`).
    TcpResetsReceived,
    /// Resets sent (`tcp/tcp_send_reset`).
    TcpResetsSent,
    /// Off-CPU and wall profiles (`sched/sched_switch`).
    OffCpu,
    /// Crash and abort capture (`signal/signal_generate`).
    CrashSignals,
    /// The fault address of a crash (`exceptions/page_fault_user`).
    FaultAddresses,
    /// OOM kills (`oom/mark_victim`).
    OomKills,
    /// Exit statuses (`syscalls/sys_enter_exit_group`).
    ExitCodes,
    /// Process exits (`sched/sched_process_exit`).
    ProcessExits,
    /// Memory growth profiles (`exceptions/page_fault_user`).
    MemoryFaults,
    /// Anonymous mmap in memory growth profiles (`syscalls/sys_enter_mmap`).
    MemoryMmap,
    /// brk in memory growth profiles (`syscalls/sys_enter_brk`).
    MemoryBrk,
}

impl Feature {
    /// Every feature, in report order.
    pub const ALL: [Feature; 12] = [
        Feature::TcpStates,
        Feature::TcpResetsReceived,
        Feature::TcpResetsSent,
        Feature::OffCpu,
        Feature::CrashSignals,
        Feature::FaultAddresses,
        Feature::OomKills,
        Feature::ExitCodes,
        Feature::ProcessExits,
        Feature::MemoryFaults,
        Feature::MemoryMmap,
        Feature::MemoryBrk,
    ];

    /// The tracepoint, `category/name`.
    pub fn tracepoint(self) -> &'static str {
        match self {
            Feature::TcpStates => "sock/inet_sock_set_state",
            Feature::TcpResetsReceived => "tcp/tcp_receive_reset",
            Feature::TcpResetsSent => "tcp/tcp_send_reset",
            Feature::OffCpu => "sched/sched_switch",
            Feature::CrashSignals => "signal/signal_generate",
            Feature::FaultAddresses => "exceptions/page_fault_user",
            Feature::OomKills => "oom/mark_victim",
            Feature::ExitCodes => "syscalls/sys_enter_exit_group",
            Feature::ProcessExits => "sched/sched_process_exit",
            Feature::MemoryFaults => "exceptions/page_fault_user",
            Feature::MemoryMmap => "syscalls/sys_enter_mmap",
            Feature::MemoryBrk => "syscalls/sys_enter_brk",
        }
    }

    /// What the user calls it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::TcpStates => "TCP state tracking",
            Feature::TcpResetsReceived => "TCP resets received",
            Feature::TcpResetsSent => "TCP resets sent",
            Feature::OffCpu => "off-CPU profiles",
            Feature::CrashSignals => "crash capture",
            Feature::FaultAddresses => "crash fault addresses",
            Feature::OomKills => "OOM kill capture",
            Feature::ExitCodes => "exit status capture",
            Feature::ProcessExits => "process exit capture",
            Feature::MemoryFaults => "memory growth profiles",
            Feature::MemoryMmap => "mmap in memory growth profiles",
            Feature::MemoryBrk => "brk in memory growth profiles",
        }
    }
}

/// The layouts of this kernel and what they rule out.
#[derive(Debug, Default)]
pub struct Layouts {
    /// For `TCP_LAYOUT`.
    pub tcp: TcpLayout,
    /// For `SCHED_LAYOUT`.
    pub sched: SchedLayout,
    /// For `CRASH_LAYOUT`.
    pub crash: CrashLayout,
    /// For `MEM_LAYOUT`.
    pub memory: MemLayout,
    /// Features this kernel's records cannot serve, with why.
    pub missing: Vec<(Feature, String)>,
}

impl Layouts {
    /// Why `feature` cannot work here, if it cannot.
    pub fn missing(&self, feature: Feature) -> Option<&str> {
        self.missing
            .iter()
            .find(|(f, _)| *f == feature)
            .map(|(_, why)| why.as_str())
    }
}

/// This kernel's layouts, read on first use.
pub fn layouts() -> &'static Layouts {
    static LAYOUTS: OnceLock<Layouts> = OnceLock::new();
    LAYOUTS.get_or_init(|| match ensure_tracefs() {
        Ok(tracefs) => resolve(&tracefs),
        Err(e) => Layouts {
            missing: Feature::ALL.iter().map(|&f| (f, e.to_string())).collect(),
            ..Layouts::default()
        },
    })
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Warns, once per process, that `feature` is off on this kernel.
pub fn warn_missing_once(feature: Feature, why: &str) {
    static WARNED: Mutex<Option<HashSet<Feature>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.get_or_insert_with(HashSet::new).insert(feature) {
        warn!(
            "{} unavailable on kernel {}: {why}; carrying on without it",
            feature.name(),
            kernel_release()
        );
    }
}

/// Reads every layout from the format files under `tracefs`.
pub fn resolve(tracefs: &Path) -> Layouts {
    let mut layouts = Layouts::default();
    for feature in Feature::ALL {
        let result = read_format(tracefs, feature.tracepoint()).and_then(|format| match feature {
            Feature::CrashSignals
            | Feature::FaultAddresses
            | Feature::OomKills
            | Feature::ExitCodes
            | Feature::ProcessExits => apply_crash(feature, &format, &mut layouts.crash),
            _ => {
                if apply_memory(feature, &format, &mut layouts.memory)? {
                    return Ok(());
                }
                apply(feature, &format, &mut layouts.tcp, &mut layouts.sched)
            }
        });
        if let Err(why) = result {
            layouts
                .missing
                .push((feature, format!("tracepoint {}: {why}", feature.tracepoint())));
        }
    }
    layouts
}

fn read_format(tracefs: &Path, tracepoint: &str) -> Result<Format, String> {
    let path = tracefs.join("events").join(tracepoint).join("format");
    std::fs::read_to_string(&path)
        .map(|text| parse_format(&text))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The offset of a field the program needs, of `size` bytes, past the
/// common header.
fn required(format: &Format, name: &str, size: usize) -> Result<u32, String> {
    match format.get(name) {
        Some(&(offset, s)) if s == size && offset >= 8 => {
            u32::try_from(offset).map_err(|_| format!("field {name}: offset {offset} out of range"))
        }
        Some(&(offset, s)) => Err(format!(
            "field {name} has offset {offset} size {s}, flamewatch reads {size} bytes"
        )),
        None => Err(format!("no field {name}")),
    }
}

/// The offset of a field the program can do without ([`ABSENT`]).
fn optional(format: &Format, name: &str, size: usize) -> u32 {
    required(format, name, size).unwrap_or(ABSENT)
}

/// Fills `feature`'s part of the layouts from its format.
fn apply(feature: Feature, f: &Format, tcp: &mut TcpLayout, sched: &mut SchedLayout) -> Result<(), String> {
    match feature {
        Feature::TcpStates => {
            tcp.ss_skaddr = required(f, "skaddr", 8)?;
            tcp.ss_oldstate = required(f, "oldstate", 4)?;
            tcp.ss_newstate = required(f, "newstate", 4)?;
            tcp.ss_sport = required(f, "sport", 2)?;
            tcp.ss_dport = required(f, "dport", 2)?;
            tcp.ss_protocol = required(f, "protocol", 2)?;
            tcp.ss_family = optional(f, "family", 2);
            tcp.ss_saddr_v6 = optional(f, "saddr_v6", 16);
            tcp.ss_daddr_v6 = optional(f, "daddr_v6", 16);
        }
        Feature::TcpResetsReceived => {
            tcp.rr_skaddr = required(f, "skaddr", 8)?;
            tcp.rr_sport = required(f, "sport", 2)?;
            tcp.rr_dport = required(f, "dport", 2)?;
            tcp.rr_family = optional(f, "family", 2);
            tcp.rr_saddr_v6 = optional(f, "saddr_v6", 16);
            tcp.rr_daddr_v6 = optional(f, "daddr_v6", 16);
        }
        Feature::TcpResetsSent => apply_send_reset(f, tcp)?,
        Feature::OffCpu => {
            sched.prev_state = required(f, "prev_state", 8)?;
            sched.next_pid = required(f, "next_pid", 4)?;
        }
        _ => {}
    }
    Ok(())
}

/// Fills the crash programs' part of the layouts. A missing field turns
/// its feature off; the program then reads zero there (`ABSENT`), which
/// each program treats as "no event" (or, for `group_dead`, falls back to
/// the leader's exit).
fn apply_crash(feature: Feature, f: &Format, crash: &mut CrashLayout) -> Result<(), String> {
    let get = |name: &str, size: usize, slot: &mut u32| -> Result<(), String> {
        let r = required(f, name, size);
        *slot = *r.as_ref().unwrap_or(&ABSENT);
        r.map(|_| ())
    };
    match feature {
        Feature::CrashSignals => {
            get("sig", 4, &mut crash.sig)?;
            get("code", 4, &mut crash.code)?;
            get("pid", 4, &mut crash.sig_pid)?;
        }
        Feature::FaultAddresses => {
            get("address", 8, &mut crash.pf_address)?;
            get("ip", 8, &mut crash.pf_ip)?;
        }
        Feature::OomKills => {
            get("pid", 4, &mut crash.oom_pid)?;
            crash.oom_anon_rss = optional(f, "anon_rss", 8);
        }
        Feature::ExitCodes => get("error_code", 8, &mut crash.exit_error_code)?,
        Feature::ProcessExits => crash.exit_group_dead = optional(f, "group_dead", 1),
        _ => {}
    }
    Ok(())
}

/// Fills the memory features' part of the layouts; false for other features.
fn apply_memory(feature: Feature, f: &Format, memory: &mut MemLayout) -> Result<bool, String> {
    match feature {
        Feature::MemoryFaults => {
            memory.pf_address = required(f, "address", 8)?;
            memory.pf_error_code = required(f, "error_code", 8)?;
        }
        Feature::MemoryMmap => {
            memory.mmap_len = required(f, "len", 8)?;
            memory.mmap_flags = required(f, "flags", 8)?;
        }
        Feature::MemoryBrk => memory.brk_brk = required(f, "brk", 8)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// `tcp_send_reset` has two forms: `sockaddr` addresses (6.10+), or ports,
/// family and v6 addresses as separate fields (before).
fn apply_send_reset(f: &Format, tcp: &mut TcpLayout) -> Result<(), String> {
    tcp.sr_skaddr = required(f, "skaddr", 8)?;
    tcp.sr_state = required(f, "state", 4)?;
    if let (Ok(saddr), Ok(daddr)) = (required(f, "saddr", 28), required(f, "daddr", 28)) {
        tcp.sr_form = send_reset_form::SOCKADDR;
        (tcp.sr_saddr, tcp.sr_daddr) = (saddr, daddr);
        (tcp.sr_sport, tcp.sr_dport, tcp.sr_family) = (ABSENT, ABSENT, ABSENT);
        (tcp.sr_saddr_v6, tcp.sr_daddr_v6) = (ABSENT, ABSENT);
        return Ok(());
    }
    tcp.sr_form = send_reset_form::FIELDS;
    (tcp.sr_saddr, tcp.sr_daddr) = (ABSENT, ABSENT);
    tcp.sr_sport = required(f, "sport", 2)?;
    tcp.sr_dport = required(f, "dport", 2)?;
    tcp.sr_family = optional(f, "family", 2);
    tcp.sr_saddr_v6 = optional(f, "saddr_v6", 16);
    tcp.sr_daddr_v6 = optional(f, "daddr_v6", 16);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tcp_send_reset of Debian 12's 6.1 (include/trace/events/tcp.h then).
    const SEND_RESET_6_1: &str = "name: tcp_send_reset
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
";

    /// Test that the pre-6.10 form of tcp_send_reset (4-byte `saddr`) is
    /// read through its port and v6 address fields.
    #[test]
    fn send_reset_fields_form() {
        let mut tcp = TcpLayout::DEFAULT;
        apply_send_reset(&parse_format(SEND_RESET_6_1), &mut tcp).unwrap();
        assert_eq!(tcp.sr_form, send_reset_form::FIELDS);
        assert_eq!((tcp.sr_sport, tcp.sr_dport, tcp.sr_family), (28, 30, 32));
        assert_eq!((tcp.sr_saddr_v6, tcp.sr_daddr_v6), (42, 58));
        assert_eq!((tcp.sr_saddr, tcp.sr_daddr), (ABSENT, ABSENT));
    }

    /// Test that a kernel without a needed field turns off only that
    /// feature, naming the field.
    #[test]
    fn missing_field_turns_off_one_feature() {
        let dir = tempfile::tempdir().unwrap();
        let host = Path::new("/sys/kernel/tracing/events");
        for feature in Feature::ALL {
            let d = dir.path().join("events").join(feature.tracepoint());
            std::fs::create_dir_all(&d).unwrap();
            let text = match feature {
                Feature::TcpResetsSent => SEND_RESET_6_1.replace("state;", "st;"),
                _ => std::fs::read_to_string(host.join(feature.tracepoint()).join("format"))
                    .unwrap_or_else(|_| String::new()),
            };
            std::fs::write(d.join("format"), text).unwrap();
        }
        if !host.join("sock").is_dir() {
            eprintln!("tracefs not readable (not root?): only the parser is tested");
            return;
        }
        let layouts = resolve(dir.path());
        let missing: Vec<_> = layouts.missing.iter().map(|(f, _)| *f).collect();
        assert_eq!(missing, [Feature::TcpResetsSent], "{:?}", layouts.missing);
        assert!(
            layouts.missing[0].1.contains("no field state"),
            "{:?}",
            layouts.missing
        );
    }

    /// Test that this machine's kernel has the layout compiled in (its
    /// direct-load path), when tracefs is readable.
    #[test]
    fn this_kernel_has_the_compiled_layout() {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("events/sock").is_dir() {
            eprintln!("tracefs not readable (not root?): skipped");
            return;
        }
        let layouts = resolve(tracefs);
        assert!(layouts.missing.is_empty(), "{:?}", layouts.missing);
        assert_eq!(layouts.tcp, TcpLayout::DEFAULT);
        assert_eq!(layouts.sched, SchedLayout::DEFAULT);
        assert_eq!(layouts.memory, MemLayout::DEFAULT);
        assert_eq!(layouts.crash, CrashLayout::DEFAULT);
    }

    /// signal_generate with its fields moved (a kernel that added one
    /// before them).
    const SIGNAL_MOVED: &str = "name: signal_generate
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int extra;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int sig;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int errno;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int code;\toffset:20;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:24;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:40;\tsize:4;\tsigned:1;
";

    /// Test that the crash programs' offsets come from the format file, not
    /// the compiled-in values, and that a missing field turns off only its
    /// feature and reads as absent.
    #[test]
    fn crash_offsets_from_the_format() {
        let mut crash = CrashLayout::DEFAULT;
        apply_crash(Feature::CrashSignals, &parse_format(SIGNAL_MOVED), &mut crash).unwrap();
        assert_eq!((crash.sig, crash.code, crash.sig_pid), (12, 20, 40));
        let no_pid = SIGNAL_MOVED.replace("pid_t pid;", "pid_t who;");
        let err = apply_crash(Feature::CrashSignals, &parse_format(&no_pid), &mut crash).unwrap_err();
        assert!(err.contains("no field pid"), "{err}");
        assert_eq!(crash.sig_pid, ABSENT);
        // Other features keep their offsets.
        assert_eq!(crash.pf_address, CrashLayout::DEFAULT.pf_address);
    }
}
