//! Finding target processes (by pid or name) and the /proc facts about them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// `PF_KTHREAD` in the flags field of /proc/PID/stat (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Errors finding or checking targets. All of them are bad input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// No such process.
    #[error("no process with pid {pid}")]
    NoSuchPid {
        /// The pid asked for.
        pid: u32,
    },
    /// A kernel thread has no user stacks and cannot be profiled per process.
    #[error("pid {pid} ({comm}) is a kernel thread; flamewatch profiles user processes")]
    KernelThread {
        /// The pid asked for.
        pid: u32,
        /// Its name.
        comm: String,
    },
    /// Nothing matched a name.
    #[error("no running process named '{name}' (matched against comm and executable name)")]
    NoSuchName {
        /// The name asked for.
        name: String,
    },
    /// The process has exited and waits for its parent to reap it.
    #[error("pid {pid} ({comm}) is a zombie (exited, not yet reaped): nothing to profile")]
    Zombie {
        /// The pid asked for.
        pid: u32,
        /// Its name.
        comm: String,
    },
    /// The id is a thread's, not a process's.
    #[error("pid {pid} is a thread of process {tgid}; give the process id")]
    Thread {
        /// The id asked for.
        pid: u32,
        /// Its process.
        tgid: u32,
    },
    /// The agent itself was asked for.
    #[error("pid {pid} is flamewatch itself")]
    IsSelf {
        /// The pid asked for.
        pid: u32,
    },
}

/// A process being profiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Process id (tgid).
    pub pid: u32,
    /// Its `comm` (thread-group leader's name, up to 15 bytes).
    pub comm: String,
    /// Its executable, when readable.
    pub exe: Option<PathBuf>,
    /// When it started (field 22 of /proc/PID/stat, clock ticks since
    /// boot): a pid reused by a later process has a later start.
    #[serde(skip)]
    pub start_time: u64,
}

impl Target {
    /// Reads the facts of a live process, checking it can be profiled.
    pub fn from_pid(pid: u32) -> Result<Self, TargetError> {
        if pid == std::process::id() {
            return Err(TargetError::IsSelf { pid });
        }
        let stat = ProcStat::read(pid).map_err(|_| TargetError::NoSuchPid { pid })?;
        let comm = stat.comm.clone();
        if stat.flags & PF_KTHREAD != 0 {
            return Err(TargetError::KernelThread { pid, comm });
        }
        if matches!(stat.state, 'Z' | 'X') {
            return Err(TargetError::Zombie { pid, comm });
        }
        // /proc/<tid> exists for every thread too (hidden from listings).
        if let Some(tgid) = tgid_of(pid).filter(|&t| t != pid) {
            return Err(TargetError::Thread { pid, tgid });
        }
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        Ok(Self {
            pid,
            comm,
            exe,
            start_time: stat.start_time,
        })
    }

    /// Is the process still there (not a zombie, and its pid not reused by
    /// a later process)?
    pub fn is_alive(&self) -> bool {
        ProcStat::read(self.pid).is_ok_and(|s| {
            !matches!(s.state, 'Z' | 'X') && (self.start_time == 0 || s.start_time == self.start_time)
        })
    }

    /// Whether its pid now belongs to a later process.
    pub fn pid_reused(&self) -> bool {
        ProcStat::read(self.pid).is_ok_and(|s| self.start_time != 0 && s.start_time != self.start_time)
    }
}

/// The process a task id belongs to (`Tgid:` in /proc/<id>/status).
fn tgid_of(id: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Is `pid` a live process (not gone, not a zombie)?
pub fn is_alive(pid: u32) -> bool {
    ProcStat::read(pid).is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Resolves `--pid` and `--process` arguments into targets (deduplicated,
/// sorted by pid).
pub fn resolve(pids: &[u32], names: &[String]) -> Result<Vec<Target>, TargetError> {
    let mut targets = Vec::new();
    for &pid in pids {
        targets.push(Target::from_pid(pid)?);
    }
    for name in names {
        let found = find_by_name(name);
        if found.is_empty() {
            return Err(TargetError::NoSuchName { name: name.clone() });
        }
        targets.extend(found);
    }
    targets.sort_by_key(|t| t.pid);
    targets.dedup_by_key(|t| t.pid);
    Ok(targets)
}

/// Every user process whose comm or executable basename is `name`
/// (the agent itself excluded).
pub fn find_by_name(name: &str) -> Vec<Target> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<Target> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| Target::from_pid(pid).ok())
        .filter(|t| matches_name(t, name))
        .filter(|t| is_alive(t.pid))
        .collect();
    found.sort_by_key(|t| t.pid);
    found
}

/// comm is truncated to 15 bytes by the kernel, so also compare the
/// executable's basename. A long name whose first 15 bytes are the comm
/// matches only if the process calls itself that (argv[0]): otherwise
/// "logcaster-loadgen" would also pick up "logcaster-load-replay".
fn matches_name(target: &Target, name: &str) -> bool {
    if target.comm == name {
        return true;
    }
    let exe_base = target.exe.as_deref().and_then(Path::file_name);
    if exe_base.is_some_and(|base| base == name) {
        return true;
    }
    name.len() > 15
        && target.comm.as_bytes() == &name.as_bytes()[..15]
        && argv0_base(target.pid).is_some_and(|a| a == name)
}

/// The file name of the process's argv[0].
fn argv0_base(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    let argv0 = std::str::from_utf8(argv0).ok()?;
    Some(Path::new(argv0).file_name()?.to_str()?.to_owned())
}

/// Thread ids of a process.
pub fn threads(pid: u32) -> io::Result<Vec<u32>> {
    let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// A thread's name, if it still exists.
pub fn thread_comm(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_owned())
}

/// The parts of /proc/PID/stat we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Name (field 2, without parentheses).
    pub comm: String,
    /// State letter (field 3).
    pub state: char,
    /// Kernel flags (field 9).
    pub flags: u64,
    /// User CPU time in clock ticks (field 14).
    pub utime: u64,
    /// System CPU time in clock ticks (field 15).
    pub stime: u64,
    /// Start time in clock ticks after boot (field 22).
    pub start_time: u64,
    /// CPU it last ran on (field 39; 0 if the kernel does not show it).
    pub processor: u32,
}

impl ProcStat {
    /// Reads /proc/PID/stat.
    pub fn read(pid: u32) -> io::Result<Self> {
        Self::read_path(&format!("/proc/{pid}/stat"))
    }

    /// Reads a stat file (a process's, or a thread's under task/).
    pub fn read_path(path: &str) -> io::Result<Self> {
        let text = fs::read_to_string(path)?;
        Self::parse(&text).ok_or_else(|| io::Error::other("malformed stat file"))
    }

    /// Parses the text of a stat file. comm may hold spaces and parentheses,
    /// so split at the *last* ')'.
    pub fn parse(text: &str) -> Option<Self> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_owned();
        let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        // rest[0] is field 3 (state).
        let field = |n: usize| rest.get(n - 3).and_then(|s| s.parse::<u64>().ok());
        Some(Self {
            comm,
            state: rest.first()?.chars().next()?,
            flags: field(9)?,
            utime: field(14)?,
            stime: field(15)?,
            start_time: field(22)?,
            processor: field(39).unwrap_or(0) as u32,
        })
    }
}

/// Root may profile anything; otherwise CAP_BPF and CAP_PERFMON (or
/// CAP_SYS_ADMIN) are needed. Returns a description of what is missing.
pub fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return None;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    let has = |cap: u64| cap_eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    Some(
        "flamewatch must run as root (or with CAP_BPF and CAP_PERFMON) to load eBPF programs; try sudo"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that stat parsing survives a comm with spaces and parentheses.
    #[test]
    fn stat_parse_tricky_comm() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 3 0 12345 0 0";
        let stat = ProcStat::parse(line).expect("parses");
        assert_eq!(stat.comm, "my (odd) proc");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.flags, 4194560);
        assert_eq!((stat.utime, stat.stime), (250, 17));
    }

    /// Test that a kernel thread (pid 2, kthreadd) is refused.
    #[test]
    fn kernel_thread_is_refused() {
        assert!(matches!(
            Target::from_pid(2),
            Err(TargetError::KernelThread { .. })
        ));
    }

    /// Test that a zombie (exited, not reaped) and a thread id are refused
    /// by name, not taken for processes.
    #[test]
    fn zombie_and_thread_are_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it has exited.
        let zombie = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            ProcStat::read(pid).is_ok_and(|s| s.state == 'Z')
        });
        assert!(zombie);
        assert!(matches!(Target::from_pid(pid), Err(TargetError::Zombie { .. })));
        child.wait().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let err = Target::from_pid(tid).unwrap_err();
        assert!(
            matches!(err, TargetError::Thread { tgid, .. } if tgid == std::process::id()),
            "{err}"
        );
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    /// Test that a process whose pid now belongs to a later process counts
    /// as gone, not as the same target.
    #[test]
    fn pid_reuse_is_noticed() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut t = Target::from_pid(child.id()).unwrap();
        assert!(t.start_time > 0);
        assert!(t.is_alive() && !t.pid_reused());
        // As if the pid had been handed to a process started a tick later.
        t.start_time -= 1;
        assert!(!t.is_alive() && t.pid_reused());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Test that a missing pid is reported as such.
    #[test]
    fn missing_pid_is_refused() {
        // pid_max is at most 2^22.
        assert!(matches!(
            Target::from_pid(4_194_304 + 7),
            Err(TargetError::NoSuchPid { .. })
        ));
    }

    /// Test that name matching uses comm, the exe basename, and the
    /// truncated comm of a long name only when argv[0] is that name.
    #[test]
    fn name_matching() {
        let t = Target {
            pid: 1,
            comm: "game-server-pro".into(),
            exe: Some("/opt/bin/game-server-production".into()),
            start_time: 0,
        };
        assert!(matches_name(&t, "game-server-pro"));
        assert!(matches_name(&t, "game-server-production"));
        // Shares the 15-byte comm, but neither exe nor argv[0] (pid 1's) is it.
        assert!(!matches_name(&t, "game-server-prod"));
        assert!(!matches_name(&t, "game"));
        // This test binary's name (flamewatch-<hash>) is longer than a comm.
        let me = std::process::id();
        let argv0 = argv0_base(me).expect("own cmdline");
        assert!(argv0.len() > 15, "{argv0}");
        let own = Target {
            pid: me,
            comm: argv0[..15].into(),
            exe: None,
            start_time: 0,
        };
        assert!(matches_name(&own, &argv0));
    }

    /// Test that our own process is found by name but never as a target.
    #[test]
    fn self_is_never_a_target() {
        let me = std::process::id();
        assert!(matches!(Target::from_pid(me), Err(TargetError::IsSelf { .. })));
    }
}
